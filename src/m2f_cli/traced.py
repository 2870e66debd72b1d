"""The start-up cache: a TorchScript trace of the loaded model, so that later runs skip transformers.

On the 2-core build machine a run spends ~8 s before its first forward pass: importing torch
(~2.5 s), importing transformers' Mask2Former (~4.7 s: it pulls in torch.distributed.tensor,
torch._dynamo, sympy and scipy.optimize) and ``from_pretrained`` (~0.6-0.9 s). A trace saved with
``torch.jit.save`` loads in ~0.6 s with torch alone, so a run on a cached model starts ~5 s sooner.

What is traced: the model as m2f runs it (``HFPredictor``: pixel_values -> (class logits, mask
logits), with m2f's deformable attention), on CPU in float32, for ONE input size: a trace records
the operations run for that size, so it is only used where preprocessing gives every image the same
model input size (``--resize checkpoint`` on the COCO checkpoints: 384x384). The batch dimension stays
free (tested against the eager model at batch sizes 1-3). The trace is frozen (``torch.jit.freeze``:
weights become constants, ~1.8 s once) and runs under ``torch.jit.optimized_execution(False)``
(the profiling executor's first two calls cost ~2 extra forwards for no steady-state gain).

Measured with the full Swin-T model at 384x384, batch 1, same process (2-core build machine):
forward ~1.2 s vs ~1.3-1.4 s eager; peak RSS 619 MB vs 717 MB eager (an unfrozen trace: 976 MB);
outputs identical at batch 1, within 2.5e-5 (mask logits) at batch 2-3, the size of the last-bit
changes batch mates already cause in eager mode.

The cache file's name carries a key of everything the trace depends on: the model folder's
config/preprocessor JSON (content) and weight files (resolved path, size, mtime, as Python's own
bytecode cache does), the input size, dtype, the fast-deformable switch, and the versions of torch,
transformers, m2f and of this module and deformable.py. A different key builds a new trace; the
previous trace of the same model folder and size is then removed. One process builds a trace at a
time (``build_lock``); the others wait and load it. Writes are atomic (temporary file + rename).
Anything wrong with a cache file (unreadable, not a trace) means: warn, delete it, load through
transformers and rebuild. The archive also keeps the model config's id2label, so a cached load names
the classes exactly as a transformers load does.

Why TorchScript: torch 2.13 marks torch.jit deprecated in favour of torch.export, but loading this
model's ExportedProgram (``torch.export.load``) took ~20 s here, longer than the start-up it would
save. The jit calls below silence that DeprecationWarning; if a later torch drops torch.jit, building
fails with a warning and runs go on through transformers.

Location: ``$M2F_CACHE_DIR``, else ``$XDG_CACHE_HOME/m2f``, else ``~/.cache/m2f``; under ``traced/``.
``--no-trace-cache`` (``Segmenter(trace_cache=False)``) neither reads nor writes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from . import __version__, deformable
from .categories import CategoryTable
from .storage import one_line

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what is traced changes in a way the key below does not see
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_SOURCES = (Path(__file__), Path(deformable.__file__))
_META = "m2f.json"  # in the archive: the traced model's config.id2label


def cache_dir() -> Path:
    root = os.environ.get("M2F_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "m2f") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "m2f")
    return Path(root) / "traced"


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


def cache_key(local_dir: str, size: tuple[int, int], dtype: torch.dtype) -> str:
    """A hex digest of everything the trace of this model folder at this input size depends on."""
    h = hashlib.sha256()
    h.update(json.dumps({**_versions(), "size": list(size), "dtype": str(dtype),
                         "fast_deformable": deformable.enabled()}, sort_keys=True).encode())
    for name in sorted(os.listdir(local_dir)):
        path = os.path.join(local_dir, name)
        if name.endswith(".json"):
            h.update(name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
        elif name.endswith(_WEIGHT_SUFFIXES):
            real = os.path.realpath(path)
            st = os.stat(real)
            h.update(f"{name}\0{real}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def cache_path(local_dir: str, size: tuple[int, int], dtype: torch.dtype) -> Path:
    """<cache>/<folder name>-<folder hash>-<H>x<W>-<key>.pt: one name stem per model folder and size."""
    folder = os.path.realpath(local_dir)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(folder))[:48] or "model"
    stem = f"{slug}-{hashlib.sha256(folder.encode()).hexdigest()[:8]}-{size[0]}x{size[1]}"
    return cache_dir() / f"{stem}-{cache_key(local_dir, size, dtype)[:24]}.pt"


class TracedPredictor:
    """A traced model: pixel_values (B, 3, H, W) at the traced size -> (class logits, mask logits)."""

    def __init__(self, module: torch.jit.ScriptModule, size: tuple[int, int], device: torch.device,
                 categories: CategoryTable, path: Optional[Path] = None):
        self.module = module
        self.size = tuple(size)
        self.device = device
        self.categories = categories
        self.path = path

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(pixel_values.shape[-2:]) != self.size:
            # a trace is only valid at the size it was recorded at: never run it at another one
            raise ValueError(f"traced model takes {self.size[0]}x{self.size[1]} inputs, got "
                             f"{tuple(pixel_values.shape[-2:])}")
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            class_logits, mask_logits = self.module(pixel_values)
        return class_logits, mask_logits


@contextlib.contextmanager
def build_lock(path: Path, notify: Callable[[str], None] = log.info) -> Iterator[None]:
    """Held while this process loads through transformers and builds the trace at path, so that
    runs starting together on a machine (or on a cluster sharing the cache folder) build it once
    and the others load it: flock on <path>.lock, which the kernel drops when its holder dies.
    Best effort: where the lock cannot be taken, go on without it (builds are atomic anyway)."""
    fd = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            notify(f"waiting for another m2f process to build the start-up cache: {path}")
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        if fd is not None:
            os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def load(path: Path, size: tuple[int, int], device: torch.device) -> Optional[TracedPredictor]:
    """The cached trace at path, or None (absent; or unusable: then it is removed with a warning).
    Its label table is the one the traced model's config had (kept in the archive)."""
    if not path.exists():
        return None
    extra = {_META: ""}
    try:
        with _quiet():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        id2label = json.loads(extra[_META])["id2label"]
    except Exception as e:  # noqa: BLE001 - any failure only means "rebuild"
        log.warning("m2f: %s: unusable cached trace (%s); rebuilding it", path, one_line(e)[:200])
        _remove(path)
        return None
    from .model import categories_of
    return TracedPredictor(module.eval(), size, device, categories_of(id2label), path)


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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            meta = json.dumps({"id2label": {str(k): v for k, v in predictor.id2label.items()}})
            with _quiet():
                torch.jit.save(module, tmp, _extra_files={_META: meta})
            os.replace(tmp, path)
        except BaseException:
            _remove(Path(tmp))
            raise
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation, never a reason to fail
        log.warning("m2f: cannot build the start-up cache at %s (%s); going on without it "
                    "(set M2F_CACHE_DIR to a writable folder, or pass --no-trace-cache)",
                    path, one_line(e)[:200])
        return None
    stem = path.name.rsplit("-", 1)[0]
    for old in [*path.parent.glob(f"{stem}-*.pt"), *path.parent.glob(f"{stem}-*.pt.lock")]:
        if old.name not in (path.name, f"{path.name}.lock"):
            _remove(old)
    log.info("m2f: traced in %.1f s", time.perf_counter() - t0)
    return TracedPredictor(module, size, predictor.device, predictor.categories, path)


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
