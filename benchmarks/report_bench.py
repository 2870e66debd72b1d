"""How fast is ``m2f report``, and how much memory does it take, on a big output folder?

Synthesises a run's output folder without any model (``synthesise``: small input JPEGs, 16-bit PNG
maps, sidecars with real COCO RLE, m2f-run.json, failures.jsonl, a settings record), then times
``build_report`` on it and prints images/s and the peak RSS of this process.

    python benchmarks/report_bench.py --images 10000            # into a temporary folder
    python benchmarks/report_bench.py --images 10000 --out /tmp/bench10k --keep

tests/test_report.py builds small folders with ``synthesise`` too.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

# (label, COCO id) of the synthetic classes: a few common, some rare
CLASSES = [("person", 1), ("car", 3), ("dog", 18), ("cat", 17), ("bicycle", 2), ("bench", 15),
           ("kite", 38), ("clock", 85), ("zebra", 24), ("toothbrush", 90)]
WEIGHTS = np.array([30, 20, 10, 10, 8, 8, 5, 5, 3, 1], float)


def _image(rng: np.random.Generator, w: int, h: int) -> bytes:
    base = rng.integers(40, 200, 3)
    grad = np.linspace(0, 50, w, dtype=np.float32)[None, :, None]
    arr = np.clip(base + grad + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def synthesise(out: str, n: int, seed: int = 0, failures: int = 0, size: tuple = (160, 120),
               empty_every: int = 7) -> dict:
    """An output folder of n images as ``m2f segment -f png`` leaves it, inputs in out/../inputs.
    Every empty_every-th image has no instance; failures lines go to failures.jsonl. Returns the
    expected totals: images, instances, no_instance, per-class counts."""
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(seed)
    inputs = os.path.join(os.path.dirname(os.path.abspath(out)), os.path.basename(out) + "-inputs")
    os.makedirs(inputs, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    totals = {"images": n, "instances": 0, "no_instance": 0, "classes": {}}
    probs = WEIGHTS / WEIGHTS.sum()
    for k in range(n):
        sub = f"part{k % 4}"
        rel = f"{sub}/img{k:06d}"
        os.makedirs(os.path.join(out, sub), exist_ok=True)
        src = os.path.join(inputs, rel + ".jpg")
        os.makedirs(os.path.dirname(src), exist_ok=True)
        with open(src, "wb") as f:
            f.write(_image(rng, w, h))
        count = 0 if k % empty_every == 0 else int(rng.integers(1, 6))
        imap = np.zeros((h, w), np.uint16)
        scores = np.sort(rng.uniform(0.5, 1.0, count))[::-1]
        insts = []
        for j in range(count):
            label, cid = CLASSES[int(rng.choice(len(CLASSES), p=probs))]
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(6, 40)
            m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            if not m.any():
                m[int(min(h - 1, max(0, cy))), int(min(w - 1, max(0, cx)))] = True
            imap[m & (imap == 0)] = j + 1
            ys, xs = np.nonzero(m)
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            insts.append({"id": j + 1, "label": label, "category_id": cid, "score": round(float(scores[j]), 6),
                          "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                          "area": int(m.sum()), "segmentation": rle})
            totals["classes"][label] = totals["classes"].get(label, 0) + 1
        totals["instances"] += count
        totals["no_instance"] += count == 0
        buf = io.BytesIO()
        Image.fromarray(imap).save(buf, format="PNG", compress_level=1)
        with open(os.path.join(out, rel + ".png"), "wb") as f:
            f.write(buf.getvalue())
        doc = {"image": src, "name": rel + ".jpg", "width": w, "height": h, "model": "synthetic/benchmark",
               "revision": None, "task": "instance", "threshold": 0.5, "top_k": 100, "instances": insts}
        with open(os.path.join(out, rel + ".json"), "w", encoding="utf-8") as f:
            json.dump(doc, f)
    with open(os.path.join(out, "failures.jsonl"), "w", encoding="utf-8") as f:
        for k in range(failures):
            f.write(json.dumps({"path": os.path.join(inputs, f"broken{k}.jpg"), "stage": "decode",
                                "error": "cannot identify image file"}) + "\n")
    manifest = {"formats": ["png"], "shard": None, "complete": failures == 0, "total": n + failures, "images": n,
                "skipped": 0, "failed": failures, "instances": totals["instances"], "wall_s": n * 1.1,
                "images_per_s": 1 / 1.1, "interrupted": None, "stopped_early": False,
                "exit_code": 3 if failures else 0, "stages": {"decode": n * 0.01, "forward": n * 1.0}}
    with open(os.path.join(out, "m2f-run.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.makedirs(os.path.join(out, ".m2f"), exist_ok=True)
    with open(os.path.join(out, ".m2f", "png.settings.json"), "w", encoding="utf-8") as f:
        json.dump({"writer": "png", "schema": 1, "m2f": "0.1.0",
                   "settings": {"model": {"spec": "synthetic/benchmark", "commit": None}, "task": "instance",
                                "resize": "checkpoint", "dtype": "float32", "top_k": 100, "classes": [],
                                "threshold": 0.5}}, f)
    return totals


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--out", help="folder to synthesise into (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the folder")
    ap.add_argument("--reuse", action="store_true", help="--out is already synthesised: only build")
    args = ap.parse_args()
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.mkdtemp(prefix="m2f-report-bench-")
        out = os.path.join(tmp, "out")
    try:
        if not args.reuse:
            t0 = time.perf_counter()
            synthesise(out, args.images, failures=max(1, args.images // 1000))
            print(f"synthesised {args.images} images in {time.perf_counter() - t0:.1f} s", flush=True)
        rss0 = peak_rss_mb()
        from m2f_cli.tools.report import build_report
        t0 = time.perf_counter()
        s = build_report(out)
        dt = time.perf_counter() - t0
        print(s.line())
        print(f"build_report: {s.images} images in {dt:.2f} s = {s.images / dt:.0f} images/s; "
              f"gallery {s.gallery} cards, {s.drawn} thumbnails drawn; peak RSS {peak_rss_mb():.0f} MB "
              f"(before the report: {rss0:.0f} MB); {os.cpu_count()} CPUs")
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
