"""Which evaluation ``m2f eval --gt`` asks for, told from the ground truth itself:

- a folder: semantic label PNGs -> eval_semantic (mIoU);
- a COCO panoptic JSON (annotations with segments_info; its PNGs in the folder beside it) ->
  eval_panoptic (PQ);
- any other JSON: a COCO instance annotation file -> evaluate (pycocotools' COCOeval).
"""

from __future__ import annotations

import os
from typing import Optional, Union

from m2f_cli.outputs.coco_panoptic import is_panoptic_doc
from m2f_cli.tools.eval_panoptic import PanopticResult, evaluate_panoptic
from m2f_cli.tools.eval_semantic import SemanticResult, evaluate_semantic
from m2f_cli.tools.evaluate import load_json


def ground_truth_kind(gt: str) -> str:
    """"semantic", "panoptic" or "instance"."""
    if os.path.isdir(gt):
        return "semantic"
    if os.path.isfile(gt) and is_panoptic_doc(load_json(gt, "ground truth")):
        return "panoptic"
    return "instance"


def evaluate_segmentation(kind: str, gt: str, pred: str, all_gt_images: bool = False,
                          gt_folder: Optional[str] = None, pred_folder: Optional[str] = None,
                          reduce_zero_label: bool = False) -> Union[PanopticResult, SemanticResult]:
    """The panoptic or semantic evaluation of pred against gt (EvalError when they do not fit)."""
    if kind == "panoptic":
        return evaluate_panoptic(gt, pred, gt_folder, pred_folder, all_gt_images)
    return evaluate_semantic(gt, pred, reduce_zero_label, all_gt_images)
