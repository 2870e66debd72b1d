"""Merging the parts of an image's tiles into one instance per object, on their masks (issue 28).

A tile gives its candidates as parts (tiling.tile_parts: class, score, class probability, mask
crop). One object comes out many times: whole in each tile that holds it, cut in the tiles whose
border crosses it, twice in one tile (two queries), under two classes. A part is *cut* when its mask
reaches a border of its tile that lies inside the image, else *whole*; a cut part is split into its
connected pieces first (``split_cut``: a query's mask often holds its object and a sliver of a
neighbour that the border cuts; only the piece on the border continues in the next tile).

Two parts are *linked* when their masks agree: parts of one tile on all of it; a cut part and a part
of another tile where both tiles see the image (their overlap; for tiles that only meet,
``--tile SIZE,0``, the pixel line either side of the seam); two whole parts of two tiles on their
whole masks (both are complete). Kinds: SAME (same class, mask IoU >= ``Settings.iou``), CLASS
(another class, IoU >= ``Settings.class_iou``: one object under two classes), HOLDS (same class,
the other lies inside it: intersection over the smaller mask >= ``Settings.ios``).

Greedy in score order (SAHI's greedy non-maximum merging, on masks), per group of linked parts:

1. whole parts, best first: each is an object exactly as that tile gives it (mask and score by the
   paper's rule, as for an image that size), and takes the parts it is linked to (duplicates from
   other tiles and queries, other classes, fragments inside it, pieces of it that other tiles cut)
   except a part it lies inside, and a part of another tile that runs on beyond the shared region
   (then it is not just this object);
2. the cut pieces left, best first: each is joined with the pieces of its class that continue it in
   other tiles (SAME where both tiles see), at most one per tile and each agreeing with every member
   whose tile it overlaps, so a sliver cannot bridge two objects; mask = union, score recomputed by
   Mask2Former's rule, class probability x mean mask probability inside the mask, pooled over the
   pieces' pixels (``joined_score``); it takes the cut pieces linked to its members. A piece no
   other tile continues is scored the same way, the other tiles that saw its pixels and found
   nothing there counting as observations at mask probability 0 (``TileMerger._unconfirmed``).

The result depends on the parts, never on their order or the tiles' numbering. Links only join
parts of neighbouring tiles, so the merge streams: ``TileMerger`` takes tiles in grid order and
hands back the objects no later tile can touch (``flush``); memory holds a few rows of tiles' parts
(RLE crops), masks are decoded only while a tile's links are computed. docs/large-images.md draws it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from .tiling import Box, Part, _encode, _is_cut, _Object, _seam_regions, _tight, _union, _with_full_pass


@dataclass(frozen=True)
class Settings:
    """The merge's thresholds (module docstring), tuned with benchmarks/tile_merge_bench.py.

    iou: SAME, same-class mask IoU. class_iou: CLASS, IoU of two classes' masks. ios: HOLDS,
    intersection over the smaller mask. ios_share: between a cut part and another tile's part, HOLDS
    counts only when the smaller mask has this share of its pixels where both tiles see. within: a
    whole object takes a part of another tile only when this share of the part lies where both tiles
    see. speck: pieces of a cut part under this share of its pixels stay with its largest piece.
    """

    iou: float = 0.45
    class_iou: float = 0.4
    ios: float = 0.7
    ios_share: float = 0.5
    within: float = 0.8
    speck: float = 0.1


DEFAULT = Settings()


@dataclass
class _Entry:
    """A part in the merger: its global id, order key, whether its tile cut it."""

    id: int
    part: Part
    key: tuple
    cut: bool


def order_key(p: Part) -> tuple:
    """Best first; ties broken by what the part is, its tile index last (a total order)."""
    return (-p.score, p.label, p.r0, p.c0, tuple(p.rle["size"]), p.rle["counts"], p.tile)


def _neighbours(boxes: Sequence[Box]) -> list[list[int]]:
    """Per tile, the other tiles that overlap or touch it (share at least a side's stretch)."""
    c = np.array([[b.r0, b.c0, b.r1, b.c1] for b in boxes]).reshape(-1, 4)
    out = []
    for t, b in enumerate(boxes):
        near = np.flatnonzero((c[:, 0] <= b.r1) & (c[:, 2] >= b.r0) & (c[:, 1] <= b.c1) & (c[:, 3] >= b.c0))
        out.append([int(k) for k in near if k != t and _seam_regions(b, boxes[k]) is not None])
    return out


class _Masks:
    """Decoded mask crops for the duration of one tile's link computation."""

    def __init__(self):
        self.cache: dict[int, np.ndarray] = {}

    def __call__(self, e: _Entry) -> np.ndarray:
        m = self.cache.get(e.id)
        if m is None:
            m = self.cache[e.id] = e.part.mask()
        return m


def _windows(entries: Sequence[_Entry], region: Box, masks: _Masks):
    """For each entry: (local box [r0, c0, r1, c1] in region coordinates, its mask there, its pixels
    there); entries whose box misses the region get an empty window."""
    boxes = np.zeros((len(entries), 4), np.int64)
    crops, areas = [], np.zeros(len(entries), np.int64)
    for k, e in enumerate(entries):
        pb = e.part.box
        ov = pb.intersect(region)
        if ov is None:
            crops.append(None)
            continue
        crop = masks(e)[ov.r0 - pb.r0:ov.r1 - pb.r0, ov.c0 - pb.c0:ov.c1 - pb.c0]
        boxes[k] = (ov.r0 - region.r0, ov.c0 - region.c0, ov.r1 - region.r0, ov.c1 - region.c0)
        crops.append(crop)
        areas[k] = np.count_nonzero(crop)
    return boxes, crops, areas


# How the parts of two tiles are compared: parts of one tile, on all of it; a cut part and a part of
# another tile, where both tiles see; two whole parts of two tiles, on all of their masks (each is
# complete, so any pixel of one outside the other's tile is a difference, not something unseen).
TILE, SEAM, WHOLE = "tile", "seam", "whole"


def _pair_links(ea: Sequence[_Entry], eb: Sequence[_Entry], ra: Box, rb: Box, mode: str,
                masks: _Masks, s: Settings) -> list[tuple[int, int, str, bool, bool]]:
    """Links between the parts ea of tile a, on region ra, and eb of tile b, on rb (same shape):
    (id in a, id in b, kind seen from a, whether a lies in the region, whether b does). mode: TILE,
    SEAM or WHOLE (above). Candidate pairs are screened by an upper bound of their intersection
    (the overlap of their windows, the smaller area); only those that could link are intersected."""
    if not ea or not eb:
        return []
    ba, ca, aa = _windows(ea, ra, masks)
    bb, cb, ab = _windows(eb, rb, masks)
    h = np.clip(np.minimum(ba[:, None, 2], bb[None, :, 2]) - np.maximum(ba[:, None, 0], bb[None, :, 0]), 0, None)
    w = np.clip(np.minimum(ba[:, None, 3], bb[None, :, 3]) - np.maximum(ba[:, None, 1], bb[None, :, 1]), 0, None)
    small = np.minimum(aa[:, None], ab[None, :])
    bound = np.minimum(h * w, small).astype(np.float64)
    iou_bound = bound / np.maximum(aa[:, None] + ab[None, :] - bound, 1)
    ios_bound = bound / np.maximum(small, 1)
    same = np.array([e.part.label for e in ea])[:, None] == np.array([e.part.label for e in eb])[None, :]
    maybe = (bound > 0) & np.where(same, (iou_bound >= s.iou) | (ios_bound >= s.ios), iou_bound >= s.class_iou)
    if mode == TILE:
        maybe &= np.triu(np.ones_like(maybe), 1).astype(bool)
    elif mode == SEAM:  # whole pairs are compared in WHOLE mode
        maybe &= np.array([e.cut for e in ea])[:, None] | np.array([e.cut for e in eb])[None, :]
    entire = mode != SEAM  # the masks compared whole
    out = []
    for i, j in zip(*np.nonzero(maybe)):
        r0, c0 = max(ba[i, 0], bb[j, 0]), max(ba[i, 1], bb[j, 1])
        r1, c1 = min(ba[i, 2], bb[j, 2]), min(ba[i, 3], bb[j, 3])
        x = ca[i][r0 - ba[i, 0]:r1 - ba[i, 0], c0 - ba[i, 1]:c1 - ba[i, 1]]
        y = cb[j][r0 - bb[j, 0]:r1 - bb[j, 0], c0 - bb[j, 1]:c1 - bb[j, 1]]
        inter = int(np.count_nonzero(x & y))
        link = _link(inter, int(aa[i]), int(ab[j]), ea[i], eb[j], entire, s)
        if link is not None:
            # whether each lies in the compared region (its tile sees it all where the other's does)
            within_a = entire or aa[i] >= s.within * ea[i].part.area
            within_b = entire or ab[j] >= s.within * eb[j].part.area
            out.append((ea[i].id, eb[j].id, link, bool(within_a), bool(within_b)))
    return out


# How two linked parts relate, as seen from the first: the same object (same class, IoU), the same
# object under another class, the other lies inside this one, this one lies inside the other.
SAME, CLASS, HOLDS, INSIDE = "same", "class", "holds", "inside"
_MIRROR = {SAME: SAME, CLASS: CLASS, HOLDS: INSIDE, INSIDE: HOLDS}


def _link(inter: int, a: int, b: int, x: _Entry, y: _Entry, entire: bool, s: Settings) -> Optional[str]:
    """The link of two parts with a, b pixels in the compared region sharing inter (kind seen from
    x), or None."""
    if inter == 0:
        return None
    iou = inter / (a + b - inter)
    if x.part.label != y.part.label:
        return CLASS if iou >= s.class_iou else None
    if iou >= s.iou:
        return SAME
    smaller, inside = (x, a) if a <= b else (y, b)
    if not entire and inside < s.ios_share * smaller.part.area:
        return None
    if inter / min(a, b) < s.ios:
        return None
    return HOLDS if smaller is y else INSIDE


class TileMerger:
    """Streaming merge of an image's tile parts (module docstring).

    boxes: the tile grid (tiling.tile_grid); size: (H0, W0). ``add`` the tiles in any order, each
    once, with its parts; ``flush`` returns the objects whose tiles and all their neighbours have
    been added (no later tile can change them); ``close`` the rest. Objects are tiling._Object.
    """

    def __init__(self, boxes: Sequence[Box], size: tuple[int, int], settings: Settings = DEFAULT):
        self.boxes, self.size, self.settings = list(boxes), size, settings
        self.near = _neighbours(self.boxes)
        self.image = Box(0, 0, *size)
        self.added: set[int] = set()
        self.by_tile: dict[int, list[_Entry]] = {}
        self.links: dict[int, list[tuple[int, str, bool]]] = {}  # id -> (other id, kind, other within)
        self.parent: dict[int, int] = {}
        self.entries: dict[int, _Entry] = {}
        self.next_id = 0

    def add(self, tile: int, parts: Iterable[Part]) -> None:
        if tile in self.added:
            raise ValueError(f"tile {tile} added twice")
        self.added.add(tile)
        entries = []
        pieces = [q for p in parts for q in split_cut(p, self.boxes[tile], self.size, self.settings.speck)]
        for p in sorted(pieces, key=order_key):
            e = _Entry(self.next_id, p, order_key(p), _is_cut(p, self.boxes[tile], self.size))
            self.next_id += 1
            entries.append(e)
            self.entries[e.id] = e
            self.parent[e.id] = e.id
            self.links[e.id] = []
        self.by_tile[tile] = entries
        masks = _Masks()
        box = self.boxes[tile]
        pairs = _pair_links(entries, entries, box, box, TILE, masks, self.settings)
        whole = [e for e in entries if not e.cut]
        for nb in self.near[tile]:
            if nb in self.added and self.by_tile.get(nb):
                ra, rb = _seam_regions(box, self.boxes[nb])
                pairs += _pair_links(entries, self.by_tile[nb], ra, rb, SEAM, masks, self.settings)
                pairs += _pair_links(whole, [e for e in self.by_tile[nb] if not e.cut], self.image, self.image,
                                     WHOLE, masks, self.settings)
        for i, j, kind, within_i, within_j in pairs:
            self.links[i].append((j, kind, within_j))
            self.links[j].append((i, _MIRROR[kind], within_i))
            self._union(i, j)

    def _find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def flush(self, final: bool = False) -> list[_Object]:
        """The objects of every group of linked parts whose tiles are closed (all neighbours added)."""
        closed = {t for t in self.by_tile if final or all(n in self.added for n in self.near[t])}
        groups: dict[int, list[int]] = {}
        for i in self.entries:
            groups.setdefault(self._find(i), []).append(i)
        out = []
        for ids in groups.values():
            if all(self.entries[i].part.tile in closed for i in ids):
                out += self._objects([self.entries[i] for i in ids])
                for i in ids:
                    self._drop(i)
        for t in [t for t in self.by_tile if t in closed and not self.by_tile[t]]:
            del self.by_tile[t]
        return out

    def close(self) -> list[_Object]:
        return self.flush(final=True)

    def _drop(self, i: int) -> None:
        e = self.entries.pop(i)
        tile = self.by_tile[e.part.tile]
        tile.remove(e)
        del self.links[i], self.parent[i]

    def _objects(self, group: list[_Entry]) -> list[_Object]:
        """Greedy clustering of one group of linked parts (module docstring): the whole parts, best
        first, each taking what is the same object; then the cut parts left, best first, joined."""
        group.sort(key=lambda e: e.key)
        taken: set[int] = set()
        out = []
        for seed in (e for e in group if not e.cut):
            if seed.id not in taken:
                taken.add(seed.id)
                self._take_linked([seed], taken, wholes=True)
                p = seed.part
                out.append(_Object(p.label, p.score, p.r0, p.c0, p.rle, p.area, complete=True))
        for seed in (e for e in group if e.cut):
            if seed.id in taken:
                continue
            taken.add(seed.id)
            members = self._chain(seed, taken)
            self._take_linked(members, taken, wholes=False)
            o = _joined([m.part for m in members], seed.part.label)
            if len(members) == 1:
                o.score *= self._unconfirmed(seed.part)
            out.append(o)
        return out

    def _unconfirmed(self, p: Part) -> float:
        """A cut piece no other tile continues: the share of its observations that are its own, the
        other tiles that see its pixels counting them at mask probability 0 (joined_score's pooling)."""
        mask = p.mask()
        seen = 0
        for t in self.near[p.tile]:
            ov = p.box.intersect(self.boxes[t])
            if ov is not None:
                seen += int(np.count_nonzero(mask[ov.r0 - p.r0:ov.r1 - p.r0, ov.c0 - p.c0:ov.c1 - p.c0]))
        return p.area / (p.area + seen)

    def _take_linked(self, members: list[_Entry], taken: set[int], wholes: bool) -> None:
        """Mark as taken the parts that are the members' object: the same object (another view, a
        duplicate, another class) or a piece lying inside a member, never a part a member lies in;
        whole parts only when wholes (a whole object takes its duplicates; pieces never take one)."""
        for m in members:
            taken.update(j for j, kind, within in self.links[m.id]
                         if kind != INSIDE and (within if wholes else self.entries[j].cut))

    def _chain(self, seed: _Entry, taken: set[int]) -> list[_Entry]:
        """seed and the cut parts of its class that strong links reach through other tiles, one part
        per tile, each agreeing (a strong link) with every member whose mask it meets where their
        tiles overlap: a mask cut to a sliver by its tile cannot bridge two objects."""
        members, tiles, stack = [seed], {seed.part.tile}, [seed]
        while stack:
            m = stack.pop()
            for j, kind, _ in self.links[m.id]:
                n = self.entries[j]
                if (j in taken or kind != SAME or not n.cut or n.part.tile in tiles
                        or not self._agrees(n, members)):
                    continue
                taken.add(j)
                members.append(n)
                tiles.add(n.part.tile)
                stack.append(n)
        return members

    def _agrees(self, n: _Entry, members: list[_Entry]) -> bool:
        """Whether n is SAME-linked to every member whose tile overlaps or meets n's with both of
        their boxes reaching into the region where the two tiles are compared."""
        strong = {j for j, kind, _ in self.links[n.id] if kind == SAME}
        for m in members:
            if m.id in strong:
                continue
            regions = _seam_regions(self.boxes[n.part.tile], self.boxes[m.part.tile])
            if regions is not None and n.part.box.intersect(regions[0]) is not None \
                    and m.part.box.intersect(regions[1]) is not None:
                return False
        return True


def _joined(parts: list[Part], label: int) -> _Object:
    """An object no tile saw whole from its pieces (one per tile): mask = their union, score by the
    paper's rule over them (joined_score)."""
    if len(parts) == 1:
        p = parts[0]
        return _Object(p.label, p.score, p.r0, p.c0, p.rle, p.area, complete=False)
    r0, c0, mask = _union(parts)
    dr, dc, crop = _tight(mask)
    area = int(np.count_nonzero(crop))
    return _Object(label, joined_score(parts), r0 + dr, c0 + dc, _encode(crop), area, complete=False)


def split_cut(p: Part, tile: Box, size: tuple[int, int], speck: float = DEFAULT.speck) -> list[Part]:
    """A part its tile cut -> its connected pieces (8-connected; specks under `speck` of its pixels
    stay with the largest piece). A query's mask on a tile often holds the object it stands for and a
    sliver of a neighbour the border cuts: only the piece on the border continues in the next tile,
    the rest the tile saw whole. Each piece keeps the part's score and class probability. Whole
    parts are kept as they are (an untiled image's instance is one mask, whatever its pieces)."""
    if not _is_cut(p, tile, size):
        return [p]
    from scipy import ndimage

    mask = p.mask()
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n < 2:
        return [p]
    sizes = np.bincount(labels.ravel())[1:]
    big = [k + 1 for k in np.flatnonzero(sizes >= speck * p.area)]
    if len(big) < 2:
        return [p]
    main = big[int(np.argmax(sizes[np.array(big) - 1]))]
    out = []
    for k in big:
        piece = labels == k if k != main else (labels > 0) & ~np.isin(labels, [b for b in big if b != main])
        dr, dc, crop = _tight(piece)
        out.append(Part(p.label, p.score, p.tile, p.r0 + dr, p.c0 + dc, _encode(crop), int(np.count_nonzero(crop)),
                        p.class_prob))
    return out


def joined_score(parts: Sequence[Part]) -> float:
    """Mask2Former's score of an object seen in pieces: class probability x mean mask probability
    inside the mask, pooled over the parts' pixels (a part's mean mask probability is its score
    over its class probability; parts without a known class probability count it as 1)."""
    areas = np.array([p.area for p in parts], np.float64)
    cls = np.array([p.class_prob if p.class_prob > 0 else 1.0 for p in parts])
    mask = np.array([p.score for p in parts]) / cls
    total = max(float(areas.sum()), 1.0)
    return float((cls * areas).sum() / total * (mask * areas).sum() / total)


def merge_parts(parts: Sequence[Part], boxes: Sequence[Box], size: tuple[int, int],
                settings: Optional[Settings] = None) -> list[_Object]:
    """All parts of an image at once -> objects: tile parts (tile >= 0) through a TileMerger, tiles in
    grid order, then the full-pass parts (tile -1, ``--tile-full``) merged in (tiling._with_full_pass)."""
    merger = TileMerger(boxes, size, settings or DEFAULT)
    by_tile: dict[int, list[Part]] = {}
    for p in parts:
        by_tile.setdefault(p.tile, []).append(p)
    objects: list[_Object] = []
    row = None
    for t in sorted(range(len(boxes)), key=lambda t: (boxes[t].r0, boxes[t].c0)):
        if row is not None and boxes[t].r0 != row:
            objects += merger.flush()
        row = boxes[t].r0
        merger.add(t, by_tile.get(t, []))
    objects += merger.close()
    objects.sort(key=lambda o: (-o.score, o.label, o.r0, o.c0, o.area, o.rle["counts"]))
    return _with_full_pass(objects, sorted(by_tile.get(-1, []), key=order_key), size)
