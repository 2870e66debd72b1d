"""The COCO panoptic format, read and written in one place (the writer, ``m2f eval`` and the tests).

A panoptic result is one RGB PNG per image plus one JSON file. Each pixel's segment id is encoded
in its colour as ``id = R + 256 * G + 256**2 * B``; id 0 is void (no segment). The JSON's
``annotations`` list one entry per image, ``{"image_id", "file_name" (the PNG, relative to the PNG
folder), "segments_info": [{"id", "category_id", "area", "bbox" [x, y, w, h], "iscrowd"}]}``, and
its ``categories`` carry ``isthing`` (1 = countable thing, 0 = stuff). This is what panopticapi's
pq_compute and detectron2's COCOPanopticEvaluator read: by default the PNG folder of ``X.json`` is
``X/`` (panopticapi's rule).
"""

from __future__ import annotations

import io
import os
from typing import Optional

import numpy as np

VOID = 0


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) integer segment ids (< 2**24) -> (H, W, 3) uint8 RGB with id = R + 256 G + 256^2 B."""
    a = ids.astype(np.uint32, copy=False)
    if a.size and int(a.max()) >= 1 << 24:
        raise ValueError(f"segment id {int(a.max())} does not fit 24-bit RGB")
    return np.stack([a & 255, (a >> 8) & 255, (a >> 16) & 255], axis=-1).astype(np.uint8)


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) uint32 segment ids (the inverse of ids_to_rgb)."""
    a = rgb.astype(np.uint32)
    return a[..., 0] + 256 * a[..., 1] + 65536 * a[..., 2]


def encode_png(ids: np.ndarray) -> bytes:
    """(H, W) segment ids -> the bytes of a COCO panoptic RGB PNG."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(ids_to_rgb(ids), mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def read_png(path: str) -> np.ndarray:
    """The (H, W) uint32 segment ids of a COCO panoptic PNG. Raises ValueError when the file is
    missing, unreadable or not an RGB(A) image."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA"):
                raise ValueError(f"{path}: a COCO panoptic PNG is RGB (segment id = R + 256 G + 256^2 B), "
                                 f"this one is {im.mode}")
            rgb = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read the panoptic PNG ({e.strerror or e})") from None
    return rgb_to_ids(rgb)


def segment_stats(ids: np.ndarray) -> dict[int, tuple[int, list[int]]]:
    """segment id -> (pixel count, tight bbox [x, y, w, h]) for every non-void id of an (H, W) map."""
    out: dict[int, tuple[int, list[int]]] = {}
    values, counts = np.unique(ids, return_counts=True)
    for v, n in zip(values.tolist(), counts.tolist()):
        if v == VOID:
            continue
        ys, xs = np.nonzero(ids == v)
        out[v] = (int(n), [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                           int(ys.max() - ys.min() + 1)])
    return out


def png_folder(json_path: str, folder: Optional[str] = None) -> str:
    """The PNG folder of a panoptic JSON: folder when given, else panopticapi's default (the JSON's
    path without .json), else ``panoptic/`` beside it (a sharded m2f run's part file)."""
    if folder:
        return folder
    default = json_path.removesuffix(".json")
    if os.path.isdir(default):
        return default
    beside = os.path.join(os.path.dirname(os.path.abspath(json_path)), "panoptic")
    return beside if os.path.isdir(beside) else default


def is_panoptic_doc(doc) -> bool:
    """Whether a loaded JSON document is a COCO panoptic file (annotations with segments_info)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        return False
    anns = doc["annotations"]
    return bool(anns) and isinstance(anns[0], dict) and "segments_info" in anns[0]
