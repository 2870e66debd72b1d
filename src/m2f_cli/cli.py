"""The ``m2f`` command: parse, call the library, render, pick the exit code.

No torch/transformers import at module level: ``m2f --help`` must stay fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from typing import List, Optional

import typer

from .config import DEFAULT_MODEL, ExitCode, RunConfig

# Help follows the terminal's width (click caps it at 80 columns unless told otherwise).
_CONTEXT = {"max_content_width": 160, "help_option_names": ["-h", "--help"]}

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # plain click help: no rich import, so --help stays fast
                  context_settings=_CONTEXT,
                  help="Mask2Former instance segmentation over folders of images.")

_D = RunConfig(inputs=[], out="")  # the defaults, from their one place

# `m2f segment --help` in panels, in the order a user needs them (by parameter name), with
# readable placeholders. A test checks that every option of segment has a panel.
SEGMENT_PANELS: dict[str, tuple[str, ...]] = {
    "Inputs": ("inputs", "null", "max_pixels"),
    "Outputs": ("out", "formats", "overlay_format", "overlay_alpha", "overlay_scores", "rle", "simplify",
                "cutout_pad", "cutout_visible", "coco_annotations"),
    "Model": ("model", "revision", "allow_pickle", "task"),
    "Quality": ("threshold", "top_k", "classes", "resize", "tile", "tile_full"),
    "Speed": ("device", "dtype", "batch_size", "workers", "threads", "compile", "trace_cache", "fast_decode"),
    "Scale-out": ("shard", "devices", "ray", "ray_actors", "ray_timeout", "ray_cpus_per_actor"),
    "Bookkeeping": ("overwrite", "max_failures", "summary_json", "quiet", "help"),
}
METAVARS = {
    "inputs": "PATH|GLOB|URL|-", "out": "DIR|URL|-", "formats": "FORMAT", "model": "HUB_ID|DIR",
    "revision": "REV", "device": "DEVICE", "dtype": "DTYPE", "batch_size": "N", "workers": "N", "threads": "N",
    "threshold": "SCORE", "top_k": "K", "classes": "NAMES", "resize": "MODE", "task": "TASK",
    "max_pixels": "N", "max_failures": "N", "coco_annotations": "FILE", "overlay_format": "jpg|png",
    "overlay_alpha": "0..1", "simplify": "PX", "shard": "I/N", "devices": "LIST", "summary_json": "FILE",
    "tile": "SIZE[,OVERLAP]|auto", "ray_cpus_per_actor": "N",
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
        from .formats import FORMATS
        with formatter.section("Formats (--format)"):
            formatter.write_dl(list(FORMATS.items()))
        with formatter.section("Examples"):
            for line in SEGMENT_EXAMPLES:
                formatter.write_text(line)


def _version(value: bool) -> None:
    if value:
        from . import __version__
        typer.echo(f"m2f {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Mask2Former instance segmentation over folders of images: PNG instance maps, overlays,
    COCO results, JSON Lines and polygons, resumable, from the shell."""


def _silence_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for a closed pipe is dropped quietly."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (a test runner's buffer)
        pass


@contextlib.contextmanager
def _errors_as_exit_codes():
    """Any of m2f's own errors (errors.py) -> its one line on stderr and its exit code."""
    from .errors import KNOWN, exit_code_for, one_line
    try:
        yield
    except KNOWN as e:
        raise _error(one_line(e), exit_code_for(e)) from None


def _error(msg: str, code: int) -> "typer.Exit":
    typer.echo(f"m2f: error: {msg}", err=True)
    return typer.Exit(code)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING,
                        format="m2f: %(levelname)s: %(message)s", stream=sys.stderr)


