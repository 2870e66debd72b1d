"""The run's options: every check that needs neither the inputs nor the model, and the choices m2f
makes where the user left them open (batch size, workers, compile, each format's threshold, the
device and dtype). One place, read by the recipe (pipeline.py) and by every engine."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Optional

import torch

from m2f_cli.model.accel import cuda_batch_size
from m2f_cli.model.startup.builds import startup_mode
from m2f_cli.config import RunConfig
from m2f_cli.errors import UsageError
from m2f_cli.outputs.formats import FORMATS
from m2f_cli.model.loading import DTYPES, resolve_device, resolve_dtype
from m2f_cli.inputs.preprocess import PreprocessSpec, spec_for_resize
from m2f_cli.segmenter import tile_options
from m2f_cli.outputs.writers import REGISTRY

if TYPE_CHECKING:
    from m2f_cli.segmenter import Segmenter


RAY_MISSING = "--ray needs Ray: pip install 'm2f[ray]'"


def _ray_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("ray") is not None


def auto_settings(device: torch.device, config: RunConfig, padded: Optional[tuple[int, int]] = None,
                  dtype: Optional[torch.dtype] = None) -> tuple[int, int, Optional[int]]:
    """(batch_size, workers, threads) for the device unless the user chose them.

    CPU: the model's threads own the cores; one decode worker (two on bigger machines) is enough
    to keep up with a ~1 s forward, and batching does not pay on CPU (the compiled package runs a
    batch image by image; eager batches of 2 or 4 measured no faster), so batches are single
    images: the next forward can then run beside each image's post-processing where that is heavy
    (engines/batches._ahead; 4 crowded photos in batches of 2 hid none of their forwards).
    CUDA: the batch size the card's memory holds at the model input size padded (accel.cuda_batch_size; an OOM still splits
    the batch), and every core but two decoding (a GPU forward of Swin-T takes a few ms an image,
    decoding a 640x480 JPEG and resizing it ~5-10 ms a core), at most 16.
    """
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        bs = cuda_batch_size(total, padded or (384, 384), dtype or torch.bfloat16)
        workers = min(16, max(2, cores - 2))
    elif device.type == "mps":
        bs, workers = 4, min(4, cores)
    else:
        bs, workers = 1, (1 if cores <= 4 else 2)
    return (config.batch_size or bs,
            workers if config.workers is None else config.workers,
            config.threads)


# On CPU torch.compile made the forward ~1.3x faster after a one-time compile of ~300 s on 2 busy
# cores (~20 s with inductor's on-disk cache warm); at ~0.5 s saved per image it pays back within
# ~600 images even when cold. Measured with the real architecture: README "Speed".
COMPILE_AUTO_MIN_IMAGES = 1000

# A model's first run builds its start-up trace (~8-12 s on 2 cores) inside the run only when the
# run is long enough for that to cost little (~5% at ~1 s per image); a shorter first run goes on
# with the eager model (model/native: 1.8x the model-card snippet on 16 photos) and builds
# nothing, or, at a terminal only, leaves one detached builder behind it (builds.py).
TRACE_INLINE_MIN_IMAGES = 200


def build_mode(images: int, detached_ok: bool) -> str:
    """What a run of this many images builds of a missing start-up cache entry (model.load's builds)."""
    if images >= TRACE_INLINE_MIN_IMAGES:
        return "inline"
    return "detach" if detached_ok else "none"


def resolve_compile(choice: Optional[bool], device: torch.device, images: int, fixed_size: bool) -> bool:
    """--compile/--no-compile, or auto: compile on CPU for runs long enough to pay the compile back,
    at a fixed input size (each new input shape is another compile). Not on GPUs: unmeasured."""
    if choice is not None:
        return choice
    return device.type == "cpu" and fixed_size and images >= COMPILE_AUTO_MIN_IMAGES


def validate(config: RunConfig) -> None:
    """Every check that needs neither the inputs nor the model. Raises UsageError."""
    if not config.formats:
        raise UsageError("no --format given")
    try:
        startup_mode(config.startup_cache)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for f in config.formats:
        if f not in FORMATS:
            raise UsageError(f"--format {f!r}: expected one of {', '.join(FORMATS)}")
    if config.out == "-":
        if set(config.formats) != {"jsonl"}:
            raise UsageError("--out - writes JSON Lines to stdout: use it with --format jsonl only")
    if config.threshold is not None and not 0.0 <= config.threshold <= 1.0:
        raise UsageError(f"--threshold {config.threshold}: expected a value in [0, 1]")
    if not 1 <= config.top_k <= 65535:
        raise UsageError(f"--top-k {config.top_k}: expected 1..65535")
    for name, v in (("--batch-size", config.batch_size), ("--threads", config.threads)):
        if v is not None and v < 1:
            raise UsageError(f"{name} {v}: expected a positive number")
    if config.workers is not None and config.workers < 0:
        raise UsageError(f"--workers {config.workers}: expected 0 or more")
    if config.shard is not None and not (config.shard[1] >= 1 and 0 <= config.shard[0] < config.shard[1]):
        raise UsageError(f"--shard {config.shard[0]}/{config.shard[1]}: expected 0 <= I < N")
    if config.max_failures is not None and config.max_failures < 1:
        raise UsageError(f"--max-failures {config.max_failures}: expected 1 or more")
    if config.coco_annotations and not os.path.isfile(config.coco_annotations):
        raise UsageError(f"--coco-annotations {config.coco_annotations}: no such file")
    if config.overlay_format not in ("jpg", "png"):
        raise UsageError(f"--overlay-format {config.overlay_format!r}: expected jpg or png")
    if not 0.0 <= config.overlay_alpha <= 1.0:
        raise UsageError(f"--overlay-alpha {config.overlay_alpha}: expected a value in [0, 1]")
    if not config.simplify >= 0:
        raise UsageError(f"--simplify {config.simplify}: expected a tolerance >= 0 pixels")
    if config.ray is not None:
        if not config.ray.strip():
            raise UsageError("--ray: expected auto, local or a cluster address")
        if not _ray_installed():
            raise UsageError(RAY_MISSING)
    elif config.ray_actors is not None:
        raise UsageError("--ray-actors needs --ray")
    elif config.ray_cpus_per_actor is not None:
        raise UsageError("--ray-cpus-per-actor needs --ray")
    if config.ray_cpus_per_actor is not None and config.ray_cpus_per_actor < 1:
        raise UsageError(f"--ray-cpus-per-actor {config.ray_cpus_per_actor}: expected 1 or more")
    if config.ray_actors is not None and config.ray_actors < 1:
        raise UsageError(f"--ray-actors {config.ray_actors}: expected 1 or more")
    if not config.ray_timeout > 0:
        raise UsageError(f"--ray-timeout {config.ray_timeout}: expected a positive number of seconds")
    try:
        spec_for_resize(config.resize, PreprocessSpec())
    except ValueError as e:
        raise UsageError(str(e)) from None
    tile_of(config)
    from m2f_cli.inputs.frame_selection import selection_of
    selection_of(config)  # --every/--fps/--start/--end


def tile_of(config: RunConfig):
    """--tile/--tile-full as tiling.TileOptions (None without tiles); UsageError for bad values."""
    try:
        tile = tile_options(config.tile, config.tile_full, "instance")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if tile is not None and config.fast_decode:
        raise UsageError("--fast-decode decodes JPEGs at the model's reduced size; --tile needs every pixel")
    if tile is not None:  # what a TIFF read window by window cannot be written as (tiling/stream.py)
        from m2f_cli.tiling.stream import WINDOWED_FORMATS
        tile = dataclasses.replace(tile, whole_formats=tuple(f for f in config.formats if f not in WINDOWED_FORMATS))
    return tile


def writer_thresholds(config: RunConfig) -> dict[str, float]:
    """Each format's score threshold: --threshold for all, else each writer's own default."""
    return {f: (config.threshold if config.threshold is not None else REGISTRY[f].default_threshold)
            for f in config.formats}


def segment_threshold(config: RunConfig, thresholds: dict[str, float]) -> float:
    """The least score the segmenter keeps: the writers' least threshold, and with --track the
    tracker's low one (weak detections continue tracks; the writers still filter by their own)."""
    low = min(thresholds.values())
    if config.track:
        from m2f_cli.tracking.tracker import TrackerConfig
        low = min(low, TrackerConfig().low)
    return low


def map_threshold(config: RunConfig, thresholds: dict[str, float]) -> float:
    """The instance map (PNG, overlay) is drawn at the PNG/overlay threshold."""
    drawn = [thresholds[f] for f in ("png", "overlay") if f in thresholds]
    return drawn[0] if drawn else (config.threshold if config.threshold is not None else 0.5)


def segmenter_options(config: RunConfig, task: str) -> dict:
    """Segmenter(**options) for this run: what every engine loads, in this process or elsewhere."""
    thresholds = writer_thresholds(config)
    return dict(model=config.model, device=config.device, dtype=config.dtype, revision=config.revision,
                allow_pickle=config.allow_pickle, resize=config.resize, threshold=segment_threshold(config, thresholds),
                map_threshold=map_threshold(config, thresholds), top_k=config.top_k, classes=config.classes,
                compile=bool(config.compile), task=task, startup_cache=config.startup_cache,
                tile=config.tile, tile_full=config.tile_full)


def device_and_dtype(config: RunConfig, segmenter: Optional[Segmenter], engine) -> tuple[torch.device, str]:
    """The device this process runs the model on and the dtype's resolved name, checked before
    anything is skipped or loaded (so a finished folder refuses a bad --dtype like a fresh one)."""
    if segmenter is not None:
        dt = getattr(segmenter.predictor, "dtype", torch.float32)
        return segmenter.device, str(dt).replace("torch.", "")
    if config.ray is not None or engine is not None:
        if config.dtype.strip().lower() not in ("auto", *DTYPES):
            raise UsageError(f"--dtype {config.dtype!r}: expected auto, float32, bfloat16 or float16")
        return torch.device("cpu"), config.dtype  # the models run elsewhere; this process only writes
    try:
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return device, str(dtype).replace("torch.", "")
