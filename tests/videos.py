"""Test videos, made here with PyAV (never downloaded): planted frames (a red ellipse, a blue
rectangle that moves two pixels a frame, and a grey block whose level says the frame's index),
written with any codec, timestamps, display rotation, or cut short."""

from __future__ import annotations

from fractions import Fraction
from typing import Optional, Sequence

import av
import numpy as np

MARK = 8  # the index block: MARK x MARK pixels at the top-left corner


def planted_frame(k: int, w: int = 160, h: int = 120):
    """Frame k: (H, W, 3) uint8 and its {"red", "blue"} masks. The blue rectangle moves 2 px a
    frame; the top-left block's grey level is 16 + 10 (k mod 18) (frame_index reads it back)."""
    rng = np.random.default_rng(k)
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[...] = (90, 140, 90)
    rgb = np.clip(rgb.astype(int) + rng.integers(-20, 20, (h, w, 1)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    red = ((xx - 0.28 * w) / (0.18 * w)) ** 2 + ((yy - 0.45 * h) / (0.3 * h)) ** 2 <= 1
    x0 = int(0.52 * w) + 2 * (k % 10)
    blue = (xx >= x0) & (xx < x0 + int(0.3 * w)) & (yy >= int(0.4 * h)) & (yy < int(0.85 * h))
    rgb[red] = (230, 20, 20)
    rgb[blue] = (20, 20, 230)
    rgb[:MARK, :MARK] = 16 + 10 * (k % 18)
    return rgb, {"red": red, "blue": blue}


def frame_index(rgb: np.ndarray) -> int:
    """The index (mod 18) a planted frame's top-left block says."""
    return int(round((float(rgb[1:MARK - 1, 1:MARK - 1].mean()) - 16) / 10)) % 18


def write_video(path, n: int = 20, codec: str = "libx264", rate: int = 10, size=(160, 120),
                pts_ms: Optional[Sequence[int]] = None, rotation: Optional[int] = None,
                options: Optional[dict] = None, container_options: Optional[dict] = None,
                frames: Optional[list] = None) -> str:
    """Write planted frames (or frames: RGB arrays). pts_ms: each frame's time in ms (variable
    frame rate); rotation: the display matrix's counter-clockwise degrees."""
    w, h = size
    with av.open(str(path), "w", options=container_options or {}) as c:
        s = c.add_stream(codec, rate=rate, options=options or {})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if pts_ms is not None:
            s.time_base = s.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            s.set_display_rotation(rotation)
        count = len(frames) if frames is not None else (len(pts_ms) if pts_ms is not None else n)
        for k in range(count):
            rgb = frames[k] if frames is not None else planted_frame(k, w, h)[0]
            f = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if pts_ms is not None:
                f.pts, f.time_base = pts_ms[k], Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def write_audio_only(path) -> str:
    """An .mp4 (or any container) with one AAC audio stream and no video."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=8000)
        for i in range(5):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 8000, i * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def truncate(src, dst, fraction: float = 0.6) -> str:
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[:int(len(data) * fraction)])
    return str(dst)
