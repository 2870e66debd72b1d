"""``m2f eval`` of semantic label PNGs: mIoU, frequency-weighted IoU, mean class accuracy, pixel
accuracy and per-class IoU/accuracy, with the definitions of detectron2's SemSegEvaluator:

- one confusion matrix over all evaluated pixels: ground-truth pixels of IGNORE (255), or of a class
  index the predictions do not have, are left out; a predicted IGNORE (no class) is a miss;
- per class IoU = TP / (TP + FP + FN), accuracy = TP / (TP + FN);
- mIoU and mean accuracy average over the classes present in the evaluated ground truth (a class
  only predicted lowers the IoU of the classes it was predicted on, and has no IoU of its own: as
  detectron2, unlike mmsegmentation, which counts it as 0); fwIoU weights IoU by ground-truth
  frequency; pixel accuracy = all TP / all labelled pixels.

Ground truth: a folder of single-channel label PNGs (class index per pixel, 255 ignore: Cityscapes'
``*_gtFine_labelTrainIds.png``, detectron2's ADE20K ``annotations_detectron2``; raw ADE20K
annotations with --reduce-zero-label). Predictions: an m2f run folder (``*.labels.png`` and its
``labels.json``) or any folder of such PNGs. Images are matched by their relative path, then by base
name where unique, without extension and Cityscapes' ``_leftImg8bit`` / ``_gtFine_labelTrainIds``.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from m2f_cli.errors import EvalError
from m2f_cli.tools.evaluate import PerClassResult, load_json, pct

IGNORE = 255
_SUFFIXES = ("_gtFine_labelTrainIds", "_leftImg8bit")
HEADLINE = ("mIoU", "fwIoU", "mAcc", "pAcc")


def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C + 1) int64 counts [gt class, predicted class] of the labelled pixels of one image;
    column C counts predictions outside 0..C-1 (IGNORE: no class). gt, pred: (H, W) integers."""
    g = gt.astype(np.int64).ravel()
    p = pred.astype(np.int64).ravel()
    keep = g < num_classes
    p = np.where(p < num_classes, p, num_classes)[keep]
    return np.bincount(g[keep] * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1)
                       ).reshape(num_classes, num_classes + 1)


def scores(conf: np.ndarray, names: list[str]) -> tuple[dict, list[dict]]:
    """The headline numbers (HEADLINE, in [0, 1]) and one row per class {index, name, iou, acc,
    gt_pixels, pred_pixels} (iou/acc None where undefined) of a confusion matrix."""
    c = conf.shape[0]
    tp = np.diag(conf[:, :c]).astype(np.float64)
    pos_gt = conf.sum(1).astype(np.float64)
    pos_pred = conf[:, :c].sum(0).astype(np.float64)
    union = pos_gt + pos_pred - tp
    acc_ok = pos_gt > 0
    iou_ok = acc_ok & (union > 0)
    iou = np.divide(tp, union, out=np.zeros(c), where=iou_ok)
    acc = np.divide(tp, pos_gt, out=np.zeros(c), where=acc_ok)
    total = pos_gt.sum()
    stats = {"mIoU": float(iou[iou_ok].mean()) if iou_ok.any() else None,
             "fwIoU": float((pos_gt[iou_ok] * iou[iou_ok]).sum() / total) if total else None,
             "mAcc": float(acc[acc_ok].mean()) if acc_ok.any() else None,
             "pAcc": float(tp.sum() / total) if total else None}
    rows = [{"index": k, "name": names[k] if k < len(names) else str(k),
             "iou": float(iou[k]) if iou_ok[k] else None, "acc": float(acc[k]) if acc_ok[k] else None,
             "gt_pixels": int(pos_gt[k]), "pred_pixels": int(pos_pred[k])} for k in range(c)]
    return stats, rows


class SemanticResult(PerClassResult):
    """stats: HEADLINE numbers in [0, 1]; per_class: scores' rows of the classes present."""

    def table(self) -> str:
        lines = ["  ".join(f"{k} {pct(self.stats[k])}" for k in HEADLINE), ""]
        lines += [f"{str(r['name'])[:24]:24s} IoU {pct(r['iou'])}  Acc {pct(r['acc'])}"
                  for r in self.per_class]
        return "\n".join(lines)


