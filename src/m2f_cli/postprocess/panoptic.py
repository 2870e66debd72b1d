"""Stage 5 for panoptic checkpoints: the original panoptic inference, turned into our Segment
records and a segment-id map at the original size (docs/panoptic-semantic.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from m2f_cli.model.categories import COCO_NAMES, CategoryTable
from m2f_cli.postprocess.masks import _region_stats
from m2f_cli.postprocess.upsample import crop_to_valid, upsample_stripes
from m2f_cli.records import Segment

# Thing classes of the label sets Mask2Former ships (COCO's 80 things, Cityscapes' 8); everything
# else is stuff. ADE20K/Mapillary things that are not in these lists count as stuff.
CITYSCAPES_THINGS = frozenset({"person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"})


def is_thing(name: str) -> bool:
    n = name.strip().lower()
    return n in COCO_NAMES or n in CITYSCAPES_THINGS


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
    cropped = crop_to_valid(mask_logits[keep], padded, valid)
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
