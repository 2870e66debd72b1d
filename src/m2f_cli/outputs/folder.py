"""The output folder: what the pipeline, the writers and the tools use of ``--out``, local or remote.

``open_output`` (outputs/open.py) picks one of two implementations of ``OutputFolder``:
- ``LocalOutputFolder`` (outputs/local.py): a flock, atomic renames, fsync, append-only journals;
- ``RemoteOutputFolder`` (outputs/remote.py): whole-object uploads, chunked journals, a lease.
Paths are the implementation's own (OS paths locally, URLs remotely): get them from ``path``,
``join``, ``run_file`` and ``journal_path``, and pass them back to the same folder.

Everything m2f keeps for itself lives in ``<out>/.m2f/`` (``state``): locks, journals, settings
records. Each shard of a run (``shard=(index, count)``) writing into the same folder has its own
lock, temporary area, journals and run-level part files (``part``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Callable, Optional


STATE_DIR = ".m2f"  # our bookkeeping folder inside --out; hidden, so never walked as input


def state_dir(out: str) -> str:
    return os.path.join(out, STATE_DIR)


def part_suffix(shard: Optional[tuple[int, int]]) -> str:
    """The infix of a shard's run-level files: predictions.shard-2-of-8.json; "" without shards."""
    return f".shard-{shard[0]}-of-{shard[1]}" if shard else ""


class OutputFolder(ABC):
    """One run's output folder (module docstring).

    out: its path or URL; part: part_suffix(shard); state: <out>/.m2f; tmp: where outputs are
    staged before they appear; read_only: a dry run's look (journals are read, never repaired);
    wrote: whether this process wrote an output or a journal record here.
    """

    def __init__(self, out: str, shard: Optional[tuple[int, int]] = None):
        self.out = out
        self.part = part_suffix(shard)
        self.state = state_dir(out)
        self.tmp = ""
        self.read_only = False
        self.wrote = False

    @abstractmethod
    def path(self, rel: str, suffix: str) -> str:
        """The output of the input named rel ('/'-separated, no extension) with suffix ('.png')."""

    @abstractmethod
    def join(self, name: str) -> str:
        """A file directly in the output folder."""

    def run_file(self, stem: str, ext: str) -> str:
        """A run-level output: <out>/<stem><part><ext>, e.g. predictions.shard-0-of-2.json."""
        return self.join(f"{stem}{self.part}{ext}")

    @abstractmethod
    def journal_path(self, writer: str) -> str:
        """Where the journal of writer (one record per finished image) lives."""

    @abstractmethod
    def check_writable(self) -> None:
        """Prove we can write there (making what is missing), before any model is loaded. Raises
        OutputError."""

    @abstractmethod
    def lock(self) -> None:
        """Become the only run (of this shard) writing here. Raises OutputLockedError when another
        run is, OutputError when the folder cannot be locked."""

    @abstractmethod
    def unlock(self) -> None:
        """Make what this run wrote durable (sync), then release the lock."""

    @abstractmethod
    def sync(self) -> None:
        """Make everything written so far durable. Raises OutputError."""

    def ensure_held(self) -> None:
        """Raise LeaseLostError when this run may no longer write here (a lock that cannot be
        lost, as a local flock, has nothing to check)."""

    def discard_if_unused(self) -> None:
        """Remove what check_writable made when this run wrote nothing (nothing by default)."""

    @abstractmethod
    def exists(self, path: str) -> bool:
        """Whether an output is there, whole or not."""

    @abstractmethod
    def complete(self, path: str) -> bool:
        """Whether path is a whole output (what resume asks): not missing, empty or cut off."""

    @abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """The whole content of one file of the folder."""

    @abstractmethod
    def names(self) -> list[str]:
        """The names of the files directly in the output folder, sorted."""

    @abstractmethod
    def journal(self, writer: str, fresh: bool = False):
        """The journal of writer (records(), append(record), close()); fresh: start it empty
        (--overwrite), without losing the old one before this run's first record."""

    @abstractmethod
    def write_atomic(self, final: str, write: Callable[[object], None], binary: bool = True) -> None:
        """Call write(file) on a staged file that appears at final whole or not at all. Raises
        OutputError."""

    def write_bytes(self, final: str, data: bytes) -> None:
        """data as the output final, whole or not at all. Raises OutputError."""
        self.write_atomic(final, lambda f: f.write(data))
