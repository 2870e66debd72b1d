"""Peak memory and seconds per image of ``m2f segment --tile`` on a synthetic 50 MP image.

A benchmark, not a test: it generates one large JPEG (default 8660x5773 = 50 MP) holding hundreds
of the shapes the trained fixture model knows (tests/fixtures/shapes_model: discs, triangles, rings,
squares in their class colours, scripts/shapes.py), at the size the fixture sees in its own
images, on a textured background; runs ``m2f segment`` on it in a fresh process per setting and
prints, per run: wall seconds (process start to exit), peak RSS of the largest process (the run
or its decode worker, from wait4), instances written and the run's own stage seconds.

    python benchmarks/tile_bench.py                          # --tile auto with the fixture (~2-4 min)
    python benchmarks/tile_bench.py --untiled                # also the whole image squashed, for scale
    python benchmarks/tile_bench.py --tile 512,0.2 --megapixels 24 --shapes 300
    python benchmarks/tile_bench.py --model _work/ckpt-...   # any save_pretrained folder (slower)

Everything lives under benchmarks/_work/tile (git-ignored; --work to move it).
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "shapes_model")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import shapes  # noqa: E402


def make_image(path: str, megapixels: float, n_shapes: int, seed: int = 0) -> tuple[int, int]:
    """A 3:2 JPEG of about `megapixels` MP with n_shapes shapes (radius 23..61 px, as in a 256 px
    fixture scene) on a smooth gradient with blotches and noise. Returns (width, height)."""
    h = int(math.sqrt(megapixels * 1e6 / 1.5))
    w = int(h * 1.5)
    rng = np.random.default_rng(seed)
    # the background at 1/16 size, enlarged (smooth), then full-size noise: cheap at 50 MP
    small = shapes._background(rng, max(1, h // 16), max(1, w // 16)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    d = ImageDraw.Draw(img)
    for _ in range(n_shapes):
        label = int(rng.integers(0, 4))
        r = float(rng.uniform(0.09, 0.24) * 256)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        hue = (shapes.HUE_CENTRES[label] + rng.uniform(-shapes.HUE_HALF_WIDTH, shapes.HUE_HALF_WIDTH)) % 1.0
        col = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)))
        kind = shapes.SHAPES[label]
        if kind in ("disc", "ring"):
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=col)
            if kind == "ring":
                q = r * rng.uniform(0.45, 0.65)
                bg = img.getpixel((int(min(w - 1, cx + 1.5 * r)), int(cy)))
                d.ellipse((cx - q, cy - q, cx + q, cy + q), fill=bg)
        else:
            n = 3 if kind == "triangle" else 4
            rr = r * (1.15 if n == 3 else 0.85 * math.sqrt(2))
            a0 = rng.uniform(0, 2 * math.pi)
            d.polygon([(cx + rr * math.cos(a0 + 2 * math.pi * k / n), cy + rr * math.sin(a0 + 2 * math.pi * k / n))
                       for k in range(n)], fill=col)
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + rng.normal(0, 4, (h, w, 1)).astype(np.int16)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=92)
    return w, h


def measure(args: list[str], env: dict) -> dict:
    """Run one m2f command; wall seconds and peak RSS (MiB) of its largest process."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "m2f_cli", *args], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"m2f {' '.join(args)} exited {code}:\n{err[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024), "stderr": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megapixels", type=float, default=50.0)
    ap.add_argument("--shapes", type=int, default=600, help="shapes drawn in the image")
    ap.add_argument("--model", default=FIXTURE, help="save_pretrained folder (default: the trained fixture)")
    ap.add_argument("--tile", default="auto", help="--tile value (auto: 2x the model's input side)")
    ap.add_argument("--tile-full", action="store_true", help="pass --tile-full too")
    ap.add_argument("--untiled", action="store_true", help="also run without --tile, for scale")
    ap.add_argument("--m2f-args", default="", help="extra m2f options, one quoted string")
    ap.add_argument("--work", default=os.path.join(ROOT, "benchmarks", "_work", "tile"))
    ap.add_argument("--json", help="save the figures to this file")
    ap.add_argument("--generate", help=argparse.SUPPRESS)  # internal: make the image in a child process
    a = ap.parse_args()
    if a.generate:
        make_image(a.generate, a.megapixels, a.shapes)
        return

    os.makedirs(a.work, exist_ok=True)
    img = os.path.join(a.work, f"big_{a.megapixels:g}mp_{a.shapes}.jpg")
    if not os.path.exists(img):
        # in a child: making the image peaks at ~1 GB, and Linux carries a parent's peak RSS into
        # the children it forks (exec keeps signal->maxrss), which would inflate every m2f figure
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate", img, "--megapixels", str(a.megapixels),
                        "--shapes", str(a.shapes)], check=True)
        print(f"generated {img} in {time.perf_counter() - t0:.0f} s")
    with Image.open(img) as im:
        w, h = im.size
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    runs = {}
    settings = [("tiled", ["--tile", a.tile] + (["--tile-full"] if a.tile_full else []))]
    if a.untiled:
        settings.append(("untiled", []))
    for name, extra in settings:
        out = os.path.join(a.work, f"out_{name}")
        summary = os.path.join(a.work, f"summary_{name}.json")
        cmd = ["segment", img, "--out", out, "--model", a.model, "-f", "png", "-f", "coco", "--overwrite",
               "--max-pixels", str(max(w * h, 89_478_485)), "--summary-json", summary, *extra, *a.m2f_args.split()]
        r = measure(cmd, env)
        s = json.load(open(summary))
        coco = json.load(open(os.path.join(out, "predictions.json")))
        tiles = [ln for ln in r.pop("stderr").splitlines() if " px in " in ln]
        runs[name] = {**r, "instances_png": s["instances"], "coco_records": len(coco),
                      "stages": s["stages"], "tiles": tiles[0].split("in ")[-1] if tiles else "-",
                      "command": "m2f " + " ".join(cmd)}
    print(f"\nimage: {w}x{h} = {w * h / 1e6:.1f} MP, {a.shapes} shapes drawn; model {os.path.relpath(a.model, ROOT)}; "
          f"{os.cpu_count()} CPUs")
    print(f"{'run':8} {'s/image':>8} {'peak RSS':>9} {'tiles':>10} {'instances':>9} {'forward s':>9} "
          f"{'postproc s':>10} {'write s':>7}")
    for name, r in runs.items():
        st = r["stages"]
        print(f"{name:8} {r['wall_s']:>8.1f} {r['peak_rss_mib']:>5} MiB {r['tiles']:>10} {r['instances_png']:>9} "
              f"{st['forward']:>9.1f} {st['postprocess']:>10.1f} {st['write']:>7.1f}")
    for name, r in runs.items():
        print(f"  {name}: {r['command']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"image": [w, h], "shapes": a.shapes, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
