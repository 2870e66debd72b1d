#!/usr/bin/env python
"""m2f vs the model-card snippet, side by side, in one run.

For each image set, in the same run and on the same local checkpoint:
  1. the model-card snippet (benchmarks/snippet.py) in its own process: Image.open -> RGB,
     AutoImageProcessor, model(**inputs) under no_grad, post_process_instance_segmentation,
     a PNG + JSON per image;
  2. `m2f segment SET --out OUT --model CKPT --overwrite --summary-json S.json -q [--m2f-args]`
     in its own process.
Each process is timed by this script from just before it starts (so imports and model loading are
included): the snippet until its last file is written, m2f until it exits. Peak RSS is the
child's ru_maxrss from wait4(2) (the largest single process of its tree: with DataLoader
workers the parent or one worker, not their sum); "tree PSS" is the largest sampled sum of
proportional set sizes over the whole process tree (workers included, shared pages counted once).

Inputs are generated locally and cached in --work (nothing is downloaded):
  - a full-size random-weight Mask2Former with the architecture of
    facebook/mask2former-swin-tiny-coco-instance (heads calibrated so ~12 instances per image pass
    the 0.5 threshold: see benchmarks/bench_inputs.py), or --model DIR;
  - photo-like JPEG sets: coco640 (~640x480, mixed orientations), 1080p (1920x1080),
    12mp (4000x3000).

Both processes get the same environment: this one's, plus HF_HUB_OFFLINE=1 and any --env; thread
settings are left at torch's defaults (m2f's --threads/--workers can go in --m2f-args).

m2f's start-up cache (a TorchScript trace of the model, built on a model's first use, that later
runs load without importing transformers: src/m2f_cli/model/startup/traced.py) lives in --work/m2f-cache here,
never in ~/.cache. --trace-cache picks the state m2f is measured in:
  compiled (default)  every run on a machine after a one-time `m2f cache build` (the model
                  compiled for this CPU, src/m2f_cli/model/startup/compiled.py; or, at a terminal, once the
                  first run's detached build has finished): built before the timed runs
                  (untimed, its time is printed);
  warm            the trace only (no C++ compiler, or `m2f cache build --trace`): built untimed;
  cold            every timed m2f run starts with an empty cache (a first run: not at a
                  terminal, it builds nothing and leaves nothing running);
  off             m2f --startup-cache off: every run loads the model through transformers.

The machine may be shared: compare the two tools within one run (ratios), not absolute numbers
across runs; --repeat R alternates the order of the two tools and reports medians.

Examples:
  python benchmarks/run.py                                   # default: all sets, ~5-10 min on 2 cores
  python benchmarks/run.py --sets coco640 --n 2              # a quick check
  python benchmarks/run.py --m2f-args "--dtype bfloat16" --skip-snippet
  python benchmarks/run.py --env MALLOC_MMAP_THRESHOLD_=4294967296 --json results.json
  python benchmarks/run.py --n coco640=16,12mp=2 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench_inputs  # noqa: E402

DEFAULT_SETS = "coco640,1080p,12mp"
DEFAULT_N = {"coco640": 8, "1080p": 4, "12mp": 4, "crowded": 4}
STAGES = ("decode", "preprocess", "forward", "postprocess", "write", "idle")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# arguments

def parse_n(text: Optional[str], sets: list[str]) -> dict[str, int]:
    n = {s: DEFAULT_N.get(s, 4) for s in sets}
    if not text:
        return n
    if "=" not in text:
        v = int(text)
        return {s: v for s in sets}
    for part in text.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in bench_inputs.IMAGE_SETS:
            raise SystemExit(f"--n: unknown set {k!r}")
        n[k.strip()] = int(v)
    return n


def parse_args(argv=None) -> argparse.Namespace:
    sets_help = "; ".join(f"{k}: {v[0]} (default --n {DEFAULT_N[k]})" for k, v in bench_inputs.IMAGE_SETS.items())
    ap = argparse.ArgumentParser(
        prog="python benchmarks/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Reading the output: see benchmarks/README.md.")
    ap.add_argument("--sets", default=DEFAULT_SETS, help=f"comma-separated image sets [{DEFAULT_SETS}]. {sets_help}")
    ap.add_argument("--n", default=None, metavar="N|SET=N,...",
                    help="images per set: one number for every set, or per set (coco640=16,12mp=2); "
                         "sets not named keep their default")
    ap.add_argument("--work", default=os.path.join(HERE, "_work"),
                    help="work folder: cached checkpoint, images, outputs, logs [benchmarks/_work, git-ignored]")
    ap.add_argument("--model", default=None, metavar="DIR",
                    help="use this save_pretrained folder (with preprocessor_config.json) instead of "
                         "generating the random-weight checkpoint")
    ap.add_argument("--m2f-args", default="", metavar="ARGS",
                    help='extra arguments for m2f segment, one shell-quoted string (e.g. "--dtype bfloat16")')
    ap.add_argument("--skip-snippet", action="store_true", help="run m2f only")
    ap.add_argument("--skip-m2f", action="store_true", help="run the snippet only")
    ap.add_argument("--repeat", type=int, default=1, metavar="R",
                    help="run each tool R times per set, alternating which goes first; tables show medians [1]")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for BOTH processes (repeatable), e.g. "
                         "MALLOC_MMAP_THRESHOLD_=4294967296 or LD_PRELOAD=...")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated images and checkpoint [0]")
    ap.add_argument("--instances", type=float, default=12.0,
                    help="generated checkpoint: target mean instances per image above 0.5 [12]")
    ap.add_argument("--mask-area", type=float, default=0.08,
                    help="generated checkpoint: target mean fraction of the image a mask covers [0.08]")
    ap.add_argument("--timeout", type=float, default=None, metavar="S",
                    help="kill a tool's process after S seconds (recorded as a failure)")
    ap.add_argument("--mem-interval", type=float, default=1.0, metavar="S",
                    help="sampling period of the process-tree PSS, 0 to disable [1.0]. Each sample "
                         "walks the tree's page tables (/proc/PID/smaps_rollup) and stalls the "
                         "process meanwhile: every 0.25 s it cost a 14 s first run of m2f 1.5 s "
                         "and the snippet 0.9 s")
    ap.add_argument("--trace-cache", choices=("warm", "compiled", "cold", "off"), default="compiled",
                    help="the state of m2f's start-up cache in the timed runs (see above) [warm]")
    ap.add_argument("--json", default=None, metavar="FILE", help="also save every measurement to FILE")
    args = ap.parse_args(argv)
    args.sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    for s in args.sets:
        if s not in bench_inputs.IMAGE_SETS:
            ap.error(f"--sets: unknown set {s!r}; expected some of {', '.join(bench_inputs.IMAGE_SETS)}")
    try:
        args.n = parse_n(args.n, args.sets)
    except ValueError:
        ap.error("--n: expected N or SET=N,...")
    if any(v < 1 for v in args.n.values()):
        ap.error("--n: expected at least 1 image per set")
    if args.repeat < 1:
        ap.error("--repeat: expected 1 or more")
    if args.skip_snippet and args.skip_m2f:
        ap.error("--skip-snippet and --skip-m2f: nothing left to run")
    env = {}
    for e in args.env:
        k, sep, v = e.partition("=")
        if not sep or not k:
            ap.error(f"--env {e!r}: expected KEY=VALUE")
        env[k] = v
    args.env = env
    try:
        args.m2f_args = shlex.split(args.m2f_args)
    except ValueError as e:
        ap.error(f"--m2f-args: {e}")
    return args


# ----------------------------------------------------------------------------------------------
# running a child process: wall time, ru_maxrss, sampled tree PSS

def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        ppid = int(data[data.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree_pss_kb(root: int) -> int:
    kids = _children_map()
    todo, total = [root], 0
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


class _MemSampler(threading.Thread):
    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_kb = pid, interval, 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak_kb = max(self.peak_kb, _tree_pss_kb(self.pid))
            self.stop.wait(self.interval)


def run_child(cmd: list[str], env: dict, log_path: str, timeout: Optional[float], mem_interval: float) -> dict:
    """Start cmd, wait for it with wait4(2). Times use time.monotonic() (system-wide on Linux)."""
    with open(log_path, "wb") as logf:
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    sampler = None
    if mem_interval > 0 and os.path.isdir("/proc"):
        sampler = _MemSampler(p.pid, mem_interval)
        sampler.start()
    timer = None
    if timeout:
        timer = threading.Timer(timeout, lambda: os.kill(p.pid, signal.SIGKILL))
        timer.start()
    _, status, ru = os.wait4(p.pid, 0)
    t1 = time.monotonic()
    p.returncode = os.waitstatus_to_exitcode(status)
    if timer:
        timer.cancel()
    if sampler:
        sampler.stop.set()
        sampler.join()
    return {"cmd": cmd, "rc": p.returncode, "t_start": t0, "t_exit": t1, "exit_s": t1 - t0,
            "maxrss_mb": ru.ru_maxrss / 1024.0, "tree_pss_peak_mb": (sampler.peak_kb / 1024.0) if sampler else None,
            "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "log": log_path}


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _preread(paths: list[str]) -> None:
    """Read files once so neither tool pays for a cold page cache."""
    for root in paths:
        files = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for fn in files:
            with open(fn, "rb") as f:
                while f.read(1 << 22):
                    pass


def run_snippet(set_dir: str, ckpt: str, work_set: str, tag: str, env: dict, args) -> dict:
    out = os.path.join(work_set, "out-snippet")
    shutil.rmtree(out, ignore_errors=True)
    timings = os.path.join(work_set, f"snippet-timings-{tag}.json")
    if os.path.exists(timings):
        os.remove(timings)
    cmd = [sys.executable, os.path.join(HERE, "snippet.py"), set_dir, "--model", ckpt, "--out", out,
           "--timings", timings]
    r = run_child(cmd, env, os.path.join(work_set, f"snippet-{tag}.log"), args.timeout, args.mem_interval)
    r["tool"] = "snippet"
    if r["rc"] != 0 or not os.path.exists(timings):
        r["error"] = f"exit code {r['rc']}"
        return r
    with open(timings) as f:
        t = json.load(f)
    r["inner"] = t
    r["images"] = t["images"]
    r["instances"] = t["instances"]
    r["wall_s"] = t["t_last_write"] - r["t_start"]          # process start -> last file written
    r["startup_s"] = t["t_loaded"] - r["t_start"]            # interpreter + imports + model load
    r["stages"] = dict(t["stages"])
    return r


def m2f_cache(args) -> str:
    return os.path.join(os.path.abspath(args.work), "m2f-cache")


def prime_m2f_cache(image: str, ckpt: str, env: dict, args) -> float:
    """--trace-cache warm: `m2f cache build --trace` (untimed) builds the start-up trace; its seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "m2f_cli", "cache", "build", "--model", ckpt, "--trace"],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def build_compiled(ckpt: str, env: dict, args) -> float:
    """--trace-cache compiled: `m2f cache build` (the AOTInductor package, untimed); its seconds."""
    m2f = list(args.m2f_args)
    dtype = m2f[m2f.index("--dtype") + 1] if "--dtype" in m2f[:-1] else "float32"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "m2f_cli", "cache", "build", "--model", ckpt, "--dtype", dtype],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_m2f(set_dir: str, ckpt: str, work_set: str, tag: str, env: dict, args) -> dict:
    out = os.path.join(work_set, "out-m2f")
    shutil.rmtree(out, ignore_errors=True)
    if args.trace_cache == "cold":
        shutil.rmtree(m2f_cache(args), ignore_errors=True)
    summary = os.path.join(work_set, f"m2f-summary-{tag}.json")
    if os.path.exists(summary):
        os.remove(summary)
    cmd = [sys.executable, "-m", "m2f_cli", "segment", set_dir, "--out", out, "--model", ckpt, "--overwrite",
           "--summary-json", summary, "-q", *args.m2f_args]
    if args.trace_cache == "off":
        cmd += ["--startup-cache", "off"]
    r = run_child(cmd, env, os.path.join(work_set, f"m2f-{tag}.log"), args.timeout, args.mem_interval)
    r["tool"] = "m2f"
    if r["rc"] != 0 or not os.path.exists(summary):
        r["error"] = f"exit code {r['rc']}" + ("" if os.path.exists(summary) else ", no summary JSON")
        return r
    with open(summary) as f:
        s = json.load(f)
    r["summary"] = s
    r["images"] = s["images"]
    r["instances"] = s.get("instances")
    r["wall_s"] = r["exit_s"]                                # process start -> exit
    r["stages"] = {k: float(s["stages"].get(k, 0.0)) for k in STAGES}
    r["pre_run_s"] = r["exit_s"] - float(s["wall_s"])         # interpreter + imports + CLI + exit
    if s.get("failed"):
        r["error"] = f"{s['failed']} image(s) failed"
    return r


