"""``--format cutout``: each object as its own RGBA PNG, cropped to its box.

Layout: ``<out>/cutouts/<name>/<id>_<label>.png`` plus ``<out>/cutouts/<name>/index.json``.

- ``<name>`` is the image's output name (walk.py's naming rule), so folders sort by image;
  ``<id>`` is the instance id (1-based rank by descending score, the PNG map's pixel value and the
  sidecar's id), zero-padded to at least 3 digits (to the width of the image's largest id), so the
  files of an image sort by score; ``<label>`` is the class name with every run of characters
  other than letters, digits, ``_`` and ``-`` replaced by ``-`` ("sports ball" -> ``sports-ball``).
  Panoptic segments are named by segment id, semantic regions by category id.
- The crop is the object's box grown by ``--cutout-pad`` pixels on every side, clipped to the image;
  its pixels are the input's own colours (EXIF orientation applied), alpha 255 inside the mask and
  0 outside, and RGB 0 where alpha is 0 (no background leaks into a cut-out).
- The mask is the instance's whole mask (its RLE, overlaps with higher-scoring instances
  included), or with ``--cutout-visible`` only the pixels it owns in the PNG map (its box then
  shrinks to them; an instance hidden entirely under higher-scoring ones gets no file).
- ``index.json`` = ``{"image", "name", "width", "height", "task", "threshold", "pad", "visible",
  "cutouts": [{"file", "id", "label", "category_id", "score", "box": [x, y, w, h]}]}``, box being
  where the crop lies in the image, in pixels. It is written after the image's PNGs, so an image
  is done (resume) when its index is whole; a rerun that keeps fewer objects (``--overwrite`` with
  other settings) removes the files its old index named and the new one does not.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from functools import partial
from typing import Optional

import numpy as np
from PIL import Image

from m2f_cli.inputs.decode import decode
from m2f_cli.errors import OutputError
from m2f_cli.records import ImageRef, ImageResult
from m2f_cli.outputs.writers.base import Writer, register
from m2f_cli.outputs.writers.png import PNG_COMPRESS_LEVEL

CUTOUT_DIR = "cutouts"
INDEX = "index"  # index.json; never a cut-out's name, which starts with its id


@dataclass(frozen=True)
class Cutout:
    """One object cut out of its image.

    id, label, category_id: as in the sidecar (panoptic: segment id; semantic: category id).
    score: None for semantic regions.
    box: (x, y, w, h) of the crop in the original image, pixels, w, h >= 1.
    rgba: (h, w, 4) uint8; alpha 255 inside the mask, 0 outside, where RGB is 0 too.
    file: the file name the cutout writer gives it, ``<id>_<label>.png``.
    """

    id: int
    label: str
    category_id: int
    score: Optional[float]
    box: tuple[int, int, int, int]
    rgba: np.ndarray
    file: str

    def image(self) -> Image.Image:
        """The cut-out as an RGBA PIL image."""
        return Image.fromarray(self.rgba, "RGBA")

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.image().save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return buf.getvalue()

    def to_json(self) -> dict:
        return {"file": self.file, "id": self.id, "label": self.label, "category_id": self.category_id,
                "score": None if self.score is None else round(self.score, 6), "box": list(self.box)}


def safe_label(label: str) -> str:
    """A class name as a file-name part: runs of other characters than letters, digits, _ and -
    become one -; "object" when nothing is left."""
    return re.sub(r"[^\w-]+", "-", label).strip("-") or "object"


def pad_option(value) -> int:
    """--cutout-pad PX: a whole number of pixels >= 0; ValueError otherwise."""
    try:
        pad = int(value or 0)
    except (TypeError, ValueError):
        raise ValueError(f"--cutout-pad {value!r}: expected a whole number of pixels >= 0") from None
    if pad < 0 or pad != float(value or 0):
        raise ValueError(f"--cutout-pad {value!r}: expected a whole number of pixels >= 0")
    return pad


def _map_crop(imap: np.ndarray, value: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    return imap[y:y + h, x:x + w] == value


def _rle_crop(rle: dict, x: int, y: int, w: int, h: int) -> np.ndarray:
    from pycocotools import mask as mask_utils
    counts = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
    return mask_utils.decode({"size": rle["size"], "counts": counts})[y:y + h, x:x + w].astype(bool)


def _objects(result: ImageResult, threshold: float, visible: bool):
    """(id, label, category id, score, bbox [x, y, w, h], crop(x, y, w, h) -> (h, w) bool mask)."""
    imap = result.label_map
    if result.task != "instance":  # panoptic segments, semantic regions: the map is their mask
        for s in result.segments:
            yield s.id, s.label, s.category_id, s.score, s.bbox, partial(_map_crop, imap, s.id)
        return
    for i in result.instances_above(threshold):
        crop = partial(_map_crop, imap, i.id) if visible else partial(_rle_crop, i.rle)
        yield i.id, i.label, i.category_id, i.score, i.bbox, crop


def _tight(mask: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    """(x, y, w, h) of the True pixels of a (h, w) bool array, None when there are none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def cut_out(rgb: np.ndarray, result: ImageResult, threshold: float, pad: int = 0,
            visible: bool = False) -> list[Cutout]:
    """The cut-outs of one image, in id order (descending score for instances).

    rgb: (H, W, 3) uint8, the upright image of result (its width x height). threshold: minimum
    instance score (segments: all of them, as in the sidecar). Objects without a pixel are left out.
    """
    height, width = result.label_map.shape
    if rgb.shape[:2] != (height, width):
        raise ValueError(f"image {rgb.shape[1]}x{rgb.shape[0]} is not the result's {width}x{height}")
    objects = list(_objects(result, threshold, visible))
    digits = max(3, len(str(max((o[0] for o in objects), default=0))))
    out = []
    for oid, label, cid, score, bbox, crop in objects:
        bx, by, bw, bh = (int(v) for v in bbox)
        mask = crop(bx, by, bw, bh) if bw > 0 and bh > 0 else np.zeros((0, 0), bool)
        tight = _tight(mask)  # the visible part can be smaller than the box
        if tight is None:
            continue
        tx, ty, tw, th = tight
        mask = mask[ty:ty + th, tx:tx + tw]
        mx, my = bx + tx, by + ty
        x0, y0 = max(0, mx - pad), max(0, my - pad)
        x1, y1 = min(width, mx + tw + pad), min(height, my + th + pad)
        inside = np.zeros((y1 - y0, x1 - x0), bool)
        inside[my - y0:my - y0 + th, mx - x0:mx - x0 + tw] = mask
        rgba = np.zeros((y1 - y0, x1 - x0, 4), np.uint8)
        rgba[..., :3] = rgb[y0:y1, x0:x1]
        rgba[~inside] = 0
        rgba[..., 3] = inside * np.uint8(255)
        out.append(Cutout(oid, label, cid, score, (x0, y0, x1 - x0, y1 - y0), rgba,
                          f"{oid:0{digits}d}_{safe_label(label)}.png"))
    return out


