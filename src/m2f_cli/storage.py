"""Remote inputs and outputs through fsspec: ``s3://``, ``gs://``, ``memory://``, ...

Any argument with a ``protocol://`` prefix (other than ``file://``) goes through fsspec; everything
else is a local path handled by walk.py and state.py directly. S3 needs ``pip install 'm2f[s3]'``
(s3fs), GCS ``'m2f[gcs]'`` (gcsfs). Credentials and endpoints come from the usual places (AWS_* and
GOOGLE_* variables, ~/.aws, instance roles) or from fsspec's own configuration, e.g.
``FSSPEC_S3_ENDPOINT_URL=http://127.0.0.1:9000`` for a MinIO or moto server.

What "atomic" means on object storage (README: Remote paths):
- every output object is written whole by one upload (staged in a local temporary file first);
  object stores make an object visible only when its upload completes, so a reader or a resumed
  run never sees half an object. There is no rename: a failed upload leaves nothing.
- the COCO/JSON Lines journals cannot be appended to, so they are a folder of chunk objects, one
  per ``JOURNAL_FLUSH_RECORDS`` images or ``JOURNAL_FLUSH_S`` seconds (and at the end of the run).
  A run killed hard loses at most its unflushed chunk, and those images are simply redone on resume.
- the output-folder lock is a lease: an object naming its holder, refreshed every ``LEASE_RENEW_S``
  seconds; a run finding a fresher lease refuses to start (exit 4), a lease older than
  ``LEASE_STALE_S`` belongs to a dead run and is taken over.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import Callable, Iterator, Optional

from .state import OutputError, OutputFolder, OutputLockedError, part_suffix, state_dir

JOURNAL_FLUSH_RECORDS = 256
JOURNAL_FLUSH_S = 10.0
LEASE_RENEW_S = 20.0
LEASE_STALE_S = 90.0


class RemoteError(OSError):
    """A remote path cannot be used: unknown protocol, missing backend, no credentials."""


def is_url(path: str) -> bool:
    """True for fsspec URLs (s3://b/k, memory://x); False for local paths and file:// URLs."""
    head, sep, _ = path.partition("://")
    return bool(sep) and head.isidentifier() and head.lower() not in ("file", "local")


def local_path(path: str) -> str:
    """file:///a/b -> /a/b; other strings unchanged."""
    return path[len("file://"):] if path.startswith("file://") else path



def filesystem(url: str):
    """(fsspec filesystem, path without protocol) for url. Raises RemoteError naming the URL."""
    import fsspec
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        proto = url.partition("://")[0]
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(proto)
        hint = f": pip install 'm2f[{extra}]'" if extra else f" ({e})"
        raise RemoteError(f"{url}: no fsspec backend for {proto}://{hint}") from None
    except (ValueError, OSError) as e:
        raise RemoteError(f"{url}: {e}") from None


def url_for(url: str, path: str) -> str:
    """The URL of fs path `path` on the same filesystem as `url`."""
    return f"{url.partition('://')[0]}://{path}"


def read_bytes(path: str) -> bytes:
    """A whole input file, local or remote (DataLoader workers call this; fsspec makes a fresh
    filesystem object per process)."""
    if not is_url(path):
        with open(local_path(path), "rb") as f:
            return f.read()
    fs, p = filesystem(path)
    return fs.cat_file(p)


def walk_url(url: str, is_image: Callable[[str], bool], exclude: Optional[str] = None
             ) -> Iterator[tuple[str, str, Optional[str]]]:
    """(url, name, error) for the images at url: a folder (listed recursively, hidden names skipped,
    sorted like a local walk), a single object, or a glob pattern. Names follow walk.py's rule:
    relative to a folder argument, otherwise the path without the protocol."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    skip = filesystem(exclude)[1].rstrip("/") + "/" if exclude and is_url(exclude) else None
    if any(c in root for c in "*?["):
        matches = fs.glob(root, detail=True)  # one listing, with each match's type
        if not matches:
            raise FileNotFoundError(f"{url}: no object matches this pattern")
        for m in sorted(matches):
            if matches[m]["type"] == "directory":
                yield from _walk_dir(fs, url, m, is_image, skip)
            elif is_image(m):
                yield url_for(url, m), m.lstrip("/"), None
        return
    if fs.isdir(root):
        yield from _walk_dir(fs, url, root, is_image, skip)
    elif fs.isfile(root):
        yield url_for(url, root), root.lstrip("/"), None
    else:
        raise FileNotFoundError(f"{url}: no such object or folder")


def _walk_dir(fs, url: str, root: str, is_image, skip: Optional[str]):
    found = []
    for key in fs.find(root):
        if skip and (key + "/").startswith(skip):
            continue
        rel = key[len(root):].lstrip("/")
        parts = rel.split("/")
        if not rel or any(p.startswith(".") for p in parts) or not is_image(parts[-1]):
            continue
        found.append((tuple(parts), key, rel))
    for _, key, rel in sorted(found):
        yield url_for(url, key), rel, None


class RemoteOutputFolder(OutputFolder):
    """OutputFolder on an fsspec filesystem: the same interface, object-store semantics (above)."""

    def __init__(self, out: str, shard: Optional[tuple[int, int]] = None):
        self.fs, root = filesystem(out)
        self.root = root.rstrip("/")
        self.out = url_for(out, self.root)
        self.part = part_suffix(shard)
        self.state = state_dir(self.out)
        self.tmp = ""  # local staging folder for uploads, made by lock()
        self._lock_fd = None
        self._lease: Optional[_Lease] = None
        self._listing: Optional[set[str]] = None
        self._listing_lock = threading.Lock()
        self._created: list[str] = []  # object stores have no folders to make or remove
        self.wrote = False

    def _p(self, url: str) -> str:
        """fs path of one of our URLs."""
        return url.partition("://")[2]

    def path(self, rel: str, suffix: str) -> str:
        return f"{self.out}/{rel}{suffix}"

    def join(self, name: str) -> str:
        return f"{self.out}/{name}"

    def run_file(self, stem: str, ext: str) -> str:
        return self.join(f"{stem}{self.part}{ext}")

    def journal_path(self, writer: str) -> str:
        return f"{self.state}/{writer}{self.part}.journal"

    def check_writable(self) -> None:
        probe = f"{self.state}/probe-{uuid.uuid4().hex}"
        try:
            self.fs.pipe_file(self._p(probe), b"ok")
            self.fs.rm_file(self._p(probe))
        except Exception as e:  # backends raise their own types (botocore, aiohttp): report them all
            raise _output_error(f"{self.out}: output location is not writable", e) from None

    def lock(self) -> None:
        self._lease = _Lease(self, f"{self.state}/lock{self.part}")
        self._lease.acquire()
        sweep_stale_stages()
        self.tmp = tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-")

    def unlock(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = ""

    def exists(self, path: str) -> bool:
        """From one listing of the folder taken at first use (one request instead of one per
        image), plus what this run wrote since."""
        with self._listing_lock:
            if self._listing is None:
                try:
                    self._listing = set(self.fs.find(self.root))  # [] when nothing is there yet
                except FileNotFoundError:
                    self._listing = set()
            return self._p(path) in self._listing

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(self._p(path))

    def names(self) -> list[str]:
        try:
            return sorted(posixpath.basename(e["name"]) for e in self.fs.ls(self.root, detail=True)
                          if e["type"] == "file")
        except FileNotFoundError:
            return []

    def write_atomic(self, final: str, write: Callable[[object], None], binary: bool = True) -> None:
        """Stage locally, then upload in one piece (the object appears only when complete)."""
        tmp = os.path.join(self.tmp, uuid.uuid4().hex)
        try:
            with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
                write(f)
            self.fs.put_file(tmp, self._p(final))
        except Exception as e:
            raise _output_error(f"{final}: cannot write", e) from None
        finally:
            try:
                os.remove(tmp)
            except OSError:
                pass
        self._written(final)

    def write_bytes(self, final: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._p(final), data)
        except Exception as e:
            raise _output_error(f"{final}: cannot write", e) from None
        self._written(final)

    def _written(self, url: str) -> None:
        with self._listing_lock:
            if self._listing is not None:
                self._listing.add(self._p(url))

    def journal(self, writer: str, fresh: bool = False) -> "ChunkedJournal":
        return ChunkedJournal(self, self.journal_path(writer), fresh=fresh)


class ChunkedJournal:
    """The Journal interface on object storage: a folder of JSON Lines chunk objects.

    Records are buffered and uploaded as one new chunk every JOURNAL_FLUSH_RECORDS records or
    JOURNAL_FLUSH_S seconds, and on close. Chunk names sort by time, so records() reads them in the
    order they were written; a record for an image already seen is dropped (first one wins).
    """

    def __init__(self, folder: RemoteOutputFolder, url: str, fresh: bool = False):
        self.folder = folder
        self.fs = folder.fs
        self.dir = folder._p(url)
        self.path = url
        self.run = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self._buf: list[bytes] = []
        self._mirror: Optional[str] = None
        self._pending_mirror: list[bytes] = []
        self._n = 0
        self._last = time.monotonic()
        # --overwrite: the old chunks are removed at the first upload, not now, so a run that
        # fails before its first image loses nothing; until then they are not read either
        self._fresh = fresh

    def _chunks(self) -> list[str]:
        if self._fresh:
            return []
        try:
            return sorted(p for p in self.fs.find(self.dir) if p.endswith(".jsonl"))
        except FileNotFoundError:
            return []

    def _mirror_path(self) -> str:
        """A local copy of every record: the chunks as found (fetched once, concurrently) plus
        what this run appended, so reading the journal again (three times when the COCO files are
        built) costs no requests. Valid while this run holds the lease."""
        if self._mirror is None:
            fd, path = tempfile.mkstemp(prefix="m2f-journal-", suffix=".jsonl", dir=self.folder.tmp or None)
            with os.fdopen(fd, "wb") as f:
                chunks = self._chunks()
                for i in range(0, len(chunks), 64):
                    batch = chunks[i:i + 64]
                    data = self.fs.cat(batch)  # one concurrent round of requests on async backends
                    for c in batch:
                        f.write(data[c] if data[c].endswith(b"\n") or not data[c] else data[c] + b"\n")
                for line in self._pending_mirror:
                    f.write(line)
            self._pending_mirror = []
            self._mirror = path
        return self._mirror

    def records(self) -> Iterator[dict]:
        seen: set[str] = set()
        with open(self._mirror_path(), "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                key = rec.get("rel")
                if key is not None:
                    if key in seen:
                        continue
                    seen.add(key)
                yield rec

    def append(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        self._buf.append(line)
        if self._mirror is not None:
            with open(self._mirror, "ab") as f:
                f.write(line)
        else:
            self._pending_mirror.append(line)
        if len(self._buf) >= JOURNAL_FLUSH_RECORDS or time.monotonic() - self._last >= JOURNAL_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self._buf:
            return
        name = f"{self.dir}/{self.run}-{self._n:06d}.jsonl"
        try:
            if self._fresh:
                if self.fs.exists(self.dir):
                    self.fs.rm(self.dir, recursive=True)
                self._fresh = False
                self._mirror_path()  # the mirror holds this run's records only
            self.fs.pipe_file(name, b"".join(self._buf))
        except Exception as e:
            raise _output_error(f"{url_for(self.folder.out, name)}: cannot write", e) from None
        self._buf.clear()
        self._n += 1

    def close(self) -> None:
        self.flush()

    def __del__(self):
        if self._mirror is not None:
            try:
                os.remove(self._mirror)
            except OSError:
                pass


class _Lease:
    """The output-folder lock on object storage (see the module docstring)."""

    def __init__(self, folder: RemoteOutputFolder, url: str):
        self.fs = folder.fs
        self.folder = folder
        self.key = folder._p(url)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.fs.cat_file(self.key))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # a torn or foreign lock object: treat as stale

    def _write(self) -> None:
        self.fs.pipe_file(self.key, json.dumps({"holder": self.token, "time": time.time()}).encode())

    def acquire(self) -> None:
        held = self._read()
        if held and held.get("holder") != self.token and time.time() - float(held.get("time", 0)) < LEASE_STALE_S:
            raise OutputLockedError(f"{self.folder.out}: output location is in use by another m2f run"
                                    f"{' of this shard' if self.folder.part else ''} ({held.get('holder')}; "
                                    f"its lease expires {LEASE_STALE_S:.0f} s after its last renewal)")
        self._write()
        # Two runs racing for a free lock both write it; the last write wins and the other sees it.
        time.sleep(0.2)
        held = self._read()
        if not held or held.get("holder") != self.token:
            raise OutputLockedError(f"{self.folder.out}: output location was taken by another m2f run "
                                    f"({held.get('holder') if held else '?'})")
        self._thread = threading.Thread(target=self._renew, name="m2f-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                self._write()
            except Exception:  # a missed renewal is retried; the lease lasts LEASE_STALE_S
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = self._read()
            if held and held.get("holder") == self.token:
                self.fs.rm_file(self.key)
        except Exception:
            pass


STAGE_PREFIX = "m2f-stage-"


def sweep_stale_stages(root: Optional[str] = None) -> list[str]:
    """Remove staging folders (<tmp>/m2f-stage-<pid>-*) of this user's runs whose process is gone
    (a SIGKILLed run cannot clean up; what it staged was never uploaded). Returns those removed."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        entries = os.listdir(root)
    except OSError:
        return removed
    for name in entries:
        if not name.startswith(STAGE_PREFIX):
            continue
        pid_text = name[len(STAGE_PREFIX):].split("-", 1)[0]
        path = os.path.join(root, name)
        try:
            if not pid_text.isdigit() or os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid_text), 0)
            continue  # alive (or a reused pid): leave it
        except ProcessLookupError:
            pass
        except (PermissionError, OSError):
            continue  # another user's process, or unreadable: not ours to remove
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def open_output(out: str, shard: Optional[tuple[int, int]] = None) -> OutputFolder:
    """The OutputFolder for --out: remote for fsspec URLs, local otherwise."""
    return RemoteOutputFolder(out, shard) if is_url(out) else OutputFolder(local_path(out), shard)


def one_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _output_error(what: str, e: BaseException) -> OutputError:
    """OutputError("<what> (<first line of e>)"), with e's errno when the backend gave one."""
    return OutputError(getattr(e, "errno", None) or 5, f"{what} ({one_line(e)})")
