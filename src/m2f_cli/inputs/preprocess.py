"""Stage 3: turn an RGB image into the model's input, exactly as the chosen protocol says.

Two protocols, one place:
- ``checkpoint``: what the checkpoint's preprocessor config says (for the COCO checkpoints a fixed
  384x384 resize, aspect not kept), matching transformers' Mask2FormerImageProcessorPil.
- ``paper`` / custom ``SHORT[,LONG]``: the original Mask2Former test protocol: resize the shortest
  edge (rounding int(x + 0.5)), cap the longest, keep the aspect ratio, normalise, then zero-pad
  bottom/right to a multiple of 32.

The spec is a small frozen dataclass so DataLoader workers need neither transformers nor the model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAPER_SHORT, PAPER_LONG = 800, 1333


@dataclass(frozen=True)
class PreprocessSpec:
    """How to build pixel_values.

    mode: "fixed" (resize to height x width), "hf_shortest" (transformers' shortest/longest edge
        rounding, size rounded UP to size_divisor), or "shortest" (paper protocol, padded).
    height, width: fixed target size (mode "fixed").
    short, long: shortest-edge target and longest-edge cap (modes "hf_shortest", "shortest").
    size_divisor: fixed/hf modes round the target size up to it; "shortest" pads to it.
    resample: a PIL resampling filter id (2 = bilinear).
    """

    mode: str = "fixed"
    height: int = 384
    width: int = 384
    short: int = PAPER_SHORT
    long: Optional[int] = PAPER_LONG
    size_divisor: int = 32
    resample: int = 2
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) of the resized, unpadded image for an (h, w) input."""
        if not self.do_resize:
            return h, w
        if self.mode == "fixed":
            oh, ow = self.height, self.width
            return _ceil_to(oh, self.size_divisor), _ceil_to(ow, self.size_divisor)
        if self.mode == "hf_shortest":
            oh, ow = _hf_shortest_edge(h, w, self.short, self.long)
            return _ceil_to(oh, self.size_divisor), _ceil_to(ow, self.size_divisor)
        return paper_resized_size(h, w, self.short, self.long)

    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) of the model input for an (h, w) input: the resized size, padded."""
        rh, rw = self.resized_size(h, w)
        if self.mode == "shortest":
            return _ceil_to(rh, self.size_divisor), _ceil_to(rw, self.size_divisor)
        return rh, rw

    def draft_size(self, h: int, w: int) -> tuple[int, int]:
        """(width, height) a draft JPEG decode must still cover."""
        rh, rw = self.resized_size(h, w)
        return rw, rh


def _ceil_to(x: int, d: int) -> int:
    return int(math.ceil(x / d) * d) if d and d > 0 else x


def paper_resized_size(h: int, w: int, short: int, long: Optional[int]) -> tuple[int, int]:
    """The original protocol (detectron2's ResizeShortestEdge at test time)."""
    scale = short / min(h, w)
    nh, nw = h * scale, w * scale
    if long is not None and max(nh, nw) > long:
        s = long / max(nh, nw)
        nh, nw = nh * s, nw * s
    return max(1, int(nh + 0.5)), max(1, int(nw + 0.5))


def _hf_shortest_edge(h: int, w: int, size: int, max_size: Optional[int]) -> tuple[int, int]:
    """transformers' shortest/longest-edge size rule (its own rounding, not the paper's)."""
    raw = None
    if max_size is not None:
        lo, hi = float(min(h, w)), float(max(h, w))
        if hi / lo * size > max_size:
            raw = max_size * lo / hi
            size = int(round(raw))
    if (h <= w and h == size) or (w <= h and w == size):
        return h, w
    if w < h:
        return (int((raw if raw is not None else size) * h / w), size)
    return size, int((raw if raw is not None else size) * w / h)


def spec_from_processor_dict(d: dict[str, Any]) -> PreprocessSpec:
    """Read a checkpoint's preprocessor_config.json dict (old and new key spellings)."""
    size = d.get("size", {"height": 384, "width": 384})
    max_size = d.get("max_size")
    divisor = int(d.get("size_divisor", d.get("size_divisibility", 32)) or 0)
    common = dict(
        size_divisor=divisor,
        resample=int(d.get("resample", 2)),
        rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        mean=tuple(float(x) for x in d.get("image_mean", IMAGENET_MEAN)),
        std=tuple(float(x) for x in d.get("image_std", IMAGENET_STD)),
        do_resize=bool(d.get("do_resize", True)),
        do_rescale=bool(d.get("do_rescale", True)),
        do_normalize=bool(d.get("do_normalize", True)),
    )
    if isinstance(size, int):
        size = {"shortest_edge": size, "longest_edge": max_size or 1333}
    if "height" in size and "width" in size:
        return PreprocessSpec(mode="fixed", height=int(size["height"]), width=int(size["width"]), **common)
    if "shortest_edge" in size:
        return PreprocessSpec(mode="hf_shortest", short=int(size["shortest_edge"]),
                              long=size.get("longest_edge", max_size), **common)
    raise ValueError(f"unsupported preprocessor size {size!r}")


def load_checkpoint_spec(model_dir: str) -> PreprocessSpec:
    """The spec of a checkpoint folder; transformers' defaults when it has no preprocessor config."""
    p = os.path.join(model_dir, "preprocessor_config.json")
    if not os.path.exists(p):
        return PreprocessSpec(mode="hf_shortest", short=PAPER_SHORT, long=PAPER_LONG)
    with open(p, encoding="utf-8") as f:
        return spec_from_processor_dict(json.load(f))


def spec_for_resize(resize: str, checkpoint: PreprocessSpec) -> PreprocessSpec:
    """``--resize``: "checkpoint", "paper", or "SHORT[,LONG]" (paper protocol with other sizes)."""
    r = resize.strip().lower()
    if r == "checkpoint":
        return checkpoint
    if r == "paper":
        short, long = PAPER_SHORT, PAPER_LONG
    else:
        try:
            parts = [int(x) for x in r.split(",")]
        except ValueError:
            raise ValueError(f"--resize {resize!r}: expected checkpoint, paper or SHORT[,LONG]") from None
        if not 1 <= len(parts) <= 2 or min(parts) < 32:
            raise ValueError(f"--resize {resize!r}: expected SHORT[,LONG], each >= 32")
        short, long = parts[0], (parts[1] if len(parts) == 2 else None)
    return PreprocessSpec(mode="shortest", short=short, long=long, size_divisor=32,
                          resample=2, rescale_factor=checkpoint.rescale_factor,
                          mean=checkpoint.mean, std=checkpoint.std)


@dataclass(frozen=True)
class ModelInput:
    """pixel_values: (3, Hp, Wp) float32, normalised, zero-padded bottom/right.
    valid: (h, w) of the unpadded resized image inside pixel_values."""

    pixel_values: np.ndarray
    valid: tuple[int, int]


def preprocess(rgb: np.ndarray, spec: PreprocessSpec, original: Optional[tuple[int, int]] = None) -> ModelInput:
    """rgb: (h, w, 3) uint8. original: (height, width) the sizes are computed from (the original
    size when rgb came from a reduced draft decode; defaults to rgb's own)."""
    h0, w0 = original if original is not None else rgb.shape[:2]
    rh, rw = spec.resized_size(h0, w0)
    if (rh, rw) != rgb.shape[:2]:
        img = Image.fromarray(rgb).resize((rw, rh), resample=Image.Resampling(spec.resample))
        arr = np.asarray(img, dtype=np.float32)
    else:
        arr = rgb.astype(np.float32)
    if spec.do_rescale:
        arr = arr * np.float32(spec.rescale_factor)
    if spec.do_normalize:
        arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
    ph, pw = spec.padded_size(h0, w0)
    if (ph, pw) != (rh, rw):
        padded = np.zeros((3, ph, pw), np.float32)
        padded[:, :rh, :rw] = chw
        chw = padded
    return ModelInput(chw, (rh, rw))