@app.command(cls=_PanelledCommand)
def segment(
    inputs: List[str] = typer.Argument(..., help="Image files, folders (walked recursively), glob "
                                       "patterns, fsspec URLs (s3://bucket/imgs, gs://..., memory://...), "
                                       "or - to read paths from stdin."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (created) or fsspec URL (s3://bucket/masks), "
                                                        "or - for JSON Lines on stdout."),
    formats: List[str] = typer.Option(list(_D.formats), "--format", "-f",
                                      help="Output format, repeatable (listed below)."),
    model: str = typer.Option(_D.model, "--model", "-m", help="Hub id or local save_pretrained folder."),
    revision: Optional[str] = typer.Option(_D.revision, help="Hub revision (branch, tag or commit) to pin."),
    allow_pickle: bool = typer.Option(_D.allow_pickle, "--allow-pickle",
                                      help="Allow loading pytorch_model.bin (pickle) when there are no safetensors."),
    device: str = typer.Option(_D.device, "--device", "-d", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option(_D.dtype, help="auto (float32 on CPU, bfloat16/float16 on CUDA), float32, "
                              "bfloat16 or float16."),
    batch_size: Optional[int] = typer.Option(_D.batch_size, "--batch-size", "-b",
                                             help="Images per forward pass (auto: 2 on CPU, 4 on MPS, on CUDA "
                                             "what the card's memory holds; split and retried on out of memory)."),
    workers: Optional[int] = typer.Option(_D.workers, help="Decode/preprocess worker processes "
                                          "(auto: 1 on small CPUs; on CUDA every core but two, at most 16); 0 decodes in-process."),
    threads: Optional[int] = typer.Option(_D.threads, help="Torch intra-op threads (auto: torch's choice, one per core)."),
    threshold: Optional[float] = typer.Option(_D.threshold, "--threshold", "-t",
                                              help="Minimum instance score for every format "
                                              "(auto: 0.5; coco 0.0, the COCO protocol)."),
    top_k: int = typer.Option(_D.top_k, "--top-k", help="Candidates (query, class) per image, as in the paper."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Keep only these classes: names or "
                                          "COCO ids, comma-separated (see m2f labels)."),
    resize: str = typer.Option(_D.resize, help="checkpoint (the model's preprocessor: 384x384), paper "
                               "(shortest edge 800, longest <= 1333, aspect kept) or SHORT[,LONG]."),
    task: str = typer.Option(_D.task, help="auto (what the checkpoint's name or classes say; else it asks), "
                             "instance, panoptic or semantic."),
    fast_decode: bool = typer.Option(_D.fast_decode, "--fast-decode",
                                     help="Decode JPEGs at reduced size (draft mode): faster on big photos, "
                                     "pixels differ slightly from the checkpoint's preprocessing."),
    tile: Optional[str] = typer.Option(_D.tile, "--tile", metavar="SIZE[,OVERLAP]",
                                       help="Cut images larger than SIZE px into overlapping tiles (OVERLAP a "
                                       "fraction, default 0.2), run each like an image and merge the instances "
                                       "at full resolution: small objects in large photos. auto: twice the "
                                       "model's input side (768 px for 384x384 checkpoints), overlap 0.25."),
    tile_full: bool = typer.Option(_D.tile_full, "--tile-full", help="With --tile, also run the whole image "
                                   "and merge its instances in (objects larger than a tile)."),
    max_pixels: int = typer.Option(_D.max_pixels, help="Refuse images with more pixels (decompression bombs); "
                                   "with --tile, a TIFF above it is read window by window instead."),
    overwrite: bool = typer.Option(_D.overwrite, "--overwrite", help="Redo images whose outputs exist."),
    max_failures: Optional[int] = typer.Option(_D.max_failures, help="Stop after this many failed inputs."),
    coco_annotations: Optional[str] = typer.Option(_D.coco_annotations, help="COCO annotation file: take "
                                                   "image ids and categories from it (matched by file name)."),
    overlay_format: str = typer.Option(_D.overlay_format, help="Overlay image format: jpg or png."),
    overlay_alpha: float = typer.Option(_D.overlay_alpha, help="Mask opacity in overlays, 0..1."),
    overlay_scores: bool = typer.Option(_D.overlay_scores, "--overlay-scores/--no-overlay-scores",
                                        help="Overlay tags show \"label score\" (or the label only)."),
    rle: bool = typer.Option(_D.rle, "--rle", help="Include RLE masks in JSON Lines records."),
    simplify: float = typer.Option(_D.simplify, "--simplify", metavar="PX",
                                   help="Polygon formats (yolo, labelme, cvat, geojson): simplify outlines "
                                   "within PX pixels (Douglas-Peucker, topology kept); 0 = exact pixel edges."),
    cutout_pad: int = typer.Option(_D.cutout_pad, "--cutout-pad", metavar="PX", min=0,
                                   help="Cutouts: pixels of margin around each object's box (clipped to the image)."),
    cutout_visible: bool = typer.Option(_D.cutout_visible, "--cutout-visible", help="Cutouts: only the pixels "
                                        "the object shows in the PNG map (not its whole mask, overlaps included)."),
    compile: Optional[bool] = typer.Option(_D.compile, "--compile/--no-compile", help="torch.compile the "
                                           "model (one-time compile, then a faster forward). Default: on "
                                           "for CPU runs of 1000+ images at a fixed input size."),
    trace_cache: bool = typer.Option(_D.trace_cache, "--trace-cache/--no-trace-cache", help="On CPU at a "
                                     "fixed input size, load the model from a TorchScript trace cached in "
                                     "~/.cache/m2f (M2F_CACHE_DIR), built on first use: later runs start ~5 s "
                                     "sooner."),
    devices: Optional[str] = typer.Option(None, "--devices", help="Run one worker per device over "
                                          "disjoint shards: CUDA indices (0,1), all, or names (cuda:0,cpu)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: process a stable 1/N of the inputs "
                                        "(0 <= I < N), writing part files that m2f merge combines."),
    ray: Optional[str] = typer.Option(_D.ray, "--ray", metavar="ADDRESS",
                                      help="Run the models as Ray actors, one per GPU (pip install "
                                      "'m2f[ray]'): auto (the running cluster, RAY_ADDRESS), local (start "
                                      "one here) or a cluster address. This process writes the outputs."),
    ray_actors: Optional[int] = typer.Option(_D.ray_actors, "--ray-actors", metavar="N",
                                             help="Ray actors (auto: one per GPU; on CPUs, as many of "
                                             "--threads CPUs as fit leaving one CPU free)."),
    ray_cpus_per_actor: Optional[int] = typer.Option(_D.ray_cpus_per_actor, "--ray-cpus-per-actor", metavar="N",
                                                     help="CPUs each Ray actor reserves and uses (decoding, "
                                                     "post-processing, torch threads). Auto: a GPU node's "
                                                     "CPUs less one, split among its GPUs, at most 8; on "
                                                     "CPU clusters --threads."),
    ray_timeout: float = typer.Option(_D.ray_timeout, "--ray-timeout", metavar="SECONDS",
                                      help="Restart a Ray actor whose chunk of images runs longer, "
                                      "and retry the chunk."),
    summary_json: Optional[str] = typer.Option(None, "--summary-json", help="Also write the run summary "
                                               "(counts, wall time, per-stage seconds) to this JSON file."),
    null: bool = typer.Option(False, "--null", "-0", help="With -, paths on stdin are NUL-separated."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors."),
) -> None:
    """Segment images and write instance maps, overlays, COCO results, JSON Lines or polygons
    (YOLO, LabelMe, CVAT, GeoJSON)."""
    _setup_logging(quiet)
    if "-" in inputs:
        from .walk import read_path_list
        try:
            listed = read_path_list(sys.stdin, null=null)
        except ValueError as e:
            raise _error(str(e), ExitCode.USAGE)
        inputs = [p for i in inputs for p in (listed if i == "-" else [i])]
        if not inputs:
            raise _error("no paths on stdin", ExitCode.USAGE)
    shard_spec = None
    if shard:
        from .walk import parse_shard
        try:
            shard_spec = parse_shard(shard)
        except ValueError as e:
            raise _error(str(e), ExitCode.USAGE)
    for f in formats:
        from .formats import FORMATS
        if f not in FORMATS:
            raise _error(f"--format {f!r}: expected one of {', '.join(FORMATS)}", ExitCode.USAGE)
    config = RunConfig(
        inputs=inputs, out=out, formats=tuple(dict.fromkeys(formats)), model=model, revision=revision,
        allow_pickle=allow_pickle, device=device, dtype=dtype, batch_size=batch_size, workers=workers,
        threads=threads, threshold=threshold, top_k=top_k, classes=tuple([classes] if classes else ()),
        resize=resize, task=task, fast_decode=fast_decode, tile=tile, tile_full=tile_full, max_pixels=max_pixels,
        overwrite=overwrite, max_failures=max_failures, coco_annotations=coco_annotations,
        overlay_format=overlay_format, overlay_alpha=overlay_alpha, overlay_scores=overlay_scores, rle=rle,
        simplify=simplify, cutout_pad=cutout_pad, cutout_visible=cutout_visible, compile=compile,
        trace_cache=trace_cache, shard=shard_spec, ray=ray,
        ray_actors=ray_actors, ray_timeout=ray_timeout, ray_cpus_per_actor=ray_cpus_per_actor,
        detached_build=sys.stderr.isatty())  # a person is there: builds.py
    if ray is not None and devices:
        raise _error("--ray and --devices do not combine: Ray places one actor per GPU itself", ExitCode.USAGE)

    import os
    # torch reads this when it loads: ops MPS lacks then run on the CPU (Segmenter says which, once)
    # instead of raising NotImplementedError; an explicit PYTORCH_ENABLE_MPS_FALLBACK=0 is kept
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    from .errors import UsageError
    from .pipeline import run
    from .runtime import tune_malloc
    if os.environ.get("M2F_MALLOC_TUNING", "1") != "0":
        tune_malloc()
    from .progress import make_reporter

    with _errors_as_exit_codes():
        if devices:
            from .engines.devices import WorkerError, parse_devices, run_devices
            try:
                device_list = parse_devices(devices)
            except ValueError as e:
                raise UsageError(str(e)) from None
            try:
                summary = run_devices(config, device_list, make_reporter(quiet=quiet))
            except (UsageError, WorkerError):
                raise
            except ValueError as e:
                raise UsageError(str(e)) from None
        else:
            summary = run(config, make_reporter(quiet=quiet))
    if summary.stdout_closed:
        _silence_stdout()  # like a Unix filter whose reader left: no traceback, no flush errors
    if summary_json:
        with open(summary_json, "w", encoding="utf-8") as f:
            json.dump(summary.as_dict(), f, indent=1)
    raise typer.Exit(summary.exit_code)


@app.command()
def labels(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Hub id or local folder."),
    revision: Optional[str] = typer.Option(None, help="Hub revision."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
) -> None:
    """List the model's classes: index, category id (COCO's for COCO models) and name."""
    _setup_logging(False)
    from .categories import CategoryTable
    from .model import ModelLoadError, read_categories, resolve_model
    try:
        table = read_categories(resolve_model(model, revision))
    except ModelLoadError as e:
        if model != DEFAULT_MODEL:
            raise _error(str(e), ExitCode.FATAL)
        typer.echo(f"m2f: note: {e}; showing the built-in COCO table of the default model", err=True)
        table = CategoryTable.coco()
    if as_json:
        typer.echo(json.dumps([{"index": c.index, "id": c.id, "name": c.name} for c in table.categories]))
        return
    for c in table.categories:
        typer.echo(f"{c.index:>3}  {c.id:>3}  {c.name}")


@app.command()
def info(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Hub id or local folder to resolve."),
    revision: Optional[str] = typer.Option(None, help="Hub revision."),
) -> None:
    """Versions, available devices and the resolved model."""
    import platform
    from importlib import metadata

    import torch

    from .model import ModelLoadError, resolve_model
    for pkg in ("m2f", "torch", "transformers", "pillow", "numpy", "pycocotools", "typer", "rich"):
        try:
            v = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v = "not installed"
        typer.echo(f"{pkg}: {v}")
    typer.echo(f"python: {platform.python_version()} ({sys.executable})")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    typer.echo(f"devices: {', '.join(devices)}")
    typer.echo(f"threads: {torch.get_num_threads()}")
    try:
        src = resolve_model(model, revision)
        typer.echo(f"model: {src.spec}")
        typer.echo(f"revision: {src.revision or 'default'}" + (f" (commit {src.commit})" if src.commit else ""))
        typer.echo(f"model path: {src.local_dir}")
    except ModelLoadError as e:
        typer.echo(f"model: {model} (not available: {e})")


@app.command()
def merge(out: str = typer.Argument(..., help="The --out folder (or URL) the shards wrote into.")) -> None:
    """Combine the part files of --shard runs into predictions.json, images.json, predictions.jsonl,
    annotations.xml (CVAT) and failures.jsonl; exit 3 when a shard is missing or incomplete."""
    from .merge import merge as merge_parts
    with _errors_as_exit_codes():
        report = merge_parts(out)
    for i in report.missing:
        typer.echo(f"m2f: error: shard {i}/{report.count} is missing (no m2f-run.shard-{i}-of-{report.count}.json)",
                   err=True)
    for i in report.incomplete:
        typer.echo(f"m2f: error: shard {i}/{report.count} is incomplete (interrupted or stopped); rerun it",
                   err=True)
    merged = report.count - len(report.missing)
    typer.echo(f"m2f: merged {merged} of {report.count} shards"
               + (f" ({len(report.missing)} missing, {len(report.incomplete)} incomplete)" if not report.ok else "")
               + f": {report.images} images, {report.records} records -> {', '.join(report.written)}", err=True)
    raise typer.Exit(ExitCode.OK if report.ok else ExitCode.INPUTS_FAILED)


@app.command()
def report(
    out: str = typer.Argument(..., help="The --out folder (or URL) of a finished or interrupted run."),
    open_page: bool = typer.Option(False, "--open", help="Open the page in the default web browser."),
    gallery: int = typer.Option(240, "--gallery", metavar="N", help="Images sampled over the whole run "
                                "into the gallery."),
    per_class: int = typer.Option(12, "--per-class", metavar="N", help="Also up to N images per class and "
                                  "per score band of 0.1, 2N with no instance and 2N failed inputs."),
    thumb_size: int = typer.Option(320, "--thumb-size", metavar="PX", help="Longest side of a thumbnail."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors."),
) -> None:
    """Write OUT/report/index.html: the run's settings and summary, a gallery of overlays, per-class
    counts and score histograms, mask sizes and the failures; a static page, no model run."""
    _setup_logging(quiet)
    if gallery < 0 or per_class < 0 or thumb_size < 16:
        raise _error("--gallery and --per-class: 0 or more; --thumb-size: 16 or more", ExitCode.USAGE)
    from .report import build_report
    with _errors_as_exit_codes(), _report_progress(quiet) as progress:
        summary = build_report(out, gallery=gallery, per_stratum=per_class, thumb_px=thumb_size,
                               progress=progress)
    if not quiet:
        typer.echo(f"m2f: report: {summary.line()}", err=True)
    if open_page:
        import os
        import webbrowser
        from .storage import is_url
        if is_url(summary.index):
            typer.echo(f"m2f: note: {summary.index} is remote; copy report/ (and the overlays) to open it", err=True)
        elif not webbrowser.open("file://" + os.path.abspath(summary.index)):
            typer.echo("m2f: note: no web browser found to open the page", err=True)


def _report_progress(quiet: bool):
    """A context manager yielding build_report's progress callback: a rich bar on terminals,
    a line every 5 s otherwise, nothing with --quiet."""
    import contextlib
    import time

    @contextlib.contextmanager
    def plain():
        last = [time.monotonic()]  # the first line after 5 s: a quick report prints only its result

        def progress(phase: str, done: int, total: Optional[int]) -> None:
            now = time.monotonic()
            if now - last[0] >= 5.0:
                last[0] = now
                what = "images read" if phase == "read" else "thumbnails"
                typer.echo(f"m2f: report: {done}{f'/{total}' if total else ''} {what}", err=True)
        yield progress

    @contextlib.contextmanager
    def bar():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        with Progress(TextColumn("[bold]report {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=Console(stderr=True), transient=True) as p:
            tasks: dict = {}

            def progress(phase: str, done: int, total: Optional[int]) -> None:
                if phase not in tasks:
                    tasks[phase] = p.add_task("reading outputs" if phase == "read" else "drawing thumbnails",
                                              total=total)
                p.update(tasks[phase], completed=done, total=total)
            yield progress

    if quiet:
        return contextlib.nullcontext(None)
    return bar() if sys.stderr.isatty() else plain()


cache_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="The start-up cache (traced and compiled models in M2F_CACHE_DIR or ~/.cache/m2f): list, "
                             "clear or build it.")
app.add_typer(cache_app, name="cache")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@cache_app.command("list")
def cache_list(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """Each cached trace (least recently used first): size, last use, whether a live process uses it."""
    import time

    from .cache import entries, max_bytes, traces_dir
    items = entries()
    if as_json:
        typer.echo(json.dumps([{"path": str(e.path), "bytes": e.size, "last_used": e.last_used,
                                "in_use": e.in_use} for e in items]))
        return
    for e in items:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        typer.echo(f"{_mb(e.size):>10}  {when}  {'in use' if e.in_use else '      '}  {e.path.name}")
    cap = max_bytes()
    typer.echo(f"{len(items)} traces, {_mb(sum(e.size for e in items))} in {traces_dir()} "
               f"(cap {_mb(cap) if cap > 0 else 'none'}: M2F_CACHE_MAX_BYTES)")


@cache_app.command("clear")
def cache_clear(everything: bool = typer.Option(False, "--all", help="Also forget the weight digests "
                                                "(digests.json: weights are hashed again on next use)."),
                ) -> None:
    """Delete every cached trace no live process is using (those in use are kept and named)."""
    from .cache import clear
    removed, kept = clear(everything)
    for e in kept:
        typer.echo(f"m2f: kept {e.path.name}: in use by a running m2f process", err=True)
    typer.echo(f"m2f: removed {len(removed)} traces ({_mb(sum(e.size for e in removed))})"
               f"{' and the weight digests' if everything else ''}", err=True)


@cache_app.command("build")
def cache_build(model: str = typer.Option(_D.model, "--model", help="Hub id or save_pretrained folder."),
                revision: Optional[str] = typer.Option(None, "--revision", metavar="REV", help="Hub revision."),
                dtype: str = typer.Option("float32", "--dtype", help="float32, or bfloat16 on CPUs with "
                                          "fast bf16 kernels (AVX512-BF16/AMX)."),
                threads: Optional[int] = typer.Option(None, "--threads", metavar="N", help="torch threads."),
                trace: bool = typer.Option(False, "--trace", help="Build the TorchScript trace (seconds; "
                                           "what runs use where no C++ compiler is found) instead of compiling."),
                size: Optional[str] = typer.Option(None, "--size", metavar="HxW", help="With --trace: the "
                                                   "model input size (default: the checkpoint's)."),
                background: bool = typer.Option(False, "--background", hidden=True),
                entry: Optional[str] = typer.Option(None, "--entry", hidden=True),
                lock_fd: Optional[int] = typer.Option(None, "--lock-fd", hidden=True),
                wait_fd: Optional[int] = typer.Option(None, "--wait-fd", hidden=True),
                ) -> None:
    """Compile the model for this CPU (AOTInductor, ~2 min on 2 cores) into the start-up cache, so
    that every later `m2f segment` of this model at its checkpoint input size loads it compiled;
    with --trace, build the start-up trace instead (seconds). Run it once where the runs will run:
    in a container image's build, on each kind of cluster node (docs/startup-cache.md)."""
    from pathlib import Path
    if background:  # the detached builder a run at a terminal left (builds.spawn): nothing heavy yet
        from .builds import run_detached
        child = [a for a in sys.argv[1:] if a != "--background"]
        at = child.index("--wait-fd")
        del child[at:at + 2]
        raise typer.Exit(run_detached(Path(entry), [sys.executable, "-m", "m2f_cli", *child], lock_fd, wait_fd))
    if lock_fd is not None and entry:
        from .cache import adopt_lock
        adopt_lock(Path(entry), lock_fd)  # held by the builder that started us

    import torch

    from .model import load_predictor, resolve_dtype, resolve_model
    from .preprocess import load_checkpoint_spec, spec_for_resize
    if threads:
        torch.set_num_threads(threads)
    if trace:
        _build_trace(model, revision, size)
        return
    try:
        source = resolve_model(model, revision)
        dt = resolve_dtype(dtype, torch.device("cpu"))
    except (ValueError, RuntimeError) as e:
        raise _error(str(e), ExitCode.USAGE)
    spec = spec_for_resize("checkpoint", load_checkpoint_spec(source.local_dir))
    if spec.mode != "fixed":
        raise _error(f"{model}: its preprocessing has no single input size; nothing to compile", ExitCode.USAGE)
    predictor = load_predictor(source, torch.device("cpu"), dt, compile=True, trace_size=spec.padded_size(1, 1),
                               notify=lambda m: typer.echo(f"m2f: {m}", err=True))
    path = getattr(predictor, "path", None)
    if not str(path or "").endswith(".pt2"):
        raise _error("the compiled model could not be built (see the warning above); runs use the trace",
                     ExitCode.FATAL)
    typer.echo(f"m2f: compiled model ready: {path}", err=True)


def _build_trace(model: str, revision: Optional[str], size: Optional[str]) -> None:
    import torch

    from .model import load_predictor, resolve_model
    from .preprocess import load_checkpoint_spec, spec_for_resize
    with _errors_as_exit_codes():
        source = resolve_model(model, revision)
    if size:
        try:
            h, w = (int(x) for x in size.lower().split("x"))
        except ValueError:
            raise _error(f"--size {size!r}: expected HxW, e.g. 384x384", ExitCode.USAGE)
    else:
        spec = spec_for_resize("checkpoint", load_checkpoint_spec(source.local_dir))
        if spec.mode != "fixed":
            raise _error(f"{model}: its preprocessing has no single input size; nothing to trace", ExitCode.USAGE)
        h, w = spec.padded_size(1, 1)
    predictor = load_predictor(source, torch.device("cpu"), torch.float32, trace_size=(h, w),
                               notify=lambda m: typer.echo(f"m2f: {m}", err=True))
    typer.echo(f"m2f: start-up cache ready: {getattr(predictor, 'path', None) or 'not built (see above)'}", err=True)


@app.command("eval")
def eval_cmd(
    gt: str = typer.Option(..., "--gt", help="Ground truth: a COCO annotation file (instances), a COCO "
                           "panoptic JSON (its PNGs in the folder beside it), or a folder of label PNGs."),
    pred: str = typer.Option(..., "--pred", help="predictions.json (instances), panoptic.json (panoptic) "
                             "or the run folder with its *.labels.png (semantic)."),
    iou_type: str = typer.Option("segm", "--iou-type", help="segm (masks) or bbox (use predictions_bbox.json)."),
    images: Optional[str] = typer.Option(None, "--images", help="The run's images.json (default: the one "
                                         "beside --pred): predictions are matched to --gt by file name."),
    all_gt_images: bool = typer.Option(False, "--all-gt-images", help="Count ground-truth images the run did "
                                       "not see as misses (default: evaluate the run's images only)."),
    gt_folder: Optional[str] = typer.Option(None, "--gt-folder", help="Panoptic: the ground truth's PNG "
                                            "folder (default: --gt without .json)."),
    pred_folder: Optional[str] = typer.Option(None, "--pred-folder", help="Panoptic: the predictions' PNG "
                                              "folder (default: --pred without .json)."),
    reduce_zero_label: bool = typer.Option(False, "--reduce-zero-label", help="Semantic: ground-truth 0 is "
                                           "ignored and v is class v-1 (raw ADE20K annotations)."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Evaluate predictions against a ground truth: instance AP (pycocotools' COCOeval), panoptic
    PQ/SQ/RQ or semantic mIoU, told from --gt (docs/panoptic-semantic.md); exit 2 when predictions
    and ground truth do not fit together (no image or category in common, other sizes)."""
    from .eval_kinds import evaluate_segmentation, ground_truth_kind
    from .evaluate import evaluate_run, format_table
    with _errors_as_exit_codes():
        kind = ground_truth_kind(gt)
        if kind == "instance":
            result = evaluate_run(gt, pred, iou_type, images_path=images, all_gt_images=all_gt_images)
        else:
            result = evaluate_segmentation(kind, gt, pred, all_gt_images, gt_folder, pred_folder,
                                           reduce_zero_label)
    for note in result.notes:
        typer.echo(f"m2f: {note}", err=True)
    if kind == "instance":
        typer.echo(json.dumps(result.stats) if as_json else format_table(result.stats))
    else:
        typer.echo(json.dumps(result.to_json()) if as_json else result.table())


def main() -> None:
    """The console entry point (``m2f``, ``python -m m2f_cli``).

    When a command has finished (every output written, renamed and closed, journals closed, locks
    released, workers joined), the process leaves without Python's interpreter teardown, which
    spends ~2 s freeing torch and the model for nothing (measured by benchmarks/run.py). Streams
    and log handlers are flushed first. Library callers (``run``, CliRunner) are unaffected.
    """
    try:
        app()
    except SystemExit as e:
        code = e.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        _exit_now(code)


def _exit_now(code: int) -> None:
    import os
    import threading
    logging.shutdown()

    def flush():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (m2f ... | head) or a closed stream
                pass
    # A reader that stopped reading (a full pipe) must not keep m2f alive after a signal: flush
    # in a thread and leave without it after a moment.
    t = threading.Thread(target=flush, daemon=True)
    t.start()
    t.join(timeout=2.0)
    os._exit(code)


if __name__ == "__main__":
    main()
