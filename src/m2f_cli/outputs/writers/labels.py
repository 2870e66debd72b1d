"""``--format labels``: semantic label PNGs, the kind ADE20K, Cityscapes, detectron2 and mmsegmentation
tooling reads, for models of every task (docs/panoptic-semantic.md).

- ``<out>/<name>.labels.png``: an 8-bit palette PNG at the original image size whose every pixel is
  the model's class index (0-based: the column of class_queries_logits; for the Cityscapes models
  the trainId, for the ADE20K models detectron2's ``annotations_detectron2`` value, i.e. the ADE
  label - 1) and IGNORE (255) where no class is drawn: void of a panoptic map, background of an
  instance map (semantic maps have none). ``np.asarray(Image.open(path))`` gives the indices; the
  embedded palette (class i in its overlay colour, 255 black) only changes how viewers show it.
- ``<out>/labels.json``: ``{"ignore": 255, "classes": [{"index", "id", "name", "color"}]}``, the
  legend of the indices (also what ``m2f eval`` names the classes with).

Models with more than 255 classes are refused when the writer is built (255 is the ignore value).
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from m2f_cli.records import ImageRef, ImageResult
from m2f_cli.outputs.writers.base import Writer, register

IGNORE = 255


def class_index_map(result: ImageResult, categories) -> np.ndarray:
    """(H, W) uint8: the class index each pixel of result.label_map shows, IGNORE where none."""
    regions = result.regions()  # (map value, category id, label, score, bbox)
    size = max([int(result.label_map.max(initial=0))] + [r[0] for r in regions]) + 1
    lut = np.full(size, IGNORE, np.uint8)
    for value, cid, _, _, _ in regions:
        lut[value] = categories.by_id(cid).index
    if result.task == "semantic":  # every category id is a class, present in segments or not
        for c in categories.categories:
            if c.id < size:
                lut[c.id] = c.index
    return lut[result.label_map]


def palette(categories) -> list[int]:
    """The 768 palette values: entry i = class i's colour, unused entries and IGNORE black."""
    pal = np.zeros((256, 3), np.uint8)
    for c in categories.categories:
        pal[c.index] = c.color
    return pal.ravel().tolist()


def encode_labels_png(index_map: np.ndarray, pal: list[int]) -> bytes:
    im = Image.fromarray(np.ascontiguousarray(index_map.astype(np.uint8)), mode="P")
    im.putpalette(pal)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def legend(categories) -> dict:
    """The labels.json document."""
    return {"ignore": IGNORE, "classes": [{"index": c.index, "id": c.id, "name": c.name, "color": list(c.color)}
                                          for c in categories.categories]}


@register
class LabelsWriter(Writer):
    name = "labels"

    def __init__(self, ctx):
        super().__init__(ctx)
        n = len(ctx.categories)
        if n > IGNORE:
            raise ValueError(f"--format labels: the model has {n} classes; 8-bit label PNGs hold at most "
                             f"{IGNORE} (255 is the ignore value)")
        self.palette = palette(ctx.categories)

    def _path(self, ref: ImageRef) -> str:
        return self.ctx.folder.path(ref.rel, ".labels.png")

    def done(self, ref: ImageRef) -> bool:
        return self.ctx.folder.complete(self._path(ref))

    def write(self, result: ImageResult) -> None:
        index_map = class_index_map(result, self.ctx.categories)
        self.ctx.folder.write_bytes(self._path(result.ref), encode_labels_png(index_map, self.palette))

    def close(self) -> None:
        folder = self.ctx.folder
        doc = json.dumps(legend(self.ctx.categories), ensure_ascii=False).encode()
        folder.write_bytes(folder.join("labels.json"), doc + b"\n")
