"""Polygons back to masks for the round-trip tests, with scikit-image's polygon fill (not m2f's code).

fill(rings, h, w): the pixels whose centre (c + 0.5, r + 0.5) lies inside an odd number of the rings
(even-odd rule), the rasterisation the pixel-corner convention of polygons.py is defined by. Rings
are (N, 2) arrays or lists of (x, y) pixel-corner coordinates; seamed rings (a hole joined by a
zero-width seam) fill with their hole, since skimage's point-in-polygon test counts crossings.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils
from skimage.draw import polygon as sk_polygon


def fill(rings, h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w), bool)
    for ring in rings:
        ring = np.asarray(ring, np.float64)
        rr, cc = sk_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, (h, w))  # skimage: centres at integers
        one = np.zeros((h, w), bool)
        one[rr, cc] = True
        out ^= one
    return out


def decode(rle: dict) -> np.ndarray:
    counts = rle["counts"]
    return mask_utils.decode({"size": rle["size"], "counts": counts.encode() if isinstance(counts, str)
                              else counts}).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
