"""What ``m2f_cli.segment`` yields per image: ``Result``, one image's predictions with the views
every output format gives of them (docs/python-api.md).

A Result wraps the pipeline's own ImageResult (records.py) and draws each view with the writer that
makes the same file from the CLI, at the same per-format threshold: ``to_json()`` is the PNG sidecar,
``coco()`` the image's part of predictions.json and predictions_bbox.json, ``overlay()`` the
overlay, ``cutouts()`` the cut-outs and ``polygons()`` the objects of the polygon formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
from PIL import Image

from m2f_cli.model.categories import CategoryTable
from m2f_cli.records import ImageRef, ImageResult, Instance, Segment


@dataclass(frozen=True)
class Views:
    """How a run draws its results: thresholds per format (options.writer_thresholds: "png",
    "coco", "overlay", "cutout") and the drawing options, the CLI's defaults unless given."""

    thresholds: dict
    model: str
    revision: Optional[str]
    top_k: int
    overlay_alpha: float
    overlay_scores: bool
    simplify: float
    cutout_pad: int
    cutout_visible: bool


class Result:
    """One image's predictions.

    index: position in the input iterable (0-based); ref: its ImageRef (path: the path or URL as
        given, or "<image N>" for arrays and PIL images; name: the same, or "imageN").
    width, height: the image size (after EXIF orientation for files).
    task: "instance", "panoptic" or "semantic".
    label_map: (H, W) uint16; instance: 0 = background, k = the instance with id k (score >=
        threshold); panoptic: segment ids; semantic: category ids (uint8 when they fit).
    instances: the instances with score >= threshold, descending score, ids 1..N (the sidecar's).
    threshold: the sidecar's (and PNG map's) score threshold; coco() uses the COCO one.
    segments: panoptic/semantic regions of label_map.
    record: the pipeline's ImageResult (every candidate kept, down to the lowest format threshold).
    """

    def __init__(self, record: ImageResult, categories: CategoryTable, views: Views, source: Any = None):
        self.record, self.categories, self.views = record, categories, views
        self._source = source  # the array or PIL image given, or None (read again from ref.path)

    def __repr__(self) -> str:
        n = len(self.instances) if self.task == "instance" else len(self.segments)
        return f"<Result {self.index} {self.ref.name!r} {self.width}x{self.height} {self.task}: {n} objects>"

    @property
    def ref(self) -> ImageRef:
        return self.record.ref

    @property
    def index(self) -> int:
        return self.record.ref.index

    @property
    def width(self) -> int:
        return self.record.width

    @property
    def height(self) -> int:
        return self.record.height

    @property
    def task(self) -> str:
        return self.record.task

    @property
    def label_map(self) -> np.ndarray:
        return self.record.label_map

    @property
    def segments(self) -> list[Segment]:
        return self.record.segments

    @property
    def threshold(self) -> float:
        return self.views.thresholds["png"]

    @property
    def instances(self) -> list[Instance]:
        return self.record.instances_above(self.threshold)

    def mask(self, instance: Instance) -> np.ndarray:
        """(H, W) bool: an instance's whole mask (its RLE, overlaps included)."""
        from pycocotools import mask as mask_utils
        rle = instance.rle
        return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)

    def image(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB: the image as given (an array or PIL image), or read again from its
        path or URL with EXIF orientation applied."""
        if self._source is not None:
            from m2f_cli.segmenter import _as_rgb
            return _as_rgb(self._source)
        from m2f_cli.inputs.decode import decode
        return decode(self.ref.path, max_pixels=None).rgb

    def to_json(self) -> dict:
        """The PNG sidecar document (README: ``--format png``), instances with their RLE."""
        from m2f_cli.outputs.writers.png import sidecar
        v = self.views
        ctx = SimpleNamespace(model=v.model, revision=v.revision, top_k=v.top_k, categories=self.categories)
        return sidecar(self.record, SimpleNamespace(ctx=ctx, threshold=self.threshold))

    def coco(self, image_id: Optional[int] = None) -> dict:
        """This image in COCO form, as ``--format coco`` writes it (at the COCO threshold, 0 by default):
        {"image": {"id", "file_name", "width", "height"}, "segm": [predictions.json records
        {"image_id", "category_id", "segmentation", "score"}], "bbox": [predictions_bbox.json records
        {"image_id", "category_id", "bbox", "score"}]}. image_id: default index + 1, the CLI's ids."""
        iid = self.index + 1 if image_id is None else int(image_id)
        dets = self.record.instances_above(self.views.thresholds["coco"])
        return {"image": {"id": iid, "file_name": self.ref.name, "width": self.width, "height": self.height},
                "segm": [{"image_id": iid, "category_id": i.category_id, "segmentation": i.rle,
                          "score": round(i.score, 6)} for i in dets],
                "bbox": [{"image_id": iid, "category_id": i.category_id, "bbox": list(i.bbox),
                          "score": round(i.score, 6)} for i in dets]}

    def polygons(self, simplify: Optional[float] = None) -> list:
        """The objects as polygons (writers/vector.Shape, parts in pixel-corner coordinates), as the
        polygon formats write them; simplify: Douglas-Peucker tolerance in pixels (default the run's)."""
        from m2f_cli.outputs.writers.vector import _shapes
        tolerance = self.views.simplify if simplify is None else float(simplify)
        if not tolerance >= 0:
            raise ValueError(f"simplify {tolerance}: expected a tolerance >= 0 pixels")
        return _shapes(self.record, self.threshold, tolerance)

    def overlay(self, alpha: Optional[float] = None, scores: Optional[bool] = None) -> Image.Image:
        """The RGB overlay ``--format overlay`` draws (as a PIL image, not yet encoded)."""
        from m2f_cli.outputs.writers.overlay import render_overlay
        a = self.views.overlay_alpha if alpha is None else float(alpha)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha {a}: expected a value in [0, 1]")
        s = self.views.overlay_scores if scores is None else bool(scores)
        return render_overlay(self.image(), self.record, self.categories, a, s)

    def cutouts(self, pad: Optional[int] = None, visible: Optional[bool] = None) -> list:
        """The cut-outs ``--format cutout`` writes (writers/cutout.Cutout: rgba (h, w, 4) uint8, box)."""
        from m2f_cli.outputs.writers.cutout import cut_out, pad_option
        p = pad_option(self.views.cutout_pad if pad is None else pad)
        vis = self.views.cutout_visible if visible is None else bool(visible)
        return cut_out(self.image(), self.record, self.views.thresholds["cutout"], p, vis)
