"""Stage 4: resolve, load and run the model.

Loading: a hub id (optionally pinned with a revision) or a local folder; safetensors only unless
the user opts in to pickle. Every hub/file problem becomes one ModelLoadError line saying what to do.
Running: a Predictor maps pixel_values (B, 3, H, W) to (class logits (B, Q, C+1), mask logits
(B, Q, H/4, W/4)); tests plug in their own predictors through the same interface.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from m2f_cli.model import deformable
from m2f_cli.model.categories import CategoryTable, categories_of
from m2f_cli.errors import DeviceError, ModelLoadError, one_line

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from. local_dir is the folder actually loaded (a hub cache snapshot
    for hub ids); revision is the requested revision, commit the resolved one when known."""

    spec: str
    local_dir: str
    revision: Optional[str]
    commit: Optional[str]
    from_hub: bool


def resolve_model(spec: str, revision: Optional[str] = None, allow_pickle: bool = False) -> ModelSource:
    """Find a model folder: spec is a local folder or a hub id (downloaded or taken from the cache)."""
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise ModelLoadError(f"{spec}: no config.json in this folder; it is not a saved model")
        return ModelSource(spec, os.path.abspath(spec), revision, None, False)
    if os.path.exists(spec):
        raise ModelLoadError(f"{spec}: --model must be a folder (save_pretrained output) or a hub id")
    if spec.count("/") > 1 or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"{spec}: no such model folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    patterns = ["*.json", "*.safetensors"] + (["*.bin"] if allow_pickle else [])
    try:
        path = snapshot_download(spec, revision=revision, allow_patterns=patterns)
    except RevisionNotFoundError:
        raise ModelLoadError(f"{spec}: revision {revision!r} does not exist") from None
    except GatedRepoError:
        raise ModelLoadError(f"{spec}: gated model; log in with `hf auth login` first") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{spec}: no such model on the hub (or it is private)") from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{spec}: not in the local cache and the hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if os.environ.get('HF_HUB_OFFLINE') else ''}; "
            f"download it where there is network (`hf download {spec}`) or pass --model DIR "
            f"with a save_pretrained folder") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{spec}: cannot download ({one_line(e)}); "
                             f"retry, or pass --model DIR with a local copy") from None
    commit = os.path.basename(os.path.normpath(path))
    return ModelSource(spec, path, revision, commit, True)


