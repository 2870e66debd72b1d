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
whose size bounds memory whatever the image size, and each only where it can be positive
(sampling.py; a mask scattered over a large image only on its active cells, cells.py). Its RLE is
built from that window or those cells (masks.Measured.rle), never from a full-size mask; only the
masks of the queries drawn in the instance map are kept, 1 bit a pixel (_Packed, cells.PackedCells),
and the map is painted from them at the end, in ascending score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from m2f_cli.model.categories import CategoryTable
from m2f_cli.postprocess.cells import PackedCells, merge_cell_map, new_cell_map
from m2f_cli.postprocess.masks import Measured, rle_bbox, window_rle
from m2f_cli.postprocess.sampling import MaskSampler
from m2f_cli.postprocess.upsample import crop_to_valid
from m2f_cli.records import Instance

# Bytes of float32 full-resolution mask logits processed at once.
CHUNK_BYTES = 64 * 1024 * 1024


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
    def of(cls, m: Measured) -> Union["_Packed", PackedCells]:
        """m's mask packed: its window's bits, or its cells' (cells.CellMask.packed)."""
        if m.cells is not None:
            return m.cells.packed()
        return cls(m.r0, m.c0, m.dense.shape, np.packbits(m.dense, axis=None))

    def paint(self, imap: np.ndarray, value: int) -> None:
        """Set the mask's pixels of imap to value."""
        b = np.unpackbits(self.bits, count=self.shape[0] * self.shape[1]).view(np.bool_).reshape(self.shape)
        region = imap[self.r0:self.r0 + self.shape[0], self.c0:self.c0 + self.shape[1]]
        np.copyto(region, np.uint16(value), where=b)


# query -> (tight [x, y, w, h] box, area, RLE) of its mask at the original size
Geometry = dict[int, tuple[tuple[int, int, int, int], int, dict]]


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
    mask_score, geometry, windows = _measure_queries(mask_logits, padded, valid, original, best_p,
                                                     options.map_threshold)
    cand = []
    for rank, (p, lab, q) in enumerate(zip(p_list, labels, queries)):
        s = p * mask_score[q]
        if s >= options.threshold:
            cand.append((-s, rank, s, lab, q))
    cand.sort()
    out: list[Instance] = []
    for n, (_, _, s, lab, q) in enumerate(cand, start=1):
        cat = categories[lab]
        bbox, area, rle = geometry[q]
        out.append(Instance(id=n, label=cat.name, category_id=cat.id, label_index=lab, score=float(s),
                            bbox=bbox, area=area, rle=rle))
    return out, _paint(out, cand, windows, original, options.map_threshold)


def _measure_queries(mask_logits: torch.Tensor, padded: tuple[int, int], valid: tuple[int, int],
                     original: tuple[int, int], best_p: dict[int, float], map_threshold: float
                     ) -> tuple[dict[int, float], Geometry, dict[int, Union[_Packed, PackedCells]]]:
    """Every query of best_p (query -> its best class probability) measured at the original
    (H0, W0) size, in chunks of CHUNK_BYTES of valid-area logits. mask_logits, padded, valid: as
    segment_instances. Returns query -> mask score, query -> Geometry, and the packed windows of
    the queries whose best instance reaches map_threshold (the ones the map may draw)."""
    uniq = sorted(best_p)
    sampler = MaskSampler(valid, original, mask_logits.device)
    mask_score: dict[int, float] = {}
    geometry: Geometry = {}
    windows: dict[int, Union[_Packed, PackedCells]] = {}
    empty = window_rle(np.zeros((0, 0), np.bool_), 0, 0, original)
    per_chunk = max(1, CHUNK_BYTES // max(1, valid[0] * valid[1] * 4))
    for start in range(0, len(uniq), per_chunk):
        qs = uniq[start:start + per_chunk]
        low = crop_to_valid(mask_logits[qs], padded, valid)  # (n, vh, vw), cheap
        for j, q in enumerate(qs):
            m = sampler.measure(low[j])
            if m is None:
                mask_score[q], geometry[q] = 0.0, ((0, 0, 0, 0), 0, empty)
                continue
            mask_score[q] = m.score
            rle = m.rle(original)
            geometry[q] = (rle_bbox(rle), m.area, rle)
            if m.area and best_p[q] * m.score >= map_threshold:
                windows[q] = _Packed.of(m)
    return mask_score, geometry, windows


def _paint(out: list[Instance], cand: list[tuple], windows: dict[int, Union[_Packed, PackedCells]], original: tuple[int, int],
           map_threshold: float) -> np.ndarray:
    """The (H0, W0) uint16 instance map: out[i] (id i + 1) is candidate cand[i], (-score, rank,
    score, label, query), in descending score; windows (emptied here): query -> its packed window."""
    imap = np.zeros(original, np.uint16)
    cell_map: Optional[np.ndarray] = None  # masks held as cells paint into a map of their own
    grid = None
    # Paint in ascending score so the best instance owns each pixel; a query listed with several
    # classes is drawn once, as its best-scoring instance (its first in this order).
    first: dict[int, int] = {}                             # query -> id of its best instance
    for inst, (_, _, s, _, q) in zip(out, cand):
        if s >= map_threshold and q in windows:
            first.setdefault(q, inst.id)
    for inst, (_, _, s, _, q) in zip(reversed(out), reversed(cand)):
        if first.get(q) == inst.id:
            w = windows.pop(q)
            if isinstance(w, PackedCells):
                grid = w.grid
                cell_map = new_cell_map(grid) if cell_map is None else cell_map
                w.paint(cell_map, inst.id)
            else:
                w.paint(imap, inst.id)
    return imap if cell_map is None else merge_cell_map(grid, cell_map, imap)


def instances_from_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                          padded: tuple[int, int], valid: tuple[int, int], original: tuple[int, int],
                          categories: CategoryTable, options: PostprocessOptions) -> list[Instance]:
    """The instances of segment_instances, without the map."""
    return segment_instances(class_logits, mask_logits, padded, valid, original, categories, options)[0]
