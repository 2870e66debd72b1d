"""``m2f segment``: parse the options into a RunConfig, run it (or plan it: --dry-run), render the
summary, pick the exit code. Its help is grouped in panels."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from m2f_cli.config import RunConfig
from m2f_cli.errors import ExitCode

from m2f_cli.cli.common import DEFAULTS, error, errors_as_exit_codes, setup_logging, silence_stdout, verbose_option, app

# `m2f segment --help` in panels, in the order a user needs them (by parameter name), with
# readable placeholders. A test checks that every option of segment has a panel.
SEGMENT_PANELS: dict[str, tuple[str, ...]] = {
    "Inputs": ("inputs", "null", "max_pixels", "every", "fps", "start", "end"),
    "Outputs": ("out", "formats", "overlay_format", "overlay_alpha", "overlay_scores", "overlay_video", "rle",
                "simplify", "cutout_pad", "cutout_visible", "coco_annotations"),
    "Model": ("model", "revision", "allow_pickle", "task"),
    "Quality": ("threshold", "top_k", "classes", "resize", "tile", "tile_full", "track"),
    "Speed": ("device", "dtype", "batch_size", "workers", "threads", "compile", "startup_cache", "fast_decode"),
    "Scale-out": ("shard", "devices", "ray", "ray_actors", "ray_timeout", "ray_cpus_per_actor"),
    "Bookkeeping": ("overwrite", "max_failures", "dry_run", "summary_json", "quiet", "verbose", "help"),
}
METAVARS = {
    "inputs": "PATH|GLOB|URL|-", "out": "DIR|URL|-", "formats": "FORMAT", "model": "HUB_ID|DIR",
    "revision": "REV", "device": "DEVICE", "dtype": "DTYPE", "batch_size": "N", "workers": "N", "threads": "N",
    "threshold": "SCORE", "top_k": "K", "classes": "NAMES", "resize": "MODE", "task": "TASK",
    "max_pixels": "N", "max_failures": "N", "coco_annotations": "FILE", "overlay_format": "jpg|png",
    "overlay_alpha": "0..1", "simplify": "PX", "shard": "I/N", "devices": "LIST", "summary_json": "FILE",
    "tile": "SIZE[,OVERLAP]|auto", "ray_cpus_per_actor": "N", "every": "N", "fps": "RATE", "start": "TIME",
    "end": "TIME",
}
SEGMENT_EXAMPLES = (
    "m2f segment photos --out masks",
    "m2f segment photos --out masks -f overlay -f coco",
    "find /data -name '*.jpg' -print0 | m2f segment - -0 --out masks",
    "m2f segment photos -f jsonl --out - | jq '.instances | length'",
    "m2f segment s3://bucket/imgs --out s3://bucket/masks --shard 3/16",
)


class _PanelledCommand(typer.core.TyperCommand):
    """Click's plain help, with the options grouped in SEGMENT_PANELS and readable METAVARS."""

    def format_options(self, ctx, formatter) -> None:
        where = {name: panel for panel, names in SEGMENT_PANELS.items() for name in names}
        groups: dict[str, list] = {panel: [] for panel in SEGMENT_PANELS}
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                record = (f"{param.name.upper()}...  {METAVARS.get(param.name, '')}".strip(), param.help or "")
            else:
                if param.name in METAVARS and getattr(param, "metavar", None) is None:
                    param.metavar = METAVARS[param.name]
                record = param.get_help_record(ctx)
            if record is not None:
                groups.setdefault(where.get(param.name, "Other"), []).append(record)
        for panel, records in groups.items():
            if records:
                with formatter.section(panel):
                    formatter.write_dl(records)

    def collect_usage_pieces(self, ctx) -> list:
        return [self.options_metavar] + [f"{p.name.upper()}..." for p in self.get_params(ctx)
                                         if isinstance(p, typer.core.TyperArgument)]

    def format_epilog(self, ctx, formatter) -> None:
        from m2f_cli.outputs.formats import FORMATS
        with formatter.section("Formats (--format)"):
            formatter.write_dl(list(FORMATS.items()))
        with formatter.section("Examples"):
            for line in SEGMENT_EXAMPLES:
                formatter.write_text(line)


