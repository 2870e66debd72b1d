"""Runs a compiled (AOTInductor) package with Python's GIL released during the forward.

torch's own loader (``torch._C._aoti.AOTIModelPackageLoader``) holds the GIL for the whole call:
~0.4 s an image on 2 cores during which the writer thread, the progress line and a video's
tracker cannot run a single Python line (the write stage read 0.47 s/image with the package
against 0.014 s with the trace, docs/performance.md). The package's shared library exports a
C interface (torch's ``torch/csrc/inductor/aoti_runtime/interface.h``): create a model
container, run it on tensor handles. ctypes releases the GIL around every foreign call, so the
forward runs beside Python threads, as an eager or traced forward does.

Used only where that interface covers the whole package: one CPU library in the archive and no
extern-kernel table next to it (the ``<name>.json`` a graph with fallback ops needs, run by a
proxy executor this path does not have). Anything else, or any failure here, falls back to
torch's loader (``load_runner``), so a package is never unusable because of this module.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import logging
import mmap
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Optional

import torch

from m2f_cli.errors import one_line
from m2f_cli.model.startup import fingerprint

log = logging.getLogger(__name__)

Runner = Callable[[list], list]
_KEEP_SIZE, _PUNCH_HOLE = 0x01, 0x02  # fallocate(2) modes

_PY = ctypes.pythonapi
_PY.PyCapsule_GetPointer.restype = ctypes.c_void_p
_PY.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_PY.PyCapsule_New.restype = ctypes.py_object
_PY.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class GilFreeRunner:
    """One model container of a package's library: inputs (a list of CPU tensors) -> outputs."""

    def __init__(self, library: str):
        self._lib = ctypes.CDLL(library)
        self._handle = ctypes.c_void_p()
        self._check(self._lib.AOTInductorModelContainerCreateWithDevice(
            ctypes.byref(self._handle), ctypes.c_size_t(1), b"cpu", None), "create")
        n = ctypes.c_size_t()
        self._check(self._lib.AOTInductorModelContainerGetNumOutputs(self._handle, ctypes.byref(n)), "outputs")
        self.num_outputs = n.value
        self._check(self._lib.AOTInductorModelContainerGetNumInputs(self._handle, ctypes.byref(n)), "inputs")
        self.num_inputs = n.value

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"AOTInductor container {what} failed (code {rc})")

    def __call__(self, inputs: list) -> list:
        if len(inputs) != self.num_inputs:
            raise ValueError(f"the compiled model takes {self.num_inputs} input(s), got {len(inputs)}")
        # new handles, one per input: the run takes them over (interface.h: "handles are stolen")
        capsules = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors([t.contiguous() for t in inputs])
        ins = (ctypes.c_void_p * len(capsules))(*[_PY.PyCapsule_GetPointer(c, None) for c in capsules])
        outs = (ctypes.c_void_p * self.num_outputs)()
        self._check(self._lib.AOTInductorModelContainerRun(  # the GIL is released for this call
            self._handle, ins, ctypes.c_size_t(len(capsules)), outs, ctypes.c_size_t(self.num_outputs),
            None, None), "run")
        return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(
            [_PY.PyCapsule_New(outs[i], None, None) for i in range(self.num_outputs)])

    def close(self) -> None:
        if self._handle:
            self._lib.AOTInductorModelContainerDelete(self._handle)
            self._handle = ctypes.c_void_p()

    def __del__(self):  # the container holds the model's constants (~200 MB)
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def _library_member(archive: zipfile.ZipFile, model: str) -> Optional[str]:
    """The archive's one CPU library of model, or None where this module does not cover the package."""
    folder = f"data/aotinductor/{model}/"
    names = [n for n in archive.namelist() if folder in n]
    libraries = [n for n in names if n.endswith(".so")]
    metadata = [n for n in names if n.endswith("_metadata.json")]
    extern = [n for n in names if n.endswith(".json") and not n.endswith("_metadata.json")]
    if len(libraries) != 1 or extern:
        return None
    for name in metadata:
        if json.loads(archive.read(name)).get("AOTI_DEVICE_KEY", "cpu") != "cpu":
            return None
    return libraries[0]


