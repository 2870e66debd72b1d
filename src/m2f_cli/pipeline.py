"""``run(config, reporter) -> Summary``: the whole ``m2f segment`` recipe, top to bottom.

validate the options -> walk the inputs -> check the folder's settings record -> skip what is done
-> an engine decodes, batches, runs the model and post-processes -> results in input order ->
writers (a bounded background thread) -> summary, manifest and failures.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from typing import IO, Callable, Iterator, Optional

import torch

from m2f_cli.model.categories import CategoryTable
from m2f_cli.config import RunConfig
from m2f_cli.engines import Engine
from m2f_cli.engines.local import EarlyLoader, LocalEngine
from m2f_cli.engines.video import VideoJob
from m2f_cli.errors import (EngineError, InputError, NoImagesError, OutputError, RemoteError, StdoutClosed,
    UsageError, WriterError)
from m2f_cli.outputs.manifest import write_failures, write_manifest
from m2f_cli.model.loading import ModelSource, read_categories, resolve_model
from m2f_cli.choices import (auto_settings, device_and_dtype, map_threshold, resolve_compile, segmenter_options,
    segment_threshold, tile_of, build_mode, validate, writer_thresholds)
from m2f_cli.inputs.preprocess import load_checkpoint_spec, spec_for_resize
from m2f_cli.progress import QuietReporter, Reporter, RunSummary
from m2f_cli.records import Failure, ImageRef
from m2f_cli.segmenter import Segmenter, resolve_classes, resolve_task
from m2f_cli.outputs.settings_record import (ModelIdentity, Recorder, SettingsConflict, check as check_settings,
    common_settings, model_identity, writer_record)
from m2f_cli.outputs.folder import OutputFolder
from m2f_cli.outputs.open import open_output
from m2f_cli.inputs.walk import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, WalkResult, is_video_name, shard_of, walk
from m2f_cli.inputs.frame_selection import selection_of
from m2f_cli.outputs.video_resume import plan_videos, track_states, work_count
from m2f_cli.outputs.writers import Writer, WriterContext, writer_class
from m2f_cli.outputs.writer_thread import WRITER_GRACE_S, Interrupt, WriterThread, in_order

log = logging.getLogger(__name__)


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
        except RemoteError as e:  # a store that does not enforce conditional writes (outputs/lease.py)
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
            + f"; m2f reads {', '.join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))}")
    if config.shard is not None:
        i, n = config.shard
        found = dataclasses.replace(found, refs=[r for r in found.refs if shard_of(r.rel, n) == i],
                                    failures=[f for f in found.failures if shard_of(f.ref.rel, n) == i])
    return found


@dataclass
class ModelFacts:
    """What the run knows of its model before loading it."""

    source: Optional[ModelSource]
    categories: CategoryTable
    task: str
    identity: ModelIdentity
    keep: Optional[frozenset]


def model_facts(config: RunConfig, segmenter: Optional[Segmenter]) -> ModelFacts:
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
    return ModelFacts(source, categories, task, ident, keep)


def plan_outputs(config: RunConfig, writers: list[Writer], refs: list[ImageRef]
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


def _check_settings(config: RunConfig, folder: Optional[OutputFolder], writers: list[Writer], m: ModelFacts,
                    dtype: str, found: WalkResult) -> Optional[Recorder]:
    """Compare this run's settings with the folder's record (settings.py); refuse when they differ."""
    if folder is None:
        return None
    records, adopted = settings_check(config, folder, writers, m, dtype, found)
    recorder = Recorder(folder, records)
    for name in adopted:
        recorder.before_write(name)
    return recorder


def settings_check(config: RunConfig, folder: OutputFolder, writers: list[Writer], m: ModelFacts, dtype: str,
                   found: WalkResult) -> tuple[dict[str, dict], list[str]]:
    """This run's settings record per writer, and the writers whose outputs have no record yet
    (adopted). Raises UsageError when the folder's outputs were made with other settings."""
    classes = None if m.keep is None else [m.categories[i].name for i in sorted(m.keep)]
    tile = tile_of(config)
    common = common_settings(m.identity, m.task, config.resize, config.fast_decode, dtype, config.top_k,
                             classes, tile.record() if tile is not None else None, selection_of(config).record())
    if config.track:  # tracked outputs differ from untracked ones (track ids, duplicates merged)
        from m2f_cli.tracking.tracker import TrackerConfig
        common["track"] = TrackerConfig().record()
    records = {w.name: writer_record(w, common) for w in writers}
    try:
        adopted = check_settings(folder, writers, records, lambda w: w.has_outputs(found.refs),
                                 config.overwrite)
    except SettingsConflict as e:
        raise UsageError(str(e)) from None
    return records, adopted


