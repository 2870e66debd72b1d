"""A tile's candidates (tile_parts): the paper's candidate rule per tile, kept down to PART_FLOOR
x the threshold, each part a tight crop encoded as RLE, never a full-size mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
import time

import numpy as np
import torch
from pycocotools import mask as mask_utils
from m2f_cli.postprocess.instance import PostprocessOptions, top_candidates
from m2f_cli.postprocess.sampling import MaskSampler
from m2f_cli.postprocess.upsample import crop_to_valid
from m2f_cli.tiling.grid import Box


# parts are kept down to this fraction of the score threshold: the half of an object that a tile
# sees cut by its border scores lower than the whole; the merged object must still pass it.
PART_FLOOR = 0.5


@dataclass
class Part:
    """One candidate instance of one tile (or of the full pass: tile -1).

    label: model class index; score: class prob x mean mask probability (segment_instances' rule);
    r0, c0: where its mask crop starts in the original image; rle: the crop's mask, (h, w) tight
    around its pixels, as pycocotools RLE (bytes counts); area: mask pixels; class_prob: the class
    probability in score (0: unknown), so that tiling/merge.py can recompute the score of joined parts.
    """

    label: int
    score: float
    tile: int
    r0: int
    c0: int
    rle: dict
    area: int
    class_prob: float = 0.0

    @property
    def box(self) -> Box:
        h, w = self.rle["size"]
        return Box(self.r0, self.c0, self.r0 + h, self.c0 + w)

    def mask(self) -> np.ndarray:
        """(h, w) bool crop."""
        return mask_utils.decode(self.rle).astype(bool)

    @classmethod
    def of_mask(cls, label: int, score: float, tile: int, mask: np.ndarray, class_prob: float = 0.0) -> "Part":
        """The part whose pixels are those of a full-image bool mask (one at least): its tight crop."""
        r0, c0, crop = _tight(mask)
        return cls(label, score, tile, r0, c0, _encode(crop), int(crop.sum()), class_prob)


def _encode(b: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(b.astype(np.uint8)))


def _tight(b: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(dr, dc, crop): b cropped to the rows and columns holding a True pixel (b has one)."""
    rows = np.flatnonzero(b.any(1))
    cols = np.flatnonzero(b.any(0))
    return int(rows[0]), int(cols[0]), b[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def tile_parts(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded: tuple[int, int],
               valid: tuple[int, int], box: Box, tile: int, sampler: MaskSampler,
               options: PostprocessOptions) -> list[Part]:
    """One tile's candidates as Parts in original-image coordinates.

    class_logits: (Q, C+1); mask_logits: (Q, h, w) at 1/4 of the padded input; valid: unpadded
    part of the input; box: where the tile lies (its shape is the sampler's output size).
    The rule of postprocess.segment_instances (kept equal by tests/test_tiling.py), with the
    threshold lowered to PART_FLOOR x threshold; parts with an empty mask are dropped.
    """
    floor = max(options.threshold * PART_FLOOR, 0.0)
    top_p, labels, queries = top_candidates(class_logits, options, floor)
    if top_p.numel() == 0:
        return []
    low = crop_to_valid(mask_logits[sorted(set(queries))], padded, valid)
    row = {q: j for j, q in enumerate(sorted(set(queries)))}
    masks: dict[int, Optional[tuple[float, int, int, dict, int]]] = {}
    for q, j in row.items():
        m = sampler.measure(low[j])
        if m is None or not m.area:
            masks[q] = None
            continue
        dr, dc, crop = _tight(m.binary)
        masks[q] = (m.score, box.r0 + m.r0 + dr, box.c0 + m.c0 + dc, _encode(crop), m.area)
    out = []
    for p, lab, q in zip(top_p.tolist(), labels, queries):
        m = masks[q]
        if m is None:
            continue
        s = p * m[0]
        if s >= floor:
            out.append(Part(lab, s, tile, m[1], m[2], m[3], m[4], p))
    return out


def _forward(segmenter, x: torch.Tensor):
    t0 = time.perf_counter()
    cls, masks = segmenter.predictor(x.to(segmenter.device, non_blocking=True))
    segmenter.times.forward_s += time.perf_counter() - t0
    return cls, masks
