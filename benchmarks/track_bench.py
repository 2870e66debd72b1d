"""--track against the naive frame-to-frame baseline, measured with py-motmetrics (and TrackEval's HOTA).

Makes videos of moving, bouncing, occluding shapes with known ids (scripts/shapes.py draws them,
PyAV writes them as in tests/videos.py), segments them with the trained fixture model
(tests/fixtures/shapes_model) without --track (at the tracker's low threshold, 0.2: today's
per-frame outputs and the weak ones --track sees) and with --track, and scores per set of videos,
against the ground truth ids (a hypothesis matches an object at mask IoU >= 0.5):

- m2f --track: the tracked run's track_id (instances without one are no hypothesis); the run is
  also replayed through tracking/stage.py on the untracked run's instances, and the script says
  whether the replay equals it (--replay scores the replay alone: tracker changes in seconds);
- naive: the untracked run's instances at score >= 0.5 linked frame to frame by a Hungarian
  assignment on mask IoU (>= 0.2), unmatched ones starting new ids: no memory, no motion, no merging
  (the issue's baseline);
- oracle: the same instances (>= 0.5), each visible object's best-IoU one (>= 0.5) given the
  object's true id, every other one left out: the IDF1 any tracker could reach on these detections.

Columns: IDF1, ID switches, MOTA, false positives, misses, fragmentations (motmetrics), HOTA
(trackeval, if installed: pip install trackeval; nan otherwise).

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/track_bench.py [--frames 40] [--out /tmp/track_bench]

The "tuned" and "tuned-2" sets are the ones the tracker's rules and defaults were chosen on; the
"untuned" ones use seeds, speeds and densities that were only measured. The summary gives per role
the mean IDF1 gain over naive and how many sets meet each target, then the pooled figures, the
issue's own measure: IDF1 and ID switches over all the role's videos together (motmetrics' OVERALL
row), for naive, m2f and the oracle, and whether m2f's pooled IDF1 is >= naive's + 0.15 and its
summed switches <= a third of naive's. --tracker key=value (repeatable)
replays with other TrackerConfig settings (with --replay --reuse: trying a setting in seconds,
without running the model again).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

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
from m2f_cli.records import ImageRef, ImageResult, Instance  # noqa: E402
from m2f_cli.tracking.stage import TrackingStage  # noqa: E402
from m2f_cli.tracking.tracker import TrackerConfig  # noqa: E402

try:  # TrackEval's HOTA when it is installed (pip install trackeval)
    from trackeval.metrics import HOTA
except ImportError:
    HOTA = None

MODEL = os.path.join(ROOT, "tests", "fixtures", "shapes_model")
W, H = 192, 144
# (role, seed, shapes per video, speed in px/frame, videos). tuned: looked at while choosing the
# tracker's rules and defaults; tuned-2: a second group of such sets (seeds 31-38, added 2026-12-07
# so that rules are chosen on more than five sets); untuned: only measured.
SETS = [("tuned", 1, 4, 3.0, 2),
        ("tuned", 2, 5, 4.0, 2),
        ("tuned", 3, 3, 2.5, 2),
        ("tuned", 4, 6, 2.0, 2),
        ("tuned", 5, 7, 4.0, 2),
        ("untuned", 7, 3, 2.0, 2),
        ("untuned", 8, 6, 5.0, 2),
        ("untuned", 11, 4, 1.5, 2),
        ("untuned", 12, 7, 3.0, 2),
        ("untuned", 13, 5, 6.0, 2),
        ("untuned", 21, 8, 2.5, 2),
        ("untuned", 22, 4, 5.0, 2),
        ("untuned", 23, 2, 3.0, 2),
        ("tuned-2", 31, 3, 4.0, 2),
        ("tuned-2", 32, 5, 2.0, 2),
        ("tuned-2", 33, 8, 3.5, 2),
        ("tuned-2", 34, 4, 6.0, 2),
        ("tuned-2", 35, 6, 1.5, 2),
        ("tuned-2", 36, 7, 5.0, 2),
        ("tuned-2", 37, 5, 3.0, 2),
        ("tuned-2", 38, 3, 2.5, 2)]


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


def segment(folder: str, out: str, track: bool, threshold: Optional[float], reuse: bool
            ) -> dict[str, list[list[dict]]]:
    """video stem -> per frame the jsonl instances (with masks). reuse: read an earlier run's."""
    if not (reuse and os.path.exists(os.path.join(out, "predictions.jsonl"))):
        run(RunConfig(inputs=[folder], out=out, formats=("jsonl",), model=MODEL, rle=True, track=track,
                      threshold=threshold, overwrite=True, workers=0))
    per: dict[str, dict[int, list]] = {}
    with open(os.path.join(out, "predictions.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            per.setdefault(os.path.splitext(os.path.basename(rec["video"]))[0], {})[rec["frame"]] = rec["instances"]
    return {v: [d[k] for k in sorted(d)] for v, d in per.items()}


def above(frames: list[list[dict]], t: float) -> list[list[dict]]:
    return [[i for i in f if i["score"] >= t] for f in frames]


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


def oracle_ids(truth: list[dict], frames: list[list[dict]]) -> list[list[Optional[int]]]:
    """The bound any tracker has on these detections: each visible object's best-IoU detection
    (IoU >= 0.5) gets the object's true id, every other detection is left out."""
    out = []
    for gt, inst in zip(truth, frames):
        ids: list[Optional[int]] = [None] * len(inst)
        g = list(gt)
        if g and inst:
            iou = mask_utils.iou([i["segmentation"] for i in inst], [rle(gt[k]) for k in g], [0] * len(g))
            good = np.where(iou >= 0.5, 1 + iou, 0.0)  # the most matches, then the best IoU
            for r, c in zip(*linear_sum_assignment(-good)):
                if iou[r, c] >= 0.5:
                    ids[r] = g[c]
        out.append(ids)
    return out


def replay(frames: list[list[dict]], video: str, threshold: float = 0.5, config: Optional[TrackerConfig] = None
           ) -> tuple[list[list[dict]], list[list[Optional[int]]]]:
    """--track replayed on an untracked run's instances (score >= the tracker's low) through the
    real stage (tracking/stage.py), then the writers' filter (score >= threshold): what a --track run
    writes, without running the model again (main checks that it equals the real run)."""
    stage = TrackingStage(config or TrackerConfig())
    kept, ids = [], []
    for k, inst in enumerate(frames):
        h, w = inst[0]["segmentation"]["size"] if inst else (H, W)
        insts = [Instance(n + 1, i["label"], i["category_id"], i["category_id"], i["score"], tuple(i["bbox"]),
                          i["area"], i["segmentation"]) for n, i in enumerate(inst)]
        r = ImageResult(ImageRef(video, video, f"{video}/{k:06d}", k), w, h, insts,
                        np.zeros((h, w), np.uint16), threshold)
        stage.track(r)
        out = r.instances_above(threshold)
        kept.append([{"segmentation": i.rle, "score": i.score} for i in out])
        ids.append([i.track_id for i in out])
    return kept, ids


def hota(truth: list[dict], frames: list[list[dict]], ids: list[list]) -> Optional[dict]:
    """TrackEval's HOTA on one video (similarity: mask IoU); None without trackeval."""
    if HOTA is None:
        return None
    gmap, tmap = {}, {}
    data = {"gt_ids": [], "tracker_ids": [], "similarity_scores": [], "num_timesteps": len(truth)}
    for gt, inst, hid in zip(truth, frames, ids):
        keep = [k for k, h in enumerate(hid) if h is not None]
        g = list(gt)
        data["gt_ids"].append(np.array([gmap.setdefault(i, len(gmap)) for i in g], int))
        data["tracker_ids"].append(np.array([tmap.setdefault(hid[k], len(tmap)) for k in keep], int))
        sim = np.zeros((len(g), len(keep)))
        if g and keep:
            sim = mask_utils.iou([inst[k]["segmentation"] for k in keep], [rle(gt[i]) for i in g], [0] * len(g)).T
        data["similarity_scores"].append(sim)
    data.update(num_gt_ids=len(gmap), num_tracker_ids=len(tmap),
                num_gt_dets=sum(len(x) for x in data["gt_ids"]),
                num_tracker_dets=sum(len(x) for x in data["tracker_ids"]))
    return HOTA().eval_sequence(data)


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


METRICS = ["idf1", "num_switches", "mota", "num_false_positives", "num_misses", "num_fragmentations"]


def score(truths: dict, runs: dict[str, dict]) -> tuple[list[tuple], dict]:
    """runs: tracker -> video -> (frames, ids). (one row per tracker: IDF1, switches, MOTA, FP, misses,
    fragmentations, HOTA (nan without trackeval); tracker -> its accumulator, for the pooled figures)."""
    mh, rows, accs = mm.metrics.create(), [], {}
    for who, per in runs.items():
        acc, parts = mm.MOTAccumulator(auto_id=True), {}
        accs[who] = acc
        for n_v, (v, truth) in enumerate(truths.items()):
            accumulate(acc, n_v, truth, *per[v])
            parts[v] = hota(truth, *per[v])
        s = mh.compute(acc, metrics=METRICS, name=who).iloc[0].tolist()
        h = float(np.mean(HOTA().combine_sequences(parts)["HOTA"])) if HOTA is not None else float("nan")
        rows.append((who, *s, h))
    return rows, accs


def markdown(rows: list[tuple], accs: dict) -> None:
    """accs: (set, tracker) -> its motmetrics accumulator, (set, "videos") -> its number of videos.
    The results table, then per set the issue's targets: IDF1 >= naive + 0.15 (and the oracle's
    room), ID switches <= a third of the naive's."""
    print("| set | tracker | IDF1 | ID sw | MOTA | FP | misses | frag | HOTA |\n|---|---|---|---|---|---|---|---|---|")
    for k, (name, who, idf1, sw, mota, fp, miss, frag, h) in enumerate(rows):
        first = name if k == 0 or rows[k - 1][0] != name else ""
        print(f"| {first} | {who} | {idf1:.3f} | {int(sw)} | {mota:.3f} | {int(fp)} | {int(miss)} | {int(frag)} | {h:.3f} |")
    print("\n| set | IDF1 gain (oracle's room) | IDF1 target | ID switches (naive) | switch target |\n|---|---|---|---|---|")
    by = {(r[0], r[1]): r for r in rows}
    for name in dict.fromkeys(r[0] for r in rows):
        m, n, o = by[(name, "m2f --track")], by[(name, "naive")], by[(name, "oracle")]
        print(f"| {name} | {m[2] - n[2]:+.3f} ({o[2] - n[2]:+.3f}) | {'yes' if m[2] - n[2] >= 0.15 else 'no'} "
              f"| {int(m[3])} ({int(n[3])}) | {'yes' if 3 * m[3] <= n[3] else 'no'} |")
    summary(rows, accs, True)


def targets(rows: list[tuple]) -> list[tuple[str, float, bool, bool]]:
    """Per set: (role, IDF1 gain over naive, IDF1 target met, switch target met)."""
    by = {(r[0], r[1]): r for r in rows}
    out = []
    for name in dict.fromkeys(r[0] for r in rows):
        m, n = by[(name, "m2f --track")], by[(name, "naive")]
        out.append((name.split(":")[0], m[2] - n[2], m[2] - n[2] >= 0.15, 3 * m[3] <= n[3]))
    return out


def role_groups(rows: list[tuple]) -> list[tuple[str, list[str]]]:
    """(role, its sets' names), per role and, with two tuned roles or more, all tuned roles together."""
    names = list(dict.fromkeys(r[0] for r in rows))
    roles = list(dict.fromkeys(n.split(":")[0] for n in names))
    groups = [(r, [n for n in names if n.split(":")[0] == r]) for r in roles]
    tuned = [r for r in roles if r.startswith("tuned")]
    if len(tuned) > 1:
        groups.append(("all tuned", [n for n in names if n.split(":")[0] in tuned]))
    return groups


def pooled(names: list[str], accs: dict) -> dict[str, tuple[float, int]]:
    """tracker -> (IDF1, ID switches) over all the videos of these sets together (motmetrics'
    OVERALL row: IDF1 from the summed ID true/false positives and negatives, switches summed)."""
    mh, out = mm.metrics.create(), {}
    for who in ("naive", "m2f --track", "oracle"):
        df = mh.compute_many([accs[(n, who)] for n in names], metrics=["idf1", "num_switches"],
                             names=list(names), generate_overall=True)
        out[who] = (float(df.loc["OVERALL", "idf1"]), int(df.loc["OVERALL", "num_switches"]))
    return out


def pooled_summary(rows: list[tuple], accs: dict, md: bool) -> None:
    """Per role, the issue's own measure: IDF1 and ID switches pooled over all the role's videos,
    m2f against naive (IDF1 gain >= 0.15, switches <= a third of naive's), the oracle's IDF1."""
    head = ("role", "videos", "IDF1 naive", "m2f", "oracle", "gain", "IDF1 target", "ID sw m2f (naive)",
            "switch target")
    if md:
        print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    else:
        print(f"\n{'pooled':12} {'videos':>6} {'naive':>6} {'m2f':>6} {'oracle':>6} {'gain':>7} {'IDF1':>4}"
              f" {'sw m2f (naive)':>14} {'sw':>3}")
    for role, names in role_groups(rows):
        p = pooled(names, accs)
        (n, n_sw), (m, m_sw), (o, _) = p["naive"], p["m2f --track"], p["oracle"]
        videos = sum(accs[(x, "videos")] for x in names)
        idf, sw = "yes" if m - n >= 0.15 else "no", "yes" if 3 * m_sw <= n_sw else "no"
        if md:
            print(f"| {role} | {videos} | {n:.3f} | {m:.3f} | {o:.3f} | {m - n:+.3f} | {idf} | {m_sw} ({n_sw}) | {sw} |")
        else:
            print(f"{role:12} {videos:6d} {n:6.3f} {m:6.3f} {o:6.3f} {m - n:+7.3f} {idf:>4} {m_sw:>6} ({n_sw:>5}) {sw:>3}")


def summary(rows: list[tuple], accs: dict, md: bool) -> None:
    """Per role (and all tuned roles together): sets, mean IDF1 gain, sets meeting the IDF1 target,
    the switch target, both; then the pooled figures (pooled_summary)."""
    t = dict(zip(dict.fromkeys(r[0] for r in rows), targets(rows)))
    groups = [(role, [t[n] for n in names]) for role, names in role_groups(rows)]
    if md:
        print("\n| role | sets | mean IDF1 gain | IDF1 target | switch target | both |\n|---|---|---|---|---|---|")
    else:
        print(f"\n{'role':12} {'sets':>4} {'mean gain':>9} {'IDF1 met':>8} {'sw met':>6} {'both':>4}")
    for role, xs in groups:
        k, gain = len(xs), float(np.mean([x[1] for x in xs]))
        idf, sw, both = (sum(x[2] for x in xs), sum(x[3] for x in xs), sum(x[2] and x[3] for x in xs))
        if md:
            print(f"| {role} | {k} | {gain:+.3f} | {idf}/{k} | {sw}/{k} | {both}/{k} |")
        else:
            print(f"{role:12} {k:4d} {gain:+9.3f} {idf:>6}/{k} {sw:>4}/{k} {both:>2}/{k}")
    pooled_summary(rows, accs, md)


def make_set(folder: str, seed: int, n: int, speed: float, count: int, frames: int) -> dict:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    truths = {}
    for v in range(count):
        video, truths[f"clip{v}"] = moving_shapes(rng, n, speed, frames)
        path = os.path.join(folder, f"clip{v}.mp4")
        if not os.path.exists(path):
            write_video(path, frames=video, rate=10, size=(W, H))
    return truths


def tracker_config(settings: list[str]) -> TrackerConfig:
    """TrackerConfig from KEY=VALUE strings (each value of the default's type; bools: 1/0, true/false)."""
    kw = {}
    for k, v in (x.split("=", 1) for x in settings):
        default = getattr(TrackerConfig(), k)
        kw[k] = v.lower() in ("1", "true") if isinstance(default, bool) else type(default)(v)
    return TrackerConfig(**kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--out", default="/tmp/track_bench")
    ap.add_argument("--sets", default="all", help="a role (tuned: also tuned-2), comma-separated roles, or all")
    ap.add_argument("--tracker", action="append", default=[], metavar="KEY=VALUE",
                    help="a TrackerConfig setting for the replay (repeatable)")
    ap.add_argument("--reuse", action="store_true", help="reuse the untracked run of an earlier run in --out")
    ap.add_argument("--markdown", action="store_true", help="the tables as Markdown, with the targets")
    ap.add_argument("--replay", action="store_true", help="m2f --track replayed on the raw run (no tracked run)")
    a = ap.parse_args()
    rows, accs, want = [], {}, a.sets.split(",")
    config = tracker_config(a.tracker)
    for role, seed, n, speed, count in SETS:
        if "all" not in want and not any(role == w or role.startswith(w + "-") for w in want):
            continue
        name = f"{role}: seed {seed}, {n} shapes, {speed:g} px/frame"
        folder = os.path.join(a.out, f"videos-{seed}-{n}-{speed:g}-{a.frames}")
        truths = make_set(folder, seed, n, speed, count, a.frames)
        raw = segment(folder, folder + "-raw", False, TrackerConfig().low, a.reuse)
        runs = {"naive": {v: (above(raw[v], 0.5), naive_ids(above(raw[v], 0.5))) for v in truths},
                "m2f --track": {v: replay(raw[v], v, config=config) for v in truths}}
        if not a.replay:
            tracked = segment(folder, folder + "-tracked", True, None, False)
            real = {v: (tracked[v], [[i.get("track_id") for i in f] for f in tracked[v]]) for v in truths}
            same = all(real[v][1] == runs["m2f --track"][v][1] for v in truths)
            print(f"{name}: the replay {'equals' if same else 'DIFFERS FROM'} the --track run", flush=True)
            runs["m2f --track"] = real
        runs["oracle"] = {v: (above(raw[v], 0.5), oracle_ids(truths[v], above(raw[v], 0.5))) for v in truths}
        got, by_who = score(truths, runs)
        rows += [(name, *r) for r in got]
        accs.update({(name, who): acc for who, acc in by_who.items()})
        accs[(name, "videos")] = len(truths)
    if a.markdown:
        markdown(rows, accs)
        return
    print(f"{'set':44} {'tracker':12} {'IDF1':>6} {'IDsw':>5} {'MOTA':>6} {'FP':>5} {'miss':>5} {'frag':>5} {'HOTA':>6}")
    for name, who, idf1, sw, mota, fp, miss, frag, h in rows:
        print(f"{name:44} {who:12} {idf1:6.3f} {int(sw):5d} {mota:6.3f} {int(fp):5d} {int(miss):5d} {int(frag):5d} {h:6.3f}")
    summary(rows, accs, False)


if __name__ == "__main__":
    main()