def _announce(line: str) -> None:
    """A line a person at the terminal sees even with --quiet (a process was left behind)."""
    print(f"m2f: {line}", file=sys.stderr, flush=True)


def _run_locked(config, reporter, segmenter, stdout, folder, found, device, dtype, t_start, engine
                ) -> RunSummary:
    m = model_facts(config, segmenter)
    _check_task(config, m)
    writers = open_writers(config, folder, m.categories, m.identity.name, stdout, m.task)
    recorder = _check_settings(config, folder, writers, m, dtype, found)
    if engine is None and config.ray is not None:
        from m2f_cli.engines.ray import RayEngine
        engine = RayEngine(config, m.task)

    summary = RunSummary(total=len(found.refs) + len(found.failures), not_images=dict(found.not_images))
    plan, todo = plan_outputs(config, writers, [r for r in found.refs if not is_video_name(r.name)])
    plan, todo = plan_videos(config, folder, writers, plan, todo, found.refs)  # videos: outputs/video_resume.py
    summary.skipped = len(found.refs) - len(todo)
    early = _early_loader(config, engine, segmenter, m, device, todo)
    try:
        return _run_planned(config, reporter, segmenter, folder, found, device, t_start, engine, m, writers,
                            recorder, summary, plan, todo, early)
    finally:
        if early is not None:
            early.close()  # not taken by the engine (an error first, or another preprocessing): workers go


def _early_loader(config, engine, segmenter, m: ModelFacts, device, todo: list) -> Optional[EarlyLoader]:
    """The CLI's first DataLoader on CPU, started before the model loads (engines/local.EarlyLoader):
    only where this process runs the model from config.model and there are images and no videos."""
    if engine is not None or segmenter is not None or not todo or device.type != "cpu" \
            or any(isinstance(r, VideoJob) for r in todo) or m.source is None or not m.source.local_dir:
        return None
    _, workers, _ = auto_settings(device, config)
    if workers <= 0:
        return None
    return EarlyLoader(config, todo, _checkpoint_spec(config, m), tile_of(config), workers)


def _checkpoint_spec(config: RunConfig, m: ModelFacts):
    """The preprocessing of config.model at config.resize (what its Segmenter will use)."""
    return spec_for_resize(config.resize, load_checkpoint_spec(m.source.local_dir))


def _run_planned(config, reporter, segmenter, folder, found, device, t_start, engine, m: ModelFacts, writers,
                 recorder, summary: RunSummary, plan, todo: list, early: Optional[EarlyLoader]) -> RunSummary:
    segmenter, compiled = _ready_segmenter(config, segmenter, engine, m, device, len(todo), reporter, summary)
    batch_size, workers = _batching(config, segmenter, device, compiled, reporter)

    reporter.start(work_count(todo) + len(found.failures), summary.skipped)
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
                             summary, reporter, interrupt, _tracking(config, plan, todo), early)
        fatal = _close(config, folder, writers, plan, segmenter, summary, interrupt.signum, t_start, fatal)
    reporter.finish(summary)
    if fatal is not None:
        raise fatal
    return summary


def _tracking(config: RunConfig, plan, todo: list) -> Callable[[Iterator], Iterator]:
    """The tracking stage between the engine and the writers (--track, tracking/stage.py): resumed
    videos continue from their journaled tracker state; without --track, the items as they are."""
    if not config.track:
        return lambda items: items
    from m2f_cli.tracking.stage import TrackingStage
    return TrackingStage(initial=track_states(plan, todo)).apply


def _check_task(config: RunConfig, m: ModelFacts) -> None:
    """Formats and options the model's task cannot serve: UsageError."""
    if m.task == "semantic" and "coco" in config.formats:
        raise UsageError("--format coco writes instance or panoptic results; this is a semantic model "
                         "(--task semantic): --format labels writes its label PNGs")
    if m.task != "instance" and config.track:
        raise UsageError(f"--track follows instances; this is a {m.task} model (--task {m.task})")
    if m.task != "instance" and config.tile is not None:
        raise UsageError(f"--tile merges instances; this is a {m.task} model (--task {m.task})")


