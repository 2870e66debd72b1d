"""The association: which detection of this frame continues which track.

Each step (one frame of a sequence) takes the frame's detections (grid masks, masks.py, with a score
and a class) and returns each one's track. In order:

1. duplicates: a mask over two detected objects (two or more strong detections of distinct objects,
   IoU < ``span_iou`` between them, each at least ``span_inside`` inside it and covering together
   ``span_cover`` of it: Mask2Former sometimes returns the pair as one more instance) is merged into
   the part it overlaps most, whatever its score. Then the detections at or above ``low`` are taken
   by descending score; one whose mask has IoU >= ``dup_iou`` with a detection already kept is the
   same object (Mask2Former keeps the top-k (query, class) pairs, so one object can come twice under
   two classes), or IoU >= ``same_class_iou`` when both have the same class (two queries on one
   object, their masks often further apart than two classes' masks), and one whose mask is ``dup_cover`` or more covered by the kept ones together is no
   new object: it joins the track of the kept detection it overlaps most and adds its score to that
   track's class votes.
2. motion: each track's last observed mask is shifted by its velocity (cells per frame, from the
   centroids of its observations, smoothed) times the frames since it was seen. An observation whose
   mask area is not within a factor ``velocity_area`` of the track's last mask leaves the velocity as
   it was: its centroid moved with the mask's shape (half hidden, or a mask over it and a neighbour),
   not with the object.
3. four Hungarian assignments (scipy's linear_sum_assignment on 1 - IoU, a pair kept only at
   IoU >= ``match_iou``): the detections at or above ``high``, and with them (``covered_match``)
   the strong detections step 1 merged only because a larger mask covered them (not by IoU, nor as
   the pair mask of the span rule), and (``dup_match``) those it merged by IoU into a mask at least
   ``dup_match`` times larger, against every live track's predicted mask; then the detections
   between ``low`` and ``high`` against the tracks left (ByteTrack's second pass: a weak detection
   keeps a track alive but never starts one); then the high ones left against the tracks' last
   observed masks, unshifted (OC-SORT's observation-centric recovery, for a track whose velocity
   went wrong); then the high ones left against the confirmed tracks left, by the distance of their
   centroids, ``reid_dist`` track sizes at most, when area (``reid_area``) and class agree (the
   re-identification of an object hidden a few frames whose motion estimate went wrong, which
   would start a new track). A covered (or dup_match) detection matched in the first is that track's object, seen inside a mask
   over it and a neighbour (Mask2Former returns the pair as one instance, and only one part of it on
   its own, so the span rule does not apply): it is no duplicate, and its cover, when no track takes
   it, starts none. One not matched stays merged (the usual case: a partial mask of one object,
   which fits the track less than the whole does).
4. each high detection left starts a track. A track is confirmed, and takes the next id (1, 2, ...
   per sequence), at once when its first detection scores >= ``confirm``, else when it is matched
   again in the next frame; until then it is tentative: its detection gets no track id, and a
   tentative track not matched in the next frame ends (a one-frame blip makes no track). A
   confirmed track unseen for more than ``max_lost`` frames ends.

A track's class is the class with the highest sum of scores over its detections so far (duplicates
included; ties: the one seen first). Everything is deterministic: detections are taken in a fixed
order, tracks by id, and the state (``state()``/``Tracker(state=...)``) round-trips through JSON
exactly, so a resumed video continues as an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

from m2f_cli.tracking.masks import centroid, intersections, iou_matrix, iou_of, pack, shifted, unpack


@dataclass(frozen=True)
class TrackerConfig:
    """The tracker's settings; the defaults are --track's (docs/tracking.md)."""

    high: float = 0.5       # detections at or above start tracks and are matched first
    low: float = 0.2        # detections in [low, high) only continue tracks; below low are ignored
    match_iou: float = 0.3  # least mask IoU of a match
    dup_iou: float = 0.5    # two detections of one frame with at least this mask IoU are one object
    same_class_iou: float = 0.4  # ... or at least this when they have the same class (two queries, one object)
    dup_cover: float = 0.7  # a detection this much covered by higher-scoring ones is no new object
    span_inside: float = 0.5  # a strong detection this much inside a larger mask is a part of it
    span_iou: float = 0.3   # two parts with less IoU than this are two objects
    span_cover: float = 0.6  # a mask this much covered by two or more parts is those objects, not one
    max_lost: int = 15      # frames a track survives unseen
    confirm: float = 0.8    # a new track's detection at least this strong is a track at once; a weaker
                            # one's track is tentative (no track_id written) until seen again next frame
    smoothing: float = 0.5  # weight of the newest observed velocity (the rest: the previous estimate)
    grid: int = 256         # masks are compared on a grid of at most this many cells per side
    reid_dist: float = 2.0  # a high detection left continues a confirmed track left (step 3's re-identification)
    reid_area: float = 2.0  # when its centroid is this near the track's last one (in sqrt(track area)), its
                            # area within this factor of the track's and its class the track's; 0: never
    velocity_area: float = 1.25  # a match whose mask area is not within this factor of the track's last one
                                 # leaves the track's velocity as it was (step 2); 0: every match updates it
    covered_match: bool = True  # the strong detections merged only as covered take part in step 3's first
                                # assignment (a track they fit best takes them; their cover starts no track)
    dup_match: float = 1.1  # ... and with them those merged by IoU into a mask at least this many times
                            # larger (an object's mask inside a mask over it and a neighbour); 0: none

    def record(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Detection:
    """One instance of a frame. mask: (h, w) bool grid mask (masks.grid_mask); cls: (label,
    category_id, label_index)."""

    mask: np.ndarray
    score: float
    cls: tuple


@dataclass(frozen=True)
class Assignment:
    """What a detection became. track_id: None when it has no track (below low; between low and
    high and unmatched; or its track is tentative, see step 4). duplicate_of: the index of the
    detection it was merged into, else None. cls: the track's class (after this frame's votes), None without a track."""

    track_id: Optional[int]
    duplicate_of: Optional[int] = None
    cls: Optional[tuple] = None


@dataclass
class Track:
    """A track. mask: its last observed grid mask; c: that mask's centroid (None when empty);
    v: velocity in cells per frame; last: the step it was last seen; votes: class -> summed score;
    confirmed: False while tentative (id 0 then: ids are given at confirmation, in order)."""

    id: int
    mask: np.ndarray
    c: Optional[tuple]
    v: tuple = (0.0, 0.0)
    last: int = 0
    hits: int = 1
    votes: dict = field(default_factory=dict)
    confirmed: bool = True

    def cls(self) -> tuple:
        return max(self.votes.items(), key=lambda kv: kv[1])[0]  # first of the best: seen first

    def predicted(self, step: int, shape: tuple) -> np.ndarray:
        if self.mask.shape != shape:  # another frame size (an image sequence): nothing to compare
            return np.zeros(shape, bool)
        gap = step - self.last
        return shifted(self.mask, self.v[0] * gap, self.v[1] * gap)

    def observe(self, mask: np.ndarray, step: int, smoothing: float, area: float = 0.0) -> None:
        """area > 0: a mask whose area is not within this factor of the last one's leaves v as it is."""
        c = centroid(mask)
        c = None if np.isnan(c[0]) else c
        # a mask of another size: its centroid moved with the mask's shape, not with the object
        steady = area <= 0 or within(float(self.mask.sum()), float(mask.sum()), area)
        if steady and c is not None and self.c is not None and mask.shape == self.mask.shape:
            gap = step - self.last
            obs = ((c[0] - self.c[0]) / gap, (c[1] - self.c[1]) / gap)
            a = 1.0 if self.hits == 1 else smoothing
            self.v = (a * obs[0] + (1 - a) * self.v[0], a * obs[1] + (1 - a) * self.v[1])
        self.mask, self.c, self.last, self.hits = mask, c, step, self.hits + 1

    def to_json(self) -> dict:
        return {"id": self.id, "mask": pack(self.mask), "c": None if self.c is None else list(self.c),
                "v": list(self.v), "last": self.last, "hits": self.hits,
                "votes": [[*k, s] for k, s in self.votes.items()], "confirmed": self.confirmed}

    @classmethod
    def from_json(cls, d: dict) -> "Track":
        return cls(d["id"], unpack(d["mask"]), None if d["c"] is None else tuple(d["c"]), tuple(d["v"]),
                   d["last"], d["hits"], {tuple(v[:-1]): v[-1] for v in d["votes"]}, d.get("confirmed", True))


