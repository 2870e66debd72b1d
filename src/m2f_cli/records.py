"""Typed records passed between the stages: walk -> decode -> batch -> model -> postprocess -> writers.

Writers only ever see these records, never Hugging Face outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


@dataclass(frozen=True)
class FrameInfo:
    """Where a video frame comes from (inputs/video.py).

    index: zero-based position of the frame in the stream's decoded order (the name's digits).
    time: seconds from the stream's start, from the frame's own timestamp (None when it has none).
    pts: that timestamp in the stream's time base (None when it has none): where a resumed run seeks.
    video_rel: the video's output name; the frame's is ``<video_rel>/<index, 6+ digits>``.
    """

    index: int
    time: Optional[float]
    pts: Optional[int]
    video_rel: str


@dataclass(frozen=True)
class ImageRef:
    """One input image and its identity, carried through every stage.

    path: where to read it (a local path as given or resolved).
    name: the source name: the relative path with its extension (see walk.py), used to match
          COCO annotation file names and recorded in images.json.
    rel: the output name: a relative POSIX path *without* extension, unique within a run; every
         output file of this image is ``<out>/<rel><suffix>``.
    index: position in the run's input order (0-based); results are emitted in this order.
    frame: for a frame of a video, which one (path, name and rel are then the video's path, and
        ``<video name>/<k>``, ``<video rel>/<k>`` with k the index in 6 or more digits).
    """

    path: str
    name: str
    rel: str
    index: int
    frame: Optional[FrameInfo] = None  # a frame of the video at path (inputs/video.py); None for an image

    def video_fields(self) -> dict:
        """{"video", "frame", "time"} for a video frame (sidecars, JSON Lines, images.json); {} otherwise."""
        if self.frame is None:
            return {}
        t = self.frame.time
        return {"video": self.path, "frame": self.frame.index, "time": None if t is None else round(t, 6)}


@dataclass(frozen=True)
class Failure:
    """An input that could not be processed. stage is one of walk, decode, model, postprocess, write."""

    ref: ImageRef
    stage: str
    error: str

    def line(self) -> str:
        return f"{self.ref.path}: {self.stage}: {self.error}"


@dataclass(frozen=True)
class Instance:
    """One predicted instance, at the original image resolution.

    id: 1-based rank by descending score among the instances of its image (the PNG pixel value
        when it is drawn in the instance map).
    label: class name; category_id: output category id (COCO id for COCO labels); label_index:
        the model's class index.
    score: class probability x mean mask probability inside the mask, in [0, 1].
    bbox: [x, y, width, height] in pixels, tight around the mask (COCO box format; zeros if empty).
    area: mask pixel count.
    rle: the full mask as COCO compressed RLE {"size": [H, W], "counts": str}.
    track_id: (--track, tracking/) the object's track in its video or image sequence, 1, 2, ...;
        None without --track or when the instance has no track.
    merged: (--track) the (label, score) of this object's other instances in the frame (the same
        object under another class), merged into this one. detected_label: (--track) this
        instance's own class when the track's class (label) differs from it.
    """

    id: int
    label: str
    category_id: int
    label_index: int
    score: float
    bbox: tuple[int, int, int, int]
    area: int
    rle: dict
    track_id: Optional[int] = None
    merged: tuple = ()
    detected_label: Optional[str] = None

    def to_json(self, with_rle: bool = True) -> dict:
        d: dict[str, Any] = {
            "id": self.id, "label": self.label, "category_id": self.category_id,
            "score": round(self.score, 6), "bbox": list(self.bbox), "area": self.area,
        }
        d.update(self.track_fields())
        if with_rle:
            d["segmentation"] = self.rle
        return d

    def track_fields(self) -> dict:
        """{"track_id"[, "merged", "detected_label"]} of a tracked instance; {} otherwise."""
        if self.track_id is None:
            return {}
        d: dict[str, Any] = {"track_id": self.track_id}
        if self.merged:
            d["merged"] = [{"label": label, "score": round(score, 6)} for label, score in self.merged]
        if self.detected_label is not None:
            d["detected_label"] = self.detected_label
        return d


@dataclass(frozen=True)
class Segment:
    """One region of a panoptic or semantic result (COCO panoptic segments_info style).

    id: the value of the region's pixels in the label map (panoptic: segment id 1..N;
        semantic: the category id). isthing: a countable object (True) or stuff.
    score: the query's class probability (panoptic); None for semantic regions.
    """

    id: int
    label: str
    category_id: int
    label_index: int
    isthing: bool
    score: Optional[float]
    area: int
    bbox: tuple[int, int, int, int]

    def to_json(self) -> dict:
        d = {"id": self.id, "label": self.label, "category_id": self.category_id, "isthing": self.isthing,
             "area": self.area, "bbox": list(self.bbox)}
        if self.score is not None:
            d["score"] = round(self.score, 6)
        return d


@dataclass
class ImageResult:
    """Everything the writers need for one image.

    width, height: original image size (after EXIF orientation).
    task: "instance", "panoptic" or "semantic".
    instances: (instance task) all kept instances, descending score, ids 1..N.
    label_map: (H, W) uint16 (semantic: uint8 when ids fit). instance: 0 = background,
        k = instances[k-1], each pixel owned by the highest-scoring instance covering it, only
        instances with score >= map_threshold drawn; panoptic: segment ids, 0 = void;
        semantic: category ids.
    segments: (panoptic, semantic) the regions of label_map.
    map_threshold: the score threshold the map (and the sidecar) were drawn with.
    image: the decoded RGB image (H, W, 3) uint8 when a writer asked for it (overlays), else None.
    tiles: how many tiles the image was cut into (--tile, tiling.py); 0 when it was not.
    track_state: (--track, a video frame) the tracker's state after this frame, JSON-able: the
        frames journal keeps it so that a resumed run continues the tracks (tracking/stage.py).
    """

    ref: ImageRef
    width: int
    height: int
    instances: list[Instance]
    label_map: np.ndarray
    map_threshold: float
    image: Optional[np.ndarray] = None
    task: str = "instance"
    segments: list[Segment] = field(default_factory=list)
    tiles: int = 0
    track_state: Optional[dict] = None

    def instances_above(self, threshold: float) -> list[Instance]:
        return [i for i in self.instances if i.score >= threshold]

    def regions(self) -> list[tuple[int, int, str, Optional[float], tuple[int, int, int, int]]]:
        """What the label map shows: (map value, category id, label, score or None, bbox)."""
        if self.task == "instance":
            return [(i.id, i.category_id, i.label, i.score, i.bbox)
                    for i in self.instances if i.score >= self.map_threshold and i.area > 0]
        return [(s.id, s.category_id, s.label, s.score, s.bbox) for s in self.segments]
