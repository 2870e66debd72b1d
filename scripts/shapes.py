"""Synthetic "shapes" data for the trained fixture model (scripts/train_fixture.py) and the
end-to-end accuracy tests (tests/test_trained_model.py).

Images of varied sizes and aspect ratios (96..256 px per side) with textured, noisy coloured
backgrounds and 1-5 instances of 4 shape classes. Shapes are drawn in order, so later shapes
occlude earlier ones; the ground-truth masks are the VISIBLE parts. Placement is rejected when it
would hide more than half of an earlier shape, and instances whose visible area is tiny are
dropped, so every ground-truth instance is clearly visible.

Class mapping (model label index -> shape -> COCO name, official COCO category id). The shapes
borrow the names of COCO classes they loosely resemble, so the checkpoint's id2label is all COCO
names and m2f's category table maps them to COCO ids:

    0  disc      -> "sports ball" (37)
    1  triangle  -> "kite"        (38)
    2  ring      -> "frisbee"     (34)
    3  square    -> "clock"       (85)

Only numpy, Pillow and pycocotools: importable from tests without torch.
"""

from __future__ import annotations

import colorsys
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("disc", "triangle", "ring", "square")
COCO_NAMES: tuple[str, ...] = ("sports ball", "kite", "frisbee", "clock")
COCO_IDS: tuple[int, ...] = (37, 38, 34, 85)
ID2LABEL: dict[int, str] = dict(enumerate(COCO_NAMES))

# Each class has its own hue band (colour still varies: hue within the band, saturation, brightness).
# Measured: with colours independent of the class, a model this small trained from scratch on 2 CPU
# cores never got above chance at telling the shapes apart (its masks were fine: its queries average
# features inside the mask, which carry no shape information until the backbone learns boundary
# shape, far beyond the ~25-minute budget); with these bands it learns the classes in ~100 steps.
# Rings additionally differ by their hole, and every class keeps its shape.
HUE_CENTRES: tuple[float, ...] = (0.02, 0.30, 0.57, 0.80)   # red-orange, green, blue, purple
HUE_HALF_WIDTH = 0.06

MIN_SIDE, MAX_SIDE = 96, 256
MIN_VISIBLE_PX = 40          # drop instances with fewer visible pixels
MIN_VISIBLE_FRACTION = 0.5   # placement never hides more than half of an earlier shape


@dataclass
class Sample:
    """image: (H, W, 3) uint8. labels: model label indices. masks: (N, H, W) bool visible parts."""

    image: np.ndarray
    labels: list[int]
    masks: np.ndarray


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], (h, w): a random coarse grid upsampled bilinearly."""
    g = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    img = Image.fromarray(g, mode="F").resize((w, h), resample=Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 in 0..255: two-colour gradient + blotches + optional texture + noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    # keep the two gradient colours fairly close, so shapes can be made to stand out
    c1 = c0 + (c1 - c0) * rng.uniform(0.2, 0.6)
    ang = rng.uniform(0, 2 * np.pi)
    t = (xx * np.cos(ang) + yy * np.sin(ang))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    bg = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    for c in range(3):
        bg[..., c] += rng.uniform(8, 25) * _smooth_noise(rng, h, w, int(rng.integers(3, 8)))
    kind = rng.integers(0, 4)
    if kind == 1:  # stripes
        period = rng.uniform(6, 20)
        a = rng.uniform(0, np.pi)
        s = np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period)
        bg += rng.uniform(6, 18) * s[..., None]
    elif kind == 2:  # checker
        p = int(rng.integers(6, 18))
        chk = (((xx // p) + (yy // p)) % 2) * 2 - 1
        bg += rng.uniform(5, 15) * chk[..., None]
    elif kind == 3:  # speckle
        bg += rng.uniform(5, 15) * np.sign(rng.uniform(-1, 1, (h, w, 1))) * (rng.uniform(0, 1, (h, w, 1)) < 0.2)
    # a few thin random lines (clutter that is not an instance)
    for _ in range(int(rng.integers(0, 3))):
        a = rng.uniform(0, np.pi)
        off = rng.uniform(-0.5, 0.5) * max(h, w)
        d = np.abs((xx - w / 2) * np.sin(a) - (yy - h / 2) * np.cos(a) - off)
        line = d < rng.uniform(0.6, 1.5)
        bg[line] = bg[line] * 0.5 + rng.uniform(0, 255, 3) * 0.5
    return bg


def _shape_mask(kind: str, h: int, w: int, cx: float, cy: float, r: float,
                rng: np.random.Generator) -> np.ndarray:
    """(h, w) bool full mask of one shape, tested at pixel centres."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = xx + 0.5 - cx, yy + 0.5 - cy
    if kind == "disc":
        return x * x + y * y <= r * r
    if kind == "ring":
        inner = r * rng.uniform(0.45, 0.65)
        d2 = x * x + y * y
        return (d2 <= r * r) & (d2 >= inner * inner)
    if kind == "square":
        s = r * 0.85
        a = rng.uniform(0, np.pi / 2)
        u = x * np.cos(a) + y * np.sin(a)
        v = -x * np.sin(a) + y * np.cos(a)
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if kind == "triangle":
        a0 = rng.uniform(0, 2 * np.pi)
        rr = r * 1.15
        pts = []
        for k in range(3):
            a = a0 + 2 * np.pi * k / 3 + rng.uniform(-0.15, 0.15)
            rk = rr * rng.uniform(0.9, 1.1)
            pts.append((rk * np.cos(a), rk * np.sin(a)))
        m = np.ones((h, w), bool)
        for k in range(3):  # inside = same side of every edge as the centroid (0, 0), CCW order
            (x0, y0), (x1, y1) = pts[k], pts[(k + 1) % 3]
            m &= (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0
        return m
    raise ValueError(kind)


def _class_color(rng: np.random.Generator, label: int) -> np.ndarray:
    """A random colour in the class's hue band (any saturation/brightness within limits)."""
    h = (HUE_CENTRES[label] + rng.uniform(-HUE_HALF_WIDTH, HUE_HALF_WIDTH)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0))
    return np.array([r, g, b]) * 255.0


