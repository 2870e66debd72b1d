"""A query's mask logits at the original image size, computed only where the mask can be positive.

Optimised but exact (tests/test_postprocess.py compares it with the full-image bilinear
upsampling): each query is upsampled only over its window, or, when its positive logits are
scattered over the image (a diffuse mask's window is the whole photo), over the cells of the output
grid that touch one (_Cells), so the cost follows the mask's area, not the image's. The result
(Measured) is the binary window, its area and its mask score; instance.py encodes its RLE from the
window (masks.window_rle), never from a full-size mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from m2f_cli.postprocess.upsample import _source_rows

# Windows larger than this share of the image are upsampled over the whole image in one pass
# (torch's fused kernel); smaller ones separably over the window. Measured per query at 12 MP:
# separable 2.4 ms vs 40 ms at 4% of the image, 20 vs 49 ms at 34%, about even at 60-70%.
FULL_WINDOW = 0.6
# A mask upscaled at least 4x along both axes is measured on its active cells (_Cells) when they are
# under this share of the cells of its window; above it the dense window is cheaper. Measured on
# the crowded benchmark's logits and on compact blobs (docs/performance.md, "Crowded photos"):
# cells ~2.4x the window's cost per computed pixel, plus the RLE and painting both paths share.
CELL_SHARE = 0.35


@dataclass
class Measured:
    """A query's mask at the original size, where it can be positive: binary (R, C) bool is rows
    r0:r0+R, cols c0:c0+C of the image (zero outside); area: its positive pixels; score: the mean
    sigmoid of its logits inside the mask (the mask score; 0 for an empty mask)."""

    r0: int
    c0: int
    binary: np.ndarray
    area: int
    score: float


class _Sampler:
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
        rows, cols = _source_rows(torch.arange(h0), vh, h0), _source_rows(torch.arange(w0), vw, w0)  # CPU
        self.ry0, self.ry1, self.wy = (t.to(device) for t in rows)
        self.cx0, self.cx1 = (t.to(device) for t in cols[:2])
        self.cells = _Cells(valid, original, *rows, cols[0]) if _Cells.usable(valid, original) else None

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
        be positive. On its active cells (_Cells) when they are few, else on its window."""
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
        return Measured(r0, c0, b, area, inside / (area + 1e-6))


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


@dataclass
class _Active:
    """The cells of a query that can hold a positive pixel: cell rows ii, cell columns jj (int64,
    row-major order), their bounding cell box k0:k1 x m0:m1 and its share of active cells."""

    ii: torch.Tensor
    jj: torch.Tensor
    k0: int
    k1: int
    m0: int
    m1: int
    share: float


