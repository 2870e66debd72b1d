"""The compiled start-up cache: an AOTInductor package of the model, built once, loaded by later runs.

traced.py keeps a TorchScript trace of the eager model; this keeps the model
*compiled* across runs: ``torch.export`` of the predictor as m2f runs it (pixel_values -> (class
logits, mask logits), with deformable.py's embedding_bag attention inside the graph), compiled by
``torch._inductor.aoti_compile_and_package`` with inductor's freezing (weights folded in as
constants, so their layouts are prepacked for oneDNN/MKL), saved as one ``.pt2`` file next to the
traces, and loaded by aoti.py (the package's C interface through ctypes, so the forward runs with the
GIL released; else ``torch._C._aoti.AOTIModelPackageLoader``; torch alone either way: no
transformers, no inductor import). Batch 1 at the run's one model input size; a batch runs image by image
(batching gains nothing on CPU).

Building costs a compile of ~1.5-2 min on 2 cores (g++ on the generated kernels), so it never
happens inside a short run: a package is built by ``m2f cache build``, by a run that
``options.resolve_compile`` already judges long enough to pay a compile back (``--compile``, or
auto for 1000+ images), or by the one detached builder an interactive run may leave (builds.py:
who builds what, when). Every later run with the same key, however short, then loads it.

Same rules as the trace (traced.py, cache.py): the file name is ``<folder>-<hash>-<H>x<W>-<env>-
<key>.pt2``; the key holds the trace's (model fingerprint, input size, versions, dtype,
fast-deformable switch, but not traced.py's source), the code that is exported and compiled
(_Forward, _compile, deformable.py: not this whole module, so that a change to how packages are
found or built does not make them stale), inductor's switches and the CPU's instruction set (a package runs the vector code of the CPU it was built on; a cache folder shared by other CPUs
holds one package per kind). One builder at a time (``traced.build_lock``), atomic writes, in-use
shared locks while a process uses the package, LRU size cap with the traces, older weights'
packages of the same folder, size and env removed; anything wrong (no compiler, a failed export
or compile, an unreadable package) warns once and the run goes on with the trace or transformers.

dtype: float32, or bfloat16 where the CPU has fast bf16 kernels (model.cpu_has_fast_bf16): the
bf16 package is the model under bf16 autocast (weights kept in float32, matrix products and
convolutions in bf16), its deformable attention in bf16 too.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from m2f_cli.model.startup import aoti, cache, traced
from m2f_cli.model import deformable
from m2f_cli.model.categories import CategoryTable
from m2f_cli.errors import one_line

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what is compiled changes in a way the key does not see
SUFFIX = ".pt2"
# inductor's switches for the build (part of the key). freezing: 1.54x eager vs 1.30x without on
# this model (2-core AVX512-BF16 EPYC, docs/performance.md)
INDUCTOR = {"freezing": True}
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


def has_compiler() -> bool:
    """Whether a C++ compiler inductor can use is on PATH ($CXX, else g++, c++ or clang++)."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return any(shutil.which(n) for n in names)


def failed_marker(path: Path) -> Path:
    """<package>.failed: a build of this key failed (its error inside); no run starts or suggests
    another (m2f cache build retries; m2f cache clear forgets it)."""
    return path.with_name(path.name + ".failed")


def eligible(device: torch.device, dtype: torch.dtype) -> bool:
    """CPU, float32 or bfloat16 (bf16 only where resolve_dtype allowed it: fast bf16 kernels)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


def cpu_kind() -> dict:
    """What the generated code depends on: the vector ISA torch picked and the CPU's flags."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"machine": platform.machine(), "capability": torch.backends.cpu.get_cpu_capability(),
            "flags": sorted(flags.intersection(_CPU_FLAGS))}


