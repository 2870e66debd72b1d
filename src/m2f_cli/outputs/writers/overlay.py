"""``--format overlay``: the image with each instance of the map filled translucently in its class
colour, the contours of all its visible parts drawn, and a "label score" tag, sized for the image.

Tags (place_tags): one per region that owns at least one pixel of the map (an instance hidden
entirely under higher-scoring ones gets none), centred on the most interior pixel of its largest
visible part; on collision with a tag already placed (higher scores first) a tag moves to the nearest
free spot, then shrinks, then searches the whole image; a tag that still does not fit is left out
rather than drawn over another. Tags never overlap each other and always lie inside the image; one
moved off its part gets a leader line to it. Semantic overlays also get a legend (legend.py).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from m2f_cli.tracking.colors import track_color
from m2f_cli.inputs.decode import decode
from m2f_cli.records import ImageRef, ImageResult
from m2f_cli.outputs.writers.base import Writer, register
from m2f_cli.outputs.writers.legend import draw_legend, legend_rows

MIN_FONT_PX = 8           # shrinking stops here
SHRINK = 0.8              # font scale per shrink step
SHRINK_STEPS = 3          # base, 0.8x, 0.64x, 0.51x before the whole-image search
NEAR_RINGS = 3            # first search: rings of candidates up to this many tag heights away
ANCHOR_MAX_PIXELS = 250_000  # parts larger than this are subsampled to find their interior point


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _boundary(instance_map: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of an instance with a 4-neighbour that belongs to something else."""
    m = instance_map
    b = np.zeros(m.shape, bool)
    b[1:, :] |= m[1:, :] != m[:-1, :]
    b[:-1, :] |= m[:-1, :] != m[1:, :]
    b[:, 1:] |= m[:, 1:] != m[:, :-1]
    b[:, :-1] |= m[:, :-1] != m[:, 1:]
    return b & (m > 0)


@dataclass(frozen=True)
class Tag:
    """One tag to draw. box: (x0, y0, x1, y1) in pixels, half-open ([x0, x1) x [y0, y1)), inside the
    image; anchor: (x, y) of the pixel of the region it names; size: font size in pixels."""

    value: int
    text: str
    box: tuple[int, int, int, int]
    anchor: tuple[int, int]
    size: int