def _remove(folder, path: str) -> None:
    """Delete one output file of ours (local or remote); a missing one is fine."""
    try:
        fs = getattr(folder, "fs", None)
        if fs is None:
            os.remove(path)
            return
        folder.ensure_held()
        fs.rm_file(path.partition("://")[2])
    except FileNotFoundError:
        pass
    except OSError as e:
        raise OutputError(e.errno, f"{path}: cannot remove ({e.strerror or e})") from None


@register
class CutoutWriter(Writer):
    name = "cutout"
    recorded = ("cutout_pad", "cutout_visible")

    def __init__(self, ctx):
        super().__init__(ctx)
        self.pad = pad_option(ctx.options.get("cutout_pad", 0))
        self.visible = bool(ctx.options.get("cutout_visible", False))

    def _path(self, ref: ImageRef, stem: str, suffix: str) -> str:
        return self.ctx.folder.path(f"{CUTOUT_DIR}/{ref.rel}/{stem}", suffix)

    def done(self, ref: ImageRef) -> bool:
        return self.ctx.folder.complete(self._path(ref, INDEX, ".json"))  # written last: whole files only

    def _old_files(self, index: str) -> set[str]:
        folder = self.ctx.folder
        try:
            if folder.exists(index):
                return {str(c["file"]) for c in json.loads(folder.read_bytes(index)).get("cutouts", [])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # an unreadable index names nothing to remove
        return set()

    def write(self, result: ImageResult) -> None:
        ref, folder = result.ref, self.ctx.folder
        rgb = result.image if result.image is not None else decode(ref.path, max_pixels=None).rgb
        cuts = cut_out(rgb, result, self.threshold, self.pad, self.visible)
        for c in cuts:
            folder.write_bytes(self._path(ref, c.file[:-4], ".png"), c.png())
        index = self._path(ref, INDEX, ".json")
        for stale in sorted(self._old_files(index) - {c.file for c in cuts}):
            if re.fullmatch(r"\d+_[^/\\]*\.png", stale):  # only names this writer gives
                _remove(folder, self._path(ref, stale[:-4], ".png"))
        doc = {"image": ref.path, "name": ref.name, "width": result.width, "height": result.height,
               "task": result.task, "threshold": self.threshold, "pad": self.pad, "visible": self.visible,
               "cutouts": [c.to_json() for c in cuts]}
        folder.write_bytes(index, json.dumps(doc, ensure_ascii=False).encode())
