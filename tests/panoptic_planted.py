"""Planted COCO panoptic ground truths and predictions on disk (PNG folder + JSON), for m2f eval."""

from __future__ import annotations

import json
import os

import numpy as np

from m2f_cli.outputs import coco_panoptic

CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
              {"id": 184, "name": "sky", "isthing": 0}, {"id": 187, "name": "road", "isthing": 0}]


def write_panoptic(folder, name: str, images: list[tuple[str, np.ndarray, dict]], categories=CATEGORIES,
                   image_ids=None, with_images=True) -> str:
    """Write <folder>/<name>.json and <folder>/<name>/<stem>.png. images: (file name, (H, W) id map,
    {segment id: (category id, iscrowd)}). Returns the JSON path."""
    png_dir = os.path.join(folder, name)
    os.makedirs(png_dir, exist_ok=True)
    imgs, anns = [], []
    for n, (file_name, ids, segs) in enumerate(images):
        iid = image_ids[n] if image_ids else n + 1
        stem = os.path.splitext(os.path.basename(file_name))[0] + ".png"
        with open(os.path.join(png_dir, stem), "wb") as f:
            f.write(coco_panoptic.encode_png(ids))
        stats = coco_panoptic.segment_stats(ids)
        info = [{"id": s, "category_id": c, "iscrowd": crowd, "area": stats[s][0], "bbox": stats[s][1]}
                for s, (c, crowd) in segs.items() if s in stats]
        imgs.append({"id": iid, "file_name": file_name, "width": ids.shape[1], "height": ids.shape[0]})
        anns.append({"image_id": iid, "file_name": stem, "segments_info": info})
    doc = {"annotations": anns, "categories": categories}
    if with_images:
        doc["images"] = imgs
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def random_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, dict]:
    """A ground truth: road below, sky above, a few person/car rectangles, some void, maybe a crowd
    region (at most one per category, as in COCO's)."""
    ids = np.zeros((h, w), np.uint32)
    ids[: h // 2] = 1000
    ids[h // 2:] = 2000
    segs = {1000: (184, 0), 2000: (187, 0)}
    crowded = set()
    for k in range(int(rng.integers(2, 6))):
        y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        hh, ww = int(rng.integers(4, h // 2)), int(rng.integers(4, w // 2))
        sid = 10 + k
        ids[y:y + hh, x:x + ww] = sid
        cat = int(rng.choice([1, 3]))
        crowd = int(rng.random() < 0.15 and cat not in crowded)  # COCO: one crowd region per category
        crowded |= {cat} if crowd else set()
        segs[sid] = (cat, crowd)
    ids[: max(1, h // 10), : max(1, w // 10)] = 0  # void corner
    present = set(np.unique(ids).tolist())
    return ids, {s: v for s, v in segs.items() if s in present}


def perturb(rng: np.random.Generator, ids: np.ndarray, segs: dict) -> tuple[np.ndarray, dict]:
    """A prediction: the ground truth's segments shifted, some dropped, recoloured or mislabelled,
    plus a spurious segment; crowd flags gone (predictions have none)."""
    out = np.zeros_like(ids)
    pred = {}
    for n, (s, (cat, _)) in enumerate(segs.items()):
        if rng.random() < 0.15:
            continue
        dy, dx = (int(v) for v in rng.integers(-3, 4, 2))
        m = np.roll(np.roll(ids == s, dy, 0), dx, 1)
        pid = 500 + n
        out[m] = pid
        pred[pid] = 1 if rng.random() < 0.1 and cat != 1 else cat
    h, w = ids.shape
    y, x = int(rng.integers(0, h - 6)), int(rng.integers(0, w - 6))
    out[y:y + 5, x:x + 5] = 999
    pred[999] = 3
    present = set(np.unique(out).tolist())
    return out, {s: (c, 0) for s, c in pred.items() if s in present}
