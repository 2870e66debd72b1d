"""``m2f eval``: pycocotools' COCOeval over a ground-truth file and a results file; ``Agreement``:
how far two runs of the same images agree (an optimised path against the plain one)."""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Optional
from m2f_cli.errors import EvalError

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


def load_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise EvalError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except ValueError as e:
        raise EvalError(f"{path}: {what} is not valid JSON ({e})") from None


@dataclass
class EvalResult:
    """stats: the 12 numbers by name; notes: what was matched, left out or counted, one line each."""

    stats: dict
    notes: list = field(default_factory=list)
    images: int = 0


@dataclass
class PerClassResult:
    """A segmentation metric's result (eval_panoptic.py, eval_semantic.py): stats, its headline
    numbers in [0, 1]; per_class, one row per category; notes, one line each; images counted."""

    stats: dict
    per_class: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    images: int = 0

    def to_json(self) -> dict:
        return {**self.stats, "images": self.images, "per_class": self.per_class}


def pct(v: Optional[float]) -> str:
    """A share in [0, 1] as a 5-wide percentage for the tables; "-" for None."""
    return "    -" if v is None else f"{100 * v:5.1f}"


def _run_images(pred_path: str, images_path: Optional[str]) -> Optional[list[dict]]:
    """The run's images ({id, file_name, width, height}) from the images.json next to the
    predictions (or images_path), or None when there is none."""
    path = images_path or os.path.join(os.path.dirname(os.path.abspath(pred_path)),
                                       os.path.basename(pred_path).replace("predictions_bbox", "images")
                                       .replace("predictions", "images"))
    if images_path is None and (path == os.path.abspath(pred_path) or not os.path.isfile(path)):
        return None
    doc = load_json(path, "the run's images")
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise EvalError(f"{path}: not an images.json written by m2f (needs images)")
    return doc["images"]


def match_by_name(run_images: list[dict], gt_images: list[dict]) -> dict[int, dict]:
    """Run image id -> ground-truth image, by file name: the relative path first, then the base
    name where it is unique in the ground truth (the rule --coco-annotations uses). A video frame
    (an entry with "video" and "frame") matches the ground-truth image with the same frame index
    of the same video (by path, else by base name where unique), before any file name."""
    by_path = {str(g["file_name"]).replace("\\", "/"): g for g in gt_images}
    frames = _frames_index(gt_images)
    base: dict[str, list] = {}
    for g in gt_images:
        base.setdefault(os.path.basename(str(g["file_name"]).replace("\\", "/")), []).append(g)
    out = {}
    for im in run_images:
        name = str(im["file_name"]).replace("\\", "/")
        g = _frame_match(im, frames) if frames else None
        g = g if g is not None else by_path.get(name)
        if g is None and len(base.get(os.path.basename(name), [])) == 1:
            g = base[os.path.basename(name)][0]
        if g is not None:
            out[int(im["id"])] = g
    return out


def _frames_index(gt_images: list[dict]) -> dict:
    """(video path or base name, frame index) -> ground-truth image, for entries with both keys
    (base names only where unique)."""
    out: dict = {}
    bases: dict = {}
    for g in gt_images:
        if g.get("video") is None or g.get("frame") is None:
            continue
        video = str(g["video"]).replace("\\", "/")
        out[("path", video, int(g["frame"]))] = g
        bases.setdefault((os.path.basename(video), int(g["frame"])), []).append(g)
    out.update({("base", *k): v[0] for k, v in bases.items() if len(v) == 1})
    return out


def _frame_match(im: dict, frames: dict) -> Optional[dict]:
    if im.get("video") is None or im.get("frame") is None:
        return None
    video, k = str(im["video"]).replace("\\", "/"), int(im["frame"])
    return frames.get(("path", video, k)) or frames.get(("base", os.path.basename(video), k))


def evaluate(gt_path: str, pred_path: str, iou_type: str = "segm",
             img_ids: Optional[list[int]] = None) -> dict[str, float]:
    """Run COCOeval and return the 12 standard numbers by name (AP, AP50, ..., ARl)."""
    return evaluate_run(gt_path, pred_path, iou_type, img_ids=img_ids).stats


