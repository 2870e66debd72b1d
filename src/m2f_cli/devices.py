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


from .config import RunConfig
from .progress import Reporter, Summary
from .records import Failure, ImageRef
from .errors import WorkerError  # noqa: F401  (defined there; raised and re-exported here)


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


def _child(config: RunConfig, q, worker: int) -> None:
    from .pipeline import run
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


def run_devices(config: RunConfig, devices: list[str], reporter: Reporter):
    """Run config over devices, one process each on shard i of len(devices), then merge."""
    from .merge import merge
    from .pipeline import RunSummary, validate
    validate(config)
    if config.shard is not None:
        raise ValueError("--devices and --shard do not combine: run one --shard per machine, "
                         "each with its own --devices")
    if config.out == "-":
        raise ValueError("--devices needs an output folder (--out DIR)")
    n = len(devices)
    threads = config.threads or (max(1, (os.cpu_count() or 1) // n) if devices[0] == "cpu" else None)
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    q = ctx.Queue()
    procs = []
    t0 = time.perf_counter()
    for i, dev in enumerate(devices):
        cfg = dataclasses.replace(config, device=dev, shard=(i, n), threads=threads)
        p = ctx.Process(target=_child, args=(cfg, q, i), name=f"m2f-device-{i}")
        p.start()
        procs.append(p)

    stop = {"sig": None}

    def forward_signal(signum, frame):
        stop["sig"] = stop["sig"] or signum
        for p in procs:
            if p.is_alive() and p.pid:
                try:
                    os.kill(p.pid, signum)
                except OSError:
                    pass

    old = {s: signal.signal(s, forward_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    summary = RunSummary()
    started, finished = {}, {}
    errors: list[str] = []
    try:
        while len(finished) < n:
            try:
                msg = q.get(timeout=0.5)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in finished]
                for i in dead:
                    if q.empty():
                        finished[i] = None
                        errors.append(f"device worker {i} ({devices[i]}) died with exit code {procs[i].exitcode}")
                continue
            kind, worker = msg[0], msg[1]
            if kind == "start":
                started[worker] = msg[2:]
                if len(started) == n:
                    reporter.start(sum(t for t, _ in started.values()), sum(s for _, s in started.values()))
            elif kind == "advance":
                reporter.advance(msg[2], msg[3])
            elif kind == "failure":
                f = Failure(ImageRef(msg[2], os.path.basename(msg[2]), msg[2], -1), msg[3], msg[4])
                summary.failures.append(f)
                reporter.failure(f)
            elif kind == "message":
                reporter.message(msg[2])
            elif kind == "done":
                finished[worker] = msg[2]
            elif kind == "error":
                finished[worker] = None
                errors.append(f"device worker {worker} ({devices[worker]}): {msg[3]}")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:
            p.join()
    for d in finished.values():
        if d:
            summary.total += d["total"]
            summary.images += d["images"]
            summary.skipped += d["skipped"]
            summary.failed += d["failed"]
            summary.instances += d["instances"]
            for k, v in d["stages"].items():
                setattr(summary.stages, k, getattr(summary.stages, k) + v)
    summary.interrupted = stop["sig"]
    merge(config.out)  # the combined files; missing parts show in the summary of each worker
    summary.wall_s = time.perf_counter() - t0
    reporter.finish(summary)
    if errors:
        raise WorkerError("; ".join(errors))
    return summary
