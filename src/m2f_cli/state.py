"""Never lose work: atomic file writes, the output-folder lock, and append-only journals.

Everything we keep for ourselves lives in ``<out>/.m2f/``:
- ``lock``: held with flock while a run writes into ``<out>``; the kernel drops it when the
  process dies (SIGKILL included), so a killed run never leaves it stuck.
- ``tmp/``: every output is written there first and renamed into place when complete
  (same filesystem, so the rename is atomic). Emptied at the start of each run.
- ``<writer>.journal.jsonl``: one line per finished image for the writers that build one file
  for the whole run (COCO, JSON Lines); their final files are rebuilt from it atomically.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import uuid
from typing import Callable, Iterator, Optional

STATE_DIR = ".m2f"  # our bookkeeping folder inside --out; hidden, so never walked as input


# Lock descriptors this process holds. flock locks belong to the open file, which forked children
# (DataLoader workers) share: batch._worker_init closes these so that a killed run's orphaned
# workers cannot keep the folder locked.
HELD_LOCK_FDS: set[int] = set()


class OutputLockedError(RuntimeError):
    """Another m2f run is writing into the same output folder."""


class OutputError(OSError):
    """An output cannot be written (disk full, permissions); names the path."""


def state_dir(out: str) -> str:
    return os.path.join(out, STATE_DIR)


def part_suffix(shard: Optional[tuple[int, int]]) -> str:
    """The infix of a shard's run-level files: predictions.shard-2-of-8.json; "" without shards."""
    return f".shard-{shard[0]}-of-{shard[1]}" if shard else ""


class OutputFolder:
    """The run's output folder: lock, temporary area and atomic writes.

    shard: (index, count) when this run is one shard of several writing into the same folder:
    each shard has its own lock, temporary area, journals and run-level part files.
    """

    def __init__(self, out: str, shard: Optional[tuple[int, int]] = None):
        self.out = out
        self.part = part_suffix(shard)
        self.state = state_dir(out)
        self.tmp = os.path.join(self.state, "tmp" + self.part)
        self._lock_fd: Optional[int] = None
        self._created: list[str] = []  # folders check_writable made, outermost first
        self.wrote = False  # any output file or journal line written by this process

    def run_file(self, stem: str, ext: str) -> str:
        """A run-level output: <out>/<stem><part><ext>, e.g. predictions.shard-0-of-2.json."""
        return os.path.join(self.out, f"{stem}{self.part}{ext}")

    def journal_path(self, writer: str) -> str:
        return os.path.join(self.state, f"{writer}{self.part}.journal.jsonl")

    def check_writable(self) -> None:
        """Create the folders and prove we can write there, before any model is loaded."""
        try:
            self._created = _missing_dirs(self.tmp)
            os.makedirs(self.tmp, exist_ok=True)
            probe = os.path.join(self.tmp, f"probe-{uuid.uuid4().hex}")
            with open(probe, "wb") as f:
                f.write(b"ok")
            os.remove(probe)
        except OSError as e:
            raise OutputError(e.errno, f"{self.out}: output folder is not writable ({e.strerror or e})") from None

    def lock(self) -> None:
        path = os.path.join(self.state, "lock" + self.part)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputLockedError(
                    f"{self.out}: output folder is in use by another m2f run"
                    f"{' of this shard' if self.part else ''}"
                    f"{f' (pid {holder})' if holder else ''}") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        HELD_LOCK_FDS.add(fd)
        # A previous run killed mid-write may have left temporary files; they are ours to remove.
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp, exist_ok=True)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            HELD_LOCK_FDS.discard(self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = None

    def discard_if_unused(self) -> None:
        """Remove the folders this run created when it wrote nothing (it failed before its first
        output): a failed first try leaves no empty --out or .m2f behind."""
        if self.wrote or not self._created:
            return
        state = os.path.abspath(self.state)
        if any(state == d or state.startswith(d + os.sep) for d in self._created):
            shutil.rmtree(state, ignore_errors=True)
        for d in reversed(self._created):
            try:
                os.rmdir(d)
            except OSError:
                pass  # not empty (not ours alone) or already gone
        self._created = []

    def path(self, rel: str, suffix: str) -> str:
        return os.path.join(self.out, *rel.split("/")) + suffix

    def join(self, name: str) -> str:
        """A file directly in the output folder."""
        return os.path.join(self.out, name)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def names(self) -> list[str]:
        """The names of the files directly in the output folder."""
        try:
            return sorted(e.name for e in os.scandir(self.out) if e.is_file())
        except OSError:
            return []

    def journal(self, writer: str, fresh: bool = False) -> "Journal":
        return Journal(self.journal_path(writer), fresh=fresh, on_write=self._mark_written)

    def _mark_written(self) -> None:
        self.wrote = True

    def write_atomic(self, final: str, write: Callable[[object], None], binary: bool = True) -> None:
        """Call write(file) on a temporary file, then rename it to final. Raises OutputError."""
        tmp = os.path.join(self.tmp, uuid.uuid4().hex)
        try:
            os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
            with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
                write(f)
            os.replace(tmp, final)
            self.wrote = True
        except OSError as e:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise OutputError(e.errno, f"{final}: cannot write ({e.strerror or e})") from None

    def write_bytes(self, final: str, data: bytes) -> None:
        self.write_atomic(final, lambda f: f.write(data))


class Journal:
    """An append-only JSON Lines file of finished images, robust to being killed mid-line.

    Each record is one line written with a single write() and flushed, so after a crash at most
    the last line is partial; opening the journal drops it. The file is opened (and, when fresh,
    emptied) at the first append: a run that fails before its first image changes nothing.
    """

    def __init__(self, path: str, fresh: bool = False, on_write: Optional[Callable[[], None]] = None):
        self.path = path
        self.fresh = fresh
        self._on_write = on_write
        self._f = None
        if not fresh:
            self._repair()

    def _repair(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                f.truncate(end)

    def records(self) -> Iterator[dict]:
        if (self.fresh and self._f is None) or not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def append(self, record: dict) -> None:
        try:
            if self._f is None:
                self._f = open(self.path, "wb" if self.fresh else "ab")
                if self._on_write is not None:
                    self._on_write()
            self._f.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
            self._f.flush()
        except OSError as e:
            raise OutputError(e.errno, f"{self.path}: cannot write ({e.strerror or e})") from None

    def close(self) -> None:
        if self._f is None:
            return
        try:
            self._f.close()
        except OSError:
            pass


def _missing_dirs(path: str) -> list[str]:
    """The folders on the way to path that do not exist yet, outermost first."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.exists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return list(reversed(missing))