def evaluate_run(gt_path: str, pred_path: str, iou_type: str = "segm", images_path: Optional[str] = None,
                 all_gt_images: bool = False, img_ids: Optional[list[int]] = None) -> EvalResult:
    """COCOeval of a run's predictions against a ground truth, with the checks that make its
    numbers mean something (each failing one raises EvalError naming the problem):

    - images: with the run's images.json (next to the predictions, or images_path), predictions
      are matched to ground-truth images by file name, so a run made without --coco-annotations
      evaluates against a real annotation file; without it, image ids must be the ground truth's.
      Nothing matching is an error. Only the run's images are evaluated (its images without a
      detection count as misses) unless all_gt_images; the notes say how many were left out.
    - sizes: a mask whose size differs from its ground-truth image's is an error.
    - categories: no category in common is an error; detections of other categories are ignored.
    - a ground truth with no annotation on the evaluated images is an error (COCOeval gives -1).
    """
    if iou_type not in ("segm", "bbox"):
        raise EvalError(f"--iou-type {iou_type!r}: expected segm or bbox")
    gt = load_json(gt_path, "ground truth")
    preds = load_json(pred_path, "predictions")
    if not isinstance(gt, dict) or not isinstance(gt.get("images"), list) or "annotations" not in gt:
        raise EvalError(f"{gt_path}: not a COCO annotation file (needs images and annotations)")
    if not isinstance(preds, list):
        raise EvalError(f"{pred_path}: not a COCO results list")
    key = "segmentation" if iou_type == "segm" else "bbox"
    if preds and key not in preds[0]:
        raise EvalError(f"{pred_path}: records have no {key!r}; "
                        f"{'use predictions_bbox.json for --iou-type bbox' if key == 'bbox' else 'not segm results'}")
    notes: list[str] = []
    gt_by_id = {int(i["id"]): i for i in gt["images"]}
    run_images = _run_images(pred_path, images_path)
    preds, evaluated = _align_images(preds, run_images, gt, gt_by_id, gt_path, pred_path, notes)
    if img_ids is not None:
        evaluated = [i for i in evaluated if i in set(img_ids)]
    if all_gt_images:
        missing = len(gt_by_id) - len(evaluated)
        evaluated = sorted(gt_by_id)
        if missing:
            notes.append(f"{missing} ground-truth images not in this run: counted as misses (--all-gt-images)")
    _check_sizes(preds, gt_by_id, pred_path, gt_path)
    preds = _check_categories(preds, gt, gt_path, pred_path, notes)
    ev_set = set(evaluated)
    if not any(int(a["image_id"]) in ev_set for a in gt["annotations"]):
        raise EvalError(f"{gt_path}: no annotation on the {len(ev_set)} evaluated images; nothing to score")
    stats = _cocoeval(gt, preds, iou_type, evaluated)
    return EvalResult(stats, notes, len(evaluated))


def _align_images(preds, run_images, gt, gt_by_id, gt_path, pred_path, notes) -> tuple[list, list[int]]:
    """Predictions with ground-truth image ids, and the ids of the images to evaluate."""
    if run_images is not None:
        match = match_by_name(run_images, gt["images"])
        if not match:
            raise EvalError(f"{pred_path}: none of the run's {len(run_images)} images (by file name in its "
                            f"images.json) is in {gt_path}; is it the right ground truth?")
        unmatched = len(run_images) - len(match)
        if unmatched:
            notes.append(f"{unmatched} of the run's images are not in the ground truth: left out")
        for im in run_images:
            g = match.get(int(im["id"]))
            if g is not None and (im.get("width"), im.get("height")) != (g.get("width"), g.get("height")) \
                    and g.get("width") is not None:
                raise EvalError(f"{im['file_name']}: the run saw it as {im.get('width')}x{im.get('height')}, "
                                f"{gt_path} says {g.get('width')}x{g.get('height')}; not the same image")
        preds = [{**p, "image_id": int(match[int(p["image_id"])]["id"])} for p in preds
                 if int(p["image_id"]) in match]
        evaluated = sorted({int(g["id"]) for g in match.values()})
        left = len(gt_by_id) - len(evaluated)
        notes.append(f"{len(evaluated)} images evaluated (matched by file name)"
                     + (f"; {left} ground-truth images not in this run: not counted" if left else ""))
        return preds, evaluated
    ids = {int(p["image_id"]) for p in preds}
    missing = sorted(ids - set(gt_by_id))
    if missing:
        raise EvalError(f"{pred_path}: {len(missing)} image ids are not in {gt_path} (e.g. {missing[:5]}) "
                        f"and there is no images.json beside it to match file names; run m2f segment "
                        f"-f coco (it writes images.json) or with --coco-annotations {gt_path}")
    without = len(gt_by_id) - len(ids)
    notes.append(f"{len(gt_by_id)} ground-truth images evaluated"
                 + (f"; {without} have no prediction: counted as misses (no images.json to tell "
                    f"which the run saw)" if without else ""))
    return preds, sorted(gt_by_id)


def _check_sizes(preds, gt_by_id, pred_path, gt_path) -> None:
    for p in preds:
        size = (p.get("segmentation") or {}).get("size") if isinstance(p.get("segmentation"), dict) else None
        g = gt_by_id[int(p["image_id"])]
        if size and g.get("height") is not None and list(size) != [g.get("height"), g.get("width")]:
            raise EvalError(f"{pred_path}: masks of image {g['id']} ({g.get('file_name')}) are "
                            f"{size[1]}x{size[0]}, {gt_path} says {g.get('width')}x{g.get('height')}")


def _check_categories(preds, gt, gt_path, pred_path, notes) -> list:
    gt_cats = {int(c["id"]) for c in gt.get("categories", [])}
    pred_cats = {int(p["category_id"]) for p in preds}
    if preds and not (pred_cats & gt_cats):
        raise EvalError(f"{pred_path}: no category id in common with {gt_path} (predictions use "
                        f"{sorted(pred_cats)[:8]}, the ground truth {sorted(gt_cats)[:8]}); run m2f segment "
                        f"with --coco-annotations {gt_path} to map classes by name")
    other = [p for p in preds if int(p["category_id"]) not in gt_cats]
    if other:
        notes.append(f"{len(other)} detections of {len(pred_cats - gt_cats)} categories the ground truth "
                     f"does not have: ignored")
    return [p for p in preds if int(p["category_id"]) in gt_cats]


def _cocoeval(gt: dict, preds: list, iou_type: str, img_ids: list[int]) -> dict[str, float]:
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
