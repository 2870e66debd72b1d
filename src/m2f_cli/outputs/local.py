"""The output folder on a local filesystem (folder.py's interface): never lose work through atomic
file writes, the output-folder lock, and append-only journals.

Everything we keep for ourselves lives in ``<out>/.m2f/``:
- ``lock``: held with flock while a run writes into ``<out>``; the kernel drops it when the
  process dies (SIGKILL included), so a killed run never leaves it stuck.
- ``tmp/``: every output is written there first and renamed into place when complete
  (same filesystem, so the rename is atomic). Emptied at the start of each run.
- ``<writer>.journal.jsonl``: one line per finished image for the writers that build one file
  for the whole run (COCO, JSON Lines); their final files are rebuilt from it atomically.

Durability (docs/reruns.md: Durability). Atomic renames alone survive a killed process, not a power cut: the
kernel may write the rename to disk before the file's data, leaving a renamed but empty file.
So every output's data is fsynced before its rename, and each directory an output was renamed
into (or created in) is fsynced after it, in batches: at most every ``DIR_SYNC_S`` seconds, and
whenever the folder is synced at the end of the run (``sync``, called by ``unlock``). Journals are
fsynced at the same points, after the directories: a journal line is the record itself (COCO
detections, a JSON Lines object), and it never becomes durable through us before the outputs
renamed before it. A power cut therefore costs at most the last ``DIR_SYNC_S`` seconds of renames
and journal lines, which resume redoes; resume also checks that each file it takes as done is
whole (``looks_whole``), so an output damaged some other way is redone, never kept.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import threading
import time
import uuid
from typing import Callable, Iterator, Optional

from m2f_cli.errors import OutputError, OutputLockedError
from m2f_cli.outputs.folder import OutputFolder

DIR_SYNC_S = 2.0    # touched directories and journals are fsynced at most this often during a run
# errnos of a filesystem that has no flock (some NFS, SMB/CIFS, FUSE and 9p mounts)
NO_FLOCK_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
# run without the output-folder lock where flock is unsupported (README: Exit codes; docs/reruns.md: Durability)
NO_LOCK_ENV = "M2F_NO_LOCK"


# Lock descriptors this process holds. flock locks belong to the open file, which forked children
# (DataLoader workers) share: batch._worker_init closes these so that a killed run's orphaned
# workers cannot keep the folder locked.
HELD_LOCK_FDS: set[int] = set()


def fsync_dir(path: str) -> None:
    """Make the entries of directory path (renames, new files) durable. Filesystems that cannot
    fsync a directory (some network and FUSE mounts answer EINVAL) are left as they are."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def mount_of(path: str) -> str:
    """'<fs type> filesystem at <mount point>' holding path, from /proc/mounts ('' where unknown)."""
    real = os.path.realpath(path)
    best = ("", "")
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, parts[2])
    except OSError:
        return ""
    return f"{best[1]} filesystem at {best[0]}" if best[0] else ""


def no_flock_message(path: str, e: OSError) -> str:
    """The one line that says flock is unsupported where path lives (errno e)."""
    where = mount_of(path)
    return f"{path}: this filesystem does not support file locks (flock: {e.strerror or e})" + \
        (f" [{where}]" if where else "")


_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC close every PNG
_JPEG_END = b"\xff\xd9"         # the EOI marker closes every JPEG


def looks_whole(name: str, head: bytes, tail: bytes) -> bool:
    """Whether a file of m2f's with these first and last bytes (a few each) is whole: a PNG ends with
    its IEND chunk, a JPEG with its EOI marker, a JSON document with '}' (JSON Lines with a newline).
    Cheap by design (two small reads, no parse): resume calls it for every output of every image,
    and what it must catch is the empty or cut-off file a power cut or a full disk leaves."""
    if not head:
        return False
    low = name.lower()
    if low.endswith(".png"):
        return head.startswith(b"\x89PNG") and tail.endswith(_PNG_END)
    if low.endswith((".jpg", ".jpeg")):
        return head.startswith(b"\xff\xd8") and tail.endswith(_JPEG_END)
    if low.endswith(".json"):
        return head.lstrip()[:1] in (b"{", b"[") and tail.rstrip()[-1:] in (b"}", b"]")
    if low.endswith(".jsonl"):
        return tail.endswith(b"\n")
    return True


