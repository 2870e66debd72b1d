"""What a model folder holds, as a content hash: the identity a settings record and a cache key use.

A model folder's fingerprint is a BLAKE2b digest over the names and full contents of its JSON
files (config, preprocessor) and weight files (``*.safetensors``, ``*.bin``). Weights retrained with
the same shapes and copied with preserved or normalised mtimes (``rsync -a``, tar, container images
with mtime 0) therefore get another fingerprint, which a key of path, size and mtime would miss.

Hashing the Swin-T checkpoint's 190 MB takes ~0.2-0.4 s, so each weight file's digest is remembered
in ``<cache>/digests.json`` by (resolved path, size, mtime, ctime, inode). The ctime is what makes
that memo safe: it changes on every write, rename or chmod of the file and no copy tool can set it,
so rewriting a file in place with the same size and a restored mtime still re-hashes it.
A memo that cannot be read or written only costs the re-hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

_JSON = ".json"
_WEIGHTS = (".safetensors", ".bin")
_CHUNK = 1 << 22
_lock = threading.Lock()


def cache_root() -> Path:
    """``$M2F_CACHE_DIR``, else ``$XDG_CACHE_HOME/m2f``, else ``~/.cache/m2f``."""
    root = os.environ.get("M2F_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "m2f") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "m2f")
    return Path(root)


def _memo_path() -> Path:
    return cache_root() / "digests.json"


def _stat_key(real: str) -> str:
    st = os.stat(real)
    return f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"


def _read_memo() -> dict:
    try:
        with open(_memo_path(), encoding="utf-8") as f:
            memo = json.load(f)
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_memo(memo: dict) -> None:
    memo = {k: v for k, v in memo.items() if os.path.exists(k.split("\0", 1)[0])}  # files gone: forgotten
    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".digests-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(memo, f)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("digest memo not saved (%s)", e)


def file_digest(path: str) -> str:
    """Hex BLAKE2b-128 of a file's content, remembered while the file's stat is unchanged."""
    real = os.path.realpath(path)
    key = _stat_key(real)
    with _lock:
        memo = _read_memo()
        if key in memo:
            return memo[key]
        ahead = _ahead.pop(key, None)
    digest = ahead.result() if ahead is not None else _hash(real)
    with _lock:
        memo = _read_memo()
        # keep one entry per file: a file's older versions are never asked for again
        memo = {k: v for k, v in memo.items() if k.split("\0", 1)[0] != real}
        memo[key] = digest
        _write_memo(memo)
    return digest


def _check_key(path: str, check: str) -> Optional[tuple[str, str]]:
    """(the file's resolved path, the memo key of check for the file as it is now), or None when
    the file cannot be stat'ed."""
    real = os.path.realpath(path)
    try:
        return real, _stat_key(real) + "\0" + check
    except OSError:
        return None


def checked(path: str, check: str) -> bool:
    """Whether check (a name, e.g. "crc:<member>") was passed by this file at its current stat
    (remember_check): the same (path, size, mtime, ctime, inode) memo as the digests, so any
    write, rename or copy over the file asks for the check again."""
    at = _check_key(path, check)
    if at is None:
        return False
    with _lock:
        return _read_memo().get(at[1]) == "passed"


def remember_check(path: str, check: str) -> None:
    """Record that the file passed check at its current stat (checked), forgetting its older ones."""
    at = _check_key(path, check)
    if at is None:
        return
    real, key = at
    tail = "\0" + check
    with _lock:
        memo = {k: v for k, v in _read_memo().items() if not (k.split("\0", 1)[0] == real and k.endswith(tail))}
        memo[key] = "passed"
        _write_memo(memo)


def _hash(real: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(real, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _Ahead:
    """A digest computed on a thread of its own (prefetch_digests); result() waits for it and
    raises what the hashing raised."""

    def __init__(self, real: str):
        self._done = threading.Event()
        self._value: Optional[str] = None
        self._error: Optional[BaseException] = None
        threading.Thread(target=self._run, args=(real,), name="m2f-digest", daemon=True).start()

    def _run(self, real: str) -> None:
        try:
            self._value = _hash(real)
        except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the digest
            self._error = e
        finally:
            self._done.set()

    def result(self) -> str:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


# stat key -> the digest being computed ahead for it
_ahead: dict[str, _Ahead] = {}


def prefetch_digests(local_dir: str) -> None:
    """Start hashing a model folder's weight files that the memo does not know, each on a daemon
    thread, so that a model's first run hashes its ~190 MB (~0.25 s) while the CLI imports torch
    (~1 s of Python; hashlib releases the GIL). file_digest takes the result instead of hashing
    again; the thread writes nothing (file_digest writes the memo), so a process that ends first
    leaves nothing behind. Never raises: a folder it cannot read is hashed, or refused, later."""
    try:
        names = sorted(os.listdir(local_dir))
        with _lock:
            memo = _read_memo()
            for name in names:
                path = os.path.join(local_dir, name)
                if name.endswith(_WEIGHTS) and os.path.isfile(path):
                    real = os.path.realpath(path)
                    key = _stat_key(real)
                    if key not in memo and key not in _ahead:
                        _ahead[key] = _Ahead(real)
    except OSError as e:
        log.debug("weights not hashed ahead (%s)", e)


def model_fingerprint(local_dir: str) -> str:
    """Hex digest of a model folder's JSON and weight files (names and contents)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(os.listdir(local_dir)):
        path = os.path.join(local_dir, name)
        if name.endswith(_JSON) and os.path.isfile(path):
            h.update(name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
        elif name.endswith(_WEIGHTS) and os.path.isfile(path):
            h.update(f"{name}\0{file_digest(path)}\0".encode())
    return h.hexdigest()
