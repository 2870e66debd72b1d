"""Stage 5: the original Mask2Former instance inference, turned into our Instance records.

For one image (docs/mask2former.md, "The original test protocol"):
1. mask logits (Q, h/4, w/4) -> bilinear (align_corners=False) to the padded model input ->
   crop the padding -> bilinear to the ORIGINAL (H0, W0);
2. class probabilities = softmax over C+1, "no object" dropped; top-k over all Q x C pairs
   (a query may appear with several classes);
3. binary mask = logit > 0; score = class prob x mean sigmoid inside the binary mask;
4. tight boxes from the binary masks.

Optimised but exact: a candidate whose class probability is already below the score threshold
cannot pass it (the mask score is <= 1), so only the surviving queries are upsampled, in chunks
whose size bounds memory whatever the image size, and each only where it can be positive: over
its window, or, when the positive logits are scattered over the image (a diffuse mask's window is
the whole photo), over the cells of the output grid that touch one (_Cells), so the cost follows
the mask's area, not the image's. Its RLE is built from the window (window_rle), never from a
full-size mask, and the instance map is painted as each candidate is measured (an owner map),
so no candidate's mask is kept: memory stays flat in the number of candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from m2f_cli.model.categories import COCO_NAMES, CategoryTable
from m2f_cli.records import Instance, Segment

# Bytes of float32 full-resolution mask logits processed at once.
CHUNK_BYTES = 64 * 1024 * 1024
# Windows larger than this share of the image are upsampled over the whole image in one pass
# (torch's fused kernel); smaller ones separably over the window. Measured per query at 12 MP:
# separable 2.4 ms vs 40 ms at 4% of the image, 20 vs 49 ms at 34%, about even at 60-70%.
FULL_WINDOW = 0.6
# A mask upscaled at least 4x along both axes is measured on its active cells (_Cells) when they are
# under this share of the cells of its window; above it the dense window is cheaper. Measured on
# the crowded benchmark's logits and on compact blobs (docs/performance.md, "Crowded photos"):
# cells ~2.4x the window's cost per computed pixel, plus the RLE and painting both paths share.
CELL_SHARE = 0.35


@dataclass(frozen=True)
class PostprocessOptions:
    """threshold: minimum final score to keep an instance (the lowest any output asks for).
    map_threshold: minimum score to draw an instance in the instance map.
    top_k: candidates (query, class pairs) considered, as in the original (100).
    keep: model class indices to keep (None = all)."""

    threshold: float = 0.5
    map_threshold: float = 0.5
    top_k: int = 100
    keep: Optional[frozenset[int]] = None


def _c(rle: dict) -> dict:
    """Our str-counts RLE -> the bytes-counts form pycocotools' C functions take."""
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def _bbox(rle: dict) -> tuple[int, int, int, int]:
    """Tight [x, y, w, h] of an RLE mask (integers; zeros when empty), straight from the runs."""
    x, y, w, h = mask_utils.toBbox(_c(rle)).tolist()
    return (int(x), int(y), int(w), int(h))


def window_rle(b: np.ndarray, r0: int, c0: int, size: tuple[int, int]) -> dict:
    """COCO RLE of a (H0, W0) mask that is zero outside the window b (R, C bool) at rows r0:r0+R,
    cols c0:c0+C: the same string pycocotools encodes from the full mask, at the window's cost.

    COCO RLE runs over the image column by column. Comparing each window row with the one above
    (a zero row padded above and below) finds where a run starts or ends in each column; those
    map to positions in the full image, sorted in column order, and the run lengths are their
    differences. pycocotools compresses the runs.
    """
    h0, w0 = size
    R, C = b.shape
    if R and C:
        padded = np.zeros((R + 2, C), np.bool_)
        padded[1:R + 1] = b
        change = np.flatnonzero(padded[1:] != padded[:-1])  # row-major, over (R + 1, C)
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


