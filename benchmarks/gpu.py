#!/usr/bin/env python
"""m2f vs the model-card snippet on a CUDA card: fp32, bf16 and fp16, with a batch-size sweep.

    python benchmarks/gpu.py                          # coco640 x 2000, fp32/bf16/fp16, batch 1,4,8,16,32 + auto
    python benchmarks/gpu.py --n 500 --batch-sizes 8,16 --dtypes bfloat16
    python benchmarks/gpu.py --model /path/to/save_pretrained_folder --sets coco640,1080p
    python benchmarks/gpu.py --json gpu.json          # every number, for the record

For each image set and dtype, on the same local checkpoint and images (benchmarks/bench_inputs.py: the
full-size random-weight Swin-T checkpoint calibrated to ~12 instances an image, or --model DIR), each
tool in its own process:
  1. the model-card snippet (benchmarks/snippet.py --device cuda --dtype D): one image at a time,
     model and inputs cast to D, processor.post_process_instance_segmentation;
  2. `m2f segment SET --out OUT --model CKPT --device cuda --dtype D --batch-size B --summary-json S -q`
     for each B of --batch-sizes, and once with m2f's own choice ("auto").

Printed per run: images/s over the process's wall time (start-up and model loading included, as in
benchmarks/run.py: use enough images), m2f/snippet at the same dtype, m2f's stage seconds
(--summary-json: decode and preprocess are summed over its workers; forward is device time from CUDA
events; postprocess is main-thread time) and the GPU's busy fraction: NVML's utilization (the share of
each sample period in which a kernel ran; nvidia-ml-py, else `nvidia-smi`), sampled every
--sample-interval s, averaged over the process's life ("busy") and over its working span, from the
first to the last sample with any kernel ("busy run"). Targets (issue 15): m2f >= 5x the snippet, and
busy > 80% on 640x480 JPEGs.

Without a CUDA device it says so and exits 0 (nothing is generated); `--device cpu` runs the same
driver on the CPU in float32 only, to check the script itself (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

STAGES = ("decode", "preprocess", "forward", "postprocess", "write", "idle")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class GpuSampler(threading.Thread):
    """Samples the GPU's utilization (%) every interval seconds while a child runs."""

    def __init__(self, index: int, interval: float):
        super().__init__(daemon=True)
        self.index, self.interval = index, interval
        self.samples: list[tuple[float, float]] = []  # (monotonic time, utilization %)
        self.stop = threading.Event()
        self.source = "none"
        self._read = self._nvml() or self._smi()

    def _nvml(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:
            return None
        self.source = "nvml"
        return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def _smi(self):
        if shutil.which("nvidia-smi") is None:
            return None
        self.source = "nvidia-smi"

        def read():
            out = subprocess.run(["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip().splitlines()[0])
        return read

    def run(self):
        while self._read is not None and not self.stop.is_set():
            try:
                self.samples.append((time.monotonic(), self._read()))
            except Exception:
                pass
            self.stop.wait(self.interval)

    def busy(self) -> tuple[Optional[float], Optional[float]]:
        """(mean utilization over all samples, over the first..last sample with any kernel), 0..1."""
        if not self.samples:
            return None, None
        util = [u for _, u in self.samples]
        active = [i for i, u in enumerate(util) if u > 0]
        span = util[active[0]:active[-1] + 1] if active else [0.0]
        return sum(util) / len(util) / 100.0, sum(span) / len(span) / 100.0


def run_child(cmd: list[str], env: dict, log_path: str, gpu: Optional[int], interval: float) -> dict:
    sampler = GpuSampler(gpu, interval) if gpu is not None else None
    if sampler:
        sampler.start()
    t0 = time.monotonic()
    with open(log_path, "wb") as logf:
        rc = subprocess.run(cmd, env=env, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
    t1 = time.monotonic()
    out = {"cmd": cmd, "rc": rc, "wall_s": t1 - t0, "log": log_path, "t_start": t0}
    if sampler:
        sampler.stop.set()
        sampler.join()
        out["busy"], out["busy_run"] = sampler.busy()
        out["busy_source"] = sampler.source
    return out


def run_snippet(set_dir, ckpt, work, dtype, device, env, args) -> dict:
    out_dir = os.path.join(work, f"out-snippet-{dtype}")
    shutil.rmtree(out_dir, ignore_errors=True)
    timings = os.path.join(work, f"snippet-{dtype}.json")
    cmd = [sys.executable, os.path.join(HERE, "snippet.py"), set_dir, "--model", ckpt, "--out", out_dir,
           "--timings", timings, "--device", device, "--dtype", dtype]
    r = run_child(cmd, env, os.path.join(work, f"snippet-{dtype}.log"), args.gpu_index if device != "cpu" else None,
                  args.sample_interval)
    r.update(tool="snippet", dtype=dtype, batch="1")
    if r["rc"] != 0 or not os.path.exists(timings):
        r["error"] = f"exit code {r['rc']} (see {r['log']})"
        return r
    with open(timings) as f:
        t = json.load(f)
    r["images"], r["instances"], r["stages"] = t["images"], t["instances"], t["stages"]
    r["wall_s"] = t["t_last_write"] - r["t_start"]
    return r


def run_m2f(set_dir, ckpt, work, dtype, batch, device, env, args) -> dict:
    out_dir = os.path.join(work, f"out-m2f-{dtype}-b{batch}")
    shutil.rmtree(out_dir, ignore_errors=True)
    summary = os.path.join(work, f"m2f-{dtype}-b{batch}.json")
    if os.path.exists(summary):
        os.remove(summary)
    cmd = [sys.executable, "-m", "m2f_cli", "segment", set_dir, "--out", out_dir, "--model", ckpt, "--device",
           device, "--dtype", dtype, "--overwrite", "--summary-json", summary, "-q", *args.m2f_args]
    if batch != "auto":
        cmd += ["--batch-size", str(batch)]
    r = run_child(cmd, env, os.path.join(work, f"m2f-{dtype}-b{batch}.log"),
                  args.gpu_index if device != "cpu" else None, args.sample_interval)
    r.update(tool="m2f", dtype=dtype, batch=str(batch))
    if r["rc"] != 0 or not os.path.exists(summary):
        r["error"] = f"exit code {r['rc']} (see {r['log']})"
        return r
    with open(summary) as f:
        s = json.load(f)
    r["images"], r["instances"] = s["images"], s["instances"]
    r["stages"] = {k: float(s["stages"].get(k, 0.0)) for k in STAGES}
    if s.get("failed"):
        r["error"] = f"{s['failed']} image(s) failed"
    return r


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def table(rows: list[dict]) -> str:
    head = ["set", "dtype", "tool", "batch", "img/s", "m2f/snippet", "busy", "busy run", "instances",
            *[f"{k} s" for k in STAGES], "error"]
    snippet_ips = {(r["set"], r["dtype"]): r.get("ips") for r in rows if r["tool"] == "snippet"}
    lines = []
    for r in rows:
        base = snippet_ips.get((r["set"], r["dtype"]))
        ratio = r["ips"] / base if r["tool"] == "m2f" and r.get("ips") and base else None
        st = r.get("stages", {})
        lines.append([r["set"], r["dtype"], r["tool"], r["batch"], _f(r.get("ips")), _f(ratio),
                      _f(r.get("busy"), "{:.0%}"), _f(r.get("busy_run"), "{:.0%}"), str(r.get("instances", "-")),
                      *[_f(st.get(k)) for k in STAGES], r.get("error", "")])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(ln) for ln in lines])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="coco640", help="image sets (bench_inputs.IMAGE_SETS), comma-separated")
    ap.add_argument("--n", type=int, default=2000, help="images per set")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--batch-sizes", default="1,4,8,16,32", help="m2f --batch-size values; 'auto' is added")
    ap.add_argument("--model", help="a local save_pretrained folder instead of the generated checkpoint")
    ap.add_argument("--work", default=os.path.join(HERE, "_work"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only checks the script")
    ap.add_argument("--skip-snippet", action="store_true")
    ap.add_argument("--m2f-args", type=lambda s: s.split(), default=[], help="extra m2f options, one string")
    ap.add_argument("--sample-interval", type=float, default=0.1, help="GPU utilization sampling period (s)")
    ap.add_argument("--json", help="write every run's numbers here")
    args = ap.parse_args(argv)

    on_cpu = args.device == "cpu"
    if not on_cpu and not cuda_available():
        print("benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False): nothing to "
              "measure. Run it on a machine with an NVIDIA GPU; `--device cpu` only checks the script.")
        return 0
    args.gpu_index = None if on_cpu else (int(args.device.split(":")[1]) if ":" in args.device else 0)
    import bench_inputs
    dtypes = ["float32"] if on_cpu else [d.strip() for d in args.dtypes.split(",") if d.strip()]
    batches = [b.strip() for b in args.batch_sizes.split(",") if b.strip()] + ["auto"]
    work = os.path.abspath(args.work)
    ckpt = args.model or bench_inputs.ensure_checkpoint(work, args.seed, 12.0, 0.08)[0]
    env = dict(os.environ, HF_HUB_OFFLINE="1", M2F_CACHE_DIR=os.path.join(work, "m2f-cache"),
               PYTHONPATH=os.pathsep.join([os.path.join(REPO, "src"), os.environ.get("PYTHONPATH", "")]))
    import torch
    name = torch.cuda.get_device_name(args.gpu_index) if not on_cpu else "CPU (script check only)"
    print(f"device: {name}; torch {torch.__version__}; {os.cpu_count()} CPUs; checkpoint {ckpt}")
    rows = []
    for set_name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        set_dir = bench_inputs.ensure_image_set(work, set_name, args.n, args.seed)
        run_dir = os.path.join(work, "gpu-runs", set_name)
        os.makedirs(run_dir, exist_ok=True)
        for dtype in dtypes:
            runs = [] if args.skip_snippet else [run_snippet(set_dir, ckpt, run_dir, dtype, args.device, env, args)]
            runs += [run_m2f(set_dir, ckpt, run_dir, dtype, b, args.device, env, args) for b in batches]
            for r in runs:
                r["set"] = set_name
                r["ips"] = r["images"] / r["wall_s"] if r.get("images") and r.get("wall_s") else None
                rows.append(r)
                print(f"  {set_name} {dtype} {r['tool']} batch {r['batch']}: {_f(r['ips'])} img/s"
                      + (f", busy {_f(r.get('busy'), '{:.0%}')}" if r.get("busy") is not None else "")
                      + (f" [{r['error']}]" if r.get("error") else ""), flush=True)
    print()
    print(table(rows))
    busy_src = next((r.get("busy_source") for r in rows if r.get("busy_source")), "none")
    print(f"\nbusy: GPU utilization from {busy_src}, every {args.sample_interval} s; img/s over each process's "
          f"wall time (start-up included)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
