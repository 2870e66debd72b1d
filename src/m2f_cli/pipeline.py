"""``run(config, reporter) -> Summary``: the whole ``m2f segment`` recipe, top to bottom.

validate the options -> walk the inputs -> check the folder's settings record -> skip what is done
-> an engine decodes, batches, runs the model and post-processes -> results in input order ->
writers (a bounded background thread) -> summary, manifest and failures.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import IO, Callable, Iterator, Optional

import torch

from .categories import CategoryTable
from .config import RunConfig
from .engines import Engine
from .engines.local import LocalEngine
from .errors import EngineError, NoImagesError, OutputError, RemoteError, StdoutClosed, UsageError, WriterError
from .manifest import write_failures, write_manifest
from .model import ModelSource, read_categories, resolve_model
from .options import (auto_settings, device_and_dtype, map_threshold, resolve_compile, segmenter_options, tile_of,
                      build_mode, validate, writer_thresholds)
from .preprocess import load_checkpoint_spec, spec_for_resize
from .progress import QuietReporter, Reporter, RunSummary
from .records import Failure, ImageRef
from .segmenter import Segmenter, resolve_classes, resolve_task
from .settings import (ModelIdentity, Recorder, SettingsConflict, check as check_settings, common_settings,
                       model_identity, writer_record)
from .state import OutputFolder
from .storage import open_output
from .walk import IMAGE_EXTENSIONS, InputError, WalkResult, shard_of, walk
from .writers import Writer, WriterContext, writer_class
from .writing import WRITER_GRACE_S, Interrupt, WriterThread, in_order


def run(config: RunConfig, reporter: Optional[Reporter] = None, segmenter: Optional[Segmenter] = None,
        stdout: Optional[IO[str]] = None, engine: Optional[Engine] = None) -> RunSummary:
    """Segment every input of config and write the requested formats. Returns the summary.

    Raises UsageError (bad options/inputs, settings that differ from the folder's outputs),
    NoImagesError, ModelLoadError, DeviceError, OutputError, OutputLockedError before any image is
    processed; per-image problems become failures. A run that fails before its first output leaves
    nothing new in --out. WriterError when a writer fails unexpectedly (outputs written so far stay).
    segmenter: a ready Segmenter (tests, long-lived services) instead of loading config.model.
    engine: run the per-batch work elsewhere instead of in this process; config.ray builds a
        engines.ray.RayEngine. Raises EngineError when the engine cannot run at all.
    """
    reporter = reporter or QuietReporter()
    stdout = stdout or sys.stdout
    t_start = time.perf_counter()
    validate(config)
    if config.ray is not None and segmenter is not None:
        raise UsageError("--ray loads its models on the Ray actors: do not pass a segmenter")
    device, dtype = device_and_dtype(config, segmenter, engine)
    try:
        folder = None if config.out == "-" else open_output(config.out, config.shard)
    except RemoteError as e:
        raise UsageError(f"--out {e}") from None
    found = find_inputs(config, folder)
    if folder is not None:
        folder.check_writable()
        try:
            folder.lock()
        except RemoteError as e:  # a store that does not enforce conditional writes (storage.py)
            raise UsageError(f"--out {e}") from None
    try:
        return _run_locked(config, reporter, segmenter, stdout, folder, found, device, dtype, t_start, engine)
    except BaseException:
        if folder is not None:
            folder.unlock()
            folder.discard_if_unused()  # failed before its first output: leave nothing new behind
        raise
    finally:
        if folder is not None:
            folder.unlock()


def find_inputs(config: RunConfig, folder: Optional[OutputFolder]) -> WalkResult:
    """Walk the inputs (never anything under --out) and keep this shard's part.
    Raises UsageError for an input that names nothing, NoImagesError when no image is found."""
    out = None if folder is None else folder.out
    try:
        found = walk(config.inputs, exclude=out)
    except InputError as e:
        raise UsageError(str(e)) from None
    if not found.refs and not found.failures:
        raise NoImagesError(f"no images found in {', '.join(config.inputs)}" + (
            f" ({found.not_images_line()})" if found.not_images else "")
            + f"; m2f reads {', '.join(sorted(IMAGE_EXTENSIONS))}")
    if config.shard is not None:
        i, n = config.shard
        found = dataclasses.replace(found, refs=[r for r in found.refs if shard_of(r.rel, n) == i],
                                    failures=[f for f in found.failures if shard_of(f.ref.rel, n) == i])
    return found


@dataclass
class _Model:
    """What the run knows of its model before loading it."""

    source: Optional[ModelSource]
    categories: CategoryTable
    task: str
    identity: ModelIdentity
    keep: Optional[frozenset]


def _model_facts(config: RunConfig, segmenter: Optional[Segmenter]) -> _Model:
    """The model's classes, task and identity, read from its folder without loading weights."""
    if segmenter is not None:
        src = segmenter.source
        ident = model_identity(segmenter.model_id, src.local_dir if src else None,
                               src.revision if src else None, src.commit if src else None)
        categories, task, source = segmenter.categories, segmenter.task, None
    else:
        source = resolve_model(config.model, config.revision, config.allow_pickle)
        categories = read_categories(source)
        try:
            task = resolve_task(config.task, config.model, categories, source.local_dir)
        except ValueError as e:
            raise UsageError(str(e)) from None
        ident = model_identity(config.model, source.local_dir, config.revision, source.commit)
    try:
        keep = resolve_classes(categories, config.classes)
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    return _Model(source, categories, task, ident, keep)


def _plan(config: RunConfig, writers: list[Writer], refs: list[ImageRef]
          ) -> tuple[dict[str, list[Writer]], list[ImageRef]]:
    """For each input, the writers whose files it still needs; the inputs with any such writer."""
    plan = {}
    todo = []
    for ref in refs:
        need = writers if config.overwrite else [w for w in writers if not w.done(ref)]
        if need:
            plan[ref.rel] = need
            todo.append(ref)
    return plan, todo


def _check_settings(config: RunConfig, folder: Optional[OutputFolder], writers: list[Writer], m: _Model,
                    dtype: str, found: WalkResult) -> Optional[Recorder]:
    """Compare this run's settings with the folder's record (settings.py); refuse when they differ."""
    if folder is None:
        return None
    classes = None if m.keep is None else [m.categories[i].name for i in sorted(m.keep)]
    tile = tile_of(config)
    common = common_settings(m.identity, m.task, config.resize, config.fast_decode, dtype, config.top_k,
                             classes, tile.record() if tile is not None else None)
    records = {w.name: writer_record(w, common) for w in writers}
    try:
        adopted = check_settings(folder, writers, records, lambda w: w.has_outputs(found.refs),
                                 config.overwrite)
    except SettingsConflict as e:
        raise UsageError(str(e)) from None
    recorder = Recorder(folder, records)
    for name in adopted:
        recorder.before_write(name)
    return recorder


def _announce(line: str) -> None:
    """A line a person at the terminal sees even with --quiet (a process was left behind)."""
    print(f"m2f: {line}", file=sys.stderr, flush=True)


def _run_locked(config, reporter, segmenter, stdout, folder, found, device, dtype, t_start, engine
                ) -> RunSummary:
    thresholds = writer_thresholds(config)
    m = _model_facts(config, segmenter)
    if m.task == "semantic" and "coco" in config.formats:
        raise UsageError("--format coco writes instance or panoptic results; this is a semantic model "
                         "(--task semantic): --format labels writes its label PNGs")
    if m.task != "instance" and config.tile is not None:
        raise UsageError(f"--tile merges instances; this is a {m.task} model (--task {m.task})")
    writers = open_writers(config, folder, m.categories, m.identity.name, stdout, m.task)
    recorder = _check_settings(config, folder, writers, m, dtype, found)
    if engine is None and config.ray is not None:
        from .engines.ray import RayEngine
        engine = RayEngine(config, m.task)

    summary = RunSummary(total=len(found.refs) + len(found.failures), not_images=dict(found.not_images))
    plan, todo = _plan(config, writers, found.refs)
    summary.skipped = len(found.refs) - len(todo)

    compiled = False
    if segmenter is None and engine is None and todo:
        spec = spec_for_resize(config.resize, load_checkpoint_spec(m.source.local_dir))
        compiled = resolve_compile(config.compile, device, len(todo), spec.mode == "fixed")
        try:
            segmenter = Segmenter(**{**segmenter_options(config, m.task), "compile": compiled},
                                  source=m.source, notify=reporter.message,
                                  builds=build_mode(len(todo), config.detached_build),
                                  announce=_announce if config.detached_build else None)
            summary.hint = segmenter.startup_hint
        except KeyError as e:
            raise UsageError(e.args[0]) from None
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif segmenter is not None:
        segmenter.options = segmenter.options.__class__(
            threshold=min(thresholds.values()), map_threshold=map_threshold(config, thresholds),
            top_k=config.top_k, keep=m.keep)
    if segmenter is not None:
        segmenter.tiling = tile_of(config)  # with the formats a raster read in windows cannot give

    spec = segmenter.spec if segmenter is not None else None
    batch_size, workers, threads = auto_settings(
        device, config, padded=spec.padded_size(3000, 4000) if spec is not None else None,  # a 4:3 photo
        dtype=getattr(getattr(segmenter, "predictor", None), "dtype", None))
    if compiled and config.batch_size is None and device.type == "cpu":
        batch_size = 1  # a partial batch would be a new input shape, i.e. another compile
    if compiled:
        reporter.message("compiling the model (torch.compile): the first image waits for it, "
                         "a few minutes cold, seconds with inductor's on-disk cache warm")
    if threads:
        torch.set_num_threads(threads)

    reporter.start(len(todo) + len(found.failures), summary.skipped)
    if config.tile is not None and todo:
        reporter.message(f"--tile {tile_of(config)}: images larger than a tile are cut into tiles; "
                         "progress counts images")
    if found.not_images:
        reporter.message(f"skipped {found.not_images_line()}")
    for f in found.failures:
        _fail(summary, reporter, f)

    interrupt = Interrupt()
    fatal: Optional[BaseException] = None
    with interrupt.installed():
        if todo:
            fatal = _process(config, segmenter, engine, todo, plan, recorder, batch_size, workers,
                             summary, reporter, interrupt)
        for w in writers:
            try:
                w.close()
            except OutputError as e:
                fatal = fatal or e
        summary.interrupted = interrupt.signum
        summary.wall_s = time.perf_counter() - t_start
        if segmenter is not None:
            summary.stages.forward = segmenter.times.forward_s
            summary.stages.postprocess = segmenter.times.postprocess_s
        if folder is not None:
            try:
                write_failures(folder, summary.failures)
                write_manifest(folder, config, summary, complete=fatal is None)
            except OutputError as e:
                fatal = fatal or e
    reporter.finish(summary)
    if fatal is not None:
        raise fatal
    return summary


def _process(config, segmenter, engine, todo, plan, recorder, batch_size, workers, summary, reporter,
             interrupt: Interrupt) -> Optional[BaseException]:
    """Run the engine over todo and hand its results to the writer thread. Returns the fatal
    error, if any; a closed stdout is no error (summary.stdout_closed)."""
    writer = WriterThread(plan, recorder, depth=2 * batch_size + 2, stages=summary.stages)
    fatal: Optional[BaseException] = None

    def stopping() -> bool:
        return (interrupt.signum is not None or writer.error is not None or
                (config.max_failures is not None and summary.failed >= config.max_failures))
    try:
        if engine is not None:
            results = engine.results(todo, summary.stages, stopping)
        else:
            results = LocalEngine(config, segmenter, batch_size, workers, notify=reporter.message).results(
                todo, summary.stages, stopping)
        try:
            _consume(results, writer, summary, reporter, stopping, abandon=interrupt.grace_over)
        finally:
            getattr(results, "close", lambda: None)()  # stop the engine's work in flight now
    except (OutputError, EngineError, WriterError) as e:
        fatal = e
    except StdoutClosed:
        pass
    finally:
        finished = writer.join(give_up=interrupt.grace_over)
        if not finished:
            reporter.message(f"the writer did not finish within {WRITER_GRACE_S:.0f} s of the signal; "
                             "images it had not written are redone by the next run")
    if isinstance(writer.error, StdoutClosed):
        summary.stdout_closed = True
    elif writer.error is not None and fatal is None:
        fatal = writer.error
    summary.stopped_early = (config.max_failures is not None and summary.failed >= config.max_failures
                             and interrupt.signum is None)
    return fatal


def _consume(results: Iterator[tuple[int, object]], writer: WriterThread, summary: RunSummary,
             reporter: Reporter, stopping: Callable[[], bool], abandon: Callable[[], bool]) -> None:
    """Take an engine's (seq, result or failure) pairs, in input order, to the writers and the summary."""
    last_tiles = 0
    for item in in_order(results):
        if isinstance(item, Failure):
            _fail(summary, reporter, item)
        elif writer.put(item, abandon):
            summary.images += 1
            summary.instances += len(item.regions())
            reporter.advance(1, len(item.instances))
            if item.tiles and item.tiles != last_tiles:  # --tile: what an image costs, when it changes
                last_tiles = item.tiles
                reporter.message(f"{item.ref.name}: {item.width}x{item.height} px in {item.tiles} tiles")
        if stopping():
            break


def _fail(summary: RunSummary, reporter: Reporter, failure: Failure) -> None:
    summary.failed += 1
    summary.failures.append(failure)
    reporter.failure(failure)


def open_writers(config: RunConfig, folder: Optional[OutputFolder], categories: CategoryTable,
                 model_id: str, stdout: IO[str], task: str = "instance") -> list[Writer]:
    writers = []
    options = {"coco_annotations": config.coco_annotations, "overlay_format": config.overlay_format,
               "overlay_alpha": config.overlay_alpha, "overlay_scores": config.overlay_scores,
               "rle": config.rle, "simplify": config.simplify, "cutout_pad": config.cutout_pad,
               "cutout_visible": config.cutout_visible, **config.options}
    for fmt, thr in writer_thresholds(config).items():
        ctx = WriterContext(folder=folder, categories=categories, model=model_id, revision=config.revision,
                            top_k=config.top_k, threshold=thr, overwrite=config.overwrite, stdout=stdout,
                            options=options)
        try:
            writers.append(writer_class(fmt, task)(ctx))
        except ValueError as e:
            raise UsageError(str(e)) from None
    return writers
