"""``--format cvat`` with ``--track``, for each video: ``<out>/cvat/<video name>.xml`` in CVAT for
video 1.1, the video's tracks as ``<track id label source="auto">`` elements holding one
``<polygon frame keyframe="1" outside="0" occluded="0" points z_order="0">`` per frame the object was
seen (frame: the frame's index in the video, as CVAT numbers a task made from it) and an
``outside="1"`` copy of the last shape on the first segmented frame it is missing from (CVAT would
otherwise interpolate across the gap). It fits CVAT's model where an object is one polygon: an
instance of several parts is its largest part there (every part stays in annotations.xml). The
track's label: its class on its last frame (the track's vote by then, tracking/tracker.py).

Built from the cvat writer's journal (its frame records carry "video", "frame" and each polygon's
"track") at the end of every run, like annotations.xml.
"""

from __future__ import annotations

from typing import Sequence
from xml.sax.saxutils import quoteattr

from typing import Callable


def video_tracks(records: list[dict]) -> dict[int, dict]:
    """track id -> {"label", "frames": {frame: points}} from one video's journal records (each
    track's first polygon on a frame: the largest part)."""
    tracks: dict[int, dict] = {}
    for rec in records:
        for p in rec["polygons"]:
            if p.get("track") is None:
                continue
            t = tracks.setdefault(p["track"], {"label": p["label"], "frames": {}})
            t["label"] = p["label"]
            t["frames"].setdefault(rec["frame"], p["points"])
    return tracks


def track_elements(tracks: dict[int, dict], frames: Sequence[int]) -> str:
    """The <track> elements; frames: the video's segmented frame indices, ascending."""
    lines = []
    for n, (tid, t) in enumerate(sorted(tracks.items())):
        lines.append(f'  <track id="{n}" label={quoteattr(t["label"])} source="auto">\n')
        seen, last = t["frames"], None
        for k in frames:
            if k in seen:
                last = seen[k]
                outside = 0
            elif last is not None:
                outside = 1
            else:
                continue
            lines.append(f'    <polygon frame="{k}" keyframe="1" outside="{outside}" occluded="0" '
                         f'points="{last}" z_order="0">\n'
                         f'      <attribute name="track_id">{tid}</attribute>\n    </polygon>\n')
            if outside:
                last = None
        lines.append("  </track>\n")
    return "".join(lines)


def write_videos(folder, header: Callable[[int], bytes], footer: bytes, records) -> None:
    """One CVAT for video XML per video among the journal's records that has tracks. header(size):
    the XML up to the annotations (cvat.header, with the track_id attribute), footer: its end."""
    by_video: dict[str, list[dict]] = {}
    for rec in records:
        if rec.get("video") is not None:
            by_video.setdefault(rec["video"], []).append(rec)
    for video, recs in sorted(by_video.items()):
        tracks = video_tracks(sorted(recs, key=lambda r: r["frame"]))
        if not tracks:
            continue
        frames = sorted({r["frame"] for r in recs})
        head = header(frames[-1] + 1)

        def write(f, head=head, body=track_elements(tracks, frames)):
            f.write(head)
            f.write(body.encode())
            f.write(footer)
        folder.write_atomic(folder.path("cvat/" + video, ".xml"), write)
