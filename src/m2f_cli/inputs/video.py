"""Stage 2 for videos: PyAV (FFmpeg's libraries) reads a video frame by frame, picks the frames
asked for and gives each its identity. Every PyAV quirk of m2f is handled here.

Identity. Frame k is the k-th frame the decoder gives from the start of the stream (zero-based);
its time is its own timestamp in seconds from the stream's start, so variable frame rates keep
each frame's time. Frame k of a video named ``v/clip`` is ``v/clip/000123`` (6 digits or more).

Selection: frame_selection.FrameSelection (--every, --fps, --start, --end), decided here as frames
are decoded, each once the next frame's time is known.

Seeking. Decoding starts at an anchor (a frame whose index is known) instead of the stream's start
when there is one: a resumed run's frame from the frames journal (outputs/video_resume.py), or --start's
first frame, whose index is the number of packets before it (demuxed, not decoded; only when
every packet has a timestamp). The decoder seeks to the keyframe before the anchor, decodes up to
it (the frame before it is --fps's neighbour) and numbers frames from it. If the anchor is not
where it was (no frame before it, another timestamp), it decodes from the stream's start instead:
slower, never wrong. Apart from that, only the frames between the keyframe and the anchor are
decoded without being used.

Rotation. The display matrix (portrait phone videos) is applied to every frame: rotations by
multiples of 90 degrees and mirroring, as EXIF orientation is for photos.

Failures (FrameError, one line, ``.frame`` naming the frame): no video stream, an unreadable
container, a frame that does not decode (the frames before it are yielded first), and a stream
that ends well before the duration its header declares (a cut file that decodes without error).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from m2f_cli.errors import DecodeError
from m2f_cli.inputs.frame_selection import FrameSelection, parse_time
from m2f_cli.records import FrameInfo, ImageRef
from m2f_cli.urls import filesystem, is_url, local_path

log = logging.getLogger(__name__)

FRAME_DIGITS = 6
# A stream whose last frame ends this much before the duration its header declares is cut short.
TRUNCATED_SLACK_S = 0.25
TRUNCATED_SLACK_FRAMES = 3


class FrameError(DecodeError):
    """A video that cannot be read on from frame ``frame`` (None: it cannot be opened at all)."""

    def __init__(self, message: str, frame: Optional[int] = None):
        super().__init__(message)
        self.frame = frame


def frame_ref(video: ImageRef, index: int, time: Optional[float] = None, pts: Optional[int] = None) -> ImageRef:
    """The ImageRef of frame `index` of a video: name ``<video name>/<k>``, rel ``<video rel>/<k>``."""
    k = f"{index:0{FRAME_DIGITS}d}"
    return ImageRef(video.path, f"{video.name}/{k}", f"{video.rel}/{k}", video.index,
                    frame=FrameInfo(index, time, pts, video.rel))


@dataclass(frozen=True)
class Anchor:
    """A frame whose index is known, where decoding starts (module docstring). pts: its
    timestamp (None: decode from the stream's start, taking frames before index as known);
    skip: the anchor frame itself is done (a resumed run goes on after it)."""

    index: int
    pts: Optional[int]
    skip: bool = False


@dataclass(frozen=True)
class DecodedFrame:
    """One selected frame: index, pts (stream time base) and time (seconds) as in FrameInfo;
    rgb: (H, W, 3) uint8, upright (display matrix applied)."""

    index: int
    pts: Optional[int]
    time: Optional[float]
    rgb: np.ndarray


@dataclass
class ReadStats:
    """What a read_frames call did: frames decoded (context frames before an anchor included),
    frames yielded, and whether it reached the end of the stream or of --end."""

    decoded: int = 0
    selected: int = 0
    finished: bool = False


class _Moved(Exception):
    """The anchor is not where it was: decode from the stream's start instead."""


_PAST_END = Anchor(-1, None)  # --start is after the stream's last frame: nothing to decode


def _message(e: BaseException) -> str:
    """One line: FFmpeg's own text (strerror) where there is one."""
    text = getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return str(text)


@contextmanager
def open_video(path: str):
    """The PyAV container of a local path or an fsspec URL (read through a seekable file)."""
    import av
    handle = None
    try:
        if is_url(path):
            fs, p = filesystem(path)
            handle = fs.open(p, "rb")
            container = av.open(handle, "r")
        else:
            container = av.open(local_path(path), "r")
    except FileNotFoundError:
        raise FrameError("file not found") from None
    except Exception as e:  # FFmpeg's and the storage backend's errors: one line
        if handle is not None:
            handle.close()
        raise FrameError(f"cannot open video ({_message(e)})") from None
    try:
        yield container
    finally:
        container.close()
        if handle is not None:
            handle.close()


def _video_stream(container, max_pixels: Optional[int]):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise FrameError(f"no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    w, h = stream.codec_context.width, stream.codec_context.height
    if max_pixels is not None and w * h > max_pixels:
        raise FrameError(f"frames too large: {w}x{h} = {w * h} pixels > --max-pixels {max_pixels}")
    stream.thread_type = "AUTO"  # FFmpeg's own frame/slice threads
    return stream


def display_transform(frame) -> Optional[tuple[bool, bool, bool]]:
    """(transpose, flip rows, flip columns) that make a decoded frame upright from its display
    matrix (16.16 fixed point, row vectors: x' = a x + c y, y' = b x + d y); None: as decoded."""
    sd = frame.side_data.get("DISPLAYMATRIX") if frame.side_data is not None else None
    if sd is None:
        return None
    m = np.frombuffer(bytes(sd), dtype="=i4")
    a, b, c, d = (int(np.sign(round(v / 65536))) for v in (m[0], m[1], m[3], m[4]))
    if b == 0 and c == 0 and a and d:
        return (False, d < 0, a < 0) if (a < 0 or d < 0) else None
    if a == 0 and d == 0 and b and c:
        return True, b < 0, c < 0
    log.warning("a display matrix that is not a multiple of 90 degrees is not applied")
    return None


def upright(rgb: np.ndarray, transform: Optional[tuple[bool, bool, bool]]) -> np.ndarray:
    if transform is None:
        return rgb
    transpose, flip_rows, flip_cols = transform
    if transpose:
        rgb = rgb.transpose(1, 0, 2)
    if flip_rows:
        rgb = rgb[::-1]
    if flip_cols:
        rgb = rgb[:, ::-1]
    return np.ascontiguousarray(rgb)


def _start_anchor(path: str, selection: FrameSelection) -> Optional[Anchor]:
    """--start's first frame: its index is the number of packets with an earlier timestamp,
    counted by demuxing (no decoding) until no later packet can be earlier (its dts passed the
    best candidate). None when a packet has no timestamp: decode from the stream's start."""
    with open_video(path) as container:
        stream = _video_stream(container, None)
        origin, tb = stream.start_time or 0, stream.time_base
        before, best = 0, None
        for pkt in container.demux(stream):
            if pkt.size == 0:
                continue
            if pkt.pts is None:
                return None
            if float((pkt.pts - origin) * tb) < selection.start:
                before += 1
            elif best is None or pkt.pts < best:
                best = pkt.pts
            if best is not None and pkt.dts is not None and pkt.dts >= best:
                break
    return Anchor(before, best) if best is not None else _PAST_END


def _numbered(container, stream, anchor: Optional[Anchor]) -> Iterator[tuple[Optional[int], object]]:
    """(index, av frame) in decoded order from the anchor on; index None for the frames decoded
    before it after a seek. Raises _Moved when the anchor is not where it was."""
    if anchor is None or anchor.pts is None or anchor.index == 0:
        for k, f in enumerate(container.decode(stream)):
            yield k, f
        return
    container.seek(anchor.pts - 1, backward=True, stream=stream)  # the keyframe before: its predecessor too
    k, before = None, 0
    for f in container.decode(stream):
        if k is None:
            if f.pts is not None and f.pts < anchor.pts:
                before += 1
                yield None, f
                continue
            if f.pts != anchor.pts or before == 0:
                raise _Moved()
            k = anchor.index
        yield k, f
        k += 1


def read_frames(path: str, selection: FrameSelection = FrameSelection(), anchor: Optional[Anchor] = None,
                max_pixels: Optional[int] = None, stats: Optional[ReadStats] = None) -> Iterator[DecodedFrame]:
    """The selected frames of a video, in order, one at a time (memory: a frame or two).

    anchor: where to start (module docstring); None: the stream's start, or --start's first frame.
    Raises FrameError (with .frame) after yielding every frame before the one that failed.
    """
    stats = stats if stats is not None else ReadStats()
    try:
        yield from _read(path, selection, anchor, max_pixels, stats)
    except _Moved:
        log.warning("%s: frame %d is not where it was; decoding from the start of the video",
                    path, anchor.index if anchor else 0)
        stats.decoded = 0
        fallback = Anchor(anchor.index, None, anchor.skip) if anchor is not None else None
        yield from _read(path, selection, fallback, max_pixels, stats, count_start=False)


def _read(path, selection, anchor, max_pixels, stats, count_start: bool = True) -> Iterator[DecodedFrame]:
    if anchor is None and selection.start > 0 and count_start:
        anchor = _start_anchor(path, selection)
        if anchor is _PAST_END:
            stats.finished = True
            return
    with open_video(path) as container:
        stream = _video_stream(container, max_pixels)
        rate = float(stream.guessed_rate or stream.average_rate or 0) or None
        frames = _guarded(_numbered(container, stream, anchor), anchor)
        last = yield from _selected(frames, selection, anchor, _clock(stream, rate), stats)
        if last is not None:  # the stream's own end (not --end's): was it cut short?
            _check_whole(container, stream, last, rate)
        stats.finished = True


def _clock(stream, rate: Optional[float]):
    """time_of(frame, index): seconds from the stream's start, from the frame's timestamp (from its
    index and the frame rate when it has none)."""
    origin, tb = stream.start_time or 0, stream.time_base

    def time_of(f, k: Optional[int]) -> Optional[float]:
        if f.pts is not None:
            return float((f.pts - origin) * tb)
        return k / rate if k is not None and rate else None
    return time_of


def _guarded(frames, anchor: Optional[Anchor]):
    """_numbered's frames; FFmpeg's errors while demuxing or decoding become a FrameError naming
    the frame that could not be read."""
    next_k = anchor.index if anchor is not None and anchor.pts is not None else 0
    while True:
        try:
            k, f = next(frames)
        except StopIteration:
            return
        except _Moved:
            raise
        except Exception as e:
            raise FrameError(f"frame {next_k}: {_message(e)}", next_k) from None
        if k is not None:
            next_k = k + 1
        yield k, f


def _selected(frames, selection: FrameSelection, anchor: Optional[Anchor], time_of, stats: ReadStats):
    """The selected frames, each decided once the next frame's time is known (--fps needs both
    neighbours). Returns the last frame's (index, time) at the stream's end, None at --end."""
    pending, t_last, last, transform = None, None, None, []
    try:
        for k, f in frames:
            stats.decoded += 1
            t = time_of(f, k)
            if k is not None:
                if pending is not None:
                    out = _decide(pending, t, selection, anchor, transform, stats)
                    if out is not None:
                        yield out
                if selection.end is not None and t is not None and t >= selection.end:
                    return None
                pending, last = (k, f, t, t_last), (k, t)
            t_last = t
    except FrameError:
        if pending is not None:  # the frame before the one that failed is still written
            out = _decide(pending, None, selection, anchor, transform, stats)
            if out is not None:
                yield out
        raise
    if pending is not None:
        out = _decide(pending, None, selection, anchor, transform, stats)
        if out is not None:
            yield out
    return last


def _decide(pending, t_next, selection: FrameSelection, anchor: Optional[Anchor], transform: list,
            stats: ReadStats) -> Optional[DecodedFrame]:
    """The frame waiting in pending, now that the next frame's time is known, if it is selected."""
    k, f, t, t_prev = pending
    if anchor is not None and (k < anchor.index or (k == anchor.index and anchor.skip)):
        return None  # done by an earlier run, or before the anchor
    if not selection.keeps(k, t, t_prev, t_next):
        return None
    if not transform:
        transform.append(display_transform(f))
    rgb = upright(f.to_ndarray(format="rgb24"), transform[0])
    stats.selected += 1
    return DecodedFrame(k, f.pts, t, rgb)


def declared_seconds(container, stream) -> Optional[float]:
    """The video stream's duration as its header declares it: the stream's, Matroska's DURATION
    tag, or the container's when the video is its only stream; None when nothing says."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag:
        try:
            return parse_time(tag[:tag.index(".") + 7] if "." in tag else tag)
        except ValueError:
            pass
    if len(container.streams) == 1 and container.duration:
        return container.duration / 1e6
    return None


def _check_whole(container, stream, last: Optional[tuple[int, Optional[float]]], rate: Optional[float]) -> None:
    """A stream that ended without an error but well before its declared duration was cut short."""
    declared = declared_seconds(container, stream)
    if declared is None or last is None or last[1] is None:
        return
    step = 1 / rate if rate else 0.0
    if declared - (last[1] + step) > max(TRUNCATED_SLACK_S, TRUNCATED_SLACK_FRAMES * step):
        raise FrameError(f"frame {last[0] + 1}: the stream ends at {last[1] + step:.3f} s, before the "
                         f"{declared:.3f} s its header declares (truncated or corrupt)", last[0] + 1)


def estimate_frames(path: str, selection: FrameSelection) -> int:
    """About how many frames the selection keeps, from the header alone (progress); 0 if unknown."""
    if is_url(path):
        return 0
    try:
        with open_video(path) as container:
            stream = _video_stream(container, None)
            seconds = declared_seconds(container, stream)
            rate = float(stream.guessed_rate or stream.average_rate or 0)
            count = stream.frames or (round(seconds * rate) if seconds and rate else 0)
    except Exception:  # progress only: a video that cannot be read fails where it is decoded
        return 0
    if not seconds or not count:
        return count
    span = max(0.0, min(seconds, selection.end or seconds) - selection.start)
    if selection.fps is not None:
        return max(1, round(span * selection.fps))
    return max(1, round(count * span / seconds / selection.every))
