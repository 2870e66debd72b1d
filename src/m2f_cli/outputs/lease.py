"""The lease: who may write into an output location on object storage (RemoteOutputFolder's lock).

What "exclusive" means on object storage (docs/object-storage.md): the output-folder lock is a
lease, an object naming its holder, taken and renewed only through the store's own conditional
writes, so that of two runs racing for it exactly one wins however slow their uploads are:
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
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Optional

from m2f_cli.errors import LeaseLostError, OutputLockedError, RemoteError

if TYPE_CHECKING:
    from m2f_cli.outputs.folder import OutputFolder  # a RemoteOutputFolder (it imports this module)

LEASE_RENEW_S = 20.0   # the holder renews its lease this often
LEASE_VALID_S = 60.0   # the holder stops writing this long after its last successful renewal
LEASE_STALE_S = 90.0   # another run takes over a lease the store saw last written this long ago
UNSAFE_REMOTE_ENV = "M2F_UNSAFE_REMOTE"  # "1": best-effort lease on backends without conditional writes


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


class Lease:
    """The output-folder lock on object storage (see the module docstring)."""

    def __init__(self, folder: OutputFolder, url: str, store: _LeaseStore):
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
