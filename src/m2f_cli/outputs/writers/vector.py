"""What the polygon formats (yolo, labelme, cvat, geojson) share: the objects of one image as
polygons (polygons.py), the ``--simplify`` option, and the writers' common part (PolygonWriter,
PerImagePolygonWriter)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

from m2f_cli.outputs.polygons import Part, region_parts, rle_parts
from m2f_cli.outputs.writers.base import Writer
from m2f_cli.records import ImageRef, ImageResult


@dataclass(frozen=True)
class Shape:
    """One object of an image as polygons.

    id: the instance id (the PNG pixel value) or the segment id (panoptic; semantic: category id).
    label, category_id: its class; index: the model's class index (YOLO's class number).
    score: None for semantic regions. parts: polygons.Part list, largest first, pixel-corner
    coordinates of the original image; empty when the mask has no pixel.
    """

    id: int
    label: str
    category_id: int
    index: int
    score: Optional[float]
    parts: list[Part]
    track_id: Optional[int] = None  # --track: the instance's track (records.Instance.track_id)


def simplify_option(ctx) -> float:
    """--simplify PX from the writer context; raises ValueError for a negative value."""
    value = float(ctx.options.get("simplify") or 0.0)
    if not value >= 0:
        raise ValueError(f"--simplify {value}: expected a tolerance >= 0 pixels")
    return value


# The last image's shapes: the writers of a run take each result in turn in one thread, so two or
# more polygon formats trace an image's masks once (decoding a 12 MP RLE alone takes ~20 ms).
_last: Optional[tuple] = None


def shapes(result: ImageResult, threshold: float, simplify: float) -> list[Shape]:
    """_shapes, remembered for the last (result, threshold, simplify)."""
    global _last
    key = (id(result), result.ref, threshold, simplify)
    if _last is not None and _last[0] == key and _last[1]() is result:
        return _last[2]
    out = _shapes(result, threshold, simplify)
    _last = (key, weakref.ref(result), out)
    return out


def _shapes(result: ImageResult, threshold: float, simplify: float) -> list[Shape]:
    """The objects of one image with score >= threshold, as polygons.

    Instances are traced from their full masks (the RLE, overlaps included, as in predictions.json);
    panoptic segments and semantic regions (all of them, as in the PNG sidecar) from the label map.
    Objects without parts are dropped.
    """
    out = []
    if result.task == "instance":
        for i in result.instances_above(threshold):
            parts = rle_parts(i.rle, i.bbox, simplify)
            if parts:
                out.append(Shape(i.id, i.label, i.category_id, i.label_index, i.score, parts, i.track_id))
    else:
        for s in result.segments:  # all of them, as in the PNG sidecar
            parts = region_parts(result.label_map, s.id, s.bbox, simplify)
            if parts:
                out.append(Shape(s.id, s.label, s.category_id, s.label_index, s.score, parts))
    return out


def number(v: float) -> "int | float":
    """A coordinate for JSON/XML: integers (exact polygons) without a trailing .0, else 3 decimals."""
    r = round(float(v), 3)
    return int(r) if r == int(r) else r


class PolygonWriter(Writer):
    """A polygon format: --simplify validated and kept in the settings record, and each image's
    objects as polygons (shapes(): traced once per image however many formats want them)."""

    recorded = ("simplify",)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.simplify = simplify_option(ctx)

    def shapes(self, result: ImageResult) -> list[Shape]:
        return shapes(result, self.threshold, self.simplify)


class PerImagePolygonWriter(PolygonWriter):
    """A polygon format with one file per image, <out>/<prefix><name><suffix>: done when it exists."""

    prefix = ""
    suffix = ""

    def _path(self, ref: ImageRef) -> str:
        return self.ctx.folder.path(self.prefix + ref.rel, self.suffix)

    def done(self, ref: ImageRef) -> bool:
        return self.ctx.folder.exists(self._path(ref))
