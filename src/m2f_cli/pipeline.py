"""``run(config, reporter) -> Summary``: the whole ``m2f segment`` recipe, top to bottom.

walk -> (skip what is done) -> decode + preprocess in DataLoader workers -> group into batches
-> model -> postprocess -> restore input order -> writers (in a bounded background thread).
"""

from __future__ import annotations

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
from .model import ModelSource, read_categories, resolve_device, resolve_model
from .progress import QuietReporter, Reporter, Summary
from .records import Failure, ImageRef, ImageResult
from .preprocess import PreprocessSpec, load_checkpoint_spec, spec_for_resize
from .segmenter import Segmenter, resolve_classes, resolve_task
from .state import OutputError, OutputFolder
from .storage import RemoteError, open_output
from .walk import InputError, WalkResult, shard_of, walk
from .writers import REGISTRY, Writer, WriterContext

log = logging.getLogger(__name__)


class UsageError(ValueError):
    """A bad option value or input, found before any work starts."""


class EngineError(RuntimeError):
    """The engine cannot run at all (no Ray cluster to connect to, no actor can load the model).
    Per-image problems are failures, never this."""


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
    stages: Stages = field(default_factory=Stages)
    failures: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"total": self.total, "images": self.images, "skipped": self.skipped, "failed": self.failed,
                "instances": self.instances, "wall_s": round(self.wall_s, 4),
                "images_per_s": round(self.images_per_s, 4), "interrupted": self.interrupted,
                "stopped_early": self.stopped_early, "exit_code": self.exit_code,
                "stages": {k: round(v, 4) for k, v in self.stages.as_dict().items()}}

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + self.interrupted
        return int(ExitCode.INPUTS_FAILED if self.failed else ExitCode.OK)


def auto_settings(device: torch.device, config: RunConfig) -> tuple[int, int, Optional[int]]:
    """(batch_size, workers, threads) for the device unless the user chose them.

    CPU: the model's threads own the cores; one decode worker (two on bigger machines) is enough
    to keep up with a ~1 s forward, and batching does not pay on CPU. GPU: big batches, many workers.
    """
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        bs, workers = 16, min(8, cores)
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
    if config.ray is not None:
        if not config.ray.strip():
            raise UsageError("--ray: expected auto, local or a cluster address")
        if not _ray_installed():
            raise UsageError(RAY_MISSING)
    elif config.ray_actors is not None:
        raise UsageError("--ray-actors needs --ray")
    if config.ray_actors is not None and config.ray_actors < 1:
        raise UsageError(f"--ray-actors {config.ray_actors}: expected 1 or more")
    if not config.ray_timeout > 0:
        raise UsageError(f"--ray-timeout {config.ray_timeout}: expected a positive number of seconds")
    try:
        spec_for_resize(config.resize, PreprocessSpec())
    except ValueError as e:
        raise UsageError(str(e)) from None


def writer_thresholds(config: RunConfig) -> dict[str, float]:
    """Each format's score threshold: --threshold for all, else each writer's own default."""
    return {f: (config.threshold if config.threshold is not None else REGISTRY[f].default_threshold)
            for f in config.formats}


def open_writers(config: RunConfig, folder: Optional[OutputFolder], categories: CategoryTable,
                 model_id: str, stdout: IO[str]) -> list[Writer]:
    writers = []
    options = {"coco_annotations": config.coco_annotations, "overlay_format": config.overlay_format,
               "overlay_alpha": config.overlay_alpha, "rle": config.rle, **config.options}
    for fmt, thr in writer_thresholds(config).items():
        ctx = WriterContext(folder=folder, categories=categories, model=model_id, revision=config.revision,
                            top_k=config.top_k, threshold=thr, overwrite=config.overwrite, stdout=stdout,
                            options=options)
        try:
            writers.append(REGISTRY[fmt](ctx))
        except ValueError as e:
            raise UsageError(str(e)) from None
    return writers


