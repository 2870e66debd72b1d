"""Parts of different tiles merged into an image's objects (merge_parts: the same class and masks
that agree on the tiles' shared strip, connected components by union-find; --tile-full's parts
joined by IoU or inclusion), then threshold, top-k and map painting (instances_of)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union
import numpy as np
from pycocotools import mask as mask_utils
from m2f_cli.model.categories import CategoryTable
from m2f_cli.postprocess.instance import PostprocessOptions
from m2f_cli.postprocess.masks import rle_with_bytes_counts, window_rle
from m2f_cli.records import Instance
from m2f_cli.tiling.grid import Box
from m2f_cli.tiling.links import UnionFind
from m2f_cli.tiling.parts import Part, _encode, _tight


SEAM_IOU = 0.5      # IoU of two parts on the tiles' shared strip (> 0.5: never bridges two disjoint masks)


FULL_IOU = 0.5      # IoU of a full-pass part and a tile object: the same object


CUT_INSIDE = 0.5    # share of a cut part's pixels on a whole part of a neighbour: a piece of it


FULL_INSIDE = 0.8   # share of a mask inside the other's: a coarse duplicate, or a fragment of a large object


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
    return rle_with_bytes_counts(window_rle(mask_utils.decode(x.rle).astype(bool), x.r0, x.c0, size))


def _with_full_pass(objects: list[_Object], full: list[Part], size: tuple[int, int]) -> list[_Object]:
    """Merge full-pass parts into the tile objects (see the module docstring); union-find again."""
    if not full:
        return objects
    items: list[Union[_Object, Part]] = [*objects, *full]
    uf = UnionFind(range(len(items)))
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
    dup = UnionFind(range(len(tiled)))     # whole parts and their duplicates
    seams = UnionFind(range(len(tiled)))   # the cut parts left, along seams
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
    paint: False gives no map (None): a raster read in windows (tiling/stream.py) has no room for one.
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