def file_is_whole(path: str) -> bool:
    """True when path is a non-empty file that looks_whole (16 bytes read at each end)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
            if size > 16:
                f.seek(size - 16)
                tail = f.read(16)
            else:
                tail = head
    except OSError:
        return False
    return looks_whole(path, head, tail)


class LocalOutputFolder(OutputFolder):
    """The output folder on a local filesystem: lock, temporary area and atomic writes."""

    def __init__(self, out: str, shard: Optional[tuple[int, int]] = None):
        super().__init__(out, shard)
        self.tmp = os.path.join(self.state, "tmp" + self.part)
        self._lock_fd: Optional[int] = None
        self._created: list[str] = []  # folders check_writable made, outermost first
        # durability (module docstring): directories renamed into since the last sync, open journals
        self._dirty: set[str] = set()
        self._journals: list[Journal] = []
        self._last_sync = time.monotonic()
        self._sync_lock = threading.Lock()  # the writer thread writes, the main thread closes

    def journal_path(self, writer: str) -> str:
        return os.path.join(self.state, f"{writer}{self.part}.journal.jsonl")

    def check_writable(self) -> None:
        try:
            self._created = _missing_dirs(self.tmp)
            self._makedirs(self.tmp)  # a new <out> is itself an entry to sync in its parent
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
            if e.errno not in NO_FLOCK_ERRNOS:
                raise OutputError(e.errno, f"{self.out}: cannot lock the output folder ({e.strerror or e})") from None
            if os.environ.get(NO_LOCK_ENV) != "1":
                raise OutputError(e.errno, f"{no_flock_message(self.out, e)}: write to a local --out, or set "
                                  f"{NO_LOCK_ENV}=1 if no other m2f run can write into this folder") from None
            fd = None  # opted in: no lock, nothing to hold
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._lock_fd = fd
            HELD_LOCK_FDS.add(fd)
        # A previous run killed mid-write may have left temporary files; they are ours to remove.
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp, exist_ok=True)

    def unlock(self) -> None:
        """Sync what this run wrote (module docstring), then release the lock."""
        try:
            self.sync()
        except OSError:
            pass  # already reported by the write that failed; the lock must still go
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

    def sync(self) -> None:
        """fsync every directory touched since the last sync, then every open journal (in that
        order: see the module docstring). Raises OutputError."""
        self._sync_dirs()
        try:
            for j in self._journals:
                j.sync(dirs_first=False)
        except OSError as e:
            raise OutputError(e.errno, f"{self.out}: cannot sync ({e.strerror or e})") from None

    def _sync_dirs(self) -> None:
        with self._sync_lock:
            dirty, self._dirty = self._dirty, set()
            self._last_sync = time.monotonic()
            try:
                for d in sorted(dirty):
                    fsync_dir(d)
            except OSError as e:
                raise OutputError(e.errno, f"{self.out}: cannot sync ({e.strerror or e})") from None

    def _touched(self, directory: str) -> None:
        """directory got a new entry; sync the batch when DIR_SYNC_S has passed since the last."""
        with self._sync_lock:
            self._dirty.add(directory)
            due = time.monotonic() - self._last_sync >= DIR_SYNC_S
        if due:
            self.sync()

    def _makedirs(self, directory: str) -> None:
        """os.makedirs, marking the parent of each folder it creates as touched."""
        if os.path.isdir(directory):
            return
        parent = os.path.dirname(directory)
        if parent and parent != directory:
            self._makedirs(parent)
        try:
            os.mkdir(directory)
        except FileExistsError:
            return
        self._touched(parent or ".")

    def path(self, rel: str, suffix: str) -> str:
        return os.path.join(self.out, *rel.split("/")) + suffix

    def join(self, name: str) -> str:
        return os.path.join(self.out, name)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def complete(self, path: str) -> bool:
        """Not empty, not cut off: file_is_whole."""
        return file_is_whole(path)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def names(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.out) if e.is_file())
        except OSError:
            return []

    def journal(self, writer: str, fresh: bool = False) -> "Journal":
        j = Journal(self.journal_path(writer), fresh=fresh, before_sync=self._sync_dirs,
                    on_write=self._journal_started, repair=not self.read_only)
        self._journals.append(j)
        return j

    def _journal_started(self) -> None:
        self.wrote = True
        self._touched(self.state)  # the journal may be a new entry there

    def write_atomic(self, final: str, write: Callable[[object], None], binary: bool = True) -> None:
        """Call write(file) on a temporary file, fsync it, rename it to final; the directory is
        synced with the next batch (module docstring). Raises OutputError."""
        tmp = os.path.join(self.tmp, uuid.uuid4().hex)
        directory = os.path.dirname(final) or "."
        try:
            self._makedirs(directory)
            with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the name points at it
            os.replace(tmp, final)
            self.wrote = True
        except OSError as e:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise OutputError(e.errno, f"{final}: cannot write ({e.strerror or e})") from None
        self._touched(directory)


class Journal:
    """An append-only JSON Lines file of finished images, robust to being killed mid-line.

    Each record is one line written with a single write() and flushed, so after a crash at most
    the last line is partial; after a power cut the tail may also hold zeros or garbage (some
    filesystems extend the file before its data lands). Opening the journal keeps the longest
    prefix of whole lines (each starts with '{' and ends with '}\\n') and cuts the rest: those
    images are redone. sync() makes the lines written so far durable, after the folder's directories
    (LocalOutputFolder.sync and close call it). The file is opened (and, when fresh, emptied) at the
    first append: a run that fails before its first image changes nothing.
    """

    def __init__(self, path: str, fresh: bool = False, before_sync: Optional[Callable[[], None]] = None,
                 on_write: Optional[Callable[[], None]] = None, repair: bool = True):
        self.path = path
        self.fresh = fresh
        self._before_sync = before_sync  # the folder's directory sync: renames go to disk first
        self._on_write = on_write
        self._f = None
        if not fresh and repair:
            self._repair()

    def _repair(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb+") as f:
            end = 0
            for line in f:
                if not (line.startswith(b"{") and line.endswith(b"}\n")):
                    break
                end += len(line)
            if end != f.tell():
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())

    def records(self) -> Iterator[dict]:
        if (self.fresh and self._f is None) or not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    return  # a line cut by a failed write: its image is not journaled
                if line.strip():
                    yield json.loads(line)

    def append(self, record: dict) -> None:
        """Append one record as one whole line. A write that fails part-way (a full disk, a file
        size limit) is undone, so the journal keeps whole lines only. Raises OutputError."""
        data = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        start = None
        try:
            if self._f is None:
                self._f = open(self.path, "wb" if self.fresh else "ab", buffering=0)
                if self._on_write is not None:
                    self._on_write()
            start = os.lseek(self._f.fileno(), 0, os.SEEK_END)
            view = memoryview(data)
            while view:  # an unbuffered write may be short: the rest goes next, or fails
                view = view[self._f.write(view):]
        except OSError as e:
            if start is not None:
                try:
                    os.ftruncate(self._f.fileno(), start)
                except OSError:
                    pass
            raise OutputError(e.errno, f"{self.path}: cannot write ({e.strerror or e})") from None

    def sync(self, dirs_first: bool = True) -> None:
        if self._f is None or self._f.closed:
            return
        if dirs_first and self._before_sync is not None:
            self._before_sync()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is None:
            return
        try:
            self.sync()
        except OSError:
            pass
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
