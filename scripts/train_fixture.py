"""Train the tiny Mask2Former fixture used by tests/test_trained_model.py.

    python scripts/train_fixture.py --out tests/fixtures/shapes_model

A small Swin + Mask2Former (1.32M parameters, 5.3 MB of float32 safetensors: Swin embed_dim 24,
depths [1,1,2,1], window 4; hidden 64, 16 queries, 6 decoder layers, 2 pixel-decoder layers)
trained from scratch with the model's own loss (Hungarian matching, mask/dice/class losses with
auxiliary decoder losses; 2048 sample points) on the synthetic shapes of scripts/shapes.py:
4 classes labelled with COCO names (see shapes.py for the mapping). AdamW lr 3e-3 (100 warm-up
steps, cosine to 2%), weight decay 0.05, gradient norm clipped at 1, batch 8, 1500 steps.

Train and inference see exactly the same preprocessing: pixel_values come from m2f_cli.inputs.preprocess
with the spec read from the very preprocessor_config.json dict that is saved with the checkpoint
(a fixed 128 x 128 squash, bilinear, rescale 1/255, ImageNet mean/std). Ground-truth masks are
squashed to 128 x 128 with the same geometry (PIL resize, nearest).

Measured (2-core CPU, torch 2.13, transformers 5.24): 14.5-14.7 min; two runs gave bit-identical
weights. Mask AP through ``m2f segment -f coco`` + ``m2f eval``: 0.594 on the 24-image set of
the tests (seed 20240607), 0.535 on 64 images of seed 999.

Reproducible: batch k depends only on (seed, k) and torch's generator is seeded (initialisation,
the loss's point sampling); 1 torch thread by default (on a shared 2-core machine 2 threads were
up to 10x slower whenever another process used a core). Interrupted runs continue with --resume
from OUT/train_state.pt (bit-identical to an uninterrupted run). Only training code here: nothing
of it belongs in src/.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402

from m2f_cli.inputs.preprocess import preprocess, spec_from_processor_dict  # noqa: E402


NO_DECAY_KEYS = ("relative_position_bias_table", "level_embed", "queries_embedder", "queries_features")


def preprocessor_config(size: int) -> dict:
    """The checkpoint's preprocessor_config.json: the key set of the COCO checkpoints
    (tests/tiny.py CHECKPOINT_PREPROCESSOR) with a fixed size x size resize."""
    return {
        "do_normalize": True, "do_resize": True, "do_rescale": True, "ignore_index": 255,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "image_processor_type": "Mask2FormerImageProcessor", "num_labels": len(shapes.ID2LABEL),
        "reduce_labels": False, "resample": 2, "rescale_factor": 1 / 255,
        "size": {"height": size, "width": size}, "size_divisor": 32,
    }


def model_config(args):
    from transformers import Mask2FormerConfig, SwinConfig
    depths = [int(d) for d in args.depths.split(",")]
    backbone = SwinConfig(embed_dim=args.embed_dim, depths=depths, num_heads=[1, 2, 4, 8], window_size=4,
                          image_size=args.size, drop_path_rate=args.drop_path,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    id2label = dict(shapes.ID2LABEL)
    hd = args.hidden
    return Mask2FormerConfig(
        backbone_config=backbone, hidden_dim=hd, mask_feature_size=hd, feature_size=hd,
        num_queries=args.queries, encoder_layers=2, decoder_layers=args.decoder_layers,
        dim_feedforward=hd * 4, encoder_feedforward_dim=hd * 4, num_attention_heads=4,
        num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
        train_num_points=args.points, class_weight=args.class_weight, no_object_weight=args.no_object_weight)


def training_example(rng: np.random.Generator, spec, size: int):
    """(pixel_values (3, S, S) float32, masks (N, S, S) float32, labels (N,) int64)."""
    s = shapes.make_sample(rng)
    rgb = s.image
    if rng.uniform() < 0.5:  # JPEG round trip: the validation images are JPEGs
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=int(rng.integers(70, 97)))
        rgb = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    pv = preprocess(rgb, spec).pixel_values
    assert pv.shape == (3, size, size), pv.shape
    masks = np.stack([np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(
        (size, size), resample=Image.Resampling.NEAREST)) > 127 for m in s.masks])
    keep = masks.reshape(len(masks), -1).sum(1) > 0
    return (pv, masks[keep].astype(np.float32), np.asarray(s.labels, np.int64)[keep])


class ShapesStream(torch.utils.data.IterableDataset):
    """Training batches from step ``start`` on, made in a worker process so that data generation
    overlaps the optimisation step. Batch k depends only on (seed, k): a resumed run sees exactly
    the batches an uninterrupted one would."""

    def __init__(self, seed: int, size: int, batch: int, start: int = 0):
        self.seed, self.size, self.batch, self.start = seed, size, batch, start

    def __iter__(self):
        torch.set_num_threads(1)
        spec = spec_from_processor_dict(preprocessor_config(self.size))
        k = self.start
        while True:
            rng = np.random.default_rng([self.seed, k])
            b = [training_example(rng, spec, self.size) for _ in range(self.batch)]
            yield (torch.from_numpy(np.stack([x[0] for x in b])), [torch.from_numpy(x[1]) for x in b],
                   [torch.from_numpy(x[2]) for x in b])
            k += 1


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def save(model, out: str, prep: dict) -> None:
    model.eval()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(prep, f, indent=2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (save_pretrained + preprocessor_config.json)")
    ap.add_argument("--size", type=int, default=128, help="model input size (square, multiple of 32)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--embed-dim", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--class-weight", type=float, default=2.0, help="weight of the classification loss (the "
                    "model's default 2.0; masks have 5 + 5)")
    ap.add_argument("--no-object-weight", type=float, default=0.1)
    ap.add_argument("--depths", default="1,1,2,1", help="backbone blocks per stage")
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--decoder-layers", type=int, default=6)
    ap.add_argument("--points", type=int, default=2048, help="loss sample points per mask")
    ap.add_argument("--drop-path", type=float, default=0.0, help="Swin stochastic depth (0: none; it only slows a "
                    "model this small)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is fastest on a shared 2-core machine (2 threads stall "
                    "badly when another process competes for the cores)")
    ap.add_argument("--workers", type=int, default=1, help="data worker processes (0: in-process)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--checkpoint-every", type=int, default=100,
                    help="save OUT/train_state.pt every N steps (removed at the end); --resume continues from it")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT/train_state.pt")
    args = ap.parse_args(argv)
    assert args.size % 32 == 0

    from transformers import Mask2FormerForUniversalSegmentation
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    prep = preprocessor_config(args.size)
    model = Mask2FormerForUniversalSegmentation(model_config(args))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params / 1e6:.2f}M  input {args.size}x{args.size}  steps {args.steps} x batch {args.batch}",
          flush=True)

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        skip = p.ndim <= 1 or any(k in n for k in NO_DECAY_KEYS)
        (no_decay if skip else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))

    state_path = os.path.join(args.out, "train_state.pt")
    start, spent = 0, 0.0
    if args.resume and os.path.exists(state_path):
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, spent = st["step"], st["seconds"]
        print(f"resumed at step {start} ({spent / 60:.1f} min already spent)", flush=True)

    def checkpoint(step_done: int) -> None:
        os.makedirs(args.out, exist_ok=True)
        tmp = state_path + ".tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                    "step": step_done, "seconds": spent + time.time() - t0}, tmp)
        os.replace(tmp, state_path)

    loader = torch.utils.data.DataLoader(ShapesStream(args.seed, args.size, args.batch, start), batch_size=None,
                                         num_workers=args.workers, prefetch_factor=4 if args.workers else None)
    batches = iter(loader)  # draws the workers' base seed from torch's generator
    if start:
        torch.set_rng_state(st["torch_rng"])  # the loss's point sampling continues where it stopped
    model.train()
    t0 = time.time()
    run_loss, run_n = 0.0, 0
    for step in range(start, args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        pv, mask_labels, class_labels = next(batches)
        out = model(pixel_values=pv, mask_labels=mask_labels, class_labels=class_labels)
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run_loss += float(loss.detach())
        run_n += 1
        if (step + 1) % args.log_every == 0 or step == start:
            el = spent + time.time() - t0
            print(f"step {step + 1:5d}/{args.steps}  loss {run_loss / run_n:8.3f}  lr {opt.param_groups[0]['lr']:.2e}"
                  f"  {el / 60:6.1f} min  {(time.time() - t0) / (step + 1 - start):.2f} s/step", flush=True)
            run_loss, run_n = 0.0, 0
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            checkpoint(step + 1)
    total = spent + time.time() - t0
    print(f"trained {args.steps} steps in {total / 60:.1f} min ({total:.0f} s of training)", flush=True)

    save(model, args.out, prep)
    with open(os.path.join(args.out, "training_args.json"), "w", encoding="utf-8") as f:
        json.dump({**vars(args), "train_seconds": round(total, 1), "params": n_params,
                   "torch": torch.__version__}, f, indent=2)
    if os.path.exists(state_path):
        os.remove(state_path)
    print(f"saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
