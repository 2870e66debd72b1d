"""The ``m2f`` command: parse, call the library, render, pick the exit code.

No torch/transformers import at module level: ``m2f --help`` must stay fast.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import List, Optional

import typer

from .config import DEFAULT_MODEL, ExitCode, RunConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # plain click help: no rich import, so --help stays fast
                  help="Mask2Former instance segmentation over folders of images.")

_D = RunConfig(inputs=[], out="")  # the defaults, from their one place

# Kept in sync with writers.REGISTRY by a test (the registry imports torch-free modules only,
# but importing it here would pull numpy/Pillow/pycocotools into --help).
FORMATS = {
    "png": "<out>/<name>.png 16-bit instance map + <name>.json sidecar",
    "coco": "<out>/predictions.json COCO results (+ predictions_bbox.json, images.json)",
    "overlay": "<out>/<name>.overlay.jpg: masks, contours and labels drawn on the image",
    "jsonl": "<out>/predictions.jsonl, or stdout with --out -: one JSON object per image",
}


def _silence_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for a closed pipe is dropped quietly."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (a test runner's buffer)
        pass


def _error(msg: str, code: int) -> "typer.Exit":
    typer.echo(f"m2f: error: {msg}", err=True)
    return typer.Exit(code)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING,
                        format="m2f: %(levelname)s: %(message)s", stream=sys.stderr)


@app.command()
def segment(
    inputs: List[str] = typer.Argument(..., help="Image files, folders (walked recursively), glob "
                                       "patterns, fsspec URLs (s3://bucket/imgs, gs://..., memory://...), "
                                       "or - to read paths from stdin."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (created) or fsspec URL (s3://bucket/masks), "
                                                        "or - for JSON Lines on stdout."),
    formats: List[str] = typer.Option(list(_D.formats), "--format", "-f",
                                      help="Output format, repeatable: " + "; ".join(
                                          f"{k}: {v}" for k, v in FORMATS.items())),
    model: str = typer.Option(_D.model, "--model", "-m", help="Hub id or local save_pretrained folder."),
    revision: Optional[str] = typer.Option(_D.revision, help="Hub revision (branch, tag or commit) to pin."),
    allow_pickle: bool = typer.Option(_D.allow_pickle, "--allow-pickle",
                                      help="Allow loading pytorch_model.bin (pickle) when there are no safetensors."),
    device: str = typer.Option(_D.device, "--device", "-d", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option(_D.dtype, help="auto (float32 on CPU, bfloat16/float16 on CUDA), float32, "
                              "bfloat16 or float16."),
    batch_size: Optional[int] = typer.Option(_D.batch_size, "--batch-size", "-b",
                                             help="Images per forward pass (auto: 2 on CPU, 16 on CUDA)."),
    workers: Optional[int] = typer.Option(_D.workers, help="Decode/preprocess worker processes "
                                          "(auto: 1 on small CPUs, up to 8 on CUDA); 0 decodes in-process."),
    threads: Optional[int] = typer.Option(_D.threads, help="Torch intra-op threads (auto: torch's choice, one per core)."),
    threshold: Optional[float] = typer.Option(_D.threshold, "--threshold", "-t",
                                              help="Minimum instance score for every format "
                                              "(auto: 0.5; coco 0.0, the COCO protocol)."),
    top_k: int = typer.Option(_D.top_k, "--top-k", help="Candidates (query, class) per image, as in the paper."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Keep only these classes: names or "
                                          "COCO ids, comma-separated (see m2f labels)."),
    resize: str = typer.Option(_D.resize, help="checkpoint (the model's preprocessor: 384x384), paper "
                               "(shortest edge 800, longest <= 1333, aspect kept) or SHORT[,LONG]."),
    task: str = typer.Option(_D.task, help="auto (from the checkpoint's name or label count), instance, "
                             "panoptic or semantic."),
    fast_decode: bool = typer.Option(_D.fast_decode, "--fast-decode",
                                     help="Decode JPEGs at reduced size (draft mode): faster on big photos, "
                                     "pixels differ slightly from the checkpoint's preprocessing."),
    tile: Optional[str] = typer.Option(_D.tile, "--tile", metavar="SIZE[,OVERLAP]",
                                       help="Cut images larger than SIZE px into overlapping tiles (OVERLAP a "
                                       "fraction, default 0.2), run each like an image and merge the instances "
                                       "at full resolution: small objects in large photos. auto: twice the "
                                       "model's input side (768 px for 384x384 checkpoints)."),
    tile_full: bool = typer.Option(_D.tile_full, "--tile-full", help="With --tile, also run the whole image "
                                   "and merge its instances in (objects larger than a tile)."),
    max_pixels: int = typer.Option(_D.max_pixels, help="Refuse images with more pixels (decompression bombs); "
                                   "raise it deliberately for large images with --tile."),
    overwrite: bool = typer.Option(_D.overwrite, "--overwrite", help="Redo images whose outputs exist."),
    max_failures: Optional[int] = typer.Option(_D.max_failures, help="Stop after this many failed inputs."),
    coco_annotations: Optional[str] = typer.Option(_D.coco_annotations, help="COCO annotation file: take "
                                                   "image ids and categories from it (matched by file name)."),
    overlay_format: str = typer.Option(_D.overlay_format, help="Overlay image format: jpg or png."),
    overlay_alpha: float = typer.Option(_D.overlay_alpha, help="Mask opacity in overlays, 0..1."),
    rle: bool = typer.Option(_D.rle, "--rle", help="Include RLE masks in JSON Lines records."),
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
    ray_timeout: float = typer.Option(_D.ray_timeout, "--ray-timeout", metavar="SECONDS",
                                      help="Restart a Ray actor whose chunk of images runs longer, "
                                      "and retry the chunk."),
    summary_json: Optional[str] = typer.Option(None, "--summary-json", help="Also write the run summary "
                                               "(counts, wall time, per-stage seconds) to this JSON file."),
    null: bool = typer.Option(False, "--null", "-0", help="With -, paths on stdin are NUL-separated."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors."),
) -> None:
    """Segment images and write instance maps, overlays, COCO results or JSON Lines."""
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
        if f not in FORMATS:
            raise _error(f"--format {f!r}: expected one of {', '.join(FORMATS)}", ExitCode.USAGE)
    config = RunConfig(
        inputs=inputs, out=out, formats=tuple(dict.fromkeys(formats)), model=model, revision=revision,
        allow_pickle=allow_pickle, device=device, dtype=dtype, batch_size=batch_size, workers=workers,
        threads=threads, threshold=threshold, top_k=top_k, classes=tuple([classes] if classes else ()),
        resize=resize, task=task, fast_decode=fast_decode, tile=tile, tile_full=tile_full, max_pixels=max_pixels,
        overwrite=overwrite, max_failures=max_failures, coco_annotations=coco_annotations, overlay_format=overlay_format,
        overlay_alpha=overlay_alpha, rle=rle, compile=compile, trace_cache=trace_cache, shard=shard_spec, ray=ray,
        ray_actors=ray_actors, ray_timeout=ray_timeout)
    if ray is not None and devices:
        raise _error("--ray and --devices do not combine: Ray places one actor per GPU itself", ExitCode.USAGE)

    import os
    from .model import ModelLoadError
    from .pipeline import EngineError, NoImagesError, UsageError, WriterError, run
    from .runtime import tune_malloc
    if os.environ.get("M2F_MALLOC_TUNING", "1") != "0":
        tune_malloc()
    from .progress import make_reporter
    from .state import OutputError, OutputLockedError

    try:
        if devices:
            from .devices import WorkerError, parse_devices, run_devices
            try:
                device_list = parse_devices(devices)
            except ValueError as e:
                raise UsageError(str(e)) from None
            try:
                summary = run_devices(config, device_list, make_reporter(quiet=quiet))
            except WorkerError as e:
                raise _error(str(e), ExitCode.FATAL)
            except ValueError as e:
                raise UsageError(str(e)) from None
        else:
            summary = run(config, make_reporter(quiet=quiet))
    except UsageError as e:
        raise _error(str(e), ExitCode.USAGE)
    except NoImagesError as e:
        raise _error(str(e), ExitCode.NO_IMAGES)
    except OutputLockedError as e:
        raise _error(str(e), ExitCode.LOCKED)
    except (ModelLoadError, OutputError, EngineError, WriterError) as e:
        raise _error(str(e.args[-1] if isinstance(e, OutputError) else e), ExitCode.FATAL)
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
    """Combine the part files of --shard runs into predictions.json, images.json, predictions.jsonl
    and failures.jsonl; exit 3 when a shard is missing or incomplete."""
    from .merge import MergeError, merge as merge_parts
    from .state import OutputError, OutputLockedError
    try:
        report = merge_parts(out)
    except MergeError as e:
        raise _error(str(e), ExitCode.USAGE)
    except OutputLockedError as e:
        raise _error(str(e), ExitCode.LOCKED)
    except OutputError as e:
        raise _error(str(e.args[-1]), ExitCode.FATAL)
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
    from .report import ReportError, build_report
    from .state import OutputError
    try:
        with _report_progress(quiet) as progress:
            summary = build_report(out, gallery=gallery, per_stratum=per_class, thumb_px=thumb_size,
                                   progress=progress)
    except ReportError as e:
        raise _error(str(e), ExitCode.USAGE)
    except OutputError as e:
        raise _error(str(e.args[-1]), ExitCode.FATAL)
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


@app.command("eval")
def eval_cmd(
    gt: str = typer.Option(..., "--gt", help="COCO annotation file (ground truth)."),
    pred: str = typer.Option(..., "--pred", help="COCO results file (m2f's predictions.json)."),
    iou_type: str = typer.Option("segm", "--iou-type", help="segm (masks) or bbox (use predictions_bbox.json)."),
    images: Optional[str] = typer.Option(None, "--images", help="The run's images.json (default: the one "
                                         "beside --pred): predictions are matched to --gt by file name."),
    all_gt_images: bool = typer.Option(False, "--all-gt-images", help="Count ground-truth images the run did "
                                       "not see as misses (default: evaluate the run's images only)."),
    as_json: bool = typer.Option(False, "--json", help="Print the 12 numbers as JSON."),
) -> None:
    """Evaluate predictions with pycocotools' COCOeval and print the standard table; exit 2 when
    predictions and ground truth do not fit together (no image or category in common, other sizes)."""
    from .evaluate import EvalError, evaluate_run, format_table
    try:
        result = evaluate_run(gt, pred, iou_type, images_path=images, all_gt_images=all_gt_images)
    except EvalError as e:
        raise _error(str(e), ExitCode.USAGE)
    for note in result.notes:
        typer.echo(f"m2f: {note}", err=True)
    typer.echo(json.dumps(result.stats) if as_json else format_table(result.stats))


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
