"""Polygons from masks: the one place where every vector format (yolo, labelme, cvat, geojson) gets
its geometry.

Coordinate convention: **pixel corners**. x runs right, y runs down, in pixels of the original image
(after EXIF orientation); the pixel in column c, row r is the unit square [c, c+1] x [r, r+1], so its
centre is (c + 0.5, r + 0.5) and a polygon of the whole image is (0, 0), (W, 0), (W, H), (0, H). This
is the convention of COCO boxes, of CVAT's and LabelMe's canvases (a vertex at an integer point sits
on a pixel's corner) and of GeoTIFF transforms (an affine transform maps corners to the CRS).

Exact polygons (``simplify=0``) follow the pixel edges of the mask: a part's area is its pixel count,
and a rasteriser that fills every pixel whose centre lies inside (even-odd rule) gives back exactly
the mask. Rasterisers that also fill pixels whose centre is *on* an edge at integer coordinates (PIL's
ImageDraw.polygon in LabelMe, cv2.fillPoly in Ultralytics) read one more column and row at the right
and bottom edges.

Tracing: OpenCV's findContours (Suzuki-Abe border following, RETR_CCOMP gives outer borders and the
borders of their holes) on the mask upsampled x2 by pixel repetition. Each traced border pixel of
the upsampled mask lies in one quarter of an original pixel; (u + 1) // 2 maps it to the corner of
that pixel nearest to it, which turns the border-pixel chain into the exact crack polygon along the
pixel edges (the x2 makes a 1-pixel-wide line have two distinct sides). Foreground is 8-connected
(OpenCV's rule): two pixels touching only at a corner make one outline pinched at that corner, which
shapely.make_valid splits into two parts touching at a point, so every Part is a valid OGC polygon.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Part:
    """One connected piece of a mask.

    exterior: (N, 2) float64 (x, y) vertices in pixel-corner coordinates, N >= 3, open (the first
        vertex is not repeated at the end), positive signed area in (x, y) (counter-clockwise when y
        points up, clockwise as drawn on the image).
    holes: its inner rings, same layout, negative signed area.
    area: the enclosed area in pixels (exterior minus holes); the pixel count for exact polygons.
    """

    exterior: np.ndarray
    holes: tuple[np.ndarray, ...]
    area: float


def _corner_rings(crop: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """Exact crack rings of a (h, w) bool crop: (rings as (N, 2) int64 corner coordinates of the crop,
    parent index per ring: -1 for an outer border, else the index of the outer border it is a hole of)."""
    import cv2  # here: importing OpenCV takes ~0.1 s, paid only by runs that write polygons

    padded = cv2.copyMakeBorder(np.ascontiguousarray(crop, dtype=np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    up = cv2.resize(padded, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)  # each pixel a 2x2 block
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return [], []
    rings = [(c[:, 0, :].astype(np.int64) + 1) // 2 - 1 for c in contours]  # -1: the padding
    return rings, [int(p) for p in hierarchy[0][:, 3]]


def _clean(ring: np.ndarray) -> np.ndarray:
    """Drop repeated and collinear vertices of a closed integer ring (N, 2); may return < 3 rows."""
    keep = np.any(ring != np.roll(ring, 1, axis=0), axis=1)
    ring = ring[keep]
    if len(ring) < 3:
        return ring
    prev, nxt = np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0)
    a, b = ring - prev, nxt - ring
    turn = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    return ring[turn != 0]


def _polygons(geom) -> list:
    """The polygons of a shapely geometry (Polygon, MultiPolygon, GeometryCollection)."""
    if geom.is_empty:
        return []
    if geom.geom_type == "Polygon":
        return [geom]
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in _polygons(g)]
    return []  # points and lines: no area


def _ring_area(ring: np.ndarray) -> float:
    """Signed area of an open (N, 2) ring (shoelace): positive counter-clockwise in (x, y)."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _to_part(poly) -> Optional[Part]:
    """A shapely polygon as a Part, oriented; None when degenerate (< 3 vertices or zero area)."""
    from shapely.geometry.polygon import orient

    poly = orient(poly, sign=1.0)
    if poly.area <= 0:
        return None
    ext = np.asarray(poly.exterior.coords, np.float64)[:-1]
    if len(ext) < 3:
        return None
    holes = []
    for ring in poly.interiors:
        h = np.asarray(ring.coords, np.float64)[:-1]
        if len(h) >= 3 and _ring_area(h) != 0:
            holes.append(h)
    return Part(ext, tuple(holes), float(poly.area))


def mask_parts(mask: np.ndarray, simplify: float = 0.0, origin: tuple[int, int] = (0, 0)) -> list[Part]:
    """The parts of a (h, w) bool mask, largest first.

    origin: (x, y) of the mask's top-left pixel in the image, added to every vertex (pass the crop's
        offset when mask is a crop of the image around the object).
    simplify: Douglas-Peucker tolerance in pixels (shapely, topology preserved); 0 keeps the exact
        polygon (only collinear vertices are dropped). Parts and holes that become degenerate
        (< 3 vertices, zero area) are dropped.
    """
    from shapely.geometry import Polygon
    from shapely.validation import make_valid

    mask = np.asarray(mask, bool)
    if not mask.any():
        return []
    rings, parents = _corner_rings(mask)
    ox, oy = origin
    shells: dict[int, np.ndarray] = {}
    holes: dict[int, list[np.ndarray]] = {}
    for k, (ring, parent) in enumerate(zip(rings, parents)):
        ring = _clean(ring)
        if len(ring) < 3:
            continue
        ring = ring + (ox, oy)
        if parent < 0:
            shells[k] = ring
        else:
            holes.setdefault(parent, []).append(ring)
    parts: list[Part] = []
    for k, shell in shells.items():
        poly = Polygon(shell, holes.get(k, []))
        geoms = [poly] if poly.is_valid else _polygons(make_valid(poly))
        for g in geoms:
            if simplify > 0:
                g = g.simplify(simplify, preserve_topology=True)
            for p in _polygons(g):
                part = _to_part(p)
                if part is not None:
                    parts.append(part)
    parts.sort(key=lambda p: -p.area)
    return parts