def resolve_device(name: str) -> torch.device:
    """auto -> cuda, then mps, then cpu. Raises DeviceError for a device that is not here."""
    n = name.strip().lower()
    if n == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(n)
    except RuntimeError:
        raise DeviceError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available here (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise DeviceError(f"--device {name}: MPS is not available here")
    elif dev.type != "cpu":
        raise DeviceError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: float32 on CPU and MPS, bfloat16 on CUDA cards that support it, else float16.
    float16 on CPU is refused: it has no fast kernels there and is ~100x slower."""
    n = name.strip().lower()
    if n == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if n not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected auto, float32, bfloat16 or float16")
    if n == "float16" and device.type == "cpu":
        raise ValueError("--dtype float16 is not supported on CPU (no fast kernels); use float32")
    if n == "bfloat16" and device.type == "cpu" and not cpu_has_fast_bf16():
        raise ValueError("--dtype bfloat16: this CPU has no fast bfloat16 kernels (no AVX512-BF16 or AMX); "
                         "it would run ~100x slower than float32")
    return DTYPES[n]


def cpu_has_fast_bf16() -> bool:
    """oneDNN's own answer: AVX512-BF16/AMX present (measured here without it: bf16 100x slower)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Predictor(Protocol):
    """pixel_values (B, 3, H, W) float32 on its device -> (class logits (B, Q, C+1),
    mask logits (B, Q, H/4, W/4)); any float dtype, post-processing casts to float32."""

    device: torch.device
    categories: CategoryTable

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class HFPredictor:
    """A transformers Mask2FormerForUniversalSegmentation, run under inference_mode and autocast."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype = torch.float32,
                 compile: bool = False):
        self.model = model.to(device).eval()
        self.device = device
        self.dtype = dtype
        self.id2label = dict(getattr(getattr(model, "config", None), "id2label", None)
                             or getattr(model, "id2label", None) or {})
        self.categories = categories_of(self.id2label)
        self.compiling = compile  # torch.compile: the first forward of each input shape compiles
        self._forward = torch.compile(self.model) if compile else self.model

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(), self._autocast(), deformable.patched(self.device, self.dtype):
            out = self._forward(pixel_values=pixel_values)
        return out.class_queries_logits, out.masks_queries_logits


class NativePredictor(HFPredictor):
    """m2f's own definition of the model (model/native), run as HFPredictor runs transformers'."""

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(), self._autocast():
            return self._forward(pixel_values)


def eager_predictor(source: "ModelSource", device: torch.device, dtype: torch.dtype, allow_pickle: bool = False,
                    compile: bool = False) -> HFPredictor:
    """The model run eagerly (or under torch.compile): m2f's own definition where it covers the
    checkpoint exactly (no transformers import: ~2 s sooner), else transformers'."""
    from m2f_cli.model import native
    if native.enabled():
        _check_weights(source, allow_pickle)
        try:
            model = native.load(source.local_dir, allow_pickle)
        except Exception as e:  # noqa: BLE001 - OSError, ValueError, safetensors' SafetensorError, ...
            raise ModelLoadError(f"{source.local_dir}: cannot load the model ({one_line(e)})") from None
        if model is not None:
            return NativePredictor(model, device, dtype, compile)
    return HFPredictor(load_model(source, allow_pickle), device, dtype, compile)


def _check_weights(source: "ModelSource", allow_pickle: bool) -> None:
    has_st = any(f.endswith(".safetensors") for f in os.listdir(source.local_dir))
    if not has_st and not allow_pickle:
        raise ModelLoadError(f"{source.local_dir}: no .safetensors weights; pass --allow-pickle to load "
                             f"pytorch_model.bin (it runs pickle: only for files you trust)")


def load_model(source: ModelSource, allow_pickle: bool = False) -> torch.nn.Module:
    """Load the weights of a resolved source. safetensors only unless allow_pickle."""
    _check_weights(source, allow_pickle)
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own progress only; stderr stays clean for logs
    try:
        return Mask2FormerForUniversalSegmentation.from_pretrained(
            source.local_dir, use_safetensors=None if allow_pickle else True)
    except Exception as e:  # OSError, ValueError, safetensors' own SafetensorError (a corrupt file), ...
        raise ModelLoadError(f"{source.local_dir}: cannot load the model ({one_line(e)})") from None


def read_categories(source: ModelSource) -> CategoryTable:
    """The label table from a model folder's config.json, without loading any weights."""
    try:
        with open(os.path.join(source.local_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        # as transformers' config does: without id2label, num_labels classes named LABEL_i
        id2label = cfg.get("id2label") or {i: f"LABEL_{i}" for i in range(int(cfg.get("num_labels") or 0))}
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{source.local_dir}: unreadable config.json ({e})") from None
    return categories_of(id2label)


# How long a run waits for another process's build of the cache entry it needs before it goes on
# without it: a detached builder holds its lock for as long as the run that started it lasts.
BUILD_WAIT_S = 60.0
BUILD_MODES = ("inline", "none", "detach")


@dataclass
class Loaded:
    """load()'s answer: the predictor, and what a one-time build would give later runs (hint: one
    line naming the command, builds.hint) unless a detached builder was started for it."""

    predictor: "Predictor"
    hint: Optional[str] = None


def load_predictor(source: ModelSource, device: torch.device, dtype: torch.dtype, **kwargs) -> "Predictor":
    """The model of source, ready to run (load's predictor)."""
    return load(source, device, dtype, **kwargs).predictor


def load(source: ModelSource, device: torch.device, dtype: torch.dtype, *, allow_pickle: bool = False,
         compile: bool = False, trace_size: Optional[tuple[int, int]] = None,
         notify: Optional[Callable[[str], None]] = None, builds: str = "inline",
         announce: Optional[Callable[[str], None]] = None, cache_mode: str = "auto") -> Loaded:
    """Load source for a run. trace_size: the run's one model input size, if it has one; then on
    CPU the start-up cache is used: a compiled package (compiled.py) when one is cached, else in
    float32 the trace (traced.py). What is missing is built (builds.py says who builds what, when):
    compile: the compiled package, in this process (a run long enough to pay for it); builds
    "inline": the trace, in this process; "detach": one detached builder, once this process has
    exited (the CLI at a terminal only: announce gets its one line); "none": nothing (Loaded.hint
    names the command). cache_mode "trace": no compiled package (builds.startup_mode). Waits for
    another process's build at most BUILD_WAIT_S."""
    from m2f_cli.model.startup import compiled, traced
    from m2f_cli.model.startup.cache import BuildBusy
    from m2f_cli.errors import CacheLockError
    if builds not in BUILD_MODES:
        raise ValueError(f"builds {builds!r}: expected one of {', '.join(BUILD_MODES)}")
    notify = notify or log.info
    # torch.compile only where no compiled package can stand for it (GPUs, float16, cache off)
    packages = compiled.eligible(device, dtype) and cache_mode == "auto"
    torch_compile = compile and not packages
    fresh = lambda: eager_predictor(source, device, dtype, allow_pickle, torch_compile)  # noqa: E731
    if trace_size is None:
        return Loaded(fresh())
    try:
        plan = _best_plan(source, device, dtype, trace_size, torch_compile, packages)
        got = _cached(source, device, dtype, trace_size, torch_compile, packages)
        if got is not None and (plan is None or plan.kind != "compiled" or got.kind == "compiled"):
            return Loaded(got)
        if compile and plan is not None and plan.kind == "compiled":
            built = _build_compiled(source, trace_size, dtype, plan.path, allow_pickle, notify)
            if built is not None:
                return Loaded(built)
            plan = _best_plan(source, device, dtype, trace_size, torch_compile, packages)  # failed: the trace now
        if got is None and builds == "inline" and traced.eligible(device, dtype, torch_compile):
            path = traced.cache_path(source.local_dir, trace_size, dtype)
            with traced.build_lock(path, notify, wait_s=BUILD_WAIT_S):
                got = traced.load(path, trace_size, device)  # another process may have built it
                if got is None:
                    predictor = eager_predictor(source, device, dtype, allow_pickle)
                    return Loaded(traced.build(predictor, trace_size, path, notify) or predictor)
        return _leave(got or fresh(), plan, builds, announce or notify)
    except BuildBusy as e:
        notify(f"{e}; this run goes on without waiting for it")
    except CacheLockError as e:  # no flock where the cache is: one line, and the run goes on without it
        log.warning("m2f: %s", e.args[-1])
    except OSError as e:
        log.warning("m2f: start-up cache unavailable (%s)", e)
    return Loaded(fresh())


def _leave(predictor: "Predictor", plan, builds: str, announce: Callable[[str], None]) -> Loaded:
    """What this run leaves for later ones: a detached builder ("detach", builds.spawn), or the hint."""
    from m2f_cli.model.startup import builds as background
    if plan is None:
        return Loaded(predictor)
    if builds == "detach" and background.enabled():
        background.spawn(plan, announce)  # not started: another builds it now, or it was killed twice
        return Loaded(predictor)
    return Loaded(predictor, background.hint(plan))


def _best_plan(source: ModelSource, device: torch.device, dtype: torch.dtype, size: tuple[int, int],
               torch_compile: bool, packages: bool):
    """What a build of this model's start-up cache would make here (builds.Plan), or None: the
    compiled package (a C++ compiler, no failed build of it), else the trace."""
    from m2f_cli.model.startup import compiled, traced
    from m2f_cli.model.startup.builds import Plan
    if packages and compiled.has_compiler():
        path = compiled.cache_path(source.local_dir, size, dtype)
        if not compiled.failed_marker(path).exists():
            return Plan("compiled", path, source.local_dir, size, str(dtype).replace("torch.", ""), source.spec)
    if traced.eligible(device, dtype, torch_compile):
        return Plan("trace", traced.cache_path(source.local_dir, size, dtype), source.local_dir, size,
                    "float32", source.spec)
    return None


def _cached(source: ModelSource, device: torch.device, dtype: torch.dtype, size: tuple[int, int],
            torch_compile: bool, packages: bool) -> Optional["Predictor"]:
    """The cached compiled package of this model, else its trace, else None."""
    from m2f_cli.model.startup import compiled, traced
    if packages:
        got = compiled.load(compiled.cache_path(source.local_dir, size, dtype), size, dtype, read_categories(source))
        if got is not None:
            return got
    if traced.eligible(device, dtype, torch_compile):
        return traced.load(traced.cache_path(source.local_dir, size, dtype), size, device)
    return None


def _build_compiled(source: ModelSource, size: tuple[int, int], dtype: torch.dtype, path, allow_pickle: bool,
                    notify: Callable[[str], None]) -> Optional["Predictor"]:
    """Compile the package at path in this process (after at most BUILD_WAIT_S for another
    builder); None when that fails or another process keeps building it (said in one line)."""
    from m2f_cli.model.startup import compiled, traced
    from m2f_cli.model.startup.cache import BuildBusy
    categories = read_categories(source)
    try:
        with traced.build_lock(path, notify, wait_s=BUILD_WAIT_S):
            got = compiled.load(path, size, dtype, categories)
            if got is None:
                model = load_model(source, allow_pickle).eval()
                got = compiled.build(model, size, dtype, path, categories, notify)
            return got
    except BuildBusy as e:
        notify(f"{e}; this run does not compile it too and goes on without it")
    return None
