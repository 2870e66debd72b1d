"""The in-memory API: a loaded model plus its preprocessing and post-processing.

    from m2f_cli import Segmenter
    seg = Segmenter(model="facebook/mask2former-swin-tiny-coco-instance", device="auto")
    result = seg(Image.open("cat.jpg"))        # -> ImageResult
    for inst in result.instances: print(inst.label, inst.score, inst.bbox)

``run(config)`` in pipeline.py drives the same object over folders.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from m2f_cli.model.startup.builds import startup_mode
from m2f_cli.model.accel import DeviceTimer, MpsFallbackNotices, free_device_memory, is_out_of_memory
from m2f_cli.model.categories import COCO_NAMES, CategoryTable, canonical_name
from m2f_cli.config import DEFAULT_MODEL
from m2f_cli.inputs.decode import _to_rgb
from m2f_cli.model.loading import ModelSource, Predictor, load, resolve_device, resolve_dtype, resolve_model
from m2f_cli.postprocess.instance import PostprocessOptions, segment_instances
from m2f_cli.postprocess.panoptic import panoptic_from_logits
from m2f_cli.postprocess.semantic import semantic_from_logits
from m2f_cli.postprocess.device import launch_batch
from m2f_cli.inputs.preprocess import PreprocessSpec, load_checkpoint_spec, preprocess, spec_for_resize
from m2f_cli.records import ImageRef, ImageResult
from m2f_cli.tiling.driver import segment_tiled
from m2f_cli.tiling.grid import cut_tiles
from m2f_cli.tiling.options import TileOptions, parse_tile

# tiles per forward pass in Segmenter.segment (the pipeline uses its --batch-size)
TILE_BATCH = 4


def tile_options(tile: Optional[str], tile_full: bool, task: str) -> Optional[TileOptions]:
    """Segmenter's tile/tile_full -> TileOptions (None without tiles); ValueError for bad values."""
    if tile is None:
        if tile_full:
            raise ValueError("--tile-full adds a whole-image pass to --tile: give --tile too")
        return None
    if task != "instance":
        raise ValueError(f"--tile merges instances; this is a {task} model (--task {task})")
    return parse_tile(tile, tile_full)

log = logging.getLogger(__name__)


def resolve_classes(categories: CategoryTable, classes: Sequence[str]) -> Optional[frozenset[int]]:
    """--classes names/ids -> model label indices; KeyError (listing valid names) for unknown ones."""
    specs = [c for item in classes for c in item.split(",") if c.strip()]
    if not specs:
        return None
    return frozenset(categories.resolve(s).index for s in specs)


TASKS = ("auto", "instance", "panoptic", "semantic")
# The instance classes of the Cityscapes instance checkpoints ("rider" is not a COCO class).
_CITYSCAPES_INSTANCE = frozenset({"person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"})


def _names_of(model_name: Optional[str], local_dir: Optional[str]) -> list[str]:
    """What the checkpoint calls itself: the name given, its folder's name, config _name_or_path."""
    names = [model_name or ""]
    if local_dir:
        names.append(os.path.basename(os.path.normpath(local_dir)))
        try:
            with open(os.path.join(local_dir, "config.json"), encoding="utf-8") as f:
                names.append(str(json.load(f).get("_name_or_path") or ""))
        except (OSError, ValueError, AttributeError):
            pass
    return [n.rstrip("/").rsplit("/", 1)[-1].lower() for n in names if n]


def resolve_task(task: str, model_name: Optional[str], categories: CategoryTable,
                 local_dir: Optional[str] = None) -> str:
    """--task auto: what the checkpoint says about itself.

    1. Its name (the hub id or folder given, the folder's own name, config.json's _name_or_path)
       ending in -instance, -panoptic or -semantic, as every published Mask2Former checkpoint does.
    2. Its classes: only COCO thing classes (the COCO instance checkpoints, and models fine-tuned on
       a subset of them) or exactly the Cityscapes instance classes -> instance. Panoptic and
       semantic label sets share their sizes with each other (Mapillary 65, ADE 150, Cityscapes 19),
       so a count decides nothing.
    Otherwise ValueError asking for --task: a guess would silently run the wrong post-processing.
    """
    t = task.strip().lower()
    if t not in TASKS:
        raise ValueError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    if t != "auto":
        return t
    for name in _names_of(model_name, local_dir):
        for suffix in ("instance", "panoptic", "semantic"):
            if name.endswith(("-" + suffix, "_" + suffix)):
                return suffix
    canon = {canonical_name(c.name) for c in categories.categories}
    if canon and (canon <= set(COCO_NAMES) or canon == _CITYSCAPES_INSTANCE):
        return "instance"
    raise ValueError(f"--task auto: cannot tell the task of {model_name or 'this model'} from its name or "
                     f"its {len(categories)} classes; pass --task instance, panoptic or semantic")


