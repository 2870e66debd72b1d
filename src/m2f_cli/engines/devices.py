"""Several devices on one machine: one worker process per device over disjoint shards, one
combined progress display and summary, and the shards' part files merged at the end.

``m2f segment ... --devices 0,1`` (CUDA indices), ``--devices all`` (every visible GPU), or device
names (``cuda:0,cuda:1``; ``cpu,cpu`` runs two CPU workers, which is how the tests drive it).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import signal
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from m2f_cli.config import RunConfig
from m2f_cli.errors import ExitCode, WorkerError
from m2f_cli.progress import Reporter, Summary
from m2f_cli.records import Failure, ImageRef


def parse_devices(spec: str) -> list[str]:
    """"0,1" -> ["cuda:0", "cuda:1"]; "all" -> every visible CUDA device; names pass through."""
    s = spec.strip().lower()
    if s == "all":
        import torch
        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError("--devices all: no CUDA device is visible")
        return [f"cuda:{i}" for i in range(n)]
    out = []
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        out.append(f"cuda:{part}" if part.isdigit() else part)
    if not out:
        raise ValueError(f"--devices {spec!r}: expected a list such as 0,1 or all")
    return out


class _QueueReporter:
    """A child's reporter: forwards events to the parent process."""

    def __init__(self, q, worker: int):
        self.q, self.worker = q, worker

    def start(self, total: int, skipped: int) -> None:
        self.q.put(("start", self.worker, total, skipped))

    def advance(self, images: int, instances: int) -> None:
        self.q.put(("advance", self.worker, images, instances))

    def failure(self, failure: Failure) -> None:
        self.q.put(("failure", self.worker, failure.ref.path, failure.stage, failure.error))

    def message(self, text: str) -> None:
        self.q.put(("message", self.worker, text))

    def finish(self, summary: Summary) -> None:
        pass


def child_device(device: str, visible: Optional[str]) -> tuple[dict[str, str], str]:
    """(environment for the worker, device name inside it) for one entry of --devices.

    A CUDA worker sees only its own card: CUDA_VISIBLE_DEVICES is set in its environment before it
    starts (so before torch initialises CUDA there), and it runs on cuda:0. `visible` is this
    process's CUDA_VISIBLE_DEVICES: index i means its i-th entry, as torch numbers them here.
    Other devices (cpu, mps) pass through with nothing changed."""
    if not device.startswith("cuda"):
        return {}, device
    idx = int(device.split(":", 1)[1]) if ":" in device else 0
    entries = [v.strip() for v in visible.split(",")] if visible else None
    physical = entries[idx] if entries is not None and idx < len(entries) else str(idx)
    return {"CUDA_VISIBLE_DEVICES": physical}, "cuda:0"


def _child(config: RunConfig, q, worker: int) -> None:
    # Our own process group: a Ctrl-C at the terminal reaches the parent only, which sends each
    # worker exactly one signal (their pipeline.run stops after the batch in flight and finalises the
    # shard); a second one from the parent makes them exit at once. Until here SIGINT is ignored,
    # inherited from the parent while it started us.
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    from m2f_cli.model.runtime import tune_process
    tune_process()  # spawned: the parent's settings are not inherited
    if config.device.startswith("cuda"):
        import torch
        torch.cuda.set_device(0)  # the only card CUDA_VISIBLE_DEVICES leaves us
    from m2f_cli.pipeline import run
    try:
        summary = run(config, _QueueReporter(q, worker))
        q.put(("done", worker, summary.as_dict()))
    except Exception as e:  # reported by the parent as this worker's error line
        q.put(("error", worker, type(e).__name__, str(e.args[-1] if isinstance(e, OSError) and e.args else e)))
    # Everything is written and reported: leave without the interpreter's teardown of torch and the
    # model (~2 s, as in cli.main), once the queue has handed our last message to the parent.
    q.close()
    q.join_thread()
    os._exit(0)


# A worker's error type -> the exit code the CLI gives it (config.ExitCode); anything else is fatal.
_ERROR_CODES = {"UsageError": ExitCode.USAGE, "NoImagesError": ExitCode.NO_IMAGES,
                "OutputLockedError": ExitCode.LOCKED}


def _worker_failure(errors: list[tuple[int, str, str]], devices: list[str], every: bool) -> WorkerError:
    """errors: (worker, error type, message). When every worker failed the same way (the model does not
    load, a bad option), one line and that error's exit code; otherwise each worker's line, exit 1."""
    if every and len({(t, m) for _, t, m in errors}) == 1:
        _, kind, message = errors[0]
        return WorkerError(f"every device worker: {message}", _ERROR_CODES.get(kind, ExitCode.FATAL))
    lines = "; ".join(f"device worker {w} ({devices[w]}): {m}" for w, _, m in errors)
    return WorkerError(lines, ExitCode.FATAL)