def _shape_color(rng: np.random.Generator, label: int, background: np.ndarray,
                 others: Sequence[np.ndarray]) -> np.ndarray:
    """A colour of the class's band that stands out from the background (RGB distance >= 90) and from
    the shapes drawn before (>= 60), or the best of 60 tries."""
    best, best_d = None, -1.0
    for _ in range(60):
        c = _class_color(rng, label)
        d = min([float(np.linalg.norm(c - background)) / 90.0]
                + [float(np.linalg.norm(c - o)) / 60.0 for o in others])
        if d >= 1.0:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _draw_place(rng: np.random.Generator, centres: list, scale: float, h: int, w: int):
    """One try at placing a shape: radius r from 9-24% of scale, centre anywhere or touching an
    earlier shape (centres: (cx, cy, r) placed so far). (r, cx, cy), or None when the centre falls
    too close to the border. Draws from rng in a fixed order: the generated sets depend on it."""
    r = float(rng.uniform(0.09, 0.24) * scale)
    if centres and rng.uniform() < 0.35:  # touch / overlap an earlier shape
        ocx, ocy, orr = centres[int(rng.integers(0, len(centres)))]
        a = rng.uniform(0, 2 * np.pi)
        dist = orr + r * rng.uniform(0.5, 1.1)
        cx, cy = ocx + dist * np.cos(a), ocy + dist * np.sin(a)
    else:
        cx, cy = rng.uniform(0.6 * r, w - 0.6 * r), rng.uniform(0.6 * r, h - 0.6 * r)
    if not (0.5 * r <= cx <= w - 0.5 * r and 0.5 * r <= cy <= h - 0.5 * r):
        return None
    return r, cx, cy


def make_sample(rng: np.random.Generator, size: Optional[tuple[int, int]] = None,
                max_instances: int = 5) -> Sample:
    """One random image with 1..max_instances visible shape instances.

    size: (height, width); random in 96..256 per side when None.
    """
    while True:
        if size is None:
            h, w = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
        else:
            h, w = size
        img = _background(rng, h, w)
        bg_mean = img.reshape(-1, 3).mean(0)
        n_want = int(rng.integers(1, max_instances + 1))
        m = min(h, w)
        full: list[np.ndarray] = []
        visible: list[np.ndarray] = []
        labels: list[int] = []
        colors: list[np.ndarray] = []
        centres: list[tuple[float, float, float]] = []
        for _ in range(n_want):
            label = int(rng.integers(0, len(SHAPES)))
            for _try in range(30):
                placed = _draw_place(rng, centres, m, h, w)
                if placed is None:
                    continue
                r, cx, cy = placed
                mk = _shape_mask(SHAPES[label], h, w, cx, cy, r, rng)
                if mk.sum() < MIN_VISIBLE_PX * 2:
                    continue
                if all((v & ~mk).sum() >= MIN_VISIBLE_FRACTION * f.sum() for v, f in zip(visible, full)):
                    break
            else:
                continue
            visible = [v & ~mk for v in visible]
            full.append(mk)
            visible.append(mk.copy())
            labels.append(label)
            centres.append((cx, cy, r))
            col = _shape_color(rng, label, bg_mean, colors)
            colors.append(col)
            # flat colour with a gentle shading gradient and its own noise
            shade = _smooth_noise(rng, h, w, 3)[..., None] * rng.uniform(5, 20)
            img[mk] = (col[None, :] + shade[mk])
        keep = [i for i, v in enumerate(visible) if v.sum() >= MIN_VISIBLE_PX]
        if not keep:
            continue
        img += rng.normal(0, rng.uniform(2, 10), img.shape)
        image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        masks = np.stack([visible[i] for i in keep]) if keep else np.zeros((0, h, w), bool)
        return Sample(image, [labels[i] for i in keep], masks)


