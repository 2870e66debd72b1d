"""Seconds per image of m2f's instance post-processing on synthetic logits, for each path.

    PYTHONPATH=src python benchmarks/postprocess_speed.py [--images 8] [--threshold 0.5 0.0]
        [--size 480x640] [--path auto host device] [--device cpu] [--masks blobs|scattered]
        [--path window cells host]

--masks scattered: every query confident and its positive logits scattered over the whole image
(the crowded-photos worst case: each window is the photo, the mask a fraction of it); the host
path then takes postprocess.sampling.CellGrid where the image is >= 4x the model input. ``window`` is the
host path with the cells turned off (CELL_SHARE = 0), ``cells`` with them always on.

The logits look like the benchmark checkpoint's (benchmarks/README.md): 100 queries, masks at 1/4 of a
384x384 input, each query a soft blob covering a few % of the image, about 12 candidates >= 0.5. It
times ``Segmenter``'s post-processing step alone (no model, no decode), the per-query windowed path
(``host``, the CPU default) and the batched one (``device``, the CUDA/MPS default) on the same logits.
A script, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from m2f_cli.model.categories import CategoryTable  # noqa: E402
from m2f_cli.postprocess.instance import PostprocessOptions, segment_instances  # noqa: E402


def synthetic_logits(batch: int, q: int = 100, low: int = 96, seed: int = 0):
    """(B, Q, 81) class logits and (B, Q, low, low) mask logits: blobs of radius 3-15 low-res pixels."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(low).float(), torch.arange(low).float(), indexing="ij")
    cy, cx = torch.rand(batch, q, 2, generator=g).unbind(-1)
    r = 3 + 12 * torch.rand(batch, q, generator=g)
    d = ((yy - cy[..., None, None] * low) ** 2 + (xx - cx[..., None, None] * low) ** 2).sqrt()
    masks = 20 * (1 - d / r[..., None, None]) + torch.randn(batch, q, low, low, generator=g)
    cls = torch.randn(batch, q, 81, generator=g) * 2
    cls[..., 80] += 3.0
    hot = torch.rand(batch, q, generator=g) < 0.15  # ~15 of 100 queries are confident objects
    lab = torch.randint(0, 80, (batch, q), generator=g)
    cls += torch.nn.functional.one_hot(lab, 81) * torch.where(hot, 12.0, 0.0)[..., None]
    return cls, masks


def scattered_logits(batch: int, q: int = 100, low: int = 96, seed: int = 0):
    """Every query confident, its positives specks and streaks over the whole image (~10-30% of it)."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(batch, q, 81, generator=g)
    cls[..., torch.randint(0, 80, (1,), generator=g)] += 10.0
    cls[..., 80] = -5.0
    base = torch.nn.functional.interpolate(torch.randn(batch * q, 1, low // 4, low // 4, generator=g),
                                           size=(low, low), mode="bilinear", align_corners=False)
    masks = (4 * base[:, 0] - 4 + 0.5 * torch.randn(batch * q, low, low, generator=g)).view(batch, q, low, low)
    return cls, masks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", default="480x640", help="original HxW")
    ap.add_argument("--threshold", type=float, nargs="+", default=[0.5, 0.0])
    ap.add_argument("--path", nargs="+", default=["host", "device"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--masks", choices=("blobs", "scattered"), default="blobs")
    args = ap.parse_args(argv)
    h0, w0 = (int(v) for v in args.size.lower().split("x"))
    dev = torch.device(args.device)
    cls, masks = (synthetic_logits if args.masks == "blobs" else scattered_logits)(args.images)
    cls, masks = cls.to(dev), masks.to(dev)
    coco = CategoryTable.coco()
    import m2f_cli.postprocess.sampling as sampling
    share = sampling.CELL_SHARE
    padded = valid = (384, 384)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}, "
          f"{args.images} images of {h0}x{w0}, 100 queries")
    for thr in args.threshold:
        opts = PostprocessOptions(threshold=thr, map_threshold=max(thr, 0.5))
        for path in args.path:
            if path == "device":
                try:
                    from m2f_cli.postprocess.device import segment_batch
                except ImportError:
                    print(f"threshold {thr}: {path:6s} (not in this version)")
                    continue
                def once():
                    return segment_batch(cls, masks, padded, [valid] * args.images, [(h0, w0)] * args.images,
                                         coco, opts)
            else:
                sampling.CELL_SHARE = {"window": 0.0, "cells": 1.01}.get(path, share)
                def once():
                    return [segment_instances(cls[b], masks[b], padded, valid, (h0, w0), coco, opts)
                            for b in range(args.images)]
            once()  # warm-up
            best = float("inf")
            for _ in range(args.repeat):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = once()
                best = min(best, time.perf_counter() - t0)
            n = sum(len(r[0]) for r in out)
            sampling.CELL_SHARE = share
            print(f"threshold {thr}: {path:6s} {1000 * best / args.images:8.1f} ms/image "
                  f"({n / args.images:.1f} instances/image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
