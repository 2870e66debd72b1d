"""A track's colour in overlays: far apart for consecutive ids, the same in every frame and run."""

from __future__ import annotations

import colorsys

GOLDEN = 0.6180339887498949  # hue step: consecutive ids land far apart on the colour wheel


def track_color(track_id: int) -> tuple[int, int, int]:
    """(r, g, b) 0..255 of track track_id (>= 1): hue by the golden ratio, saturated and bright."""
    h = (0.11 + track_id * GOLDEN) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.8, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)
