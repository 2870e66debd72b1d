"""Outputs on object storage through fsspec: ``s3://``, ``gs://``, ``memory://``, ...

Which paths are URLs, and where backends and credentials come from: urls.py; remote inputs:
inputs/remote.py.

What "atomic" means on object storage (docs/object-storage.md):
- every output object is written whole by one upload (staged in a local file first: staging.py);
  object stores make an object visible only when its upload completes, so a reader or a resumed
  run never sees half an object. There is no rename: a failed upload leaves nothing.
- the COCO/JSON Lines journals cannot be appended to, so they are a folder of chunk objects, one
  per ``JOURNAL_FLUSH_RECORDS`` images or ``JOURNAL_FLUSH_S`` seconds (and at the end of the run).
  A run killed hard loses at most its unflushed chunk, and those images are simply redone on resume.

Who may write (the lease on the output location): lease.py.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import threading
import time
import uuid
from typing import Callable, Iterator, Optional

from m2f_cli.errors import LeaseLostError, OutputError, OutputLockedError, RemoteError, one_line
from m2f_cli.outputs.folder import OutputFolder
from m2f_cli.outputs.lease import Lease, lease_store
from m2f_cli.outputs.staging import new_stage, sweep_stale_stages
from m2f_cli.urls import filesystem, url_for

JOURNAL_FLUSH_RECORDS = 256
JOURNAL_FLUSH_S = 10.0


class RemoteOutputFolder(OutputFolder):
    """OutputFolder on an fsspec filesystem: the same interface, object-store semantics (above).
    tmp is a local staging folder for uploads (staging.py), made by lock()."""

    def __init__(self, out: str, shard: Optional[tuple[int, int]] = None):
        self.fs, root = filesystem(out)
        self.root = root.rstrip("/")
        url = url_for(out, self.root)
        self.store = lease_store(url, self.fs)  # RemoteError where there is no safe lease
        super().__init__(url, shard)
        self._lease: Optional[Lease] = None
        self._listing: Optional[dict[str, int]] = None  # fs path -> size
        self._listing_lock = threading.Lock()

    def _p(self, url: str) -> str:
        """fs path of one of our URLs."""
        return url.partition("://")[2]

    def path(self, rel: str, suffix: str) -> str:
        return f"{self.out}/{rel}{suffix}"

    def join(self, name: str) -> str:
        return f"{self.out}/{name}"

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
        self._lease = Lease(self, f"{self.state}/lock{self.part}", self.store)
        try:
            self._lease.acquire()
        except (OutputLockedError, RemoteError):
            self._lease = None
            raise
        except Exception as e:  # backends raise their own types (botocore, aiohttp): report them all
            self._lease = None
            raise _output_error(f"{self.out}: cannot take the output lease", e) from None
        sweep_stale_stages()
        self.tmp = new_stage()

    def unlock(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = ""

    def sync(self) -> None:
        """Nothing to do: an uploaded object is durable when its upload returns."""

    def ensure_held(self) -> None:
        """Raise LeaseLostError when this run may no longer write here (before every write)."""
        if self._lease is not None:
            self._lease.ensure()

    def _list(self) -> dict[str, int]:
        """One listing of the folder taken at first use (one request instead of one per image),
        plus what this run wrote since: fs path -> size."""
        with self._listing_lock:
            if self._listing is None:
                try:
                    found = self.fs.find(self.root, detail=True)  # {} when nothing is there yet
                except FileNotFoundError:
                    found = {}
                self._listing = {p: int(e.get("size") or 0) for p, e in found.items()}
            return self._listing

    def exists(self, path: str) -> bool:
        return self._p(path) in self._list()

    def complete(self, path: str) -> bool:
        """Listed and not empty: an object appears only when its upload is complete, so its size
        in the listing is all resume needs to know (an empty object is never an output of ours)."""
        return self._list().get(self._p(path), 0) > 0

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
            self.ensure_held()
            self._upload(lambda dest: self.fs.put_file(tmp, dest), self._p(final))
            size = os.path.getsize(tmp)
        except LeaseLostError:
            raise
        except Exception as e:
            raise _output_error(f"{final}: cannot write", e) from None
        finally:
            try:
                os.remove(tmp)
            except OSError:
                pass
        self._written(final, size)

    def write_bytes(self, final: str, data: bytes) -> None:
        self.ensure_held()
        try:
            self._upload(lambda dest: self.fs.pipe_file(dest, data), self._p(final))
        except Exception as e:
            raise _output_error(f"{final}: cannot write", e) from None
        self._written(final, len(data))

    def _upload(self, send: Callable[[str], object], dest: str) -> None:
        """send(dest) on an object store; elsewhere (M2F_UNSAFE_REMOTE) send to a temporary name
        and move it into place, so that a reader never sees half a file where moves are renames."""
        if self.store.exact:
            send(dest)
            return
        part = f"{dest}.m2f-part-{uuid.uuid4().hex[:8]}"
        send(part)
        self.fs.mv(part, dest)

    def _written(self, url: str, size: int) -> None:
        with self._listing_lock:
            if self._listing is not None:
                self._listing[self._p(url)] = size

    def journal(self, writer: str, fresh: bool = False) -> "ChunkedJournal":
        return ChunkedJournal(self, self.journal_path(writer), fresh=fresh)


class ChunkedJournal:
    """The Journal interface on object storage: a folder of JSON Lines chunk objects.

    Records are buffered and uploaded as one new chunk every JOURNAL_FLUSH_RECORDS records or
    JOURNAL_FLUSH_S seconds, and on close. Chunk names sort by time, so records() reads them in the
    order they were written (the writers keep the first record of each image: writers.base.
    unique_records). Each chunk is uploaded only after a renewal of the lease succeeded, and
    removed again if the lease lapsed while it uploaded, so a run that lost its lease adds nothing.
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
        with open(self._mirror_path(), "rb") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

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
        lease = self.folder._lease
        if lease is not None and not lease.renew():  # confirms the lease is ours, and extends it
            lease.ensure()  # the store did not answer: go on while the last renewal is recent
        try:
            if self._fresh:
                if self.fs.exists(self.dir):
                    self.fs.rm(self.dir, recursive=True)
                self._fresh = False
                self._mirror_path()  # the mirror holds this run's records only
            self.folder._upload(lambda dest: self.fs.pipe_file(dest, b"".join(self._buf)), name)
        except Exception as e:
            raise _output_error(f"{url_for(self.folder.out, name)}: cannot write", e) from None
        if lease is not None:
            try:
                lease.ensure()  # the lease lapsed while the chunk uploaded: take the chunk back
            except LeaseLostError:
                try:
                    self.fs.rm_file(name)
                except Exception:  # noqa: BLE001 - the loss is what must be reported
                    pass
                raise
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


def _output_error(what: str, e: BaseException) -> OutputError:
    """OutputError("<what> (<first line of e>)"), with e's errno when the backend gave one."""
    return OutputError(getattr(e, "errno", None) or 5, f"{what} ({one_line(e)})")
