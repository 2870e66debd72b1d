"""The merge of tile parts on their masks (src/m2f_cli/tiling/merge.py, tiling/links.py), on planted
parts whose right answer is known: duplicates from overlapping tiles, queries and classes become one
instance, exactly the best view; parts cut by seams become one instance, exactly the object, scored
by Mask2Former's rule over their pixels; slivers do not bridge objects; streaming = all at once."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from m2f_cli.model.categories import CategoryTable
from m2f_cli.postprocess.instance import PostprocessOptions
from m2f_cli.tiling.links import Thresholds, split_cut
from m2f_cli.tiling.merge import TileMerger, joined_score, merge_parts
from m2f_cli.tiling.grid import Box, tile_grid
from m2f_cli.tiling.parts import Part
from m2f_cli.tiling.seams import instances_of

COCO = CategoryTable.coco()
SIZE = (200, 300)  # (H0, W0)
PERSON, DOG = 0, 16


def _mask(*rects, disc=None) -> np.ndarray:
    m = np.zeros(SIZE, bool)
    for r0, c0, r1, c1 in rects:
        m[r0:r1, c0:c1] = True
    if disc is not None:
        cy, cx, r = disc
        yy, xx = np.mgrid[:SIZE[0], :SIZE[1]]
        m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return m


def _part(mask: np.ndarray, tile: int, box: Box, label: int = PERSON, cls: float = 0.9, mprob: float = 0.8) -> Part:
    """The part tile `tile` (at box) sees of the full-size mask: score = cls x mprob (the paper's rule)."""
    m = np.zeros_like(mask)
    m[box.r0:box.r1, box.c0:box.c1] = mask[box.r0:box.r1, box.c0:box.c1]
    return Part.of_mask(label, cls * mprob, tile, m, cls)


def _instances(parts, boxes, threshold=0.3):
    opts = PostprocessOptions(threshold=threshold, map_threshold=threshold)
    return instances_of(merge_parts(parts, boxes, SIZE), SIZE, COCO, opts, len(boxes))


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


# two tiles side by side overlapping on columns 120..180
PAIR = [Box(0, 0, 200, 180), Box(0, 120, 200, 300)]


def test_duplicates_from_tiles_queries_and_classes_become_the_best_view():
    obj = _mask(disc=(100, 150, 22))                     # inside the overlap: whole in both tiles
    near = obj & ~_mask((76, 128, 84, 172))              # a second query of tile 1: most of it
    parts = [_part(obj, 0, PAIR[0], cls=0.9, mprob=0.8),  # the best view: 0.72
             _part(obj, 1, PAIR[1], cls=0.85, mprob=0.8),
             _part(near, 1, PAIR[1], cls=0.8, mprob=0.75),
             _part(obj, 0, PAIR[0], label=DOG, cls=0.6, mprob=0.8),   # the same query, another class
             _part(near, 1, PAIR[1], label=DOG, cls=0.7, mprob=0.8)]  # another query, another class
    insts, imap = _instances(parts, PAIR)
    assert len(insts) == 1
    i = insts[0]
    assert (i.label, i.score, i.area) == ("person", pytest.approx(0.72), int(obj.sum()))
    assert np.array_equal(_decode(i.rle), obj) and np.array_equal(imap == 1, obj)


def test_a_fragment_inside_a_whole_view_is_kept_at_half_its_score():
    """Soft non-maximum suppression of a mask inside a better one (Thresholds.held): a fragment
    drops below the usual thresholds, and a mask a fragment lies in is never suppressed."""
    obj = _mask(disc=(100, 60, 30))
    frag = _mask(disc=(100, 60, 12))
    other = _mask((20, 20, 60, 100))
    parts = [_part(obj, 0, PAIR[0], mprob=0.8), _part(frag, 0, PAIR[0], mprob=0.7),
             _part(other, 0, PAIR[0], mprob=0.75)]
    insts, _ = _instances(parts, PAIR, threshold=0.5)
    assert sorted(i.area for i in insts) == sorted([int(obj.sum()), int(other.sum())])
    objects = merge_parts(parts, PAIR, SIZE)
    assert sorted(round(o.score, 4) for o in objects) == [round(0.9 * 0.7 * 0.5, 4), 0.675, 0.72]
    # the fragment scoring higher than the whole: both stay, at their own scores
    parts = [_part(obj, 0, PAIR[0], mprob=0.6), _part(frag, 0, PAIR[0], mprob=0.95)]
    assert sorted(round(o.score, 4) for o in merge_parts(parts, PAIR, SIZE)) == [0.54, 0.855]


def test_a_whole_view_that_another_tile_sees_whole_but_misses_is_scored_with_it():
    """Both tiles see the object whole (in their overlap, away from their inner borders): when only
    tile 0 finds it, tile 1's observation counts at mask probability 0 and halves its score; found
    by both (under any class), it keeps the best view's score; seen whole by one tile only, its own."""
    obj = _mask(disc=(100, 150, 15))                     # columns 135..165, inside the overlap 120..180
    assert [round(o.score, 4) for o in merge_parts([_part(obj, 0, PAIR[0])], PAIR, SIZE)] == [0.36]
    both = [_part(obj, 0, PAIR[0]), _part(obj, 1, PAIR[1], cls=0.85)]
    assert [round(o.score, 4) for o in merge_parts(both, PAIR, SIZE)] == [0.72]
    other_class = [_part(obj, 0, PAIR[0]), _part(obj, 1, PAIR[1], label=DOG, cls=0.6)]
    assert [(o.label, round(o.score, 4)) for o in merge_parts(other_class, PAIR, SIZE)] == [(PERSON, 0.72)]
    near_seam = _mask(disc=(100, 125, 15))              # across tile 1's border (column 120): whole in tile 0 only
    assert [round(o.score, 4) for o in merge_parts([_part(near_seam, 0, PAIR[0])], PAIR, SIZE)] == [0.72]


def test_a_fragment_under_another_class_inside_a_better_view_is_held_too():
    obj = _mask(disc=(100, 60, 30))
    frag = _mask(disc=(100, 60, 12))                     # IoU 0.16 with obj: not the same object
    parts = [_part(obj, 0, PAIR[0], mprob=0.8), _part(frag, 0, PAIR[0], label=DOG, mprob=0.7)]
    got = sorted((o.label, round(o.score, 4)) for o in merge_parts(parts, PAIR, SIZE))
    assert got == [(PERSON, 0.72), (DOG, round(0.9 * 0.7 * 0.5, 4))]
    # the fragment scoring higher: both stay, at their own scores
    parts = [_part(obj, 0, PAIR[0], mprob=0.6), _part(frag, 0, PAIR[0], label=DOG, mprob=0.95)]
    got = sorted((o.label, round(o.score, 4)) for o in merge_parts(parts, PAIR, SIZE))
    assert got == [(PERSON, 0.54), (DOG, 0.855)]


@pytest.mark.parametrize("boxes", [
    [Box(0, 0, 110, 160), Box(0, 140, 110, 300), Box(90, 0, 200, 160), Box(90, 140, 200, 300)],  # 2x2, overlap 20
    [Box(0, 0, 100, 150), Box(0, 150, 100, 300), Box(100, 0, 200, 150), Box(100, 150, 200, 300)],  # --tile S,0
])
def test_parts_cut_by_seams_join_into_the_object_scored_by_the_papers_rule(boxes):
    obj = _mask((40, 90, 170, 220))                      # larger than the overlaps: cut in all four tiles
    probs = [(0.9, 0.8), (0.7, 0.9), (0.8, 0.6), (0.95, 0.85)]
    parts = [_part(obj, t, b, cls=c, mprob=m) for t, (b, (c, m)) in enumerate(zip(boxes, probs))]
    insts, imap = _instances(parts, boxes)
    assert len(insts) == 1
    i = insts[0]
    assert np.array_equal(_decode(i.rle), obj) and np.array_equal(imap == 1, obj) and i.area == obj.sum()
    assert i.bbox == (90, 40, 130, 130)
    # class probability x mean mask probability over the parts' pixels (a pixel two tiles saw counts twice)
    areas = np.array([p.area for p in parts], float)
    cls = np.array([c for c, _ in probs])
    mprob = np.array([m for _, m in probs])
    want = (cls * areas).sum() / areas.sum() * (mprob * areas).sum() / areas.sum()
    assert i.score == pytest.approx(want) == pytest.approx(joined_score(parts))
    assert min(p.score for p in parts) < i.score < max(p.score for p in parts)


def test_a_fragment_inside_a_joined_object_is_held_too():
    boxes = [Box(0, 0, 110, 160), Box(0, 140, 110, 300), Box(90, 0, 200, 160), Box(90, 140, 200, 300)]
    obj = _mask((40, 90, 170, 220))
    frag = _mask((50, 100, 80, 130))                     # whole in tile 0, inside the object
    parts = [_part(obj, t, b, cls=0.9, mprob=0.8) for t, b in enumerate(boxes)]
    parts.append(_part(frag, 0, boxes[0], cls=0.8, mprob=0.75))
    got = sorted((o.area, round(o.score, 4)) for o in merge_parts(parts, boxes, SIZE))
    assert got == [(int(frag.sum()), round(0.6 * 0.5, 4)), (int(obj.sum()), 0.72)]


def test_a_sliver_of_a_neighbour_does_not_bridge_two_objects():
    """Tile 0's query for X also holds the sliver of Y its right border cuts (one mask, two pieces):
    X stays X (seen whole), Y is joined from its pieces, and the two never become one."""
    x = _mask((60, 40, 140, 100))
    y = _mask((50, 150, 150, 240))                       # cut by tile 0's border (column 180)
    boxes = PAIR
    parts = [_part(x | y, 0, boxes[0], cls=0.9, mprob=0.9),           # X and Y's sliver, one query
             _part(y, 1, boxes[1], cls=0.9, mprob=0.8)]              # Y, whole in tile 1
    insts, _ = _instances(parts, boxes)
    got = sorted((int(_decode(i.rle).sum()), i.label) for i in insts)
    assert got == sorted([(int(x.sum()), "person"), (int(y.sum()), "person")])
    for i in insts:
        m = _decode(i.rle)
        assert np.array_equal(m, x) or np.array_equal(m, y)


def test_split_cut_keeps_specks_with_the_largest_piece():
    crop = np.zeros((20, 40), bool)
    crop[2:18, 2:20] = True      # 288 px
    crop[5:15, 30:38] = True     # 80 px: a piece
    crop[0, 39] = True           # 1 px: a speck
    pieces = split_cut(crop, 0.1)
    assert sorted(int(p[2].sum()) for p in pieces) == [80, 289]
    assert split_cut(crop, 0.5)[0][2] is crop   # no second piece of half the pixels: left whole


def test_a_cut_piece_no_tile_continues_is_scored_with_the_tiles_that_saw_nothing():
    piece = _mask((80, 150, 120, 180))                   # in the overlap, cut by tile 0's border at 180
    parts = [_part(piece, 0, PAIR[0], cls=0.9, mprob=0.8)]
    insts, _ = _instances(parts, PAIR, threshold=0.1)
    # tile 1 saw all its pixels and found nothing there: half the observations at probability 0
    assert len(insts) == 1 and insts[0].score == pytest.approx(0.72 * 0.5)


def _scene(boxes, seed):
    rng = np.random.default_rng(seed)
    objs = [(_mask(disc=(int(rng.integers(20, 180)), int(rng.integers(20, 280)), int(rng.integers(8, 40)))),
             int(rng.choice([PERSON, DOG]))) for _ in range(12)]
    parts = []
    for t, b in enumerate(boxes):
        for m, lab in objs:
            if m[b.r0:b.r1, b.c0:b.c1].any():
                parts.append(_part(m, t, b, label=lab, cls=float(rng.uniform(0.5, 1)), mprob=float(rng.uniform(0.6, 1))))
    return parts


def _key(objects):
    return sorted((o.label, round(o.score, 9), o.r0, o.c0, o.area, o.rle["counts"]) for o in objects)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_the_merge_depends_on_the_parts_only_and_streams(seed):
    boxes = tile_grid(*SIZE, 80, 0.25)
    parts = _scene(boxes, seed)
    want = merge_parts(parts, boxes, SIZE)
    assert 5 <= len(want) < len(parts)
    for seed in range(3):  # another order of the parts
        shuffled = list(parts)
        random.Random(seed).shuffle(shuffled)
        assert _key(merge_parts(shuffled, boxes, SIZE)) == _key(want)
    perm = list(reversed(range(len(boxes))))  # the tiles numbered the other way round
    renumbered = [Part(p.label, p.score, perm.index(p.tile), p.r0, p.c0, p.rle, p.area, p.class_prob) for p in parts]
    assert _key(merge_parts(renumbered, [boxes[i] for i in perm], SIZE)) == _key(want)
    # streamed: tiles added in grid order, the finished objects taken after every tile
    merger, got = TileMerger(boxes, SIZE), []
    for t in range(len(boxes)):
        merger.add(t, [p for p in parts if p.tile == t])
        got += merger.flush()
    early = len(got)
    got += merger.close()
    assert 0 < early and _key(got) == _key(want)
    with pytest.raises(ValueError, match="twice"):
        merger.add(0, [])


def test_thresholds_are_the_documented_ones():
    t = Thresholds()
    assert (t.iou, t.class_iou, t.ios, t.ios_share, t.within, t.speck, t.held) == (0.45, 0.4, 0.7, 0.5, 0.8, 0.1, 0.5)
