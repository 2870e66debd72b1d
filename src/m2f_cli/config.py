"""The run configuration: every default lives here, and the CLI reads its defaults from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional



DEFAULT_MODEL = "facebook/mask2former-swin-tiny-coco-instance"
# Pillow's own default limit; above it we refuse to decode (decompression bombs).
DEFAULT_MAX_PIXELS = 89_478_485
# --ray-timeout: seconds one chunk of images may run on a Ray actor before it is killed and retried
DEFAULT_RAY_TIMEOUT = 600.0


@dataclass
class RunConfig:
    """One ``m2f segment`` run.

    inputs: files, folders or glob patterns (the CLI turns ``-`` into paths read from stdin).
    out: output folder, or "-" for JSON Lines on stdout.
    threshold: None = each format's own default (png/overlay/jsonl 0.5, coco 0.0).
    batch_size / workers / threads: None = chosen for the device (see options.auto_settings).
    ray: None = run here; "auto" (the running cluster: RAY_ADDRESS, else one `ray start`ed here), "local"
        (start one) or a cluster address: run the per-batch work as Ray actors (engines/ray.py).
    ray_actors: None = one per GPU, or as many CPU actors as fit leaving one CPU free.
    ray_cpus_per_actor: CPUs Ray reserves for each actor (decode, preprocess, post-processing, torch
        threads); None = for GPU actors a GPU node's CPUs less one, shared by its GPUs, at most 8; for
        CPU actors --threads (engines.ray.RayEngine.plan).
    tile: None = the whole image at once; "SIZE[,OVERLAP]" or "auto[,OVERLAP]": cut it into tiles
        (tiling.py); tile_full: with tile, also run the whole image and merge it in.
    """

    inputs: list[str]
    out: str
    formats: tuple[str, ...] = ("png",)
    model: str = DEFAULT_MODEL
    revision: Optional[str] = None
    allow_pickle: bool = False
    device: str = "auto"
    dtype: str = "auto"
    batch_size: Optional[int] = None
    workers: Optional[int] = None
    threads: Optional[int] = None
    threshold: Optional[float] = None
    top_k: int = 100
    classes: tuple[str, ...] = ()
    resize: str = "checkpoint"
    task: str = "auto"
    fast_decode: bool = False
    tile: Optional[str] = None
    tile_full: bool = False
    # videos (inputs/video.py): which frames; start/end in seconds or "hh:mm:ss"; fps excludes every
    every: Optional[int] = None
    fps: Optional[float] = None
    start: Optional[str] = None
    end: Optional[str] = None
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    max_failures: Optional[int] = None
    coco_annotations: Optional[str] = None
    overlay_format: str = "jpg"
    overlay_alpha: float = 0.5
    overlay_scores: bool = True  # "label score" tags; False: label only
    rle: bool = False
    simplify: float = 0.0  # polygon formats: Douglas-Peucker tolerance in pixels; 0 = exact (polygons.py)
    cutout_pad: int = 0  # cutouts: pixels of margin around each instance's box (writers/cutout.py)
    cutout_visible: bool = False  # cutouts: only the pixels the instance owns in the map, not its whole mask
    # link the instances of consecutive frames (a video's, a folder's images in name order) into
    # tracks (tracking/; the tracker's defaults: tracking.tracker.TrackerConfig, docs/tracking.md)
    track: bool = False
    overlay_video: bool = True  # -f overlay on a video also writes <video>.overlay.mp4 (writers/video_overlay.py)
    compile: Optional[bool] = None  # None = auto (options.resolve_compile)
    startup_cache: Optional[str] = None  # auto | trace | off; None: M2F_STARTUP_CACHE, else auto (builds.py)
    # the CLI sets this when a person is at a terminal (stderr is a TTY): a short run that finds no
    # start-up cache entry may then leave one detached builder behind it (builds.py); never otherwise
    detached_build: bool = False
    shard: Optional[tuple[int, int]] = None
    ray: Optional[str] = None
    ray_actors: Optional[int] = None
    ray_timeout: float = DEFAULT_RAY_TIMEOUT
    ray_cpus_per_actor: Optional[int] = None
    options: dict = field(default_factory=dict)
