"""Draw docs/tile_merge.png: what the tile merge (src/m2f_cli/tiling/merge.py) does, on a planted case.

Four overlapping tiles see five objects; their parts (what each tile's model gives: masks crossing
its borders cut, duplicates from overlapping tiles and from two queries, one object under two
classes, a query holding its object and a sliver of a neighbour) go through the real merge, and the
figure shows the parts per tile (left) and the merged instances (right) with their scores.

    python scripts/tile_merge_figure.py [--out docs/tile_merge.png]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from m2f_cli.model.categories import CategoryTable
from m2f_cli.postprocess.instance import PostprocessOptions
from m2f_cli.tiling.merge import merge_parts
from m2f_cli.tiling.grid import Box
from m2f_cli.tiling.parts import Part
from m2f_cli.tiling.seams import instances_of

H, W = 300, 420
BOXES = [Box(0, 0, 170, 240), Box(0, 180, 170, 420), Box(130, 0, 300, 240), Box(130, 180, 300, 420)]
TILE_COLOURS = [(230, 80, 60), (60, 130, 230), (40, 170, 90), (200, 140, 20)]
COCO = CategoryTable.coco()
PERSON, DOG = 0, 16


def _disc(cy, cx, r):
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _rect(r0, c0, r1, c1):
    m = np.zeros((H, W), bool)
    m[r0:r1, c0:c1] = True
    return m


def _part(mask, tile, label=PERSON, cls=0.9, mprob=0.85):
    b = BOXES[tile]
    m = np.zeros_like(mask)
    m[b.r0:b.r1, b.c0:b.c1] = mask[b.r0:b.r1, b.c0:b.c1]
    return Part.of_mask(label, cls * mprob, tile, m, cls)


def planted_parts() -> tuple[list[Part], dict[str, np.ndarray]]:
    """The planted objects and what each tile sees of them (tile index in Part.tile)."""
    objs = {
        "whole twice": _disc(50, 205, 18),          # in the overlap of tiles 0 and 1: whole in both
        "cut by seams": _rect(115, 150, 215, 275),  # larger than the overlaps: cut in all four tiles
        "two classes": _disc(240, 70, 28),          # tile 2 sees it as a person and as a dog
        "X": _rect(30, 40, 100, 110),               # tile 0's query holds X and the sliver of Y it sees
        "Y": _disc(70, 262, 40),                    # whole in tile 1, cut by tile 0's right border
    }
    sliver = objs["Y"] & _rect(0, 0, 170, 240)
    parts = [_part(objs["whole twice"], 0, cls=0.92, mprob=0.88), _part(objs["whole twice"], 1, cls=0.85),
             _part(objs["whole twice"] & ~_rect(45, 190, 55, 225), 1, cls=0.8, mprob=0.8)]  # a second query
    probs = [(0.9, 0.8), (0.7, 0.9), (0.8, 0.7), (0.95, 0.85)]
    parts += [_part(objs["cut by seams"], t, cls=c, mprob=m) for t, (c, m) in enumerate(probs)]
    parts += [_part(objs["two classes"], 2, cls=0.9), _part(objs["two classes"], 2, DOG, cls=0.55)]
    parts += [_part(objs["X"] | sliver, 0, cls=0.93, mprob=0.9), _part(objs["Y"], 1, cls=0.9, mprob=0.8)]
    return parts, objs


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return mask & ~inner


def draw(out: str, scale: int = 2) -> None:
    parts, _ = planted_parts()
    insts, _ = instances_of(merge_parts(parts, BOXES, (H, W)), (H, W), COCO,
                            PostprocessOptions(threshold=0.3, map_threshold=0.3), len(BOXES))
    left = np.full((H, W, 3), 250, np.uint8)
    masks = []
    for p in parts:  # each part filled lightly in its tile's colour (overlaps show darker) ...
        m = np.zeros((H, W), bool)
        crop = mask_utils.decode(p.rle).astype(bool)
        m[p.r0:p.r0 + crop.shape[0], p.c0:p.c0 + crop.shape[1]] = crop
        left[m] = (0.75 * left[m] + 0.25 * np.array(TILE_COLOURS[p.tile])).astype(np.uint8)
        masks.append((m, TILE_COLOURS[p.tile]))
    for m, col in masks:  # ... then outlined, so that no part hides another's edge
        left[_outline(m)] = col
    right = np.full((H, W, 3), 250, np.uint8)
    palette = [(120, 90, 200), (230, 120, 40), (40, 150, 160), (200, 60, 120), (90, 160, 60)]
    for k, i in enumerate(insts):
        m = mask_utils.decode({"size": i.rle["size"], "counts": i.rle["counts"].encode()}).astype(bool)
        right[m] = palette[k % len(palette)]
    gap, top = 24, 34
    img = Image.new("RGB", ((2 * W + gap) * scale, (H + top) * scale), (255, 255, 255))
    img.paste(Image.fromarray(left).resize((W * scale, H * scale), Image.NEAREST), (0, top * scale))
    img.paste(Image.fromarray(right).resize((W * scale, H * scale), Image.NEAREST), ((W + gap) * scale, top * scale))
    d = ImageDraw.Draw(img)
    f, small = _font(13 * scale), _font(10 * scale)
    d.text((4 * scale, 8 * scale), f"{len(parts)} parts from 4 overlapping tiles", fill=(0, 0, 0), font=f)
    d.text(((W + gap + 4) * scale, 8 * scale), f"{len(insts)} merged instances", fill=(0, 0, 0), font=f)
    for t, b in enumerate(BOXES):  # the tiles
        d.rectangle((b.c0 * scale, (b.r0 + top) * scale, b.c1 * scale - 1, (b.r1 + top) * scale - 1),
                    outline=TILE_COLOURS[t], width=scale)
    for i in insts:
        x, y, w, h = i.bbox
        d.text(((W + gap + x) * scale, (top + y + h + 2) * scale), f"{i.label} {i.score:.2f}", fill=(0, 0, 0),
               font=small)
    notes = [((4, 102), "X + a sliver of Y: one query of tile 0"), ((150, 4), "whole in 2 tiles + a 2nd query"),
             ((283, 20), "Y: whole in tile 1"), ((152, 217), "cut by the seams of 4 tiles"),
             ((4, 270), "person 0.77 + dog 0.49: one query")]
    for (x, y), text in notes:
        d.text((x * scale, (top + y) * scale), text, fill=(40, 40, 40), font=small)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    img.save(out, optimize=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "docs", "tile_merge.png"))
    draw(ap.parse_args().out)
