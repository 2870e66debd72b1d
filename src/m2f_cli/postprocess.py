"""Stage 5: the original Mask2Former instance inference, turned into our Instance records.

For one image (REFERENCE.md, "Instance inference"):
1. mask logits (Q, h/4, w/4) -> bilinear (align_corners=False) to the padded model input ->
   crop the padding -> bilinear to the ORIGINAL (H0, W0);
2. class probabilities = softmax over C+1, "no object" dropped; top-k over all Q x C pairs
   (a query may appear with several classes);
3. binary mask = logit > 0; score = class prob x mean sigmoid inside the binary mask;
4. tight boxes from the binary masks.

Optimised but exact: a candidate whose class probability is already below the score threshold
cannot pass it (the mask score is <= 1), so only the surviving queries are upsampled, in chunks
whose size bounds memory whatever the image size. Masks are computed transposed (W0, H0) so
that their transpose is the Fortran-ordered (H0, W0) array pycocotools encodes without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from .categories import CategoryTable
from .records import Instance

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


def _upsample_t(logits_t: torch.Tensor, padded: tuple[int, int], valid: tuple[int, int],
                original: tuple[int, int]) -> torch.Tensor:
    """logits_t: (n, w4, h4) transposed mask logits -> (n, W0, H0) float32 transposed logits."""
    ph, pw = padded
    vh, vw = valid
    h0, w0 = original
    x = F.interpolate(logits_t[None].float(), size=(pw, ph), mode="bilinear", align_corners=False)[0]
    if (vh, vw) != (ph, pw):
        x = x[:, :vw, :vh]
    return F.interpolate(x[None], size=(w0, h0), mode="bilinear", align_corners=False)[0]


def _bbox_t(bin_t: torch.Tensor) -> tuple[int, int, int, int]:
    """bin_t: (W0, H0) bool -> tight [x, y, w, h]; zeros when empty."""
    cols = torch.nonzero(bin_t.any(dim=1)).flatten()  # x positions
    if cols.numel() == 0:
        return (0, 0, 0, 0)
    rows = torch.nonzero(bin_t.any(dim=0)).flatten()  # y positions
    x0, x1 = int(cols[0]), int(cols[-1])
    y0, y1 = int(rows[0]), int(rows[-1])
    return (x0, y0, x1 - x0 + 1, y1 - y0 + 1)


def encode_rle(bin_t: np.ndarray) -> dict:
    """bin_t: (W0, H0) bool/uint8 C-ordered (a transposed mask) -> COCO RLE of the (H0, W0) mask."""
    f = bin_t.view(np.uint8).T if bin_t.dtype == np.bool_ else bin_t.T
    rle = mask_utils.encode(np.asfortranarray(f))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"]}


def instances_from_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                          padded: tuple[int, int], valid: tuple[int, int], original: tuple[int, int],
                          categories: CategoryTable, options: PostprocessOptions) -> list[Instance]:
    """One image's instances, descending score, ids 1..N.

    class_logits: (Q, C+1) any float dtype; mask_logits: (Q, h, w) at 1/4 of the padded input.
    padded: (Hp, Wp) model input size; valid: (h, w) unpadded part; original: (H0, W0).
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
    alive = top_p >= max(options.threshold, 0.0)
    if options.keep is not None:
        alive &= top_p >= 0
    top_p, top_i = top_p[alive].cpu(), top_i[alive].cpu()
    if top_p.numel() == 0:
        return []
    labels = (top_i % num_c).tolist()
    queries = (top_i // num_c).tolist()
    uniq = sorted(set(queries))

    h0, w0 = original
    per_chunk = max(1, CHUNK_BYTES // max(1, h0 * w0 * 4))
    mask_score: dict[int, float] = {}
    geometry: dict[int, tuple[tuple[int, int, int, int], int, dict]] = {}
    lt = mask_logits.transpose(1, 2)  # (Q, w, h)
    for start in range(0, len(uniq), per_chunk):
        qs = uniq[start:start + per_chunk]
        up = _upsample_t(lt[qs], padded, valid, original)  # (n, W0, H0)
        binary = up > 0
        sig_sum = (up.sigmoid() * binary).flatten(1).sum(1)
        area = binary.flatten(1).sum(1)
        scores = (sig_sum / (area + 1e-6)).tolist()
        areas = area.tolist()
        binary_cpu = binary.cpu()
        del up, binary
        for j, q in enumerate(qs):
            mask_score[q] = scores[j]
            b = binary_cpu[j]
            geometry[q] = (_bbox_t(b), int(areas[j]), encode_rle(b.numpy()))

    cand = []
    for rank, (p, lab, q) in enumerate(zip(top_p.tolist(), labels, queries)):
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
    return out


def instance_map(instances: Sequence[Instance], height: int, width: int, threshold: float) -> np.ndarray:
    """(H, W) uint16: 0 background, k = instance id k; each pixel owned by the highest-scoring
    instance covering it. Only instances with score >= threshold are drawn."""
    out = np.zeros((height, width), np.uint16)
    drawn = [i for i in instances if i.score >= threshold and i.area > 0]
    # Paint lowest score first so higher scores overwrite: the best instance owns each pixel.
    for inst in sorted(drawn, key=lambda i: i.id, reverse=True):
        m = mask_utils.decode(inst.rle).astype(bool)
        out[m] = inst.id
    return out
