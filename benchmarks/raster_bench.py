"""Tiles per second and peak memory of ``m2f segment --tile`` on a TIFF larger than memory.

A benchmark, not a test: it writes one large RGB TIFF (tiled 256x256 Deflate by default; --striped:
uncompressed strips of 256 rows; --bigtiff) tile by tile, never whole in memory, holding the shapes the trained fixture knows
(tests/fixtures/shapes_model: discs, rings, triangles, squares in their class colours, radius
23..61 px, as in its own 256 px images) on a smooth background with noise; then runs ``m2f segment``
on it with --max-pixels below its size, so that it is read window by window (src/m2f_cli/tiling/stream.py),
writing -f coco -f geojson -f jsonl, in a fresh process, and prints: the run's seconds, tiles,
tiles/s, instances, and peak memory of the whole process tree (m2f and its DataLoader workers),
sampled every 0.2 s from /proc: the largest sum of RSS (shared pages counted in every process: an
upper bound) and of PSS (shared pages split between the processes that share them).

    python benchmarks/raster_bench.py                              # 20 MP, --tile 256,0.25 (~1-2 min)
    python benchmarks/raster_bench.py --megapixels 50
    python benchmarks/raster_bench.py --megapixels 300 --bigtiff   # ~3.3 GB decoded; a few minutes
    python benchmarks/raster_bench.py --megapixels 50 --decoded    # also the whole-image path, for scale

Everything lives under benchmarks/_work/raster (git-ignored; --work to move it).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "shapes_model")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import shapes  # noqa: E402

SIDE = 256  # the TIFF's own tiles (or rows per strip)


def _shapes(rng: np.random.Generator, h: int, w: int, n: int) -> list[tuple]:
    """n shapes: (kind, cy, cx, r, param, colour); param: ring hole ratio, square/triangle angle."""
    out = []
    for _ in range(n):
        label = int(rng.integers(0, 4))
        r = float(rng.uniform(0.09, 0.24) * 256)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        hue = (shapes.HUE_CENTRES[label] + rng.uniform(-shapes.HUE_HALF_WIDTH, shapes.HUE_HALF_WIDTH)) % 1.0
        col = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0))) * 255
        param = rng.uniform(0.45, 0.65) if label == 2 else rng.uniform(0, 2 * math.pi)
        out.append((shapes.SHAPES[label], cy, cx, r, param, col))
    return out


def _inside(kind: str, y: np.ndarray, x: np.ndarray, r: float, param: float) -> np.ndarray:
    """Pixels of a shape centred at 0 (y, x: pixel centres relative to it)."""
    if kind in ("disc", "ring"):
        d2 = x * x + y * y
        return (d2 <= r * r) & (d2 >= (param * r) ** 2 if kind == "ring" else True)
    if kind == "square":
        u, v = x * math.cos(param) + y * math.sin(param), -x * math.sin(param) + y * math.cos(param)
        return (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r)
    m = np.ones(x.shape, bool)
    pts = [(1.15 * r * math.cos(param + 2 * math.pi * k / 3), 1.15 * r * math.sin(param + 2 * math.pi * k / 3))
           for k in range(3)]
    for k in range(3):
        (x0, y0), (x1, y1) = pts[k], pts[(k + 1) % 3]
        m &= (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0
    return m


def write_tiff(path: str, megapixels: float, density: float, seed: int, striped: bool, bigtiff: bool) -> tuple[int, int]:
    """A 3:2 RGB TIFF of about `megapixels` MP, `density` shapes per MP, written tile by tile."""
    import tifffile

    h = math.ceil(math.sqrt(megapixels * 1e6 / 1.5) / SIDE) * SIDE  # at least the megapixels asked for
    w = math.ceil(h * 1.5 / SIDE) * SIDE
    rng = np.random.default_rng(seed)
    items = _shapes(rng, h, w, int(density * h * w / 1e6))
    grid: dict[tuple[int, int], list[tuple]] = {}
    for s in items:  # which TIFF tiles each shape reaches
        reach = 1.2 * s[3]
        for i in range(int(max(0, s[1] - reach)) // SIDE, int(min(h - 1, s[1] + reach)) // SIDE + 1):
            for j in range(int(max(0, s[2] - reach)) // SIDE, int(min(w - 1, s[2] + reach)) // SIDE + 1):
                grid.setdefault((i, j), []).append(s)
    base = rng.uniform(60, 200, 3)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) + 0.5

    def tile(i: int, j: int, rows: int, cols: int) -> np.ndarray:
        y, x = yy[:rows] + i * SIDE, xx[:rows, :cols] + j * SIDE
        y = y[:, :cols]
        t = np.empty((rows, cols, 3), np.float32)
        for c in range(3):  # a smooth background: gradients and slow blotches, different per channel
            t[..., c] = base[c] + 25 * np.sin(y / (700 + 90 * c)) * np.cos(x / (900 - 80 * c)) + 10 * np.sin((x + y) / 210)
        for kind, cy, cx, r, param, col in grid.get((i, j), []):
            m = _inside(kind, y - cy, x - cx, r, param)
            t[m] = col
        t += rng.normal(0, 4, (rows, cols, 1))
        return np.clip(t, 0, 255).astype(np.uint8)

    if striped:  # uncompressed strips of SIDE rows, written band by band into a memory-mapped file
        m = tifffile.memmap(path, shape=(h, w, 3), dtype=np.uint8, photometric="rgb", rowsperstrip=SIDE,
                            bigtiff=bigtiff)
        for i in range(h // SIDE):
            m[i * SIDE:(i + 1) * SIDE] = np.concatenate([tile(i, j, SIDE, SIDE) for j in range(w // SIDE)], axis=1)
            m.flush()
        del m
    else:
        tiles = (tile(i, j, SIDE, SIDE) for i in range(h // SIDE) for j in range(w // SIDE))
        tifffile.imwrite(path, tiles, shape=(h, w, 3), dtype=np.uint8, tile=(SIDE, SIDE), compression="zlib",
                         photometric="rgb", bigtiff=bigtiff)
    return w, h


def _tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/*/stat parent ids)."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = open(f"/proc/{d}/stat").read()
                parents.setdefault(int(st[st.rindex(")") + 2:].split()[1]), []).append(int(d))
            except OSError:
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def _memory(pids: list[int]) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in KiB over pids."""
    rss = pss = 0
    for p in pids:
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def measure(args: list[str], env: dict) -> dict:
    """Run one m2f command, sampling its process tree's memory; wall seconds and peaks (MiB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "m2f_cli", *args], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    peak_rss = peak_pss = procs = 0
    while p.poll() is None:
        pids = _tree(p.pid)
        rss, pss = _memory(pids)
        peak_rss, peak_pss, procs = max(peak_rss, rss), max(peak_pss, pss), max(procs, len(pids))
        time.sleep(0.2)
    err = p.stderr.read()
    if p.returncode != 0:
        raise SystemExit(f"m2f {' '.join(args)} exited {p.returncode}:\n{err[-3000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_tree_mib": round(peak_rss / 1024),
            "peak_pss_tree_mib": round(peak_pss / 1024), "processes": procs, "stderr": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megapixels", type=float, default=20.0)
    ap.add_argument("--density", type=float, default=12.0, help="shapes per megapixel (tile_bench: 12)")
    ap.add_argument("--tile", default="256,0.25")
    ap.add_argument("--striped", action="store_true", help="strips of 256 rows instead of 256x256 tiles")
    ap.add_argument("--bigtiff", action="store_true")
    ap.add_argument("--decoded", action="store_true", help="also run with the image decoded whole (--max-pixels above it)")
    ap.add_argument("--model", default=FIXTURE)
    ap.add_argument("--m2f-args", default="", help="extra m2f options, one quoted string")
    ap.add_argument("--work", default=os.path.join(ROOT, "benchmarks", "_work", "raster"))
    ap.add_argument("--json", help="save the figures to this file")
    a = ap.parse_args()

    os.makedirs(a.work, exist_ok=True)
    kind = ("striped" if a.striped else "tiled") + ("-bigtiff" if a.bigtiff else "")
    img = os.path.join(a.work, f"raster_{a.megapixels:g}mp_{kind}.tif")
    if not os.path.exists(img):
        t0 = time.perf_counter()
        write_tiff(img + ".part", a.megapixels, a.density, 0, a.striped, a.bigtiff)
        os.replace(img + ".part", img)
        print(f"wrote {img} ({os.path.getsize(img) / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    import tifffile
    with tifffile.TiffFile(img) as tf:
        h, w = tf.pages[0].shape[:2]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    settings = [("windowed", str(max(1, h * w // 4)))]
    if a.decoded:
        settings.append(("decoded", str(h * w + 1)))
    runs = {}
    for name, max_px in settings:
        out = os.path.join(a.work, f"out_{name}")
        summary = os.path.join(a.work, f"summary_{name}.json")
        cmd = ["segment", img, "--out", out, "--model", a.model, "--tile", a.tile, "-f", "coco", "-f", "geojson",
               "-f", "jsonl", "--overwrite", "--max-pixels", max_px, "--summary-json", summary, *a.m2f_args.split()]
        r = measure(cmd, env)
        s = json.load(open(summary))
        lines = [ln for ln in r.pop("stderr").splitlines() if " px in " in ln]
        tiles = int(lines[0].split(" in ")[-1].split()[0]) if lines else 0
        runs[name] = {**r, "run_s": s["wall_s"], "tiles": tiles, "tiles_per_s": round(tiles / max(s["wall_s"], 1e-9), 1),
                      "instances": s["instances"], "failed": s["failed"], "stages": s["stages"],
                      "command": "m2f " + " ".join(cmd)}
    print(f"\nraster: {w}x{h} = {w * h / 1e6:.1f} MP ({kind}, {os.path.getsize(img) / 2**20:.0f} MiB on disk, "
          f"{w * h * 3 / 2**20:.0f} MiB decoded); --tile {a.tile}; model {os.path.relpath(a.model, ROOT)}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'run':9} {'run s':>7} {'tiles':>6} {'tiles/s':>8} {'instances':>9} {'peak RSS tree':>14} "
          f"{'peak PSS tree':>14} {'procs':>5}")
    for name, r in runs.items():
        print(f"{name:9} {r['run_s']:>7.1f} {r['tiles']:>6} {r['tiles_per_s']:>8.1f} {r['instances']:>9} "
              f"{r['peak_rss_tree_mib']:>10} MiB {r['peak_pss_tree_mib']:>10} MiB {r['processes']:>5}")
    for name, r in runs.items():
        print(f"  {name}: {r['command']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"image": [w, h], "kind": kind, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