# --------------------------------------------------------------------------------------------
# COCO-format validation sets


def coco_categories() -> list[dict]:
    return [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in zip(COCO_IDS, COCO_NAMES)]


def coco_annotations_for(masks: np.ndarray, labels: Sequence[int], image_id: int, first_ann_id: int) -> list[dict]:
    """COCO annotations (RLE segmentation, area, bbox, iscrowd 0, COCO category ids)."""
    from pycocotools import mask as mask_utils
    anns = []
    for k, (mk, lab) in enumerate(zip(masks, labels)):
        rle = mask_utils.encode(np.asfortranarray(mk.astype(np.uint8)))
        area = float(mask_utils.area(rle))
        if area <= 0:
            continue
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": first_ann_id + len(anns), "image_id": image_id, "category_id": COCO_IDS[lab],
                     "segmentation": {"size": [int(rle["size"][0]), int(rle["size"][1])],
                                      "counts": rle["counts"]},
                     "area": area, "bbox": bbox, "iscrowd": 0})
    return anns


def save_image(path: str, image: np.ndarray, quality: int = 95) -> None:
    ext = os.path.splitext(path)[1].lower()
    img = Image.fromarray(image)
    if ext in (".jpg", ".jpeg"):
        img.save(path, quality=quality)
    else:
        img.save(path)


def write_val_set(folder: str, n: int = 32, seed: int = 12345, ext: str = ".jpg",
                  quality: int = 95) -> str:
    """Write n images into folder plus folder/annotations.json (COCO); return the annotation path.

    Images are named img_000.jpg, ...; file_name in the annotations is relative to folder.
    The ground truth is computed on the generated pixel arrays (not re-read from the JPEGs).
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n):
        s = make_sample(rng)
        name = f"img_{i:03d}{ext}"
        save_image(os.path.join(folder, name), s.image, quality)
        h, w = s.image.shape[:2]
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        anns += coco_annotations_for(s.masks, s.labels, image_id, len(anns) + 1)
    path = os.path.join(folder, "annotations.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": anns, "categories": coco_categories()}, f)
    return path


@dataclass
class CanvasShape:
    """One shape of a canvas: model label index and its visible mask as a window, rows y0:y0+h,
    cols x0:x0+w of the canvas (mask: (h, w) bool; zero outside it)."""

    label: int
    y0: int
    x0: int
    mask: np.ndarray

    def full(self, height: int, width: int) -> np.ndarray:
        """(height, width) bool: the mask on the whole canvas."""
        out = np.zeros((height, width), bool)
        h, w = self.mask.shape
        out[self.y0:self.y0 + h, self.x0:self.x0 + w] = self.mask
        return out


def _overlap(a: "CanvasShape", b: "CanvasShape") -> tuple[slice, slice, slice, slice]:
    """Slices (rows, cols of a's window; rows, cols of b's) of the two windows' intersection (may be empty)."""
    r0, c0 = max(a.y0, b.y0), max(a.x0, b.x0)
    r1 = min(a.y0 + a.mask.shape[0], b.y0 + b.mask.shape[0])
    c1 = min(a.x0 + a.mask.shape[1], b.x0 + b.mask.shape[1])
    r1, c1 = max(r0, r1), max(c0, c1)
    return (slice(r0 - a.y0, r1 - a.y0), slice(c0 - a.x0, c1 - a.x0),
            slice(r0 - b.y0, r1 - b.y0), slice(c0 - b.x0, c1 - b.x0))


