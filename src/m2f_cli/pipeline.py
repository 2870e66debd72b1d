"""``run(config, reporter) -> Summary``: the whole ``m2f segment`` recipe, top to bottom.

walk -> (skip what is done) -> decode + preprocess in DataLoader workers -> group into batches
-> model -> postprocess -> restore input order -> writers (in a bounded background thread).
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Callable, Iterable, Iterator, Optional, Protocol, Union

import torch

from .batch import ImageDataset, Sample, group_batches, make_loader
from .categories import CategoryTable
from .config import ExitCode, RunConfig
from .model import DTYPES, ModelSource, read_categories, resolve_device, resolve_dtype, resolve_model
from .progress import QuietReporter, Reporter, Summary
from .records import Failure, ImageRef, ImageResult
from .preprocess import PreprocessSpec, load_checkpoint_spec, spec_for_resize
from .accel import cuda_batch_size, free_device_memory, is_out_of_memory, stack_pixels
from .segmenter import InFlight, Segmenter, StageError, describe_error, resolve_classes, resolve_task, tile_options
from .settings import (ModelIdentity, Recorder, SettingsConflict, check as check_settings, common_settings,
                       model_identity, writer_record)
from .state import OutputError, OutputFolder
from .storage import RemoteError, one_line, open_output
from .tiling import infer_tiled
from .walk import IMAGE_EXTENSIONS, InputError, WalkResult, shard_of, walk
from .writers import REGISTRY, Writer, WriterContext
from .errors import UsageError, EngineError, StdoutClosed, WriterError, NoImagesError  # noqa: F401  (defined there; raised and re-exported here)

log = logging.getLogger(__name__)


RAY_MISSING = "--ray needs Ray: pip install 'm2f[ray]'"


def _ray_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("ray") is not None


@dataclass
class Stages:
    """Seconds spent per stage (decode/preprocess are summed over workers)."""

    decode: float = 0.0
    preprocess: float = 0.0
    forward: float = 0.0
    postprocess: float = 0.0
    write: float = 0.0
    idle: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RunSummary(Summary):
    """not_images: files met in the input folders that are not images, counted by extension."""

    stages: Stages = field(default_factory=Stages)
    failures: list = field(default_factory=list)
    not_images: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"total": self.total, "images": self.images, "skipped": self.skipped, "failed": self.failed,
                "instances": self.instances, "wall_s": round(self.wall_s, 4),
                "images_per_s": round(self.images_per_s, 4), "interrupted": self.interrupted,
                "stopped_early": self.stopped_early, "stdout_closed": self.stdout_closed,
                "not_images": self.not_images, "exit_code": self.exit_code,
                "stages": {k: round(v, 4) for k, v in self.stages.as_dict().items()}}

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + self.interrupted
        if self.stdout_closed:
            return int(ExitCode.STDOUT_CLOSED)
        return int(ExitCode.INPUTS_FAILED if self.failed else ExitCode.OK)


def auto_settings(device: torch.device, config: RunConfig, padded: Optional[tuple[int, int]] = None,
                  dtype: Optional[torch.dtype] = None) -> tuple[int, int, Optional[int]]:
    """(batch_size, workers, threads) for the device unless the user chose them.

    CPU: the model's threads own the cores; one decode worker (two on bigger machines) is enough
    to keep up with a ~1 s forward, and batching does not pay on CPU. CUDA: the batch size the
    card's memory holds at the model input size padded (accel.cuda_batch_size; an OOM still splits
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
        bs, workers = 2, (1 if cores <= 4 else 2)
    return (config.batch_size or bs,
            workers if config.workers is None else config.workers,
            config.threads)


# On CPU torch.compile made the forward ~1.3x faster after a one-time compile of ~300 s on 2 busy
# cores (~20 s with inductor's on-disk cache warm); at ~0.5 s saved per image it pays back within
# ~600 images even when cold. Measured with the real architecture: README "Speed".
COMPILE_AUTO_MIN_IMAGES = 1000


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
    for f in config.formats:
        if f not in REGISTRY:
            raise UsageError(f"--format {f!r}: expected one of {', '.join(REGISTRY)}")
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
    _tile_of(config)


def _tile_of(config: RunConfig):
    """--tile/--tile-full as tiling.TileOptions (None without tiles); UsageError for bad values."""
    try:
        tile = tile_options(config.tile, config.tile_full, "instance")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if tile is not None and config.fast_decode:
        raise UsageError("--fast-decode decodes JPEGs at the model's reduced size; --tile needs every pixel")
    return tile


