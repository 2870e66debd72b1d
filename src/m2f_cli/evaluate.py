"""``m2f eval``: pycocotools' COCOeval over a ground-truth file and a results file."""

from __future__ import annotations

import contextlib
import io
import json
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
