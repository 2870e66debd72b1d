"""``m2f eval`` of COCO panoptic results: PQ, SQ and RQ over all categories, things, stuff and per
category, with the definitions of panopticapi's pq_compute (Kirillov et al., Panoptic Segmentation):

- per image, a ground-truth and a predicted segment of the same category match when their IoU is
  > 0.5 (unique by construction), where the union leaves out the predicted pixels on void (id 0);
  crowd ground-truth segments (iscrowd 1) match nothing;
- each match is a TP adding its IoU; an unmatched non-crowd ground-truth segment a FN; an unmatched
  predicted segment a FP unless more than half of it lies on void or on a crowd region of its category;
- per category PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2);
  the averages are over the categories with TP + FP + FN > 0 (their count is N).

Predicted areas are counted in the PNGs; ground-truth areas are the JSON's (as pq_compute does),
or counted where the JSON has none. Written from the definitions, checked against hand-computed
cases and against pq_compute itself (tests/test_eval_panoptic.py, docs/panoptic-semantic.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from m2f_cli.outputs import coco_panoptic
from m2f_cli.errors import EvalError
from m2f_cli.tools.evaluate import PerClassResult, load_json, match_by_name, pct

_OFFSET = np.uint64(1 << 24)
HEADLINE = ("PQ", "SQ", "RQ", "N", "PQ_th", "SQ_th", "RQ_th", "N_th", "PQ_st", "SQ_st", "RQ_st", "N_st")


@dataclass
class CategoryCounts:
    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0


def pq_image(gt_ids: np.ndarray, gt_segs: dict[int, dict], pred_ids: np.ndarray, pred_segs: dict[int, int],
             counts: dict[int, CategoryCounts]) -> None:
    """Add one image to counts (category id -> CategoryCounts).

    gt_ids, pred_ids: (H, W) integer segment id maps, 0 = void. gt_segs: ground-truth id ->
    {"category_id", "iscrowd", optional "area"}; pred_segs: predicted id -> category id (every
    non-void id of pred_ids must be listed). Ground-truth ids not listed match nothing.
    """
    pair, n = np.unique(gt_ids.astype(np.uint64) * _OFFSET + pred_ids.astype(np.uint64), return_counts=True)
    inter = dict(zip(zip((pair // _OFFSET).tolist(), (pair % _OFFSET).tolist()), n.tolist()))
    pred_area: dict[int, int] = {}
    gt_area: dict[int, int] = {}
    for (g, p), k in inter.items():
        pred_area[p] = pred_area.get(p, 0) + k
        gt_area[g] = gt_area.get(g, 0) + k
    gt_matched, pred_matched = set(), set()
    for (g, p), k in inter.items():
        if g not in gt_segs or p not in pred_segs or gt_segs[g].get("iscrowd", 0) == 1:
            continue
        cat = int(gt_segs[g]["category_id"])
        if cat != pred_segs[p]:
            continue
        g_area = gt_segs[g].get("area", gt_area[g])
        iou = k / (pred_area[p] + g_area - k - inter.get((0, p), 0))
        if iou > 0.5:
            c = counts.setdefault(cat, CategoryCounts())
            c.tp += 1
            c.iou += iou
            gt_matched.add(g)
            pred_matched.add(p)
    crowd: dict[int, list[int]] = {}
    for g, s in gt_segs.items():
        if s.get("iscrowd", 0) == 1:
            crowd.setdefault(int(s["category_id"]), []).append(g)
        elif g not in gt_matched:
            counts.setdefault(int(s["category_id"]), CategoryCounts()).fn += 1
    for p, cat in pred_segs.items():
        if p in pred_matched or p not in pred_area:
            continue
        ignored = inter.get((0, p), 0) + sum(inter.get((g, p), 0) for g in crowd.get(cat, []))
        if ignored / pred_area[p] > 0.5:
            continue
        counts.setdefault(cat, CategoryCounts()).fp += 1


def _average(rows: list[dict]) -> tuple[Optional[float], Optional[float], Optional[float], int]:
    rows = [r for r in rows if r["pq"] is not None]
    if not rows:
        return None, None, None, 0
    return (sum(r["pq"] for r in rows) / len(rows), sum(r["sq"] for r in rows) / len(rows),
            sum(r["rq"] for r in rows) / len(rows), len(rows))


def pq_summary(counts: dict[int, CategoryCounts], categories: list[dict]) -> tuple[dict, list[dict]]:
    """The headline numbers (HEADLINE; None where no category counts) and one row per category
    {id, name, isthing, pq, sq, rq, tp, fp, fn} (pq/sq/rq None when TP + FP + FN = 0)."""
    rows = []
    for c in categories:
        k = counts.get(int(c["id"]), CategoryCounts())
        den = k.tp + 0.5 * k.fp + 0.5 * k.fn
        rows.append({"id": int(c["id"]), "name": c.get("name"), "isthing": int(c.get("isthing", 1)),
                     "pq": k.iou / den if den else None, "sq": (k.iou / k.tp if k.tp else 0.0) if den else None,
                     "rq": k.tp / den if den else None, "tp": k.tp, "fp": k.fp, "fn": k.fn})
    stats: dict = {}
    for suffix, keep in (("", lambda r: True), ("_th", lambda r: r["isthing"] == 1),
                         ("_st", lambda r: r["isthing"] != 1)):
        pq, sq, rq, n = _average([r for r in rows if keep(r)])
        stats.update({f"PQ{suffix}": pq, f"SQ{suffix}": sq, f"RQ{suffix}": rq, f"N{suffix}": n})
    return stats, rows


class PanopticResult(PerClassResult):
    """stats: HEADLINE numbers in [0, 1] (N: categories averaged); per_class: pq_summary's rows."""

    def table(self) -> str:
        lines = [f"{'':10s}|    PQ     SQ     RQ     N", "-" * 38]
        for name, s in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            lines.append(f"{name:10s}| {pct(self.stats['PQ' + s])}  {pct(self.stats['SQ' + s])}  "
                         f"{pct(self.stats['RQ' + s])}  {self.stats['N' + s]:4d}")
        lines.append("")
        for r in self.per_class:
            if r["pq"] is not None:
                lines.append(f"{str(r['name'])[:24]:24s} {'thing' if r['isthing'] == 1 else 'stuff'}  "
                             f"PQ {pct(r['pq'])}  SQ {pct(r['sq'])}  RQ {pct(r['rq'])}  "
                             f"TP {r['tp']} FP {r['fp']} FN {r['fn']}")
        return "\n".join(lines)


