"""The run's tracking stage (``--track``): between the engine's results, in input order, and the
writers. One Tracker per sequence: a video's frames (by the video's output name), or the images of
one folder in name order (the walk's order). Per frame it

- gives each instance its track (``Instance.track_id``; None: no track, see tracker.py);
- merges the duplicates of one object into its highest-scoring instance: the others leave the
  frame's records (their labels and scores stay in the kept one's ``merged``) and their pixels in
  the instance map become the kept one's; the kept one takes the track's class (``detected_label``:
  its own, when that differs); ids are renumbered 1..N in descending score, as without --track;
- on a video frame, hands the tracker's state to the frames journal (``ImageResult.track_state``),
  from which a resumed run continues (outputs/video_resume.py).
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Iterable, Iterator, Optional

import numpy as np

from m2f_cli.records import ImageRef, ImageResult, Instance
from m2f_cli.tracking.masks import grid_mask, stride_for
from m2f_cli.tracking.tracker import Assignment, Detection, Tracker, TrackerConfig


def sequence_of(ref: ImageRef) -> str:
    """The sequence a result belongs to: its video's output name, or its folder's."""
    return ref.frame.video_rel if ref.frame is not None else "images:" + posixpath.dirname(ref.rel)


class TrackingStage:
    """Tracks over a run's results. initial: sequence -> a Tracker state to continue from (a
    resumed video's, video_resume.track_states)."""

    def __init__(self, config: TrackerConfig = TrackerConfig(), initial: Optional[dict] = None):
        self.config = config
        self.initial = dict(initial or {})
        self.trackers: dict[str, Tracker] = {}

    def apply(self, items: Iterable[object]) -> Iterator[object]:
        """The items, results tracked in place; a video's end drops its tracker."""
        for item in items:
            if isinstance(item, ImageResult) and item.task == "instance":
                self.track(item)
            elif getattr(item, "ends_unit", False):
                self.trackers.pop(item.ref.rel, None)
            yield item

    def track(self, r: ImageResult) -> None:
        key = sequence_of(r.ref)
        tracker = self.trackers.get(key)
        if tracker is None:
            tracker = self.trackers[key] = Tracker(self.config, self.initial.pop(key, None))
        stride = stride_for(r.width, r.height, self.config.grid)
        cand = [k for k, i in enumerate(r.instances) if i.score >= self.config.low]
        dets = [Detection(grid_mask(r.instances[k].rle, stride), r.instances[k].score,
                          (r.instances[k].label, r.instances[k].category_id, r.instances[k].label_index))
                for k in cand]
        assigned = dict(zip(cand, tracker.step(dets)))
        r.instances, lut = relabelled(r.instances, assigned, cand)
        if len(lut):
            r.label_map = lut[np.minimum(r.label_map, len(lut) - 1)].astype(r.label_map.dtype)
        if r.ref.frame is not None:
            r.track_state = tracker.state()


def relabelled(instances: list[Instance], assigned: dict[int, Assignment], cand: list[int]
               ) -> tuple[list[Instance], np.ndarray]:
    """(the frame's instances with their tracks, duplicates merged and ids renumbered; the lookup
    table old id -> new id for the instance map, (max old id + 1,) int64)."""
    merged_into = {k: cand[a.duplicate_of] for k, a in assigned.items() if a.duplicate_of is not None}
    merged: dict[int, list[Instance]] = {}
    for k in sorted(merged_into):
        merged.setdefault(merged_into[k], []).append(instances[k])
    out: list[Instance] = []
    new_id: dict[int, int] = {}
    for k, inst in enumerate(instances):
        if k in merged_into:
            continue
        a = assigned.get(k)
        change: dict = {"id": len(out) + 1}
        if a is not None and a.track_id is not None:
            change["track_id"] = a.track_id
            label, cid, index = a.cls
            if label != inst.label:
                change.update(label=label, category_id=cid, label_index=index, detected_label=inst.label)
        if a is not None:
            change["merged"] = tuple((m.label, m.score) for m in merged.get(k, ()))
        out.append(dataclasses.replace(inst, **change))
        new_id[inst.id] = len(out)
    for k, j in merged_into.items():
        new_id[instances[k].id] = new_id[instances[j].id]
    lut = np.arange(max(new_id, default=-1) + 1, dtype=np.int64)
    for old, new in new_id.items():
        lut[old] = new
    return out, lut
