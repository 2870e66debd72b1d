"""The tile grid (tile_grid: boxes spread evenly, neighbours overlapping), cut in the workers
(cut_tiles: each tile resized to the model's input, kept as uint8) and normalised per batch
(tile_pixels: the values preprocess would give)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional
import numpy as np
import torch
from PIL import Image
from m2f_cli.inputs.preprocess import PreprocessSpec, preprocess
from m2f_cli.tiling.options import AUTO_FACTOR, TileOptions


@dataclass(frozen=True)
class Box:
    """Rows r0:r1, columns c0:c1 of the original image (half-open, pixels)."""

    r0: int
    c0: int
    r1: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0

    def intersect(self, o: "Box") -> Optional["Box"]:
        r0, c0, r1, c1 = max(self.r0, o.r0), max(self.c0, o.c0), min(self.r1, o.r1), min(self.c1, o.c1)
        return Box(r0, c0, r1, c1) if r1 > r0 and c1 > c0 else None


def model_side(spec: PreprocessSpec) -> int:
    """The side of the model's input: the fixed size's shorter side, or the shortest-edge target."""
    return min(spec.height, spec.width) if spec.mode == "fixed" else spec.short


def tile_side(spec: PreprocessSpec, opts: TileOptions) -> int:
    return opts.size if opts.size is not None else AUTO_FACTOR * model_side(spec)


def _starts(length: int, side: int, overlap: float) -> list[int]:
    """Tile starts along one axis: the fewest tiles of `side` whose neighbours overlap by at least
    overlap x side, spread evenly from 0 to length - side (so no tile sticks out of the image)."""
    if length <= side:
        return [0]
    stride = max(1, int(side * (1 - overlap)))
    n = math.ceil((length - side) / stride) + 1
    return [round(i * (length - side) / (n - 1)) for i in range(n)]


def tile_grid(height: int, width: int, side: int, overlap: float) -> list[Box]:
    """Tile boxes for an (height, width) image, row-major; every tile has the same shape
    (min(side, height), min(side, width))."""
    th, tw = min(side, height), min(side, width)
    return [Box(r, c, r + th, c + tw) for r in _starts(height, side, overlap) for c in _starts(width, side, overlap)]


@dataclass
class TiledImage:
    """An image cut into tiles, as a DataLoader worker hands it over.

    boxes: the tiles in the original image (all of shape `tile`). pixels: (N, h, w, 3) uint8,
    each tile resized to the model's input by the checkpoint's rule (``preprocess``'s resize).
    tile: (th, tw) tile shape in original pixels.
    """

    boxes: list[Box]
    pixels: torch.Tensor
    tile: tuple[int, int]

    def __len__(self) -> int:
        return len(self.boxes)


def cut_tiles(rgb: np.ndarray, spec: PreprocessSpec, opts: TileOptions) -> Optional[TiledImage]:
    """rgb: (H, W, 3) uint8 upright image -> its tiles, or None when one tile covers the image
    (it then goes through the model whole, exactly as without --tile)."""
    h0, w0 = rgb.shape[:2]
    boxes = tile_grid(h0, w0, tile_side(spec, opts), opts.overlap)
    if len(boxes) == 1:
        return None
    th, tw = boxes[0].shape
    rh, rw = spec.resized_size(th, tw)
    out = np.empty((len(boxes), rh, rw, 3), np.uint8)
    for i, b in enumerate(boxes):
        crop = np.ascontiguousarray(rgb[b.r0:b.r1, b.c0:b.c1])
        if (rh, rw) != (th, tw):  # the resize of preprocess.preprocess, on uint8 as there
            crop = np.asarray(Image.fromarray(crop).resize((rw, rh), resample=Image.Resampling(spec.resample)))
        out[i] = crop
    return TiledImage(boxes, torch.from_numpy(out), (th, tw))


def tile_pixels(resized: np.ndarray, spec: PreprocessSpec, tile: tuple[int, int]):
    """A tile from cut_tiles -> preprocess's ModelInput for it: (3, Hp, Wp) float32 and valid.
    preprocess skips the resize (already done, identically) and normalises and pads."""
    return preprocess(resized, spec, original=tile)
