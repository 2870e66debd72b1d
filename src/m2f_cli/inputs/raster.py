"""Stage 2 for rasters larger than memory: read a TIFF, BigTIFF or GeoTIFF window by window.

``decode.decode`` holds a whole image (3 bytes a pixel: 900 MB at 300 MP) and refuses one above
``--max-pixels``. With ``--tile``, such a TIFF is read instead one window at a time (tiling/stream.py)
and never decoded whole: ``open_raster`` reads its header, ``Raster.read`` decodes only the TIFF
tiles or strips a window touches.

Backends: tifffile (a dependency; its own codecs read uncompressed, Deflate, PackBits and LZMA
TIFFs, and every other compression once ``imagecodecs`` is installed), else rasterio (the ``geo``
extra: GDAL reads LZW, JPEG and the rest, and GeoTIFFs). Pixels are converted as ``decode._to_rgb``
converts Pillow's modes, so a window equals the same window of ``decode`` (tests/test_raster.py):
1 sample (grey) repeated to RGB, 4 samples (RGBA) drop alpha, 16-bit grey scaled by 255/65535.
Not windowed (RasterError, a one-line reason): palette, CMYK, 16-bit colour, planar layouts
tifffile cannot window without rasterio, orientation tags other than top-left.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from m2f_cli.urls import is_url, local_path

TIFF_EXTENSIONS = (".tif", ".tiff")
_TOP_LEFT = 1  # TIFF Orientation 274: other values would need the whole image turned


class RasterError(Exception):
    """A TIFF that cannot be read window by window; the message is one line, without the path."""


@dataclass(frozen=True)
class RasterInfo:
    """height, width: pixels; samples: 1, 3 or 4 per pixel; dtype: uint8 or uint16 (grey only);
    layout: "tiled" or "striped" (what the file holds; rasterio's own blocks otherwise);
    backend: "tifffile" or "rasterio"."""

    height: int
    width: int
    samples: int
    dtype: str
    layout: str
    backend: str


def is_tiff(path: str) -> bool:
    """A local path named .tif/.tiff (remote objects are read whole: they have no cheap windows here)."""
    return not is_url(path) and path.lower().endswith(TIFF_EXTENSIONS)


def to_rgb(a: np.ndarray) -> np.ndarray:
    """(h, w, samples) uint8/uint16 raster samples -> (h, w, 3) uint8, as decode._to_rgb converts
    Pillow's L, RGB, RGBA and I;16 modes."""
    if a.dtype == np.uint16:
        a = np.rint(a.astype(np.float64) * (255.0 / 65535.0)).clip(0, 255).astype(np.uint8)
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def _check(samples: int, dtype: str, what: str) -> None:
    if dtype not in ("uint8", "uint16") or samples not in (1, 3, 4) or (dtype == "uint16" and samples != 1):
        raise RasterError(f"{samples} samples of {dtype}{what}: windowed reading takes 8-bit grey, RGB, RGBA "
                          f"or 16-bit grey")


class Raster:
    """An open raster; read(r0, c0, r1, c1) -> (r1 - r0, c1 - c0, 3) uint8, the window of rows
    r0:r1 and columns c0:c1 (inside the raster, else ValueError). Close it (or use with)."""

    info: RasterInfo

    def read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        if not (0 <= r0 < r1 <= self.info.height and 0 <= c0 < c1 <= self.info.width):
            raise ValueError(f"window rows {r0}:{r1}, cols {c0}:{c1} outside a {self.info.height}x{self.info.width} "
                             f"raster")
        return self._read(r0, c0, r1, c1)

    def _read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Raster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TiffFileRaster(Raster):
    """tifffile: the page's tiles or strips that a window touches, each read and decoded once per read."""

    def __init__(self, path: str):
        import tifffile

        self.tf = tifffile.TiffFile(path)
        try:
            self._setup(self.tf.pages[0])
        except BaseException:
            self.tf.close()
            raise

    def _setup(self, page) -> None:
        if page.photometric not in (1, 2):  # MINISBLACK, RGB
            raise RasterError(f"photometric {page.photometric.name.lower()}: windowed reading takes grey or RGB")
        samples = page.samplesperpixel
        if samples > 1 and page.planarconfig != 1:
            raise RasterError("separate colour planes: windowed reading takes interleaved samples (or rasterio)")
        _check(samples, str(page.dtype), "")
        self.page = page
        self.chunk = page.chunks[:2]                       # (rows, cols) of one tile or strip
        self.grid = page.chunked[:2]                       # tiles or strips down, across
        self.decode = page.decode
        self.info = RasterInfo(page.imagelength, page.imagewidth, samples, str(page.dtype),
                               "tiled" if page.is_tiled else "striped", "tifffile")
        # uncompressed strips (tifffile.memmap writes one strip of the whole image): only the rows
        # a window needs are read, never a whole strip
        self.raw = None if page.is_tiled or page.compression != 1 else \
            np.dtype(page.dtype).newbyteorder(self.tf.byteorder)
        self._segment(0)  # fails now, not halfway, when the compression needs imagecodecs

    def _segment(self, index: int) -> np.ndarray:
        """Segment index as (rows, cols, samples), padded to the chunk shape for edge tiles."""
        fh = self.tf.filehandle
        offset, count = self.page.dataoffsets[index], self.page.databytecounts[index]
        fh.seek(offset)
        data = fh.read(count) if count else None
        try:
            seg = self.decode(data, index, jpegtables=self.page.jpegtables)[0]
        except (ValueError, ImportError, ModuleNotFoundError) as e:
            raise RasterError(f"cannot decode its {self.page.compression.name.lower()} data without imagecodecs "
                              f"({str(e).splitlines()[0]}): pip install imagecodecs, or rasterio") from None
        if seg is None:  # an empty chunk: zeros, as tifffile fills them
            seg = np.zeros((1, *self.chunk, self.info.samples), self.page.dtype)
        return seg.reshape(seg.shape[-3:])

    def _read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        ch, cw = self.chunk
        out = np.empty((r1 - r0, c1 - c0, self.info.samples), self.page.dtype)
        if self.raw is not None:
            return to_rgb(self._raw_rows(out, r0, c0, r1, c1))
        for i in range(r0 // ch, (r1 - 1) // ch + 1):
            for j in range(c0 // cw, (c1 - 1) // cw + 1):
                seg = self._segment(i * self.grid[1] + j)
                y0, x0 = i * ch, j * cw
                ya, yb = max(r0, y0), min(r1, y0 + seg.shape[0])
                xa, xb = max(c0, x0), min(c1, x0 + seg.shape[1])
                out[ya - r0:yb - r0, xa - c0:xb - c0] = seg[ya - y0:yb - y0, xa - x0:xb - x0]
        return to_rgb(out)

    def _raw_rows(self, out: np.ndarray, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        """out filled from uncompressed strips, reading the window's rows only."""
        ch, w, fh = self.chunk[0], self.info.width, self.tf.filehandle
        row_bytes = w * self.info.samples * self.raw.itemsize
        for i in range(r0 // ch, (r1 - 1) // ch + 1):
            y0 = i * ch
            ya, yb = max(r0, y0), min(r1, y0 + ch)
            fh.seek(self.page.dataoffsets[i] + (ya - y0) * row_bytes)
            rows = np.frombuffer(fh.read((yb - ya) * row_bytes), self.raw).reshape(yb - ya, w, self.info.samples)
            out[ya - r0:yb - r0] = rows[:, c0:c1]
        return out

    def close(self) -> None:
        self.tf.close()


class _RasterioRaster(Raster):
    """rasterio windows (GDAL): any compression and layout GDAL reads."""

    def __init__(self, path: str):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            self.ds = rasterio.open(path)
        ds = self.ds
        try:
            dtype = ds.dtypes[0]
            if len(set(ds.dtypes)) != 1:
                raise RasterError("bands of different types")
            if ds.colorinterp and any(c.name == "palette" for c in ds.colorinterp):
                raise RasterError("a palette raster: windowed reading takes grey or RGB")
            _check(ds.count, dtype, " (rasterio)")
            layout = "tiled" if ds.profile.get("tiled") else "striped"
            self.info = RasterInfo(ds.height, ds.width, ds.count, dtype, layout, "rasterio")
        except BaseException:
            ds.close()
            raise

    def _read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        from rasterio.windows import Window

        a = self.ds.read(window=Window(c0, r0, c1 - c0, r1 - r0))  # (bands, h, w)
        return to_rgb(np.moveaxis(a, 0, -1))

    def close(self) -> None:
        self.ds.close()


def open_raster(path: str) -> Raster:
    """Open a local TIFF for windowed reading: tifffile when it can decode the file, else rasterio
    when installed. Raises RasterError (one line) when neither can, OSError for I/O errors."""
    path = local_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    orientation = _orientation(path)
    if orientation != _TOP_LEFT:  # rasterio would read it unturned, unlike decode (EXIF/TIFF orientation)
        raise RasterError(f"orientation tag {orientation}: only top-left rasters are read in windows")
    reason: Optional[str] = None
    try:
        return _TiffFileRaster(path)
    except RasterError as e:
        reason = str(e)
    except (ValueError, IndexError, KeyError, TypeError, EOFError) as e:  # tifffile: not a TIFF it reads
        reason = f"tifffile cannot read it ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    try:
        import rasterio  # noqa: F401
    except ImportError:
        raise RasterError(reason) from None
    try:
        return _RasterioRaster(path)
    except RasterError as e:
        raise RasterError(f"{reason}; {e}") from None
    except Exception as e:  # rasterio.errors.RasterioIOError and friends: one line
        raise RasterError(f"{reason}; rasterio: {str(e).splitlines()[0]}") from None


def _orientation(path: str) -> int:
    """The TIFF Orientation tag (274) of the first page; 1 (top-left) when absent or unreadable."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            tag = tf.pages[0].tags.get(274)
            return int(tag.value) if tag is not None else _TOP_LEFT
    except Exception:  # not a TIFF tifffile parses: the backends say why
        return _TOP_LEFT


def raster_size(path: str) -> Optional[tuple[int, int]]:
    """(height, width) of a local TIFF from its header (tifffile), or None when it is not one."""
    if not is_tiff(path):
        return None
    try:
        import tifffile

        with tifffile.TiffFile(local_path(path)) as tf:
            p = tf.pages[0]
            return int(p.imagelength), int(p.imagewidth)
    except Exception:  # not a TIFF tifffile parses: the ordinary decode path reports it
        return None
