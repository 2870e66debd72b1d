"""``-f overlay`` on a video: the annotated video ``<out>/<video rel>.overlay.mp4`` beside its
frames' overlays (``<out>/<video rel>/000123.overlay.jpg``), unless ``--no-overlay-video``.

Built when the reading of a video ends (video_resume.FrameLog, in the writer thread), from the
frame overlays on disk, in frame order, each frame shown at its own timestamp (variable frame
rates kept, to 1/90000 s): the same drawing as image overlays (overlay.render_overlay), encoded as
H.264 (libx264 through PyAV, yuv420p, odd sizes padded by a pixel) and written atomically like every
output. Built from the files rather than on the fly so that a video finished by a resumed run
gets the frames of every run; a run killed while it builds leaves no partial file, and the next
run builds it again. With --every/--fps the video holds the selected frames at their own times.
"""

from __future__ import annotations

import io
import logging
from fractions import Fraction
from typing import Optional

import numpy as np
from PIL import Image

from m2f_cli.inputs.video import frame_ref
from m2f_cli.records import ImageRef

log = logging.getLogger(__name__)

TIME_BASE = Fraction(1, 90000)
SUFFIX = ".overlay.mp4"
# rc-lookahead 0: with x264's lookahead (mb-tree) this build gave different bytes for the same frames
# now and then (8 of 20 encodes); without it a resumed run's video is byte for byte an uninterrupted one's
X264_OPTIONS = {"crf": "20", "preset": "veryfast", "rc-lookahead": "0"}


class OverlayVideo:
    """The annotated videos of a run whose overlay writer draws frames in format fmt (jpg or png)."""

    def __init__(self, folder, fmt: str):
        self.folder, self.fmt = folder, fmt

    @classmethod
    def for_run(cls, folder, writers: list, enabled: bool) -> Optional["OverlayVideo"]:
        """The run's OverlayVideo: with -f overlay, unless --no-overlay-video; else None."""
        w = next((w for w in writers if w.name == "overlay"), None)
        return cls(folder, w.fmt) if w is not None and enabled else None

    def path(self, video: ImageRef) -> str:
        return self.folder.path(video.rel, SUFFIX)

    def done(self, video: ImageRef) -> bool:
        return self.folder.complete(self.path(video))

    def build(self, video: ImageRef, frames: dict) -> None:
        """frames: frame index -> (pts, time in seconds or None), as the frames journal has them."""
        shown = [(k, t, p) for k, (_, t) in sorted(frames.items())
                 for p in [self.folder.path(frame_ref(video, k).rel, f".overlay.{self.fmt}")]
                 if self.folder.complete(p)]
        if not shown:
            return
        self.folder.write_atomic(self.path(video), lambda f: self._encode(f, shown))

    def _encode(self, f, shown: list) -> None:
        import av
        with av.open(f, "w", format="mp4") as out:
            stream, size, last = None, None, -1
            for k, t, p in shown:
                with Image.open(io.BytesIO(self.folder.read_bytes(p))) as im:
                    img = im.convert("RGB")
                if stream is None:
                    size = img.size
                    stream = out.add_stream("libx264", rate=25, options=dict(X264_OPTIONS))
                    stream.width, stream.height = size[0] + size[0] % 2, size[1] + size[1] % 2
                    stream.pix_fmt = "yuv420p"
                    stream.time_base = stream.codec_context.time_base = TIME_BASE
                elif img.size != size:  # the stream changed resolution mid-way
                    img = img.resize(size, Image.BILINEAR)
                frame = av.VideoFrame.from_ndarray(_padded(np.asarray(img), stream.height, stream.width),
                                                   format="rgb24")
                pts = round((t if t is not None else k / 25) / TIME_BASE)
                frame.pts, frame.time_base = max(pts, last + 1), TIME_BASE
                last = frame.pts
                for pkt in stream.encode(frame):
                    out.mux(pkt)
            for pkt in stream.encode():
                out.mux(pkt)


def _padded(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    """(h0, w0, 3) uint8 -> (h, w, 3), repeating the last row/column (H.264's 4:2:0 needs even sizes)."""
    if rgb.shape[:2] == (h, w):
        return np.ascontiguousarray(rgb)
    return np.pad(rgb, ((0, h - rgb.shape[0]), (0, w - rgb.shape[1]), (0, 0)), mode="edge")
