"""The writer side of a run: results go to the writers in input order through a bounded background
thread, which never blocks the run for ever, and SIGINT/SIGTERM ask the run to stop cleanly."""

from __future__ import annotations

import heapq
import logging
import os
import queue
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from m2f_cli.errors import OutputError, StdoutClosed, WriterError, one_line
from m2f_cli.progress import Stages
from m2f_cli.records import ImageResult
from m2f_cli.outputs.settings_record import Recorder
from m2f_cli.outputs.writers import Writer

log = logging.getLogger(__name__)


# After the first SIGINT/SIGTERM, how long the writer thread may take to write what is queued
# before the process leaves without it (a writer blocked on a full pipe must not keep it alive).
WRITER_GRACE_S = 10.0


class Interrupt:
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


class WriterThread:
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
            # a run with videos decides each frame's writers as it comes (video_resume.FramePlan)
            plan = self.plan
            for w in (plan.writers_for(r) if hasattr(plan, "writers_for") else plan.get(r.ref.rel, ())):
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


def in_order(items: Iterator[tuple[object, object]], first: int = 0) -> Iterator[object]:
    """Re-emit (seq, item) pairs in seq order; seqs are 0..n-1, each exactly once. A unit of
    several items (a video's frames, engines/video.py) comes as ((seq, j), item) pairs, j = 0, 1, ...
    each once, emitted in j order and closed by an item whose ends_unit is true."""
    heap: list = []
    nxt, sub = first, 0
    for seq, item in items:
        key = seq if isinstance(seq, tuple) else (seq, -1)
        heapq.heappush(heap, (key, id(item), item))
        while heap and heap[0][0][0] == nxt and heap[0][0][1] in (-1, sub):
            (_, j), _, it = heapq.heappop(heap)
            yield it
            if j < 0 or getattr(it, "ends_unit", False):
                nxt, sub = nxt + 1, 0
            else:
                sub += 1
    while heap:
        yield heapq.heappop(heap)[2]
