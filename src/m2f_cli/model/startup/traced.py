"""The start-up cache: a TorchScript trace of the model as m2f runs it eagerly, for ~1.15x faster forwards.

Before the model had a definition of its own (model/native), the trace's point was the start-up:
importing transformers' Mask2Former costs ~2 s (torch.distributed.tensor, torch._dynamo, sympy,
scipy.optimize) and a trace loads with torch alone. Now an eager run imports no transformers
either, and the trace's gain is its frozen forward: 0.47-0.51 s against 0.54-0.58 s eager at
384x384 (full Swin-T, batch 1, 2-core AMX Xeon), bit-identical outputs.

What is traced: the predictor loading.eager_predictor gives (m2f's own model where it covers the
checkpoint, else transformers'; pixel_values -> (class logits, mask logits), with m2f's deformable
attention), on CPU in float32, for ONE input size: a trace records
the operations run for that size, so it is only used where preprocessing gives every image the same
model input size (``--resize checkpoint`` on the COCO checkpoints: 384x384). The batch dimension stays
free (tested against the eager model at batch sizes 1-3). The trace is frozen (``torch.jit.freeze``:
weights become constants) and runs under ``torch.jit.optimized_execution(False)``
(the profiling executor's first two calls cost ~2 extra forwards for no steady-state gain).

The cache file's name is ``<folder>-<folder hash>-<H>x<W>-<env>-<key>.pt``. ``env`` is a digest of
what this environment runs the trace with: the versions of torch, transformers, m2f, of this module,
deformable.py and model/native, the dtype and the fast-deformable and native-model switches.
``key`` adds the input size and the model folder's fingerprint (fingerprint.py): a content hash of its JSON and weight files, each weight
file's digest computed once and remembered by path, size, mtime, ctime and inode. Content, not
path/size/mtime: weights retrained with the same shapes and copied with preserved or normalised
mtimes (``rsync -a``, tar, container images with mtime 0) get another key. (The other way, the
safetensors header plus a sampled digest, would cost less on first use but can miss a change in the
bytes it does not sample; hashing 190 MB once per file version is ~0.3 s.)
A new key for the same folder, size and env means new weights: that older trace is then removed,
unless a live process uses it. Traces of other environments sharing the cache (another torch, another
m2f) are left alone; the size cap (cache.py: ``M2F_CACHE_MAX_BYTES``, least recently used first)
bounds what accumulates. A trace is held with a shared flock while a process uses it (cache.py), so
no eviction, replacement or ``m2f cache clear`` deletes it under that process.
One process builds a trace at a time (``build_lock``); the others wait and load it. Writes are atomic
(temporary file + rename). Anything wrong with a cache file (unreadable, not a trace) means: warn,
delete it, load the model eagerly and rebuild. The archive also keeps the model config's id2label,
so a cached load names the classes exactly as a transformers load does.

Why TorchScript: torch 2.13 marks torch.jit deprecated in favour of torch.export, but loading this
model's ExportedProgram (``torch.export.load``) took ~20 s here, longer than the start-up it would
save. The jit calls below silence that DeprecationWarning; if a later torch drops torch.jit, building
fails with a warning and runs go on eagerly.

Location: ``$M2F_CACHE_DIR``, else ``$XDG_CACHE_HOME/m2f``, else ``~/.cache/m2f``; under ``traced/``
(fingerprint.cache_root, cache.traces_dir). ``--startup-cache off`` (``Segmenter(startup_cache="off")``)
neither reads nor writes it. ``m2f cache list`` / ``m2f cache clear`` (cli.py) show and empty it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from m2f_cli.version import __version__
from m2f_cli.model.startup import cache
from m2f_cli.model import deformable
from m2f_cli.model.categories import CategoryTable, categories_of
from m2f_cli.model.startup.fingerprint import model_fingerprint
from m2f_cli.errors import one_line

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what is traced changes in a way the key below does not see
_NATIVE = Path(deformable.__file__).parent / "native"
_SOURCES = (Path(__file__), Path(deformable.__file__), _NATIVE / "__init__.py", _NATIVE / "swin.py",
            _NATIVE / "heads.py")
_META = "m2f.json"  # in the archive: the traced model's config.id2label


def cache_dir() -> Path:
    """Where the traces are (cache.traces_dir: one place for the cache's location)."""
    return cache.traces_dir()


def eligible(device: torch.device, dtype: torch.dtype, compile: bool) -> bool:
    """Where a trace is used: CPU float32 without torch.compile (the only setting measured)."""
    return device.type == "cpu" and dtype == torch.float32 and not compile


def _versions() -> dict:
    try:
        tf = metadata.version("transformers")
    except metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        tf = "?"
    return {"format": FORMAT, "m2f": __version__, "torch": torch.__version__, "transformers": tf,
            "sources": [hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in _SOURCES]}


def env_key(dtype: torch.dtype) -> str:
    """A hex digest of what this environment runs a trace with (versions, dtype, switches): traces
    of other environments sharing the cache have another one, and are never replaced by ours."""
    from m2f_cli.model import native
    # "native": traces of m2f's own model definition (model/native), not transformers' (their
    # outputs differ by float rounding; a trace holds the one it was built from)
    doc = {**_versions(), "dtype": str(dtype), "fast_deformable": deformable.enabled(),
           "definition": "native" if native.enabled() else "transformers"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def cache_file(local_dir: str, size: tuple[int, int], env: str, suffix: str) -> Path:
    """<cache>/<folder name>-<folder hash>-<H>x<W>-<env>-<key><suffix>, where key digests env,
    the size and what the folder holds (fingerprint.model_fingerprint): a cached model of this
    folder at this size in this environment replaces only its own older versions (same name up to
    the key). Traces (env_key) and compiled packages (compiled.env_key) are named so."""
    folder = os.path.realpath(local_dir)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(folder))[:48] or "model"
    doc = {"env": env, "size": list(size), "model": model_fingerprint(local_dir)}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    stem = f"{slug}-{hashlib.sha256(folder.encode()).hexdigest()[:8]}-{size[0]}x{size[1]}-{env[:10]}"
    return cache_dir() / f"{stem}-{key[:20]}{suffix}"


def cache_path(local_dir: str, size: tuple[int, int], dtype: torch.dtype) -> Path:
    """Where the trace of this model folder at this input size lives (cache_file)."""
    return cache_file(local_dir, size, env_key(dtype), cache.SUFFIX)


class CachedPredictor:
    """A model loaded from a start-up cache file (a trace, or compiled.py's package): valid at the
    one input size it was built for, holding its file in use (cache.py) while it lives."""

    kind = "cached"

    def __init__(self, size: tuple[int, int], device: torch.device, categories: CategoryTable,
                 path: Optional[Path] = None, hold=None):
        self.size = tuple(size)
        self.device = device
        self.categories = categories
        self.path = path
        self._hold = hold  # the cache file, open with a shared flock: in use (cache.py)

    def release(self) -> None:
        """Let the cache evict or replace this predictor's file (it stays loaded here)."""
        if self._hold is not None:
            self._hold.close()
            self._hold = None

    def check_size(self, pixel_values: torch.Tensor) -> None:
        """Never run the model at another size than it was built at: ValueError."""
        if tuple(pixel_values.shape[-2:]) != self.size:
            raise ValueError(f"{self.kind} model takes {self.size[0]}x{self.size[1]} inputs, got "
                             f"{tuple(pixel_values.shape[-2:])}")


class TracedPredictor(CachedPredictor):
    """A traced model: pixel_values (B, 3, H, W) at the traced size -> (class logits, mask logits)."""

    kind = "traced"

    def __init__(self, module: torch.jit.ScriptModule, size: tuple[int, int], device: torch.device,
                 categories: CategoryTable, path: Optional[Path] = None, hold=None):
        super().__init__(size, device, categories, path, hold)
        self.module = module

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_size(pixel_values)
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            class_logits, mask_logits = self.module(pixel_values)
        return class_logits, mask_logits


@contextlib.contextmanager
def build_lock(path: Path, notify: Callable[[str], None] = log.info, wait_s: Optional[float] = None) -> Iterator[None]:
    """Held while this process loads through transformers and builds the cache entry at path, so
    that runs starting together on a machine (or on a cluster sharing the cache folder) build it
    once and the others load it: flock on <path>.lock, which the kernel drops when its holder dies.
    A lock this process holds already (a detached builder's: cache.adopt_lock) is not taken again.
    wait_s: wait at most that long for another holder (a detached builder may hold it for as long
    as its run lasts), then raise cache.BuildBusy; None waits as long as it takes.
    Raises cache.CacheLockError where the filesystem has no flock; where the lock file cannot be
    made at all (an unwritable cache), goes on without it (build then warns and runs untraced)."""
    if cache.adopted(path):
        yield
        return
    fd = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        _lock(fd, path, notify, wait_s)
    except OSError as e:
        if fd is not None:
            os.close(fd)
            fd = None
        if e.errno in cache.NO_FLOCK_ERRNOS:
            raise cache.no_flock(path, e) from None
    except cache.BuildBusy:
        os.close(fd)
        raise
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock(fd: int, path: Path, notify: Callable[[str], None], wait_s: Optional[float]) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    notify(f"waiting for another m2f process to build the start-up cache: {path}")
    if wait_s is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + wait_s
    while True:
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise cache.BuildBusy(path, wait_s) from None


def load(path: Path, size: tuple[int, int], device: torch.device) -> Optional[TracedPredictor]:
    """The cached trace at path, or None (absent; or unusable: then it is removed with a warning).
    Its label table is the one the traced model's config had (kept in the archive). The file stays
    held (in use) while the predictor lives: cache.open_in_use. Raises cache.CacheLockError."""
    hold = cache.open_in_use(path)
    if hold is None:
        return None
    extra = {_META: ""}
    try:
        with _quiet():
            module = torch.jit.load(hold, map_location=device, _extra_files=extra)
        id2label = json.loads(extra[_META])["id2label"]
    except Exception as e:  # noqa: BLE001 - any failure only means "rebuild"
        log.warning("m2f: %s: unusable cached trace (%s); rebuilding it", path, one_line(e)[:200])
        hold.close()
        cache.remove_if_unused(path)
        return None
    return TracedPredictor(module.eval(), size, device, categories_of(id2label), path, hold)


class _Forward(torch.nn.Module):
    """What is traced: the predictor's call, returning a plain tuple."""

    def __init__(self, predictor):
        super().__init__()
        self.model = predictor.model
        self.predictor = predictor

    def forward(self, pixel_values: torch.Tensor):
        return self.predictor(pixel_values)


def build(predictor, size: tuple[int, int], path: Path,
          notify: Callable[[str], None] = log.info) -> Optional[TracedPredictor]:
    """Trace an HFPredictor at size (batch 1), save it atomically at path, drop stale traces of the
    same model folder and size. None (with a warning) where that fails: the run goes on untraced."""
    notify(f"building the start-up cache for this model ({size[0]}x{size[1]}, once): {path}")
    t0 = time.perf_counter()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        example = torch.zeros(1, 3, *size, device=predictor.device)
        with _quiet():  # and TracerWarnings: the sizes a trace bakes in are part of its key
            module = torch.jit.trace(_Forward(predictor).eval(), (example,), check_trace=False)
            module = torch.jit.freeze(module)
        meta = json.dumps({"id2label": {str(k): v for k, v in predictor.id2label.items()}})
        # Serialised in memory, then written by Python: torch's file writer aborts the whole
        # process (an exception in a C++ destructor) when a write fails, e.g. a full disk or a
        # quota, and a cache must never cost the run. Briefly one more copy of the weights in RAM.
        buf = io.BytesIO()
        with _quiet():
            torch.jit.save(module, buf, _extra_files={_META: meta})
        fd, tmp = cache.partial_file(path, ".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getbuffer())
            del buf
            os.replace(tmp, path)
        except BaseException:
            _remove(Path(tmp))
            raise
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation, never a reason to fail
        log.warning("m2f: cannot build the start-up cache at %s (%s); going on without it "
                    "(set M2F_CACHE_DIR to a writable folder, or pass --startup-cache off)",
                    path, one_line(e)[:200])
        return None
    stem = path.name.rsplit("-", 1)[0]  # this folder, size and environment: older weights' traces
    for old in path.parent.glob(f"{stem}-*{cache.SUFFIX}"):
        if old.name != path.name:
            cache.remove_if_unused(old)  # one in use stays; the size cap evicts it later
    cache.evict(keep=path)
    log.info("m2f: traced in %.1f s", time.perf_counter() - t0)
    hold = cache.open_in_use(path)
    return TracedPredictor(module, size, predictor.device, predictor.categories, path, hold)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings from the jit calls (the deprecation notice is answered in the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
