"""Outputs on object storage through fsspec: ``s3://``, ``gs://``, ``memory://``, ...

Which paths are URLs, and where backends and credentials come from: urls.py; remote inputs:
inputs/remote.py.

What "atomic" means on object storage (README: Remote paths):
- every output object is written whole by one upload (staged in a local temporary file first);
  object stores make an object visible only when its upload completes, so a reader or a resumed
  run never sees half an object. There is no rename: a failed upload leaves nothing.
- the COCO/JSON Lines journals cannot be appended to, so they are a folder of chunk objects, one
  per ``JOURNAL_FLUSH_RECORDS`` images or ``JOURNAL_FLUSH_S`` seconds (and at the end of the run).
  A run killed hard loses at most its unflushed chunk, and those images are simply redone on resume.

What "exclusive" means (README: Remote paths): the output-folder lock is a lease, an object naming
its holder, taken and renewed only through the store's own conditional writes, so that of two runs
racing for it exactly one wins however slow their uploads are:
- S3 (s3fs): PutObject with ``If-None-Match: *`` creates it, ``If-Match: <ETag>`` renews or takes it
  over, DeleteObject with ``If-Match`` releases it. Stores that ignore these headers (some older
  S3-compatible servers) are detected when the lease is taken (a conditional write that must fail)
  and refused.
- GCS (gcsfs): the same with generation preconditions (``ifGenerationMatch=0`` / ``=<generation>``).
- memory:// lives in one process: a lock of this process makes its check-and-write exact.
- any other backend (sftp, hdfs, smb, az, ...): refused (exit 2), unless ``M2F_UNSAFE_REMOTE=1``
  accepts a best-effort lease (read, then write) and outputs uploaded under a temporary name and
  moved into place.
The holder renews every ``LEASE_RENEW_S`` seconds, each renewal conditional on the version it wrote
last: a renewal that fails on its condition means another run took the lease over, and this run
stops writing (``LeaseLostError``, exit 4). Staleness is judged on one clock only, the store's: a
lease is taken over when the store's own response says it was last written ``LEASE_STALE_S`` or
more seconds ago (S3: the ``Date`` header minus ``Last-Modified``; GCS: ``Date`` minus ``updated``).
The holder, on its own monotonic clock, stops writing ``LEASE_STALE_S - LEASE_VALID_S`` seconds
before that could happen when its renewals fail (``LEASE_VALID_S`` after the last one it sent that
succeeded), and confirms the lease right before each journal chunk: a run that lost its lease never
adds records to the journal after the run that took it over.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Callable, Iterator, Optional

from m2f_cli.outputs.folder import (LeaseLostError, OutputError, OutputFolder, OutputLockedError, part_suffix,
    state_dir)
from m2f_cli.errors import RemoteError, one_line  # noqa: F401  (defined there; raised and re-exported here)
from m2f_cli.urls import filesystem, is_url, local_path, url_for

JOURNAL_FLUSH_RECORDS = 256
JOURNAL_FLUSH_S = 10.0
LEASE_RENEW_S = 20.0   # the holder renews its lease this often
LEASE_VALID_S = 60.0   # the holder stops writing this long after its last successful renewal
LEASE_STALE_S = 90.0   # another run takes over a lease the store saw last written this long ago
UNSAFE_REMOTE_ENV = "M2F_UNSAFE_REMOTE"  # "1": best-effort lease on backends without conditional writes


class RemoteOutputFolder(OutputFolder):
    """OutputFolder on an fsspec filesystem: the same interface, object-store semantics (above)."""

    def __init__(self, out: str, shard: Optional[tuple[int, int]] = None):
        self.fs, root = filesystem(out)
        self.root = root.rstrip("/")
        self.out = url_for(out, self.root)
        self.store = lease_store(self.out, self.fs)  # RemoteError where there is no safe lease
        self.part = part_suffix(shard)
        self.state = state_dir(self.out)
        self.tmp = ""  # local staging folder for uploads, made by lock()
        self._lock_fd = None
        self._lease: Optional[_Lease] = None
        self._listing: Optional[dict[str, int]] = None  # fs path -> size
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
        self._lease = _Lease(self, f"{self.state}/lock{self.part}", self.store)
        try:
            self._lease.acquire()
        except (OutputLockedError, RemoteError):
            self._lease = None
            raise
        except Exception as e:  # backends raise their own types (botocore, aiohttp): report them all
            self._lease = None
            raise _output_error(f"{self.out}: cannot take the output lease", e) from None
        sweep_stale_stages()
        self.tmp = tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-")

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


class _Conflict(Exception):
    """A conditional write's condition failed: the lease object is not what we expected."""


