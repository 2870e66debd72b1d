"""The mask encodings the post-processing writes into its records, shared by the instance,
panoptic and semantic paths (and tiling/): COCO RLE ({"size": [H, W], "counts": str}, column-major,
pycocotools' compressed string) built from a window of the mask, tight boxes and areas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils


def rle_with_bytes_counts(rle: dict) -> dict:
    """Our RLE, counts a str -> the same RLE with counts as bytes, the form pycocotools' C functions take."""
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def rle_bbox(rle: dict) -> tuple[int, int, int, int]:
    """Tight [x, y, w, h] of an RLE mask (integers; zeros when empty), straight from the runs."""
    x, y, w, h = mask_utils.toBbox(rle_with_bytes_counts(rle)).tolist()
    return (int(x), int(y), int(w), int(h))


@dataclass
class Measured:
    """A query's mask at the original size, where it can be positive (postprocess/sampling.py): its
    window's top-left corner r0, c0, its positive pixels (area) and its mask score (the mean
    sigmoid of its logits inside the mask; 0 for an empty mask). The mask itself is either dense,
    the (R, C) bool window at rows r0:r0+R, cols c0:c0+C (zero outside), or, for a mask scattered
    over a large image, its active cells (postprocess/cells.CellMask), whose cost follows the mask's
    area, not its window's: rle() and binary work on whichever it holds."""

    r0: int
    c0: int
    area: int
    score: float
    dense: Optional[np.ndarray] = None
    cells: Optional[Any] = None  # a cells.CellMask

    @property
    def binary(self) -> np.ndarray:
        """The dense (R, C) bool window (built from the cells when the mask is held as cells)."""
        return self.dense if self.cells is None else self.cells.window()

    def rle(self, size: tuple[int, int]) -> dict:
        """COCO RLE of the mask in the (H0, W0) image."""
        if self.cells is not None:
            return self.cells.rle()
        return window_rle(self.dense, self.r0, self.c0, size)


def window_rle(b: np.ndarray, r0: int, c0: int, size: tuple[int, int]) -> dict:
    """COCO RLE of a (H0, W0) mask that is zero outside the window b (R, C bool) at rows r0:r0+R,
    cols c0:c0+C: the same string pycocotools encodes from the full mask, at the window's cost.

    COCO RLE runs over the image column by column. Comparing each window row with the one above
    (a zero row above and below the window) finds where a run starts or ends in each column; those
    map to positions in the full image (rle_of_changes).
    """
    h0, w0 = size
    R, C = b.shape
    if not (R and C):
        return rle_of_changes(np.zeros(0, np.int64), size)
    # row-major over (R + 1, C): row 0 changes where b[0] is set (from the zero row above), row
    # R where b[R - 1] is (to the zero row below), rows between where b changes; no padded copy
    change = np.concatenate((np.flatnonzero(b[0]), np.flatnonzero(b[1:] != b[:-1]) + C,
                             np.flatnonzero(b[R - 1]) + R * C))
    row, col = np.divmod(change, C)
    return rle_of_changes((c0 + col) * h0 + (r0 + row), size)


def rle_of_changes(changes: np.ndarray, size: tuple[int, int]) -> dict:
    """COCO RLE of a (H0, W0) mask from where it changes: changes holds, in any order, the
    column-major positions p (column * H0 + row) where the mask differs from position p - 1, each
    column seen with a zero above and below its pieces, so a position may come twice (the end of a
    run in a piece and the start of one in the piece below, or the end of a column and the start of
    the next), meaning no change. pycocotools compresses the runs."""
    h0, w0 = size
    starts = np.sort(changes)
    # a position listed twice is no change (a run goes on across the two pieces): drop the pair
    dup = starts[1:] == starts[:-1]
    if dup.any():
        keep = np.ones(starts.size, np.bool_)
        keep[1:][dup] = False
        keep[:-1][dup] = False
        starts = starts[keep]
    if starts.size and starts[-1] == h0 * w0:  # a run ending with the image needs no end
        starts = starts[:-1]
    counts = np.diff(np.concatenate(([0], starts, [h0 * w0]))).astype(np.uint32)
    # an array, not a list: pycocotools converts the counts with np.array(counts, np.uint32) (a
    # list of 100 k runs cost ~9 ms to build and convert; the array ~1 ms)
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