@app.command(cls=_PanelledCommand)
def segment(
    inputs: List[str] = typer.Argument(..., help="Image and video files, folders (walked recursively), glob "
                                       "patterns, fsspec URLs (s3://bucket/imgs, gs://..., memory://...), "
                                       "or - to read paths from stdin."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (created) or fsspec URL (s3://bucket/masks), "
                                                        "or - for JSON Lines on stdout."),
    formats: List[str] = typer.Option(list(DEFAULTS.formats), "--format", "-f",
                                      help="Output format, repeatable (listed below)."),
    model: str = typer.Option(DEFAULTS.model, "--model", "-m", help="Hub id or local save_pretrained folder."),
    revision: Optional[str] = typer.Option(DEFAULTS.revision, help="Hub revision (branch, tag or commit) to pin."),
    allow_pickle: bool = typer.Option(DEFAULTS.allow_pickle, "--allow-pickle",
                                      help="Allow loading pytorch_model.bin (pickle) when there are no safetensors."),
    device: str = typer.Option(DEFAULTS.device, "--device", "-d", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option(DEFAULTS.dtype, help="auto (float32 on CPU, bfloat16/float16 on CUDA), float32, "
                              "bfloat16 or float16."),
    batch_size: Optional[int] = typer.Option(DEFAULTS.batch_size, "--batch-size", "-b",
                                             help="Images per forward pass (auto: 1 on CPU, 4 on MPS, on CUDA "
                                             "what the card's memory holds; split and retried on out of memory)."),
    workers: Optional[int] = typer.Option(DEFAULTS.workers, help="Decode/preprocess worker processes "
                                          "(auto: 1 on small CPUs; on CUDA every core but two, at most 16); 0 decodes in-process."),
    threads: Optional[int] = typer.Option(DEFAULTS.threads, help="Torch intra-op threads (auto: torch's choice, one per core)."),
    threshold: Optional[float] = typer.Option(DEFAULTS.threshold, "--threshold", "-t",
                                              help="Minimum instance score for every format "
                                              "(auto: 0.5; coco 0.0, the COCO protocol)."),
    top_k: int = typer.Option(DEFAULTS.top_k, "--top-k", help="Candidates (query, class) per image, as in the paper."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Keep only these classes: names or "
                                          "COCO ids, comma-separated (see m2f labels)."),
    resize: str = typer.Option(DEFAULTS.resize, help="checkpoint (the model's preprocessor: 384x384), paper "
                               "(shortest edge 800, longest <= 1333, aspect kept) or SHORT[,LONG]."),
    task: str = typer.Option(DEFAULTS.task, help="auto (what the checkpoint's name or classes say; else it asks), "
                             "instance, panoptic or semantic."),
    fast_decode: bool = typer.Option(DEFAULTS.fast_decode, "--fast-decode",
                                     help="Decode JPEGs at reduced size (draft mode): faster on big photos, "
                                     "pixels differ slightly from the checkpoint's preprocessing."),
    tile: Optional[str] = typer.Option(DEFAULTS.tile, "--tile", metavar="SIZE[,OVERLAP]",
                                       help="Cut images larger than SIZE px into overlapping tiles (OVERLAP a "
                                       "fraction, default 0.2), run each like an image and merge the instances "
                                       "at full resolution: small objects in large photos. auto: twice the "
                                       "model's input side (768 px for 384x384 checkpoints), overlap 0.25."),
    tile_full: bool = typer.Option(DEFAULTS.tile_full, "--tile-full", help="With --tile, also run the whole image "
                                   "and merge its instances in (objects larger than a tile)."),
    track: bool = typer.Option(DEFAULTS.track, "--track", help="Link the instances of consecutive frames (of a "
                               "video, or of a folder's images in name order) into tracks: a confirmed track's "
                               "instances get a track_id, duplicates of one object under two classes are merged, overlays "
                               "are coloured by track (docs/tracking.md)."),
    max_pixels: int = typer.Option(DEFAULTS.max_pixels, help="Refuse images with more pixels (decompression bombs); "
                                   "with --tile, a TIFF above it is read window by window instead."),
    every: Optional[int] = typer.Option(DEFAULTS.every, "--every", help="Videos: segment frames 0, N, 2N, ... "
                                        "(frame indices)."),
    fps: Optional[float] = typer.Option(DEFAULTS.fps, "--fps", help="Videos: segment the frame nearest to each "
                                        "1/RATE s step from --start, by timestamp."),
    start: Optional[str] = typer.Option(DEFAULTS.start, "--start", help="Videos: from this time (seconds or "
                                        "hh:mm:ss[.f]); seeks there."),
    end: Optional[str] = typer.Option(DEFAULTS.end, "--end", help="Videos: up to this time, exclusive (seconds "
                                      "or hh:mm:ss[.f])."),
    overwrite: bool = typer.Option(DEFAULTS.overwrite, "--overwrite", help="Redo images whose outputs exist."),
    max_failures: Optional[int] = typer.Option(DEFAULTS.max_failures, help="Stop after this many failed inputs."),
    coco_annotations: Optional[str] = typer.Option(DEFAULTS.coco_annotations, help="COCO annotation file: take "
                                                   "image ids and categories from it (matched by file name)."),
    overlay_format: str = typer.Option(DEFAULTS.overlay_format, help="Overlay image format: jpg or png."),
    overlay_alpha: float = typer.Option(DEFAULTS.overlay_alpha, help="Mask opacity in overlays, 0..1."),
    overlay_scores: bool = typer.Option(DEFAULTS.overlay_scores, "--overlay-scores/--no-overlay-scores",
                                        help="Overlay tags show \"label score\" (or the label only)."),
    overlay_video: bool = typer.Option(DEFAULTS.overlay_video, "--overlay-video/--no-overlay-video",
                                       help="-f overlay on a video also writes the annotated video "
                                       "(<video>.overlay.mp4, H.264)."),
    rle: bool = typer.Option(DEFAULTS.rle, "--rle", help="Include RLE masks in JSON Lines records."),
    simplify: float = typer.Option(DEFAULTS.simplify, "--simplify", metavar="PX",
                                   help="Polygon formats (yolo, labelme, cvat, geojson): simplify outlines "
                                   "within PX pixels (Douglas-Peucker, topology kept); 0 = exact pixel edges."),
    cutout_pad: int = typer.Option(DEFAULTS.cutout_pad, "--cutout-pad", metavar="PX", min=0,
                                   help="Cutouts: pixels of margin around each object's box (clipped to the image)."),
    cutout_visible: bool = typer.Option(DEFAULTS.cutout_visible, "--cutout-visible", help="Cutouts: only the pixels "
                                        "the object shows in the PNG map (not its whole mask, overlaps included)."),
    compile: Optional[bool] = typer.Option(DEFAULTS.compile, "--compile/--no-compile", help="Compile the model "
                                           "before the first image: on CPU into the start-up cache (AOTInductor, "
                                           "~2 min on 2 cores, kept for later runs), elsewhere torch.compile. "
                                           "Default: on for CPU runs of 1000+ images at a fixed input size."),
    startup_cache: Optional[str] = typer.Option(DEFAULTS.startup_cache, "--startup-cache", metavar="auto|trace|off",
                                                help="On CPU at a fixed input size, load the model from the "
                                                "start-up cache (M2F_CACHE_DIR, else ~/.cache/m2f): auto = the "
                                                "model compiled for this CPU, else a TorchScript trace; trace = "
                                                "the trace only; off = never. Default: M2F_STARTUP_CACHE, else auto."),
    devices: Optional[str] = typer.Option(None, "--devices", help="Run one worker per device over "
                                          "disjoint shards: CUDA indices (0,1), all, or names (cuda:0,cpu)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: process a stable 1/N of the inputs "
                                        "(0 <= I < N), writing part files that m2f merge combines."),
    ray: Optional[str] = typer.Option(DEFAULTS.ray, "--ray", metavar="ADDRESS",
                                      help="Run the models as Ray actors, one per GPU (pip install "
                                      "'m2f[ray]'): auto (the running cluster, RAY_ADDRESS), local (start "
                                      "one here) or a cluster address. This process writes the outputs."),
    ray_actors: Optional[int] = typer.Option(DEFAULTS.ray_actors, "--ray-actors", metavar="N",
                                             help="Ray actors (auto: one per GPU; on CPUs, as many of "
                                             "--threads CPUs as fit leaving one CPU free)."),
    ray_cpus_per_actor: Optional[int] = typer.Option(DEFAULTS.ray_cpus_per_actor, "--ray-cpus-per-actor", metavar="N",
                                                     help="CPUs each Ray actor reserves and uses (decoding, "
                                                     "post-processing, torch threads). Auto: a GPU node's "
                                                     "CPUs less one, split among its GPUs, at most 8; on "
                                                     "CPU clusters --threads."),
    ray_timeout: float = typer.Option(DEFAULTS.ray_timeout, "--ray-timeout", metavar="SECONDS",
                                      help="Restart a Ray actor whose chunk of images runs longer, "
                                      "and retry the chunk."),
    summary_json: Optional[str] = typer.Option(None, "--summary-json", help="Also write the run summary "
                                               "(counts, wall time, per-stage seconds) to this JSON file."),
    null: bool = typer.Option(False, "--null", "-0", help="With -, paths on stdin are NUL-separated."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what this run would do (inputs found, what "
                                 "is done, what would be redone or refused and why) without loading the model "
                                 "or writing anything; exit 2 where the run would be refused."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors."),
    verbose: int = verbose_option(),
) -> None:
    """Segment images (and the frames of videos) and write instance maps, overlays, COCO results,
    JSON Lines or polygons (YOLO, LabelMe, CVAT, GeoJSON)."""
    setup_logging(quiet, verbose)
    inputs, shard_spec = _inputs_and_shard(inputs, null, shard)
    if ray is not None and devices:
        raise error("--ray and --devices do not combine: Ray places one actor per GPU itself", ExitCode.USAGE)
    config = RunConfig(
        inputs=inputs, out=out, formats=tuple(dict.fromkeys(formats)), model=model, revision=revision,
        allow_pickle=allow_pickle, device=device, dtype=dtype, batch_size=batch_size, workers=workers,
        threads=threads, threshold=threshold, top_k=top_k, classes=tuple([classes] if classes else ()),
        resize=resize, task=task, fast_decode=fast_decode, tile=tile, tile_full=tile_full, max_pixels=max_pixels,
        every=every, fps=fps, start=start, end=end, overlay_video=overlay_video, track=track,
        overwrite=overwrite, max_failures=max_failures, coco_annotations=coco_annotations,
        overlay_format=overlay_format, overlay_alpha=overlay_alpha, overlay_scores=overlay_scores, rle=rle,
        simplify=simplify, cutout_pad=cutout_pad, cutout_visible=cutout_visible, compile=compile,
        startup_cache=startup_cache, shard=shard_spec, ray=ray,
        ray_actors=ray_actors, ray_timeout=ray_timeout, ray_cpus_per_actor=ray_cpus_per_actor,
        detached_build=sys.stderr.isatty())  # a person is there: model/startup/builds.py
    if dry_run:
        _dry_run(config)
    summary = _run(config, devices, quiet)
    if summary.stdout_closed:
        silence_stdout()  # like a Unix filter whose reader left: no traceback, no flush errors
    if summary_json:
        with open(summary_json, "w", encoding="utf-8") as f:
            json.dump(summary.as_dict(), f, indent=1)
    raise typer.Exit(summary.exit_code)


def _inputs_and_shard(inputs: list[str], null: bool, shard: Optional[str]) -> tuple[list[str], Optional[tuple]]:
    """The inputs with each - replaced by the paths read from stdin, and --shard parsed."""
    if "-" in inputs:
        from m2f_cli.inputs.walk import read_path_list
        try:
            listed = read_path_list(sys.stdin, null=null)
        except ValueError as e:
            raise error(str(e), ExitCode.USAGE)
        inputs = [p for i in inputs for p in (listed if i == "-" else [i])]
        if not inputs:
            raise error("no paths on stdin", ExitCode.USAGE)
    if not shard:
        return inputs, None
    from m2f_cli.inputs.walk import parse_shard
    try:
        return inputs, parse_shard(shard)
    except ValueError as e:
        raise error(str(e), ExitCode.USAGE)


def _run(config: RunConfig, devices: Optional[str], quiet: bool):
    """The run here (pipeline.run), or one worker per device (engines/devices.py); its summary."""
    import os
    # torch reads this when it loads: ops MPS lacks then run on the CPU (Segmenter says which, once)
    # instead of raising NotImplementedError; an explicit PYTORCH_ENABLE_MPS_FALLBACK=0 is kept
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    if config.model and os.path.isdir(config.model):
        # a model's first run: its weights hashed (fingerprint.py) while torch is imported
        from m2f_cli.model.startup.fingerprint import prefetch_digests
        prefetch_digests(config.model)
    from m2f_cli.errors import UsageError, WorkerError
    from m2f_cli.model.runtime import tune_process
    from m2f_cli.pipeline import run
    from m2f_cli.progress import make_reporter
    tune_process()
    with errors_as_exit_codes():
        if not devices:
            return run(config, make_reporter(quiet=quiet))
        from m2f_cli.engines.devices import parse_devices, run_devices
        try:
            return run_devices(config, parse_devices(devices), make_reporter(quiet=quiet))
        except (UsageError, WorkerError):
            raise
        except ValueError as e:  # a device list that does not parse or name real devices
            raise UsageError(str(e)) from None


def _dry_run(config: RunConfig) -> None:
    from m2f_cli.tools.dryrun import plan
    with errors_as_exit_codes():
        result = plan(config)
    for line in result.lines():
        typer.echo(line)
    raise typer.Exit(result.exit_code)
