"""A query's mask logits at the original image size, computed only where the mask can be positive.

Optimised but exact (tests/test_postprocess.py compares it with the full-image bilinear
upsampling): each query is upsampled only over its window, or, when its positive logits are
scattered over the image (a diffuse mask's window is the whole photo), over the cells of the output
grid that touch one (cells.py), so the cost follows the mask's area, not the image's. The result
(masks.Measured) is the mask, as a dense window or as its cells, its area and its mask score;
instance.py encodes its RLE from that (Measured.rle), never from a full-size mask.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from m2f_cli.postprocess.cells import CellGrid
from m2f_cli.postprocess.masks import Measured
from m2f_cli.postprocess.upsample import source_rows

# Windows larger than this share of the image are upsampled over the whole image in one pass
# (torch's fused kernel); smaller ones separably over the window. Measured per query at 12 MP:
# separable 2.4 ms vs 40 ms at 4% of the image, 20 vs 49 ms at 34%, about even at 60-70%.
FULL_WINDOW = 0.6
# A mask upscaled at least 4x along both axes is measured on its active cells (CellGrid) when they are
# under this share of the cells of its window; above it the dense window is cheaper. Measured on
# the crowded benchmark's logits and on compact blobs (docs/performance.md, "Crowded photos"):
# cells ~2.4x the window's cost per computed pixel, when both still shared the RLE and painting
# over the window; the cells now keep their own (cells.CellMask), so this share is conservative.
CELL_SHARE = 0.35


class MaskSampler:
    """Bilinear (align_corners=False) from the (vh, vw) valid-area logits to the original size,
    evaluated only on output windows.

    Exact shortcut: an output pixel is a blend of its (at most) four source pixels, so it can be
    positive only if one of them is. Outside the window spanned by the source rows/columns that
    hold a positive logit, the mask is 0 and contributes nothing to the mask score; the cost is
    proportional to the object's area instead of the image's.
    """

    def __init__(self, valid: tuple[int, int], original: tuple[int, int], device: torch.device):
        (vh, vw), (h0, w0) = valid, original
        self.original, self.full_pixels = original, h0 * w0
        rows, cols = source_rows(torch.arange(h0), vh, h0), source_rows(torch.arange(w0), vw, w0)  # CPU
        self.ry0, self.ry1, self.wy = (t.to(device) for t in rows)
        self.cx0, self.cx1 = (t.to(device) for t in cols[:2])
        self.cells = CellGrid(valid, original, *rows, cols[0]) if CellGrid.usable(valid, original) else None

    @staticmethod
    def _span(lo_idx: torch.Tensor, hi_idx: torch.Tensor, first: int, last: int) -> tuple[int, int]:
        """Output range whose source indices touch [first, last] (indices are non-decreasing)."""
        a = int(torch.searchsorted(hi_idx, torch.tensor(first, device=hi_idx.device)))
        b = int(torch.searchsorted(lo_idx, torch.tensor(last, device=lo_idx.device), right=True))
        return a, b

    def window(self, low: torch.Tensor, box: Optional[tuple[int, int, int, int]] = None):
        """low: (vh, vw) logits -> (r0, c0, logits window) or None when nothing is positive.
        box: _positive_box(low > 0), when the caller has it."""
        box = box or _positive_box(low > 0)
        if box is None:
            return None
        r0, r1 = self._span(self.ry0, self.ry1, box[0], box[1])
        c0, c1 = self._span(self.cx0, self.cx1, box[2], box[3])
        if r1 <= r0 or c1 <= c0:
            return None  # no output pixel samples a positive logit (outputs much smaller than the logits)
        if (r1 - r0) * (c1 - c0) > FULL_WINDOW * self.full_pixels:
            # a window near the image's size: torch's one-pass kernel over the whole image
            full = F.interpolate(low[None, None], size=self.original, mode="bilinear", align_corners=False)[0, 0]
            return r0, c0, full[r0:r1, c0:c1]
        # separable, as torch's kernel blends: along x with torch's own kernel on the source rows the
        # window needs (their height unchanged, so rows are copied exactly), then along y on the window
        y0, y1, wy = self.ry0[r0:r1], self.ry1[r0:r1], self.wy[r0:r1, None]
        ya, yb = int(y0[0]), int(y1[-1]) + 1
        wide = F.interpolate(low[None, None, ya:yb], size=(yb - ya, self.original[1]), mode="bilinear",
                             align_corners=False)[0, 0, :, c0:c1]
        top = wide.index_select(0, y0 - ya)
        bottom = wide.index_select(0, y1 - ya)
        return r0, c0, top.mul_(1 - wy).add_(bottom.mul_(wy))

    def measure(self, low: torch.Tensor) -> Optional[Measured]:
        """low: (vh, vw) logits -> the mask at the original size, or None when no output pixel can
        be positive. On its active cells (CellGrid) when they are few, else on its window."""
        pos = low > 0
        box = _positive_box(pos)
        if box is None:
            return None
        if self.cells is not None and _scattered(pos, box):
            active = self.cells.active(pos)
            if active is None:
                return None
            if active.share < CELL_SHARE:
                return self.cells.measure(low, active)
        win = self.window(low, box)
        if win is None:
            return None
        r0, c0, logits = win
        b = (logits > 0).cpu().numpy()
        area = int(np.count_nonzero(b))  # ~50x faster than torch's bool sum
        # mean sigmoid inside the mask; sigmoid(max(x, 0)) is 0.5 exactly outside it
        inside = float(logits.clamp_(min=0).sigmoid_().sum()) - 0.5 * (b.size - area)
        return Measured(r0, c0, area, inside / (area + 1e-6), dense=b)


def _positive_box(pos: torch.Tensor) -> Optional[tuple[int, int, int, int]]:
    """pos: (vh, vw) bool -> (first row, last row, first col, last col) holding a True, or None."""
    rows = torch.nonzero(pos.any(1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(pos.any(0)).flatten()
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _scattered(pos: torch.Tensor, box: tuple[int, int, int, int]) -> bool:
    """Whether the positive logits pos fill under CELL_SHARE of their bounding box: a compact mask
    (most objects) goes straight to the window path; the cells' own count decides the others."""
    area = (box[1] - box[0] + 1) * (box[3] - box[2] + 1)
    return int(pos.sum()) < CELL_SHARE * area
