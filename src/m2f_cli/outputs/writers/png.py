"""``--format png``: a 16-bit instance map and a JSON sidecar per image."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from m2f_cli.records import ImageRef, ImageResult
from m2f_cli.outputs.writers.base import Writer, register

PNG_COMPRESS_LEVEL = 1  # ~30% faster than Pillow's default for 16-bit maps, files about as small


def encode_label_png(label_map: np.ndarray) -> bytes:
    """(H, W) uint16 -> 16-bit grayscale PNG bytes; uint8 -> 8-bit."""
    buf = io.BytesIO()
    arr = label_map if label_map.dtype == np.uint8 else label_map.astype(np.uint16, copy=False)
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def sidecar(result: ImageResult, writer: Writer) -> dict:
    """The sidecar JSON document (schema in the README)."""
    ctx = writer.ctx
    doc = {
        "image": result.ref.path,
        "name": result.ref.name,
        "width": result.width,
        "height": result.height,
        "model": ctx.model,
        "revision": ctx.revision,
        "task": result.task,
        **result.ref.video_fields(),  # a video frame: "video", "frame", "time"
    }
    if result.task == "instance":
        doc.update(threshold=writer.threshold, top_k=ctx.top_k,
                   instances=[i.to_json() for i in result.instances_above(writer.threshold)])
    else:
        doc["segments_info"] = [s.to_json() for s in result.segments]
    if result.task == "semantic":
        doc["legend"] = [{"id": c.id, "label": c.name} for c in ctx.categories.categories]
    return doc


@register
class PngWriter(Writer):
    name = "png"

    def _paths(self, ref: ImageRef) -> tuple[str, str]:
        f = self.ctx.folder
        return f.path(ref.rel, ".png"), f.path(ref.rel, ".json")

    def done(self, ref: ImageRef) -> bool:
        # whole files only: an empty or cut-off PNG or sidecar (a power cut, a full disk) is redone
        return all(self.ctx.folder.complete(p) for p in self._paths(ref))

    def write(self, result: ImageResult) -> None:
        png_path, json_path = self._paths(result.ref)
        folder = self.ctx.folder
        folder.write_bytes(png_path, encode_label_png(result.label_map))
        folder.write_bytes(json_path, json.dumps(sidecar(result, self), ensure_ascii=False).encode())
