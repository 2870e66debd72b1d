"""Which frames of a video are segmented: ``--every``, ``--fps``, ``--start``, ``--end``.

Each rule is a function of a frame's index and of its own and its neighbours' timestamps, never of
where decoding started, so a run that starts mid-video (a resumed run, a Ray chunk: video.py)
picks exactly the frames a run from the start picks. Times are seconds from the stream's start.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from m2f_cli.errors import UsageError

if TYPE_CHECKING:
    from m2f_cli.config import RunConfig

_CLOCK = re.compile(r"(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)")


def parse_time(value) -> float:
    """Seconds from 12.5, '12.5', 'mm:ss[.f]' or 'hh:mm:ss[.f]'. Raises ValueError."""
    if isinstance(value, (int, float)):
        t = float(value)
    else:
        text = str(value).strip()
        m = _CLOCK.fullmatch(text)
        if m:
            hours, minutes, seconds = m.groups()
            if float(seconds) >= 60 or (hours is not None and int(minutes) >= 60):
                raise ValueError(f"{text!r}: not a time (seconds or hh:mm:ss)")
            t = int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)
        else:
            try:
                t = float(text)
            except ValueError:
                raise ValueError(f"{text!r}: not a time (seconds or hh:mm:ss)") from None
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"{value!r}: expected a time >= 0")
    return t


@dataclass(frozen=True)
class FrameSelection:
    """Which frames of each video are segmented (module docstring). start, end: seconds from the
    stream's start (end exclusive, None = to the end); every: keep indices that are multiples;
    fps: keep the frame nearest to each 1/fps s step from start (excludes every > 1)."""

    every: int = 1
    fps: Optional[float] = None
    start: float = 0.0
    end: Optional[float] = None

    @classmethod
    def parse(cls, every: Optional[int] = None, fps: Optional[float] = None, start=None, end=None
              ) -> "FrameSelection":
        """From the CLI's values; ValueError naming the option for a bad one."""
        if every is not None and every < 1:
            raise ValueError(f"--every {every}: expected 1 or more")
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"--fps {fps}: expected a rate > 0 frames per second")
        if fps is not None and every not in (None, 1):
            raise ValueError("--every and --fps both pick frames: give one of them")
        try:
            s = parse_time(start) if start is not None else 0.0
        except ValueError as e:
            raise ValueError(f"--start {e}") from None
        try:
            e_ = parse_time(end) if end is not None else None
        except ValueError as e:
            raise ValueError(f"--end {e}") from None
        if e_ is not None and e_ <= s:
            raise ValueError(f"--end {end}: expected a time after --start ({s:g} s)")
        return cls(every or 1, fps, s, e_)

    def record(self) -> Optional[dict]:
        """What the settings record keeps (None for every frame of the whole video)."""
        if self == FrameSelection():
            return None
        return {"every": self.every, "fps": self.fps, "start": self.start, "end": self.end}

    def in_range(self, t: float) -> bool:
        return t >= self.start and (self.end is None or t < self.end)

    def keeps(self, index: int, t: Optional[float], t_prev: Optional[float], t_next: Optional[float]) -> bool:
        """Whether frame `index` at time t is selected; t_prev, t_next: the times of the frames
        decoded just before and after it (None at the stream's ends)."""
        if t is None:
            return self.start == 0 and self.end is None and self.fps is None and index % self.every == 0
        if not self.in_range(t):
            return False
        if self.fps is None:
            return index % self.every == 0
        return self._nearest(t, t_prev, t_next)

    def _nearest(self, t: float, t_prev: Optional[float], t_next: Optional[float]) -> bool:
        """Whether a step start + j/fps lies in the frame's share of the time line: from halfway
        to the frame before to halfway to the frame after (frames out of range do not compete;
        the last frame's share ends half its predecessor's interval after it)."""
        lo = self.start if t_prev is None or t_prev < self.start else (t_prev + t) / 2
        if t_next is not None and self.end is not None and t_next >= self.end:
            hi = self.end
        elif t_next is not None:
            hi = (t + t_next) / 2
        else:
            hi = t + (t - t_prev) / 2 if t_prev is not None else math.inf
        if self.end is not None:
            hi = min(hi, self.end)
        j = math.ceil((lo - self.start) * self.fps - 1e-6)
        return j < (hi - self.start) * self.fps - 1e-6


def selection_of(config: RunConfig) -> FrameSelection:
    """--every/--fps/--start/--end as a FrameSelection; UsageError for a bad value."""
    try:
        return FrameSelection.parse(config.every, config.fps, config.start, config.end)
    except ValueError as e:
        raise UsageError(str(e)) from None