class _Cells:
    """The output image as a grid of cells, for masks upscaled >= 4x along both axes (usable).

    A cell row is a run of output rows that blend the same two source rows (y0, y1; runs longer
    than the others, at the clamped image edges, are split), padded to hm rows by repeating its
    last row; a cell column is wc consecutive output columns (the last one padded by repeating the
    last column). The x-direction is torch's own kernel at full width (one row of source logits
    -> W0 values, cheap); each cell's rows are then the y blend of two of those rows, exactly as
    _Sampler.window computes them. A cell can be positive only if one of the source logits it
    samples is: its two source rows and (wc <= 1 / x-scale, so at most 3) source columns. Only
    those cells are computed, as one (n, hm, wc) batch: the cost follows the mask's area however
    scattered its positive logits are.
    """

    def __init__(self, valid: tuple[int, int], original: tuple[int, int], y0: torch.Tensor, y1: torch.Tensor,
                 wy: torch.Tensor, x0: torch.Tensor):
        vw, (h0, w0) = valid[1], original
        self.w0 = w0
        y0n = y0.numpy()
        starts = np.flatnonzero(np.r_[True, y0n[1:] != y0n[:-1]])
        counts = np.diff(np.r_[starts, h0])
        hm = int(counts[1:-1].max()) if len(counts) > 2 else int(counts.max())
        rs, rc = [], []
        for st, c in zip(starts.tolist(), counts.tolist()):
            for k in range(0, c, hm):
                rs.append(st + k)
                rc.append(min(hm, c - k))
        self.hm, self.rs = hm, torch.tensor(rs)
        rc_t = torch.tensor(rc)
        a = torch.arange(hm)
        self.row_ok = a < rc_t[:, None]                                   # (ncr, hm)
        self.wy = wy[self.rs[:, None] + torch.minimum(a, rc_t[:, None] - 1)]
        self.cy0, self.cy1 = y0[self.rs], y1[self.rs]
        self.real_rows = np.flatnonzero(self.row_ok.flatten().numpy())    # padded row -> real rows
        self.wc = wc = max(1, w0 // vw)
        first = torch.arange(-(-w0 // wc)) * wc
        self.cx0 = x0[first]
        cols = first[:, None] + torch.arange(wc)
        self.col_ok = cols < w0                                           # (ncc, wc)
        self.cols = cols.clamp(max=w0 - 1)

    @staticmethod
    def usable(valid: tuple[int, int], original: tuple[int, int]) -> bool:
        """Cells of 4x4 output pixels or more: below that (1080p from 384) the dense window wins."""
        return original[0] >= 4 * valid[0] and original[1] >= 4 * valid[1]

    def active(self, pos: torch.Tensor) -> Optional[_Active]:
        """pos: (vh, vw) bool, the positive logits -> the cells that can hold a positive pixel."""
        pos = pos.cpu()
        rows = pos[self.cy0] | pos[self.cy1]                              # (ncr, vw)
        near = rows.clone()
        near[:, :-1] |= rows[:, 1:]
        near[:, :-2] |= rows[:, 2:]
        ii, jj = torch.nonzero(near[:, self.cx0], as_tuple=True)
        if ii.numel() == 0:
            return None
        k0, k1, m0, m1 = int(ii[0]), int(ii[-1]) + 1, int(jj.min()), int(jj.max()) + 1
        return _Active(ii, jj, k0, k1, m0, m1, ii.numel() / ((k1 - k0) * (m1 - m0)))

    def measure(self, low: torch.Tensor, act: _Active) -> Measured:
        ii, jj = act.ii.to(low.device), act.jj.to(low.device)
        ya, yb = int(self.cy0[act.k0]), int(self.cy1[act.k1 - 1]) + 1
        wide = F.interpolate(low[None, None, ya:yb], size=(yb - ya, self.w0), mode="bilinear",
                             align_corners=False)[0, 0].reshape(-1)
        cols = self.cols.to(low.device)[jj]                               # (n, wc)
        top = wide[((self.cy0.to(low.device)[ii] - ya) * self.w0)[:, None] + cols]
        bottom = wide[((self.cy1.to(low.device)[ii] - ya) * self.w0)[:, None] + cols]
        w = self.wy.to(low.device)[ii][:, :, None]                       # (n, hm, 1)
        x = (top[:, None, :] * (1 - w)).add_(bottom[:, None, :] * w)      # (n, hm, wc), as window()
        b = (x > 0).cpu().numpy()
        real = self.row_ok[act.ii][:, :, None] & self.col_ok[act.jj][:, None, :]
        area = int(np.count_nonzero(b & real.numpy()))
        inside = float(x.masked_fill_(~real.to(x.device), 0.0).clamp_(min=0).sigmoid_().sum()) \
            - 0.5 * (x.numel() - area)
        # the cells into their window (padded rows and columns repeat real ones), padding dropped
        nk, nm = act.k1 - act.k0, act.m1 - act.m0
        grid = np.zeros((nk, self.hm, nm, self.wc), np.bool_)
        grid[(act.ii - act.k0).numpy(), :, (act.jj - act.m0).numpy(), :] = b
        lo, hi = np.searchsorted(self.real_rows, [act.k0 * self.hm, act.k1 * self.hm])
        c0 = act.m0 * self.wc
        binary = grid.reshape(nk * self.hm, nm * self.wc)[self.real_rows[lo:hi] - act.k0 * self.hm,
                                                          : min(self.w0, act.m1 * self.wc) - c0]
        return Measured(int(self.rs[act.k0]), c0, binary, area, inside / (area + 1e-6))
