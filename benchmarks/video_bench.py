#!/usr/bin/env python
"""Videos: m2f on a video vs m2f on the same frames as PNG images vs the model-card snippet looped
over PyAV frames, in one run, on the same local checkpoint; and decode seconds per frame.

    python benchmarks/video_bench.py                         # 640x360, 48 frames (a few minutes on 2 cores)
    python benchmarks/video_bench.py --size 1920x1080 --frames 24 --m2f-args="--every 2"
    python benchmarks/video_bench.py --model DIR --frames 6  # a quick check with any save_pretrained folder

Inputs are made here and cached in --work (nothing is downloaded): an H.264 video (libx264 through
PyAV, --rate fps, a keyframe every 2 s) of a photo-like scene (bench_inputs.photo_like) panning a
few pixels a frame; the same frames decoded once with PyAV and saved as PNGs; and the full-size
random-weight checkpoint of benchmarks/run.py (or --model). Each of the three runs is its own
process, timed by this script from just before it starts to its exit (imports and model loading
included) with run.run_child (peak RSS from wait4(2)):

  1. m2f segment VIDEO --out OUT --model CKPT --overwrite -q [--m2f-args]   (frames read in a worker)
  2. m2f segment PNG_DIR ... (the same frames as images)
  3. this script's --child-snippet: PyAV decode -> frame.to_image() -> AutoImageProcessor ->
     model(**inputs) under no_grad -> post_process_instance_segmentation -> a 16-bit PNG per frame:
     what a user adds to the model card to run it over a video.

Decode seconds per frame are measured in this process on the cached video: PyAV alone (decode and
to_ndarray rgb24) and m2f's reader (video.read_frames: the same, plus the display matrix and the
selection); m2f's own decode stage per frame (in its DataLoader worker, first open included) is read
from run 1's summary.
The machine may be shared: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python benchmarks/video_bench.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="640x360", help="frame size WxH [640x360]")
    ap.add_argument("--frames", type=int, default=48, help="frames in the video [48]")
    ap.add_argument("--rate", type=int, default=24, help="the video's frame rate [24]")
    ap.add_argument("--work", default=os.path.join(HERE, "_work"), help="cache and outputs [benchmarks/_work]")
    ap.add_argument("--model", default=None, metavar="DIR", help="a save_pretrained folder instead of the "
                    "generated full-size checkpoint")
    ap.add_argument("--m2f-args", default="", metavar="ARGS", help="extra m2f segment arguments (one string)")
    ap.add_argument("--skip-snippet", action="store_true", help="run m2f only")
    ap.add_argument("--timeout", type=float, default=None, metavar="S", help="kill a run after S seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, metavar="FILE", help="also save every measurement to FILE")
    ap.add_argument("--child-snippet", nargs=4, metavar=("VIDEO", "CKPT", "OUT", "TIMINGS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.m2f_args = shlex.split(args.m2f_args)
    w, _, h = args.size.partition("x")
    args.wh = (int(w), int(h))
    return args


# ----------------------------------------------------------------------------------------------
# inputs

def ensure_video(work: str, wh: tuple[int, int], frames: int, rate: int, seed: int) -> tuple[str, str]:
    """(the cached H.264 video, a folder with its frames as PNGs as PyAV decodes them)."""
    import av
    import numpy as np
    import bench_inputs
    folder = os.path.join(work, f"video-{wh[0]}x{wh[1]}-{frames}f-{rate}fps-s{seed}")
    video, pngs = os.path.join(folder, "clip.mp4"), os.path.join(folder, "frames")
    if os.path.exists(os.path.join(folder, "done")):
        return video, pngs
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(pngs)
    scene = np.asarray(bench_inputs.photo_like(wh[0] + frames * 4, wh[1], seed))
    with av.open(video, "w") as c:
        s = c.add_stream("libx264", rate=rate, options={"crf": "23", "g": str(2 * rate)})
        s.width, s.height, s.pix_fmt = wh[0], wh[1], "yuv420p"
        for k in range(frames):  # a slow pan: every frame differs, as in a real recording
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(scene[:, 4 * k:4 * k + wh[0]]), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with av.open(video) as c:
        for k, f in enumerate(c.decode(c.streams.video[0])):
            f.to_image().save(os.path.join(pngs, f"{k:06d}.png"), compress_level=1)
    open(os.path.join(folder, "done"), "w").close()
    return video, pngs


def decode_seconds(video: str) -> dict:
    """Seconds per frame: PyAV decode + RGB conversion alone, and m2f's reader; both with FFmpeg's
    own decoding threads as m2f sets them (thread_type AUTO)."""
    import av
    from m2f_cli.inputs.video import read_frames
    out = {}
    with av.open(video) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        t0, n = time.perf_counter(), 0
        for f in c.decode(s):
            f.to_ndarray(format="rgb24")
            n += 1
        out["pyav_s_per_frame"] = (time.perf_counter() - t0) / max(n, 1)
    t0, n = time.perf_counter(), 0
    for _ in read_frames(video):
        n += 1
    out["m2f_reader_s_per_frame"] = (time.perf_counter() - t0) / max(n, 1)
    out["frames"] = n
    return out


# ----------------------------------------------------------------------------------------------
# the snippet over PyAV frames (a child process)

def child_snippet(video: str, ckpt: str, out: str, timings: str) -> int:
    t0 = time.monotonic()
    import av
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation
    processor = AutoImageProcessor.from_pretrained(ckpt)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(ckpt).eval()
    t_loaded = time.monotonic()
    os.makedirs(out, exist_ok=True)
    stages = dict(decode=0.0, preprocess=0.0, forward=0.0, postprocess=0.0, write=0.0)
    n = 0
    with av.open(video) as container:
        frames = container.decode(container.streams.video[0])
        while True:
            a = time.monotonic()
            frame = next(frames, None)
            if frame is None:
                break
            image = frame.to_image()
            b = time.monotonic()
            inputs = processor(images=image, return_tensors="pt")
            c = time.monotonic()
            with torch.no_grad():
                outputs = model(**inputs)
            d = time.monotonic()
            result = processor.post_process_instance_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
            e = time.monotonic()
            seg = result["segmentation"]
            seg_map = np.zeros(image.size[::-1], np.uint16) if seg is None else \
                (seg + 1).to(torch.int32).numpy().astype(np.uint16)
            Image.fromarray(seg_map).save(os.path.join(out, f"{n:06d}.png"))
            f_ = time.monotonic()
            for k, v in zip(stages, (b - a, c - b, d - c, e - d, f_ - e)):
                stages[k] += v
            n += 1
    with open(timings, "w") as f:
        json.dump({"frames": n, "load_s": t_loaded - t0, "loop_s": time.monotonic() - t_loaded,
                   "stages": stages}, f)
    return 0


# ----------------------------------------------------------------------------------------------
# the runs

def _m2f(inputs: str, ckpt: str, out: str, summary: str, env: dict, args, logname: str) -> dict:
    from run import run_child
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "m2f_cli", "segment", inputs, "--out", out, "--model", ckpt, "--overwrite",
           "--summary-json", summary, "-q", *args.m2f_args]
    r = run_child(cmd, env, logname, args.timeout, 0.25)
    if r["rc"] == 0 and os.path.exists(summary):
        with open(summary) as f:
            r["summary"] = json.load(f)
        r["frames"] = r["summary"]["images"]
    return r


def _snippet(video: str, ckpt: str, out: str, env: dict, args, logname: str) -> dict:
    from run import run_child
    timings = os.path.join(os.path.dirname(out), "snippet-timings.json")
    shutil.rmtree(out, ignore_errors=True)
    r = run_child([sys.executable, os.path.abspath(__file__), "--child-snippet", video, ckpt, out, timings],
                  env, logname, args.timeout, 0.25)
    if r["rc"] == 0:
        with open(timings) as f:
            r["timings"] = json.load(f)
        r["frames"] = r["timings"]["frames"]
    return r


def report(runs: dict, decode: dict, video_line: str) -> str:
    base = runs.get("snippet")
    base_fps = base["frames"] / base["exit_s"] if base and base.get("frames") else None
    lines = [video_line, "", "| run | frames | wall s | frames/s | / snippet | peak RSS MB |", "|---|---|---|---|---|---|"]
    names = {"m2f_video": "m2f on the video", "m2f_png": "m2f on the same frames as PNGs",
             "snippet": "model-card snippet over PyAV frames"}
    for key, name in names.items():
        r = runs.get(key)
        if r is None:
            continue
        if not r.get("frames"):
            lines.append(f"| {name} | failed (exit {r['rc']}, log {r['log']}) | | | | |")
            continue
        fps = r["frames"] / r["exit_s"]
        ratio = f"{fps / base_fps:.2f}x" if base_fps else "-"
        lines.append(f"| {name} | {r['frames']} | {r['exit_s']:.1f} | {fps:.2f} | {ratio} | {r['maxrss_mb']:.0f} |")
    m2f = runs.get("m2f_video", {}).get("summary")
    stage = f"{m2f['stages']['decode'] / max(m2f['images'], 1) * 1000:.2f} ms" if m2f else "-"
    lines += ["", f"decode s/frame: PyAV alone {decode['pyav_s_per_frame'] * 1000:.2f} ms, m2f's reader "
              f"{decode['m2f_reader_s_per_frame'] * 1000:.2f} ms (this process, {decode['frames']} frames); "
              f"m2f's decode stage in its worker {stage}"]
    if m2f:
        s = m2f["stages"]
        lines.append("m2f on the video, stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_snippet:
        return child_snippet(*args.child_snippet)
    import bench_inputs
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    if args.model:
        ckpt = os.path.abspath(args.model)
    else:
        ckpt, _ = bench_inputs.ensure_checkpoint(work, args.seed, 12.0, 0.08, log)
    video, pngs = ensure_video(work, args.wh, args.frames, args.rate, args.seed)
    env = dict(os.environ, HF_HUB_OFFLINE="1", M2F_BACKGROUND_BUILD="off",
               M2F_CACHE_DIR=os.path.join(work, "m2f-cache"))
    runs_dir = os.path.join(os.path.dirname(video), "runs")
    os.makedirs(runs_dir, exist_ok=True)
    decode = decode_seconds(video)
    runs = {}
    log("m2f on the video ...")
    runs["m2f_video"] = _m2f(video, ckpt, os.path.join(runs_dir, "m2f-video"), os.path.join(runs_dir, "s-video.json"),
                             env, args, os.path.join(runs_dir, "m2f-video.log"))
    log("m2f on the PNG frames ...")
    runs["m2f_png"] = _m2f(pngs, ckpt, os.path.join(runs_dir, "m2f-png"), os.path.join(runs_dir, "s-png.json"),
                           env, args, os.path.join(runs_dir, "m2f-png.log"))
    if not args.skip_snippet:
        log("the snippet over PyAV frames ...")
        runs["snippet"] = _snippet(video, ckpt, os.path.join(runs_dir, "snippet"), env, args,
                                   os.path.join(runs_dir, "snippet.log"))
    line = (f"video: {args.frames} frames {args.wh[0]}x{args.wh[1]} H.264 at {args.rate} fps; checkpoint {ckpt}; "
            f"m2f args: {shlex.join(args.m2f_args) or '(none)'}; load average {os.getloadavg()[0]:.1f}")
    print(report(runs, decode, line))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "decode": decode, "video": video}, f, indent=1, default=str)
    return 0 if all(r.get("frames") for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