# ----------------------------------------------------------------------------------------------
# reporting

def _median_run(runs: list[dict]) -> Optional[dict]:
    ok = [r for r in runs if "wall_s" in r and r.get("images")]
    if not ok:
        return None
    ok.sort(key=lambda r: r["wall_s"])
    return ok[(len(ok) - 1) // 2]


def _ips(r: Optional[dict]) -> Optional[float]:
    return r["images"] / r["wall_s"] if r and r.get("wall_s") else None


def _f(v, fmt="{:.2f}", none="-"):
    return none if v is None else fmt.format(v)


def _table(headers: list[str], rows: list[list[str]], align: str = "") -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    al = align or ("l" + "r" * (len(headers) - 1))

    def line(cells):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, al))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def report(results: list[dict], args) -> str:
    out = []
    reps = f" (median of {args.repeat} runs by wall time)" if args.repeat > 1 else ""
    rows = []
    for res in results:
        sn, mf = _median_run(res["snippet"]), _median_run(res["m2f"])
        si, mi = _ips(sn), _ips(mf)
        ratio = (mi / si) if si and mi else None
        inst = f"{_f(sn and sn.get('instances'), '{}')}/{_f(mf and mf.get('instances'), '{}')}"
        spread = ""
        if args.repeat > 1:
            def rng(runs):
                v = [r["images"] / r["wall_s"] for r in runs if r.get("wall_s") and r.get("images")]
                return f"{min(v):.2f}-{max(v):.2f}" if v else "-"
            spread = f"{rng(res['snippet'])} | {rng(res['m2f'])}"
        row = [res["set"], str(res["n"]), res["mp"],
               _f(si), _f(mi), _f(ratio, "{:.2f}x"),
               _f(sn and sn["wall_s"], "{:.1f}"), _f(mf and mf["wall_s"], "{:.1f}"),
               _f(sn and sn["maxrss_mb"] / 1024, "{:.2f}"), _f(mf and mf["maxrss_mb"] / 1024, "{:.2f}"),
               _f(sn and sn["tree_pss_peak_mb"] and sn["tree_pss_peak_mb"] / 1024, "{:.2f}"),
               _f(mf and mf["tree_pss_peak_mb"] and mf["tree_pss_peak_mb"] / 1024, "{:.2f}"),
               inst]
        if args.repeat > 1:
            row.append(spread)
        rows.append(row)
    headers = ["set", "images", "MP/img", "snippet img/s", "m2f img/s", "m2f/snippet", "snippet s", "m2f s",
               "snippet RSS GB", "m2f RSS GB", "snippet PSS GB", "m2f PSS GB", "instances s/m"]
    if args.repeat > 1:
        headers.append("img/s range s | m")
    out.append(f"Throughput{reps}: images / (process start -> snippet's last file written | m2f's exit)")
    out.append(_table(headers, rows))

    if not args.skip_m2f:
        rows = []
        for res in results:
            mf = _median_run(res["m2f"])
            if not mf:
                rows.append([res["set"]] + ["-"] * 10)
                continue
            w = mf["wall_s"]
            st = mf["stages"]
            other = w - sum(st.values())
            cells = [f"{st[k]:.2f} {100 * st[k] / w:4.1f}%" for k in STAGES]
            rows.append([res["set"], f"{w:.1f}"] + cells +
                        [f"{other:.2f} {100 * other / w:4.1f}%", f"{mf['pre_run_s']:.2f}",
                         f"{100 * (w - st['forward']) / w:.1f}%"])
        out.append("")
        out.append("m2f stages (seconds, % of m2f wall). decode+preprocess run in DataLoader workers and write "
                   "in a writer thread,\nconcurrently with forward, so they can overlap it; startup+other = wall "
                   "- all six; pre-run = wall - m2f's own wall_s\n(interpreter, imports, CLI, exit; model loading "
                   "is inside m2f's wall_s)")
        out.append(_table(["set", "wall s", *STAGES, "startup+other", "pre-run s", "outside fwd"], rows))

    if not args.skip_snippet:
        rows = []
        for res in results:
            sn = _median_run(res["snippet"])
            if not sn:
                rows.append([res["set"]] + ["-"] * 10)
                continue
            w = sn["wall_s"]
            st = sn["stages"]
            other = w - sn["startup_s"] - sum(st.values())
            cells = [f"{st[k]:.2f} {100 * st[k] / w:4.1f}%" for k in ("decode", "preprocess", "forward",
                                                                       "postprocess", "write")]
            rows.append([res["set"], f"{w:.1f}", f"{sn['startup_s']:.2f} {100 * sn['startup_s'] / w:4.1f}%"] + cells +
                        [f"{other:.2f}", f"{100 * (w - st['forward']) / w:.1f}%",
                         f"{sn['t_exit'] - sn['inner']['t_last_write']:.2f}"])
        out.append("")
        out.append("snippet stages (seconds, % of snippet wall; sequential, one image at a time; startup = "
                   "interpreter + imports + model load;\nexit s = process teardown after the last file, NOT in "
                   "its wall, while m2f's wall includes its own teardown)")
        out.append(_table(["set", "wall s", "startup", "decode", "preprocess", "forward", "postprocess",
                           "write", "other s", "outside fwd", "exit s"], rows))

    per_img = []
    for res in results:
        sn, mf = _median_run(res["snippet"]), _median_run(res["m2f"])
        parts = []
        if sn:
            n = sn["images"]
            parts.append(f"snippet fwd {sn['stages']['forward'] / n:.2f} post {sn['stages']['postprocess'] / n:.3f}")
        if mf:
            n = mf["images"]
            parts.append(f"m2f fwd {mf['stages']['forward'] / n:.2f} post {mf['stages']['postprocess'] / n:.3f} "
                         f"write {mf['stages']['write'] / n:.3f}")
        if parts:
            per_img.append(f"  {res['set']}: " + "; ".join(parts))
    if per_img:
        out.append("")
        out.append("Per image (s):\n" + "\n".join(per_img))
    for res in results:
        mf = _median_run(res["m2f"])
        if mf:
            w = mf["wall_s"]
            out.append(f"m2f {res['set']}: {100 * (w - mf['stages']['forward']) / w:.1f}% of wall time outside "
                       f"the forward pass")
    errors = [f"  {res['set']} {r['tool']}: {r['error']} (log: {r['log']})"
              for res in results for r in res["snippet"] + res["m2f"] if r.get("error")]
    if errors:
        out.append("")
        out.append("Problems:\n" + "\n".join(errors))
    return "\n".join(out)


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
MODEL_GFLOP = 78.0  # Swin-T Mask2Former at 384x384 (docs/performance.md)
_MATMUL = """
import json, time, torch
torch.set_num_threads({threads})
out = {{}}
for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    a, b = torch.randn(2048, 2048).to(dt), torch.randn(2048, 2048).to(dt)
    a @ b
    best = 1e9
    for _ in range(5 if dt == torch.float32 else 3):
        t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
        if best > 2: break
    out[name] = 2 * 2048 ** 3 / best / 1e9
out["bf16_kernels"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
out["threads"] = torch.get_num_threads()
print(json.dumps(out))
"""


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return []
    have = set(line.split(":", 1)[-1].split())
    return [f for f in CPU_FLAGS if f in have]