@dataclass
class _Seen:
    """The lease object as read: its holder's record, its version (ETag, generation, digest) and
    how long ago the store last wrote it, by the store's own clock (None where it cannot say)."""

    holder: dict
    version: str
    age_s: Optional[float]


def _age(date_header: Optional[str], modified) -> Optional[float]:
    """Seconds between a response's Date header and a modification time, both the store's."""
    if not date_header or modified is None:
        return None
    try:
        now = parsedate_to_datetime(date_header)
        if isinstance(modified, str):
            from datetime import datetime
            modified = datetime.fromisoformat(modified.replace("Z", "+00:00"))
        return (now - modified).total_seconds()
    except (TypeError, ValueError):
        return None


def _holder(body: bytes) -> dict:
    try:
        doc = json.loads(body)
        return doc if isinstance(doc, dict) else {}
    except ValueError:
        return {}  # a torn or foreign object: no holder we know; it is still only replaced conditionally


class _LeaseStore:
    """Conditional writes of one small object, per backend (the module docstring)."""

    exact = True  # False: a best-effort read-then-write (M2F_UNSAFE_REMOTE)

    def __init__(self, fs):
        self.fs = fs

    def read(self, key: str) -> Optional[_Seen]:
        raise NotImplementedError

    def create(self, key: str, body: bytes) -> str:
        """Write key only if it does not exist; its new version. Raises _Conflict."""
        raise NotImplementedError

    def replace(self, key: str, body: bytes, version: str) -> str:
        """Write key only if its version is still version; its new version. Raises _Conflict."""
        raise NotImplementedError

    def delete(self, key: str, version: str) -> None:
        """Remove key only if its version is still version (best effort)."""
        raise NotImplementedError

    def check_enforced(self, key: str, body: bytes, version: str) -> str:
        """Prove the store enforces the conditions (see _S3Store); the lease's version after it."""
        return version


def _s3_code(e: BaseException) -> str:
    """The S3 error code behind an s3fs exception (s3fs keeps botocore's error as the cause)."""
    for err in (e, e.__cause__, e.__context__):
        resp = getattr(err, "response", None)
        if isinstance(resp, dict):
            return str(resp.get("Error", {}).get("Code", "")) or str(
                resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return ""


class _S3Store(_LeaseStore):
    """PutObject If-None-Match / If-Match, DeleteObject If-Match (AWS S3 since 2024; moto 5)."""

    _CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}

    def _call(self, method: str, key: str, **kw):
        bucket, k, _ = self.fs.split_path(key)
        try:
            return self.fs.call_s3(method, Bucket=bucket, Key=k, **kw)
        except FileExistsError:  # s3fs's name for a failed If-None-Match
            raise _Conflict() from None
        except (OSError, ValueError) as e:
            if _s3_code(e) in self._CONFLICT or (method == "put_object" and "IfMatch" in kw
                                                  and isinstance(e, FileNotFoundError)):
                raise _Conflict() from None
            raise

    def read(self, key: str) -> Optional[_Seen]:
        from fsspec.asyn import sync
        bucket, k, _ = self.fs.split_path(key)

        async def get():
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=k)
            try:
                return resp, await resp["Body"].read()
            finally:
                resp["Body"].close()
        try:
            resp, body = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        return _Seen(_holder(body), resp["ETag"], _age(date, resp.get("LastModified")))

    def create(self, key: str, body: bytes) -> str:
        return self._call("put_object", key, Body=body, IfNoneMatch="*")["ETag"]

    def replace(self, key: str, body: bytes, version: str) -> str:
        return self._call("put_object", key, Body=body, IfMatch=version)["ETag"]

    def delete(self, key: str, version: str) -> None:
        try:
            self._call("delete_object", key, IfMatch=version)
        except _Conflict:
            pass  # no longer ours: leave it to its holder

    def check_enforced(self, key: str, body: bytes, version: str) -> str:
        """Some S3-compatible stores accept If-None-Match / If-Match and ignore them; then two runs
        could both win. One write that must fail tells: creating the lease again."""
        try:
            version = self._call("put_object", key, Body=body, IfNoneMatch="*")["ETag"]
        except _Conflict:
            return version
        raise RemoteError(f"{key}: this S3 store does not enforce conditional writes (If-None-Match), so "
                          f"two m2f runs could write here at once; set {UNSAFE_REMOTE_ENV}=1 to go on "
                          f"without that guarantee")


