"""Process-level settings for long inference runs (the CLI applies them; the library does not).

glibc returns every large tensor (above its dynamic mmap threshold) to the kernel when it is
freed and faults the pages in again for the next image: on these 2-core machines 19-43% of the
snippet's CPU time went to the kernel (docs/performance.md). Raising the mmap threshold to glibc's
maximum and never trimming the heap keeps those pages in the process instead. Same effect as the
MALLOC_*_ environment variables, without asking users to set them.
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