def _compiled_source() -> str:
    """A digest of the code a package is made of (what is exported and how it is compiled), not of
    this whole module: a change to how packages are found, built in the background or loaded does
    not make every user's package stale (a ~2 min compile each). Plus deformable.py, whose attention
    is inside the graph; the model's own code is transformers' (its version is in the key)."""
    parts = [inspect.getsource(_Forward), inspect.getsource(_compile), Path(deformable.__file__).read_text()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def env_key(dtype: torch.dtype) -> str:
    versions = {k: v for k, v in traced._versions().items() if k != "sources"}  # not traced.py's code
    doc = {"versions": versions, "dtype": str(dtype), "fast_deformable": deformable.enabled(),
           "format": FORMAT, "source": _compiled_source(), "inductor": INDUCTOR, "cpu": cpu_kind()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def cache_path(local_dir: str, size: tuple[int, int], dtype: torch.dtype) -> Path:
    """<cache>/<folder>-<folder hash>-<H>x<W>-<env>-<key>.pt2, next to the traces (traced.cache_file)."""
    return traced.cache_file(local_dir, size, env_key(dtype), SUFFIX)


class CompiledPredictor(traced.CachedPredictor):
    """A loaded AOTInductor package: pixel_values (B, 3, H, W) at its size -> (class logits,
    mask logits), float32 (a bf16 package's outputs are cast back: post-processing is float32)."""

    kind = "compiled"

    def __init__(self, runner, size: tuple[int, int], dtype: torch.dtype, categories: CategoryTable,
                 path: Optional[Path] = None, hold=None):
        super().__init__(size, torch.device("cpu"), categories, path, hold)
        self.runner = runner  # callable: list of input tensors -> list of output tensors
        self.dtype = dtype

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_size(pixel_values)
        x = pixel_values.float().contiguous()
        with torch.inference_mode():
            outs = [self.runner([x[i:i + 1]]) for i in range(x.shape[0])]
        if len(outs) == 1:
            cls, masks = outs[0][0], outs[0][1]
        else:
            cls = torch.cat([o[0] for o in outs])
            masks = torch.cat([o[1] for o in outs])
        return cls.float(), masks.float()


def _load_runner(path: str):
    """The package's runner, without importing inductor (~2.6 s): aoti.py's, which releases the
    GIL during the forward, else torch's own loader."""
    return aoti.load_runner(path)


def load(path: Path, size: tuple[int, int], dtype: torch.dtype,
         categories: CategoryTable) -> Optional[CompiledPredictor]:
    """The cached package at path, held in use; None when absent or unusable (then removed with a
    warning, as a damaged trace is). Raises cache.CacheLockError."""
    hold = cache.open_in_use(path)
    if hold is None:
        return None
    try:
        t0 = time.perf_counter()
        runner = _load_runner(str(path))
        log.info("m2f: compiled model loaded in %.2f s", time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - any failure only means "not this package"
        log.warning("m2f: %s: unusable compiled model (%s); removing it", path, one_line(e)[:200])
        hold.close()
        cache.remove_if_unused(path)
        return None
    return CompiledPredictor(runner, size, dtype, categories, path, hold)


class _Forward(torch.nn.Module):
    """What is exported: the model's call with m2f's deformable attention, under bf16 autocast
    for a bf16 package, returning a plain tuple."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, pixel_values: torch.Tensor):
        amp = torch.autocast("cpu", dtype=self.dtype) if self.dtype != torch.float32 else contextlib.nullcontext()
        with amp, deformable.patched(torch.device("cpu"), self.dtype):
            out = self.model(pixel_values=pixel_values)
        return out.class_queries_logits, out.masks_queries_logits


def _compile(model: torch.nn.Module, dtype: torch.dtype, size: tuple[int, int], package: str) -> None:
    """torch.export + AOTInductor with INDUCTOR's switches, written to package (a .pt2 path)."""
    import torch._inductor
    import torch._inductor.config as inductor_config
    example = torch.zeros(1, 3, *size)
    with torch.no_grad():
        exported = torch.export.export(_Forward(model, dtype).eval(), (example,), strict=False)
        with inductor_config.patch(INDUCTOR):
            torch._inductor.aoti_compile_and_package(exported, package_path=package)


def build(model: torch.nn.Module, size: tuple[int, int], dtype: torch.dtype, path: Path,
          categories: CategoryTable, notify: Callable[[str], None] = log.info) -> Optional[CompiledPredictor]:
    """Compile model (a loaded transformers Mask2Former in eval mode, on CPU) to path, atomically;
    drop older packages of the same folder, size and env; keep the cache under its cap. None
    (with a warning) where that fails: the caller goes on without it."""
    notify(f"compiling the model for this CPU ({size[0]}x{size[1]}, {str(dtype).replace('torch.', '')}; "
           f"once, ~2 min on 2 cores; later runs load it in about a second): {path}")
    t0 = time.perf_counter()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = cache.partial_file(path, SUFFIX)
        os.close(fd)
        _compile(model, dtype, size, tmp)
        os.replace(tmp, path)
        tmp = None
        failed_marker(path).unlink(missing_ok=True)
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation, never a reason to fail
        log.warning("m2f: cannot build the compiled model at %s (%s); going on without it",
                    path, one_line(e)[:300])
        try:
            failed_marker(path).write_text(one_line(e)[:2000] + "\n", encoding="utf-8")
        except OSError:
            pass
        return None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    stem = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{stem}-*{SUFFIX}"):
        if old.name != path.name:
            cache.remove_if_unused(old)
    cache.evict(keep=path)
    log.info("m2f: compiled in %.1f s", time.perf_counter() - t0)
    return load(path, size, dtype, categories)