@dataclass
class BatchTimes:
    """forward_s: seconds of the forward passes, device work included (CUDA: events around it on the
    stream; MPS: the clock after torch.mps.synchronize(); CPU: the clock); postprocess_s: main-thread
    seconds of post-processing (on accelerators: queueing the device part, waiting for its two
    transfers, the host part)."""

    forward_s: float = 0.0
    postprocess_s: float = 0.0


class StageError(Exception):
    """The model (stage "model") or the post-processing (stage "postprocess") failed on a batch or an
    image; message: one line naming the exception. Engines turn it into Failure records."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def describe_error(e: BaseException) -> str:
    """One line for any exception: its type and its first line."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


POSTPROCESS_MODES = ("auto", "device", "host")


class InFlight:
    """One batch between Segmenter.start and finish: its forward and (on accelerators) its device
    post-processing are queued; finish() waits for them and does the host work."""

    def __init__(self, seg: "Segmenter", refs, padded, valids, originals, logits, pending, timer, post_s):
        self.seg, self.refs, self.padded = seg, list(refs), padded
        self.valids, self.originals = list(valids), list(originals)
        self.logits, self.pending, self.timer, self.post_s = logits, pending, timer, post_s

    def finish(self) -> list[Union[ImageResult, StageError]]:
        """One ImageResult per image, or the StageError of the image whose post-processing failed."""
        seg = self.seg
        t0 = time.perf_counter()
        per_image: Optional[list] = None
        if self.pending is not None:
            try:
                per_image = self.pending.finish()
            except Exception as e:  # an op the device lacks, device OOM on huge images: the CPU path
                seg._fall_back(e)
        out: list[Union[ImageResult, StageError]] = []
        class_logits, mask_logits = self.logits
        if per_image is None and seg.device.type != "cpu":
            class_logits, mask_logits = class_logits.float().cpu(), mask_logits.float().cpu()
        for b, ref in enumerate(self.refs):
            try:
                if per_image is not None:
                    inst, imap = per_image[b]
                    h, w = self.originals[b]
                    out.append(ImageResult(ref, w, h, inst, imap, seg.options.map_threshold))
                else:
                    out.append(seg._result(ref, class_logits[b], mask_logits[b], self.padded, self.valids[b],
                                           self.originals[b]))
            except Exception as e:
                out.append(StageError("postprocess", describe_error(e)))
        seg.times.forward_s += self.timer.elapsed()
        seg.times.postprocess_s += self.post_s + time.perf_counter() - t0
        self.logits = self.pending = None
        return out


def _builds_mode(builds: str, announce: Optional[Callable[[str], None]]) -> str:
    """"detach" (one detached builder after this process) only for the CLI at a terminal, which
    passes announce: the library never starts a process that outlives the call."""
    if builds == "detach" and announce is None:
        raise ValueError("builds='detach' leaves a process behind: only `m2f segment` at a terminal does")
    return builds


