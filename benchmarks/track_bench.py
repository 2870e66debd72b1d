"""--track against the naive frame-to-frame baseline, measured with py-motmetrics.

Makes videos of moving, bouncing, occluding shapes with known ids (scripts/shapes.py draws them,
PyAV writes them as in tests/videos.py), segments them with the trained fixture model
(tests/fixtures/shapes_model) twice in one go: without --track (today's per-frame outputs, -f jsonl)
and with --track. Scores, per set of videos, both against the ground truth ids (a hypothesis
matches an object at mask IoU >= 0.5):

- m2f: the tracked run's track_id;
- naive: the untracked run's instances (score >= 0.5) linked frame to frame by a Hungarian
  assignment on mask IoU (>= 0.2), unmatched ones starting new ids: no memory, no motion, no merging.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/track_bench.py [--frames 40] [--out /tmp/track_bench]

The "tuned" set is the one the defaults were chosen on; the others use seeds, speeds and
densities that were not looked at while tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import motmetrics as mm
import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "scripts"), os.path.join(ROOT, "tests")]

import shapes  # noqa: E402  scripts/shapes.py
from videos import write_video  # noqa: E402  tests/videos.py

from m2f_cli.config import RunConfig  # noqa: E402
from m2f_cli.pipeline import run  # noqa: E402

MODEL = os.path.join(ROOT, "tests", "fixtures", "shapes_model")
W, H = 192, 144
# (name, seed, shapes per video, speed in px/frame, videos)
SETS = [("tuned", 1, 4, 3.0, 2),
        ("untuned: seed 7, 3 shapes, slow", 7, 3, 2.0, 2),
        ("untuned: seed 8, 6 shapes, fast", 8, 6, 5.0, 2)]


def moving_shapes(rng: np.random.Generator, n: int, speed: float, frames: int):
    """(frames of (H, W, 3) uint8, per frame {object id: (H, W) bool visible mask}). Objects drawn in
    id order (a later one hides an earlier one), bouncing off the borders."""
    bg = shapes._background(rng, H, W)
    objs = []
    for k in range(n):
        label = int(rng.integers(0, len(shapes.SHAPES)))
        r = float(rng.uniform(12, 24))
        a = rng.uniform(0, 2 * np.pi)
        objs.append({"id": k + 1, "label": label, "r": r, "seed": int(rng.integers(1 << 30)),
                     "p": np.array([rng.uniform(r, W - r), rng.uniform(r, H - r)]),
                     "v": speed * rng.uniform(0.6, 1.4) * np.array([np.cos(a), np.sin(a)]),
                     "color": shapes._shape_color(rng, label, bg.reshape(-1, 3).mean(0), [])})
    video, truth = [], []
    for _ in range(frames):
        img = bg + rng.normal(0, 3, bg.shape)
        visible: dict[int, np.ndarray] = {}
        for o in objs:
            m = shapes._shape_mask(shapes.SHAPES[o["label"]], H, W, o["p"][0], o["p"][1], o["r"],
                                   np.random.default_rng(o["seed"]))
            visible = {i: v & ~m for i, v in visible.items()}
            visible[o["id"]] = m
            img[m] = o["color"]
            for d, lim in ((0, W), (1, H)):  # move and bounce
                o["p"][d] += o["v"][d]
                if not o["r"] <= o["p"][d] <= lim - o["r"]:
                    o["v"][d] = -o["v"][d]
                    o["p"][d] = min(max(o["p"][d], o["r"]), lim - o["r"])
        video.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
        truth.append({i: v for i, v in visible.items() if v.sum() >= shapes.MIN_VISIBLE_PX})
    return video, truth


def rle(m: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))


def segment(folder: str, out: str, track: bool) -> dict[str, list[list[dict]]]:
    """video stem -> per frame the jsonl instances (score >= 0.5, with masks)."""
    run(RunConfig(inputs=[folder], out=out, formats=("jsonl",), model=MODEL, rle=True, track=track,
                  overwrite=True, workers=0))
    per: dict[str, dict[int, list]] = {}
    with open(os.path.join(out, "predictions.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            per.setdefault(os.path.splitext(os.path.basename(rec["video"]))[0], {})[rec["frame"]] = rec["instances"]
    return {v: [d[k] for k in sorted(d)] for v, d in per.items()}


def naive_ids(frames: list[list[dict]]) -> list[list[int]]:
    """Frame-to-frame Hungarian on mask IoU >= 0.2; unmatched instances start new ids."""
    out, prev, nxt = [], [], 1
    for inst in frames:
        ids = [0] * len(inst)
        if prev and inst:
            iou = mask_utils.iou([i["segmentation"] for i in inst], [p[1] for p in prev], [0] * len(prev))
            for r, c in zip(*linear_sum_assignment(-iou)):
                if iou[r, c] >= 0.2:
                    ids[r] = prev[c][0]
        for k in range(len(ids)):
            if not ids[k]:
                ids[k], nxt = nxt, nxt + 1
        out.append(ids)
        prev = [(ids[k], inst[k]["segmentation"]) for k in range(len(inst))]
    return out


def accumulate(acc, video: int, truth: list[dict], frames: list[list[dict]], ids: list[list]) -> None:
    """One video's frames into acc; ids are made per video (ids restart in each video)."""
    for gt, inst, hid in zip(truth, frames, ids):
        keep = [k for k, h in enumerate(hid) if h is not None]
        g = list(gt)
        d = np.full((len(g), len(keep)), np.nan)
        if g and keep:
            iou = mask_utils.iou([inst[k]["segmentation"] for k in keep], [rle(gt[i]) for i in g], [0] * len(g)).T
            d = np.where(iou >= 0.5, 1 - iou, np.nan)
        base = 100_000 * (video + 1)  # motmetrics wants numbers
        acc.update([base + i for i in g], [base + hid[k] for k in keep], d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--out", default="/tmp/track_bench")
    a = ap.parse_args()
    mh = mm.metrics.create()
    rows = []
    for name, seed, n, speed, count in SETS:
        folder = os.path.join(a.out, f"videos-{seed}")
        os.makedirs(folder, exist_ok=True)
        rng = np.random.default_rng(seed)
        truths = {}
        for v in range(count):
            video, truths[f"clip{v}"] = moving_shapes(rng, n, speed, a.frames)
            write_video(os.path.join(folder, f"clip{v}.mp4"), frames=video, rate=10, size=(W, H))
        plain = segment(folder, os.path.join(a.out, f"plain-{seed}"), False)
        tracked = segment(folder, os.path.join(a.out, f"tracked-{seed}"), True)
        accs = {"m2f --track": mm.MOTAccumulator(auto_id=True), "naive": mm.MOTAccumulator(auto_id=True)}
        for n_v, (v, truth) in enumerate(truths.items()):
            accumulate(accs["naive"], n_v, truth, plain[v], naive_ids(plain[v]))
            accumulate(accs["m2f --track"], n_v, truth, tracked[v], [[i.get("track_id") for i in f] for f in tracked[v]])
        for who, acc in accs.items():
            s = mh.compute(acc, metrics=["idf1", "num_switches", "mota", "num_false_positives",
                                         "num_misses"], name=who)
            rows.append((name, who, *s.iloc[0].tolist()))
    print(f"{'set':34} {'tracker':12} {'IDF1':>6} {'IDsw':>5} {'MOTA':>6} {'FP':>5} {'miss':>5}")
    for name, who, idf1, sw, mota, fp, miss in rows:
        print(f"{name:34} {who:12} {idf1:6.3f} {int(sw):5d} {mota:6.3f} {int(fp):5d} {int(miss):5d}")


if __name__ == "__main__":
    main()