def top_candidates(class_logits: torch.Tensor, options: "PostprocessOptions", floor: float
                   ) -> tuple[torch.Tensor, list[int], list[int]]:
    """The paper's candidate selection: class probabilities without "no object", only the kept
    classes, the top_k (query, class) pairs by probability, those >= floor.

    class_logits: (Q, C+1) any float dtype. Returns (probabilities (n,) float32 on the CPU,
    descending; their class indices; their query indices).
    """
    class_logits = class_logits.float()
    num_q, num_c1 = class_logits.shape
    num_c = num_c1 - 1
    probs = class_logits.softmax(-1)[:, :num_c]
    if options.keep is not None:
        drop = torch.ones(num_c, dtype=torch.bool, device=probs.device)
        drop[list(options.keep)] = False
        probs = probs.masked_fill(drop, -1.0)
    k = min(options.top_k, num_q * num_c)
    top_p, top_i = probs.flatten().topk(k, sorted=True)
    alive = top_p >= floor
    if options.keep is not None:
        alive &= top_p >= 0
    top_p, top_i = top_p[alive].cpu(), top_i[alive].cpu()
    return top_p, (top_i % num_c).tolist(), (top_i // num_c).tolist()


@dataclass
class _Packed:
    """A drawn query's binary window kept for painting the map, 1 bit a pixel (np.packbits: ~1 ms
    each way for 10 MP): 100 candidates whose windows cover a 12 MP photo hold 150 MB, not 1.2 GB."""

    r0: int
    c0: int
    shape: tuple[int, int]
    bits: np.ndarray

    @classmethod
    def of(cls, m: Measured) -> "_Packed":
        return cls(m.r0, m.c0, m.binary.shape, np.packbits(m.binary, axis=None))

    def binary(self) -> np.ndarray:
        return np.unpackbits(self.bits, count=self.shape[0] * self.shape[1]).view(np.bool_).reshape(self.shape)


def segment_instances(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                      padded: tuple[int, int], valid: tuple[int, int], original: tuple[int, int],
                      categories: CategoryTable, options: PostprocessOptions
                      ) -> tuple[list[Instance], np.ndarray]:
    """One image's instances (descending score, ids 1..N) and its instance map.

    class_logits: (Q, C+1) any float dtype; mask_logits: (Q, h, w) at 1/4 of the padded input.
    padded: (Hp, Wp) model input size; valid: (h, w) unpadded part; original: (H0, W0).
    Returns the instances and the (H0, W0) uint16 map of those with score >= map_threshold.
    """
    h0, w0 = original
    top_p, labels, queries = top_candidates(class_logits, options, max(options.threshold, 0.0))
    if top_p.numel() == 0:
        return [], np.zeros((h0, w0), np.uint16)
    p_list = top_p.tolist()
    best_p: dict[int, float] = {}
    for p, q in zip(p_list, queries):
        best_p[q] = max(best_p.get(q, 0.0), p)
    uniq = sorted(best_p)

    sampler = _Sampler(valid, original, mask_logits.device)
    mask_score: dict[int, float] = {}
    geometry: dict[int, tuple[tuple[int, int, int, int], int, dict]] = {}
    windows: dict[int, _Packed] = {}
    empty = window_rle(np.zeros((0, 0), np.bool_), 0, 0, original)
    per_chunk = max(1, CHUNK_BYTES // max(1, valid[0] * valid[1] * 4))
    for start in range(0, len(uniq), per_chunk):
        qs = uniq[start:start + per_chunk]
        low = _crop_to_valid(mask_logits[qs], padded, valid)  # (n, vh, vw), cheap
        for j, q in enumerate(qs):
            m = sampler.measure(low[j])
            if m is None:
                mask_score[q], geometry[q] = 0.0, ((0, 0, 0, 0), 0, empty)
                continue
            mask_score[q] = m.score
            rle = window_rle(m.binary, m.r0, m.c0, original)
            geometry[q] = (_bbox(rle), m.area, rle)
            if m.area and best_p[q] * m.score >= options.map_threshold:
                windows[q] = _Packed.of(m)

    cand = []
    for rank, (p, lab, q) in enumerate(zip(p_list, labels, queries)):
        s = p * mask_score[q]
        if s >= options.threshold:
            cand.append((-s, rank, s, lab, q))
    cand.sort()
    out: list[Instance] = []
    imap = np.zeros((h0, w0), np.uint16)
    for n, (_, _, s, lab, q) in enumerate(cand, start=1):
        cat = categories[lab]
        bbox, area, rle = geometry[q]
        out.append(Instance(id=n, label=cat.name, category_id=cat.id, label_index=lab, score=float(s),
                            bbox=bbox, area=area, rle=rle))
    # Paint in ascending score so the best instance owns each pixel; a query listed with several
    # classes is drawn once, as its best-scoring instance (its first in this order).
    first: dict[int, int] = {}                             # query -> id of its best instance
    for inst, (_, _, s, _, q) in zip(out, cand):
        if s >= options.map_threshold and q in windows:
            first.setdefault(q, inst.id)
    for inst, (_, _, s, _, q) in zip(reversed(out), reversed(cand)):
        if first.get(q) == inst.id:
            w = windows.pop(q)
            region = imap[w.r0:w.r0 + w.shape[0], w.c0:w.c0 + w.shape[1]]
            np.copyto(region, np.uint16(inst.id), where=w.binary())
    return out, imap


def instances_from_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                          padded: tuple[int, int], valid: tuple[int, int], original: tuple[int, int],
                          categories: CategoryTable, options: PostprocessOptions) -> list[Instance]:
    """The instances of segment_instances, without the map."""
    return segment_instances(class_logits, mask_logits, padded, valid, original, categories, options)[0]


# --- panoptic and semantic checkpoints ------------------------------------------------------------
#
# Both need, for every pixel of the original image, a decision over all queries. Holding all
# (Q, H0, W0) upsampled masks would take GBs on large photos, so the masks are upsampled in
# stripes of output rows: bilinear interpolation is separable, so each stripe is computed exactly
# from the few low-resolution rows it depends on.

STRIPE_BYTES = 64 * 1024 * 1024

# Thing classes of the label sets Mask2Former ships (COCO's 80 things, Cityscapes' 8); everything
# else is stuff. ADE20K/Mapillary things that are not in these lists count as stuff.
CITYSCAPES_THINGS = frozenset({"person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"})


def is_thing(name: str) -> bool:
    n = name.strip().lower()
    return n in COCO_NAMES or n in CITYSCAPES_THINGS


def _crop_to_valid(mask_logits: torch.Tensor, padded: tuple[int, int], valid: tuple[int, int]) -> torch.Tensor:
    """(Q, h, w) logits -> (Q, vh, vw): bilinear to the padded input size, padding cropped."""
    x = F.interpolate(mask_logits[None].float(), size=padded, mode="bilinear", align_corners=False)[0]
    return x[:, : valid[0], : valid[1]]


def _source_rows(out_rows: torch.Tensor, in_h: int, out_h: int, device: Optional[torch.device] = None):
    """Bilinear (align_corners=False) source rows and weights for output rows, as torch computes them.

    out_rows: (n,) int64 on the CPU. Computed in float64 there (a few thousand values), then moved to
    device (default: the CPU): MPS has no float64, and the rows are the same wherever the logits are.
    Returns y0, y1 (n,) int64 and w1 (n,) float32 on device."""
    scale = in_h / out_h
    src = ((out_rows.cpu().double() + 0.5) * scale - 0.5).clamp(min=0)
    y0 = src.floor().long().clamp(max=in_h - 1)
    y1 = (y0 + 1).clamp(max=in_h - 1)
    w1 = (src - y0.double()).float()
    dev = device or out_rows.device
    return y0.to(dev), y1.to(dev), w1.to(dev)


def upsample_stripes(logits: torch.Tensor, size: tuple[int, int], stripe_rows: Optional[int] = None):
    """Yield (r0, r1, stripe) with stripe = rows r0:r1 of the bilinear upsampling of logits
    (Q, h, w) to size (H0, W0), i.e. (Q, r1 - r0, W0) float32, stripes covering all rows."""
    q, h, w = logits.shape
    h0, w0 = size
    if stripe_rows is None:
        stripe_rows = max(1, STRIPE_BYTES // max(1, q * w0 * 4 * 3))
    # width first, at the low resolution (cheap): (Q, h, W0)
    wide = F.interpolate(logits[None].float(), size=(h, w0), mode="bilinear", align_corners=False)[0]
    for r0 in range(0, h0, stripe_rows):
        r1 = min(h0, r0 + stripe_rows)
        y0, y1, w1 = _source_rows(torch.arange(r0, r1), h, h0, logits.device)
        w1 = w1.to(wide.device).view(1, -1, 1)
        yield r0, r1, wide[:, y0] * (1 - w1) + wide[:, y1] * w1


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


@dataclass(frozen=True)
class PanopticOptions:
    """The original panoptic inference's thresholds."""

    object_threshold: float = 0.8
    overlap_threshold: float = 0.8


def panoptic_from_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded: tuple[int, int],
                         valid: tuple[int, int], original: tuple[int, int], categories: CategoryTable,
                         options: PanopticOptions = PanopticOptions()):
    """The original panoptic inference at the original resolution.

    Keeps queries whose best class is not "no object" with probability > object_threshold;
    each pixel goes to the query maximising prob x sigmoid(mask); a segment survives when its
    won area is >= overlap_threshold of its own (sigmoid >= 0.5) area; stuff is merged per class.
    Returns ((H0, W0) uint16 map of segment ids, 0 = void, list of Segment records).
    """
    probs = class_logits.float().softmax(-1)
    scores, labels = probs.max(-1)
    num_c = class_logits.shape[-1] - 1
    keep = (labels != num_c) & (scores > options.object_threshold)
    h0, w0 = original
    if not bool(keep.any()):
        return np.zeros((h0, w0), np.uint16), []
    k_scores, k_labels = scores[keep], labels[keep]
    cropped = _crop_to_valid(mask_logits[keep], padded, valid)
    winner = torch.empty((h0, w0), dtype=torch.long)
    confident = torch.empty((h0, w0), dtype=torch.bool)
    own_area = torch.zeros(len(k_scores), dtype=torch.long)
    for r0, r1, stripe in upsample_stripes(cropped, original):
        sig = stripe.sigmoid()
        arg = (k_scores.view(-1, 1, 1) * sig).argmax(0)
        winner[r0:r1] = arg.cpu()
        confident[r0:r1] = (sig.gather(0, arg[None])[0] >= 0.5).cpu()
        own_area += (sig >= 0.5).flatten(1).sum(1).cpu()
    won = torch.bincount(winner.flatten(), minlength=len(k_scores))
    final = torch.bincount(winner[confident].flatten(), minlength=len(k_scores))
    seg_of_query = torch.zeros(len(k_scores), dtype=torch.long)  # 0 = void
    stuff_ids: dict[int, int] = {}
    segs_meta = []
    next_id = 1
    for k in range(len(k_scores)):
        lab = int(k_labels[k])
        if not (won[k] > 0 and own_area[k] > 0 and final[k] > 0):
            continue
        if float(won[k]) / float(own_area[k]) < options.overlap_threshold:
            continue
        thing = is_thing(categories[lab].name)
        if not thing and lab in stuff_ids:
            seg_of_query[k] = stuff_ids[lab]
            continue
        if not thing:
            stuff_ids[lab] = next_id
        seg_of_query[k] = next_id
        segs_meta.append((next_id, lab, thing, float(k_scores[k])))
        next_id += 1
    seg_map = torch.where(confident, seg_of_query[winner], torch.zeros_like(winner)).numpy().astype(np.uint16)
    stats = _region_stats(seg_map, [m[0] for m in segs_meta])
    segments = []
    for sid, lab, thing, score in segs_meta:
        if sid not in stats:
            continue
        area, bbox = stats[sid]
        cat = categories[lab]
        segments.append(Segment(id=sid, label=cat.name, category_id=cat.id, label_index=lab, isthing=thing,
                                score=score, area=area, bbox=bbox))
    return seg_map, segments


def semantic_from_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded: tuple[int, int],
                         valid: tuple[int, int], original: tuple[int, int], categories: CategoryTable):
    """The original semantic inference: per pixel, argmax over classes of
    sum_q softmax(class)[q, c] x sigmoid(mask)[q] ("no object" dropped), at the original size.
    Returns ((H0, W0) map of category ids (uint8 when they fit, else uint16), list of Segment
    records, one per class present, score None)."""
    probs = class_logits.float().softmax(-1)[:, :-1]  # (Q, C)
    cropped = _crop_to_valid(mask_logits, padded, valid)
    ids = torch.tensor([c.id for c in categories.categories])
    h0, w0 = original
    dtype = np.uint8 if int(ids.max()) < 256 else np.uint16
    out = np.zeros((h0, w0), dtype)
    rows = max(1, STRIPE_BYTES // max(1, (cropped.shape[0] + probs.shape[1]) * w0 * 4 * 2))
    for r0, r1, stripe in upsample_stripes(cropped, original, stripe_rows=rows):
        sem = torch.einsum("qc,qhw->chw", probs, stripe.sigmoid())
        out[r0:r1] = ids[sem.argmax(0).cpu()].numpy().astype(dtype)
    present = [int(v) for v in np.unique(out)]
    stats = _region_stats(out, present)
    segments = []
    for v in present:
        cat = categories.by_id(v)
        area, bbox = stats[v]
        segments.append(Segment(id=v, label=cat.name, category_id=v, label_index=cat.index, isthing=False,
                                score=None, area=area, bbox=bbox))
    return out, segments
