"""The legend of a semantic overlay: one row per class shown (a swatch in the class colour, the
name), largest area first, in a white box near the top-left corner, sized like the tags. Rows that do not
fit the image height are summed up in a last "+N more" row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ROWS = 20


@dataclass(frozen=True)
class LegendRow:
    """name: class name; color: (r, g, b) of its swatch; area: its pixels in the map."""

    name: str
    color: tuple[int, int, int]
    area: int


def legend_rows(result, categories) -> list[LegendRow]:
    """The classes the semantic map shows, largest area first."""
    rows = [LegendRow(s.label, tuple(categories.by_id(s.category_id).color), s.area)
            for s in result.segments if s.area > 0]
    return sorted(rows, key=lambda r: (-r.area, r.name))


def draw_legend(draw, size: tuple[int, int], rows: list[LegendRow], fonts) -> tuple[int, int, int, int]:
    """Draw rows on an ImageDraw of an image of size (w, h); fonts: overlay._TagFont. Returns the
    box drawn (x0, y0, x1, y1), half-open; (0, 0, 0, 0) when nothing was drawn."""
    w, h = size
    if not rows:
        return (0, 0, 0, 0)
    fs = max(10, round(min(h, w) / 40))  # the tags' size
    font = fonts.font(fs)
    pad = fonts.pad(fs)
    line = fonts.measure("Ag", fs)[1]
    fit = max(1, min(MAX_ROWS, (h - 4 * pad) // line))
    shown = rows if len(rows) <= fit else rows[:fit - 1]
    texts = [r.name for r in shown] + ([f"+{len(rows) - len(shown)} more"] if len(shown) < len(rows) else [])
    swatch = line - 2 * pad
    x0 = y0 = pad  # a margin off the image's edges
    width = min(w - x0, 3 * pad + swatch + max(fonts.measure(t, fs)[0] for t in texts))
    box = (x0, y0, x0 + width, min(h, y0 + len(texts) * line + pad))
    draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 255, 255))
    for k, text in enumerate(texts):
        y = y0 + pad + k * line
        if k < len(shown):
            draw.rectangle([x0 + pad, y + pad, x0 + pad + swatch - 1, y + pad + swatch - 1],
                           fill=shown[k].color, outline=(0, 0, 0))
        left, top, _, _ = draw.textbbox((0, 0), text, font=font)
        draw.text((x0 + 3 * pad + swatch - left, y + pad - top), text, fill=(0, 0, 0), font=font)
    return box


def legend_colors(rgb: np.ndarray, box: tuple[int, int, int, int]) -> set[tuple[int, int, int]]:
    """The distinct colours inside box of an (H, W, 3) uint8 image (what a test looks for)."""
    x0, y0, x1, y1 = box
    crop = rgb[y0:y1, x0:x1].reshape(-1, 3)
    return {tuple(int(v) for v in c) for c in np.unique(crop, axis=0)}