class _Interrupt:
    """SIGINT/SIGTERM: the first asks the run to stop after the batch in flight; a second SIGINT
    exits at once (outputs are renamed into place only when complete, so nothing is corrupt)."""

    def __init__(self):
        self.signum: Optional[int] = None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            os._exit(128 + signum)
        self.signum = signum

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
    The first OutputError stops writing and is re-raised in the main thread by check()."""

    def __init__(self, writers: list[Writer], depth: int, stages: Stages):
        self.writers = writers
        self.q: "queue.Queue[Optional[ImageResult]]" = queue.Queue(maxsize=depth)
        self.error: Optional[OutputError] = None
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
            try:
                for w in self.writers:
                    w.write(r)
            except OutputError as e:
                self.error = e
            self.stages.write += time.perf_counter() - t0

    def put(self, result: ImageResult) -> None:
        self.check()
        self.q.put(result)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def join(self) -> None:
        self.q.put(None)
        self.thread.join()


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

    Raises UsageError (bad options/inputs), ModelLoadError, DeviceError, OutputError,
    OutputLockedError before any image is processed; per-image problems become failures.
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
    if config.ray is not None or engine is not None:
        device = torch.device("cpu")  # the models run elsewhere; this process only writes
    elif segmenter is None:
        try:
            device = resolve_device(config.device)
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        device = segmenter.device

    try:
        folder = None if config.out == "-" else open_output(config.out, config.shard)
    except RemoteError as e:
        raise UsageError(f"--out {e}") from None
    try:
        found = walk(config.inputs, exclude=None if folder is None else folder.out)
    except InputError as e:
        raise UsageError(str(e)) from None
    if config.shard is not None:
        i, n = config.shard
        found = WalkResult([r for r in found.refs if shard_of(r.rel, n) == i],
                           [f for f in found.failures if shard_of(f.ref.rel, n) == i])
    if folder is not None:
        folder.check_writable()
        try:
            folder.lock()
        except RemoteError as e:  # a store that does not enforce conditional writes (storage.py)
            raise UsageError(f"--out {e}") from None
    try:
        return _run_locked(config, reporter, segmenter, stdout, folder, found, device, t_start, engine)
    finally:
        if folder is not None:
            folder.unlock()


def _run_locked(config, reporter, segmenter, stdout, folder, found, device, t_start, engine) -> RunSummary:
    thresholds = writer_thresholds(config)
    if segmenter is None:
        source: ModelSource = resolve_model(config.model, config.revision, config.allow_pickle)
        categories = read_categories(source)
        try:
            resolve_classes(categories, config.classes)
        except KeyError as e:
            raise UsageError(e.args[0]) from None
        model_id = config.model
        try:
            task = resolve_task(config.task, config.model, len(categories))
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        categories, model_id, task = segmenter.categories, segmenter.model_id, segmenter.task
    if task != "instance" and "coco" in config.formats:
        raise UsageError(f"--format coco writes instance results; this is a {task} model (--task {task})")
    writers = open_writers(config, folder, categories, model_id, stdout)
    if engine is None and config.ray is not None:
        from .ray_engine import RayEngine
        engine = RayEngine(config, task)

    summary = RunSummary(total=len(found.refs) + len(found.failures))
    todo: list[ImageRef] = []
    for ref in found.refs:
        if not config.overwrite and all(w.done(ref) for w in writers):
            summary.skipped += 1
        else:
            todo.append(ref)

    compiled = False
    if segmenter is None and engine is None and todo:
        spec = spec_for_resize(config.resize, load_checkpoint_spec(source.local_dir))
        compiled = resolve_compile(config.compile, device, len(todo), spec.mode == "fixed")
        try:
            segmenter = Segmenter(**{**segmenter_options(config, task), "compile": compiled}, source=source,
                                  notify=reporter.message)
        except KeyError as e:
            raise UsageError(e.args[0]) from None
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif segmenter is not None:
        segmenter.options = segmenter.options.__class__(
            threshold=min(thresholds.values()), map_threshold=_map_threshold(config, thresholds),
            top_k=config.top_k, keep=resolve_classes(segmenter.categories, config.classes))

    batch_size, workers, threads = auto_settings(device, config)
    if compiled and config.batch_size is None and device.type == "cpu":
        batch_size = 1  # a partial batch would be a new input shape, i.e. another compile
    if compiled:
        reporter.message("compiling the model (torch.compile): the first image waits for it, "
                         "a few minutes cold, seconds with inductor's on-disk cache warm")
    if threads:
        torch.set_num_threads(threads)

    reporter.start(len(todo) + len(found.failures), summary.skipped)
    for f in found.failures:
        _fail(summary, reporter, f)

    interrupt = _Interrupt()
    fatal: Optional[BaseException] = None
    with interrupt.installed():
        if todo:
            writer = _WriterThread(writers, depth=2 * batch_size + 2, stages=summary.stages)
            try:
                def stopping() -> bool:
                    return (interrupt.signum is not None or
                            (config.max_failures is not None and summary.failed >= config.max_failures))
                if engine is not None:
                    results = engine.results(todo, summary.stages, stopping)
                else:
                    results = local_results(config, segmenter, todo, batch_size, workers, summary.stages,
                                            stopping)
                try:
                    _consume(results, writer, summary, reporter, stopping)
                finally:
                    getattr(results, "close", lambda: None)()  # stop the engine's work in flight now
                summary.stopped_early = stopping() and interrupt.signum is None
            except (OutputError, EngineError) as e:
                fatal = e
            finally:
                writer.join()
                if writer.error is not None and fatal is None:
                    fatal = writer.error
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


def segmenter_options(config: RunConfig, task: str) -> dict:
    """Segmenter(**options) for this run: what every engine loads, in this process or elsewhere."""
    thresholds = writer_thresholds(config)
    return dict(model=config.model, device=config.device, dtype=config.dtype, revision=config.revision,
                allow_pickle=config.allow_pickle, resize=config.resize, threshold=min(thresholds.values()),
                map_threshold=_map_threshold(config, thresholds), top_k=config.top_k, classes=config.classes,
                compile=bool(config.compile), task=task, trace_cache=config.trace_cache)


def _map_threshold(config: RunConfig, thresholds: dict[str, float]) -> float:
    """The instance map (PNG, overlay) is drawn at the PNG/overlay threshold."""
    drawn = [thresholds[f] for f in ("png", "overlay") if f in thresholds]
    return drawn[0] if drawn else (config.threshold if config.threshold is not None else 0.5)


def _fail(summary: RunSummary, reporter: Reporter, failure: Failure) -> None:
    summary.failed += 1
    summary.failures.append(failure)
    reporter.failure(failure)


def infer_batch(segmenter: Segmenter, batch: list[Sample]) -> list[tuple[int, Union[ImageResult, Failure]]]:
    """One batch of samples of equal shape (or one failed sample) -> (seq, result or failure) each.
    The per-batch step of every engine: the local loop below and the Ray actors run this."""
    if batch[0].error is not None:
        s = batch[0]
        return [(s.seq, Failure(s.ref, "decode", s.error))]
    x = torch.stack([s.pixel_values for s in batch])
    try:
        per_image = segmenter.infer(x, [s.ref for s in batch], [s.valid for s in batch],
                                    [s.original for s in batch])
    except (RuntimeError, ValueError) as e:  # e.g. out of memory on one odd batch
        return [(s.seq, Failure(s.ref, "model", str(e).splitlines()[0])) for s in batch]
    return [(s.seq, r) for s, r in zip(batch, per_image)]


def segment_samples(segmenter: Segmenter, samples: Iterable[Sample], batch_size: int
                    ) -> Iterator[tuple[int, Union[ImageResult, Failure]]]:
    """Samples -> (seq, result or failure), batching samples of equal shape."""
    for batch in group_batches(samples, batch_size):
        yield from infer_batch(segmenter, batch)


def local_results(config: RunConfig, segmenter: Segmenter, todo: list[ImageRef], batch_size: int,
                  workers: int, stages: Stages, stopping: Callable[[], bool]
                  ) -> Iterator[tuple[int, Union[ImageResult, Failure]]]:
    """The local engine: decode + preprocess in DataLoader workers, the model in this process."""
    dataset = ImageDataset(todo, segmenter.spec, config.max_pixels, config.fast_decode)
    loader = make_loader(dataset, workers, pin_memory=segmenter.device.type == "cuda")

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

    return segment_samples(segmenter, samples(), batch_size)


def _consume(results: Iterator[tuple[int, object]], writer: _WriterThread, summary: RunSummary,
             reporter: Reporter, stopping: Callable[[], bool]) -> None:
    """Take an engine's (seq, result or failure) pairs, in input order, to the writers and the summary."""
    for item in _in_order(results):
        if isinstance(item, Failure):
            _fail(summary, reporter, item)
        else:
            writer.put(item)
            summary.images += 1
            summary.instances += len(item.regions())
            reporter.advance(1, len(item.instances))
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
