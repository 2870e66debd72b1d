"""Videos through the engines: a video is one unit of a run's work list (a VideoJob in place of
its ImageRef), read frame by frame where the images are decoded, its frames batched like images.

- Where: the local engine reads each video in one DataLoader worker (an IterableDataset over
  video.read_frames, prefetch bounded), one video after the other, so frames come in order and
  memory stays bounded whatever the video's length; images between videos go through the usual
  loader. A Ray actor reads at most ``limit`` frames of a video per chunk and hands back a
  VideoMore naming where the next chunk starts (an Anchor: it seeks there).
- What comes out: ``((seq, j), item)`` pairs, j = 0, 1, ... the unit's items in order (frame
  results or failures), closed by a VideoEnd; writing.in_order puts them in input order.
- A frame is a Sample like an image's (batch.rgb_sample: the same preprocessing and tiling) whose
  ref is its frame_ref; writers that draw on the pixels (overlay, cutout) get the frame's RGB on
  the result, since there is no file to read it back from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Optional, Union

from torch.utils.data import IterableDataset

from m2f_cli.engines.batches import drain, segment_samples
from m2f_cli.inputs.batch import Sample, make_loader, rgb_sample
from m2f_cli.inputs.frame_selection import FrameSelection
from m2f_cli.inputs.video import Anchor, FrameError, ReadStats, frame_ref, read_frames
from m2f_cli.records import Failure, ImageRef, ImageResult

# Formats whose writers draw on the frame's pixels: their frames carry the RGB to the writer.
PIXEL_FORMATS = frozenset({"overlay", "cutout"})


@dataclass(frozen=True)
class VideoJob:
    """A video in a run's work list. selection: the frames to segment; anchor: where to start
    (a resumed run's frame; None: the start, or --start's first frame); keep_rgb: frames carry their
    RGB (PIXEL_FORMATS); expected: about how many frames it gives (progress); first: the number of
    its first item in the unit (Ray's later chunks go on counting); limit: at most this many frames,
    then a VideoMore (Ray chunks; None: to the end)."""

    ref: ImageRef
    selection: FrameSelection
    anchor: Optional[Anchor] = None
    keep_rgb: bool = False
    max_pixels: Optional[int] = None
    expected: int = 0
    first: int = 0
    limit: Optional[int] = None

    # what code that handles work items as ImageRefs reads (logs, failures)
    path = property(lambda self: self.ref.path)
    name = property(lambda self: self.ref.name)
    rel = property(lambda self: self.ref.rel)
    index = property(lambda self: self.ref.index)


@dataclass
class VideoEnd:
    """Closes a video's unit, after its frames (writing.in_order). complete: the reader got to the
    end of the stream or of --end without a failure; frames: frames segmented by this job."""

    key: tuple
    ref: ImageRef
    complete: bool
    frames: int
    ends_unit: ClassVar[bool] = True


@dataclass
class VideoMore:
    """A chunk of a video stopped at its limit: job goes on from there (Ray: another chunk)."""

    key: tuple
    job: VideoJob


def frame_samples(job: VideoJob, seq: int, spec, tile=None) -> Iterator[Union[Sample, VideoEnd, VideoMore]]:
    """Read and preprocess the job's frames: Samples keyed (seq, j), a failure Sample naming the
    frame that could not be read, then a VideoEnd (or a VideoMore at job.limit)."""
    j, stats = job.first, ReadStats()
    t0 = time.perf_counter()
    failed = False
    try:
        for fr in read_frames(job.path, job.selection, job.anchor, job.max_pixels, stats):
            s = rgb_sample((seq, j), frame_ref(job.ref, fr.index, fr.time, fr.pts), fr.rgb, fr.rgb.shape[:2],
                           spec, tile, time.perf_counter() - t0)
            if job.keep_rgb:
                s.image = fr.rgb
            yield s
            j += 1
            if job.limit is not None and j - job.first >= job.limit:
                yield VideoMore((seq, j), dataclasses.replace(job, anchor=Anchor(fr.index, fr.pts, skip=True),
                                                              first=j))
                return
            t0 = time.perf_counter()
    except FrameError as e:
        ref = frame_ref(job.ref, e.frame) if e.frame is not None else job.ref
        yield Sample((seq, j), ref, None, (0, 0), (0, 0), error=str(e), decode_s=time.perf_counter() - t0)
        j += 1
        failed = True
    yield VideoEnd((seq, j), job.ref, not failed and stats.finished, stats.selected)


class VideoFrames(IterableDataset):
    """One video's frame_samples, for a DataLoader with at most one worker (frames in order)."""

    def __init__(self, job: VideoJob, seq: int, spec, tile=None):
        self.job, self.seq, self.spec, self.tile = job, seq, spec, tile

    def __iter__(self):
        return frame_samples(self.job, self.seq, self.spec, self.tile)


def with_images(results, images: dict) -> Iterator[tuple]:
    """Give each frame result the RGB its sample carried (images: key -> (H, W, 3) uint8)."""
    for key, r in results:
        rgb = images.pop(key, None)
        if rgb is not None and isinstance(r, ImageResult):
            r.image = rgb
        yield key, r


def _segmented(segmenter, samples, batch_size, notify, ends: list, images: dict, stages=None):
    """Samples (and the reader's VideoEnd/VideoMore, set aside in ends) -> (key, result) pairs."""
    def only_samples():
        for s in samples:
            if isinstance(s, (VideoEnd, VideoMore)):
                ends.append(s)
                continue
            if stages is not None:
                stages.decode += s.decode_s
                stages.preprocess += s.preprocess_s
            if s.image is not None:
                images[s.seq] = s.image
            yield s
    return with_images(segment_samples(segmenter, only_samples(), batch_size, notify), images)


def video_results(segmenter, job: VideoJob, seq: int, batch_size: int, workers: int, stages,
                  stopping: Callable[[], bool], notify=None) -> Iterator[tuple]:
    """One video in this process's engine: read in one DataLoader worker (in-process with 0)."""
    loader = make_loader(VideoFrames(job, seq, segmenter.spec, getattr(segmenter, "tiling", None)),
                         min(workers, 1), mid_run=True)  # one loader per video, made as the run goes
    ends: list = []

    with contextlib.closing(drain(loader, stages, stopping)) as samples:
        yield from _segmented(segmenter, samples, batch_size, notify, ends, {}, stages)
    for e in ends:
        yield e.key, e


def local_results_with_videos(image_results, config, segmenter, todo: list, batch_size: int, workers: int,
                              stages, stopping: Callable[[], bool], notify=None) -> Iterator[tuple]:
    """engines.local.local_results over a work list with videos: each run of images between
    videos through image_results (its own loader), each video through video_results, in order."""
    i = 0
    while i < len(todo) and not stopping():
        if isinstance(todo[i], VideoJob):
            yield from video_results(segmenter, todo[i], i, batch_size, workers, stages, stopping, notify)
            i += 1
            continue
        end = next((n for n in range(i, len(todo)) if isinstance(todo[n], VideoJob)), len(todo))
        for seq, r in image_results(config, segmenter, todo[i:end], batch_size, workers, stages, stopping, notify,
                                    mid_run=True):
            yield seq + i, r
        i = end


def run_chunk(segmenter, seq: int, job: VideoJob, batch_size: int) -> tuple[list, dict]:
    """A Ray actor's chunk of a video: (its (key, item) pairs, stage seconds), read in-process."""
    ends: list = []
    timing = {"decode": 0.0, "preprocess": 0.0}

    def samples():
        for s in frame_samples(job, seq, segmenter.spec, getattr(segmenter, "tiling", None)):
            if isinstance(s, Sample):
                timing["decode"] += s.decode_s
                timing["preprocess"] += s.preprocess_s
            yield s
    f0, p0 = segmenter.times.forward_s, segmenter.times.postprocess_s
    out = list(_segmented(segmenter, samples(), batch_size, None, ends, {}))
    out += [(e.key, e) for e in ends]
    return out, {**timing, "forward": segmenter.times.forward_s - f0,
                 "postprocess": segmenter.times.postprocess_s - p0}


def chunk_failures(seq: int, job: VideoJob, reason: str) -> list[tuple]:
    """What an engine reports for a video chunk it gave up on: one failure, then the unit's end."""
    key = (seq, job.first)
    return [(key, Failure(job.ref, "engine", reason)),
            ((seq, job.first + 1), VideoEnd((seq, job.first + 1), job.ref, False, 0))]