def writer_thresholds(config: RunConfig) -> dict[str, float]:
    """Each format's score threshold: --threshold for all, else each writer's own default."""
    return {f: (config.threshold if config.threshold is not None else REGISTRY[f].default_threshold)
            for f in config.formats}


def open_writers(config: RunConfig, folder: Optional[OutputFolder], categories: CategoryTable,
                 model_id: str, stdout: IO[str]) -> list[Writer]:
    writers = []
    options = {"coco_annotations": config.coco_annotations, "overlay_format": config.overlay_format,
               "overlay_alpha": config.overlay_alpha, "overlay_scores": config.overlay_scores,
               "rle": config.rle, "simplify": config.simplify, **config.options}
    for fmt, thr in writer_thresholds(config).items():
        ctx = WriterContext(folder=folder, categories=categories, model=model_id, revision=config.revision,
                            top_k=config.top_k, threshold=thr, overwrite=config.overwrite, stdout=stdout,
                            options=options)
        try:
            writers.append(REGISTRY[fmt](ctx))
        except ValueError as e:
            raise UsageError(str(e)) from None
    return writers


# After the first SIGINT/SIGTERM, how long the writer thread may take to write what is queued
# before the process leaves without it (a writer blocked on a full pipe must not keep it alive).
WRITER_GRACE_S = 10.0


