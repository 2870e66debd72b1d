#!/usr/bin/env python
"""How far --dtype bfloat16 (or float16) masks agree with float32 masks of the same model.

Loads one checkpoint once and runs every image through it twice, in float32 and under autocast at
the other dtype, with m2f's own preprocessing and post-processing (Segmenter), then prints:
  - instances: matched one to one (same class, greedy by mask IoU >= 0.5, pycocotools RLE IoU),
    the matched fraction, mean and minimum IoU of the matches, the largest score difference;
  - pixels: the share of pixels whose drawn class agrees between the two instance maps;
  - logits: the largest absolute difference of class and mask logits;
  - forward seconds per image for both (meaningless as a speed figure where the CPU has no bf16
    kernels: m2f itself refuses --dtype bfloat16 there, this script does not, to measure agreement).

--compiled compares the start-up cache's compiled packages (src/m2f_cli/model/startup/compiled.py) of both dtypes
instead of eager autocast: what `m2f segment --dtype bfloat16` runs once the package exists (build
both first: `m2f cache build --model M` and `m2f cache build --model M --dtype bfloat16`, with the
same M2F_CACHE_DIR).

Examples:
  python benchmarks/dtype_agreement.py                                  # benchmark checkpoint, 8 coco640
  M2F_CACHE_DIR=benchmarks/_work/m2f-cache python benchmarks/dtype_agreement.py --compiled
  python benchmarks/dtype_agreement.py --model tests/fixtures/shapes_model --images DIR
  python benchmarks/dtype_agreement.py --device cuda --dtype float16 --n 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def default_inputs(args) -> None:
    """args.model / args.images left unset: the benchmark's random-weight checkpoint and its
    coco640 images (made once under args.work)."""
    import bench_inputs
    if args.model is None:
        args.model, _ = bench_inputs.ensure_checkpoint(args.work, 0, 12.0, 0.08, print)
    if args.images is None:
        args.images = bench_inputs.ensure_image_set(args.work, "coco640", args.n, 0, print)


def compare(predictors: dict, spec, images: str, n: int, threshold: float = 0.5):
    """Run the first n images of the folder images through two predictors (name -> predictor),
    with m2f's preprocessing and post-processing (Segmenter, preprocess spec `spec`). Returns
    (files, Agreement summary of the second against the first, largest class/mask logit
    differences, seconds per image of each)."""
    from m2f_cli.inputs.decode import decode
    from m2f_cli.tools.evaluate import Agreement
    from m2f_cli.segmenter import Segmenter

    class Recording:
        """The predictor, keeping the logits of its last call."""

        def __init__(self, predictor):
            self.predictor, self.device, self.categories = predictor, predictor.device, predictor.categories
            self.preprocess_spec = spec
            self.last = None

        def __call__(self, x):
            self.last = self.predictor(x)
            return self.last

    (a, pa), (b, pb) = predictors.items()
    segmenters = {a: Segmenter(Recording(pa), threshold=threshold), b: Segmenter(Recording(pb), threshold=threshold)}
    files = sorted(f for f in os.listdir(images) if f.lower().endswith((".jpg", ".jpeg", ".png")))[:n]
    agreement = Agreement()
    logit_diff = {"class": 0.0, "mask": 0.0}
    seconds = {name: 0.0 for name in segmenters}
    for f in files:
        rgb = decode(os.path.join(images, f)).rgb
        results = {}
        for name, seg in segmenters.items():
            t0 = time.perf_counter()
            results[name] = seg.segment([rgb])[0]
            seconds[name] += time.perf_counter() - t0
        for kind, x, y in zip(("class", "mask"), segmenters[a].predictor.last, segmenters[b].predictor.last):
            logit_diff[kind] = max(logit_diff[kind], float((x.float() - y.float()).abs().max()))
        agreement.add(results[a], results[b])
        print(f"{f}: {len(results[a].instances)} vs {len(results[b].instances)} instances", flush=True)
    return (files, agreement.summary(), {k: round(v, 4) for k, v in logit_diff.items()},
            {k: round(v / max(1, len(files)), 3) for k, v in seconds.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/dtype_agreement.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder [the benchmark's random-weight Swin-T]")
    ap.add_argument("--images", default=None, help="image folder [the benchmark's coco640 set]")
    ap.add_argument("--n", type=int, default=8, help="images to use [8]")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threshold", type=float, default=0.5, help="instance score threshold [0.5]")
    ap.add_argument("--work", default=os.path.join(HERE, "_work"))
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--compiled", action="store_true", help="the compiled packages of both dtypes (CPU)")
    args = ap.parse_args(argv)

    default_inputs(args)

    import torch
    from m2f_cli.model.loading import DTYPES, HFPredictor, load_model, resolve_model
    from m2f_cli.inputs.preprocess import load_checkpoint_spec

    source = resolve_model(args.model)
    model = load_model(source)
    device = torch.device(args.device)
    spec = load_checkpoint_spec(source.local_dir)
    def predictor(name):
        if not args.compiled:
            return HFPredictor(model, device, DTYPES[name])
        from m2f_cli.model.startup import compiled
        from m2f_cli.model.loading import read_categories
        size = spec.padded_size(1, 1)
        path = compiled.cache_path(source.local_dir, size, DTYPES[name])
        got = compiled.load(path, size, DTYPES[name], read_categories(source))
        if got is None:
            sys.exit(f"no compiled {name} package at {path}: run m2f cache build --model {args.model}"
                     f"{'' if name == 'float32' else ' --dtype ' + name} first")
        return got

    names = ("float32", args.dtype)
    files, agreement, logit_diff, seconds = compare({n: predictor(n) for n in names}, spec, args.images,
                                                    args.n, args.threshold)
    figures = {"model": source.local_dir, "images": args.images, "n": len(files), "dtype": args.dtype,
               "path": "compiled packages" if args.compiled else "eager autocast",
               "device": str(device), **agreement, "max_logit_diff": logit_diff, "seconds_per_image": seconds}
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