class _GcsStore(_LeaseStore):
    """GCS generation preconditions through gcsfs's JSON API calls: the holder's record is kept in
    the object's metadata, so one GET of the object's resource gives holder, generation and age.
    (Written against gcsfs's documented API; the test suite has no GCS server to run it on.)"""

    def _bucket_key(self, key: str):
        bucket, k, _ = self.fs.split_path(key)
        return bucket, k

    def read(self, key: str) -> Optional[_Seen]:
        bucket, k = self._bucket_key(key)
        try:
            headers, contents = self.fs.call("GET", "b/{}/o/{}", bucket, k)
        except FileNotFoundError:
            return None
        meta = json.loads(contents)
        holder = _holder(((meta.get("metadata") or {}).get("m2f-lease") or "").encode())
        return _Seen(holder, str(meta["generation"]), _age(headers.get("Date"), meta.get("updated")))

    def _upload(self, key: str, body: bytes, generation: str) -> str:
        from urllib.parse import quote
        bucket, k = self._bucket_key(key)
        meta = json.dumps({"name": k, "metadata": {"m2f-lease": body.decode()}})
        data = (f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n--==0==\n"
                f"Content-Type: application/json\n\n").encode() + body + b"\n--==0==--"
        try:
            out = self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                               uploadType="multipart", ifGenerationMatch=generation, json_out=True,
                               headers={"Content-Type": 'multipart/related; boundary="==0=="'}, data=data)
        except FileExistsError:  # gcsfs's name for HTTP 412
            raise _Conflict() from None
        self.fs.invalidate_cache(key)
        return str(out["generation"])

    def create(self, key: str, body: bytes) -> str:
        return self._upload(key, body, "0")

    def replace(self, key: str, body: bytes, version: str) -> str:
        return self._upload(key, body, version)

    def delete(self, key: str, version: str) -> None:
        bucket, k = self._bucket_key(key)
        try:
            self.fs.call("DELETE", "b/{}/o/{}", bucket, k, ifGenerationMatch=version)
        except (FileExistsError, FileNotFoundError):
            pass


_MEMORY_LOCK = threading.Lock()  # memory:// is this process's: one lock makes check-and-write exact


class _MemoryStore(_LeaseStore):
    """memory:// (one process): versions are content digests (each write of a lease differs: it
    counts renewals), ages come from the memory filesystem's own creation times."""

    def _version(self, body: bytes) -> str:
        return hashlib.blake2b(body, digest_size=12).hexdigest()

    def _read(self, key: str) -> Optional[_Seen]:
        try:
            body = self.fs.cat_file(key)
            created = self.fs.info(key).get("created")
        except FileNotFoundError:
            return None
        if hasattr(created, "timestamp"):
            created = created.timestamp()
        age = time.time() - float(created) if isinstance(created, (int, float)) else None
        return _Seen(_holder(body), self._version(body), age)

    def read(self, key: str) -> Optional[_Seen]:
        with _MEMORY_LOCK:
            return self._read(key)

    def create(self, key: str, body: bytes) -> str:
        with _MEMORY_LOCK:
            if self.fs.exists(key):
                raise _Conflict()
            self.fs.pipe_file(key, body)
        return self._version(body)

    def replace(self, key: str, body: bytes, version: str) -> str:
        with _MEMORY_LOCK:
            seen = self._read(key)
            if seen is None or seen.version != version:
                raise _Conflict()
            self.fs.pipe_file(key, body)
        return self._version(body)

    def delete(self, key: str, version: str) -> None:
        with _MEMORY_LOCK:
            seen = self._read(key)
            if seen is not None and seen.version == version:
                self.fs.rm_file(key)


class _UnsafeStore(_MemoryStore):
    """M2F_UNSAFE_REMOTE=1 on a backend without conditional writes: read, compare, write. Two runs
    starting within one round trip of each other can both win: the opt-in says so."""

    exact = False

    def _read(self, key: str) -> Optional[_Seen]:
        try:
            body = self.fs.cat_file(key)
        except FileNotFoundError:
            return None
        try:
            modified = self.fs.modified(key)
            age = (time.time() - modified.timestamp()) if modified else None
        except (NotImplementedError, OSError, AttributeError):
            age = None
        # this host's clock against the backend's: the best a backend without conditions allows
        return _Seen(_holder(body), self._version(body), age)


# fsspec protocols whose stores have the primitives (the module docstring); memory:// is exact in-process
LEASE_STORES = {"s3": _S3Store, "s3a": _S3Store, "gs": _GcsStore, "gcs": _GcsStore, "memory": _MemoryStore}


def lease_store(url: str, fs) -> _LeaseStore:
    """The lease store for an output URL; RemoteError (one line, exit 2) on a backend without
    conditional writes unless M2F_UNSAFE_REMOTE=1."""
    proto = url.partition("://")[0].lower()
    cls = LEASE_STORES.get(proto)
    if cls is not None:
        return cls(fs)
    if os.environ.get(UNSAFE_REMOTE_ENV) == "1":
        return _UnsafeStore(fs)
    raise RemoteError(f"{url}: {proto}:// offers no conditional writes, so m2f cannot make a run the only "
                      f"writer there nor make its outputs appear whole; write to a local folder, s3:// or "
                      f"gs://, or set {UNSAFE_REMOTE_ENV}=1 to accept a best-effort lock")


