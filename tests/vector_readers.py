"""Read m2f's polygon formats back into masks for the round-trip tests (rasterize.fill: pixel
centres, even-odd), keyed as each format identifies an instance."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from rasterize import fill


def _points(text: str) -> np.ndarray:
    return np.array([[float(v) for v in p.split(",")] for p in text.split(";")])


def geojson_masks(path: Path) -> dict[int, np.ndarray]:
    """{feature id: mask} of one FeatureCollection in pixel coordinates."""
    doc = json.loads(Path(path).read_text())
    h, w = doc["height"], doc["width"]
    out = {}
    for f in doc["features"]:
        g = f["geometry"]
        polys = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
        m = np.zeros((h, w), bool)
        for rings in polys:
            m ^= fill([np.asarray(r)[:-1] for r in rings], h, w)
        out[f["id"]] = m
    return out


def labelme_masks(path: Path) -> dict[int, np.ndarray]:
    """{group_id: union of its shapes' masks} of one LabelMe file."""
    doc = json.loads(Path(path).read_text())
    h, w = doc["imageHeight"], doc["imageWidth"]
    out: dict[int, np.ndarray] = {}
    for s in doc["shapes"]:
        assert s["shape_type"] == "polygon"
        m = fill([s["points"]], h, w)
        out[s["group_id"]] = out.get(s["group_id"], np.zeros((h, w), bool)) | m
    return out


def cvat_masks(path: Path) -> dict[str, dict[int, np.ndarray]]:
    """{image name: {group_id: union of its polygons' masks}} of one CVAT XML."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for im in ET.parse(path).getroot().findall("image"):
        h, w = int(im.get("height")), int(im.get("width"))
        per: dict[int, np.ndarray] = {}
        for p in im.findall("polygon"):
            g = int(p.get("group_id"))
            per[g] = per.get(g, np.zeros((h, w), bool)) | fill([_points(p.get("points"))], h, w)
        out[im.get("name")] = per
    return out


def yolo_rows(path: Path, h: int, w: int) -> list[tuple[int, np.ndarray]]:
    """[(class index, (N, 2) polygon in pixels)] of one label file, in line order."""
    rows = []
    for line in Path(path).read_text().splitlines():
        cls, *xy = line.split()
        rows.append((int(cls), np.asarray(xy, np.float64).reshape(-1, 2) * (w, h)))
    return rows


def yolo_masks(path: Path, h: int, w: int) -> list[tuple[int, np.ndarray]]:
    """[(class index, mask)] by pixel-centre fill."""
    return [(c, fill([ring], h, w)) for c, ring in yolo_rows(path, h, w)]


def yolo_masks_cv2(path: Path, h: int, w: int) -> list[tuple[int, np.ndarray]]:
    """[(class index, mask)] rasterised the way Ultralytics does (data/utils.py polygon2mask: int32
    vertices, cv2.fillPoly, which also fills the pixels an edge passes through)."""
    import cv2
    out = []
    for c, ring in yolo_rows(path, h, w):
        m = np.zeros((h, w), np.uint8)
        cv2.fillPoly(m, [np.asarray(ring, np.int32)], 1)
        out.append((c, m.astype(bool)))
    return out


def cvat_masks_pycocotools(path: Path) -> dict[str, dict[int, np.ndarray]]:
    """cvat_masks with pycocotools' polygon rasteriser (frPyObjects), the one CVAT's dataset layer
    (Datumaro) turns polygons into masks with."""
    from pycocotools import mask as mask_utils
    out: dict[str, dict[int, np.ndarray]] = {}
    for im in ET.parse(path).getroot().findall("image"):
        h, w = int(im.get("height")), int(im.get("width"))
        per: dict[int, np.ndarray] = {}
        for p in im.findall("polygon"):
            flat = _points(p.get("points")).ravel().tolist()
            m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([flat], h, w))).astype(bool)
            g = int(p.get("group_id"))
            per[g] = per.get(g, np.zeros((h, w), bool)) | m
        out[im.get("name")] = per
    return out
