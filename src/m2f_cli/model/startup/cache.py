"""The start-up cache's files (traced.py builds and loads them; ``m2f cache`` lists and clears them).

Torch-free on purpose: ``m2f cache`` must not import torch.

- Location: ``fingerprint.cache_root()/traced`` (traces ``*.pt``, compiled.py's AOTInductor packages ``*.pt2``) (``$M2F_CACHE_DIR``, ``$XDG_CACHE_HOME/m2f`` or
  ``~/.cache/m2f``), the one place both the traces and the weight digests live.
- In use: a process holds a shared flock on a trace from the moment it opens it to load it until
  its TracedPredictor is released (or the process ends: the kernel drops the lock). Anything that
  deletes a trace (least-recently-used eviction, replacement by a newer trace of the same model,
  ``m2f cache clear``) first takes a non-blocking exclusive flock on it and skips the file when
  that fails, so a trace another live process uses is never deleted under it.
- Size cap: ``M2F_CACHE_MAX_BYTES`` (bytes, or with a K/M/G suffix; default 2G; 0: no cap). After a
  trace is built, the least recently used traces (by mtime, which a load touches hourly) are evicted
  until the traces fit, never the one just built nor one in use.
- Where flock is unsupported (some network filesystems), the cache is not used: CacheLockError
  names the filesystem and the way out (a local M2F_CACHE_DIR, or --startup-cache off).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional

from m2f_cli.model.startup.fingerprint import cache_root
from m2f_cli.outputs.local import NO_FLOCK_ERRNOS, no_flock_message
from m2f_cli.errors import CacheLockError

DEFAULT_MAX_BYTES = 2 * 1024 ** 3
MAX_BYTES_ENV = "M2F_CACHE_MAX_BYTES"
SUFFIX = ".pt"
SUFFIXES = (SUFFIX, ".pt2")  # traces (traced.py) and compiled packages (compiled.py)
# Builds write into this subfolder and rename into the cache when done: entries() never sees a file
# being written, so neither `m2f cache list`, the size cap, eviction nor `m2f cache clear` touch it.
PARTIAL = ".partial"
_ADOPTED: dict[str, int] = {}  # build locks this process holds through an inherited fd (builds.py)
# A load touches a cache file's mtime (its last use, for the size cap's LRU eviction) only when it
# is older than this: touching changes the file's ctime, which would make aoti.py check the
# compiled library's CRC (~0.1 s) on every load instead of once.
TOUCH_AFTER_S = 3600


class BuildBusy(Exception):
    """Another process held a build lock longer than this one would wait (traced.build_lock)."""

    def __init__(self, path: Path, waited_s: float):
        super().__init__(f"another m2f process has been building {path.name} for over {waited_s:.0f} s")
        self.path = path


def partial_file(path: Path, suffix: str) -> tuple[int, str]:
    """A new temporary file for building path: (fd, name) in the partial folder, named
    <entry name>~<random><suffix> (clear() finds its entry by the name before the ~)."""
    import tempfile
    d = path.parent / PARTIAL
    d.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=d, prefix=f"{path.name}~", suffix=suffix)


def adopt_lock(path: Path, fd: int) -> None:
    """This process holds path's build lock through fd, taken by the run that started its builder
    (builds.spawn): traced.build_lock then does not take it again (it would wait on itself)."""
    _ADOPTED[str(path)] = fd


def adopted(path: Path) -> bool:
    return str(path) in _ADOPTED


def traces_dir() -> Path:
    return cache_root() / "traced"


def max_bytes() -> int:
    """The cap on the traces' total size (M2F_CACHE_MAX_BYTES; 0 = none). A value that does not
    parse keeps the default (the cache is never a reason for a run to fail)."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", raw, re.IGNORECASE) if raw else None
    if not m:
        return DEFAULT_MAX_BYTES
    scale = 1024 ** " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * scale)


def _flock(f: IO[bytes], op: int, path: Path) -> bool:
    """flock; False when another process holds a conflicting lock (non-blocking ops only)."""
    try:
        fcntl.flock(f.fileno(), op)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in NO_FLOCK_ERRNOS:
            raise no_flock(path, e) from None
        raise


def no_flock(path: Path, e: OSError) -> CacheLockError:
    return CacheLockError(e.errno, f"{no_flock_message(str(path.parent), e)}: the start-up cache is not used; "
                                   f"set M2F_CACHE_DIR to a local folder, or pass --startup-cache off")


