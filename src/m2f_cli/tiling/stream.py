"""``--tile`` over rasters larger than memory: tiles read window by window, merged as they come.

With ``--tile``, a local TIFF (BigTIFF, GeoTIFF; tiled or striped) with more pixels than
``--max-pixels`` is not refused: ``windowed_tiles`` (in the DataLoader worker, from the header
alone) makes it a Sample whose tiles are a ``RasterTiles``: the path and the tile grid, no pixels.
``segment_raster`` (on the model's side: engines.local and the Ray actors, through
tiling.infer_tiled) then reads one row of tiles at a time (a band of tile height across the raster,
raster.py), resizes and normalises each
tile exactly as cut_tiles and tile_pixels do, runs them in batches of ``--batch-size`` and feeds
their parts to a tiling.merge.TileMerger, which hands back the objects no later row can change.

Memory: the model, one band (tile side x raster width x 3 bytes: 16 MB at 256 px across a
300 MP raster), the parts of a few rows of tiles and the objects found (RLE crops), never the
raster. The result has no instance map: the formats that need the whole image or map in memory
(png, overlay, labels, cutout) fail such an image with a one-line message naming the formats that
work (``WINDOWED_FORMATS``); ``--tile-full`` (a whole-image pass) fails it too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Union, Iterator, Optional

import numpy as np
import torch
from PIL import Image

from m2f_cli.postprocess.sampling import MaskSampler
from m2f_cli.inputs.preprocess import PreprocessSpec
from m2f_cli.inputs.raster import RasterError, is_tiff, open_raster, raster_size
from m2f_cli.records import ImageRef, ImageResult
from m2f_cli.tiling.merge import TileMerger
from m2f_cli.tiling.parts import _forward
from m2f_cli.tiling.grid import Box, tile_grid, tile_pixels, tile_side
from m2f_cli.tiling.options import TileOptions
from m2f_cli.tiling.parts import tile_parts
from m2f_cli.tiling.seams import instances_of

# formats written from the instances alone (RLE crops, polygons): a raster read in windows gives these
WINDOWED_FORMATS = ("coco", "jsonl", "geojson", "yolo", "labelme", "cvat")


@dataclass(frozen=True)
class RasterTiles:
    """A raster cut into tiles, not read yet: path (local), size (H0, W0), boxes (the tile grid,
    row-major, all of shape tile). Stands in Sample.tiles for a TiledImage."""

    path: str
    size: tuple[int, int]
    boxes: tuple[Box, ...]
    tile: tuple[int, int]

    def __len__(self) -> int:
        return len(self.boxes)

    def rows(self) -> list[list[int]]:
        """Tile indices, one list per row of the grid (top to bottom)."""
        out: dict[int, list[int]] = {}
        for i, b in enumerate(self.boxes):
            out.setdefault(b.r0, []).append(i)
        return [out[r] for r in sorted(out)]


def windowed_tiles(ref: ImageRef, spec: PreprocessSpec, tile: TileOptions,
                   max_pixels: Optional[int]) -> Union[None, str, RasterTiles]:
    """inputs.batch.load_sample's hook: the RasterTiles reading ref in windows when it is a local
    TIFF above max_pixels (its one-line error when it cannot be), else None (decoded as usual)."""
    size = raster_size(ref.path) if is_tiff(ref.path) else None
    if size is None or max_pixels is None or size[0] * size[1] <= max_pixels:
        return None
    h0, w0 = size
    big = f"{w0}x{h0} = {w0 * h0} pixels > --max-pixels {max_pixels}"

    def failed(message: str) -> str:
        return message
    if tile.whole_formats:
        names = ", ".join(f"-f {f}" for f in tile.whole_formats)
        return failed(f"{big}: read window by window with --tile, it can be written as -f coco, -f geojson, "
                      f"-f jsonl, -f yolo, -f labelme or -f cvat, not {names}, which need the whole image in memory")
    if tile.full:
        return failed(f"{big}: read window by window with --tile; --tile-full needs the whole image in memory")
    try:
        with open_raster(ref.path):
            pass
    except RasterError as e:
        return failed(f"{big}, and it cannot be read window by window: {e}")
    except OSError as e:
        return failed(str(e).splitlines()[0] or type(e).__name__)
    side = tile_side(spec, tile)
    boxes = tuple(tile_grid(h0, w0, side, tile.overlap))
    return RasterTiles(ref.path, size, boxes, boxes[0].shape)


def _resize(crop: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A tile crop resized to the model's input as cut_tiles resizes it."""
    th, tw = crop.shape[:2]
    rh, rw = spec.resized_size(th, tw)
    if (rh, rw) == (th, tw):
        return np.ascontiguousarray(crop)
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((rw, rh), resample=Image.Resampling(spec.resample)))


def row_pixels(tiles: RasterTiles, spec: PreprocessSpec) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """(tile indices, their resized (rh, rw, 3) uint8 pixels) per row of tiles, each row's band read
    once. In this thread, between the model's batches: reading and resizing cost ~1 s per 50 MP,
    and a reader thread beside torch's own threads oversubscribes the cores (measured: a 50 MP
    raster 4x slower on 2 shared cores with one)."""
    with open_raster(tiles.path) as r:
        for idx in tiles.rows():
            b0 = tiles.boxes[idx[0]]
            band = r.read(b0.r0, 0, b0.r1, tiles.size[1])
            yield idx, [_resize(band[:, tiles.boxes[i].c0:tiles.boxes[i].c1], spec) for i in idx]


def segment_raster(segmenter, ref: ImageRef, tiles: RasterTiles, batch_size: int) -> ImageResult:
    """One raster from its tiles, read window by window -> ImageResult without a map (label_map is
    an empty (0, 0) array; instances as segment_tiled gives them). Raises RasterError, OSError."""
    spec, options = segmenter.spec, segmenter.options
    merger = TileMerger(tiles.boxes, tiles.size)
    sampler, objects = None, []
    for idx, pixels in row_pixels(tiles, spec):
        for start in range(0, len(idx), batch_size):
            chunk = range(start, min(len(idx), start + batch_size))
            inputs = [tile_pixels(pixels[k], spec, tiles.tile) for k in chunk]
            x = torch.stack([torch.from_numpy(mi.pixel_values) for mi in inputs])
            cls, masks = _forward(segmenter, x)
            t1 = time.perf_counter()
            if sampler is None:
                sampler = MaskSampler(inputs[0].valid, tiles.tile, masks.device)
            for b, k in enumerate(chunk):
                i = idx[k]
                merger.add(i, tile_parts(cls[b], masks[b], tuple(x.shape[-2:]), inputs[0].valid, tiles.boxes[i], i,
                                         sampler, options))
            segmenter.times.postprocess_s += time.perf_counter() - t1
        t1 = time.perf_counter()
        objects += merger.flush()
        segmenter.times.postprocess_s += time.perf_counter() - t1
    t1 = time.perf_counter()
    objects += merger.close()
    objects.sort(key=lambda o: (-o.score, o.label, o.r0, o.c0, o.area, o.rle["counts"]))
    instances, _ = instances_of(objects, tiles.size, segmenter.categories, options, len(tiles), paint=False)
    segmenter.times.postprocess_s += time.perf_counter() - t1
    h0, w0 = tiles.size
    return ImageResult(ref, w0, h0, instances, np.zeros((0, 0), np.uint16), options.map_threshold, tiles=len(tiles))
