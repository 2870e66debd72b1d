#!/usr/bin/env python
"""Is INT8 worth an option on this CPU? Dynamic quantisation of the linear layers, measured.

Loads one checkpoint, makes a copy whose nn.Linear layers are dynamically quantised to int8
(torch.ao.quantization.quantize_dynamic: int8 weights, activations quantised per batch at run
time; the convolutions and the deformable attention stay float32), and prints for both:
  - forward seconds per image at the checkpoint's input size, batch 1, min of --repeat (eager, m2f's
    embedding_bag deformable attention);
  - the agreement of the int8 instances with the float32 ones on --n images (dtype_agreement.compare:
    matched instances, mean/min mask IoU, pixel agreement, the largest logit differences).
A probe, not a feature: m2f has no INT8 option unless this shows it pays (docs/performance.md).

    python benchmarks/int8_probe.py                                        # benchmark checkpoint
    python benchmarks/int8_probe.py --model tests/fixtures/shapes_model --images DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/int8_probe.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder [the benchmark's random-weight Swin-T]")
    ap.add_argument("--images", default=None, help="image folder [the benchmark's coco640 set]")
    ap.add_argument("--n", type=int, default=4, help="images for the agreement [4]")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default=os.path.join(HERE, "_work"))
    args = ap.parse_args(argv)

    from dtype_agreement import compare, default_inputs
    default_inputs(args)

    import torch
    from m2f_cli.model.loading import HFPredictor, load_model, resolve_model
    from m2f_cli.inputs.preprocess import load_checkpoint_spec

    source = resolve_model(args.model)
    model = load_model(source).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices (torchao is its successor)
        qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    cpu = torch.device("cpu")
    spec = load_checkpoint_spec(source.local_dir)
    predictors = {"float32": HFPredictor(model, cpu), "int8-dynamic": HFPredictor(qmodel, cpu)}
    size = spec.padded_size(1, 1) if spec.mode == "fixed" else (384, 384)
    x = torch.randn(1, 3, *size)
    seconds = {}
    for name, p in predictors.items():
        p(x)  # warm-up
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            p(x)
            best = min(best, time.perf_counter() - t0)
        seconds[name] = round(best, 3)
        print(f"{name}: forward {best:.3f} s at {size[0]}x{size[1]}", flush=True)
    files, agreement, logit_diff, _ = compare(predictors, spec, args.images, args.n)
    print(json.dumps({"model": source.local_dir, "n": len(files), "threads": torch.get_num_threads(),
                      "forward_s": seconds, "speedup": round(seconds["float32"] / seconds["int8-dynamic"], 2),
                      "max_logit_diff": logit_diff, **agreement}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