@contextmanager
def _child_env(env: dict[str, str]) -> Iterator[None]:
    """os.environ with env applied while a child is spawned (it copies the environment then)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_devices(config: RunConfig, devices: list[str], reporter: Reporter):
    """Run config over devices, one process each on shard i of len(devices), then merge.

    Signals: workers run in their own process groups, so a terminal's Ctrl-C reaches this process only;
    the first SIGINT/SIGTERM is sent on once to every worker (each finishes its batch in flight and
    finalises its shard files, then the shards are merged); a second one is sent on too and this process
    exits at once (128 + signal). Raises WorkerError (with its exit code) when workers fail.
    """
    from m2f_cli.errors import MergeError
    from m2f_cli.tools.merge import merge
    _check(config)
    t0 = time.perf_counter()
    workers = _Workers(config, devices, reporter)
    workers.start()
    try:
        workers.collect()
    finally:
        workers.join()
    if workers.errors and len(workers.errors) == len(devices):
        raise _worker_failure(workers.errors, devices, every=True)
    summary = workers.summary()
    try:
        merge(config.out)  # the combined files; missing parts show in the summary of each worker
    except MergeError:
        if not summary.interrupted:
            raise
    summary.wall_s = time.perf_counter() - t0
    reporter.finish(summary)
    if workers.errors:
        raise _worker_failure(workers.errors, devices, every=False)
    return summary


def _check(config: RunConfig) -> None:
    from m2f_cli.choices import validate
    validate(config)
    if config.shard is not None:
        raise ValueError("--devices and --shard do not combine: run one --shard per machine, "
                         "each with its own --devices")
    if config.out == "-":
        raise ValueError("--devices needs an output folder (--out DIR)")


class _Workers:
    """The worker processes of one --devices run, their messages and the signals sent on to them.

    started: worker -> (total, skipped) once it said so; finished: worker -> its summary dict (None
    when it failed); early: progress events held until every worker has started (the bar needs the
    total); errors: (worker, error type, message).
    """

    def __init__(self, config: RunConfig, devices: list[str], reporter: Reporter):
        from m2f_cli.progress import RunSummary
        self.config, self.devices, self.reporter = config, devices, reporter
        self.n = len(devices)
        self.ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
        self.q = self.ctx.Queue()
        self.procs: list = []
        self.sig: Optional[int] = None
        self.started: dict = {}
        self.finished: dict = {}
        self.early: list[tuple] = []
        self.errors: list[tuple[int, str, str]] = []
        self.waiting = True  # for every worker to start
        self.failures = RunSummary().failures
        self.old: dict = {}

    def _shares(self) -> tuple[Optional[int], Optional[int]]:
        """(torch threads, decode workers) of each worker: its share of the cores."""
        cores = os.cpu_count() or 1
        threads = self.config.threads or (max(1, cores // self.n) if self.devices[0] == "cpu" else None)
        workers = self.config.workers
        if workers is None and any(d.startswith("cuda") for d in self.devices):
            workers = min(16, max(1, cores // self.n - 1))  # one core left for each worker's main thread
        return threads, workers

    def start(self) -> None:
        threads, workers = self._shares()
        self.old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        # the children inherit an ignored SIGINT until they are in their own process group (_child)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for i, dev in enumerate(self.devices):
                env, inside = child_device(dev, visible)
                cfg = dataclasses.replace(self.config, device=inside, shard=(i, self.n), threads=threads,
                                          workers=workers)
                p = self.ctx.Process(target=_child, args=(cfg, self.q, i), name=f"m2f-device-{i}")
                with _child_env(env):
                    p.start()
                self.procs.append(p)
        finally:
            for s in self.old:
                signal.signal(s, self._on_signal)

    def _send(self, signum: int) -> None:
        for p in self.procs:
            if p.is_alive() and p.pid:
                try:
                    os.kill(p.pid, signum)
                except OSError:
                    pass

    def _on_signal(self, signum, frame) -> None:
        if self.sig is not None:  # the second: the workers exit at once, and so do we
            self._send(signum)
            os._exit(128 + signum)
        self.sig = signum
        self._send(signum)

    def collect(self) -> None:
        """Take the workers' messages until every worker has finished or died."""
        while len(self.finished) < self.n:
            try:
                msg = self.q.get(timeout=0.5)
            except queue.Empty:
                for i, p in enumerate(self.procs):
                    if not p.is_alive() and i not in self.finished and self.q.empty():
                        self.finished[i] = None
                        self.errors.append((i, "died", f"died with exit code {p.exitcode}"))
            else:
                self._handle(msg)
            self._begin_when_all_known()

    def _handle(self, msg: tuple) -> None:
        kind, worker = msg[0], msg[1]
        if kind == "start":
            self.started[worker] = msg[2:]
        elif kind in ("advance", "failure"):
            if self.waiting:
                self.early.append(msg)  # the bar starts when every worker has said how much it has
            else:
                self._report(msg)
        elif kind == "message":
            self.reporter.message(msg[2])
        elif kind == "done":
            self.finished[worker] = msg[2]
        elif kind == "error":
            self.finished[worker] = None
            self.errors.append((worker, msg[2], msg[3]))

    def _report(self, msg: tuple) -> None:
        if msg[0] == "advance":
            self.reporter.advance(msg[2], msg[3])
        else:
            f = Failure(ImageRef(msg[2], os.path.basename(msg[2]), msg[2], -1), msg[3], msg[4])
            self.failures.append(f)
            self.reporter.failure(f)

    def _begin_when_all_known(self) -> None:
        known = len(self.started) + len([w for w in self.finished if w not in self.started])
        if not self.waiting or known != self.n:
            return
        self.waiting = False
        if not self.started:
            return  # every worker failed before it started: the error says it all
        self.reporter.start(sum(t for t, _ in self.started.values()), sum(s for _, s in self.started.values()))
        for m in self.early:
            self._report(m)
        self.early.clear()

    def join(self) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)
        for p in self.procs:
            p.join()
        self.q.close()
        self.q.join_thread()

    def summary(self):
        """The workers' summaries added up (RunSummary)."""
        from m2f_cli.progress import RunSummary
        summary = RunSummary(failures=self.failures)
        for d in self.finished.values():
            if d:
                for key in ("total", "images", "skipped", "failed", "instances"):
                    setattr(summary, key, getattr(summary, key) + d[key])
                for k, v in d["stages"].items():
                    setattr(summary.stages, k, getattr(summary.stages, k) + v)
        summary.interrupted = self.sig
        return summary