def matmul_bound(env: dict) -> Optional[dict]:
    """fp32 (and bf16) 2048x2048 matmul GFLOP/s with torch's default threads, in a child process
    with the benchmark's environment (ONEDNN_MAX_CPU_ISA etc. apply), and the forward's compute
    bound at fp32: MODEL_GFLOP / that rate."""
    threads = os.cpu_count() or 1
    try:
        out = subprocess.run([sys.executable, "-c", _MATMUL.format(threads=threads)], env=env,
                             capture_output=True, text=True, timeout=300)
        doc = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    doc["fp32_bound_s"] = MODEL_GFLOP / doc["fp32"]
    return doc


def machine_line(info: dict) -> str:
    mm = info.get("matmul") or {}
    bound = (f"fp32 matmul {mm['fp32']:.0f} GFLOP/s -> forward bound {mm['fp32_bound_s']:.2f} s "
             f"({MODEL_GFLOP:.0f} GFLOP); bf16 matmul {mm['bf16']:.0f} GFLOP/s "
             f"(oneDNN bf16 kernels: {'yes' if mm.get('bf16_kernels') else 'no'})") if mm else "matmul bound: not measured"
    return f"CPU: {info.get('cpu') or '?'}; flags: {' '.join(info.get('cpu_flags') or []) or '-'}; {bound}"


