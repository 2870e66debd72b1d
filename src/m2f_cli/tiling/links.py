"""Comparing the masks of tile parts for tiling/merge.py: which pairs are one object, and how.

A tile's candidates share masks (a query's mask comes with each of its classes), so masks are
compared once each (``Mask``), and the verdict is drawn per pair of candidates from the counts
(``link``). Where two masks are compared (``overlaps``'s modes):

- TILE: two masks of one tile, on all of it;
- SEAM: a cut mask and a mask of another tile, where both tiles see the image (their overlap; for
  tiles that only meet, ``--tile SIZE,0``, the pixel line either side of the seam);
- WHOLE: two whole masks of two tiles, on all of their pixels (both are complete: a pixel of one
  outside the other's tile is a difference, not something the other could not see).

Candidate pairs are screened by an upper bound of their intersection (the overlap of their windows,
the smaller area); only those that could link are intersected exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from m2f_cli.tiling.grid import Box
from m2f_cli.tiling.parts import _tight

TILE, SEAM, WHOLE = "tile", "seam", "whole"
# How two linked candidates relate, seen from the first: the same object (same class, IoU), the
# same object under another class (IoU), the other lies inside this one, this one lies inside the
# other (intersection over the smaller mask, any class: a fragment may come under another class).
SAME, CLASS, HOLDS, INSIDE = "same", "class", "holds", "inside"
MIRROR = {SAME: SAME, CLASS: CLASS, HOLDS: INSIDE, INSIDE: HOLDS}


@dataclass(frozen=True)
class Thresholds:
    """iou: SAME, same-class mask IoU. class_iou: CLASS, IoU of two classes' masks. ios: HOLDS,
    intersection over the smaller mask (either class, when not SAME or CLASS). ios_share: in SEAM mode HOLDS counts only when the smaller
    mask has this share of its pixels where both tiles see. within: a whole object takes a candidate
    of another tile only when this share of it lies where both tiles see (tile_merge). speck: pieces
    of a cut mask under this share of its pixels stay with its largest piece (split_cut). held: the
    factor on the score of a whole mask that lies inside a better whole one (HOLDS): soft
    non-maximum suppression (Bodla et al. 2017), so a fragment falls below the usual thresholds
    while an object that a coarse mask covers is still there for COCO's ranking."""

    iou: float = 0.45
    class_iou: float = 0.4
    ios: float = 0.7
    ios_share: float = 0.5
    within: float = 0.8
    speck: float = 0.1
    held: float = 0.5


@dataclass(eq=False)
class Mask:
    """One distinct mask of one tile: uid (unique in the merger), rows r0.., cols c0.. of the image,
    rle: its (h, w) crop as pycocotools RLE (bytes counts), area: pixels, cut: it reaches a border
    of its tile that lies inside the image (the tile saw only part of the object)."""

    uid: int
    tile: int
    r0: int
    c0: int
    rle: dict
    area: int
    cut: bool

    @property
    def box(self) -> Box:
        h, w = self.rle["size"]
        return Box(self.r0, self.c0, self.r0 + h, self.c0 + w)


class MaskCache:
    """Decoded crops (bool (h, w)) by uid, for the duration of one tile's comparisons."""

    def __init__(self):
        self.cache: dict[int, np.ndarray] = {}

    def __call__(self, m: Mask) -> np.ndarray:
        got = self.cache.get(m.uid)
        if got is None:
            from pycocotools import mask as mask_utils
            got = self.cache[m.uid] = mask_utils.decode(m.rle).astype(bool)
        return got


def _windows(masks: Sequence[Mask], region: Box, cache: MaskCache):
    """Per mask: its window [r0, c0, r1, c1] in region coordinates, its crop there, its pixels there
    (an empty window when its box misses the region)."""
    boxes = np.zeros((len(masks), 4), np.int64)
    crops, areas = [], np.zeros(len(masks), np.int64)
    for k, m in enumerate(masks):
        ov = m.box.intersect(region)
        if ov is None:
            crops.append(None)
            continue
        crop = cache(m)[ov.r0 - m.r0:ov.r1 - m.r0, ov.c0 - m.c0:ov.c1 - m.c0]
        boxes[k] = (ov.r0 - region.r0, ov.c0 - region.c0, ov.r1 - region.r0, ov.c1 - region.c0)
        crops.append(crop)
        areas[k] = m.area if crop.shape == (m.box.r1 - m.r0, m.box.c1 - m.c0) else np.count_nonzero(crop)
    return boxes, crops, areas


