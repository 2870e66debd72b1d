#!/usr/bin/env python
"""Where the forward's time goes outside the matrix products: torch.profiler over m2f's eager
float32 forward (m2f's embedding_bag deformable attention), batch 1 at the checkpoint's input size.

Prints the ops by self CPU time, each op's share, and the split between matrix products and
convolutions (the part a faster GEMM speeds up) and everything else (memory shuffles, norms,
softmax, sampling), with the measured fp32 matmul rate and the compute bound it gives.

    python benchmarks/profile_forward.py [--model DIR] [--repeat 3] [--top 25]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
        "aten::mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::conv2d",
        "aten::_weight_int8pack_mm", "aten::mkldnn_rnn_layer")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/profile_forward.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder [the benchmark's random-weight Swin-T]")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--work", default=os.path.join(HERE, "_work"))
    args = ap.parse_args(argv)
    import bench_inputs
    if args.model is None:
        args.model, _ = bench_inputs.ensure_checkpoint(args.work, 0, 12.0, 0.08, print)

    import torch
    from torch.profiler import ProfilerActivity, profile
    from m2f_cli.model.loading import HFPredictor, load_model, resolve_model
    from m2f_cli.inputs.preprocess import load_checkpoint_spec
    source = resolve_model(args.model)
    spec = load_checkpoint_spec(source.local_dir)
    size = spec.padded_size(1, 1) if spec.mode == "fixed" else (384, 384)
    p = HFPredictor(load_model(source), torch.device("cpu"))
    x = torch.randn(1, 3, *size)
    p(x)
    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        p(x)
        best = min(best, time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        p(x)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM)
    print(f"forward {best:.3f} s (min of {args.repeat}), {torch.get_num_threads()} threads, {size[0]}x{size[1]}")
    print(f"profiled self CPU time {total / 1e6:.3f} s: matrix products + convolutions {100 * gemm / total:.1f}%, "
          f"everything else {100 * (total - gemm) / total:.1f}%")
    print(f"{'op':40s} {'self ms':>9s} {'share':>7s} {'calls':>6s}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"{e.key[:40]:40s} {e.self_cpu_time_total / 1e3:9.1f} {100 * e.self_cpu_time_total / total:6.1f}% "
              f"{e.count:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