def _load_doc(path: str, what: str) -> dict:
    doc = load_json(path, what)
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list) \
            or not all(isinstance(a, dict) and "segments_info" in a for a in doc["annotations"]):
        raise EvalError(f"{path}: not a COCO panoptic file (needs annotations with segments_info)")
    return doc


def _pairs(gt: dict, pred: dict, gt_path: str, pred_path: str, notes: list) -> list[tuple[dict, dict]]:
    """(ground-truth annotation, predicted annotation) of each image both have, matched by file
    name through the prediction's images (m2f's panoptic.json has them), else by image id."""
    gt_images = gt.get("images") or []
    gt_by_id = {int(i["id"]): i for i in gt_images}
    gt_ann = {int(a["image_id"]): a for a in gt["annotations"]}
    pred_ann = {int(a["image_id"]): a for a in pred["annotations"]}
    if pred.get("images"):
        match = match_by_name(pred["images"], gt_images)
        how = "by file name"
        for im in pred["images"]:
            g = match.get(int(im["id"]))
            if g is not None and g.get("width") is not None and im.get("width") is not None \
                    and (im["width"], im["height"]) != (g["width"], g["height"]):
                raise EvalError(f"{im['file_name']}: the run saw it as {im['width']}x{im['height']}, "
                                f"{gt_path} says {g['width']}x{g['height']}; not the same image")
    else:
        match = {i: gt_by_id[i] for i in pred_ann if i in gt_by_id}
        how = "by image id"
    pairs = [(gt_ann[int(g["id"])], pred_ann[p]) for p, g in sorted(match.items())
             if p in pred_ann and int(g["id"]) in gt_ann]
    if not pairs:
        raise EvalError(f"{pred_path}: none of its {len(pred_ann)} images is in {gt_path} ({how}); "
                        f"is it the right ground truth?")
    left = len(pred_ann) - len(pairs)
    notes.append(f"{len(pairs)} images evaluated (matched {how})"
                 + (f"; {left} predicted images not in the ground truth: left out" if left else "")
                 + (f"; {len(gt_ann) - len(pairs)} ground-truth images not in this run"
                    if len(gt_ann) > len(pairs) else ""))
    return pairs


