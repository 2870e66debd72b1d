"""Merging the parts of an image's tiles into one instance per object, on their masks (issue 28).

A tile gives its candidates as parts (tiling.tile_parts: class, score, class probability, mask
crop). One object comes out many times: whole in each tile that holds it, cut in the tiles whose
border crosses it, twice in one tile (two queries), under two classes. A part is *cut* when its mask
reaches a border of its tile that lies inside the image, else *whole*; a cut part is split into its
connected pieces first (``split_cut``: a query's mask often holds its object and a sliver of a
neighbour that the border cuts; only the piece on the border continues in the next tile).

Two parts are *linked* when their masks agree (tiling/links.py: parts of one tile on all of it; a
cut part and a part of another tile where both tiles see the image; two whole parts of two tiles on
their whole masks). Kinds: SAME (same class, mask IoU >= ``Thresholds.iou``), CLASS (another class,
IoU >= ``Thresholds.class_iou``: one object under two classes), HOLDS (the other lies inside it:
intersection over the smaller mask >= ``Thresholds.ios``; either class, a fragment may come under
another).

Greedy in score order (SAHI's greedy non-maximum merging, on masks), per group of linked parts:

1. whole parts, best first: each is an object exactly as that tile gives it (mask and score by the
   paper's rule, as for an image that size), and takes the parts it is linked to (duplicates from
   other tiles and queries, other classes, pieces of it that other tiles cut) except a part it lies
   inside, and a part of another tile that runs on beyond the shared region (then it is not just
   this object); a whole mask inside it stays, at ``Thresholds.held`` x its score (soft NMS), and
   so does one inside a better object of step 2. The other tiles that see the object whole (away
   from their inner borders) and found nothing there (no part of it under any class) count as
   observations at mask probability 0, as in step 2: its score x found / seeing
   (``TileMerger._confirmed``), so a mask one tile sees where its neighbour sees nothing is halved;
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

import heapq
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from m2f_cli.tiling.links import (CLASS, HOLDS, INSIDE, MIRROR, SAME, SEAM, TILE, WHOLE, Mask, MaskCache, Thresholds,
                                  UnionFind, link, overlaps, split_cut)
from m2f_cli.tiling.grid import Box
from m2f_cli.tiling.parts import Part, _encode, _tight
from m2f_cli.tiling.seams import _is_cut, _Object, _seam_regions, _union, _with_full_pass

DEFAULT = Thresholds()


@dataclass(eq=False)
class _Entry:
    """A candidate in the merger: its global id, its part (on its mask or on a piece of it), the
    mask it lies on, its order key."""

    id: int
    part: Part
    mask: Mask
    key: tuple

    @property
    def cut(self) -> bool:
        return self.mask.cut


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


class TileMerger:
    """Streaming merge of an image's tile parts (module docstring).

    boxes: the tile grid (tiling.tile_grid); size: (H0, W0). ``add`` the tiles in any order, each
    once, with its parts; ``flush`` returns the objects whose tiles and all their neighbours have
    been added (no later tile can change them); ``close`` the rest. Objects are tiling._Object.
    """

    def __init__(self, boxes: Sequence[Box], size: tuple[int, int], settings: Thresholds = DEFAULT):
        self.boxes, self.size, self.settings = list(boxes), size, settings
        self.near = _neighbours(self.boxes)
        self.image = Box(0, 0, *size)
        self.added: set[int] = set()
        self.masks: dict[int, list[Mask]] = {}          # tile -> its masks
        self.on_mask: dict[int, list[_Entry]] = {}      # mask uid -> the candidates on it
        self.links: dict[int, list[tuple[int, str, bool]]] = {}  # entry id -> (other id, kind, other within)
        self.sets = UnionFind()                          # entry ids linked into one object
        self.entries: dict[int, _Entry] = {}
        self.next_id = 0

    def add(self, tile: int, parts: Iterable[Part]) -> None:
        if tile in self.added:
            raise ValueError(f"tile {tile} added twice")
        self.added.add(tile)
        self.masks[tile] = self._masks_of(tile, parts)
        cache, box = MaskCache(), self.boxes[tile]
        mine = self.masks[tile]
        found = [(u, u, u.area, u.area, u.area) for u in mine]  # a mask with itself: a query's classes
        found += overlaps(mine, mine, box, box, TILE, cache, self.settings)
        pairs = [(f, TILE) for f in found]
        for nb in self.near[tile]:
            theirs = self.masks.get(nb)
            if nb in self.added and theirs:
                ra, rb = _seam_regions(box, self.boxes[nb])
                pairs += [(f, SEAM) for f in overlaps(mine, theirs, ra, rb, SEAM, cache, self.settings)]
                pairs += [(f, WHOLE) for f in overlaps(mine, theirs, self.image, self.image, WHOLE, cache,
                                                       self.settings)]
        for (u, v, inter, a, b), mode in pairs:
            self._link_candidates(u, v, inter, a, b, mode)

    def _masks_of(self, tile: int, parts: Iterable[Part]) -> list[Mask]:
        """The tile's distinct masks (cut ones split into pieces, split_cut) with their candidates."""
        by_mask: dict[tuple, list[Part]] = {}
        for p in sorted(parts, key=order_key):
            by_mask.setdefault((p.r0, p.c0, tuple(p.rle["size"]), p.rle["counts"]), []).append(p)
        out = []
        for same in by_mask.values():
            p = same[0]
            cut = _is_cut(p, self.boxes[tile], self.size)
            pieces = split_cut(p.mask(), self.settings.speck) if cut else [(0, 0, None)]
            for dr, dc, crop in pieces:
                if crop is None or len(pieces) == 1:
                    m = Mask(self.next_id, tile, p.r0, p.c0, p.rle, p.area, cut)
                else:
                    piece = Part(p.label, p.score, tile, p.r0 + dr, p.c0 + dc, _encode(crop),
                                 int(np.count_nonzero(crop)), p.class_prob)
                    m = Mask(self.next_id, tile, piece.r0, piece.c0, piece.rle, piece.area,
                             _is_cut(piece, self.boxes[tile], self.size))
                self.next_id += 1
                out.append(m)
                self.on_mask[m.uid] = [self._entry(q, m) for q in same]
        return out

    def _entry(self, q: Part, m: Mask) -> _Entry:
        part = q if (m.r0, m.c0, m.rle) == (q.r0, q.c0, q.rle) else \
            Part(q.label, q.score, q.tile, m.r0, m.c0, m.rle, m.area, q.class_prob)
        e = _Entry(self.next_id, part, m, order_key(part))
        self.next_id += 1
        self.entries[e.id] = e
        self.sets.add(e.id)
        self.links[e.id] = []
        return e

    def _link_candidates(self, u: Mask, v: Mask, inter: int, a: int, b: int, mode: str) -> None:
        """Links between the candidates on masks u and v, from their counts (tiling.links.link)."""
        s = self.settings
        entire = mode != SEAM
        within_u = entire or a >= s.within * u.area
        within_v = entire or b >= s.within * v.area
        smaller = u.area if a <= b else v.area
        for x in self.on_mask[u.uid]:
            for y in self.on_mask[v.uid]:
                if u is v and x.id >= y.id:
                    continue
                kind = link(inter, a, b, x.part.label == y.part.label, smaller, entire, s)
                if kind is not None:
                    self.links[x.id].append((y.id, kind, within_v))
                    self.links[y.id].append((x.id, MIRROR[kind], within_u))
                    self.sets.union(x.id, y.id)

    def flush(self, final: bool = False) -> list[_Object]:
        """The objects of every group of linked parts whose tiles are closed (all neighbours added)."""
        closed = {t for t in self.masks if final or all(n in self.added for n in self.near[t])}
        out = []
        for ids in self.sets.groups():
            if all(self.entries[i].part.tile in closed for i in ids):
                out += self._objects([self.entries[i] for i in ids])
                for i in ids:
                    self._drop(i)
        for t in closed:
            self.masks[t] = [m for m in self.masks[t] if m.uid in self.on_mask]
        return out

    def close(self) -> list[_Object]:
        return self.flush(final=True)

    def _drop(self, i: int) -> None:
        e = self.entries.pop(i)
        on = self.on_mask[e.mask.uid]
        on.remove(e)
        if not on:
            del self.on_mask[e.mask.uid]
        del self.links[i]
        self.sets.remove(i)

    def _objects(self, group: list[_Entry]) -> list[_Object]:
        """Greedy clustering of one group of linked parts (module docstring): the whole parts, best
        first, each taking what is the same object; then the cut parts left, best first, joined."""
        group.sort(key=lambda e: e.key)
        taken: set[int] = set()
        decay: dict[int, float] = {}
        whole_out: dict[int, _Object] = {}
        out = []
        for seed in (e for e in group if not e.cut):
            if seed.id not in taken:
                taken.add(seed.id)
                self._take_linked([seed], taken, wholes=True)
                for j, kind, _ in self.links[seed.id]:  # whole masks inside it: kept, at a lower score
                    if kind == HOLDS and not self.entries[j].cut and j not in decay:
                        decay[j] = self.settings.held
                p = seed.part
                score = p.score * decay.get(seed.id, 1.0) * self._confirmed(seed)
                out.append(_Object(p.label, score, p.r0, p.c0, p.rle, p.area, complete=True))
                whole_out[seed.id] = out[-1]
        for seed in (e for e in group if e.cut):
            if seed.id in taken:
                continue
            taken.add(seed.id)
            members = self._chain(seed, taken)
            self._take_linked(members, taken, wholes=False)
            o = _joined([m.part for m in members], seed.part.label)
            if len(members) == 1:
                o.score *= self._unconfirmed(seed.part)
            if len(members) > 1:  # a whole mask inside the joined object, scoring lower: held too
                for m in members:
                    for j, kind, _ in self.links[m.id]:
                        w = whole_out.get(j)
                        if kind == HOLDS and w is not None and w.score < o.score:
                            w.score *= self.settings.held
                            del whole_out[j]
            out.append(o)
        return out

    def _confirmed(self, seed: _Entry) -> float:
        """A whole part: the share of the tiles that see all of it (its own and the others that hold it
        away from their inner borders) that found it too (a SAME or CLASS link): a tile that sees it
        whole and finds nothing there is an observation at mask probability 0, as in _unconfirmed."""
        b = seed.part.box
        seeing = {t for t in self.near[seed.part.tile] if _sees_whole(self.boxes[t], b, self.size)}
        if not seeing:
            return 1.0
        found = {self.entries[j].part.tile for j, kind, _ in self.links[seed.id] if kind in (SAME, CLASS)}
        return (1 + len(found & seeing)) / (1 + len(seeing))

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
                         if kind != INSIDE and (within and (kind != HOLDS or self.entries[j].cut) if wholes
                                                else self.entries[j].cut))

    def _chain(self, seed: _Entry, taken: set[int]) -> list[_Entry]:
        """seed and the cut parts of its class that SAME links reach through other tiles, best first,
        one part per tile, each agreeing (a SAME link) with every member whose tile overlaps its own
        where both reach: a mask cut to a sliver by its tile cannot bridge two objects."""
        members, tiles = [seed], {seed.part.tile}
        frontier: list[tuple[tuple, int]] = []

        def reach(m: _Entry) -> None:
            for j, kind, _ in self.links[m.id]:
                n = self.entries[j]
                if kind == SAME and n.cut and j not in taken:
                    heapq.heappush(frontier, (n.key, j))
        reach(seed)
        while frontier:
            _, j = heapq.heappop(frontier)
            n = self.entries[j]
            if j in taken or n.part.tile in tiles or not self._agrees(n, members):
                continue
            taken.add(j)
            members.append(n)
            tiles.add(n.part.tile)
            reach(n)
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


def _sees_whole(tile: Box, b: Box, size: tuple[int, int]) -> bool:
    """Whether a tile holds box b away from its borders that lie inside the image."""
    return ((b.r0 > tile.r0 or tile.r0 == 0 <= b.r0) and (b.c0 > tile.c0 or tile.c0 == 0 <= b.c0)
            and (b.r1 < tile.r1 or b.r1 <= tile.r1 == size[0]) and (b.c1 < tile.c1 or b.c1 <= tile.c1 == size[1]))


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
                settings: Optional[Thresholds] = None) -> list[_Object]:
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
