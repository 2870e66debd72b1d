"""Stage 5 for semantic checkpoints: the original semantic inference, turned into a category-id
map at the original size and one Segment record per class present (docs/panoptic-semantic.md).
"""

from __future__ import annotations

import numpy as np
import torch

from m2f_cli.model.categories import CategoryTable
from m2f_cli.postprocess.masks import _region_stats
from m2f_cli.postprocess.upsample import STRIPE_BYTES, crop_to_valid, upsample_stripes
from m2f_cli.records import Segment


def semantic_from_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded: tuple[int, int],
                         valid: tuple[int, int], original: tuple[int, int], categories: CategoryTable):
    """The original semantic inference: per pixel, argmax over classes of
    sum_q softmax(class)[q, c] x sigmoid(mask)[q] ("no object" dropped), at the original size.
    Returns ((H0, W0) map of category ids (uint8 when they fit, else uint16), list of Segment
    records, one per class present, score None)."""
    probs = class_logits.float().softmax(-1)[:, :-1]  # (Q, C)
    cropped = crop_to_valid(mask_logits, padded, valid)
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