def _key(rel: str) -> str:
    stem = rel.replace("\\", "/")
    for ext in (".labels.png", ".png"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    for s in _SUFFIXES:
        stem = stem.removesuffix(s)
    return stem


def _pngs(folder: str, pattern: str) -> dict[str, str]:
    """key (_key of the path relative to folder) -> path, of the files ending in pattern."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.endswith(pattern):
                rel = os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
                out[_key(rel)] = os.path.join(root, f)
    return out


def _predictions(pred: str) -> tuple[str, dict[str, str], Optional[list[str]]]:
    """(folder, key -> label PNG, class names from its labels.json or None) of --pred: a run
    folder, its labels.json, or a folder of label PNGs."""
    folder = pred if os.path.isdir(pred) else os.path.dirname(os.path.abspath(pred))
    if not os.path.isdir(folder):
        raise EvalError(f"{pred}: no such folder")
    files = _pngs(folder, ".labels.png") or _pngs(folder, ".png")
    legend = os.path.join(folder, "labels.json")
    names = None
    if os.path.isfile(legend):
        doc = load_json(legend, "the run's labels.json")
        try:
            names = [str(c["name"]) for c in sorted(doc["classes"], key=lambda c: int(c["index"]))]
        except (KeyError, TypeError, ValueError):
            raise EvalError(f"{legend}: not a labels.json written by m2f (needs classes)") from None
    return folder, files, names


def _match(gt_files: dict[str, str], pred_files: dict[str, str]) -> dict[str, str]:
    """Ground-truth key -> predicted PNG: the same key, else the same base name where unique."""
    def by_base(files):
        base: dict[str, list[str]] = {}
        for k in files:
            base.setdefault(k.rsplit("/", 1)[-1], []).append(k)
        return {b: ks[0] for b, ks in base.items() if len(ks) == 1}
    gb, pb = by_base(gt_files), by_base(pred_files)
    out = {}
    for k in gt_files:
        if k in pred_files:
            out[k] = pred_files[k]
        else:
            b = k.rsplit("/", 1)[-1]
            if gb.get(b) == k and b in pb:
                out[k] = pred_files[pb[b]]
    return out


def read_labels(path: str, reduce_zero_label: bool = False) -> np.ndarray:
    """(H, W) int64 class indices of a single-channel label PNG; with reduce_zero_label (raw ADE20K
    annotations: 0 = other, 1..150) 0 becomes IGNORE and every other value v becomes v - 1."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise EvalError(f"{path}: a label PNG has one class index per pixel; this one is {im.mode} "
                                f"(a colour-coded map?)")
            a = np.asarray(im).astype(np.int64)
    except OSError as e:
        raise EvalError(f"{path}: cannot read the label PNG ({e.strerror or e})") from None
    if reduce_zero_label:
        a = np.where(a == 0, IGNORE, a - 1)
        a[a == IGNORE - 1] = IGNORE  # 255 stays ignored
    return a


def evaluate_semantic(gt_dir: str, pred: str, reduce_zero_label: bool = False,
                      all_gt_images: bool = False) -> SemanticResult:
    """mIoU and the rest (module docstring) of a run's label PNGs against a ground-truth folder.
    Raises EvalError when they do not fit: no image in common, other sizes, no class in common,
    nothing labelled."""
    _, pred_files, names = _predictions(pred)
    gt_files = _pngs(gt_dir, ".png")
    match = _match(gt_files, pred_files)
    if not match:
        raise EvalError(f"{pred}: none of its {len(pred_files)} label PNGs has a ground truth in {gt_dir} "
                        f"(matched by file name); is it the right ground truth?")
    c = len(names) if names is not None else IGNORE
    notes = [f"{len(match)} images evaluated (matched by file name)"
             + (f"; {len(pred_files) - len(match)} predicted images without ground truth: left out"
                if len(pred_files) > len(match) else "")]
    keys = sorted(gt_files) if all_gt_images else sorted(match)
    if all_gt_images and len(keys) > len(match):
        notes.append(f"{len(keys) - len(match)} ground-truth images not in this run: counted as misses")
    conf = np.zeros((c, c + 1), np.int64)
    unknown = 0
    for k in keys:
        g = read_labels(gt_files[k], reduce_zero_label)
        p = read_labels(match[k]) if k in match else np.full(g.shape, IGNORE)
        if p.shape != g.shape:
            raise EvalError(f"{match[k]}: {p.shape[1]}x{p.shape[0]}, its ground truth {gt_files[k]} is "
                            f"{g.shape[1]}x{g.shape[0]}; not the same image")
        unknown += int(((g >= c) & (g != IGNORE)).sum())
        conf += confusion(g, p, c)
    labelled = int(conf.sum())
    if names is not None and not labelled and unknown:
        raise EvalError(f"{gt_dir}: no class in common with the predictions' {c} classes (ground-truth "
                        f"values are >= {c}); is it the right ground truth, or raw ADE20K (--reduce-zero-label)?")
    if not labelled:
        raise EvalError(f"{gt_dir}: no labelled pixel on the {len(keys)} evaluated images; nothing to score")
    if unknown:
        notes.append(f"{unknown} ground-truth pixels of class indices >= {c} (not the model's): ignored")
    stats, rows = scores(conf, names or [])
    present = [r for r in rows if r["gt_pixels"] or r["pred_pixels"]]
    return SemanticResult(stats, present, notes, len(keys))
