"""``segment(images, model=..., batch_size=..., **options)``: the run's pipeline over any iterable of
images, in memory, yielding one ``Result`` (result.py) or ``Failure`` per input, in input order.

    import m2f_cli
    for r in m2f_cli.segment(arrays, model="facebook/mask2former-swin-tiny-coco-instance"):
        print(r.index, [(i.label, round(i.score, 2)) for i in r.instances])

The stages are the run's own: the inputs are drawn lazily from the iterable in this process (the
DataLoader's sampler) and decoded and preprocessed in its workers (batch.load_sample for paths and
URLs, batch.rgb_sample for arrays and PIL images); engines.batches.segment_samples batches samples of
equal shape, runs the Segmenter and post-processes; writing.in_order restores the input order. At
most a few batches are in flight (the loader's prefetch, group_batches' buffer), so memory stays
bounded however long the iterable is. Options and their defaults are RunConfig's (config.py), the
thresholds per format those of the writers (options.writer_thresholds), as on the command line.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from m2f_cli.inputs.batch import Sample, load_sample, make_loader, rgb_sample
from m2f_cli.config import DEFAULT_MODEL, RunConfig
from m2f_cli.engines.batches import segment_samples
from m2f_cli.errors import UsageError
from m2f_cli.choices import auto_settings, map_threshold, segmenter_options, tile_of, validate, writer_thresholds
from m2f_cli.postprocess.instance import PostprocessOptions
from m2f_cli.inputs.preprocess import PreprocessSpec
from m2f_cli.records import Failure, ImageRef
from m2f_cli.result import Result, Views
from m2f_cli.segmenter import Segmenter, resolve_classes
from m2f_cli.urls import is_url
from m2f_cli.outputs.writers.cutout import pad_option
from m2f_cli.outputs.writer_thread import in_order

# What a Result offers; their thresholds are the CLI's defaults for these formats.
VIEWS = ("png", "coco", "overlay", "cutout")
# The RunConfig fields segment() takes as options: the rest name files, folders, shards or clusters.
OPTIONS = ("revision", "allow_pickle", "device", "dtype", "workers", "threads", "threshold", "top_k", "classes",
           "resize", "task", "fast_decode", "tile", "tile_full", "max_pixels", "overlay_alpha", "overlay_scores",
           "simplify", "cutout_pad", "cutout_visible", "compile", "startup_cache")


def api_config(model: Union[str, Segmenter], batch_size: Optional[int], options: dict) -> RunConfig:
    """The RunConfig of one segment() call, checked as a run's (UsageError); TypeError for an
    option segment() does not take."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"segment() got unknown options {', '.join(unknown)}; it takes {', '.join(OPTIONS)}")
    opts = dict(options)
    if isinstance(opts.get("classes"), str):
        opts["classes"] = (opts["classes"],)
    elif "classes" in opts:
        opts["classes"] = tuple(opts["classes"] or ())
    name = model if isinstance(model, str) else DEFAULT_MODEL
    config = RunConfig(inputs=[], out="", formats=VIEWS, model=name, batch_size=batch_size, **opts)
    validate(config)
    try:
        pad_option(config.cutout_pad)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return config


def _segmenter(model: Union[str, Segmenter], config: RunConfig) -> Segmenter:
    """A loaded Segmenter with this call's post-processing options (a given one is copied, not changed)."""
    if isinstance(model, Segmenter):
        seg = copy.copy(model)  # shares the loaded model; options and tiling are this call's
        thresholds = writer_thresholds(config)
        try:
            options = PostprocessOptions(threshold=min(thresholds.values()),
                                         map_threshold=map_threshold(config, thresholds), top_k=config.top_k,
                                         keep=resolve_classes(seg.categories, config.classes))
        except KeyError as e:
            raise UsageError(e.args[0]) from None
        if config.tile is not None and seg.task != "instance":
            raise UsageError(f"--tile merges instances; this is a {seg.task} model (--task {seg.task})")
        seg.options, seg.tiling = options, tile_of(config)
        return seg
    try:
        return Segmenter(**segmenter_options(config, config.task))  # builds the start-up trace in-process
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    except ValueError as e:
        raise UsageError(str(e)) from None


def _as_rgb(item: Any) -> np.ndarray:
    """An (H, W, 3) uint8 array or a PIL image (used as given) -> (H, W, 3) uint8 RGB."""
    from PIL import Image

    from m2f_cli.segmenter import _as_rgb as rgb_of
    if not isinstance(item, (np.ndarray, Image.Image)):
        raise TypeError(f"expected a path, URL, PIL image or (H, W, 3) uint8 array, got {type(item).__name__}")
    return rgb_of(item)


