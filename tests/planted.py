"""A predictor with known answers: its mask logits mark the red and the blue pixels of the input.

It takes the same (B, 3, H, W) normalised pixel_values as the real model and returns logits in
the real layout, so the whole pipeline (preprocess, batching, padding, post-processing, writers)
runs unchanged, and the right output is known: the planted regions at the original resolution.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from m2f_cli.model.categories import CategoryTable
from m2f_cli.inputs.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

RED_CLASS = 0    # person, COCO id 1
BLUE_CLASS = 16  # dog, COCO id 18


class PlantedPredictor:
    """Query 0 = the red pixels (person), query 1 = the blue pixels (dog), query 2 = nothing."""

    def __init__(self, spec: PreprocessSpec = PreprocessSpec(), device: str = "cpu"):
        self.device = torch.device(device)
        self.categories = CategoryTable.coco()
        self.preprocess_spec = spec
        self.calls = 0
        self.batch_sizes: list[int] = []

    def __call__(self, pixel_values: torch.Tensor):
        self.calls += 1
        self.batch_sizes.append(pixel_values.shape[0])
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        rgb = pixel_values * std + mean  # back to [0, 1]; zero padding is not red or blue
        r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        red = ((r > 0.6) & (g < 0.3) & (b < 0.3)).float()
        blue = ((b > 0.6) & (r < 0.3) & (g < 0.3)).float()
        bsz, _, h, w = pixel_values.shape
        masks = torch.stack([red, blue, torch.zeros_like(red)], 1)  # (B, 3, H, W)
        masks = F.avg_pool2d(masks, 4)  # the model predicts at 1/4 resolution
        mask_logits = (masks - 0.5) * 40.0
        cls = torch.full((bsz, 3, 81), -10.0)
        cls[:, 0, RED_CLASS] = 10.0
        cls[:, 1, BLUE_CLASS] = 10.0
        cls[:, 2, 80] = 10.0  # "no object"
        return cls, mask_logits


def planted_image(width: int, height: int, seed: int = 0):
    """An RGB image on a grey/green textured background with one red ellipse and one blue
    rectangle. Returns (PIL image, {"red": bool mask, "blue": bool mask}) at (height, width)."""
    rng = np.random.default_rng(seed)
    bg = np.empty((height, width, 3), np.uint8)
    bg[...] = (90, 140, 90)
    bg = np.clip(bg.astype(int) + rng.integers(-25, 25, size=(height, width, 1)), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    red_box = (int(width * 0.08), int(height * 0.1), int(width * 0.45), int(height * 0.7))
    blue_box = (int(width * 0.55), int(height * 0.35), int(width * 0.92), int(height * 0.9))
    d.ellipse(red_box, fill=(230, 20, 20))
    d.rectangle(blue_box, fill=(20, 20, 230))
    arr = np.asarray(img)
    red = (arr[..., 0] > 150) & (arr[..., 1] < 80) & (arr[..., 2] < 80)
    blue = (arr[..., 2] > 150) & (arr[..., 0] < 80) & (arr[..., 1] < 80)
    return img, {"red": red, "blue": blue}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def bbox_of(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def planted_dir(root, sizes):
    """root/imgs/im<n>.png, one planted image per (width, height) of sizes. Returns (the folder,
    {"im<n>.png": {"red": mask, "blue": mask}})."""
    d = root / "imgs"
    d.mkdir()
    truth = {}
    for n, (w, h) in enumerate(sizes):
        img, masks = planted_image(w, h, seed=n)
        img.save(d / f"im{n}.png")
        truth[f"im{n}.png"] = masks
    return d, truth
