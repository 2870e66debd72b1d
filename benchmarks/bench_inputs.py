"""Inputs for benchmarks/run.py, generated locally (nothing is downloaded):

- a full-size random-weight Mask2Former with the architecture of
  facebook/mask2former-swin-tiny-coco-instance, saved with save_pretrained (safetensors) plus the
  checkpoint's preprocessor_config.json, with its heads adjusted so post-processing does realistic work;
- deterministic photo-like JPEG sets (smooth gradients, shaded shapes, grain).

Everything is cached in the work folder under names that carry GEN_VERSION and the seed; bump
GEN_VERSION whenever the output of this module changes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GEN_VERSION = 2

# The keys of facebook/mask2former-swin-tiny-coco-instance's preprocessor_config.json
# (the same dict as tests/tiny.py's CHECKPOINT_PREPROCESSOR; copied so the benchmark does not
# import the test suite).
CHECKPOINT_PREPROCESSOR = {
    "do_normalize": True, "do_resize": True, "do_rescale": True, "ignore_index": 255,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "image_processor_type": "Mask2FormerImageProcessor", "num_labels": 80, "reduce_labels": False,
    "resample": 2, "rescale_factor": 1 / 255, "size": {"height": 384, "width": 384}, "size_divisor": 32,
}

# name -> (description, list of (width, height) cycled over the images)
IMAGE_SETS: dict[str, tuple[str, list[tuple[int, int]]]] = {
    "coco640": ("COCO-like, ~640x480, mixed orientations",
                [(640, 480), (480, 640), (640, 427), (427, 640), (640, 424), (500, 375),
                 (640, 480), (612, 612), (640, 360), (375, 500)]),
    "1080p": ("1920x1080", [(1920, 1080)]),
    "12mp": ("4000x3000 (12 MP camera photos)", [(4000, 3000)]),
    # crowded photos: run.py segments this set with a checkpoint calibrated to CROWDED_INSTANCES
    # instances per image (all but a few of the 100 queries pass 0.5), 1080p to 12 MP
    "crowded": ("crowded photos, 1080p-12 MP, ~100 instances each",
                [(1920, 1080), (4032, 3024), (3000, 2000), (4000, 3000)]),
}
CROWDED_INSTANCES = 100.0
JPEG_QUALITY = 90
DECODER_BRANCH_SCALE = 0.25  # see make_checkpoint

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------
# images

def _field(rng: np.random.Generator, w: int, h: int, cells: int, lo: int = 0, hi: int = 256) -> Image.Image:
    """A smooth random RGB field: a few random colours, bicubic-upsampled to (w, h)."""
    gw = max(2, int(round(cells * w / max(w, h)))) + 1
    gh = max(2, int(round(cells * h / max(w, h)))) + 1
    small = rng.integers(lo, hi, (gh, gw, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def photo_like(w: int, h: int, seed: int) -> Image.Image:
    """A deterministic photo-like RGB image: smooth background gradients, 12-30 shaded shapes with
    soft edges, a shading field, mid-frequency texture and fine grain (so JPEG entropy, file size
    and decode cost resemble camera photos more than flat synthetic images do)."""
    rng = np.random.default_rng(seed)
    s = max(w, h) / 640.0  # geometry scale relative to a COCO-sized image
    img = _field(rng, w, h, cells=4)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(12, 31))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.03, 0.25) * w, rng.uniform(0.03, 0.25) * h
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
        elif kind == 1:
            draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
        else:
            k = int(rng.integers(3, 8))
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = rng.uniform(0.5, 1.0, k)
            draw.polygon([(float(cx + rx * r * np.cos(a)), float(cy + ry * r * np.sin(a)))
                          for a, r in zip(ang, rad)], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.2 * s))
    a = np.asarray(img, dtype=np.float32)
    shade = np.asarray(_field(rng, w, h, cells=3, lo=150, hi=256), dtype=np.float32)[..., :1] / 255.0
    a *= shade * 1.15
    tw, th = max(2, w // 4), max(2, h // 4)
    texture = rng.standard_normal((th, tw), dtype=np.float32) * 10.0
    texture = np.asarray(Image.fromarray(texture, mode="F").resize((w, h), Image.Resampling.BILINEAR))
    a += texture[..., None]
    a += rng.standard_normal((h, w, 3), dtype=np.float32) * 6.0
    np.clip(a, 0, 255, out=a)
    return Image.fromarray(a.astype(np.uint8))


def _set_seed(seed: int, name: str, i: int) -> int:
    return (seed * 1_000_003 + sum(map(ord, name)) * 10_007 + i) % (2 ** 32)


def ensure_image_set(work: str, name: str, n: int, seed: int, log: Log = print) -> str:
    """<work>/images/<name>-n<n>-s<seed>-v<ver>/ with exactly n JPEGs (hard links into a pool that
    keeps every image ever generated for this name and seed). Returns the folder."""
    _, sizes = IMAGE_SETS[name]
    tag = f"s{seed}-v{GEN_VERSION}"
    pool = os.path.join(work, "images", f"pool-{name}-{tag}")
    folder = os.path.join(work, "images", f"{name}-n{n}-{tag}")
    os.makedirs(pool, exist_ok=True)
    files = []
    made = 0
    t0 = time.perf_counter()
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        fn = f"{name}_{i:03d}_{w}x{h}.jpg"
        p = os.path.join(pool, fn)
        if not os.path.exists(p):
            tmp = p + ".tmp"
            photo_like(w, h, _set_seed(seed, name, i)).save(tmp, format="JPEG", quality=JPEG_QUALITY)
            os.replace(tmp, p)
            made += 1
        files.append(fn)
    if made:
        log(f"  generated {made} {name} image(s) in {time.perf_counter() - t0:.1f} s")
    if os.path.isdir(folder) and sorted(os.listdir(folder)) == sorted(files):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for fn in files:
        try:
            os.link(os.path.join(pool, fn), os.path.join(folder, fn))
        except OSError:
            shutil.copyfile(os.path.join(pool, fn), os.path.join(folder, fn))
    return folder


def describe_folder(folder: str) -> dict:
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    sizes = [os.path.getsize(os.path.join(folder, f)) for f in files]
    dims = []
    for f in files:
        with Image.open(os.path.join(folder, f)) as im:
            dims.append(im.size)
    mp = [w * h / 1e6 for w, h in dims]
    return {"files": len(files), "bytes": sum(sizes), "mean_kb": (sum(sizes) / len(sizes) / 1024) if sizes else 0,
            "megapixels": sum(mp), "sizes": sorted({f"{w}x{h}" for w, h in dims})}


# ----------------------------------------------------------------------------------------------
# checkpoint

def full_config():
    """Mask2FormerConfig of facebook/mask2former-swin-tiny-coco-instance (docs/mask2former.md)."""
    from transformers import Mask2FormerConfig, SwinConfig

    from m2f_cli.model.categories import COCO_NAMES
    backbone = SwinConfig(image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2],
                          num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0, drop_path_rate=0.3,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    id2label = {i: n for i, n in enumerate(COCO_NAMES)}
    return Mask2FormerConfig(
        backbone_config=backbone, num_queries=100, hidden_dim=256, mask_feature_size=256, feature_size=256,
        encoder_layers=6, decoder_layers=10, num_attention_heads=8, dim_feedforward=2048,
        encoder_feedforward_dim=1024, common_stride=4, num_labels=80, id2label=id2label,
        label2id={v: k for k, v in id2label.items()})


def _calibration_batch(seed: int, count: int):
    """count photo-like images of mixed sizes, preprocessed like the checkpoint (384x384)."""
    import torch
    mean = np.asarray(CHECKPOINT_PREPROCESSOR["image_mean"], np.float32)
    std = np.asarray(CHECKPOINT_PREPROCESSOR["image_std"], np.float32)
    sizes = [(640, 480), (480, 640), (1920, 1080), (640, 427), (800, 600), (612, 612)]
    xs = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        im = photo_like(w, h, 10_000_000 + seed * 101 + i).resize((384, 384), Image.Resampling.BILINEAR)
        a = (np.asarray(im, np.float32) / 255.0 - mean) / std
        xs.append(torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))))
    return xs


def make_checkpoint(path: str, seed: int = 0, instances: float = 12.0, mask_area: float = 0.08,
                    calib_images: int = 6, log: Log = print) -> dict:
    """Save a random-weight full-size Mask2Former (Swin-T, COCO instance) to path; returns metadata.

    Speed does not depend on weight values, only the amount of post-processing work does, so the
    weights are adjusted until that work looks like a trained model's. A plain random model scores
    every candidate near 1/81 x 0.5 (nothing passes the 0.5 threshold); scaling its class head as
    tests/tiny.py does makes the count swing between 0 and 100 per image, because a random post-norm
    decoder gives all 100 queries nearly the same features (one class for all of them, and all pass
    or none do). So, measured on `calib_images` photo-like images that are in no benchmark set:
    1. the decoder's residual branches (self-attention, cross-attention and FFN output
       projections) are scaled by DECODER_BRANCH_SCALE, so queries keep distinct features;
    2. the mask head's last layer is scaled x20 (confident masks, as tests/tiny.py does x30), and
       a constant pixel-embedding channel gets a bias so masks cover about `mask_area` of the image
       (random masks cover ~50%); measured twice, as mask predictions feed the decoder's attention;
    3. the class head is fitted (ridge least squares on the decoder's final query features) so that
       about 1.5 x `instances` queries predict one COCO class with graded confidence and the rest
       "no object", then scaled (one scalar, bisection) until on average `instances` candidates per
       image score >= 0.5 (class probability x mean mask sigmoid, as in the original inference).
    """
    import torch
    from transformers import Mask2FormerForUniversalSegmentation
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(full_config()).eval()
    params = sum(p.numel() for p in model.parameters())
    log(f"  built Mask2Former Swin-T ({params / 1e6:.1f} M params) in {time.perf_counter() - t_start:.1f} s; "
        f"calibrating on {calib_images} images (about {3 * calib_images} forward passes)")

    decoder = model.model.transformer_module.decoder
    with torch.no_grad():
        # A random post-norm decoder washes the query identity out within a few layers: every
        # query ends up with the same (image-dependent) features, hence the same class. Damping
        # the residual branches keeps queries distinct while still letting the image in.
        for layer in decoder.layers:
            for lin in (layer.self_attn.out_proj, layer.cross_attn.out_proj, layer.fc2):
                lin.weight.mul_(DECODER_BRANCH_SCALE)
                lin.bias.mul_(DECODER_BRANCH_SCALE)
    emb = decoder.mask_predictor.mask_embedder
    last = getattr(getattr(emb, "2"), "0")          # mask embedder's last Linear (as in tests/tiny.py)
    proj = model.model.pixel_level_module.decoder.mask_projection  # 1x1 conv -> pixel embeddings
    c = proj.out_channels - 1
    with torch.no_grad():
        last.weight.mul_(20.0)                       # confident masks: mean sigmoid inside ~0.8-0.9
        proj.weight[c].zero_()
        proj.bias[c] = 1.0                           # pixel-embedding channel c == 1 everywhere
        last.weight[c].zero_()
        last.bias[c] = 0.0                           # -> a per-model constant added to all mask logits

    feats: dict = {}
    hook = model.class_predictor.register_forward_hook(lambda m, i, o: feats.__setitem__("h", i[0].detach()))
    xs = _calibration_batch(seed, calib_images)

    def forward():
        hs, ms = [], []
        with torch.no_grad():
            for x in xs:
                out = model(pixel_values=x[None])
                hs.append(feats["h"][0])
                ms.append(out.masks_queries_logits[0])
        return torch.stack(hs), torch.stack(ms)  # (N, Q, 256), (N, Q, 96, 96)

    for _ in range(2):
        _, ml = forward()
        offset = float(torch.quantile(ml.flatten()[::5].float(), 1.0 - mask_area))
        with torch.no_grad():
            last.bias[c] -= offset
    h, ml = forward()
    hook.remove()
    area = (ml > 0).float().mean((2, 3))                                  # (N, Q)
    binary = ml > 0
    mask_score = (ml.sigmoid() * binary).flatten(2).sum(-1) / (binary.flatten(2).sum(-1) + 1e-6)

    # 2. class head: least squares from query features to graded one-class / no-object targets
    n_img, n_q, dim = h.shape
    num_c = model.config.num_labels
    rng = np.random.default_rng(seed)
    mean_area = area.mean(0).numpy()
    eligible = np.flatnonzero((mean_area > 0.005) & (mean_area < 0.5))
    if len(eligible) < 2:
        eligible = np.arange(n_q)
    k = int(min(len(eligible), max(1, round(1.5 * instances))))
    objects = rng.choice(eligible, size=k, replace=False)
    margins = rng.permutation(np.linspace(3.5, 9.5, k))
    classes = rng.integers(0, num_c, size=k)
    target = torch.zeros(n_q, num_c + 1)
    target[:, num_c] = 8.0
    for q, cls, mg in zip(objects, classes, margins):
        target[q, num_c] = 0.0
        target[q, int(cls)] = float(mg)
    X = torch.cat([h.reshape(-1, dim), torch.ones(n_img * n_q, 1)], 1).double()
    Y = target.repeat(n_img, 1).double()
    lam = 1e-2 * float((X * X).sum() / X.shape[0])
    A = X.T @ X + lam * torch.eye(dim + 1, dtype=torch.float64)
    sol = torch.linalg.solve(A, X.T @ Y)                                  # (dim + 1, C + 1)
    W0, b0 = sol[:dim].T.float(), sol[dim].float()

    def count(scale: float) -> torch.Tensor:
        logits = scale * (h @ W0.T + b0)
        probs = logits.softmax(-1)[..., :num_c]
        top = probs.flatten(1).topk(min(100, n_q * num_c), dim=1)
        q_idx = top.indices // num_c
        final = top.values * torch.gather(mask_score, 1, q_idx)
        return (final >= 0.5).sum(1)

    lo, hi = 0.05, 8.0
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        if count(mid).float().mean() < instances:
            lo = mid
        else:
            hi = mid
    scale = hi
    with torch.no_grad():
        model.class_predictor.weight.copy_(scale * W0)
        model.class_predictor.bias.copy_(scale * b0)
    per_image = count(scale).tolist()

    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump(CHECKPOINT_PREPROCESSOR, f, indent=1)
    meta = {
        "generator": "benchmarks/bench_inputs.py", "gen_version": GEN_VERSION, "seed": seed,
        "architecture": "Mask2FormerForUniversalSegmentation, Swin-T (96, [2,2,6,2], [3,6,12,24], window 7), "
                        "100 queries, hidden 256, 6 encoder / 10 decoder layers, 80 COCO labels",
        "params": params, "target_instances": instances, "target_mask_area": mask_area,
        "calibration": {"images": calib_images, "instances_per_image": per_image,
                        "mean_mask_area": round(float(area.mean()), 4),
                        "mean_mask_score": round(float(mask_score.mean()), 4),
                        "mask_offset": round(float(last.bias[c].item()), 4), "class_scale": round(scale, 4),
                        "decoder_branch_scale": DECODER_BRANCH_SCALE,
                        "object_queries": sorted(int(q) for q in objects)},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    with open(os.path.join(tmp, "benchmark_checkpoint.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    log(f"  saved {path} in {meta['seconds']} s: calibration instances/image {per_image}, "
        f"mean mask area {meta['calibration']['mean_mask_area']:.3f}")
    return meta


def ensure_checkpoint(work: str, seed: int, instances: float, mask_area: float, log: Log = print
                      ) -> tuple[str, dict]:
    """The cached checkpoint folder for these settings, generated when missing."""
    name = f"ckpt-m2f-swin-t-coco-random-s{seed}-i{instances:g}-a{mask_area:g}-v{GEN_VERSION}"
    path = os.path.join(work, name)
    meta_path = os.path.join(path, "benchmark_checkpoint.json")
    if os.path.exists(meta_path) and os.path.exists(os.path.join(path, "model.safetensors")):
        with open(meta_path) as f:
            return path, json.load(f)
    os.makedirs(work, exist_ok=True)
    log(f"generating checkpoint {path} (once; cached for later runs)")
    return path, make_checkpoint(path, seed=seed, instances=instances, mask_area=mask_area, log=log)


def read_checkpoint_meta(path: str) -> Optional[dict]:
    p = os.path.join(path, "benchmark_checkpoint.json")
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return None