def open_in_use(path: Path) -> Optional[IO[bytes]]:
    """path opened for reading with a shared flock held (the file is 'in use' until it is closed),
    its mtime touched when older than TOUCH_AFTER_S (least recently used = oldest mtime, to the
    hour: a file left as it is keeps the checks remembered for it, aoti.py); None when there is no
    such file.
    The lock is taken on the open file, then the file is checked to still be the one at path, so
    an eviction between the open and the lock cannot leave us holding a deleted file."""
    for _ in range(3):
        try:
            f = open(path, "rb")
        except OSError:  # absent, or a cache folder that cannot be read: nothing cached
            return None
        try:
            _flock(f, fcntl.LOCK_SH, path)
            st = os.stat(path)
            if os.fstat(f.fileno()).st_ino == st.st_ino:
                if time.time() - st.st_mtime > TOUCH_AFTER_S:
                    try:
                        os.utime(path)
                    except OSError:
                        pass  # a read-only cache still loads
                return f
        except FileNotFoundError:
            pass
        except BaseException:
            f.close()
            raise
        f.close()  # replaced or removed meanwhile: look again
    return None


def remove_if_unused(path: Path) -> bool:
    """Delete a trace (and its build lock file) unless a live process holds it; True if deleted."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return True
    try:
        if not _flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB, path):
            return False
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                path.unlink()
        except FileNotFoundError:
            pass
    finally:
        f.close()
    _remove_lock_file(Path(f"{path}.lock"))
    return True


def _remove_lock_file(lock: Path) -> None:
    """A build lock nobody holds; one that a builder holds stays (it is building)."""
    try:
        f = open(lock, "rb")
    except FileNotFoundError:
        return
    try:
        if _flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB, lock):
            lock.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        f.close()


def in_use(path: Path) -> bool:
    """Whether a live process holds path (a shared or exclusive flock)."""
    try:
        with open(path, "rb") as f:
            if _flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB, path):
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                return False
            return True
    except FileNotFoundError:
        return False


@dataclass
class Entry:
    path: Path
    size: int
    last_used: float  # mtime: touched by every load
    in_use: bool


def entries() -> list[Entry]:
    """Every trace and compiled package in the cache, least recently used first."""
    d = traces_dir()
    found = []
    for p in (q for suffix in SUFFIXES for q in d.glob(f"*{suffix}")) if d.is_dir() else []:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        found.append(Entry(p, st.st_size, st.st_mtime, in_use(p)))
    return sorted(found, key=lambda e: e.last_used)


def others_in_use(path: Path) -> bool:
    """Whether a process uses a start-up cache entry other than path (an m2f run is going on)."""
    return any(e.in_use for e in entries() if e.path != path)


def being_built(path: Path) -> bool:
    """Whether a process holds the build lock of path now."""
    try:
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def evict(keep: Path, cap: Optional[int] = None) -> list[Path]:
    """Delete least recently used traces until all fit in cap (default max_bytes()), never keep
    nor a trace in use. The paths deleted."""
    cap = max_bytes() if cap is None else cap
    if cap <= 0:
        return []
    items = entries()
    total = sum(e.size for e in items)
    removed = []
    for e in items:
        if total <= cap:
            break
        if e.path == keep or e.in_use:
            continue
        if remove_if_unused(e.path):
            removed.append(e.path)
            total -= e.size
    return removed


def clear(everything: bool = False) -> tuple[list[Entry], list[Entry]]:
    """Delete every trace not in use, forget failed and killed builds (compiled.failed_marker,
    builds.started_marker: background builds are tried again), drop what builds that no longer run
    left in the partial folder (a build running now keeps its file), and with everything, the weight
    digests too. Returns (removed, kept because in use)."""
    removed, kept = [], []
    for e in entries():
        (removed if remove_if_unused(e.path) else kept).append(e)
    d = traces_dir()
    for marker in (m for pattern in ("*.failed", "*.started") for m in d.glob(pattern)) if d.is_dir() else []:
        marker.unlink(missing_ok=True)
    for left in (d / PARTIAL).iterdir() if (d / PARTIAL).is_dir() else []:
        if not being_built(d / left.name.split("~")[0].removesuffix(".log")):
            left.unlink(missing_ok=True)
    if everything:
        for lock in (q for suffix in SUFFIXES for q in d.glob(f"*{suffix}.lock")) if d.is_dir() else []:
            _remove_lock_file(lock)
        try:
            (cache_root() / "digests.json").unlink()
        except FileNotFoundError:
            pass
    return removed, kept
