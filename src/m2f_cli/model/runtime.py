"""Process-level settings for long inference runs (the CLI applies them; the library does not:
they change the whole process, docs/python-api.md says how to apply them there).

glibc returns every large tensor (above its dynamic mmap threshold) to the kernel when it is
freed and faults the pages in again for the next image: on these 2-core machines 19-43% of the
snippet's CPU time went to the kernel (docs/performance.md). Raising the mmap threshold to glibc's
maximum and never trimming the heap keeps those pages in the process instead. Same effect as the
MALLOC_*_ environment variables, without asking users to set them.

Denormal floats (below ~1.2e-38) cost Intel CPUs a microcode assist per operation: Swin's shifted
windows mask attention with -100, whose softmax underflows into them, and three of the model's
matrix products then took 15 ms instead of 0.7 (compiled forward 0.386 s against 0.313 s with them
flushed to zero on a 2-core AMX Xeon; eager 0.598 against 0.554; outputs bit-identical on the
benchmark model: docs/performance.md). flush_denormals sets the CPU's flush-to-zero and
denormals-are-zero modes on the calling thread; threads and processes it starts later inherit them
(OpenMP's pool is started by the first parallel region, so this runs before any torch work).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def tune_malloc() -> bool:
    """Apply the allocator settings on glibc; returns whether they were applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return False
    ok = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
          and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
          and mallopt(_M_TOP_PAD, 64 << 20) == 1)
    log.debug("glibc malloc tuning %s", "applied" if ok else "refused")
    return ok


def flush_denormals() -> bool:
    """Denormal floats as zero from now on, in this thread and those it starts (torch's
    set_flush_denormal: SSE3 FTZ/DAZ on x86); returns whether the CPU supports it."""
    import torch
    ok = bool(torch.set_flush_denormal(True))
    log.debug("denormal floats %s", "flushed to zero" if ok else "kept (not supported on this CPU)")
    return ok


def tune_process() -> None:
    """The CLI's process settings: tune_malloc unless M2F_MALLOC_TUNING=0, flush_denormals unless
    M2F_FLUSH_DENORMALS=0. Before any torch work (OpenMP's threads copy the calling thread's modes
    when they start)."""
    import os
    if os.environ.get("M2F_MALLOC_TUNING", "1") != "0":
        tune_malloc()
    if os.environ.get("M2F_FLUSH_DENORMALS", "1") != "0":
        flush_denormals()
