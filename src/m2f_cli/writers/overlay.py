"""``--format overlay``: the image with each kept instance filled translucently in its class colour,
its contour drawn, and a "label score" tag, sized for the image."""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..decode import decode
from ..records import ImageRef, ImageResult
from .base import Writer, register


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


def render_overlay(rgb: np.ndarray, result: ImageResult, categories, alpha: float = 0.5) -> Image.Image:
    """rgb: (H, W, 3) uint8 upright image; returns the RGB overlay at the same size."""
    h, w = rgb.shape[:2]
    imap = result.label_map
    shown = result.regions()  # (value, category id, label, score, bbox)
    palette = np.zeros((max(int(imap.max(initial=0)), max((r[0] for r in shown), default=0)) + 1, 3), np.float32)
    for value, cid, _, _, _ in shown:
        palette[value] = categories.by_id(cid).color
    out = rgb.astype(np.float32)
    fg = imap > 0
    out[fg] = out[fg] * (1 - alpha) + palette[imap[fg]] * alpha  # semantic id 0 stays unpainted
    thick = max(1, round(min(h, w) / 320))
    edge = _boundary(imap)
    owner = imap
    if thick > 1:
        from scipy.ndimage import maximum_filter  # here: importing scipy.ndimage takes ~0.4 s
        size = 2 * (thick // 2) + 1
        edge = maximum_filter(edge, size=size)
        owner = maximum_filter(imap, size=size)
    out[edge] = palette[owner[edge]]
    img = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    font = _font(max(10, round(min(h, w) / 40)))
    pad = max(1, round(min(h, w) / 300))
    for value, _, label, score, bbox in sorted(shown, key=lambda r: -1.0 if r[3] is None else r[3]):
        color = tuple(int(c) for c in palette[value])
        text = label if score is None else f"{label} {score:.2f}"
        x, y = bbox[0], bbox[1]
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l + 2 * pad, b - t + 2 * pad
        x = min(max(0, x), max(0, w - tw))
        y = y - th if y - th >= 0 else min(y, max(0, h - th))
        draw.rectangle([x, y, x + tw, y + th], fill=color)
        lum = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.text((x + pad - l, y + pad - t), text, fill=(0, 0, 0) if lum > 140 else (255, 255, 255), font=font)
    return img


@register
class OverlayWriter(Writer):
    name = "overlay"
    recorded = ("overlay_alpha",)
    help = "<out>/<name>.overlay.jpg (or .png): the image with masks, contours and labels drawn"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.fmt = str(ctx.options.get("overlay_format", "jpg")).lower()
        if self.fmt not in ("jpg", "png"):
            raise ValueError(f"--overlay-format {self.fmt!r}: expected jpg or png")
        self.alpha = float(ctx.options.get("overlay_alpha", 0.5))
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--overlay-alpha {self.alpha}: expected a value in [0, 1]")

    def _path(self, ref: ImageRef) -> str:
        return self.ctx.folder.path(ref.rel, f".overlay.{self.fmt}")

    def done(self, ref: ImageRef) -> bool:
        return self.ctx.folder.complete(self._path(ref))  # whole files only (state.looks_whole)

    def write(self, result: ImageResult) -> None:
        rgb: Optional[np.ndarray] = result.image
        if rgb is None:
            rgb = decode(result.ref.path, max_pixels=None).rgb
        img = render_overlay(rgb, result, self.ctx.categories, self.alpha)
        buf = io.BytesIO()
        if self.fmt == "jpg":
            img.save(buf, format="JPEG", quality=90)
        else:
            img.save(buf, format="PNG", compress_level=1)
        self.ctx.folder.write_bytes(self._path(result.ref), buf.getvalue())