def overlaps(ma: Sequence[Mask], mb: Sequence[Mask], ra: Box, rb: Box, mode: str, cache: MaskCache,
             s: Thresholds) -> list[tuple[Mask, Mask, int, int, int]]:
    """(u, v, shared pixels, u's pixels, v's pixels) in the compared regions (ra for ma, rb for mb,
    same shape) for the pairs of masks that could link under some pair of classes; TILE: ma is mb
    and only u before v; SEAM: pairs with a cut mask; WHOLE: pairs of whole masks."""
    if not ma or not mb:
        return []
    ba, ca, aa = _windows(ma, ra, cache)
    bb, cb, ab = _windows(mb, rb, cache)
    h = np.clip(np.minimum(ba[:, None, 2], bb[None, :, 2]) - np.maximum(ba[:, None, 0], bb[None, :, 0]), 0, None)
    w = np.clip(np.minimum(ba[:, None, 3], bb[None, :, 3]) - np.maximum(ba[:, None, 1], bb[None, :, 1]), 0, None)
    small = np.minimum(aa[:, None], ab[None, :])
    bound = np.minimum(h * w, small).astype(np.float64)
    iou_bound = bound / np.maximum(aa[:, None] + ab[None, :] - bound, 1)
    maybe = (bound > 0) & ((iou_bound >= min(s.iou, s.class_iou)) | (bound >= s.ios * np.maximum(small, 1)))
    if mode == TILE:
        maybe &= np.triu(np.ones_like(maybe), 1).astype(bool)
    else:
        cut = np.array([m.cut for m in ma])[:, None] | np.array([m.cut for m in mb])[None, :]
        maybe &= cut if mode == SEAM else ~cut
    out = []
    for i, j in zip(*np.nonzero(maybe)):
        r0, c0 = max(ba[i, 0], bb[j, 0]), max(ba[i, 1], bb[j, 1])
        r1, c1 = min(ba[i, 2], bb[j, 2]), min(ba[i, 3], bb[j, 3])
        x = ca[i][r0 - ba[i, 0]:r1 - ba[i, 0], c0 - ba[i, 1]:c1 - ba[i, 1]]
        y = cb[j][r0 - bb[j, 0]:r1 - bb[j, 0], c0 - bb[j, 1]:c1 - bb[j, 1]]
        inter = int(np.count_nonzero(x & y))
        if inter:
            out.append((ma[i], mb[j], inter, int(aa[i]), int(ab[j])))
    return out


def link(inter: int, a: int, b: int, same_class: bool, smaller_area: int, entire: bool,
         s: Thresholds) -> Optional[str]:
    """The kind of link (seen from the first) between two candidates whose masks have a and b pixels
    in the compared region and share inter there, or None. smaller_area: all the pixels of the mask
    with fewer in the region (SEAM: HOLDS needs ios_share of them there); entire: not SEAM."""
    iou = inter / (a + b - inter)
    if not same_class and iou >= s.class_iou:
        return CLASS
    if same_class and iou >= s.iou:
        return SAME
    if not entire and min(a, b) < s.ios_share * smaller_area:
        return None
    if inter < s.ios * min(a, b):
        return None
    return HOLDS if b <= a else INSIDE


def split_cut(crop: np.ndarray, speck: float) -> list[tuple[int, int, np.ndarray]]:
    """A cut mask's (h, w) bool crop -> its pieces (dr, dc, tight crop): the 8-connected components
    with at least `speck` of its pixels, the smaller specks staying with the largest piece; one
    piece (the crop itself) when there are not two such components."""
    from scipy import ndimage

    labels, n = ndimage.label(crop, structure=np.ones((3, 3), bool))
    if n < 2:
        return [(0, 0, crop)]
    sizes = np.bincount(labels.ravel())[1:]
    big = np.flatnonzero(sizes >= speck * sizes.sum()) + 1
    if len(big) < 2:
        return [(0, 0, crop)]
    main = int(big[np.argmax(sizes[big - 1])])
    out = []
    for k in big.tolist():
        piece = labels == k if k != main else (labels > 0) & ~np.isin(labels, big[big != main])
        out.append(_tight(piece))
    return out


class UnionFind:
    """Disjoint sets of ids (path halving; a set's root is its smallest id), for both merges: ids
    may be added as parts stream in (merge.TileMerger) and a finished set removed whole."""

    def __init__(self, ids: Iterable[int] = ()):
        self.parent: dict[int, int] = {i: i for i in ids}

    def add(self, i: int) -> None:
        self.parent[i] = i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def remove(self, i: int) -> None:
        """Forget i: only for the members of a set removed whole (no other id may point at it)."""
        del self.parent[i]

    def groups(self) -> list[list[int]]:
        """The sets, each in the order its ids were added, in the order of their first ids."""
        out: dict[int, list[int]] = {}
        for i in self.parent:
            out.setdefault(self.find(i), []).append(i)
        return list(out.values())

