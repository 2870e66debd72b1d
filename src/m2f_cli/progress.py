"""Progress at the edge: a Reporter protocol with a rich bar (terminals), plain periodic lines
(cron, pipes: no ANSI codes) and a quiet one (errors only). Everything goes to stderr."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import IO, Optional, Protocol

from m2f_cli.errors import ExitCode
from m2f_cli.records import Failure


@dataclass
class Summary:
    """What a run did. images: written this run; skipped: already complete; failed: inputs that
    failed; instances: instances written (at the map threshold); interrupted: the signal number
    that stopped the run, if any; stdout_closed: the reader of --out - went away."""

    total: int = 0
    images: int = 0
    skipped: int = 0
    failed: int = 0
    instances: int = 0
    wall_s: float = 0.0
    interrupted: Optional[int] = None
    stopped_early: bool = False
    stdout_closed: bool = False

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        s = (f"{self.images} images, {self.instances} instances, {self.failed} failed, "
             f"{self.skipped} skipped (already done), {self.wall_s:.1f} s, {self.images_per_s:.2f} images/s")
        if self.interrupted:
            s += " (interrupted)"
        elif self.stdout_closed:
            s += " (stopped: stdout was closed)"
        elif self.stopped_early:
            s += " (stopped: --max-failures reached)"
        return s


class Reporter(Protocol):
    def start(self, total: int, skipped: int) -> None: ...
    def advance(self, images: int, instances: int) -> None: ...
    def failure(self, failure: Failure) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self, summary: Summary) -> None: ...


class QuietReporter:
    """Only failures and errors, one line each."""

    def __init__(self, stream: Optional[IO[str]] = None):
        self.stream = stream or sys.stderr

    def start(self, total: int, skipped: int) -> None:
        pass

    def advance(self, images: int, instances: int) -> None:
        pass

    def failure(self, failure: Failure) -> None:
        print(f"m2f: error: {failure.line()}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        pass

    def finish(self, summary: Summary) -> None:
        pass


class PlainReporter(QuietReporter):
    """For logs: a progress line every `every` seconds and a summary line; never ANSI codes."""

    def __init__(self, stream: Optional[IO[str]] = None, every: float = 5.0):
        super().__init__(stream)
        self.every = every
        self.total = self.done = self.failed = 0
        self.t0 = self.last = time.monotonic()

    def start(self, total: int, skipped: int) -> None:
        self.total = total
        self.t0 = self.last = time.monotonic()
        self.message(f"{total} images to do" + (f", {skipped} skipped (already done)" if skipped else ""))

    def advance(self, images: int, instances: int) -> None:
        self.done += images
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done - self.failed) / rate if rate > 0 else float("inf")
            self.message(f"progress: {self.done + self.failed}/{self.total} images, {rate:.2f} images/s, "
                         f"{self.failed} failed, ETA {eta:.0f} s")

    def failure(self, failure: Failure) -> None:
        self.failed += 1
        super().failure(failure)

    def message(self, text: str) -> None:
        print(f"m2f: {text}", file=self.stream, flush=True)

    def finish(self, summary: Summary) -> None:
        self.message(f"done: {summary.line()}")
        if getattr(summary, "hint", None):
            self.message(summary.hint)


class RichReporter(PlainReporter):
    """A rich progress bar with images/s, ETA and failures, for terminals."""

    def __init__(self, stream: Optional[IO[str]] = None):
        super().__init__(stream)
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        self.console = Console(file=self.stream, stderr=self.stream is sys.stderr)
        self.progress = Progress(
            TextColumn("[bold]segment"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.2f} img/s"), TextColumn("[red]{task.fields[failed]} failed"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
            transient=False)
        self.task = None

    def start(self, total: int, skipped: int) -> None:
        self.total = total
        self.t0 = time.monotonic()
        if skipped:
            self.console.print(f"m2f: {skipped} images skipped (already done)")
        self.progress.start()
        # images advanced (or failed) before start (a caller's early events) count from the start
        self.task = self.progress.add_task("segment", total=total, rate=0.0, failed=self.failed,
                                           completed=self.done + self.failed)

    def advance(self, images: int, instances: int) -> None:
        self.done += images
        if self.task is None:  # not started yet: counted, shown once start() makes the bar
            return
        rate = self.done / max(time.monotonic() - self.t0, 1e-9)
        self.progress.update(self.task, advance=images, rate=rate)

    def failure(self, failure: Failure) -> None:
        self.failed += 1
        if self.task is not None:
            self.progress.update(self.task, advance=1, failed=self.failed)
        from rich.text import Text
        # the path is data, not markup: a file named "[bold].jpg" must print as it is
        self.console.print(Text.assemble(("m2f: error: ", "red"), failure.line()), highlight=False)

    def message(self, text: str) -> None:
        self.console.print(f"m2f: {text}", markup=False, highlight=False)

    def finish(self, summary: Summary) -> None:
        if self.task is not None:
            self.progress.stop()
        super().finish(summary)


def make_reporter(quiet: bool = False, stream: Optional[IO[str]] = None) -> Reporter:
    stream = stream or sys.stderr
    if quiet:
        return QuietReporter(stream)
    if stream.isatty():
        return RichReporter(stream)
    return PlainReporter(stream)


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
    """not_images: files met in the input folders that are not images, counted by extension.
    hint: the one-time command that would make later runs faster (builds.hint), or None."""

    stages: Stages = field(default_factory=Stages)
    failures: list = field(default_factory=list)
    not_images: dict = field(default_factory=dict)
    hint: Optional[str] = None

    def as_dict(self) -> dict:
        return {"total": self.total, "images": self.images, "skipped": self.skipped, "failed": self.failed,
                "instances": self.instances, "wall_s": round(self.wall_s, 4),
                "images_per_s": round(self.images_per_s, 4), "interrupted": self.interrupted,
                "stopped_early": self.stopped_early, "stdout_closed": self.stdout_closed,
                "not_images": self.not_images, "exit_code": self.exit_code, "hint": self.hint,
                "stages": {k: round(v, 4) for k, v in self.stages.as_dict().items()}}

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + self.interrupted
        if self.stdout_closed:
            return int(ExitCode.STDOUT_CLOSED)
        return int(ExitCode.INPUTS_FAILED if self.failed else ExitCode.OK)
