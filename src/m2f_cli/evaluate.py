"""``m2f eval``: pycocotools' COCOeval over a ground-truth file and a results file; ``Agreement``:
how far two runs of the same images agree (an optimised path against the plain one)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from typing import Optional

STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
STAT_LABELS = (
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
)


class EvalError(ValueError):
    """Ground truth and predictions do not fit together; the message says how."""


def _load_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise EvalError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except ValueError as e:
        raise EvalError(f"{path}: {what} is not valid JSON ({e})") from None


def evaluate(gt_path: str, pred_path: str, iou_type: str = "segm",
             img_ids: Optional[list[int]] = None) -> dict[str, float]:
    """Run COCOeval and return the 12 standard numbers by name (AP, AP50, ..., ARl)."""
    if iou_type not in ("segm", "bbox"):
        raise EvalError(f"--iou-type {iou_type!r}: expected segm or bbox")
    gt = _load_json(gt_path, "ground truth")
    preds = _load_json(pred_path, "predictions")
    if not isinstance(gt, dict) or "images" not in gt or "annotations" not in gt:
        raise EvalError(f"{gt_path}: not a COCO annotation file (needs images and annotations)")
    if not isinstance(preds, list):
        raise EvalError(f"{pred_path}: not a COCO results list")
    gt_images = {int(i["id"]) for i in gt["images"]}
    gt_cats = {int(c["id"]) for c in gt.get("categories", [])}
    missing = sorted({int(p["image_id"]) for p in preds} - gt_images)
    if missing:
        raise EvalError(f"{pred_path}: {len(missing)} image ids are not in {gt_path} (e.g. {missing[:5]}); "
                        f"run m2f segment with --coco-annotations {gt_path}")
    bad_cats = sorted({int(p["category_id"]) for p in preds} - gt_cats)
    if bad_cats:
        raise EvalError(f"{pred_path}: category ids {bad_cats[:10]} are not in {gt_path}'s categories")
    key = "segmentation" if iou_type == "segm" else "bbox"
    if preds and key not in preds[0]:
        raise EvalError(f"{pred_path}: records have no {key!r}; "
                        f"{'use predictions_bbox.json for --iou-type bbox' if key == 'bbox' else 'not segm results'}")

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not preds:
            return {n: 0.0 for n in STAT_NAMES}
        coco_dt = coco_gt.loadRes(preds)
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if img_ids is not None:
            ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {n: float(v) for n, v in zip(STAT_NAMES, ev.stats)}


def format_table(stats: dict[str, float]) -> str:
    return "\n".join(f" {label} = {stats[name]:.3f}" for name, label in zip(STAT_NAMES, STAT_LABELS))


@dataclass
class Agreement:
    """How far instance results of one image set (b) agree with reference results (a), e.g. bf16
    against float32 on the same model. Instances are matched one to one, same class, greedily by
    descending mask IoU (pycocotools' RLE IoU); ``pixels`` compares the class drawn at each pixel of
    the instance maps (instance ids may be renumbered when scores swap ranks)."""

    instances_a: int = 0
    instances_b: int = 0
    matched: int = 0                       # pairs with IoU >= the match threshold
    ious: list = field(default_factory=list)
    score_diffs: list = field(default_factory=list)
    pixels: int = 0
    pixels_equal: int = 0

    @property
    def matched_fraction(self) -> float:
        return self.matched / max(1, max(self.instances_a, self.instances_b))

    @property
    def pixel_agreement(self) -> float:
        return self.pixels_equal / max(1, self.pixels)

    def add(self, a, b, iou_threshold: float = 0.5) -> None:
        """Add one image: a and b are ImageResults of the same image (instance task)."""
        import numpy as np
        from pycocotools import mask as mask_utils
        self.instances_a += len(a.instances)
        self.instances_b += len(b.instances)
        if a.instances and b.instances:
            iou = mask_utils.iou([i.rle for i in a.instances], [i.rle for i in b.instances],
                                 [0] * len(b.instances))
            same = np.array([[x.label_index == y.label_index for y in b.instances] for x in a.instances])
            iou = np.where(same, iou, 0.0)
            while iou.size and iou.max() >= iou_threshold:
                i, j = np.unravel_index(int(iou.argmax()), iou.shape)
                self.matched += 1
                self.ious.append(float(iou[i, j]))
                self.score_diffs.append(abs(a.instances[i].score - b.instances[j].score))
                iou[i, :] = -1.0
                iou[:, j] = -1.0
        self.pixels += a.label_map.size
        self.pixels_equal += int((_class_map(a) == _class_map(b)).sum())

    def summary(self) -> dict:
        import numpy as np
        return {"instances_a": self.instances_a, "instances_b": self.instances_b, "matched": self.matched,
                "matched_fraction": round(self.matched_fraction, 4),
                "mean_iou": round(float(np.mean(self.ious)), 4) if self.ious else None,
                "min_iou": round(float(np.min(self.ious)), 4) if self.ious else None,
                "max_score_diff": round(float(np.max(self.score_diffs)), 5) if self.score_diffs else None,
                "pixel_agreement": round(self.pixel_agreement, 5)}


def _class_map(result):
    """(H, W) model class index drawn at each pixel, -1 where no instance is drawn."""
    import numpy as np
    lut = np.full(len(result.instances) + 1, -1, dtype=np.int32)
    for inst in result.instances:
        lut[inst.id] = inst.label_index
    m = result.label_map.astype(np.int64)
    return np.where(m < len(lut), lut[np.minimum(m, len(lut) - 1)], -1)