class Segmenter:
    """A model ready to segment: weights on a device, a preprocessing spec, post-processing options.

    model: a hub id, a local save_pretrained folder, or a ready Predictor (tests, custom models).
    threshold: minimum score of kept instances; map_threshold: minimum score drawn in the
        instance map (defaults to threshold).
    startup_cache: on CPU at a fixed input size, load the model from the start-up cache: "auto"
        (the compiled package, else the trace), "trace" (the trace only) or "off"; None:
        M2F_STARTUP_CACHE, else "auto" (builds.startup_mode; docs/startup-cache.md).
    notify: where one-line notices (building the cache, MPS ops run on the CPU, a post-processing
        fallback) go; default: logging at INFO.
    postprocess: instance post-processing "auto" (batched on the device on CUDA and MPS, the
        per-query windowed CPU path on CPU), "device" (batched, on the logits' device) or "host"
        (logits to the CPU, the CPU path). Both give the same instances (tests/test_device_path.py).
    tile: "SIZE[,OVERLAP]" or "auto[,OVERLAP]": cut images into tiles (tiling.py; instance task
        only); tile_full: with tile, also run the whole image and merge its instances in.
    builds: when the start-up cache has no entry for this model: "inline" builds the trace in this
        load, "none" builds nothing (model.load; builds.py says who builds what, when). The library
        never leaves a process behind it; startup_hint then names the one-time command
        (`m2f cache build`) that would make later loads faster, or is None.
    """

    def __init__(self, model: Union[str, Predictor] = DEFAULT_MODEL, *, device: str = "auto",
                 dtype: str = "auto", revision: Optional[str] = None, allow_pickle: bool = False,
                 resize: str = "checkpoint", threshold: float = 0.5, map_threshold: Optional[float] = None,
                 top_k: int = 100, classes: Sequence[str] = (), compile: bool = False,
                 task: str = "auto", source: Optional[ModelSource] = None, startup_cache: Optional[str] = None,
                 notify: Optional[Callable[[str], None]] = None, postprocess: str = "auto",
                 tile: Optional[str] = None, tile_full: bool = False,
                 builds: str = "inline", announce: Optional[Callable[[str], None]] = None):
        if isinstance(model, str):
            self.source = source or resolve_model(model, revision, allow_pickle)
            dev = resolve_device(device)
            dt = resolve_dtype(dtype, dev)
            self.spec: PreprocessSpec = spec_for_resize(resize, load_checkpoint_spec(self.source.local_dir))
            mode = startup_mode(startup_cache)
            fixed = self.spec.padded_size(1, 1) if self.spec.mode == "fixed" and mode != "off" else None
            loaded = load(self.source, dev, dt, allow_pickle=allow_pickle, compile=compile, trace_size=fixed,
                          notify=notify, builds=_builds_mode(builds, announce), announce=announce,
                          cache_mode=mode)
            self.predictor: Predictor = loaded.predictor
            self.startup_hint: Optional[str] = loaded.hint
        else:
            self.source = source
            self.predictor = model
            self.startup_hint = None
            self.spec = spec_for_resize(resize, getattr(model, "preprocess_spec", PreprocessSpec()))
        self.categories: CategoryTable = self.predictor.categories
        name = self.source.spec if self.source else None
        self.task = resolve_task(task, name, self.categories, self.source.local_dir if self.source else None)
        if not 1 <= top_k <= 65535:
            raise ValueError(f"--top-k {top_k}: expected 1..65535")
        self.options = PostprocessOptions(threshold=threshold,
                                          map_threshold=threshold if map_threshold is None else map_threshold,
                                          top_k=top_k, keep=resolve_classes(self.categories, classes))
        self.times = BatchTimes()
        if postprocess not in POSTPROCESS_MODES:
            raise ValueError(f"postprocess {postprocess!r}: expected one of {', '.join(POSTPROCESS_MODES)}")
        self.postprocess = postprocess
        # largest batch the device held after an out-of-memory split (engines.batches.start_batch), or None
        self.max_batch: Optional[int] = None
        self.notify: Callable[[str], None] = notify or log.info
        self._mps_notices = MpsFallbackNotices(self.notify)  # not a lambda on self: no reference cycle
        self.tiling = tile_options(tile, tile_full, self.task)

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def model_id(self) -> str:
        return self.source.spec if self.source else type(self.predictor).__name__

    def uses_device_postprocess(self) -> bool:
        """Whether instance post-processing runs batched on the model's device (postprocess/device.py):
        "auto" on CUDA and MPS (on CPU the per-query windowed path of postprocess/instance.py is ~40x faster:
        benchmarks/postprocess_speed.py), or when asked for ("device"); never for panoptic/semantic."""
        if self.task != "instance":
            return False
        if self.postprocess == "auto":
            return self.device.type in ("cuda", "mps")
        return self.postprocess == "device"

    def _fall_back(self, e: BaseException) -> None:
        """The device post-processing failed; this batch is post-processed on the CPU. Out of memory
        (huge photos): only this batch; anything else (an op the device lacks): from now on, said once."""
        if is_out_of_memory(e):
            free_device_memory(self.device)
            self.notify(f"post-processing ran out of {self.device.type} memory; this batch is "
                        f"post-processed on the CPU")
        elif self.postprocess != "host":
            self.notify(f"post-processing on {self.device.type} failed ({describe_error(e)}); "
                        f"post-processing on the CPU from now on")
            self.postprocess = "host"

    def start(self, pixel_values: torch.Tensor, refs: Sequence[ImageRef], valids: Sequence[tuple[int, int]],
              originals: Sequence[tuple[int, int]]) -> InFlight:
        """Queue one batch: copy, forward and (on accelerators) device post-processing, without waiting
        for the device. pixel_values: (B, 3, Hp, Wp) float32 (pinned memory makes the copy
        asynchronous: accel.stack_pixels); per image its ref, (h, w) unpadded resized size and
        (H0, W0) original size. Raises a device OOM as it is (the caller splits the batch) and any
        other failure of the model as StageError("model")."""
        timer = DeviceTimer(self.device).start()
        try:
            with self._mps_notices.watching():
                x = pixel_values.to(self.device, non_blocking=True)
                class_logits, mask_logits = self.predictor(x)
        except Exception as e:
            if is_out_of_memory(e):
                raise
            hint = ""
            if isinstance(e, NotImplementedError) and self.device.type == "mps":
                hint = " (set PYTORCH_ENABLE_MPS_FALLBACK=1 before m2f starts, or use --device cpu)"
            raise StageError("model", describe_error(e) + hint) from e
        timer.stop()
        t1 = time.perf_counter()
        padded = tuple(pixel_values.shape[-2:])
        pending = None
        if self.uses_device_postprocess():
            try:
                pending = launch_batch(class_logits, mask_logits, padded, valids, originals, self.categories,
                                       self.options)
            except Exception as e:
                self._fall_back(e)
        return InFlight(self, refs, padded, valids, originals, (class_logits, mask_logits), pending, timer,
                        time.perf_counter() - t1)

    def infer(self, pixel_values: torch.Tensor, refs: Sequence[ImageRef], valids: Sequence[tuple[int, int]],
              originals: Sequence[tuple[int, int]]) -> list[ImageResult]:
        """pixel_values: (B, 3, Hp, Wp) float32 (one padded shape); per image its ref, (h, w)
        unpadded resized size and (H0, W0) original size. Returns one ImageResult per image;
        raises StageError (or a device OOM) when the model or an image's post-processing fails."""
        out = self.start(pixel_values, refs, valids, originals).finish()
        for r in out:
            if isinstance(r, StageError):
                raise r
        return out

    def _result(self, ref: ImageRef, class_logits: torch.Tensor, mask_logits: torch.Tensor,
                padded: tuple[int, int], valid: tuple[int, int], original: tuple[int, int]) -> ImageResult:
        h, w = original
        if self.task == "instance":
            inst, imap = segment_instances(class_logits, mask_logits, padded, valid, original, self.categories,
                                           self.options)
            return ImageResult(ref, w, h, inst, imap, self.options.map_threshold)
        if self.task == "panoptic":
            seg_map, segments = panoptic_from_logits(class_logits, mask_logits, padded, valid, original,
                                                     self.categories)
        else:
            seg_map, segments = semantic_from_logits(class_logits, mask_logits, padded, valid, original,
                                                     self.categories)
        return ImageResult(ref, w, h, [], seg_map, 0.0, task=self.task, segments=segments)

    def __call__(self, image) -> ImageResult:
        return self.segment([image])[0]

    def segment(self, images: Iterable) -> list[ImageResult]:
        """PIL images or (H, W, 3) uint8 RGB arrays -> ImageResults (one batch per image shape).
        PIL images are used as given: apply ImageOps.exif_transpose first if they came from a file."""
        results = []
        for n, image in enumerate(images):
            rgb = _as_rgb(image)
            ref = ImageRef(path=f"<image {n}>", name=f"image{n}", rel=f"image{n}", index=n)
            tiles = cut_tiles(rgb, self.spec, self.tiling) if self.tiling is not None else None
            if tiles is not None:  # --tile: see tiling.py
                full = preprocess(rgb, self.spec) if self.tiling.full else None
                r = segment_tiled(self, ref, tiles, rgb.shape[:2], TILE_BATCH,
                                  (torch.from_numpy(full.pixel_values), full.valid) if full else None)
                r.image = rgb
                results.append(r)
                continue
            mi = preprocess(rgb, self.spec)
            r = self.infer(torch.from_numpy(mi.pixel_values)[None], [ref], [mi.valid], [rgb.shape[:2]])[0]
            r.image = rgb
            results.append(r)
        return results


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}")
        return np.ascontiguousarray(image[..., :3])
    return np.asarray(_to_rgb(image), dtype=np.uint8)