def within(a: float, b: float, factor: float) -> bool:
    """Whether areas a and b are within a factor of each other (each at most factor times the other)."""
    return a <= factor * b and b <= factor * a


def hungarian(iou: np.ndarray, rows: list[int], cols: list[int], min_iou: float
              ) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Match rows to cols of iou (indices into it) maximising the summed IoU, pairs below min_iou
    dropped. (pairs (row, col), rows left, cols left), in the given orders."""
    if not rows or not cols:
        return [], rows, cols
    sub = iou[np.ix_(rows, cols)]
    r, c = linear_sum_assignment(1.0 - sub)
    pairs = [(rows[i], cols[j]) for i, j in zip(r, c) if sub[i, j] >= min_iou]
    used_r, used_c = {p[0] for p in pairs}, {p[1] for p in pairs}
    return pairs, [i for i in rows if i not in used_r], [j for j in cols if j not in used_c]


class Tracker:
    """One sequence's tracks (module docstring). step() once per frame, in order."""

    def __init__(self, config: TrackerConfig = TrackerConfig(), state: Optional[dict] = None):
        self.config = config
        self.steps, self.next_id, self.tracks = 0, 1, []
        if state is not None:
            self.steps, self.next_id = state["step"], state["next_id"]
            self.tracks = [Track.from_json(t) for t in state["tracks"]]

    def state(self) -> dict:
        """JSON-able; Tracker(config, state) continues exactly from here."""
        return {"step": self.steps, "next_id": self.next_id, "tracks": [t.to_json() for t in self.tracks]}

    def duplicates(self, dets: list[Detection]) -> tuple[list[int], dict[int, int], list[int]]:
        """(the detections at or above low that are kept, by descending score; duplicate -> kept;
        the duplicates that step 3's first assignment also takes: merged only as covered (IoU <
        dup_iou, no span), or by IoU into a mask >= dup_match times larger, in order. Duplicates:
        a mask over two detected objects (spans()), merged into the part it overlaps most; the same
        mask (IoU >= dup_iou with a kept one; >= same_class_iou when of its class) or mostly covered by the kept ones together (>= dup_cover
        of its pixels), merged into the kept one it overlaps most).
        A detection whose grid mask is empty (smaller than a cell) is left out: nothing to follow."""
        cfg = self.config
        order = sorted((i for i, d in enumerate(dets) if d.score >= self.config.low and d.mask.any()),
                       key=lambda i: (-dets[i].score, i))
        # one intersection matrix for the frame: spans() and the IoU below read it
        inter = intersections([dets[i].mask for i in order]) if order else np.zeros((0, 0))
        span = self.spans(dets, order, inter)
        rest = [a for a, i in enumerate(order) if i not in span]
        order = [order[a] for a in rest]
        inter = inter[np.ix_(rest, rest)]
        area = np.diag(inter)
        iou = iou_of(inter, area, area)
        kept: list[int] = []  # positions in order
        dup: dict[int, int] = {}
        covered = np.zeros_like(dets[order[0]].mask) if order else None
        parts: list[int] = []
        for a, i in enumerate(order):
            m = dets[i].mask
            b = max(kept, key=lambda b: iou[a, b], default=None)  # ties: the higher score
            cover = (m & covered).sum() / m.sum() if m.shape == covered.shape else 0.0
            same = b is not None and iou[a, b] >= (cfg.same_class_iou if dets[order[b]].cls == dets[i].cls
                                                   else cfg.dup_iou)
            if b is not None and (same or cover >= cfg.dup_cover):
                dup[i] = order[b] if iou[a, b] > 0 else order[kept[0]]
                if not same or 0 < cfg.dup_match * m.sum() <= dets[order[b]].mask.sum():
                    parts.append(i)
            else:
                kept.append(a)
                if m.shape == covered.shape:
                    covered |= m
        dup.update({i: dup.get(j, j) for i, j in span.items()})
        return [order[b] for b in kept], dup, parts

    def spans(self, dets: list[Detection], order: list[int], inter: np.ndarray) -> dict[int, int]:
        """The detections that are two detected objects under one mask: a mask that holds (each
        >= span_inside of its pixels inside it) two or more strong (>= high) detections of distinct
        objects (IoU < span_iou between them) covering together >= span_cover of it; -> the part it
        overlaps most. Taken by ascending size, so a part is never itself such a mask. inter: the
        masks' intersections (masks.intersections), in the order of order."""
        cfg = self.config
        if len(order) < 3:
            return {}
        flat = np.stack([dets[i].mask.ravel() for i in order]).astype(np.float32)
        area = np.diag(inter).copy()
        out: dict[int, int] = {}
        for a in sorted(range(len(order)), key=lambda a: (area[a], a)):
            parts: list[int] = []
            for b in range(len(order)):  # by descending score
                if (b != a and order[b] not in out and dets[order[b]].score >= cfg.high and area[b] < area[a]
                        and inter[a, b] >= cfg.span_inside * area[b]
                        and all(inter[b, p] < cfg.span_iou * (area[b] + area[p] - inter[b, p]) for p in parts)):
                    parts.append(b)
            if len(parts) >= 2 and (flat[a] * flat[parts].max(0)).sum() >= cfg.span_cover * area[a]:
                out[order[a]] = order[max(parts, key=lambda b: (inter[a, b], -b))]
        return out

    def step(self, dets: list[Detection]) -> list[Assignment]:
        """Advance one frame: each detection's Assignment, in the order given."""
        cfg = self.config
        self.steps += 1
        kept, dup, parts = self.duplicates(dets)
        shape = dets[kept[0]].mask.shape if kept else None
        masks = [d.mask for d in dets]
        pairs: list[tuple[int, int]] = []
        left_t = list(range(len(self.tracks)))
        if kept:
            pred = iou_matrix(masks, [t.predicted(self.steps, shape) for t in self.tracks])
            last = iou_matrix(masks, [t.mask if t.mask.shape == shape else np.zeros(shape, bool)
                                      for t in self.tracks])
            high = [i for i in kept if dets[i].score >= cfg.high]
            low = [i for i in kept if dets[i].score < cfg.high]
            covered = [i for i in parts if dets[i].score >= cfg.high] if cfg.covered_match else []
            p1, high, left_t = hungarian(pred, high + covered, left_t, cfg.match_iou)
            covers = {dup.pop(i) for i, _k in p1 if i in covered}  # a covered one matched is no duplicate
            high = [i for i in high if i not in covered]
            p2, _, left_t = hungarian(pred, low, left_t, cfg.match_iou)
            p3, high, left_t = hungarian(last, high, left_t, cfg.match_iou)
            p4, high = self.reid(dets, high, left_t)
            pairs = p1 + p2 + p3 + p4
            for i in [i for i in high if i not in covers]:  # new tracks, by descending score; a mask
                # covering a detection that step 3 matched is that object (and a neighbour): no new track
                self.tracks.append(Track(0, dets[i].mask, None, last=self.steps, hits=0, confirmed=False))
                pairs.append((i, len(self.tracks) - 1))
        return self._update(dets, pairs, dup)

    def reid(self, dets: list[Detection], high: list[int], left_t: list[int]) -> tuple[list, list[int]]:
        """Step 3's re-identification: the high detections left (each would start a track) against
        the confirmed tracks left, on the distance between the detection's centroid and the track's
        last observed one, in units of the square root of the track's last mask area, a pair kept at
        <= reid_dist when the areas are within a factor reid_area and the classes are the same (the
        detection's, the track's vote). (pairs (detection, track), the detections left)."""
        cfg = self.config
        ts = [k for k in left_t if self.tracks[k].confirmed and self.tracks[k].c is not None]
        if cfg.reid_dist <= 0 or not high or not ts:
            return [], high
        cost = np.full((len(high), len(ts)), np.inf)
        areas = [float(self.tracks[k].mask.sum()) for k in ts]
        for a, i in enumerate(high):
            m, c = dets[i].mask, centroid(dets[i].mask)
            m_area = float(m.sum())
            for b, (k, area) in enumerate(zip(ts, areas)):
                t = self.tracks[k]
                if t.mask.shape != m.shape or t.cls() != dets[i].cls or not within(area, m_area, cfg.reid_area):
                    continue
                d = float(np.hypot(c[0] - t.c[0], c[1] - t.c[1])) / np.sqrt(area)
                if d <= cfg.reid_dist:
                    cost[a, b] = d
        finite = np.where(np.isfinite(cost), cost, 1e9)
        pairs = [(high[a], ts[b]) for a, b in zip(*linear_sum_assignment(finite)) if np.isfinite(cost[a, b])]
        used = {i for i, _k in pairs}
        return pairs, [i for i in high if i not in used]

    def _update(self, dets: list[Detection], pairs: list[tuple[int, int]], dup: dict[int, int]) -> list[Assignment]:
        out: list[Assignment] = [Assignment(None)] * len(dets)
        of_det = {}
        for i, k in pairs:
            t = self.tracks[k]
            if not t.confirmed and (t.hits >= 1 or dets[i].score >= self.config.confirm):
                t.confirmed, t.id, self.next_id = True, self.next_id, self.next_id + 1  # ids in order
            t.observe(dets[i].mask, self.steps, self.config.smoothing, self.config.velocity_area)
            t.votes[dets[i].cls] = t.votes.get(dets[i].cls, 0.0) + dets[i].score
            of_det[i] = t
        for i, j in sorted(dup.items()):
            if j in of_det:
                t = of_det[j]
                t.votes[dets[i].cls] = t.votes.get(dets[i].cls, 0.0) + dets[i].score
        for i, t in of_det.items():
            out[i] = Assignment(t.id if t.confirmed else None, None, t.cls() if t.confirmed else None)
        for i, j in dup.items():
            if j in of_det:
                t = of_det[j]
                out[i] = Assignment(t.id if t.confirmed else None, j, t.cls() if t.confirmed else None)
        lost = {True: self.config.max_lost, False: 0}  # a tentative track not seen again ends
        self.tracks = sorted((t for t in self.tracks if self.steps - t.last <= lost[t.confirmed]),
                             key=lambda t: (not t.confirmed, t.id))
        return out
