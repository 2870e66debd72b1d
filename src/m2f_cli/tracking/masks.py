"""Masks as the tracker compares them: every instance mask is sampled on a coarse grid (every s-th
pixel, s chosen so that the longer side has at most ``grid`` cells), which makes the IoU matrix of
one frame a single small matrix product and the tracker's state a few dozen bytes per track (RLE).

Grid masks are (h, w) bool arrays; coordinates are grid cells (x right, y down).
"""

from __future__ import annotations

import math

import numpy as np
from pycocotools import mask as mask_utils


def stride_for(width: int, height: int, grid: int) -> int:
    """The sampling step so that max(width, height) / step <= grid (at least 1)."""
    return max(1, math.ceil(max(width, height) / grid))


def grid_mask(rle: dict, stride: int) -> np.ndarray:
    """A COCO RLE {"size": [H, W], "counts"} -> (ceil(H/stride), ceil(W/stride)) bool, every
    stride-th pixel starting at (0, 0)."""
    full = mask_utils.decode(rle)
    return np.ascontiguousarray(full[::stride, ::stride].astype(bool))


def centroid(m: np.ndarray) -> tuple[float, float]:
    """(x, y) mean cell of a grid mask; (nan, nan) when it is empty."""
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return math.nan, math.nan
    return float(xs.mean()), float(ys.mean())


def shifted(m: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """m moved by (dx, dy) cells, rounded to whole cells; what leaves the grid is lost, zeros come in."""
    ix, iy = int(round(dx)), int(round(dy))
    if ix == 0 and iy == 0:
        return m
    h, w = m.shape
    out = np.zeros_like(m)
    if abs(ix) >= w or abs(iy) >= h:
        return out
    out[max(iy, 0):h + min(iy, 0), max(ix, 0):w + min(ix, 0)] = m[max(-iy, 0):h - max(iy, 0),
                                                                  max(-ix, 0):w - max(ix, 0)]
    return out


def iou_matrix(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """(len(a), len(b)) float64 IoU of grid masks of one shape (0 where both are empty)."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    fa = np.stack([m.ravel() for m in a]).astype(np.float32)
    fb = np.stack([m.ravel() for m in b]).astype(np.float32)
    inter = (fa @ fb.T).astype(np.float64)
    return iou_of(inter, fa.sum(1), fb.sum(1))


def intersections(masks: list[np.ndarray]) -> np.ndarray:
    """(n, n) float64 pixel counts of each pair's intersection (the diagonal: the areas) of grid
    masks of one shape."""
    flat = np.stack([m.ravel() for m in masks]).astype(np.float32)
    return (flat @ flat.T).astype(np.float64)


def iou_of(inter: np.ndarray, area_a: np.ndarray, area_b: np.ndarray) -> np.ndarray:
    """IoU from intersections (len(a), len(b)) and the masks' areas (0 where both are empty)."""
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def pack(m: np.ndarray) -> dict:
    """A grid mask as JSON: COCO RLE {"size": [h, w], "counts": str} (a few dozen bytes for a blob)."""
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def unpack(d: dict) -> np.ndarray:
    """pack's inverse."""
    return np.ascontiguousarray(mask_utils.decode({"size": d["size"], "counts": d["counts"].encode("ascii")})
                                .astype(bool))
