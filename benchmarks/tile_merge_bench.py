"""Mask AP, duplicates and fragments of tiled inference (``--tile``) on shapes canvases.

A benchmark, not a test: it draws canvases like scripts/shapes.make_canvas (many small shapes of
the trained fixture's four classes on one continuous background), runs the trained fixture
(tests/fixtures/shapes_model, 128 px input) over them with each ``--tile`` setting in this process
(threshold 0, as ``-f coco`` writes), and prints per setting:

- AP: COCO segm mask AP (pycocotools, m2f eval's numbers);
- dup: of the objects found (a prediction of score >= 0.5 with mask IoU >= 0.5, any class), the
  share found twice or more (two such predictions: overlapping tiles, or one object under two classes);
- frag: of the predictions of score >= 0.5, the share that are fragments (best IoU with an object in
  [0.1, 0.5): a piece of an object cut by a seam, or a blob over several);
- found, preds: the counts behind them; s: seconds of the setting;
- dup/frag at 0.5: the same, from a second run at --threshold 0.5 (what -f png and the sidecars show:
  parts below half the threshold are dropped before the merge, so it may merge differently).

    python benchmarks/tile_merge_bench.py                       # small: 1 canvas, 2 settings (~1 min)
    python benchmarks/tile_merge_bench.py --canvas 11:2048x2048:150 --canvas 12:3000x3000:160:320 \\
        --tiles 256,0.25 auto 192,0.1 384,0.3          # a set: a row per canvas, then the set's joint AP
    python benchmarks/tile_merge_bench.py --merge legacy        # the merge before issue 28

Canvases are cached under benchmarks/_work/tile_merge (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from pycocotools import mask as mask_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "shapes_model")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import shapes  # noqa: E402

FOUND_IOU, SCORE = 0.5, 0.5
FRAGMENT_IOU = 0.1


def canvas_set(work: str, seed: int, n: int, height: int, width: int, shapes_n: int, scale: int):
    """(folder, annotations path) of n canvases (PNG + COCO json), made once and cached."""
    folder = os.path.join(work, f"c_s{seed}_n{n}_{height}x{width}_k{shapes_n}_sc{scale}")
    gt = os.path.join(folder, "annotations.json")
    if not os.path.exists(gt):
        shapes.write_canvas_set(folder, n, seed, height, width, shapes_n, scale)
    return folder, gt


def predict(seg, folder: str, gt: dict) -> list[dict]:
    """COCO results (score, category_id, RLE with str counts) of seg over the ground truth's images."""
    from PIL import Image
    out = []
    for im in gt["images"]:
        r = seg(Image.open(os.path.join(folder, im["file_name"])).convert("RGB"))
        out += [{"image_id": im["id"], "category_id": i.category_id, "segmentation": i.rle, "score": i.score}
                for i in r.instances]
    return out


def ap(gt_path: str, preds: list[dict]) -> float:
    from m2f_cli.tools.evaluate import evaluate
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(preds, f)
    try:
        return evaluate(gt_path, f.name)["AP"]
    finally:
        os.unlink(f.name)


def _c(rle: dict) -> dict:
    return {"size": rle["size"], "counts": rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]}


def duplicates_and_fragments(gt: dict, preds: list[dict]) -> dict:
    """found, twice, preds, fragments over all images (definitions in the module docstring)."""
    found = twice = n_pred = frags = 0
    for im in gt["images"]:
        g = [_c(a["segmentation"]) for a in gt["annotations"] if a["image_id"] == im["id"]]
        p = [_c(x["segmentation"]) for x in preds if x["image_id"] == im["id"] and x["score"] >= SCORE]
        n_pred += len(p)
        if not g or not p:
            continue
        iou = np.asarray(mask_utils.iou(p, g, [0] * len(g))).reshape(len(p), len(g))
        hits = (iou >= FOUND_IOU).sum(0)
        found += int((hits >= 1).sum())
        twice += int((hits >= 2).sum())
        best = iou.max(1)
        frags += int(((best >= FRAGMENT_IOU) & (best < FOUND_IOU)).sum())
    return {"found": found, "twice": twice, "preds": n_pred, "fragments": frags,
            "dup": twice / max(found, 1), "frag": frags / max(n_pred, 1)}


def canvas_spec(text: str) -> tuple[int, int, int, int, int]:
    """SEED:HxW:SHAPES[:SCALE] -> (seed, height, width, shapes, scale)."""
    parts = text.split(":")
    h, w = (int(v) for v in parts[1].lower().split("x"))
    return int(parts[0]), h, w, int(parts[2]), int(parts[3]) if len(parts) > 3 else shapes.MAX_SIDE


