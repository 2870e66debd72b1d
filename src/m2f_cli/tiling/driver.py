"""An image's tiles through the model (segment_tiled: its tiles batched together, their parts
merged) and the engines' step for a Sample cut into tiles (infer_tiled)."""

from __future__ import annotations

import time
from typing import Optional, Union
import torch
from m2f_cli.postprocess.sampling import MaskSampler
from m2f_cli.records import Failure, ImageRef, ImageResult
from m2f_cli.tiling.grid import Box, TiledImage, tile_pixels
from m2f_cli.inputs.raster import RasterError
from m2f_cli.tiling.merge import merge_parts
from m2f_cli.tiling.seams import instances_of
from m2f_cli.tiling.parts import _forward, Part, tile_parts


def segment_tiled(segmenter, ref: ImageRef, tiled: TiledImage, original: tuple[int, int], batch_size: int,
                  full: Optional[tuple[torch.Tensor, tuple[int, int]]] = None) -> ImageResult:
    """One image from its tiles (and the full pass: (3, Hp, Wp) pixel values, valid) -> ImageResult.

    Tiles go through segmenter.predictor in batches of batch_size, in grid order; their parts are
    merged by merge_parts, then thresholded, capped at top_k per pass and painted by instances_of.
    Forward and post-processing seconds go to segmenter.times.
    """
    spec, options = segmenter.spec, segmenter.options
    parts: list[Part] = []
    sampler = None
    n = len(tiled)
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        inputs = [tile_pixels(tiled.pixels[i].numpy(), spec, tiled.tile) for i in idx]
        x = torch.stack([torch.from_numpy(mi.pixel_values) for mi in inputs])
        valid = inputs[0].valid
        cls, masks = _forward(segmenter, x)
        t1 = time.perf_counter()
        if sampler is None:
            sampler = MaskSampler(valid, tiled.tile, masks.device)
        for b, i in enumerate(idx):
            parts += tile_parts(cls[b], masks[b], tuple(x.shape[-2:]), valid, tiled.boxes[i], i, sampler, options)
        segmenter.times.postprocess_s += time.perf_counter() - t1
    if full is not None:
        pixel_values, valid = full
        cls, masks = _forward(segmenter, pixel_values[None])
        t1 = time.perf_counter()
        whole = Box(0, 0, *original)
        parts += tile_parts(cls[0], masks[0], tuple(pixel_values.shape[-2:]), valid, whole, -1,
                            MaskSampler(valid, original, masks.device), options)
        segmenter.times.postprocess_s += time.perf_counter() - t1
    t1 = time.perf_counter()
    objects = merge_parts(parts, tiled.boxes, original)  # on the masks (tiling/merge.py, issue 28)
    instances, imap = instances_of(objects, original, segmenter.categories, options, n + (full is not None))
    segmenter.times.postprocess_s += time.perf_counter() - t1
    h0, w0 = original
    return ImageResult(ref, w0, h0, instances, imap, options.map_threshold, tiles=n)


def infer_tiled(segmenter, sample, batch_size: int) -> list[tuple[int, Union[ImageResult, Failure]]]:
    """engines.batches.segment_samples' step for a Sample cut into tiles (batch.Sample.tiles): one image,
    all its tiles. A model error fails the image, as infer_batch fails a batch."""
    full = (sample.pixel_values, sample.valid) if sample.pixel_values is not None else None
    try:
        if not isinstance(sample.tiles, TiledImage):  # a raster read window by window (tiling/stream.py)
            from m2f_cli.tiling.stream import segment_raster
            r = segment_raster(segmenter, sample.ref, sample.tiles, batch_size)
        else:
            r = segment_tiled(segmenter, sample.ref, sample.tiles, sample.original, batch_size, full)
    except (RuntimeError, ValueError) as e:  # e.g. out of memory
        return [(sample.seq, Failure(sample.ref, "model", str(e).splitlines()[0]))]
    except (OSError, RasterError) as e:  # a raster read window by window that fails halfway
        return [(sample.seq, Failure(sample.ref, "decode", str(e).splitlines()[0] or type(e).__name__))]
    return [(sample.seq, r)]