class _Interrupt:
    """SIGINT/SIGTERM: the first asks the run to stop after the batch in flight; a second one of
    either exits at once (outputs are renamed into place only when complete, so nothing is corrupt)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.at: Optional[float] = None

    def _handle(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        self.at = time.monotonic()

    def grace_over(self) -> bool:
        return self.at is not None and time.monotonic() - self.at > WRITER_GRACE_S

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class _WriterThread:
    """Writes results in a background thread through a bounded queue (off the critical path).

    plan: for each output name, the writers whose files it still needs (a writer whose files of
    that image exist is not asked again). The first error stops writing: an OutputError, a closed
    stdout (StdoutClosed) or anything else (WriterError); check() re-raises it in the main thread,
    and the thread goes on draining the queue so that nothing waits on it.
    """

    def __init__(self, plan: dict[str, list[Writer]], recorder: Optional[Recorder], depth: int,
                 stages: Stages):
        self.plan = plan
        self.recorder = recorder
        self.q: "queue.Queue[Optional[ImageResult]]" = queue.Queue(maxsize=depth)
        self.error: Optional[BaseException] = None
        self.stages = stages
        self.thread = threading.Thread(target=self._loop, name="m2f-writer", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            r = self.q.get()
            if r is None:
                return
            if self.error is not None:
                continue
            t0 = time.perf_counter()
            self.error = self._write(r)
            self.stages.write += time.perf_counter() - t0

    def _write(self, r: ImageResult) -> Optional[BaseException]:
        w = None
        try:
            for w in self.plan.get(r.ref.rel, ()):
                if self.recorder is not None:
                    self.recorder.before_write(w.name)
                w.write(r)
        except BrokenPipeError:
            return StdoutClosed()
        except OutputError as e:
            return e
        except Exception as e:  # a bug or an exhausted resource in one writer: stop cleanly, say where
            name = w.name if w is not None else "writer"
            log.debug("writer failure", exc_info=True)
            return WriterError(f"{name} writer failed on {r.ref.path}: {type(e).__name__}: {one_line(e)}")
        return None

    def put(self, result: ImageResult, abandon: Callable[[], bool]) -> bool:
        """Queue one result; False when abandon() turned true while the queue stayed full."""
        while True:
            self.check()
            try:
                self.q.put(result, timeout=0.2)
                return True
            except queue.Full:
                if abandon():
                    return False

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def join(self, give_up: Callable[[], bool]) -> bool:
        """Let the thread write what is queued; True when it finished, False when give_up() said
        to leave it (it is a daemon thread: it dies with the process)."""
        while True:
            try:
                self.q.put(None, timeout=0.2)
                break
            except queue.Full:
                if give_up():
                    return False
        while self.thread.is_alive():
            self.thread.join(timeout=0.2)
            if self.thread.is_alive() and give_up():
                return False
        return True


def _in_order(items: Iterator[tuple[int, object]], first: int = 0) -> Iterator[object]:
    """Re-emit (seq, item) pairs in seq order; seqs are 0..n-1, each exactly once."""
    heap: list = []
    nxt = first
    for seq, item in items:
        heapq.heappush(heap, (seq, id(item), item))
        while heap and heap[0][0] == nxt:
            yield heapq.heappop(heap)[2]
            nxt += 1
    while heap:
        yield heapq.heappop(heap)[2]


class Engine(Protocol):
    """Where the per-batch work runs when it is not this process (``--ray``).

    results(todo, stages, stopping): (seq, ImageResult or Failure) for every ref of todo (seq is
    the ref's position in todo), in any order; add the stage seconds it measured to stages (forward
    and postprocess included); stop early when stopping() is true. Outputs are written by the
    caller, so resume, journals and the output folder work as in a local run.
    """

    def results(self, todo: list[ImageRef], stages: Stages, stopping: Callable[[], bool]
                ) -> Iterator[tuple[int, Union[ImageResult, Failure]]]: ...


def run(config: RunConfig, reporter: Optional[Reporter] = None, segmenter: Optional[Segmenter] = None,
        stdout: Optional[IO[str]] = None, engine: Optional[Engine] = None) -> RunSummary:
    """Segment every input of config and write the requested formats. Returns the summary.

    Raises UsageError (bad options/inputs, settings that differ from the folder's outputs),
    NoImagesError, ModelLoadError, DeviceError, OutputError, OutputLockedError before any image is
    processed; per-image problems become failures. A run that fails before its first output leaves
    nothing new in --out. WriterError when a writer fails unexpectedly (outputs written so far stay).
    segmenter: a ready Segmenter (tests, long-lived services) instead of loading config.model.
    engine: run the per-batch work elsewhere instead of in this process; config.ray builds a
        ray_engine.RayEngine. Raises EngineError when the engine cannot run at all.
    """
    reporter = reporter or QuietReporter()
    stdout = stdout or sys.stdout
    t_start = time.perf_counter()
    validate(config)
    if config.ray is not None and segmenter is not None:
        raise UsageError("--ray loads its models on the Ray actors: do not pass a segmenter")
    device, dtype = _device_and_dtype(config, segmenter, engine)
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


def _device_and_dtype(config: RunConfig, segmenter: Optional[Segmenter], engine) -> tuple[torch.device, str]:
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
    tile = _tile_of(config)
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


def _run_locked(config, reporter, segmenter, stdout, folder, found, device, dtype, t_start, engine
                ) -> RunSummary:
    thresholds = writer_thresholds(config)
    m = _model_facts(config, segmenter)
    if m.task != "instance" and "coco" in config.formats:
        raise UsageError(f"--format coco writes instance results; this is a {m.task} model (--task {m.task})")
    if m.task != "instance" and config.tile is not None:
        raise UsageError(f"--tile merges instances; this is a {m.task} model (--task {m.task})")
    writers = open_writers(config, folder, m.categories, m.identity.name, stdout)
    recorder = _check_settings(config, folder, writers, m, dtype, found)
    if engine is None and config.ray is not None:
        from .ray_engine import RayEngine
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
                                  source=m.source, notify=reporter.message)
        except KeyError as e:
            raise UsageError(e.args[0]) from None
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif segmenter is not None:
        segmenter.options = segmenter.options.__class__(
            threshold=min(thresholds.values()), map_threshold=_map_threshold(config, thresholds),
            top_k=config.top_k, keep=m.keep)
        segmenter.tiling = _tile_of(config)

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
        reporter.message(f"--tile {_tile_of(config)}: images larger than a tile are cut into tiles; "
                         "progress counts images")
    if found.not_images:
        reporter.message(f"skipped {found.not_images_line()}")
    for f in found.failures:
        _fail(summary, reporter, f)

    interrupt = _Interrupt()
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
                _write_failures(folder, summary.failures)
                _write_manifest(folder, config, summary, complete=fatal is None)
            except OutputError as e:
                fatal = fatal or e
    reporter.finish(summary)
    if fatal is not None:
        raise fatal
    return summary


def _process(config, segmenter, engine, todo, plan, recorder, batch_size, workers, summary, reporter,
             interrupt: _Interrupt) -> Optional[BaseException]:
    """Run the engine over todo and hand its results to the writer thread. Returns the fatal
    error, if any; a closed stdout is no error (summary.stdout_closed)."""
    writer = _WriterThread(plan, recorder, depth=2 * batch_size + 2, stages=summary.stages)
    fatal: Optional[BaseException] = None

    def stopping() -> bool:
        return (interrupt.signum is not None or writer.error is not None or
                (config.max_failures is not None and summary.failed >= config.max_failures))
    try:
        if engine is not None:
            results = engine.results(todo, summary.stages, stopping)
        else:
            results = local_results(config, segmenter, todo, batch_size, workers, summary.stages, stopping,
                                    notify=reporter.message)
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


def segmenter_options(config: RunConfig, task: str) -> dict:
    """Segmenter(**options) for this run: what every engine loads, in this process or elsewhere."""
    thresholds = writer_thresholds(config)
    return dict(model=config.model, device=config.device, dtype=config.dtype, revision=config.revision,
                allow_pickle=config.allow_pickle, resize=config.resize, threshold=min(thresholds.values()),
                map_threshold=_map_threshold(config, thresholds), top_k=config.top_k, classes=config.classes,
                compile=bool(config.compile), task=task, trace_cache=config.trace_cache,
                tile=config.tile, tile_full=config.tile_full)


def _map_threshold(config: RunConfig, thresholds: dict[str, float]) -> float:
    """The instance map (PNG, overlay) is drawn at the PNG/overlay threshold."""
    drawn = [thresholds[f] for f in ("png", "overlay") if f in thresholds]
    return drawn[0] if drawn else (config.threshold if config.threshold is not None else 0.5)


def _fail(summary: RunSummary, reporter: Reporter, failure: Failure) -> None:
    summary.failed += 1
    summary.failures.append(failure)
    reporter.failure(failure)


def _failures(batch: list[Sample], stage: str, error: str) -> list[tuple[int, Failure]]:
    return [(s.seq, Failure(s.ref, stage, error)) for s in batch]


class StartedBatch:
    """A batch queued on the segmenter (or already answered): finish() -> (seq, result or failure)
    for each of its samples."""

    def __init__(self, batch: list[Sample], flight: Optional[InFlight] = None,
                 done: Optional[list[tuple[int, Union[ImageResult, Failure]]]] = None):
        self.batch, self.flight, self.done = batch, flight, done

    def finish(self) -> list[tuple[int, Union[ImageResult, Failure]]]:
        if self.done is None:
            self.done = [(s.seq, Failure(s.ref, r.stage, str(r)) if isinstance(r, StageError) else r)
                         for s, r in zip(self.batch, self.flight.finish())]
            self.flight = None
        return self.done


def start_batch(segmenter: Segmenter, batch: list[Sample], notify: Optional[Callable[[str], None]] = None
                ) -> StartedBatch:
    """Queue one batch of samples of equal shape (or answer one failed sample).

    The pixels are stacked into pinned memory when the model is on CUDA (accel.stack_pixels), so the
    copy to the card is asynchronous. A device out-of-memory error splits the batch in halves, retried
    one after the other (down to one image at a time), with a one-line notice; later batches are cut
    to the size that fitted (segmenter.max_batch). Any other failure of the model fails the batch's
    images (stage "model"); one of the post-processing fails its image (stage "postprocess").
    """
    if batch[0].error is not None:
        return StartedBatch(batch, done=_failures(batch, "decode", batch[0].error))
    notify = notify or log.warning
    limit = getattr(segmenter, "max_batch", None)
    if limit is not None and len(batch) > limit:
        return StartedBatch(batch, done=_in_parts(segmenter, batch, limit, notify))
    try:
        x = stack_pixels([s.pixel_values for s in batch], pin=segmenter.device.type == "cuda")
        flight = segmenter.start(x, [s.ref for s in batch], [s.valid for s in batch], [s.original for s in batch])
    except StageError as e:
        return StartedBatch(batch, done=_failures(batch, e.stage, str(e)))
    except Exception as e:
        if not is_out_of_memory(e):
            return StartedBatch(batch, done=_failures(batch, "model", describe_error(e)))
        free_device_memory(segmenter.device)
        if len(batch) == 1:
            return StartedBatch(batch, done=_failures(batch, "model", f"out of memory on one image ({describe_error(e)})"))
        half = (len(batch) + 1) // 2
        segmenter.max_batch = half
        notify(f"{segmenter.device.type} out of memory on a batch of {len(batch)} images: "
               f"retrying in batches of {half}")
        return StartedBatch(batch, done=_in_parts(segmenter, batch, half, notify))
    return StartedBatch(batch, flight)


def _in_parts(segmenter: Segmenter, batch: list[Sample], size: int, notify: Callable[[str], None]
              ) -> list[tuple[int, Union[ImageResult, Failure]]]:
    out = []
    for i in range(0, len(batch), size):
        out += start_batch(segmenter, batch[i:i + size], notify).finish()
    return out


def infer_batch(segmenter: Segmenter, batch: list[Sample], notify: Optional[Callable[[str], None]] = None
                ) -> list[tuple[int, Union[ImageResult, Failure]]]:
    """One batch of samples of equal shape (or one failed sample) -> (seq, result or failure) each."""
    return start_batch(segmenter, batch, notify).finish()


def segment_samples(segmenter: Segmenter, samples: Iterable[Sample], batch_size: int,
                    notify: Optional[Callable[[str], None]] = None
                    ) -> Iterator[tuple[int, Union[ImageResult, Failure]]]:
    """Samples -> (seq, result or failure), batching samples of equal shape: the per-batch loop of
    every engine (the local one below, the Ray actors).

    On CUDA one batch stays in flight: batch n+1 is queued (forward and device post-processing) before
    batch n's host post-processing runs, so the card works while the host encodes masks. Elsewhere
    each batch is finished before the next starts (a CPU has nothing to overlap; MPS timing syncs).
    """
    overlap = segmenter.device.type == "cuda"
    in_flight: Optional[StartedBatch] = None
    for batch in group_batches(samples, batch_size):
        if batch[0].tiles is not None:  # --tile: one image, its tiles batched by tiling.py
            if in_flight is not None:
                yield from in_flight.finish()
                in_flight = None
            yield from infer_tiled(segmenter, batch[0], batch_size)
            continue
        started = start_batch(segmenter, batch, notify)
        if not overlap:
            yield from started.finish()
            continue
        if in_flight is not None:
            yield from in_flight.finish()
        in_flight = started
    if in_flight is not None:
        yield from in_flight.finish()


def local_results(config: RunConfig, segmenter: Segmenter, todo: list[ImageRef], batch_size: int,
                  workers: int, stages: Stages, stopping: Callable[[], bool],
                  notify: Optional[Callable[[str], None]] = None
                  ) -> Iterator[tuple[int, Union[ImageResult, Failure]]]:
    """The local engine: decode + preprocess in DataLoader workers, the model in this process.
    The loader does not pin (it yields Samples, which torch's pin_memory leaves as they are): each
    batch is stacked into pinned memory instead (start_batch)."""
    dataset = ImageDataset(todo, segmenter.spec, config.max_pixels, config.fast_decode,
                           tile=getattr(segmenter, "tiling", None))
    loader = make_loader(dataset, workers)

    def samples() -> Iterator[Sample]:
        it = iter(loader)
        try:
            while not stopping():
                t0 = time.perf_counter()
                try:
                    s = next(it)
                except StopIteration:
                    return
                stages.idle += time.perf_counter() - t0
                stages.decode += s.decode_s
                stages.preprocess += s.preprocess_s
                yield s
        finally:
            del it  # shuts the workers down

    return segment_samples(segmenter, samples(), batch_size, notify)


def _consume(results: Iterator[tuple[int, object]], writer: _WriterThread, summary: RunSummary,
             reporter: Reporter, stopping: Callable[[], bool], abandon: Callable[[], bool]) -> None:
    """Take an engine's (seq, result or failure) pairs, in input order, to the writers and the summary."""
    last_tiles = 0
    for item in _in_order(results):
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


def _write_manifest(folder: OutputFolder, config: RunConfig, summary: RunSummary, complete: bool) -> None:
    """<out>/m2f-run.json (m2f-run.shard-I-of-N.json for shards): what the last run did, and
    whether it got through all its inputs; ``m2f merge`` reads it to find incomplete shards."""
    doc = {"formats": list(config.formats), "shard": list(config.shard) if config.shard else None,
           "complete": complete and not summary.interrupted and not summary.stopped_early,
           **summary.as_dict()}
    folder.write_bytes(folder.run_file("m2f-run", ".json"), json.dumps(doc, indent=1).encode())


def _write_failures(folder: OutputFolder, failures: list[Failure]) -> None:
    """<out>/failures.jsonl, rewritten each run: {"path", "stage", "error"} per failed input."""
    data = "".join(json.dumps({"path": f.ref.path, "stage": f.stage, "error": f.error}, ensure_ascii=False)
                   + "\n" for f in failures)
    folder.write_bytes(folder.run_file("failures", ".jsonl"), data.encode())