def anchor_point(label_map: np.ndarray, value: int, bbox) -> Optional[tuple[int, int]]:
    """(x, y) of the most interior pixel (largest distance to the outside) of the largest 8-connected
    part of the pixels equal to value, searched within bbox [x, y, w, h]; None when there are none."""
    from scipy import ndimage  # here: importing scipy.ndimage takes ~0.4 s

    x0, y0, w, h = (int(v) for v in bbox)
    crop = label_map[y0:y0 + h, x0:x0 + w] == value
    if not crop.any():
        return None
    step = max(1, int(np.ceil(np.sqrt(crop.sum() / ANCHOR_MAX_PIXELS))))
    small = crop[::step, ::step] if step > 1 else crop
    if not small.any():
        small, step = crop, 1
    labels, n = ndimage.label(small, structure=np.ones((3, 3), bool))
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        small = labels == int(np.argmax(sizes))
    dist = ndimage.distance_transform_edt(np.pad(small, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return x0 + int(c) * step, y0 + int(r) * step


def _candidates(ax: int, ay: int, tw: int, th: int, w: int, h: int, rings: int) -> np.ndarray:
    """(C, 2) top-left corners of a tw x th box, centred on (ax, ay) first, then on rings of points
    spaced one tag height apart around it, nearest first, clamped into the image."""
    step = max(th, 1)
    r = np.arange(-rings, rings + 1)
    dx, dy = np.meshgrid(r * step, r * step)
    dx, dy = dx.ravel(), dy.ravel()
    order = np.argsort(np.hypot(dx, dy), kind="stable")
    xs = np.clip(ax - tw // 2 + dx[order], 0, w - tw)
    ys = np.clip(ay - th // 2 + dy[order], 0, h - th)
    return np.stack([xs, ys], axis=1)


def _free(cands: np.ndarray, tw: int, th: int, placed: list) -> Optional[tuple[int, int]]:
    """The first candidate corner whose box overlaps no placed box, or None."""
    if not placed:
        return int(cands[0, 0]), int(cands[0, 1])
    b = np.asarray(placed)
    x0, y0 = cands[:, :1], cands[:, 1:]
    hit = (x0 < b[:, 2]) & (b[:, 0] < x0 + tw) & (y0 < b[:, 3]) & (b[:, 1] < y0 + th)
    ok = np.flatnonzero(~hit.any(axis=1))
    return (int(cands[ok[0], 0]), int(cands[ok[0], 1])) if ok.size else None


def place_tags(result: ImageResult, measure: Callable[[str, int], tuple[int, int]],
               show_scores: bool = True) -> list[Tag]:
    """The tags of an overlay, none overlapping another, all inside the image.

    measure(text, font_size) -> (width, height) of the tag box in pixels (text plus padding).
    Regions are placed in descending score (semantic regions, without scores, by visible area).
    """
    imap = result.label_map
    h, w = imap.shape
    regions = result.regions()
    tracks = track_ids(result)
    if not regions:
        return []
    counts = np.bincount(imap.ravel(), minlength=max(r[0] for r in regions) + 1)
    visible = [r for r in regions if r[0] < len(counts) and counts[r[0]] > 0]
    visible.sort(key=lambda r: (-(r[3] if r[3] is not None else -1.0), -int(counts[r[0]])))
    base = max(10, round(min(h, w) / 40))
    sizes = [base]
    while len(sizes) <= SHRINK_STEPS and round(sizes[-1] * SHRINK) >= MIN_FONT_PX:
        sizes.append(round(sizes[-1] * SHRINK))
    placed: list[tuple[int, int, int, int]] = []
    tags = []
    for value, _, label, score, bbox in visible:
        anchor = anchor_point(imap, value, bbox)
        if anchor is None:
            continue
        text = label if score is None or not show_scores else f"{label} {score:.2f}"
        if value in tracks:  # --track: the track id first
            text = f"#{tracks[value]} {text}"
        spot = None
        for k, size in enumerate(sizes + [sizes[-1]]):
            whole = k == len(sizes)  # last try: the smallest size anywhere in the image
            t = text
            tw, th = measure(t, size)
            while tw > w and len(t) > 1:  # wider than the image even at this size: shorten it
                t = t[:-2] + "\u2026" if len(t) > 2 else t[:1]
                tw, th = measure(t, size)
            if tw > w or th > h:
                continue
            rings = max(w, h) // max(th, 1) + 1 if whole else NEAR_RINGS
            spot = _free(_candidates(anchor[0], anchor[1], tw, th, w, h, rings), tw, th, placed)
            if spot is not None:
                break
        if spot is None:
            continue
        box = (spot[0], spot[1], spot[0] + tw, spot[1] + th)
        placed.append(box)
        tags.append(Tag(value, t, box, anchor, size))
    return tags


class _TagFont:
    """Fonts by size and the tag box of a text: (width, height) of the text plus padding."""

    def __init__(self):
        self.fonts: dict[int, object] = {}
        self.draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # textbbox needs a canvas, not its size

    def font(self, size: int):
        if size not in self.fonts:
            self.fonts[size] = _font(size)
        return self.fonts[size]

    @staticmethod
    def pad(size: int) -> int:
        return max(1, round(size / 8))

    def measure(self, text: str, size: int) -> tuple[int, int]:
        l, t, r, b = self.draw.textbbox((0, 0), text, font=self.font(size))
        return r - l + 2 * self.pad(size), b - t + 2 * self.pad(size)


def overlay_tags(result: ImageResult, show_scores: bool = True, fonts: Optional[_TagFont] = None) -> list[Tag]:
    """The tags render_overlay draws for this result (place_tags with the overlay's fonts)."""
    return place_tags(result, (fonts or _TagFont()).measure, show_scores)


def track_ids(result: ImageResult) -> dict[int, int]:
    """--track: map value -> track id of the instances that have one."""
    if result.task != "instance":
        return {}
    return {i.id: i.track_id for i in result.instances if i.track_id is not None}


def render_overlay(rgb: np.ndarray, result: ImageResult, categories, alpha: float = 0.5,
                   show_scores: bool = True) -> Image.Image:
    """rgb: (H, W, 3) uint8 upright image; returns the RGB overlay at the same size."""
    h, w = rgb.shape[:2]
    imap = result.label_map
    shown = result.regions()  # (value, category id, label, score, bbox)
    palette = np.zeros((max(int(imap.max(initial=0)), max((r[0] for r in shown), default=0)) + 1, 3), np.float32)
    tracks = track_ids(result)
    for value, cid, _, _, _ in shown:  # by class; by track with --track
        palette[value] = track_color(tracks[value]) if value in tracks else categories.by_id(cid).color
    out = rgb.astype(np.float32)
    fg = imap > 0
    out[fg] = out[fg] * (1 - alpha) + palette[imap[fg]] * alpha  # semantic id 0 stays unpainted
    thick = max(1, round(min(h, w) / 320))
    edge = _boundary(imap)  # the contours of every visible part, holes included
    owner = imap
    if thick > 1:
        from scipy.ndimage import maximum_filter  # here: importing scipy.ndimage takes ~0.4 s
        size = 2 * (thick // 2) + 1
        edge = maximum_filter(edge, size=size)
        owner = maximum_filter(imap, size=size)
    out[edge] = palette[owner[edge]]
    img = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    fonts = _TagFont()
    tags = overlay_tags(result, show_scores, fonts)
    for tag in tags:  # leader lines first, so that no line crosses a tag's text
        color = tuple(int(c) for c in palette[tag.value])
        x0, y0, x1, y1 = tag.box
        ax, ay = tag.anchor
        if not (x0 <= ax < x1 and y0 <= ay < y1):  # moved off its part: point back at it
            lx, ly = min(max(ax, x0), x1 - 1), min(max(ay, y0), y1 - 1)
            draw.line([(lx, ly), (ax, ay)], fill=color, width=thick)
            r = thick + 1
            draw.ellipse([ax - r, ay - r, ax + r, ay + r], fill=color)
    for tag in tags:
        color = tuple(int(c) for c in palette[tag.value])
        x0, y0, x1, y1 = tag.box
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color)
        lum = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        f = fonts.font(tag.size)
        l, t, _, _ = draw.textbbox((0, 0), tag.text, font=f)
        p = fonts.pad(tag.size)
        draw.text((x0 + p - l, y0 + p - t), tag.text, fill=(0, 0, 0) if lum > 140 else (255, 255, 255), font=f)
    if result.task == "semantic":  # the classes by colour, largest first (writers/legend.py)
        draw_legend(draw, (w, h), legend_rows(result, categories), fonts)
    return img


@register
class OverlayWriter(Writer):
    name = "overlay"
    recorded = ("overlay_alpha", "overlay_scores")

    def __init__(self, ctx):
        super().__init__(ctx)
        self.fmt = str(ctx.options.get("overlay_format", "jpg")).lower()
        if self.fmt not in ("jpg", "png"):
            raise ValueError(f"--overlay-format {self.fmt!r}: expected jpg or png")
        self.alpha = float(ctx.options.get("overlay_alpha", 0.5))
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--overlay-alpha {self.alpha}: expected a value in [0, 1]")
        self.show_scores = bool(ctx.options.get("overlay_scores", True))

    def _path(self, ref: ImageRef) -> str:
        return self.ctx.folder.path(ref.rel, f".overlay.{self.fmt}")

    def done(self, ref: ImageRef) -> bool:
        return self.ctx.folder.complete(self._path(ref))  # whole files only (local.looks_whole)

    def write(self, result: ImageResult) -> None:
        rgb: Optional[np.ndarray] = result.image
        if rgb is None:
            rgb = decode(result.ref.path, max_pixels=None).rgb
        img = render_overlay(rgb, result, self.ctx.categories, self.alpha, self.show_scores)
        buf = io.BytesIO()
        if self.fmt == "jpg":
            img.save(buf, format="JPEG", quality=90)
        else:
            img.save(buf, format="PNG", compress_level=1)
        self.ctx.folder.write_bytes(self._path(result.ref), buf.getvalue())
