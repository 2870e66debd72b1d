"""The commands around runs: ``m2f labels``, ``info``, ``merge``, ``report`` and ``eval``."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from m2f_cli.config import DEFAULT_MODEL
from m2f_cli.errors import ExitCode

from m2f_cli.cli.common import error, errors_as_exit_codes, setup_logging, verbose_option, app

@app.command()
def labels(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Hub id or local folder."),
    revision: Optional[str] = typer.Option(None, help="Hub revision."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
) -> None:
    """List the model's classes: index, category id (COCO's for COCO models) and name."""
    setup_logging(False)
    from m2f_cli.model.categories import CategoryTable
    from m2f_cli.model.loading import read_categories, resolve_model
    from m2f_cli.errors import ModelLoadError
    try:
        table = read_categories(resolve_model(model, revision))
    except ModelLoadError as e:
        if model != DEFAULT_MODEL:
            raise error(str(e), ExitCode.FATAL)
        typer.echo(f"m2f: note: {e}; showing the built-in COCO table of the default model", err=True)
        table = CategoryTable.coco()
    if as_json:
        typer.echo(json.dumps([{"index": c.index, "id": c.id, "name": c.name} for c in table.categories]))
        return
    for c in table.categories:
        typer.echo(f"{c.index:>3}  {c.id:>3}  {c.name}")


@app.command()
def info(
    out: Optional[str] = typer.Argument(None, help="An output folder (or URL): show its settings record and "
                                        "last run instead."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Hub id or local folder to resolve."),
    revision: Optional[str] = typer.Option(None, help="Hub revision."),
    as_json: bool = typer.Option(False, "--json", help="With OUT: print it as JSON."),
) -> None:
    """Versions, available devices and the resolved model; with OUT, an output folder's settings
    record (per format) and last run."""
    if out is not None:
        from m2f_cli.outputs.manifest import info_lines, read_info
        with errors_as_exit_codes():
            got = read_info(out)
        typer.echo(json.dumps(got, indent=1) if as_json else "\n".join(info_lines(got)))
        return
    import platform
    from importlib import metadata

    import torch

    from m2f_cli.model.loading import resolve_model
    from m2f_cli.errors import ModelLoadError
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
    from m2f_cli.tools.merge import merge as merge_parts
    with errors_as_exit_codes():
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
    verbose: int = verbose_option(),
) -> None:
    """Write OUT/report/index.html: the run's settings and summary, a gallery of overlays, per-class
    counts and score histograms, mask sizes and the failures; a static page, no model run."""
    setup_logging(quiet, verbose)
    if gallery < 0 or per_class < 0 or thumb_size < 16:
        raise error("--gallery and --per-class: 0 or more; --thumb-size: 16 or more", ExitCode.USAGE)
    from m2f_cli.tools.report import build_report
    with errors_as_exit_codes(), _report_progress(quiet) as progress:
        summary = build_report(out, gallery=gallery, per_stratum=per_class, thumb_px=thumb_size,
                               progress=progress)
    if not quiet:
        typer.echo(f"m2f: report: {summary.line()}", err=True)
    if open_page:
        import os
        import webbrowser
        from m2f_cli.urls import is_url
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
    from m2f_cli.tools.eval_kinds import evaluate_segmentation, ground_truth_kind
    from m2f_cli.tools.evaluate import evaluate_run, format_table
    with errors_as_exit_codes():
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
