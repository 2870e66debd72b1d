"""The mask encodings the post-processing writes into its records, shared by the instance,
panoptic and semantic paths (and tiling/): COCO RLE ({"size": [H, W], "counts": str}, column-major,
pycocotools' compressed string) built from a window of the mask, tight boxes and areas.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils


def rle_with_bytes_counts(rle: dict) -> dict:
    """Our RLE, counts a str -> the same RLE with counts as bytes, the form pycocotools' C functions take."""
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def _bbox(rle: dict) -> tuple[int, int, int, int]:
    """Tight [x, y, w, h] of an RLE mask (integers; zeros when empty), straight from the runs."""
    x, y, w, h = mask_utils.toBbox(rle_with_bytes_counts(rle)).tolist()
    return (int(x), int(y), int(w), int(h))


def window_rle(b: np.ndarray, r0: int, c0: int, size: tuple[int, int]) -> dict:
    """COCO RLE of a (H0, W0) mask that is zero outside the window b (R, C bool) at rows r0:r0+R,
    cols c0:c0+C: the same string pycocotools encodes from the full mask, at the window's cost.

    COCO RLE runs over the image column by column. Comparing each window row with the one above
    (a zero row above and below the window) finds where a run starts or ends in each column; those
    map to positions in the full image, sorted in column order, and the run lengths are their
    differences. pycocotools compresses the runs.
    """
    h0, w0 = size
    R, C = b.shape
    if R and C:
        # row-major over (R + 1, C): row 0 changes where b[0] is set (from the zero row above), row
        # R where b[R - 1] is (to the zero row below), rows between where b changes; no padded copy
        change = np.concatenate((np.flatnonzero(b[0]), np.flatnonzero(b[1:] != b[:-1]) + C,
                                 np.flatnonzero(b[R - 1]) + R * C))
        row, col = np.divmod(change, C)
        starts = np.sort((c0 + col) * h0 + (r0 + row))
        # a run ending at the last row of a column and starting again at the first row of the next
        # (the window spans every row) is one run in the full image: drop the end/start pair
        dup = starts[1:] == starts[:-1]
        if dup.any():
            keep = np.ones(starts.size, np.bool_)
            keep[1:][dup] = False
            keep[:-1][dup] = False
            starts = starts[keep]
        if starts.size and starts[-1] == h0 * w0:  # a run ending with the image needs no end
            starts = starts[:-1]
    else:
        starts = np.zeros(0, np.int64)
    counts = np.diff(np.concatenate(([0], starts, [h0 * w0]))).tolist()
    rle = mask_utils.frPyObjects({"size": [h0, w0], "counts": counts}, h0, w0)
    return {"size": [h0, w0], "counts": rle["counts"].decode("ascii")}


def _region_stats(label_map: np.ndarray, values: Sequence[int]) -> dict[int, tuple[int, tuple[int, int, int, int]]]:
    """value -> (area, tight [x, y, w, h]) for each value present in label_map."""
    out = {}
    for v in values:
        m = label_map == v
        area = int(m.sum())
        if not area:
            continue
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        out[v] = (area, (int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)))
    return out
