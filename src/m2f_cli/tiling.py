"""Tiled inference (``--tile SIZE[,OVERLAP]``, ``--tile-full``): small objects in large images.

The checkpoint squashes every image to its input size (384x384): on a 12 MP photo a 40 px object
becomes 4 px. With ``--tile`` each image is cut into overlapping square tiles, every tile goes
through the model like an image (preprocessed by the checkpoint's own rules, batched with the
other tiles of its image), and the tiles' instances are merged back at the original resolution.

Stages, one image at a time (an image's tiles travel as one unit: a DataLoader worker or a Ray
actor cuts them, ``segment_tiled`` runs them all, so an image's result depends on nothing else):

1. ``tile_grid``: tile boxes of SIZE px (clamped to the image), spread evenly so that neighbours
   overlap by at least OVERLAP x SIZE; ``auto`` = ``AUTO_FACTOR`` x the model's input side (and
   overlap ``AUTO_OVERLAP`` unless given).
2. ``cut_tiles`` (worker side): each tile resized to the model's input, kept as uint8 (4x less
   than float32 in the DataLoader queue); ``tile_pixels`` normalises it when its batch is built,
   giving exactly the pixel values ``preprocess`` would (it skips a resize already done).
3. ``tile_parts``: per tile, segment_instances' candidate rule (postprocess.py: top-k over
   (query, class) pairs, mask = logit > 0 on the query's window, score = class prob x mean mask
   probability), kept down to ``PART_FLOOR`` x the threshold: a cut half may score lower than the
   whole. Each part is stored as a tight crop encoded as RLE, never as a full-size mask.
4. ``tile_merge.merge_parts`` (issue 28): the parts merged on their masks, duplicates (tiles,
   queries, classes) greedily in score order, parts cut by seams joined with the paper's score over
   their pixels (tile_merge.py, tile_links.py; docs/large-images.md). ``merge_parts`` below is the
   merge it replaced (strips and union-find, the best part's score), kept for
   ``benchmarks/tile_merge_bench.py --merge legacy``. Then threshold, top-k (per model pass: an
   image of N tiles keeps its best top_k x N) and map painting as usual (``instances_of``).

Cost grows with the number of tiles: every comparison is between neighbouring tiles, on their
shared strip, and memory holds one tile's logits plus RLE crops of the parts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from .categories import CategoryTable
from .postprocess import PostprocessOptions, _Sampler, _crop_to_valid, top_candidates, window_rle
from .preprocess import PreprocessSpec, preprocess
from .raster import RasterError
from .records import Failure, ImageRef, ImageResult, Instance

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
# parts are kept down to this fraction of the score threshold: the half of an object that a tile
# sees cut by its border scores lower than the whole; the merged object must still pass it.
PART_FLOOR = 0.5
SEAM_IOU = 0.5      # IoU of two parts on the tiles' shared strip (> 0.5: never bridges two disjoint masks)
FULL_IOU = 0.5      # IoU of a full-pass part and a tile object: the same object
CUT_INSIDE = 0.5    # share of a cut part's pixels on a whole part of a neighbour: a piece of it
FULL_INSIDE = 0.8   # share of a mask inside the other's: a coarse duplicate, or a fragment of a large object


class TileError(ValueError):
    """A bad --tile value."""


@dataclass(frozen=True)
class TileOptions:
    """size: tile side in pixels of the original image, None = auto (``tile_side``).
    overlap: least overlap of neighbouring tiles, a fraction of the side in [0, MAX_OVERLAP].
    full: also run the whole image (squashed, as without tiles) and merge its instances in.
    whole_formats: the formats asked for that need the whole image or map in memory, which a raster
    read window by window cannot give (tile_stream.py); set by options.tile_of."""

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


# --- the grid -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """Rows r0:r1, columns c0:c1 of the original image (half-open, pixels)."""

    r0: int
    c0: int
    r1: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0

    def intersect(self, o: "Box") -> Optional["Box"]:
        r0, c0, r1, c1 = max(self.r0, o.r0), max(self.c0, o.c0), min(self.r1, o.r1), min(self.c1, o.c1)
        return Box(r0, c0, r1, c1) if r1 > r0 and c1 > c0 else None


def model_side(spec: PreprocessSpec) -> int:
    """The side of the model's input: the fixed size's shorter side, or the shortest-edge target."""
    return min(spec.height, spec.width) if spec.mode == "fixed" else spec.short


def tile_side(spec: PreprocessSpec, opts: TileOptions) -> int:
    return opts.size if opts.size is not None else AUTO_FACTOR * model_side(spec)


def _starts(length: int, side: int, overlap: float) -> list[int]:
    """Tile starts along one axis: the fewest tiles of `side` whose neighbours overlap by at least
    overlap x side, spread evenly from 0 to length - side (so no tile sticks out of the image)."""
    if length <= side:
        return [0]
    stride = max(1, int(side * (1 - overlap)))
    n = math.ceil((length - side) / stride) + 1
    return [round(i * (length - side) / (n - 1)) for i in range(n)]


def tile_grid(height: int, width: int, side: int, overlap: float) -> list[Box]:
    """Tile boxes for an (height, width) image, row-major; every tile has the same shape
    (min(side, height), min(side, width))."""
    th, tw = min(side, height), min(side, width)
    return [Box(r, c, r + th, c + tw) for r in _starts(height, side, overlap) for c in _starts(width, side, overlap)]


# --- worker side: cutting ------------------------------------------------------------------------


@dataclass
class TiledImage:
    """An image cut into tiles, as a DataLoader worker hands it over.

    boxes: the tiles in the original image (all of shape `tile`). pixels: (N, h, w, 3) uint8,
    each tile resized to the model's input by the checkpoint's rule (``preprocess``'s resize).
    tile: (th, tw) tile shape in original pixels.
    """

    boxes: list[Box]
    pixels: torch.Tensor
    tile: tuple[int, int]

    def __len__(self) -> int:
        return len(self.boxes)


def cut_tiles(rgb: np.ndarray, spec: PreprocessSpec, opts: TileOptions) -> Optional[TiledImage]:
    """rgb: (H, W, 3) uint8 upright image -> its tiles, or None when one tile covers the image
    (it then goes through the model whole, exactly as without --tile)."""
    h0, w0 = rgb.shape[:2]
    boxes = tile_grid(h0, w0, tile_side(spec, opts), opts.overlap)
    if len(boxes) == 1:
        return None
    th, tw = boxes[0].shape
    rh, rw = spec.resized_size(th, tw)
    out = np.empty((len(boxes), rh, rw, 3), np.uint8)
    for i, b in enumerate(boxes):
        crop = np.ascontiguousarray(rgb[b.r0:b.r1, b.c0:b.c1])
        if (rh, rw) != (th, tw):  # the resize of preprocess.preprocess, on uint8 as there
            crop = np.asarray(Image.fromarray(crop).resize((rw, rh), resample=Image.Resampling(spec.resample)))
        out[i] = crop
    return TiledImage(boxes, torch.from_numpy(out), (th, tw))


def tile_pixels(resized: np.ndarray, spec: PreprocessSpec, tile: tuple[int, int]):
    """A tile from cut_tiles -> preprocess's ModelInput for it: (3, Hp, Wp) float32 and valid.
    preprocess skips the resize (already done, identically) and normalises and pads."""
    return preprocess(resized, spec, original=tile)


# --- per tile: candidate parts --------------------------------------------------------------------


@dataclass
class Part:
    """One candidate instance of one tile (or of the full pass: tile -1).

    label: model class index; score: class prob x mean mask probability (segment_instances' rule);
    r0, c0: where its mask crop starts in the original image; rle: the crop's mask, (h, w) tight
    around its pixels, as pycocotools RLE (bytes counts); area: mask pixels; class_prob: the class
    probability in score (0: unknown), so that tile_merge can recompute the score of joined parts.
    """

    label: int
    score: float
    tile: int
    r0: int
    c0: int
    rle: dict
    area: int
    class_prob: float = 0.0

    @property
    def box(self) -> Box:
        h, w = self.rle["size"]
        return Box(self.r0, self.c0, self.r0 + h, self.c0 + w)

    def mask(self) -> np.ndarray:
        """(h, w) bool crop."""
        return mask_utils.decode(self.rle).astype(bool)


def _encode(b: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(b.astype(np.uint8)))


def _tight(b: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(dr, dc, crop): b cropped to the rows and columns holding a True pixel (b has one)."""
    rows = np.flatnonzero(b.any(1))
    cols = np.flatnonzero(b.any(0))
    return int(rows[0]), int(cols[0]), b[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def tile_parts(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded: tuple[int, int],
               valid: tuple[int, int], box: Box, tile: int, sampler: _Sampler,
               options: PostprocessOptions) -> list[Part]:
    """One tile's candidates as Parts in original-image coordinates.

    class_logits: (Q, C+1); mask_logits: (Q, h, w) at 1/4 of the padded input; valid: unpadded
    part of the input; box: where the tile lies (its shape is the sampler's output size).
    The rule of postprocess.segment_instances (kept equal by tests/test_tiling.py), with the
    threshold lowered to PART_FLOOR x threshold; parts with an empty mask are dropped.
    """
    floor = max(options.threshold * PART_FLOOR, 0.0)
    top_p, labels, queries = top_candidates(class_logits, options, floor)
    if top_p.numel() == 0:
        return []
    low = _crop_to_valid(mask_logits[sorted(set(queries))], padded, valid)
    row = {q: j for j, q in enumerate(sorted(set(queries)))}
    masks: dict[int, Optional[tuple[float, int, int, dict, int]]] = {}
    for q, j in row.items():
        m = sampler.measure(low[j])
        if m is None or not m.area:
            masks[q] = None
            continue
        dr, dc, crop = _tight(m.binary)
        masks[q] = (m.score, box.r0 + m.r0 + dr, box.c0 + m.c0 + dc, _encode(crop), m.area)
    out = []
    for p, lab, q in zip(top_p.tolist(), labels, queries):
        m = masks[q]
        if m is None:
            continue
        s = p * m[0]
        if s >= floor:
            out.append(Part(lab, s, tile, m[1], m[2], m[3], m[4], p))
    return out


# --- merging ----------------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return list(out.values())


def _seam_regions(a: Box, b: Box) -> Optional[tuple[Box, Box]]:
    """Where parts of tiles a and b are compared: their overlap (the same box twice), or, for
    tiles that only meet along a side, the pixel line of each along the seam (same shape)."""
    shared = a.intersect(b)
    if shared is not None:
        return shared, shared
    r0, r1 = max(a.r0, b.r0), min(a.r1, b.r1)
    c0, c1 = max(a.c0, b.c0), min(a.c1, b.c1)
    if r1 > r0 and c0 == c1:  # side by side: a column either side of the seam at column c0
        left_a = a.c1 == c0
        ra, rb = Box(r0, c0 - 1, r1, c0), Box(r0, c0, r1, c0 + 1)
        return (ra, rb) if left_a else (rb, ra)
    if c1 > c0 and r0 == r1:  # one above the other
        top_a = a.r1 == r0
        ra, rb = Box(r0 - 1, c0, r0, c1), Box(r0, c0, r0 + 1, c1)
        return (ra, rb) if top_a else (rb, ra)
    return None


def _in_region(part: Part, mask: np.ndarray, region: Box) -> np.ndarray:
    """part's mask on region: (region rows, region cols) bool (zeros where the part is absent)."""
    out = np.zeros(region.shape, np.bool_)
    pb = part.box
    ov = pb.intersect(region)
    if ov is not None:
        out[ov.r0 - region.r0:ov.r1 - region.r0, ov.c0 - region.c0:ov.c1 - region.c0] = \
            mask[ov.r0 - pb.r0:ov.r1 - pb.r0, ov.c0 - pb.c0:ov.c1 - pb.c0]
    return out


def _overlaps(parts: Sequence[Part], boxes: Sequence[Box]) -> list[tuple[int, int, float, int]]:
    """(i, j, iou, inter) for parts i < j of different tiles and the same class whose masks meet
    where their tiles do (_seam_regions): their mask IoU there and the pixels they share there
    (for tiles that overlap, inter is all the pixels the two masks share). Computed per pair of
    tiles and class as one matrix product of the parts' masks on the shared strip."""
    by_tile: dict[int, list[int]] = {}
    for i, p in enumerate(parts):
        by_tile.setdefault(p.tile, []).append(i)
    edges = []
    cache: dict[int, np.ndarray] = {}

    def mask(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = parts[i].mask()
        return cache[i]

    tiles = sorted(by_tile)
    # tiles that touch or overlap, found with one vectorised box test per tile (hundreds of tiles
    # on a 50 MP image: a Python loop over all pairs would cost more than the merge itself)
    corners = np.array([[boxes[t].r0, boxes[t].c0, boxes[t].r1, boxes[t].c1] for t in tiles]).reshape(-1, 4)
    for x, ta in enumerate(tiles):
        a = boxes[ta]
        near = np.flatnonzero((corners[x + 1:, 0] <= a.r1) & (corners[x + 1:, 2] >= a.r0)
                              & (corners[x + 1:, 1] <= a.c1) & (corners[x + 1:, 3] >= a.c0)) + x + 1
        for tb in (tiles[k] for k in near):
            regions = _seam_regions(boxes[ta], boxes[tb])
            if regions is None:
                continue
            ra, rb = regions
            ia = [i for i in by_tile[ta] if parts[i].box.intersect(ra) is not None]
            ib = [i for i in by_tile[tb] if parts[i].box.intersect(rb) is not None]
            for lab in sorted({parts[i].label for i in ia} & {parts[i].label for i in ib}):
                la = [i for i in ia if parts[i].label == lab]
                lb = [i for i in ib if parts[i].label == lab]
                A = np.stack([_in_region(parts[i], mask(i), ra).ravel() for i in la]).astype(np.float32)
                B = np.stack([_in_region(parts[i], mask(i), rb).ravel() for i in lb]).astype(np.float32)
                inter = A @ B.T
                union = A.sum(1)[:, None] + B.sum(1)[None, :] - inter
                iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
                for u, v in zip(*np.nonzero(inter > 0)):
                    i, j = sorted((la[u], lb[v]))
                    edges.append((i, j, float(iou[u, v]), int(inter[u, v])))
        # tiles come in grid order and every later pair involves later tiles: a tile's masks are
        # not needed again, so the cache holds about one row of tiles
        for i in by_tile[ta]:
            cache.pop(i, None)
    return edges


def _is_cut(p: Part, tile: Box, size: tuple[int, int]) -> bool:
    """Whether p's mask reaches a border of its tile that lies inside the image: the tile saw
    only part of it."""
    b = p.box
    return ((b.r0 == tile.r0 and tile.r0 > 0) or (b.c0 == tile.c0 and tile.c0 > 0)
            or (b.r1 == tile.r1 and tile.r1 < size[0]) or (b.c1 == tile.c1 and tile.c1 < size[1]))


@dataclass
class _Object:
    """A merged object: its union mask as an RLE crop at (r0, c0), its best score and class."""

    label: int
    score: float
    r0: int
    c0: int
    rle: dict
    area: int
    complete: bool  # some tile saw it whole (away from that tile's inner borders), or a full-pass part

    @property
    def box(self) -> Box:
        h, w = self.rle["size"]
        return Box(self.r0, self.c0, self.r0 + h, self.c0 + w)


def _union(members: Sequence[Union[Part, _Object]]) -> tuple[int, int, np.ndarray]:
    """(r0, c0, bool crop) of the union of the members' masks, over their joint bounding box."""
    boxes = [m.box for m in members]
    r0, c0 = min(b.r0 for b in boxes), min(b.c0 for b in boxes)
    r1, c1 = max(b.r1 for b in boxes), max(b.c1 for b in boxes)
    out = np.zeros((r1 - r0, c1 - c0), np.bool_)
    for m, b in zip(members, boxes):
        out[b.r0 - r0:b.r1 - r0, b.c0 - c0:b.c1 - c0] |= mask_utils.decode(m.rle).astype(bool)
    return r0, c0, out


def _objects(groups: Sequence[Sequence[Union[Part, _Object]]], complete: bool) -> list[_Object]:
    """Each group -> one _Object: the union of its masks, the best score, the group's class."""
    out = []
    for g in groups:
        if len(g) == 1 and isinstance(g[0], _Object):
            out.append(g[0])
            continue
        r0, c0, m = _union(g)
        area = int(np.count_nonzero(m))
        dr, dc, crop = _tight(m)
        out.append(_Object(g[0].label, max(x.score for x in g), r0 + dr, c0 + dc, _encode(crop), area, complete))
    return out


def _full_rle(x: Union[Part, _Object], size: tuple[int, int]) -> dict:
    """x's mask as a full-size RLE (bytes counts, for pycocotools' iou), built from its crop."""
    return _c(window_rle(mask_utils.decode(x.rle).astype(bool), x.r0, x.c0, size))


def _c(rle: dict) -> dict:
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def _with_full_pass(objects: list[_Object], full: list[Part], size: tuple[int, int]) -> list[_Object]:
    """Merge full-pass parts into the tile objects (see the module docstring); union-find again."""
    if not full:
        return objects
    items: list[Union[_Object, Part]] = [*objects, *full]
    uf = _UnionFind(len(items))
    rles = [_full_rle(x, size) for x in items]
    areas = np.array([x.area for x in items], np.float64)
    n = len(objects)
    if n:
        for f in range(n, len(items)):
            same = [o for o in range(n) if items[o].label == items[f].label
                    and items[o].box.intersect(items[f].box) is not None]
            if not same:
                continue
            iou = np.asarray(mask_utils.iou([rles[f]], [rles[o] for o in same], [0] * len(same))).reshape(-1)
            for o, v in zip(same, iou):
                inter = v * (areas[f] + areas[o]) / (1 + v)  # from IoU and the two areas
                dup = v >= FULL_IOU or inter >= FULL_INSIDE * areas[f]
                fragment = not items[o].complete and inter >= FULL_INSIDE * areas[o]
                if dup or fragment:
                    uf.union(o, f)
    groups = [[items[i] for i in sorted(g)] for g in uf.groups()]
    return _objects(groups, complete=True)


def merge_parts(parts: Sequence[Part], boxes: Sequence[Box], size: tuple[int, int]) -> list[_Object]:
    """Tile parts (tile >= 0) and full-pass parts (tile -1) -> merged objects.

    A part is whole when its mask stays off the borders of its tile that lie inside the image,
    else cut (_is_cut). Two parts of different tiles and the same class match when their mask
    IoU where the tiles meet is >= SEAM_IOU (_overlaps):
    - whole parts that match are the same object seen by two overlapping tiles: the best-scoring
      one stays (duplicates from the overlaps);
    - a cut part that matches a whole part, or has CUT_INSIDE of its pixels on it, is a piece of
      an object some tile saw whole: dropped;
    - the remaining cut parts are joined along their matches (connected components: an object
      larger than the overlap, or any object cut with --tile SIZE,0), mask = union, score = the
      best part's.
    The full-pass parts are then merged in (_with_full_pass). boxes: the tile grid; size: (H0, W0).
    The result does not depend on the order of parts (they are sorted first).
    """
    parts = sorted(parts, key=_part_key)
    tiled = [p for p in parts if p.tile >= 0]
    full = [p for p in parts if p.tile < 0]
    cut = [_is_cut(p, boxes[p.tile], size) for p in tiled]
    matches = []
    dropped = [False] * len(tiled)
    for i, j, iou, inter in _overlaps(tiled, boxes):
        if cut[i] != cut[j]:
            c = i if cut[i] else j
            if iou >= SEAM_IOU or inter >= CUT_INSIDE * tiled[c].area:
                dropped[c] = True
        elif iou >= SEAM_IOU:
            matches.append((i, j))
    dup = _UnionFind(len(tiled))     # whole parts and their duplicates
    seams = _UnionFind(len(tiled))   # the cut parts left, along seams
    for i, j in matches:
        if not cut[i] and not cut[j]:
            dup.union(i, j)
        elif cut[i] and cut[j] and not dropped[i] and not dropped[j]:
            seams.union(i, j)
    objects = []
    for g in dup.groups():
        if not cut[g[0]]:
            p = tiled[min(g, key=lambda i: (-tiled[i].score, i))]
            objects.append(_Object(p.label, p.score, p.r0, p.c0, p.rle, p.area, complete=True))
    pieces = [[tiled[i] for i in g] for g in seams.groups() if cut[g[0]] and not dropped[g[0]]]
    objects += _objects(pieces, complete=False)
    return _with_full_pass(objects, full, size)


def _part_key(p: Part) -> tuple:
    """A total order of parts that does not depend on how they were listed."""
    return (p.tile, p.label, -p.score, p.r0, p.c0, tuple(p.rle["size"]), p.rle["counts"])


def instances_of(objects: Sequence[_Object], size: tuple[int, int], categories: CategoryTable,
                 options: PostprocessOptions, passes: int = 1, paint: bool = True
                 ) -> tuple[list[Instance], Optional[np.ndarray]]:
    """Merged objects -> (instances, (H0, W0) uint16 map), as segment_instances gives them:
    score >= threshold, descending score (ties: class, then position), ids 1..N; the map painted
    in ascending score from the objects' crops, at map_threshold.

    passes: model passes the objects come from (tiles, + 1 for the full pass). top_k counts
    candidates per pass, as for an image (the paper's rule), so the image keeps its best
    top_k x passes: a large image of many small objects is not cut down to one image's worth.
    paint: False gives no map (None): a raster read in windows (tile_stream.py) has no room for one.
    """
    h0, w0 = size
    kept = [o for o in objects if o.score >= options.threshold]
    kept.sort(key=lambda o: (-o.score, o.label, o.r0, o.c0, o.area))
    kept = kept[:options.top_k * passes]
    out = []
    for n, o in enumerate(kept, start=1):
        full = window_rle(np.zeros((0, 0), np.bool_), 0, 0, size) if not o.area else None
        b = mask_utils.decode(o.rle).astype(bool)
        rle = window_rle(b, o.r0, o.c0, size) if full is None else full
        cat = categories[o.label]
        h, w = b.shape
        out.append(Instance(id=n, label=cat.name, category_id=cat.id, label_index=o.label, score=float(o.score),
                            bbox=(o.c0, o.r0, w, h), area=o.area, rle=rle))
    if not paint:
        return out, None
    imap = np.zeros((h0, w0), np.uint16)
    for inst, o in zip(reversed(out), reversed(kept)):
        if inst.score < options.map_threshold:
            continue
        b = mask_utils.decode(o.rle).astype(bool)
        region = imap[o.r0:o.r0 + b.shape[0], o.c0:o.c0 + b.shape[1]]
        np.copyto(region, np.uint16(inst.id), where=b)
    return out, imap


# --- the whole image ------------------------------------------------------------------------------


def segment_tiled(segmenter, ref: ImageRef, tiled: TiledImage, original: tuple[int, int], batch_size: int,
                  full: Optional[tuple[torch.Tensor, tuple[int, int]]] = None) -> ImageResult:
    """One image from its tiles (and the full pass: (3, Hp, Wp) pixel values, valid) -> ImageResult.

    Tiles go through segmenter.predictor in batches of batch_size, in grid order; their parts are
    merged by merge_parts, then thresholded, capped at top_k per pass and painted by instances_of.
    Forward and post-processing seconds go to segmenter.times.
    """
    spec, options = segmenter.spec, segmenter.options
    parts: list[Part] = []
    sampler = None
    n = len(tiled)
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        inputs = [tile_pixels(tiled.pixels[i].numpy(), spec, tiled.tile) for i in idx]
        x = torch.stack([torch.from_numpy(mi.pixel_values) for mi in inputs])
        valid = inputs[0].valid
        cls, masks = _forward(segmenter, x)
        t1 = time.perf_counter()
        if sampler is None:
            sampler = _Sampler(valid, tiled.tile, masks.device)
        for b, i in enumerate(idx):
            parts += tile_parts(cls[b], masks[b], tuple(x.shape[-2:]), valid, tiled.boxes[i], i, sampler, options)
        segmenter.times.postprocess_s += time.perf_counter() - t1
    if full is not None:
        pixel_values, valid = full
        cls, masks = _forward(segmenter, pixel_values[None])
        t1 = time.perf_counter()
        whole = Box(0, 0, *original)
        parts += tile_parts(cls[0], masks[0], tuple(pixel_values.shape[-2:]), valid, whole, -1,
                            _Sampler(valid, original, masks.device), options)
        segmenter.times.postprocess_s += time.perf_counter() - t1
    t1 = time.perf_counter()
    from . import tile_merge  # the merge on masks (issue 28); here: it imports this module
    objects = tile_merge.merge_parts(parts, tiled.boxes, original)
    instances, imap = instances_of(objects, original, segmenter.categories, options, n + (full is not None))
    segmenter.times.postprocess_s += time.perf_counter() - t1
    h0, w0 = original
    return ImageResult(ref, w0, h0, instances, imap, options.map_threshold, tiles=n)


def _forward(segmenter, x: torch.Tensor):
    t0 = time.perf_counter()
    cls, masks = segmenter.predictor(x.to(segmenter.device, non_blocking=True))
    segmenter.times.forward_s += time.perf_counter() - t0
    return cls, masks


def infer_tiled(segmenter, sample, batch_size: int) -> list[tuple[int, Union[ImageResult, Failure]]]:
    """engines.local.segment_samples' step for a Sample cut into tiles (batch.Sample.tiles): one image,
    all its tiles. A model error fails the image, as infer_batch fails a batch."""
    full = (sample.pixel_values, sample.valid) if sample.pixel_values is not None else None
    try:
        if not isinstance(sample.tiles, TiledImage):  # a raster read window by window (tile_stream.py)
            from .tile_stream import segment_raster
            r = segment_raster(segmenter, sample.ref, sample.tiles, batch_size)
        else:
            r = segment_tiled(segmenter, sample.ref, sample.tiles, sample.original, batch_size, full)
    except (RuntimeError, ValueError) as e:  # e.g. out of memory
        return [(sample.seq, Failure(sample.ref, "model", str(e).splitlines()[0]))]
    except (OSError, RasterError) as e:  # a raster read window by window that fails halfway
        return [(sample.seq, Failure(sample.ref, "decode", str(e).splitlines()[0] or type(e).__name__))]
    return [(sample.seq, r)]
