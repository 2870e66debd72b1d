"""polygons.py: exact outlines with holes and parts, seams, simplification, degenerate parts."""

import numpy as np
from scipy import ndimage
from shapely.geometry import Polygon

from m2f_cli.outputs.polygons import joined, mask_parts, region_parts, rle_parts, seamed

from rasterize import fill, iou


def _random_masks(n=200, seed=0):
    rng = np.random.default_rng(seed)
    for k in range(n):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        m = rng.random((h, w)) < rng.uniform(0.15, 0.85)  # speckle: pinches, 1-px lines, holes, borders
        if k % 3 == 0:
            m = ndimage.binary_opening(m)
        yield m


def test_exact_polygons_give_the_mask_back():
    """Every vertex on a pixel corner: the polygon's area is the pixel count, filling pixel centres
    gives the mask back (parts, holes, islands in holes, diagonal touches, the image border), and
    every part is a valid OGC polygon."""
    checked = 0
    for m in _random_masks():
        parts = mask_parts(m)
        h, w = m.shape
        rings = [r for p in parts for r in (p.exterior, *p.holes)]
        assert (fill(rings, h, w) == m).all()
        assert sum(p.area for p in parts) == m.sum()
        for p in parts:
            poly = Polygon(p.exterior, p.holes)
            assert poly.is_valid and poly.exterior.is_ccw is True  # positive area in (x, y)
            assert all(np.all(v == np.round(v)) for v in (p.exterior, *p.holes))
            assert p.exterior[:, 0].min() >= 0 and p.exterior[:, 0].max() <= w
        assert [p.area for p in parts] == sorted((p.area for p in parts), reverse=True)
        checked += bool(parts)
    assert checked > 150


def test_seamed_and_joined_rings_fill_like_the_parts():
    for m in _random_masks(80, seed=1):
        parts = mask_parts(m)
        h, w = m.shape
        assert (fill([seamed(p) for p in parts], h, w) == m).all()
        if parts:
            assert (fill([joined(parts)], h, w) == m).all()
    assert joined([]) is None


def test_a_ring_keeps_its_hole_and_two_blobs_are_two_parts():
    yy, xx = np.mgrid[:60, :80]
    r = np.hypot(xx - 30, yy - 30)
    ring = (r < 25) & (r >= 12)
    two = np.zeros((60, 80), bool)
    two[5:20, 60:75] = True
    two[40:55, 60:78] = True
    parts = mask_parts(ring)
    assert len(parts) == 1 and len(parts[0].holes) == 1 and parts[0].area == ring.sum()
    parts = mask_parts(two)
    assert len(parts) == 2 and not parts[0].holes and parts[0].area == 18 * 15
    assert np.array_equal(parts[0].exterior.min(0), [60, 40]) and np.array_equal(parts[0].exterior.max(0), [78, 55])


def test_pixel_corner_convention():
    m = np.zeros((4, 5), bool)
    m[1, 2] = True  # the pixel in column 2, row 1 is the square [2, 3] x [1, 2]
    (p,) = mask_parts(m)
    assert sorted(map(tuple, p.exterior.tolist())) == [(2, 1), (2, 2), (3, 1), (3, 2)]
    full = mask_parts(np.ones((4, 5), bool))[0]
    assert sorted(map(tuple, full.exterior.tolist())) == [(0, 0), (0, 4), (5, 0), (5, 4)]


def test_crops_rle_and_label_maps_give_image_coordinates():
    from pycocotools import mask as mask_utils
    m = np.zeros((50, 70), bool)
    m[10:30, 20:45] = True
    m[15:20, 25:30] = False
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    bbox = [20, 10, 25, 20]
    for parts in (rle_parts(rle, bbox), region_parts(np.where(m, 7, 0).astype(np.uint16), 7, bbox)):
        assert (fill([r for p in parts for r in (p.exterior, *p.holes)], 50, 70) == m).all()
    assert rle_parts(rle, [0, 0, 0, 0]) == [] and mask_parts(np.zeros((3, 3), bool)) == []


def test_simplify_keeps_shape_and_validity_with_fewer_vertices():
    yy, xx = np.mgrid[:200, :200]
    disc = np.hypot(xx - 100, yy - 100) < 70
    disc &= ~(np.hypot(xx - 100, yy - 100) < 20)
    exact = mask_parts(disc)[0]
    for tol in (0.5, 1.0, 2.0):
        (p,) = mask_parts(disc, simplify=tol)
        assert len(p.exterior) < len(exact.exterior) and len(p.holes) == 1
        assert Polygon(p.exterior, p.holes).is_valid
        assert iou(fill([p.exterior, *p.holes], 200, 200), disc) > 0.98


def test_simplified_parts_stay_polygons_and_degenerate_ones_are_dropped():
    from shapely.geometry import Polygon as P
    from m2f_cli.outputs.polygons import _to_part
    m = np.zeros((40, 40), bool)
    m[5:35, 5:35] = True
    m[0, 39] = True  # a one-pixel speck
    assert len(mask_parts(m)) == 2
    for tol in (0.5, 2.0, 100.0):  # topology-preserving: a part never collapses below a triangle
        parts = mask_parts(m, simplify=tol)
        assert parts and all(len(p.exterior) >= 3 and p.area > 0 for p in parts)
    assert _to_part(P([(0, 0), (1, 1), (2, 2)])) is None  # zero area
    assert _to_part(P([(0, 0), (4, 0), (4, 4)], [[(1, 1), (2, 1), (3, 1)]])).holes == ()  # flat hole dropped


def test_rle_windows_decode_like_pycocotools():
    from pycocotools import mask as mask_utils
    from m2f_cli.outputs.polygons import rle_crop
    rng = np.random.default_rng(5)
    for m in _random_masks(60, seed=2):
        h, w = m.shape
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        for counts in (rle["counts"], rle["counts"].decode()):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            bw, bh = int(rng.integers(1, w - x0 + 1)), int(rng.integers(1, h - y0 + 1))
            crop = rle_crop({"size": rle["size"], "counts": counts}, [x0, y0, bw, bh])
            assert (crop == m[y0:y0 + bh, x0:x0 + bw]).all()
    big = np.zeros((3000, 4000), bool)
    big[1000:2500, 100:3900] = True  # long runs: counts far above 5 bits, deltas negative
    rle = mask_utils.encode(np.asfortranarray(big.astype(np.uint8)))
    assert (rle_crop(rle, [0, 0, 4000, 3000]) == big).all()