def _member_bytes(package: str, archive: zipfile.ZipFile, member: str, dst: int) -> None:
    """Copy a member of the archive into the open file dst, checking its CRC. A stored member (how
    torch writes packages) is copied by the kernel (sendfile, ~0.12 s for the ~200 MB library) and
    checked through a mapping (~0.1 s), against ~0.65 s through zipfile's reader. The check is
    remembered for the package file as it is (fingerprint.checked: its path, size, mtime, ctime
    and inode), so later loads of the same file skip it; any write to the file asks for it again."""
    info = archive.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(member) as src, open(dst, "wb", closefd=False) as out:
            shutil.copyfileobj(src, out, 1 << 22)
        return
    with open(package, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)  # the local file header; its name and extra field lengths at 26 and 28
        start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
            int.from_bytes(header[28:30], "little")
        done = 0
        while done < info.file_size:
            n = os.sendfile(dst, f.fileno(), start + done, info.file_size - done)
            if n == 0:
                raise OSError(f"{package}: truncated ({member})")
            done += n
    check = f"crc:{member}"
    if fingerprint.checked(package, check):
        return
    with mmap.mmap(dst, info.file_size, prot=mmap.PROT_READ) as view:
        if zlib.crc32(view) != info.CRC:
            raise OSError(f"{package}: damaged ({member}: CRC mismatch)")
    fingerprint.remember_check(package, check)


def _drop_constants(runner: GilFreeRunner, fd: int) -> None:
    """Free the library's copy of the weights once the container holds its own.

    The container copies every constant out of the library's ``_binary_constants_bin_*`` section
    into memory of its own when it is created (torch's aoti_runtime/model_base.h: load_constants),
    so that section (~190 MB for Swin-T, all of it read by the copy) is never read again; left in
    the memory file it counted twice in the process's memory. Its whole pages are punched out of
    the file (fallocate), which also unmaps them. Best effort: on any doubt nothing is dropped.
    """
    try:
        start = ctypes.addressof(ctypes.c_uint8.in_dll(runner._lib, "_binary_constants_bin_start"))
        end = ctypes.addressof(ctypes.c_uint8.in_dll(runner._lib, "_binary_constants_bin_end"))
        inode = os.fstat(fd).st_ino
        offset = None
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                parts = line.split()
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                if lo <= start < hi and end <= hi and len(parts) >= 5 and int(parts[4]) == inode:
                    offset = int(parts[2], 16) + (start - lo)
                    break
        if offset is None:
            return
        page = mmap.PAGESIZE
        first, last = -(-offset // page) * page, (offset + end - start) // page * page
        if last > first:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
            libc.fallocate(fd, _PUNCH_HOLE | _KEEP_SIZE, first, last - first)
    except (OSError, ValueError, AttributeError) as e:
        log.debug("m2f: the compiled library's weights stay mapped (%s)", e)


_loads = itertools.count()


def _fd_path(fd: int) -> str:
    """A path to the open file fd that no earlier load in this process used: dlopen returns the
    library already loaded under the same name, and fd numbers are reused once closed, so a
    second package loaded as /proc/self/fd/N would run the first one's model. The path's "./"
    steps make each name unique (the kernel resolves them all to the same file)."""
    return "/proc/self/fd/" + "./" * next(_loads) + str(fd)


def gil_free(package: str, model: str = "model") -> Optional[GilFreeRunner]:
    """A GilFreeRunner for package, or None where the package is not one this module covers.
    The library is copied into an anonymous memory file (memfd: nothing left on disk, even if the
    process is killed here), loaded from it, and the file closed: the loaded mapping keeps it."""
    with zipfile.ZipFile(package) as archive:
        member = _library_member(archive, model)
        if member is None:
            return None
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("m2f-model.so", os.MFD_CLOEXEC)
            try:
                _member_bytes(package, archive, member, fd)
                runner = GilFreeRunner(_fd_path(fd))
                _drop_constants(runner, fd)
                return runner
            finally:
                os.close(fd)
        folder = tempfile.mkdtemp(prefix="m2f-aoti-")
        try:
            library = Path(folder) / "model.so"
            fd = os.open(library, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                _member_bytes(package, archive, member, fd)
            finally:
                os.close(fd)
            return GilFreeRunner(str(library))  # mapped now: the file can go
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def load_runner(package: str) -> Runner:
    """The package's runner: GIL-free where possible, else torch's loader (which holds the GIL)."""
    try:
        runner = gil_free(package)
        if runner is not None:
            return runner
    except Exception as e:  # noqa: BLE001 - torch's loader is the fallback
        log.info("m2f: %s: running it with torch's loader (%s)", package, one_line(e)[:200])
    loader = torch._C._aoti.AOTIModelPackageLoader(package, "model", False, 1, -1)
    return loader.boxed_run
