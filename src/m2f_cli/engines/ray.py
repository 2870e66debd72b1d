"""``--ray``: the per-batch work on a Ray cluster, one model per actor; this process keeps the outputs.

What runs where. This process (the driver: ``m2f segment ... --ray auto``, or the entrypoint of
``ray job submit``) walks the inputs, skips what is done and holds the output folder, its lock, the
journals and the writers, exactly as a local run does (pipeline.py, engines/local.py). Ray actors, each loading the
model once, take chunks of ``(seq, ImageRef)``, decode and preprocess them with ``load_sample`` and
run ``segment_samples``: the same code as a local run, so an image's outputs are the same. Results
(label maps are numpy arrays) come back through Ray's object store.

Ray places the actors and restarts them; this module only keeps each actor fed with at most
IN_FLIGHT chunks, in input order, and watches a per-chunk timeout:

- resources: one actor per GPU (1 GPU + --ray-cpus-per-actor CPUs each, default a GPU node's CPUs
  less one shared by its GPUs, at most 8: the actor decodes in that many threads and sets its torch
  threads to it); on CPU clusters, actors of ``--threads``
  CPUs each, as many as fit while one CPU of the cluster stays free. Actors are the only thing
  this run schedules, so they cannot starve another stage of CPUs; chunks go only to actors that
  have started, so an actor Ray cannot place yet never holds work.
- faults: a killed actor is restarted by Ray and its chunks retried (max_restarts,
  max_task_retries). A chunk that runs longer than ``--ray-timeout`` gets its actor killed and
  restarted (Ray retries the chunk); a second timeout kills the actor for good. A chunk that still
  fails is retried once more image by image (on a new actor when its actor died), and an image
  that fails again becomes an ``engine`` failure: the run goes on and exits 3, like any failed input.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

from ..batch import load_sample
from ..config import RunConfig
from ..errors import EngineError
from ..options import segmenter_options, tile_of
from ..progress import Stages
from ..records import Failure, ImageRef, ImageResult
from ..segmenter import Segmenter
from .local import segment_samples

log = logging.getLogger(__name__)

RESTARTS = 3    # Ray restarts a dead actor this many times and retries its chunks as often
IN_FLIGHT = 2   # chunks queued on one actor: it never waits for the driver between chunks
POLL_S = 0.5    # how often the driver looks at stopping() and the timeouts while it waits


class _Actor:
    """One model in a Ray actor process. Built on the actor: the driver never loads the model."""

    def __init__(self, options: dict, factory: Optional[Callable[[], Segmenter]], threads: Optional[int],
                 batch_size: int, max_pixels: Optional[int], fast_decode: bool, decoders: int = 1, tile=None):
        import torch
        if threads:
            torch.set_num_threads(threads)
        self.segmenter = factory() if factory is not None else Segmenter(**options)
        if tile is not None:  # options.tile_of: --tile with the formats a windowed raster cannot give
            self.segmenter.tiling = tile
        self.batch_size, self.max_pixels, self.fast_decode = batch_size, max_pixels, fast_decode
        self.decoders = max(1, decoders)

    def _load(self, items: list[tuple[int, ImageRef]]) -> list:
        """Decode + preprocess a chunk, in `decoders` threads (Pillow's decoders and resizes release
        the GIL), in input order."""
        seg = self.segmenter

        def one(item):
            # --tile: an image's tiles are cut, run and merged here, on one actor (tiling.py)
            return load_sample(item[0], item[1], seg.spec, self.max_pixels, self.fast_decode,
                               getattr(seg, "tiling", None))
        if self.decoders == 1 or len(items) == 1:
            return [one(it) for it in items]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(min(self.decoders, len(items))) as pool:
            return list(pool.map(one, items))

    def ready(self) -> str:
        return str(self.segmenter.device)

    def process(self, items: list[tuple[int, ImageRef]]
                ) -> tuple[list[tuple[int, Union[ImageResult, Failure]]], dict[str, float]]:
        """A chunk of (seq, ref) -> ((seq, result or failure) per image, stage seconds)."""
        seg = self.segmenter
        samples = self._load(items)
        f0, p0 = seg.times.forward_s, seg.times.postprocess_s
        out = list(segment_samples(seg, samples, self.batch_size))
        return out, {"decode": sum(s.decode_s for s in samples),
                     "preprocess": sum(s.preprocess_s for s in samples),
                     "forward": seg.times.forward_s - f0, "postprocess": seg.times.postprocess_s - p0}


@dataclass
class _Chunk:
    items: list[tuple[int, ImageRef]]
    retried: bool = False   # already resubmitted once by us (after Ray's own retries)
    timeouts: int = 0


@dataclass
class _Slot:
    """One actor and the chunks queued on it (a sync actor runs them in order: the head runs)."""

    handle: Any
    ready_ref: Any
    ready: bool = False
    dead: bool = False
    queue: "deque[tuple[Any, _Chunk]]" = field(default_factory=deque)
    head_since: float = 0.0  # when the head chunk started to count against the timeout
    culprit: Optional[_Chunk] = None  # the chunk running when the actor died for good


@dataclass
class Plan:
    """How many actors of which size: see RayEngine.plan."""

    actors: int
    num_cpus: int
    num_gpus: int
    threads: Optional[int]
    device: str
    batch_size: int


# CPUs a GPU actor asks for by default, at most: decoding a 640x480 JPEG and resizing it takes
# ~5-10 ms a core, and one GPU runs Swin-T at several hundred images/s (benchmarks/gpu.py measures it)
GPU_ACTOR_MAX_CPUS = 8


def gpu_actor_cpus(nodes: list[dict], total_cpus: int, gpus: int) -> int:
    """Default CPUs per GPU actor: on each GPU node its CPUs less one (the driver, Ray itself) shared
    by its GPUs; the smallest share over the nodes (so every GPU's actor can be placed), between 1 and
    GPU_ACTOR_MAX_CPUS. Nodes that do not list their GPUs: the cluster's CPUs less one per GPU."""
    shares = [(int(n.get("CPU", 0)) - 1) // int(n["GPU"]) for n in nodes if int(n.get("GPU", 0)) > 0]
    if not shares:
        shares = [(total_cpus - 1) // max(1, gpus)]
    return max(1, min(GPU_ACTOR_MAX_CPUS, min(shares)))


def _one_line(e: BaseException) -> str:
    """Ray errors carry tracebacks: keep the line that says what happened."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if getattr(e, "actor_init_failed", False) and lines:
        return lines[-1][:300]  # the exception the constructor raised
    return (lines[0] if lines else type(e).__name__)[:300]


@contextlib.contextmanager
def _stdout_to_stderr():
    """Ray prints its cluster messages (worker died, task retried) on sys.stdout; stdout is ours
    (--out - streams JSON Lines there, and the writer holds the real stream already)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


class RayEngine:
    """pipeline.Engine on Ray: ``run(config, engine=RayEngine(config))``, or ``config.ray`` set.

    task: the resolved task (pipeline passes it); segmenter_factory: a picklable callable that
    builds each actor's Segmenter instead of ``Segmenter(**segmenter_options(config, task))``
    (tests, custom models); m2f must be importable on every node.
    """

    def __init__(self, config: RunConfig, task: Optional[str] = None,
                 segmenter_factory: Optional[Callable[[], Segmenter]] = None):
        self.config = config
        self.task = task or config.task
        self.factory = segmenter_factory
        self.plan_used: Optional[Plan] = None
        self._remote = None

    # -- connection ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connected(self):
        """Connect (or start a local cluster); shut Ray down afterwards only if we started it."""
        import ray
        if ray.is_initialized():
            yield
            return
        address = self.config.ray or "auto"
        kwargs: dict = dict(log_to_driver=False, logging_level=logging.ERROR)
        if address == "auto":
            address = os.environ.get("RAY_ADDRESS") or "auto"
        elif address == "local":
            kwargs["include_dashboard"] = False
        # ray.init installs its own SIGTERM handler; ours (stop after the work in flight) stays
        main = threading.current_thread() is threading.main_thread()
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise EngineError(f"--ray {self.config.ray}: cannot connect to a Ray cluster: {_one_line(e)}") \
                from None
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        try:
            yield
        finally:
            ray.shutdown()

    # -- sizing ----------------------------------------------------------------------------------

    def plan(self) -> Plan:
        """Actors for the cluster as it is now. GPUs (unless --device cpu): one actor per GPU.
        CPUs: actors of --threads CPUs (default: a node's CPUs less one, at most 4), at most
        (cluster CPUs - 1) // threads of them, so one CPU always stays free; --ray-actors N overrides
        the count (actors Ray cannot place wait, and get no work, until it can)."""
        import ray
        c = self.config
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        batch_size = c.batch_size
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        total = int(res.get("CPU", 0))
        if gpus > 0 and c.device not in ("cpu", "mps"):
            cpus = c.ray_cpus_per_actor or gpu_actor_cpus(nodes, total, gpus)
            return Plan(c.ray_actors or gpus, cpus, 1, c.threads or cpus, "cuda", batch_size or 16)
        node_cpus = [int(n.get("CPU", 0)) for n in nodes]
        if total < 1 or not node_cpus:
            raise EngineError("the Ray cluster has no CPUs")
        threads = c.ray_cpus_per_actor or c.threads or max(1, min(4, max(node_cpus) - 1))
        if threads > max(node_cpus):
            what = "--ray-cpus-per-actor" if c.ray_cpus_per_actor else "--threads"
            raise EngineError(f"{what} {threads}: no node of the Ray cluster has {threads} CPUs "
                              f"(largest: {max(node_cpus)})")
        fit = sum(n // threads for n in node_cpus)
        actors = c.ray_actors or max(1, min((total - 1) // threads, fit))
        device = "cpu" if c.device == "auto" else c.device
        return Plan(actors, threads, 0, c.threads or threads, device, batch_size or 2)

    def _new_actor(self, plan: Plan) -> _Slot:
        import ray
        options = segmenter_options(self.config, self.task)
        options["device"] = plan.device
        if self._remote is None:
            self._remote = ray.remote(_Actor)
        remote = self._remote.options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
                                      max_restarts=RESTARTS, max_task_retries=RESTARTS)
        # GPU actors decode in their CPUs' threads; CPU actors' CPUs are the model's threads
        decoders = plan.num_cpus if plan.num_gpus else 1
        handle = remote.remote(options, self.factory, plan.threads, plan.batch_size, self.config.max_pixels,
                               self.config.fast_decode, decoders, tile_of(self.config))
        return _Slot(handle, handle.ready.remote())

    # -- the engine ------------------------------------------------------------------------------

    def results(self, todo: list[ImageRef], stages: Stages, stopping: Callable[[], bool]
                ) -> Iterator[tuple[int, Union[ImageResult, Failure]]]:
        with _stdout_to_stderr(), self._connected():
            yield from self._results(todo, stages, stopping)

    def _results(self, todo, stages, stopping):
        run = _Schedule(self, todo, stages)
        try:
            while run.pending():
                if stopping():
                    return
                if not run.live() and not any(s.queue for s in run.slots):
                    yield from run.give_up()  # every actor and every replacement died
                    return
                run.feed()
                for ref in run.wait():
                    yield from run.collect(ref)
                run.check_timeouts()
                run.check_actors_running()
        finally:
            run.close()


class _Schedule:
    """One run of RayEngine.results: the chunks to do, the actor slots and what is in flight.

    fresh: chunks never sent, in input order; retry: chunks to send again first; owner: each
    in-flight chunk's ObjectRef -> its slot. The driver loop (RayEngine._results) feeds ready
    actors, waits for a result, an actor start or a timeout, and repeats.
    """

    def __init__(self, engine: "RayEngine", todo: list[ImageRef], stages: Stages):
        import ray
        from ray import exceptions
        self.ray, self.engine, self.todo, self.stages = ray, engine, todo, stages
        self.RayError, self.RayActorError = exceptions.RayError, exceptions.RayActorError
        # newer Rays tell an actor's death apart from its task's failure
        self.ActorDiedError = getattr(exceptions, "ActorDiedError", exceptions.RayActorError)
        self.plan = engine.plan_used = engine.plan()
        self.timeout = engine.config.ray_timeout
        size = 2 * self.plan.batch_size
        self.fresh = deque(_Chunk([(s, todo[s]) for s in range(i, min(i + size, len(todo)))])
                           for i in range(0, len(todo), size))
        self.retry: "deque[_Chunk]" = deque()
        self.slots = [engine._new_actor(self.plan) for _ in range(self.plan.actors)]
        self.spare = RESTARTS * self.plan.actors  # replacements for actors that died for good
        self.window = 2 * IN_FLIGHT * self.plan.actors * size  # bounds what waits for input order
        self.no_actor_since: Optional[float] = time.monotonic()  # while no live actor has started
        self.any_ready = False
        self.owner: dict = {}

    def pending(self) -> bool:
        return bool(self.fresh or self.retry or any(s.queue for s in self.slots))

    def live(self) -> list:
        return [s for s in self.slots if not s.dead]

    def give_up(self) -> Iterator[tuple[int, Failure]]:
        reason = "no Ray actor left (they kept dying; see the Ray logs)"
        for c in list(self.retry) + list(self.fresh):
            for seq, ref in c.items:
                yield seq, Failure(ref, "engine", reason)

    def _lowest_pending(self) -> int:
        firsts = [c.items[0][0] for s in self.slots for _, c in s.queue] + [c.items[0][0] for c in self.retry]
        if self.fresh:
            firsts.append(self.fresh[0].items[0][0])
        return min(firsts, default=len(self.todo))

    def _submit(self, slot: _Slot, chunk: _Chunk) -> None:
        ref = slot.handle.process.remote(chunk.items)
        if not slot.queue:
            slot.head_since = time.monotonic()
        slot.queue.append((ref, chunk))
        self.owner[ref] = slot

    def feed(self) -> None:
        """Ready actors, least loaded first, get chunks in input order, within the reorder window."""
        for slot in sorted((s for s in self.live() if s.ready), key=lambda s: len(s.queue)):
            while len(slot.queue) < IN_FLIGHT and (self.retry or self.fresh):
                if not self.retry and self.fresh[0].items[0][0] >= self._lowest_pending() + self.window:
                    break
                self._submit(slot, self.retry.popleft() if self.retry else self.fresh.popleft())

    def wait(self) -> list:
        """Wait for a chunk, an actor start, a timeout or POLL_S; returns what finished."""
        now = time.monotonic()
        live = self.live()
        deadlines = [s.head_since + self.timeout for s in live if s.queue]
        wait_s = max(0.0, min([POLL_S, *[d - now for d in deadlines]]))
        # a retired actor's chunks too: they fail (ActorDiedError) and go through _failed()
        refs = [r for s in self.slots for r, _ in s.queue] + [s.ready_ref for s in live if not s.ready]
        t0 = time.perf_counter()
        done, _ = self.ray.wait(refs, num_returns=1, timeout=wait_s) if refs else ([], [])
        if not refs:
            time.sleep(wait_s)
        self.stages.idle += time.perf_counter() - t0
        return done

    def collect(self, ref) -> Iterator[tuple[int, Union[ImageResult, Failure]]]:
        slot = self.owner.pop(ref, None)
        if slot is None:
            self._started(ref)
            return
        i = next(k for k, (r, _) in enumerate(slot.queue) if r == ref)
        chunk = slot.queue[i][1]
        error = None
        try:
            out, seconds = self.ray.get(ref)
        except self.RayError as e:
            error = e
            if isinstance(e, self.ActorDiedError):
                self._retire(slot, _one_line(e))  # notes the chunk it was running (the queue's head)
        del slot.queue[i]
        if i == 0:
            slot.head_since = time.monotonic()
        if error is not None:
            yield from self._chunk_failed(slot, chunk, error)
            return
        for k, v in seconds.items():
            setattr(self.stages, k, getattr(self.stages, k) + v)
        yield from out

    def _started(self, ref) -> None:
        """An actor's ready() came back: it loaded its model, or it could not."""
        slot = next(s for s in self.live() if s.ready_ref == ref)
        try:
            self.ray.get(ref)
            slot.ready = self.any_ready = True
        except self.RayError as e:
            if getattr(e, "actor_init_failed", False) and not self.any_ready:
                raise EngineError(f"the Ray actors cannot load the model: {_one_line(e)}") from None
            self._retire(slot, _one_line(e))

    def _chunk_failed(self, slot: _Slot, chunk: _Chunk, error) -> Iterator[tuple[int, Failure]]:
        reason = _one_line(error)
        if not isinstance(error, self.RayActorError):
            log.warning("ray: chunk failed: %s", reason)
        if slot.dead and chunk is not slot.culprit:
            self.retry.appendleft(chunk)  # only queued behind the one that killed the actor
            return
        if chunk.timeouts >= 2:
            reason = f"ran over --ray-timeout {self.timeout:g}s twice (its actor was killed)"
        yield from self._failed(chunk, reason)

    def _failed(self, chunk: _Chunk, reason: str) -> list:
        """After Ray's retries: once more, image by image; then each image is a failure."""
        if not chunk.retried:
            self.retry.extendleft(reversed([_Chunk([item], retried=True) for item in chunk.items]))
            log.warning("ray: a chunk of %d images failed (%s); retrying them one by one",
                        len(chunk.items), reason)
            return []
        return [(seq, Failure(ref, "engine", reason)) for seq, ref in chunk.items]

    def _retire(self, slot: _Slot, reason: str) -> None:
        if slot.dead:
            return
        slot.dead = True
        slot.culprit = slot.queue[0][1] if slot.queue else None
        with contextlib.suppress(Exception):
            self.ray.kill(slot.handle, no_restart=True)
        replaced = self.spare > 0
        if replaced:
            self.spare -= 1
            self.slots.append(self.engine._new_actor(self.plan))
        log.warning("ray: an actor died (%s)%s", reason, "; starting another" if replaced else "")

    def check_timeouts(self) -> None:
        """A chunk over --ray-timeout restarts its actor (Ray retries the chunk); the second time,
        the actor is killed for good and its chunks come back as ActorDiedError."""
        now = time.monotonic()
        for slot in [s for s in self.slots if not s.dead and s.queue and now - s.head_since > self.timeout]:
            chunk = slot.queue[0][1]
            chunk.timeouts += 1
            log.warning("ray: a chunk of %d images ran over --ray-timeout %gs (%s...); %s",
                        len(chunk.items), self.timeout, chunk.items[0][1].path,
                        "restarting its actor" if chunk.timeouts == 1 else "killing its actor")
            if chunk.timeouts == 1:
                with contextlib.suppress(Exception):
                    self.ray.kill(slot.handle, no_restart=False)
                slot.head_since = now
            else:
                self._retire(slot, f"killed: ran over --ray-timeout {self.timeout:g}s twice")

    def check_actors_running(self) -> None:
        """No actor running (none placed yet, or all died and their replacements wait) for longer
        than --ray-timeout: the cluster cannot run this, EngineError."""
        now = time.monotonic()
        if any(s.ready and not s.dead for s in self.slots):
            self.no_actor_since = None
        elif self.no_actor_since is None:
            self.no_actor_since = now
        elif now - self.no_actor_since > self.timeout:
            raise EngineError(f"no Ray actor running for --ray-timeout {self.timeout:g}s (each needs "
                              f"{self.plan.num_cpus} CPU and {self.plan.num_gpus} GPU; cluster: "
                              f"{self.ray.cluster_resources()})")

    def close(self) -> None:
        for s in self.slots:  # stops the work in flight too (stopping(), errors)
            with contextlib.suppress(Exception):
                self.ray.kill(s.handle, no_restart=True)