def _ready_segmenter(config, segmenter, engine, m: ModelFacts, device, todo: int, reporter, summary):
    """The Segmenter of this run, loaded here unless one was given or an engine runs the model
    elsewhere (or there is nothing to do); a given one takes this run's options. (segmenter, compiled)."""
    if segmenter is not None:
        thresholds = writer_thresholds(config)
        segmenter.options = segmenter.options.__class__(
            threshold=segment_threshold(config, thresholds), map_threshold=map_threshold(config, thresholds),
            top_k=config.top_k, keep=m.keep)
        segmenter.tiling = tile_of(config)
        return segmenter, False
    if engine is not None or not todo:
        return None, False
    spec = _checkpoint_spec(config, m)
    compiled = resolve_compile(config.compile, device, todo, spec.mode == "fixed")
    try:
        segmenter = Segmenter(**{**segmenter_options(config, m.task), "compile": compiled},
                              source=m.source, notify=reporter.message,
                              builds=build_mode(todo, config.detached_build),
                              announce=_announce if config.detached_build else None)
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    segmenter.tiling = tile_of(config)  # with the formats a raster read in windows cannot give
    summary.hint = segmenter.startup_hint
    return segmenter, compiled


def _batching(config, segmenter, device, compiled: bool, reporter) -> tuple[int, int]:
    """(batch size, decode workers) for this run; torch's threads set; what was chosen logged."""
    spec = segmenter.spec if segmenter is not None else None
    predictor = getattr(segmenter, "predictor", None)
    batch_size, workers, threads = auto_settings(
        device, config, padded=spec.padded_size(3000, 4000) if spec is not None else None,  # a 4:3 photo
        dtype=getattr(predictor, "dtype", None))
    if compiled and config.batch_size is None and device.type == "cpu":
        batch_size = 1  # a partial batch would be a new input shape, i.e. another compile
    if getattr(predictor, "compiling", False):
        reporter.message("compiling the model (torch.compile): the first image waits for it, "
                         "a few minutes cold, seconds with inductor's on-disk cache warm")
    if segmenter is not None:
        log.info("model: %s (%s) on %s; batch size %d, %d decode workers, %s torch threads",
                 getattr(predictor, "kind", None) or type(predictor).__name__, getattr(predictor, "path", None)
                 or "not from the start-up cache", segmenter.device, batch_size, workers, threads or "default")
    if threads:
        torch.set_num_threads(threads)
    return batch_size, workers


def _close(config, folder, writers, plan, segmenter, summary, signum, t_start,
           fatal: Optional[BaseException]) -> Optional[BaseException]:
    """Close the writers, finish the summary, write failures.jsonl and the manifest (complete when
    nothing was fatal); the run's fatal error: fatal, else the first OutputError met here (everything
    else is still tried), or None."""
    for w in writers + ([plan] if hasattr(plan, "close") else []):  # + the frames journal (outputs/video_resume.py)
        try:
            w.close()
        except OutputError as e:
            fatal = fatal or e
    summary.interrupted = signum
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
    return fatal


def _process(config, segmenter, engine, todo, plan, recorder, batch_size, workers, summary, reporter,
             interrupt: Interrupt, track: Callable[[Iterator], Iterator] = lambda items: items,
             early: Optional[EarlyLoader] = None) -> Optional[BaseException]:
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
            started = early.take(segmenter.spec, segmenter.tiling, workers) if early is not None else None
            results = LocalEngine(config, segmenter, batch_size, workers, notify=reporter.message,
                                  started=started).results(todo, summary.stages, stopping)
        try:
            _consume(results, writer, summary, reporter, stopping, abandon=interrupt.grace_over, track=track)
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
             reporter: Reporter, stopping: Callable[[], bool], abandon: Callable[[], bool],
             track: Callable[[Iterator], Iterator] = lambda items: items) -> None:
    """Take an engine's (seq, result or failure) pairs, in input order, through track (--track)
    to the writers and the summary."""
    last_tiles = 0
    for item in track(in_order(results)):
        if isinstance(item, Failure):
            _fail(summary, reporter, item)
        elif getattr(item, "ends_unit", False):  # a video's end, after its frames (engines.video.VideoEnd)
            writer.put(item, abandon)
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
               "cutout_visible": config.cutout_visible, "track": config.track, **config.options}
    for fmt, thr in writer_thresholds(config).items():
        ctx = WriterContext(folder=folder, categories=categories, model=model_id, revision=config.revision,
                            top_k=config.top_k, threshold=thr, overwrite=config.overwrite, stdout=stdout,
                            options=options)
        try:
            writers.append(writer_class(fmt, task)(ctx))
        except ValueError as e:
            raise UsageError(str(e)) from None
    return writers
