"""Who builds the start-up cache, and when: nothing outlives the command unless a person is there.

A model's start-up cache entry (a compiled package, compiled.py, or a trace, traced.py) is built:

- by ``m2f cache build`` (the way to prepare a machine, a container image or a cluster node);
- inside a run long enough to pay for it: the trace in runs of TRACE_INLINE_MIN_IMAGES+ images, the
  compiled package in ``--compile`` runs (auto for 1000+ images: options.resolve_compile);
- by one detached builder, only when ``m2f segment`` runs at a terminal (stderr is a TTY) and
  M2F_BACKGROUND_BUILD is not "off": ``spawn`` below. Never by the library (``Segmenter``, ``run``),
  never by a run in cron, CI, Slurm or a container: those end with one line naming the command
  (``hint``) and build nothing.

The detached builder (``spawn``) is started with the build lock already taken by the run (the
lock's open file is handed to it), so two runs starting together start one builder. It lowers its
priority (nice 19, and SCHED_IDLE on Linux: the kernel runs it only on otherwise idle cores) before
it imports anything heavy, waits for the run that started it to exit (the end of a pipe that only
that run holds: no PID that could be reused), then runs the build as a child (``cache build
--lock-fd``) which it stops (SIGSTOP) while another m2f process uses the start-up cache. Its output
goes to ``<cache>/traced/.partial/<entry>.log``.

Every start is counted in ``<entry>.started`` and the count is removed when the build ends (built, or
failed with an error: compiled.failed_marker). A builder killed before that (a job's cgroup torn
down, kill -9, a reboot) leaves its count: after KILLED_LIMIT such kills no builder is started for
that entry until ``m2f cache clear``, and an interactive run says why in one line.

Torch-free: the builder imports this before it has lowered its priority.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from m2f_cli.model.startup import cache

log = logging.getLogger(__name__)

ENV = "M2F_BACKGROUND_BUILD"  # "off": no detached builder, even at a terminal
KILLED_LIMIT = 2
# What a compiled package gains, measured (benchmarks/README.md): later runs of 16 COCO-like 640x480
# photos, images/s of the compiled package against a first run (transformers, no trace) and a run
# on the trace, by CPU kind. None: not measured on that kind yet.
MEASURED_GAIN = {
    "avx512_bf16": "~1.8x a first run's speed, ~1.35x the trace's (2-core AVX512-BF16 EPYC: "
                   "0.75 and 0.99 -> 1.33 images/s)",
    "avx2": None,
}
_WRITE_ENDS: list[int] = []  # pipes whose far end a builder waits on: closed when this process exits


@dataclass(frozen=True)
class Plan:
    """What a detached build of a model would make: kind "compiled" or "trace", at path."""

    kind: str
    path: Path
    model: str  # the model folder
    size: tuple[int, int]
    dtype: str  # "float32" / "bfloat16"
    name: str = ""  # what the user named it (a hub id or a folder)

    def command(self, *extra: str) -> list[str]:
        """The ``m2f cache build`` command line that builds it."""
        args = ["--model", self.model, "--dtype", self.dtype]
        if self.kind == "trace":
            args += ["--trace", "--size", f"{self.size[0]}x{self.size[1]}"]
        return [sys.executable, "-m", "m2f_cli", "cache", "build", *args, *extra]

    def user_command(self) -> str:
        extra = " --trace" if self.kind == "trace" else "" if self.dtype == "float32" else f" --dtype {self.dtype}"
        return f"m2f cache build --model {self.name or self.model}{extra}"


STARTUP_ENV = "M2F_STARTUP_CACHE"
STARTUP_MODES = ("auto", "trace", "off")


def startup_mode(value: Optional[str] = None) -> str:
    """The start-up cache switch (--startup-cache, Segmenter(startup_cache=...)): value, else
    M2F_STARTUP_CACHE, else "auto". auto: the compiled package where one can be had, else the
    trace; trace: the trace only; off: neither read nor written. ValueError for anything else."""
    mode = (value or os.environ.get(STARTUP_ENV) or "auto").strip().lower()
    if mode not in STARTUP_MODES:
        raise ValueError(f"--startup-cache {mode!r}: expected one of {', '.join(STARTUP_MODES)}")
    return mode


def enabled() -> bool:
    return os.environ.get(ENV, "auto").strip().lower() != "off"


def started_marker(path: Path) -> Path:
    """<entry>.started: how many detached builds of this entry started and did not end."""
    return path.with_name(path.name + ".started")


def killed_count(path: Path) -> int:
    """Detached builds of path that started and never ended (killed), while nobody builds it now
    (the caller holds its build lock)."""
    try:
        return int(started_marker(path).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def partial_dir() -> Path:
    """Where builds write before the rename into the cache: never listed, capped, evicted or
    cleared while their build runs (cache.entries globs the cache folder itself only)."""
    return cache.traces_dir() / cache.PARTIAL


def cpu_kind_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "avx512_bf16" if "avx512_bf16" in flags else "avx2" if "avx2" in flags else "other"


def hint(plan: Plan) -> str:
    """The one line a run that found no compiled package (or trace) ends with."""
    if plan.kind == "trace":
        return (f"once, `{plan.user_command()}` saves this model's start-up trace (seconds); later runs' "
                f"forward is ~1.15x faster")
    gain = MEASURED_GAIN.get(cpu_kind_name())
    speed = f"later runs: {gain}" if gain else "the gain is not measured on this kind of CPU yet (benchmarks/run.py)"
    return f"once, `{plan.user_command()}` compiles this model for this CPU (~2 min on 2 cores); {speed}"


def take_lock(path: Path) -> Optional[int]:
    """The build lock of path taken without waiting: its fd, or None (held by another process,
    or no lock can be made there)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def spawn(plan: Plan, announce: Callable[[str], None]) -> bool:
    """Start the one detached builder of plan.path (see the module docstring), unless another
    process builds it now or KILLED_LIMIT builders of it were killed. announce gets one line either
    way a person should know of. Returns whether a builder was started."""
    lock = take_lock(plan.path)
    if lock is None:
        return False
    try:
        killed = killed_count(plan.path)
        if killed >= KILLED_LIMIT:
            announce(f"not building the start-up cache in the background: its last {killed} builds were "
                     f"killed before they finished; `m2f cache clear` allows it again, or run "
                     f"`{plan.user_command()}` yourself")
            return False
        read_end, write_end = os.pipe()
        try:
            log_path = partial_dir() / f"{plan.path.name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as out:
                subprocess.Popen(plan.command("--background", "--entry", str(plan.path), "--lock-fd", str(lock),
                                              "--wait-fd", str(read_end)),
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(lock, read_end),
                                 start_new_session=True, close_fds=True)
        except OSError as e:
            os.close(write_end)
            log.debug("background build not started (%s)", e)
            return False
        finally:
            os.close(read_end)
        _WRITE_ENDS.append(write_end)  # held until this process exits: then the builder starts
        started_marker(plan.path).write_text(f"{killed + 1}\n", encoding="utf-8")
    finally:
        os.close(lock)  # the builder holds it now (same open file)
    announce(f"building the start-up cache in the background once this run has ended ({plan.kind}, at "
             f"the lowest priority; {ENV}=off turns this off): {plan.path}")
    return True


