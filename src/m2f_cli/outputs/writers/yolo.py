"""``--format yolo``: Ultralytics YOLO segmentation labels.

- ``<out>/labels/<name>.txt``: one line per instance, ``class x1 y1 x2 y2 ...``: the model's class
  index, then the polygon's vertices divided by the image width and height (pixel-corner
  coordinates, so in [0, 1]), 6 decimals. An image without instances gets an empty file (a
  background image for Ultralytics).
- ``<out>/data.yaml``: the class names (index -> name), ``train``/``val`` = ``images``; no ``path``,
  so Ultralytics takes the folder of data.yaml as the dataset root. Put or link the images at
  ``<out>/images/`` (same relative names) and ``yolo train data=<out>/data.yaml`` finds each
  image's label by replacing ``images`` with ``labels`` in its path.

The format has one polygon per instance and no holes: every part and hole is joined into one ring
with zero-width seams (polygons.joined), the way Ultralytics' own COCO converter joins multi-part
masks. Nothing is dropped; what is lost is measured in the tests and stated in the README.
"""

from __future__ import annotations

from m2f_cli.outputs.polygons import joined
from m2f_cli.records import ImageResult
from m2f_cli.outputs.writers.base import register
from m2f_cli.outputs.writers.vector import PerImagePolygonWriter


def _yaml_str(s: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    import json
    return json.dumps(s, ensure_ascii=False)


@register
class YoloWriter(PerImagePolygonWriter):
    name = "yolo"
    prefix, suffix = "labels/", ".txt"

    def lines(self, result: ImageResult) -> list[str]:
        w, h = result.width, result.height
        out = []
        for s in self.shapes(result):
            ring = joined(s.parts)
            coords = " ".join(f"{x / w:.6f} {y / h:.6f}" for x, y in ring)
            out.append(f"{s.index} {coords}")
        return out

    def write(self, result: ImageResult) -> None:
        text = "".join(line + "\n" for line in self.lines(result))
        self.ctx.folder.write_bytes(self._path(result.ref), text.encode())

    def close(self) -> None:
        # The same file from every run and shard of this model: not a part file.
        cats = self.ctx.categories.categories
        text = (f"# m2f -f yolo, model {self.ctx.model}: put or link the images at images/ beside labels/\n"
                "train: images\nval: images\n"
                f"nc: {len(cats)}\nnames:\n" + "".join(f"  {c.index}: {_yaml_str(c.name)}\n" for c in cats))
        self.ctx.folder.write_bytes(self.ctx.folder.join("data.yaml"), text.encode())
