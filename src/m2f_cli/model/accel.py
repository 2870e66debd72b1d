"""Accelerator plumbing that every engine shares, written so that all of it runs (and is tested) on CPU.

- ``stack_pixels``: a batch of (3, H, W) samples stacked straight into page-locked (pinned) memory when
  the model runs on CUDA, so the host-to-device copy with ``non_blocking=True`` is asynchronous (a copy
  from pageable memory is synchronous whatever the flag says).
- ``DeviceTimer``: seconds of device work. CUDA: events recorded on the stream, read once the work is
  done, so timing never stalls the stream (the next batch's forward overlaps the host post-processing);
  MPS: ``torch.mps.synchronize()`` before the clock stops; CPU: the clock alone.
- ``is_out_of_memory``: CUDA (``torch.OutOfMemoryError``) and MPS ("MPS backend out of memory") OOMs.
- ``cuda_batch_size``: a batch size for a card's memory.
- ``MpsFallbackNotices``: torch's "will fall back to run on the CPU" warnings as one notice line per op.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch


def pin_available() -> bool:
    """Page-locked host memory needs a CUDA driver; a CPU-only torch cannot allocate it."""
    return torch.cuda.is_available()


def stack_pixels(pixels: Sequence[torch.Tensor], pin: bool = False) -> torch.Tensor:
    """B tensors (3, H, W) float32 of one shape -> (B, 3, H, W) float32, in pinned memory when pin
    is true and CUDA exists (else ordinary memory: the same values either way)."""
    first = pixels[0]
    out = torch.empty((len(pixels), *first.shape), dtype=first.dtype, pin_memory=pin and pin_available())
    return torch.stack(list(pixels), out=out)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA, MPS); nothing on CPU, where work is synchronous."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class DeviceTimer:
    """Device seconds of the work queued between start() and stop().

    On CUDA the two events are recorded on the current stream and elapsed() waits for the second
    one only when asked (after the caller waited for its results anyway); on MPS stop() synchronises;
    on CPU the work is done when stop() is called.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._events = None
        self._t0 = self._t1 = 0.0

    def start(self) -> "DeviceTimer":
        if self.device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> "DeviceTimer":
        if self._events is not None:
            self._events[1].record()
        else:
            synchronize(self.device)
            self._t1 = time.perf_counter()
        return self

    def elapsed(self) -> float:
        if self._events is not None:
            self._events[1].synchronize()
            return self._events[0].elapsed_time(self._events[1]) / 1000.0
        return self._t1 - self._t0


def is_out_of_memory(e: BaseException) -> bool:
    """A device out-of-memory error (CUDA's typed one, or MPS's RuntimeError)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def free_device_memory(device: torch.device) -> None:
    """Return cached blocks after an OOM so that the smaller retry can use them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


# Device memory one 384x384 image takes through the Swin-T Mask2Former forward, with margin for the
# batched post-processing (postprocess/device.py); bf16/fp16 halve the activations. A planning figure:
# an OOM still splits the batch (engines.batches.start_batch), and benchmarks/gpu.py's sweep measures it.
BYTES_PER_IMAGE_384 = 600 * 1024 ** 2
MAX_CUDA_BATCH = 32


def cuda_batch_size(total_bytes: int, padded: tuple[int, int], dtype: torch.dtype) -> int:
    """A power-of-two batch size using at most half the card's memory for the model's activations,
    between 1 and MAX_CUDA_BATCH (beyond that larger batches no longer raise throughput)."""
    per_image = BYTES_PER_IMAGE_384 * (padded[0] * padded[1]) / (384 * 384)
    if dtype in (torch.bfloat16, torch.float16):
        per_image /= 2
    fit = int(0.5 * total_bytes // max(1, per_image))
    bs = 1
    while bs * 2 <= min(fit, MAX_CUDA_BATCH):
        bs *= 2
    return bs


_FALLBACK = "fall back to run on the CPU"


class MpsFallbackNotices:
    """Collects torch's MPS per-op CPU fallback warnings (PYTORCH_ENABLE_MPS_FALLBACK=1) and says each
    op once, in one line; every other warning is passed on unchanged."""

    def __init__(self, notify: Callable[[str], None]):
        self.notify = notify
        self.seen: set[str] = set()

    @contextmanager
    def watching(self) -> Iterator[None]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            text = str(w.message)
            if _FALLBACK in text:
                op = text.split("'")[1] if text.count("'") >= 2 else text.split(".")[0]
                if op not in self.seen:
                    self.seen.add(op)
                    self.notify(f"{op} is not implemented on MPS: it runs on the CPU (slower)")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