def lower_priority() -> None:
    """nice 19, and on Linux SCHED_IDLE (inherited by the compiler processes it starts)."""
    try:
        os.nice(19)
    except OSError:
        pass
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass


def wait_for_eof(fd: int) -> None:
    """Block until every holder of the pipe's write end has exited (the run that started us)."""
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def run_detached(path: Path, child: list[str], lock_fd: int, wait_fd: int) -> int:
    """The detached builder's body (``m2f cache build --background``): priority first, then wait
    for the run that started it, then child (the build, ``cache build --entry path --lock-fd``:
    it adopts the lock) in its own process group, stopped while other m2f runs use the cache. Its
    exit status; the started count of path is removed unless the build was killed."""
    lower_priority()
    wait_for_eof(wait_fd)
    rc = run_yielding(child, lambda: cache.others_in_use(path), pass_fds=(lock_fd,))
    if rc >= 0:  # it ended (built, or failed with its error recorded): not a kill
        started_marker(path).unlink(missing_ok=True)
    return rc


def _dies_with(parent: int) -> Callable[[], None]:
    """A preexec_fn: the build child is killed with its builder, even when stopped (prctl
    PR_SET_PDEATHSIG), also when the builder died between the fork and the prctl."""
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:  # pragma: no cover - runs in the child between fork and exec
        prctl(1, signal.SIGKILL)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
    return arm


def run_yielding(cmd: list[str], busy: Callable[[], bool], poll_s: float = 1.0, pass_fds: tuple = ()) -> int:
    """Run cmd (a build) in its own process group, stopped (SIGSTOP to the group: the compiler's
    children too) while busy() and continued when not. Linux only (the child dies with this
    process, stopped or not, so a killed builder never leaves a stopped one holding the build
    lock); elsewhere cmd simply runs. Returns its exit status (negative: killed by that signal)."""
    linux = sys.platform.startswith("linux")
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=pass_fds,
                             preexec_fn=_dies_with(os.getpid()) if linux else None)
    stopped = False
    try:
        while child.poll() is None:
            if linux:
                want = busy()
                if want != stopped:
                    os.killpg(child.pid, signal.SIGSTOP if want else signal.SIGCONT)
                    stopped = want
            time.sleep(poll_s)
        return child.returncode
    finally:
        if child.poll() is None:
            try:
                os.killpg(child.pid, signal.SIGCONT)
                os.killpg(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