def make_canvas_shapes(rng: np.random.Generator, height: int, width: int, n_instances: int,
                       scale: int = MAX_SIDE) -> tuple[np.ndarray, list[CanvasShape]]:
    """make_canvas's image ((H, W, 3) uint8) and its visible shapes as windows: the same random
    stream and pixels, at the cost of the shapes' windows instead of the canvas's size per shape
    (a 3000x3000 canvas of 160 shapes would otherwise hold 2.9 GB of full-size masks)."""
    img = _background(rng, height, width)
    full: list[CanvasShape] = []
    visible: list[CanvasShape] = []
    areas: list[int] = []          # full areas, as placed
    colors: list[np.ndarray] = []
    centres: list[tuple[float, float, float]] = []
    for _ in range(n_instances):
        label = int(rng.integers(0, len(SHAPES)))
        for _try in range(30):
            placed = _draw_place(rng, centres, scale, height, width)
            if placed is None:
                continue
            r, cx, cy = placed
            # the shape on a window around it (a triangle reaches 1.27 r from its centre)
            x0, y0 = max(0, int(cx - 1.4 * r)), max(0, int(cy - 1.4 * r))
            x1, y1 = min(width, int(cx + 1.4 * r) + 2), min(height, int(cy + 1.4 * r) + 2)
            mk = CanvasShape(label, y0, x0, _shape_mask(SHAPES[label], y1 - y0, x1 - x0, cx - x0, cy - y0, r, rng))
            if mk.mask.sum() < MIN_VISIBLE_PX * 2:
                continue
            ok = True
            for v, a in zip(visible, areas):
                vr, vc, mr, mc = _overlap(v, mk)
                hidden = int((v.mask[vr, vc] & mk.mask[mr, mc]).sum())
                if int(v.mask.sum()) - hidden < MIN_VISIBLE_FRACTION * a:
                    ok = False
                    break
            if ok:
                break
        else:
            continue
        for v in visible:
            vr, vc, mr, mc = _overlap(v, mk)
            v.mask[vr, vc] &= ~mk.mask[mr, mc]
        full.append(mk)
        areas.append(int(mk.mask.sum()))
        visible.append(CanvasShape(label, y0, x0, mk.mask.copy()))
        centres.append((cx, cy, r))
        col = _shape_color(rng, label, img[y0:y1, x0:x1].reshape(-1, 3).mean(0), colors[-8:])
        colors.append(col)
        shade = _smooth_noise(rng, y1 - y0, x1 - x0, 3)[..., None] * rng.uniform(5, 20)
        win = mk.mask
        img[y0:y1, x0:x1][win] = col[None, :] + shade[win]
    kept = [v for v in visible if v.mask.sum() >= MIN_VISIBLE_PX]
    img += rng.normal(0, rng.uniform(2, 10), img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return image, kept


def make_canvas(rng: np.random.Generator, height: int, width: int, n_instances: int,
                scale: int = MAX_SIDE) -> Sample:
    """A large image with n_instances shapes (fewer when placement fails) of the sizes make_sample
    draws in a scale x scale image, on one continuous background: what a large photo of small
    objects is to the fixture model (tests/test_tiling.py). Placement, occlusion and colour
    follow make_sample (its random stream is left alone: the validation sets stay as they are);
    colours stand out from the background around each shape, which varies over a large canvas.
    Built by make_canvas_shapes (windows), here with full-size masks."""
    image, kept = make_canvas_shapes(rng, height, width, n_instances, scale)
    masks = np.stack([v.full(height, width) for v in kept]) if kept else np.zeros((0, height, width), bool)
    return Sample(image, [v.label for v in kept], masks)


def write_canvas_set(folder: str, n: int, seed: int, height: int, width: int, n_instances: int,
                     scale: int = MAX_SIDE, ext: str = ".png") -> str:
    """Like write_val_set, with n canvases of make_canvas (lossless PNG by default)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n):
        image, kept = make_canvas_shapes(rng, height, width, n_instances, scale)
        name = f"canvas_{i:03d}{ext}"
        save_image(os.path.join(folder, name), image)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for v in kept:  # one full-size mask at a time
            anns += coco_annotations_for(v.full(height, width)[None], [v.label], i + 1, len(anns) + 1)
    path = os.path.join(folder, "annotations.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": anns, "categories": coco_categories()}, f)
    return path


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Write a synthetic shapes validation set (images + COCO json).")
    ap.add_argument("folder")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--ext", default=".jpg")
    a = ap.parse_args()
    print(write_val_set(a.folder, a.n, a.seed, a.ext))