def joint_ap(sets: list[tuple[dict, list[dict]]]) -> float:
    """COCO mask AP over several (ground truth, predictions) as one set (image ids renumbered)."""
    gt = {"images": [], "annotations": [], "categories": sets[0][0]["categories"]}
    preds = []
    for k, (g, p) in enumerate(sets):
        offset = 1000 * k
        gt["images"] += [{**im, "id": im["id"] + offset, "file_name": f"{k}/{im['file_name']}"} for im in g["images"]]
        gt["annotations"] += [{**a, "id": a["id"] + 100_000 * k, "image_id": a["image_id"] + offset}
                              for a in g["annotations"]]
        preds += [{**x, "image_id": x["image_id"] + offset} for x in p]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(gt, f)
    try:
        return ap(f.name, preds)
    finally:
        os.unlink(f.name)


def run_setting(model: str, tile: str, canvases: list, work: str) -> list[dict]:
    """One --tile setting over every canvas: a row per canvas, then a row for the set (joint AP,
    pooled counts)."""
    from m2f_cli.segmenter import Segmenter
    rows, sets = [], []
    for seed, h, w, n, scale in canvases:
        folder, gt_path = canvas_set(work, seed, 1, h, w, n, scale)
        gt = json.load(open(gt_path))
        t0 = time.perf_counter()
        preds = predict(Segmenter(model, device="cpu", threshold=0.0, tile=tile), folder, gt)
        at05 = duplicates_and_fragments(gt, predict(Segmenter(model, device="cpu", threshold=0.5, tile=tile),
                                                    folder, gt))
        sets.append((gt, preds))
        rows.append({"canvas": f"{seed}:{h}x{w}:{n}:{scale}", "tile": tile, "AP": ap(gt_path, preds),
                     **duplicates_and_fragments(gt, preds), "twice_05": at05["twice"], "found_05": at05["found"],
                     "fragments_05": at05["fragments"], "preds_05": at05["preds"],
                     "objects": len(gt["annotations"]), "s": time.perf_counter() - t0})
    if len(rows) > 1:
        total = {k: sum(r[k] for r in rows) for k in ("found", "twice", "preds", "fragments", "objects", "s",
                                                      "twice_05", "found_05", "fragments_05", "preds_05")}
        rows.append({"canvas": f"set of {len(rows)}", "tile": tile, "AP": joint_ap(sets), **total,
                     "dup": total["twice"] / max(total["found"], 1), "frag": total["fragments"] / max(total["preds"], 1)})
    for r in rows:
        r["dup_05"] = r["twice_05"] / max(r["found_05"], 1)
        r["frag_05"] = r["fragments_05"] / max(r["preds_05"], 1)
    return rows


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap_.add_argument("--canvas", action="append", type=canvas_spec, metavar="SEED:HxW:SHAPES[:SCALE]",
                     help="a canvas (repeat for a set): seed, size, shapes drawn, shape scale (radii 9-24%% of "
                          "SCALE; the fixture's own images: 256). Default: 101:1536x1536:130:256")
    ap_.add_argument("--tiles", nargs="+", default=["256,0.25", "auto"], help="--tile values to compare")
    ap_.add_argument("--model", default=FIXTURE)
    ap_.add_argument("--threads", type=int, default=1)
    ap_.add_argument("--merge", choices=("masks", "legacy"), default="masks",
                     help="masks: tiling/merge.py (issue 28); legacy: tiling/seams.py, the merge before it")
    ap_.add_argument("--work", default=os.path.join(ROOT, "benchmarks", "_work", "tile_merge"))
    ap_.add_argument("--json", help="save the figures to this file")
    a = ap_.parse_args()

    import torch
    torch.set_num_threads(a.threads)
    if a.merge == "legacy":  # the tiles' driver merges with tiling/seams.py instead
        from m2f_cli.tiling import driver, seams
        driver.merge_parts = seams.merge_parts
    canvases = a.canvas or [canvas_spec("101:1536x1536:130:256")]
    rows = []
    print(f"{'canvas':24} {'--tile':9} {'AP':>6} {'dup':>6} {'found':>9} {'frag':>6} {'preds':>9}   "
          f"at 0.5: {'dup':>6} {'frag':>6} {'s':>5}   (merge: {a.merge})")
    for tile in a.tiles:
        for r in run_setting(a.model, tile, canvases, a.work):
            rows.append(r)
            print(f"{r['canvas']:24} {tile:9} {r['AP']:6.3f} {r['dup']:6.1%} {r['twice']:>4}/{r['found']:<4} "
                  f"{r['frag']:6.1%} {r['fragments']:>4}/{r['preds']:<4}   at 0.5: {r['dup_05']:6.1%} {r['frag_05']:6.1%} "
                  f"{r['s']:5.0f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if k != "canvas"}, "canvases": canvases,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