class _Lease:
    """The output-folder lock on object storage (see the module docstring)."""

    def __init__(self, folder: "RemoteOutputFolder", url: str, store: _LeaseStore):
        self.store = store
        self.folder = folder
        self.key = folder._p(url)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.version = ""
        self.renewals = 0
        self.lost: Optional[str] = None
        self._confirmed = 0.0  # monotonic time the last successful write of the lease was sent
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "renewals": self.renewals, "renew_s": LEASE_RENEW_S,
                           "stale_s": LEASE_STALE_S}).encode()

    def _where(self) -> str:
        return f"{self.folder.out}: output location"

    def acquire(self) -> None:
        """Take the lease, or raise OutputLockedError naming its holder."""
        sent = time.monotonic()
        body = self._body()
        try:
            self.version = self.store.create(self.key, body)
        except _Conflict:
            seen = self.store.read(self.key)
            if seen is not None and seen.holder.get("holder") == self.holder:
                self.version = seen.version  # our own create, answered as a conflict by a retried request
            else:
                self.version = self._take_over(seen, body)
        self._confirmed = sent
        self.version = self.store.check_enforced(self.key, body, self.version)
        self._thread = threading.Thread(target=self._renew_loop, name="m2f-lease", daemon=True)
        self._thread.start()

    def _take_over(self, seen: Optional[_Seen], body: bytes) -> str:
        shard = " of this shard" if self.folder.part else ""
        if seen is None:  # released between our create and our read: try once more
            try:
                return self.store.create(self.key, body)
            except _Conflict:
                raise OutputLockedError(f"{self._where()} was just taken by another m2f run{shard}") from None
        who = seen.holder.get("holder") or "unknown holder"
        if seen.age_s is None or seen.age_s < LEASE_STALE_S:
            age = "" if seen.age_s is None else f"; last renewed {max(0.0, seen.age_s):.0f} s ago by the store's clock"
            raise OutputLockedError(f"{self._where()} is in use by another m2f run{shard} ({who}{age}; "
                                    f"a lease not renewed for {LEASE_STALE_S:g} s is taken over)")
        try:  # stale: replace it, but only if nobody renewed or took it since we read it
            return self.store.replace(self.key, body, seen.version)
        except _Conflict:
            raise OutputLockedError(f"{self._where()} was just taken over by another m2f run{shard}") from None

    def renew(self) -> bool:
        """One conditional renewal. False when it could not be sent (retried later); a failed
        condition means the lease was taken over: lost is set and LeaseLostError follows."""
        with self._mutex:
            if self.lost:
                raise LeaseLostError(5, self.lost)
            sent = time.monotonic()
            self.renewals += 1
            try:
                self.version = self.store.replace(self.key, self._body(), self.version)
            except _Conflict:
                seen = None
                try:
                    seen = self.store.read(self.key)
                except Exception:  # noqa: BLE001 - only for the message
                    pass
                if seen is not None and seen.holder.get("holder") == self.holder:
                    # only this lease writes its holder name: an earlier write of ours landed
                    # although its request failed (or was retried), so the version we knew is old
                    self.version = seen.version
                else:
                    who = (seen.holder.get("holder") if seen else None) or "another m2f run"
                    self.lost = f"{self._where()}: this run's lease was taken over by {who}; stopped writing"
                    raise LeaseLostError(5, self.lost) from None
            except Exception:  # noqa: BLE001 - a missed renewal is retried; ensure() bounds the wait
                return False
            self._confirmed = sent
            return True

    def ensure(self) -> None:
        """Raise LeaseLostError unless this run may still write (before every write)."""
        if self.lost:
            raise LeaseLostError(5, self.lost)
        idle = time.monotonic() - self._confirmed
        if idle > LEASE_VALID_S:
            self.lost = (f"{self._where()}: this run's lease was not renewed for {idle:.0f} s (store "
                         f"unreachable?); stopped writing before another run may take it over")
            raise LeaseLostError(5, self.lost)

    def _renew_loop(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                self.renew()
            except LeaseLostError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost or not self.version:
            return
        try:
            self.store.delete(self.key, self.version)
        except Exception:  # noqa: BLE001 - the lease then expires on its own
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


def _output_error(what: str, e: BaseException) -> OutputError:
    """OutputError("<what> (<first line of e>)"), with e's errno when the backend gave one."""
    return OutputError(getattr(e, "errno", None) or 5, f"{what} ({one_line(e)})")