def environment(args, ckpt: str, ckpt_meta: Optional[dict]) -> dict:
    """Versions and machine facts, without importing torch here (this process stays small)."""
    from importlib import metadata

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    git = {}
    try:
        git["head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True, timeout=10).stdout.strip()
        st = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True,
                            text=True, timeout=10).stdout
        git["src_dirty"] = bool(st.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": platform.python_version(), "torch": version("torch"), "transformers": version("transformers"),
            "pillow": version("pillow"), "numpy": version("numpy"), "torchvision": version("torchvision"),
            "cpu": cpu, "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "git": git,
            "env_extra": args.env, "m2f_args": args.m2f_args, "checkpoint": ckpt, "checkpoint_meta": ckpt_meta,
            "loadavg_start": os.getloadavg()}


# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"note: 1-minute load average is {load:.1f} before starting: other work shares the CPU, "
            f"so absolute numbers are noisy (compare ratios within this run)")

    if args.model:
        ckpt = os.path.abspath(args.model)
        if not os.path.exists(os.path.join(ckpt, "config.json")):
            raise SystemExit(f"--model {args.model}: no config.json there")
        ckpt_meta = bench_inputs.read_checkpoint_meta(ckpt)
    else:
        ckpt, ckpt_meta = bench_inputs.ensure_checkpoint(work, args.seed, args.instances, args.mask_area, log)

    ckpts = {}
    if "crowded" in args.sets and not args.model:
        ckpts["crowded"] = bench_inputs.ensure_checkpoint(work, args.seed, bench_inputs.CROWDED_INSTANCES,
                                                          args.mask_area, log)
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["M2F_CACHE_DIR"] = m2f_cache(args)
    env["M2F_BACKGROUND_BUILD"] = "off"  # no detached build may run beside a timed process
    env.update(args.env)
    info = environment(args, ckpt, ckpt_meta)
    info["matmul"] = matmul_bound(env)
    log(machine_line(info))
    log(f"checkpoint: {ckpt}")
    for name, (path, _) in ckpts.items():
        log(f"checkpoint of the {name} set: {path}")
    log(f"torch {info['torch']}, transformers {info['transformers']}, {info['cores']} cores ({info['cpu']}); "
        f"m2f args: {shlex.join(args.m2f_args) or '(none)'}; extra env: {args.env or '(none)'}")

    primed_s = None
    # the cache is keyed by content: a package or trace left by an earlier benchmark run is still
    # right (and a compile takes minutes), so it is kept; warm turns the compiled cache off instead
    if args.trace_cache == "warm":
        env["M2F_STARTUP_CACHE"] = "trace"
    if args.trace_cache == "compiled" and not args.skip_m2f:
        primed_s = 0.0
        for path in {ckpts.get(name, (ckpt,))[0] for name in args.sets}:
            primed_s += build_compiled(path, env, args)
        log(f"m2f compiled model built by m2f cache build (untimed): {primed_s:.1f} s")
    if args.trace_cache == "warm" and not args.skip_m2f:
        first = bench_inputs.ensure_image_set(work, args.sets[0], args.n[args.sets[0]], args.seed, log)
        primed_s = prime_m2f_cache(os.path.join(first, sorted(os.listdir(first))[0]),
                                   ckpts.get(args.sets[0], (ckpt,))[0], env, args)
        for name, (path, _) in ckpts.items():
            if name != args.sets[0]:
                prime_m2f_cache(os.path.join(first, sorted(os.listdir(first))[0]), path, env, args)
        log(f"m2f start-up cache built by one untimed run on one image: {primed_s:.1f} s")
    info["trace_cache"] = args.trace_cache
    info["trace_cache_primed_s"] = primed_s

    results = []
    for name in args.sets:
        n = args.n[name]
        set_dir = bench_inputs.ensure_image_set(work, name, n, args.seed, log)
        desc = bench_inputs.describe_folder(set_dir)
        work_set = os.path.join(work, "runs", name)
        os.makedirs(work_set, exist_ok=True)
        _preread([set_dir, ckpt])
        res = {"set": name, "n": n, "folder": set_dir, "images_info": desc,
               "mp": f"{desc['megapixels'] / max(1, desc['files']):.2f}", "snippet": [], "m2f": []}
        log(f"[{name}] {n} images ({', '.join(desc['sizes'])}; {desc['mean_kb']:.0f} KB each)")
        for rep in range(args.repeat):
            order = ["snippet", "m2f"] if rep % 2 == 0 else ["m2f", "snippet"]
            for tool in order:
                if (tool == "snippet" and args.skip_snippet) or (tool == "m2f" and args.skip_m2f):
                    continue
                tag = f"r{rep}"
                fn = run_snippet if tool == "snippet" else run_m2f
                r = fn(set_dir, ckpts.get(name, (ckpt,))[0], work_set, tag, env, args)
                r["repeat"] = rep
                res[tool].append(r)
                if "wall_s" in r:
                    log(f"  {tool:7s} run {rep + 1}: {r['images']} images in {r['wall_s']:.1f} s "
                        f"({r['images'] / r['wall_s']:.2f} img/s), peak RSS {r['maxrss_mb'] / 1024:.2f} GB"
                        + (f"  [{r['error']}]" if r.get("error") else ""))
                else:
                    log(f"  {tool:7s} run {rep + 1}: FAILED ({r.get('error')}); last lines of {r['log']}:\n"
                        + _tail(r["log"]))
        results.append(res)

    info["loadavg_end"] = os.getloadavg()
    text = report(results, args)
    print()
    threads = next((r["inner"]["torch_threads"] for res in results for r in res["snippet"] if "inner" in r), None)
    info["snippet_torch_threads"] = threads
    print(f"m2f vs model-card snippet | torch {info['torch']} | transformers {info['transformers']} | "
          f"{info['cores']} cores" + (f", {threads} torch threads" if threads else "") +
          f" | git {info['git'].get('head', '?')}{' (src modified)' if info['git'].get('src_dirty') else ''}"
          f" | load avg {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}")
    print(machine_line(info) + (" | machine shared (load avg above 0.5 at the start)"
                                if info["loadavg_start"][0] > 0.5 else ""))
    for name, (_, meta) in ckpts.items():
        print(f"{name} set checkpoint: calibrated to ~{meta.get('target_instances')} instances/image")
    if ckpt_meta:
        cal = ckpt_meta.get("calibration", {})
        print(f"checkpoint: random weights ({ckpt_meta.get('params', 0) / 1e6:.1f} M params), calibrated to "
              f"~{ckpt_meta.get('target_instances')} instances/image, mask area ~{cal.get('mean_mask_area')}")
    print(f"m2f start-up cache: {args.trace_cache}" + (f" (built once beforehand, untimed: {primed_s:.1f} s)"
                                                       if primed_s is not None else ""))
    if args.m2f_args or args.env:
        print(f"m2f args: {shlex.join(args.m2f_args) or '-'} | extra env (both): {args.env or '-'}")
    sn_proc = next((r["inner"]["processor_class"] for res in results for r in res["snippet"] if "inner" in r), None)
    if sn_proc:
        print(f"snippet image processor: {sn_proc}")
    print(text)

    if args.json:
        doc = {"environment": info, "args": {k: v for k, v in vars(args).items()}, "results": results}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        log(f"saved {args.json}")
    failed = any(r.get("error") for res in results for r in res["snippet"] + res["m2f"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