class ItemDataset(Dataset):
    """Keys (seq, ImageRef, item) -> Samples, in a DataLoader worker: a path or URL is decoded
    (batch.load_sample), an array or PIL image taken as it is; what cannot be read is a failed Sample."""

    def __init__(self, spec: PreprocessSpec, max_pixels: Optional[int], fast_decode: bool, tile):
        self.spec, self.max_pixels, self.fast_decode, self.tile = spec, max_pixels, fast_decode, tile

    def __getitem__(self, key: tuple[int, ImageRef, Any]) -> Sample:
        seq, ref, item = key
        if item is None:
            return load_sample(seq, ref, self.spec, self.max_pixels, self.fast_decode, self.tile)
        t0 = time.perf_counter()
        try:
            rgb = _as_rgb(item)
        except (TypeError, ValueError, OSError) as e:
            return Sample(seq, ref, None, (0, 0), (0, 0), error=str(e))
        return rgb_sample(seq, ref, rgb, rgb.shape[:2], self.spec, self.tile, time.perf_counter() - t0)


def _keys(images: Iterable, held: dict) -> Iterator[tuple[int, ImageRef, Any]]:
    """The DataLoader's sampler: (seq, ref, item) per input, drawn as the workers need them. Paths
    and URLs travel as their ref (path as given, name its base name; item None); other items travel
    themselves (ref "<image N>", "imageN") and are held in `held` (seq -> item) until their result
    leaves, for Result.image()."""
    for seq, item in enumerate(images):
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            name = path.rstrip("/").rsplit("/", 1)[-1] if is_url(path) else os.path.basename(path)
            yield seq, ImageRef(path=path, name=name, rel=str(seq), index=seq), None
            continue
        held[seq] = item
        yield seq, ImageRef(path=f"<image {seq}>", name=f"image{seq}", rel=str(seq), index=seq), item


def segment(images: Iterable, model: Union[str, Segmenter] = DEFAULT_MODEL, batch_size: Optional[int] = None,
            **options) -> Iterator[Union[Result, Failure]]:
    """Segment every image of an iterable; yield one Result (or Failure) per input, in input order,
    each as soon as it and those before it are done.

    images: paths, fsspec URLs, PIL images (used as given: ImageOps.exif_transpose them first if
        they came from files) or (H, W, 3) uint8 RGB arrays (also (H, W) and (H, W, 4)), mixed freely,
        from any iterable (a generator too: it is drawn lazily).
    model: a hub id or save_pretrained folder (loaded now), or a loaded Segmenter (reused; this
        call's post-processing options apply, its device and dtype stay).
    batch_size: images per forward pass (None: the CLI's choice for the device).
    options: those of ``m2f segment`` that concern results (OPTIONS; docs/python-api.md), same
        names and defaults as RunConfig: threshold=None keeps each view's CLI default (0.5; COCO 0).
    An input that cannot be read or segmented yields a Failure (ref, stage, error). Raises
    UsageError for bad options (before any image is read) and ModelLoadError/DeviceError as a run does.
    """
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    config = api_config(model, batch_size, options)
    seg = _segmenter(model, config)
    bs, workers, threads = auto_settings(seg.device, config, padded=seg.spec.padded_size(3000, 4000),
                                         dtype=getattr(seg.predictor, "dtype", None))
    if threads:
        torch.set_num_threads(threads)
    thresholds = writer_thresholds(config)
    views = Views(thresholds=thresholds, model=model if isinstance(model, str) else seg.model_id,
                  revision=config.revision, top_k=config.top_k, overlay_alpha=config.overlay_alpha,
                  overlay_scores=config.overlay_scores, simplify=config.simplify,
                  cutout_pad=pad_option(config.cutout_pad), cutout_visible=config.cutout_visible)
    return _results(images, seg, config, views, bs, workers)


def _results(images: Iterable, seg: Segmenter, config: RunConfig, views: Views, batch_size: int,
             workers: int) -> Iterator[Union[Result, Failure]]:
    held: dict[int, Any] = {}
    dataset = ItemDataset(seg.spec, config.max_pixels, config.fast_decode, seg.tiling)
    loader = make_loader(dataset, workers, sampler=_keys(images, held))

    def samples() -> Iterator[Sample]:
        it = iter(loader)
        try:
            yield from it
        finally:
            del it  # shuts the workers down

    ordered = in_order(segment_samples(seg, samples(), batch_size))
    try:
        for item in ordered:
            source = held.pop(item.ref.index, None)
            if isinstance(item, Failure):
                yield item
            else:
                yield Result(item, seg.categories, views, source)
    finally:
        ordered.close()
