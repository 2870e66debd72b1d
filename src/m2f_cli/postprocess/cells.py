"""A query's mask on large images measured on the cells of the output grid that can be positive.

A mask whose positive logits are scattered over the image (a diffuse query on a crowded photo) has
the whole photo as its window, while the mask covers a few percent of it. CellGrid computes it only on
the output cells that sample a positive logit, and CellMask keeps it that way: its RLE, its area,
its mask score and its painting into the instance map all cost what the active cells hold, never
the window (a 12 MP photo's 100 diffuse queries: ~1 M cell pixels each against 8 M in the window).
Exact: tests/test_postprocess.py compares the RLE and the map with the full-image upsampling's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from m2f_cli.postprocess.masks import Measured, rle_of_changes


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


class CellGrid:
    """The output image as a grid of cells, for masks upscaled >= 4x along both axes (usable).

    A cell row is a run of output rows that blend the same two source rows (y0, y1; runs longer
    than the others, at the clamped image edges, are split), padded to hm rows; a cell column is wc
    consecutive output columns (the last one padded past the image). The x-direction is torch's own
    kernel at full width (one row of source logits -> W0 values, cheap); each cell's rows are then
    the y blend of two of those rows, exactly as MaskSampler.window computes them. A cell can be
    positive only if one of the source logits it samples is: its two source rows and (wc <= 1 /
    x-scale, so at most 3) source columns. Only those cells are computed, as one (n, hm, wc) batch,
    their padding set negative: the cost follows the mask's area however scattered its positive
    logits are.
    """

    def __init__(self, valid: tuple[int, int], original: tuple[int, int], y0: torch.Tensor, y1: torch.Tensor,
                 wy: torch.Tensor, x0: torch.Tensor):
        vw, (h0, w0) = valid[1], original
        self.h0, self.w0 = h0, w0
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
        self.rs_np = self.rs.numpy()
        rc_t = torch.tensor(rc)
        a = torch.arange(hm)
        row_ok = a < rc_t[:, None]                                        # (ncr, hm)
        self.row_pad = ~row_ok
        self.rc_np = rc_t.numpy()
        self.wy = wy[self.rs[:, None] + torch.minimum(a, rc_t[:, None] - 1)]
        self.cy0, self.cy1 = y0[self.rs], y1[self.rs]
        self.real_rows = np.flatnonzero(row_ok.flatten().numpy())         # padded row -> real rows
        self.wc = wc = max(1, w0 // vw)
        first = torch.arange(-(-w0 // wc)) * wc
        self.cx0 = x0[first]
        self.ncc = len(first)
        self.last_wc = w0 - int(first[-1])                                # real columns of the last
        self.cols = (first[:, None] + torch.arange(wc)).clamp(max=w0 - 1)

    def real_rows_of(self, k0: int, k1: int) -> np.ndarray:
        """The real rows among the padded rows of cell rows k0:k1, counted from k0's first padded
        row (they are image rows rs[k0], rs[k0] + 1, ...)."""
        lo, hi = np.searchsorted(self.real_rows, [k0 * self.hm, k1 * self.hm])
        return self.real_rows[lo:hi] - k0 * self.hm

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
        dev = low.device
        ii, jj = act.ii.to(dev), act.jj.to(dev)
        ya, yb = int(self.cy0[act.k0]), int(self.cy1[act.k1 - 1]) + 1
        wide = F.interpolate(low[None, None, ya:yb], size=(yb - ya, self.w0), mode="bilinear",
                             align_corners=False)[0, 0].reshape(-1)
        cols = self.cols.to(dev)[jj]                                      # (n, wc)
        top = wide[((self.cy0.to(dev)[ii] - ya) * self.w0)[:, None] + cols]
        bottom = wide[((self.cy1.to(dev)[ii] - ya) * self.w0)[:, None] + cols]
        w = self.wy.to(dev)[ii][:, :, None]                              # (n, hm, 1)
        x = (top[:, None, :] * (1 - w)).add_(bottom[:, None, :] * w)      # (n, hm, wc), as window()
        # padding (rows past a short cell row, columns past the image) negative: never in the mask,
        # and sigmoid(max(x, 0)) = 0.5 there as outside it, which the score's sum takes off below
        x.masked_fill_(self.row_pad.to(dev)[ii][:, :, None], -1.0)
        if self.last_wc < self.wc:
            x[jj == self.ncc - 1, :, self.last_wc:] = -1.0
        b = (x > 0).cpu().numpy()
        area = int(np.count_nonzero(b))
        inside = float(x.clamp_(min=0).sigmoid_().sum()) - 0.5 * (x.numel() - area)
        mask = CellMask(self, act.ii.numpy(), act.jj.numpy(), b, act.k0, act.k1, act.m0, act.m1)
        return Measured(int(self.rs[act.k0]), act.m0 * self.wc, area, inside / (area + 1e-6), cells=mask)


@dataclass
class CellMask:
    """A mask held on its active cells: b (n, hm, wc) bool, cell n at cell row ii[n], cell column
    jj[n] of grid (False on the padding); k0:k1 x m0:m1 the cells' bounding box."""

    grid: CellGrid
    ii: np.ndarray
    jj: np.ndarray
    b: np.ndarray
    k0: int
    k1: int
    m0: int
    m1: int

    def rle(self) -> dict:
        """COCO RLE in the original image: where the mask changes along each column, within each
        cell and from the last real row of the cell above (zeros where that cell is inactive);
        below a cell whose lower neighbour is inactive, back to zero."""
        g, b, (n, hm, wc) = self.grid, self.b, self.b.shape
        nk, nm = self.k1 - self.k0, self.m1 - self.m0
        at = np.full((nk + 2, nm), -1, np.int64)         # cell (k, m) -> its index, -1: inactive
        at[self.ii - self.k0 + 1, self.jj - self.m0] = np.arange(n)
        above, below = at[self.ii - self.k0, self.jj - self.m0], at[self.ii - self.k0 + 2, self.jj - self.m0]
        lr = g.rc_np[self.ii]                             # real rows of each cell
        last = b[np.arange(n), lr - 1]                   # (n, wc) its last real row
        change = np.empty((n, hm + 1, wc), np.bool_)      # row a: rows a - 1 and a differ
        np.not_equal(b[:, 0], np.where((above >= 0)[:, None], last[above], False), out=change[:, 0])
        np.not_equal(b[:, 1:], b[:, :-1], out=change[:, 1:hm])
        change[:, hm] = False
        change[np.arange(n), lr] = last & (below < 0)[:, None]   # (was: the real row to the padding)
        flat = np.flatnonzero(change)
        cell = flat // ((hm + 1) * wc)
        base = self.jj * (wc * g.h0) + g.rs_np[self.ii]    # each cell's top-left, column-major
        offset = (np.arange(wc) * g.h0 + np.arange(hm + 1)[:, None]).ravel()
        return rle_of_changes(base[cell] + offset[flat - cell * ((hm + 1) * wc)], (g.h0, g.w0))

    def window(self) -> np.ndarray:
        """The dense (R, C) bool window at (rs[k0], m0 * wc) of the image (the cells' bounding box)."""
        g, (n, hm, wc) = self.grid, self.b.shape
        nk, nm = self.k1 - self.k0, self.m1 - self.m0
        grid = np.zeros((nk, hm, nm, wc), np.bool_)
        grid[self.ii - self.k0, :, self.jj - self.m0, :] = self.b
        c0 = self.m0 * wc
        return grid.reshape(nk * hm, nm * wc)[g.real_rows_of(self.k0, self.k1), : min(g.w0, self.m1 * wc) - c0]

    def packed(self) -> "PackedCells":
        return PackedCells(self.grid, self.ii.astype(np.int32), self.jj.astype(np.int32), self.b.shape,
                           np.packbits(self.b, axis=None))