def rle_counts(rle: dict) -> np.ndarray:
    """The run lengths of a COCO RLE (int64; zeros first, column-major), from its compressed string
    (pycocotools' maskApi.c rleFrString layout: 5 bits per character from '0', a 6th bit for "more",
    sign-extended; from the third count on, each is stored as its difference to the one two before)
    or from an uncompressed list."""
    counts = rle["counts"]
    if isinstance(counts, list):
        return np.asarray(counts, np.int64)
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    out: list[int] = []
    x = k = 0
    for ch in counts:
        c = ord(ch) - 48
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if c & 0x20:
            continue
        if c & 0x10:
            x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
        x = k = 0
    return np.asarray(out, np.int64)


def rle_crop(rle: dict, bbox: Sequence[int]) -> np.ndarray:
    """The (h, w) bool window bbox [x, y, w, h] of a COCO RLE mask, decoded without the rest of the
    image (a full 12 MP decode takes ~20 ms per instance) and in memory of the window's size (a
    raster of 14k rows read in windows, tiling/stream.py, would otherwise need its full columns)."""
    x0, y0, w, h = (int(v) for v in bbox)
    height = int(rle["size"][0])
    ends = np.cumsum(rle_counts(rle))
    starts = np.concatenate([[0], ends[:-1]])
    s1, e1 = starts[1::2], ends[1::2]  # the runs of ones, as flat column-major [start, end)
    lo, hi = x0 * height, (x0 + w) * height  # the columns of the window
    keep = (e1 > lo) & (s1 < hi)
    s1, e1 = np.clip(s1[keep], lo, hi) - lo, np.clip(e1[keep], lo, hi) - lo
    # a run may go on down the next columns: one segment per column it covers
    first, last = s1 // height, (e1 - 1) // height
    n = last - first + 1
    offset = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    col = np.repeat(first, n) + offset
    top = np.where(offset == 0, np.repeat(s1, n) - col * height, 0)
    bottom = np.where(col == np.repeat(last, n), np.repeat(e1, n) - col * height, height)
    top, bottom = np.clip(top, y0, y0 + h) - y0, np.clip(bottom, y0, y0 + h) - y0
    ok = bottom > top
    edges = np.zeros((w, h + 1), np.int32)
    np.add.at(edges, (col[ok], top[ok]), 1)
    np.add.at(edges, (col[ok], bottom[ok]), -1)
    return (np.cumsum(edges[:, :-1], axis=1) > 0).T


def rle_parts(rle: dict, bbox: Sequence[int], simplify: float = 0.0) -> list[Part]:
    """The parts of a COCO RLE mask ({"size": [H, W], "counts"}); bbox: [x, y, w, h] around it
    (Instance.bbox), so that only that window is decoded and traced."""
    x, y, w, h = (int(v) for v in bbox)
    if w <= 0 or h <= 0:
        return []
    return mask_parts(rle_crop(rle, bbox), simplify, origin=(x, y))


def region_parts(label_map: np.ndarray, value: int, bbox: Sequence[int], simplify: float = 0.0) -> list[Part]:
    """The parts of the pixels equal to value in a (H, W) label map, within bbox [x, y, w, h]."""
    x, y, w, h = (int(v) for v in bbox)
    if w <= 0 or h <= 0:
        return []
    return mask_parts(label_map[y:y + h, x:x + w] == value, simplify, origin=(x, y))


def _splice(ring: np.ndarray, other: np.ndarray) -> np.ndarray:
    """ring with other inserted through a zero-width seam: ring[..i], other[j..], other[..j],
    ring[i..], where ring[i], other[j] is the closest pair of their vertices."""
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(ring).query(other)
    j = int(np.argmin(dist))
    i = int(idx[j])
    return np.concatenate([ring[:i + 1], other[j:], other[:j + 1], ring[i:]])


def seamed(part: Part) -> np.ndarray:
    """One (N, 2) ring for a part with holes, for formats whose polygons have none (LabelMe, CVAT):
    each hole joined to the ring by a zero-width seam (there and back along one segment). Even-odd
    and non-zero fills give back the part with its holes, as the seams enclose no area."""
    ring = part.exterior
    for hole in part.holes:
        ring = _splice(ring, hole)
    return ring


def joined(parts: Sequence[Part]) -> Optional[np.ndarray]:
    """One (N, 2) ring for all parts and holes of a mask (YOLO's one polygon per instance): each
    part seamed, then spliced into the largest part's ring in order of size. None without parts."""
    if not parts:
        return None
    ring = seamed(parts[0])
    for p in parts[1:]:
        ring = _splice(ring, seamed(p))
    return ring
