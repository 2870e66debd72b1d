"""--tile SIZE[,OVERLAP] / auto and --tile-full: TileOptions, parsed and checked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


# auto tile side = AUTO_FACTOR x the model's input side: a tile is shrunk at most 2x per side
# (768 px for the 384x384 COCO checkpoints), against 10x for a whole 12 MP photo.
AUTO_FACTOR = 2


DEFAULT_OVERLAP = 0.2
# auto's overlap when none is given: on the shapes canvases of benchmarks/tile_merge_bench.py, 0.25
# found more objects seen whole by some tile than 0.2 (mean mask AP 0.528 against 0.518 over 7
# canvases) for 13% more tiles; 0.3 gained little more (0.536) for 30% more (docs/large-images.md)
AUTO_OVERLAP = 0.25


MAX_OVERLAP = 0.75


MIN_TILE = 32


class TileError(ValueError):
    """A bad --tile value."""


@dataclass(frozen=True)
class TileOptions:
    """size: tile side in pixels of the original image, None = auto (``tile_side``).
    overlap: least overlap of neighbouring tiles, a fraction of the side in [0, MAX_OVERLAP].
    full: also run the whole image (squashed, as without tiles) and merge its instances in.
    whole_formats: the formats asked for that need the whole image or map in memory, which a raster
    read window by window cannot give (tiling/stream.py); set by choices.tile_of."""

    size: Optional[int] = None
    overlap: float = DEFAULT_OVERLAP
    full: bool = False
    whole_formats: tuple[str, ...] = ()

    def record(self) -> dict:
        """What the settings record keeps (settings.common_settings)."""
        return {"size": self.size if self.size is not None else "auto", "overlap": self.overlap,
                "full": self.full}

    def __str__(self) -> str:
        return f"{self.size or 'auto'},{self.overlap:g}" + (" + full pass" if self.full else "")


def parse_tile(text: str, full: bool = False) -> TileOptions:
    """``--tile`` text: ``SIZE``, ``SIZE,OVERLAP``, ``auto`` or ``auto,OVERLAP`` (OVERLAP a fraction)."""
    parts = [p.strip() for p in text.strip().lower().split(",")]
    if not 1 <= len(parts) <= 2 or not parts[0]:
        raise TileError(f"--tile {text!r}: expected SIZE[,OVERLAP] or auto[,OVERLAP] (e.g. 640,0.2)")
    size: Optional[int] = None
    if parts[0] != "auto":
        try:
            size = int(parts[0])
        except ValueError:
            raise TileError(f"--tile {text!r}: SIZE must be a whole number of pixels or auto") from None
        if size < MIN_TILE:
            raise TileError(f"--tile {text!r}: SIZE must be at least {MIN_TILE} px")
    overlap = DEFAULT_OVERLAP if size is not None else AUTO_OVERLAP
    if len(parts) == 2:
        try:
            overlap = float(parts[1])
        except ValueError:
            raise TileError(f"--tile {text!r}: OVERLAP must be a fraction such as 0.2") from None
        if not 0.0 <= overlap <= MAX_OVERLAP:
            raise TileError(f"--tile {text!r}: OVERLAP must be in [0, {MAX_OVERLAP}] (a fraction of SIZE)")
    return TileOptions(size, overlap, full)