@dataclass
class PackedCells:
    """A CellMask kept for painting the instance map, 1 bit a cell pixel."""

    grid: CellGrid
    ii: np.ndarray
    jj: np.ndarray
    shape: tuple[int, int, int]
    bits: np.ndarray

    def paint(self, cell_map: np.ndarray, value: int) -> None:
        """Set the mask's pixels of cell_map (new_cell_map's layout) to value."""
        n, hm, wc = self.shape
        b = np.unpackbits(self.bits, count=n * hm * wc).view(np.bool_).reshape(n, hm * wc)
        at = self.ii.astype(np.int64) * self.grid.ncc + self.jj
        region = cell_map[at]
        np.copyto(region, np.uint16(value), where=b)
        cell_map[at] = region


def new_cell_map(grid: CellGrid) -> np.ndarray:
    """An empty instance map in cell-major order, (cells, hm * wc) uint16: a cell's pixels are one
    contiguous row, so a mask held as cells paints at the cost of its cells (PackedCells.paint)."""
    return np.zeros((len(grid.rs_np) * grid.ncc, grid.hm * grid.wc), np.uint16)


def merge_cell_map(grid: CellGrid, cell_map: np.ndarray, imap: np.ndarray, band: int = 64) -> np.ndarray:
    """imap ((H0, W0) uint16) with cell_map's instances added: at each pixel the smaller id of
    the two (ids rank by descending score, so the best instance owns the pixel, as painting every
    mask in ascending score does), 0 only where both are 0. band cell rows at a time, so the
    image-order copy of the cell map is never whole."""
    ncr, hm, wc, ncc = len(grid.rs_np), grid.hm, grid.wc, grid.ncc
    imap -= 1    # 0 (no instance) wraps to 65535: the minimum then ignores it
    for k0 in range(0, ncr, band):
        k1 = min(ncr, k0 + band)
        part = cell_map[k0 * ncc:k1 * ncc].reshape(k1 - k0, ncc, hm, wc).transpose(0, 2, 1, 3).reshape(
            (k1 - k0) * hm, ncc * wc)[grid.real_rows_of(k0, k1), :grid.w0]
        part -= 1
        rows = imap[int(grid.rs_np[k0]):int(grid.rs_np[k0]) + len(part)]
        np.minimum(rows, part, out=rows)
    imap += 1
    return imap
