"""The Ray driver's schedule: the run's work in chunks (a video its own chunks), queued on the
actors' slots, resubmitted after a failure or a timeout, collected in input order's window.
engines/ray.py starts the actors and runs this loop (RayEngine.results)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from m2f_cli.errors import EngineError
from m2f_cli.progress import Stages
from m2f_cli.records import Failure, ImageRef, ImageResult
from m2f_cli.engines.video import VideoJob, VideoMore, chunk_failures

log = logging.getLogger(__name__)

RESTARTS = 3    # Ray restarts a dead actor this many times and retries its chunks as often
IN_FLIGHT = 2   # chunks queued on one actor: it never waits for the driver between chunks
POLL_S = 0.5    # how often the driver looks at stopping() and the timeouts while it waits


def ray_line(e: BaseException) -> str:
    """Ray errors carry tracebacks: keep the line that says what happened (errors.one_line), but
    for an actor whose constructor failed the last one, the exception the constructor raised."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if getattr(e, "actor_init_failed", False) and lines:
        return lines[-1][:300]
    return one_line(e)[:300]
from m2f_cli.errors import one_line

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    items: list[tuple[int, ImageRef]]
    retried: bool = False   # already resubmitted once by us (after Ray's own retries)
    timeouts: int = 0


@dataclass
class Slot:
    """One actor and the chunks queued on it (a sync actor runs them in order: the head runs)."""

    handle: Any
    ready_ref: Any
    ready: bool = False
    dead: bool = False
    queue: "deque[tuple[Any, Chunk]]" = field(default_factory=deque)
    head_since: float = 0.0  # when the head chunk started to count against the timeout
    culprit: Optional[Chunk] = None  # the chunk running when the actor died for good


def chunks_of(todo: list, size: int) -> Iterator[Chunk]:
    """About `size` images per chunk, in order; each video its own chunks of at most `size` frames
    (engines/video.py: a chunk hands back where the next one starts, and that one goes first)."""
    run: list = []
    for s, item in enumerate(todo):
        if isinstance(item, VideoJob):
            if run:
                yield Chunk(run)
                run = []
            yield Chunk([(s, dataclasses.replace(item, limit=size))])
            continue
        run.append((s, item))
        if len(run) >= size:
            yield Chunk(run)
            run = []
    if run:
        yield Chunk(run)


class Schedule:
    """One run of RayEngine.results: the chunks to do, the actor slots and what is in flight.

    fresh: chunks never sent, in input order; retry: chunks to send again first; owner: each
    in-flight chunk's ObjectRef -> its slot. The driver loop (RayEngine._results) feeds ready
    actors, waits for a result, an actor start or a timeout, and repeats.
    """

    def __init__(self, engine, todo: list[ImageRef], stages: Stages):  # engine: a RayEngine
        import ray
        from ray import exceptions
        self.ray, self.engine, self.todo, self.stages = ray, engine, todo, stages
        self.RayError, self.RayActorError = exceptions.RayError, exceptions.RayActorError
        # newer Rays tell an actor's death apart from its task's failure
        self.ActorDiedError = getattr(exceptions, "ActorDiedError", exceptions.RayActorError)
        self.plan = engine.plan_used = engine.plan()
        self.timeout = engine.config.ray_timeout
        size = 2 * self.plan.batch_size
        self.fresh = deque(chunks_of(todo, size))
        self.retry: "deque[Chunk]" = deque()
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

    def _submit(self, slot: Slot, chunk: Chunk) -> None:
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
                self._retire(slot, ray_line(e))  # notes the chunk it was running (the queue's head)
        del slot.queue[i]
        if i == 0:
            slot.head_since = time.monotonic()
        if error is not None:
            yield from self._chunk_failed(slot, chunk, error)
            return
        for k, v in seconds.items():
            setattr(self.stages, k, getattr(self.stages, k) + v)
        for key, item in out:
            if isinstance(item, VideoMore):  # the video goes on from there, before anything new
                self.retry.appendleft(Chunk([(key[0], item.job)]))
            else:
                yield key, item

    def _started(self, ref) -> None:
        """An actor's ready() came back: it loaded its model, or it could not."""
        slot = next(s for s in self.live() if s.ready_ref == ref)
        try:
            self.ray.get(ref)
            slot.ready = self.any_ready = True
        except self.RayError as e:
            if getattr(e, "actor_init_failed", False) and not self.any_ready:
                raise EngineError(f"the Ray actors cannot load the model: {ray_line(e)}") from None
            self._retire(slot, ray_line(e))

    def _chunk_failed(self, slot: Slot, chunk: Chunk, error) -> Iterator[tuple[int, Failure]]:
        reason = ray_line(error)
        if not isinstance(error, self.RayActorError):
            log.warning("ray: chunk failed: %s", reason)
        if slot.dead and chunk is not slot.culprit:
            self.retry.appendleft(chunk)  # only queued behind the one that killed the actor
            return
        if chunk.timeouts >= 2:
            reason = f"ran over --ray-timeout {self.timeout:g}s twice (its actor was killed)"
        yield from self._failed(chunk, reason)

    def _failed(self, chunk: Chunk, reason: str) -> list:
        """After Ray's retries: once more, image by image; then each image is a failure."""
        if isinstance(chunk.items[0][1], VideoJob):
            if chunk.retried:
                return chunk_failures(chunk.items[0][0], chunk.items[0][1], reason)
            self.retry.appendleft(Chunk(chunk.items, retried=True))
            log.warning("ray: a chunk of a video failed (%s); retrying it", reason)
            return []
        if not chunk.retried:
            self.retry.extendleft(reversed([Chunk([item], retried=True) for item in chunk.items]))
            log.warning("ray: a chunk of %d images failed (%s); retrying them one by one",
                        len(chunk.items), reason)
            return []
        return [(seq, Failure(ref, "engine", reason)) for seq, ref in chunk.items]

    def _retire(self, slot: Slot, reason: str) -> None:
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