def _categories(gt: dict, pred: dict, gt_path: str, pred_path: str, notes: list) -> set[int]:
    """The ground truth's category ids; refuses predictions with none of them."""
    gt_cats = {int(c["id"]) for c in gt.get("categories", [])}
    used = {int(s["category_id"]) for a in pred["annotations"] for s in a["segments_info"]}
    if used and not used & gt_cats:
        raise EvalError(f"{pred_path}: no category id in common with {gt_path} (predictions use "
                        f"{sorted(used)[:8]}, the ground truth {sorted(gt_cats)[:8]}); run m2f segment "
                        f"with --coco-annotations {gt_path} to map classes by name")
    other = [s for a in pred["annotations"] for s in a["segments_info"] if int(s["category_id"]) not in gt_cats]
    if other:
        notes.append(f"{len(other)} predicted segments of {len(used - gt_cats)} categories the ground truth "
                     f"does not have: ignored (their pixels count as unpredicted)")
    return gt_cats


def _pred_map(ann: dict, folder: str, gt_cats: set[int]) -> tuple[np.ndarray, dict[int, int]]:
    """The predicted id map (segments of unknown categories made void) and id -> category id."""
    path = os.path.join(folder, ann["file_name"])
    ids = _read(path)
    segs = {int(s["id"]): int(s["category_id"]) for s in ann["segments_info"]}
    present = set(np.unique(ids).tolist()) - {coco_panoptic.VOID}
    if present - set(segs) or set(segs) - present:
        bad = sorted(present ^ set(segs))[:5]
        raise EvalError(f"{path}: segment ids {bad} are in the PNG or its segments_info but not both")
    drop = [i for i, c in segs.items() if c not in gt_cats]
    if drop:
        ids = np.where(np.isin(ids, drop), coco_panoptic.VOID, ids)
    return ids, {i: c for i, c in segs.items() if c in gt_cats}


def _read(path: str) -> np.ndarray:
    try:
        return coco_panoptic.read_png(path)
    except ValueError as e:
        raise EvalError(str(e)) from None


def evaluate_panoptic(gt_path: str, pred_path: str, gt_folder: Optional[str] = None,
                      pred_folder: Optional[str] = None, all_gt_images: bool = False) -> PanopticResult:
    """PQ of COCO panoptic predictions (JSON + PNG folder) against a COCO panoptic ground truth.
    PNG folders default to panopticapi's (X.json -> X/). Raises EvalError when they do not fit:
    no image in common, other image or PNG sizes, no category in common, no ground-truth segment."""
    gt, pred = _load_doc(gt_path, "ground truth"), _load_doc(pred_path, "predictions")
    gt_dir = coco_panoptic.png_folder(gt_path, gt_folder)
    pred_dir = coco_panoptic.png_folder(pred_path, pred_folder)
    notes: list[str] = []
    pairs = _pairs(gt, pred, gt_path, pred_path, notes)
    gt_cats = _categories(gt, pred, gt_path, pred_path, notes)
    if all_gt_images:
        seen = {id(g) for g, _ in pairs}
        extra = [(g, None) for g in gt["annotations"] if id(g) not in seen]
        pairs = pairs + extra
        if extra:
            notes.append(f"{len(extra)} ground-truth images not in this run: their segments count as misses")
    counts: dict[int, CategoryCounts] = {}
    scored = 0
    for g_ann, p_ann in pairs:
        g_ids = _read(os.path.join(gt_dir, g_ann["file_name"]))
        g_segs = {int(s["id"]): s for s in g_ann["segments_info"]}
        scored += sum(1 for s in g_segs.values() if s.get("iscrowd", 0) != 1)
        if p_ann is None:
            p_ids, p_segs = np.zeros_like(g_ids), {}
        else:
            p_ids, p_segs = _pred_map(p_ann, pred_dir, gt_cats)
            if p_ids.shape != g_ids.shape:
                raise EvalError(f"{os.path.join(pred_dir, p_ann['file_name'])}: {p_ids.shape[1]}x{p_ids.shape[0]}, "
                                f"its ground truth {g_ann['file_name']} is {g_ids.shape[1]}x{g_ids.shape[0]}")
        pq_image(g_ids, g_segs, p_ids, p_segs, counts)
    if not scored:
        raise EvalError(f"{gt_path}: no segment on the {len(pairs)} evaluated images; nothing to score")
    stats, rows = pq_summary(counts, gt.get("categories", []))
    return PanopticResult(stats, rows, notes, len(pairs))
