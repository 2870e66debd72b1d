"""Stage 1: find the input images and give each a unique, safe output name.

Naming rule (documented in the README):
- A file found under a folder argument is named by its path relative to that folder.
- Any other input (a file argument, a glob match, a line read from stdin) is named by its path as
  given, normalised; if that path is absolute or climbs out with ``..``, by its absolute path
  without the leading ``/``. Output names therefore never leave ``--out``.
- The output stem is that name without its extension. When two inputs of one run would share a
  stem (``img.jpg`` and ``img.png`` in one folder), both keep their extension in the stem
  (``img.jpg.png``, ``img.png.png``), so no two inputs ever share an output name.
- Names are compared ignoring case, so that outputs never collide on a case-insensitive
  filesystem (macOS, Windows, many SMB shares): ``IMG.jpg`` and ``img.png`` keep their extensions.
- The same file given twice is processed once; two different files with the same name (the same
  relative path under two folder arguments, or names equal but for case even with extensions:
  ``IMG.jpg`` and ``img.JPG``) make the later one a failure, never an overwrite.
- Nothing under ``--out`` is ever an input, whatever form names it (folder, file, glob, stdin).
- Videos (VIDEO_EXTENSIONS) are inputs like images; frame k of a video named ``v/clip`` is
  ``v/clip/000123`` (video.frame_ref). A video whose stem is also a folder of inputs (``v/clip.mp4``
  beside ``v/clip/a.jpg``) keeps its extension (``v/clip.mp4/000123``), so frames never clash.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterator, Optional, Sequence

from m2f_cli.records import Failure, ImageRef
from m2f_cli.inputs.remote import walk_url
from m2f_cli.urls import is_url, local_path
from m2f_cli.errors import InputError, RemoteError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                              ".heic", ".heif", ".avif"})
# Videos (inputs/video.py): each is read frame by frame; frame k of v/clip.mp4 is named v/clip/000123.
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"})


@dataclass(frozen=True)
class WalkResult:
    """refs: the images, in walk order; failures: inputs that cannot be read (broken links, name
    clashes); not_images: files met that are not images, by extension ("" for none); inside_out:
    inputs left out because they are under --out."""

    refs: list[ImageRef]
    failures: list[Failure]
    not_images: dict = field(default_factory=dict)
    inside_out: int = 0

    def not_images_line(self) -> str:
        n = sum(self.not_images.values())
        kinds = ", ".join(f"{ext or 'no extension'} {c}" for ext, c in
                          sorted(self.not_images.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"{n} file{'s' if n != 1 else ''} that {'are' if n != 1 else 'is'} not an image ({kinds})"


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_video_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def is_input_name(name: str) -> bool:
    """An image or a video, by extension: what the walk takes as an input."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


def read_path_list(stream, null: bool = False) -> list[str]:
    """Paths from a text stream: one per line, or NUL-separated (as ``find -print0`` writes)."""
    data = stream.read()
    if not null and "\0" in data:
        raise ValueError("the paths on stdin are NUL-separated (find -print0): pass -0 (--null) to read them")
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


NOT_IMAGE = "not an image"  # the walk's marker for files it met and leaves out


def _walk_folder(root: str, exclude: Optional[str]) -> Iterator[tuple[str, str, Optional[str]]]:
    """Yield (path, name relative to root, error or None) for files under root, sorted, depth-first
    (error NOT_IMAGE for files that are not images).

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
            elif is_input_name(e.name):
                if e.is_symlink() and not os.path.exists(e.path):
                    yield e.path, child_rel, "broken symlink"
                else:
                    yield e.path, child_rel, None
            else:
                yield e.path, child_rel, NOT_IMAGE

    yield from visit(root, "")


def _expand(inputs: Sequence[str], exclude: Optional[str]) -> Iterator[tuple[str, str, Optional[str]]]:
    for arg in inputs:
        if is_url(arg):
            try:
                yield from walk_url(arg, is_input_name, exclude)
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
                else:
                    yield m, _source_name_for_path(m), (None if is_input_name(m) else NOT_IMAGE)
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


def _inside(path: str, root: Optional[str]) -> bool:
    """Whether path (a local path or URL) is root or lies under it; root is resolved already."""
    if root is None:
        return False
    if is_url(path):
        return path == root or path.startswith(root.rstrip("/") + "/")
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def walk(inputs: Sequence[str], exclude: Optional[str] = None) -> WalkResult:
    """Expand the inputs (files, folders, globs, URLs) into ImageRefs in a stable order.

    exclude: a folder none of whose files is ever an input (the output folder, so reruns do not
    read their own outputs), however the input names it.
    Raises InputError for an argument that names nothing.
    """
    exclude = (os.path.realpath(exclude) if not is_url(exclude) else exclude) if exclude else None
    found: list[tuple[str, str, Optional[str]]] = []
    seen_files: set[str] = set()
    names: dict[str, str] = {}
    dup_failures: list[tuple[str, str, str]] = []
    not_images: Counter = Counter()
    inside_out = 0
    for path, name, err in _expand(inputs, exclude):
        if _inside(path, exclude):
            inside_out += 1
            continue
        if err == NOT_IMAGE:
            not_images[os.path.splitext(name)[1].lower()] += 1
            continue
        real = path if is_url(path) else os.path.realpath(path)
        if real in seen_files and err is None:
            continue
        seen_files.add(real)
        key = name.casefold()
        if key in names and err is None:
            other = names[key]
            why = "same output name as" if _source_name_eq(other, path) else \
                "same output name, ignoring case (as on a case-insensitive filesystem), as"
            dup_failures.append((path, name, f"{why} {other}"))
            continue
        names[key] = path
        found.append((path, name, err))
    if inside_out:
        log.warning("%d input%s under --out %s left out (m2f never reads its own outputs)",
                    inside_out, "s" if inside_out != 1 else "", exclude)

    stems: dict[str, int] = {}
    for _, name, _ in found:
        k = _strip_ext(name).casefold()
        stems[k] = stems.get(k, 0) + 1
    # a video's frames are <stem>/<k>: a video whose stem is also a folder of inputs keeps its extension
    folders = {"/".join(parts[:i]).casefold() for _, name, _ in found
               for parts in [name.split("/")] for i in range(1, len(parts))} \
        if any(is_video_name(name) for _, name, _ in found) else set()
    refs: list[ImageRef] = []
    failures: list[Failure] = []
    for path, name, err in found:
        stem = _strip_ext(name)
        clash = stems[stem.casefold()] > 1 or (is_video_name(name) and stem.casefold() in folders)
        rel = name if clash else stem
        ref = ImageRef(path=path, name=name, rel=rel, index=len(refs) + len(failures))
        if err is None:
            refs.append(ref)
        else:
            failures.append(Failure(ref, "walk", err))
    for path, name, err in dup_failures:
        failures.append(Failure(ImageRef(path, name, _strip_ext(name), len(refs) + len(failures)), "walk", err))
    return WalkResult(refs, failures, dict(not_images), inside_out)


def _source_name_eq(a: str, b: str) -> bool:
    """Whether two inputs that clash would also clash with case kept (same base name)."""
    return os.path.basename(a) == os.path.basename(b)
