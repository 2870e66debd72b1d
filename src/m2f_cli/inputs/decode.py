"""Stage 2: read an image file into an upright RGB uint8 array.

Handles, in one place: EXIF orientation, every Pillow mode (grayscale, RGBA, palette, CMYK,
16-bit), the first frame of animated/multi-page files, a pixel limit checked before decoding,
and the optional JPEG draft mode (decode at 1/2, 1/4 or 1/8 scale when the model needs fewer pixels).

Formats: whatever Pillow reads (JPEG, PNG, TIFF, WebP, BMP, GIF, and AVIF, which Pillow's wheels
read since 11.3), plus HEIC/HEIF (every iPhone photo) through the pillow-heif plugin, registered
on the first decode in each process (DataLoader workers included). pillow-heif applies the HEIF
rotation and mirroring itself and resets the EXIF orientation, so no photo is turned twice.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from m2f_cli.config import DEFAULT_MAX_PIXELS
from m2f_cli.inputs.remote import read_bytes
from m2f_cli.urls import is_url, local_path
from m2f_cli.errors import DecodeError, one_line

_ROTATING_ORIENTATIONS = {5, 6, 7, 8}


@dataclass(frozen=True)
class DecodedImage:
    """rgb: (h, w, 3) uint8, upright. width, height: the ORIGINAL upright size, which differs from
    rgb's shape only when a draft decode returned a reduced image."""

    rgb: np.ndarray
    width: int
    height: int


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F":
            top = max(float(arr.max(initial=1.0)), 1.0)
        g = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(g[..., None], 3, axis=2))
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _message(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image file (empty, not an image, or an unsupported format)"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a folder"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{text}" if isinstance(exc, OSError) else f"{type(exc).__name__}: {text}"


class DraftTarget(Protocol):
    def draft_size(self, h: int, w: int) -> tuple[int, int]:
        """(width, height) of pixels needed from an upright (h, w) image."""


def _source(path: str):
    """What Image.open reads: a local path, or the bytes of a remote object (fsspec URL)."""
    if not is_url(path):
        return local_path(path)
    try:
        return io.BytesIO(read_bytes(path))
    except OSError:
        raise
    except Exception as e:  # the backend's own errors (botocore, aiohttp): one line, naming nothing else
        raise DecodeError(f"cannot read: {one_line(e)}") from None


_heif_registered = False


def _register_plugins() -> None:
    """Teach Pillow HEIC/HEIF (pillow-heif), once per process; without the plugin they fail to open."""
    global _heif_registered
    if _heif_registered:
        return
    _heif_registered = True
    try:
        from pillow_heif import register_heif_opener
    except ImportError:  # pragma: no cover - a dependency; HEIC files then fail as unidentified
        return
    register_heif_opener()


def decode(path: str, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
           draft: Optional[DraftTarget] = None) -> DecodedImage:
    """Read path into an upright RGB image.

    max_pixels: refuse images with more pixels (checked from the header, before decoding).
    draft: what the model needs (a PreprocessSpec); with JPEGs, decode at the smallest 1/2^k
        scale that still covers it. Changes pixels slightly, so it is opt-in (``--fast-decode``).
    Raises DecodeError with a one-line reason.
    """
    _register_plugins()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            old_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # our own check below decides
            try:
                with Image.open(_source(path)) as img:
                    w, h = img.size
                    if max_pixels is not None and w * h > max_pixels:
                        raise DecodeError(f"image too large: {w}x{h} = {w * h} pixels "
                                          f"> --max-pixels {max_pixels}")
                    if w < 1 or h < 1:
                        raise DecodeError(f"empty image ({w}x{h})")
                    orientation = img.getexif().get(0x0112, 1)
                    if orientation in _ROTATING_ORIENTATIONS:
                        w, h = h, w
                    if draft is not None and img.format == "JPEG":
                        dw, dh = draft.draft_size(h, w)
                        if orientation in _ROTATING_ORIENTATIONS:
                            dw, dh = dh, dw
                        img.draft("RGB", (dw, dh))
                    img.seek(0)
                    img.load()
                    img = ImageOps.exif_transpose(img) if orientation != 1 else img
                    rgb = np.asarray(_to_rgb(img), dtype=np.uint8)
            finally:
                Image.MAX_IMAGE_PIXELS = old_limit
    except DecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            MemoryError, IndexError, TypeError, KeyError) as e:
        raise DecodeError(_message(e)) from None
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DecodeError(f"unexpected decoded shape {rgb.shape}")
    return DecodedImage(np.ascontiguousarray(rgb), w, h)
