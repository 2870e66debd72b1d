"""Stage 1: find the input images and give each a unique, safe output name.

Naming rule (documented in the README):
- A file found under a folder argument is named by its path relative to that folder.
- Any other input (a file argument, a glob match, a line read from stdin) is named by its path as
  given, normalised; if that path is absolute or climbs out with ``..``, by its absolute path
  without the leading ``/``. Output names therefore never leave ``--out``.
- The output stem is that name without its extension. When two inputs of one run would share a
  stem (``img.jpg`` and ``img.png`` in one folder), both keep their extension in the stem
  (``img.jpg.png``, ``img.png.png``), so no two inputs ever share an output name.
- The same file given twice is processed once; two different files with the same name (the same
  relative path under two folder arguments) make the second one a failure, never an overwrite.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator, Optional, Sequence

from .records import Failure, ImageRef
from .storage import RemoteError, is_url, local_path, walk_url

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})


class InputError(ValueError):
    """An input argument that names nothing usable (missing path, empty glob)."""


@dataclass(frozen=True)
class WalkResult:
    refs: list[ImageRef]
    failures: list[Failure]


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def read_path_list(stream, null: bool = False) -> list[str]:
    """Paths from a text stream: one per line, or NUL-separated (as ``find -print0`` writes)."""
    data = stream.read()
    parts = data.split("\0") if null else data.splitlines()
    return [p for p in parts if p.strip()] if not null else [p for p in parts if p]


def _source_name_for_path(path: str) -> str:
    """The name of an input given directly: its normalised relative path, or its absolute path
    without the leading separator when it is absolute or climbs out of the working folder."""
    norm = os.path.normpath(path)
    if os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
        norm = os.path.abspath(norm)
        drive, tail = os.path.splitdrive(norm)
        norm = (drive.rstrip(":") + tail) if drive else tail
    parts = [p for p in PurePosixPath(norm.replace(os.sep, "/")).parts if p not in ("/", ".", "..")]
    return "/".join(parts)


def _walk_folder(root: str, exclude: Optional[str]) -> Iterator[tuple[str, str, Optional[str]]]:
    """Yield (path, name relative to root, error or None) for images under root, sorted, depth-first.

    Hidden files and folders are skipped, symlinked folders are followed once (loops are cut),
    broken symlinks are reported.
    """
    seen_dirs: set[tuple[int, int]] = set()

    def visit(d: str, rel: str) -> Iterator[tuple[str, str, Optional[str]]]:
        try:
            st = os.stat(d)
        except OSError as e:
            yield d, rel, f"cannot read folder: {e.strerror or e}"
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            log.warning("%s: symlink loop or repeated folder, not walked again", d)
            return
        seen_dirs.add(key)
        if exclude is not None and os.path.realpath(d) == exclude:
            return
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield d, rel, f"cannot list folder: {e.strerror or e}"
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            child_rel = f"{rel}/{e.name}" if rel else e.name
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                yield from visit(e.path, child_rel)
            elif is_image_name(e.name):
                if e.is_symlink() and not os.path.exists(e.path):
                    yield e.path, child_rel, "broken symlink"
                else:
                    yield e.path, child_rel, None

    yield from visit(root, "")


def _expand(inputs: Sequence[str], exclude: Optional[str]) -> Iterator[tuple[str, str, Optional[str]]]:
    for arg in inputs:
        if is_url(arg):
            try:
                yield from walk_url(arg, is_image_name, exclude)
            except (OSError, RemoteError) as e:
                raise InputError(str(e) if str(e).startswith(arg) else f"{arg}: {e}") from None
            continue
        arg = local_path(arg)
        if os.path.isdir(arg):
            yield from _walk_folder(arg, exclude)
        elif os.path.lexists(arg):
            yield arg, _source_name_for_path(arg), (None if os.path.exists(arg) else "broken symlink")
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise InputError(f"{arg}: no file matches this pattern")
            for m in matches:
                if os.path.isdir(m):
                    yield from _walk_folder(m, exclude)
                elif is_image_name(m):
                    yield m, _source_name_for_path(m), None
        else:
            raise InputError(f"{arg}: no such file or folder")


def shard_of(rel: str, count: int) -> int:
    """The shard (0..count-1) an output name belongs to: a hash of the name, so the split is
    stable across reruns, balanced, and independent of the order the inputs were listed in."""
    digest = hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def parse_shard(spec: str) -> tuple[int, int]:
    """"I/N" -> (I, N), 0 <= I < N. Raises ValueError."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {spec!r}: expected 0 <= I < N")
    return i, n


def order_key(name: str) -> tuple[str, ...]:
    """Sort key that reproduces the walk's order for names under one folder (depth-first, sorted)."""
    return tuple(name.split("/"))


def _strip_ext(name: str) -> str:
    stem, ext = os.path.splitext(name)
    return stem if ext else name


def walk(inputs: Sequence[str], exclude: Optional[str] = None) -> WalkResult:
    """Expand the inputs (files, folders, globs) into ImageRefs in a stable order.

    exclude: a folder never walked (the output folder, so reruns do not read their own outputs).
    Raises InputError for an argument that names nothing.
    """
    exclude = os.path.realpath(exclude) if exclude and not is_url(exclude) else exclude
    found: list[tuple[str, str, Optional[str]]] = []
    seen_files: set[str] = set()
    names: dict[str, str] = {}
    dup_failures: list[tuple[str, str, str]] = []
    for path, name, err in _expand(inputs, exclude):
        real = path if is_url(path) else os.path.realpath(path)
        if real in seen_files and err is None:
            continue
        seen_files.add(real)
        if name in names and err is None:
            dup_failures.append((path, name, f"same output name as {names[name]}"))
            continue
        names[name] = path
        found.append((path, name, err))

    stems: dict[str, int] = {}
    for _, name, _ in found:
        stems[_strip_ext(name)] = stems.get(_strip_ext(name), 0) + 1
    refs: list[ImageRef] = []
    failures: list[Failure] = []
    for path, name, err in found:
        stem = _strip_ext(name)
        rel = name if stems[stem] > 1 else stem
        ref = ImageRef(path=path, name=name, rel=rel, index=len(refs) + len(failures))
        if err is None:
            refs.append(ref)
        else:
            failures.append(Failure(ref, "walk", err))
    for path, name, err in dup_failures:
        failures.append(Failure(ImageRef(path, name, _strip_ext(name), len(refs) + len(failures)), "walk", err))
    return WalkResult(refs, failures)


