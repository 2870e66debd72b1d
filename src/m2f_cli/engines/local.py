"""The local engine: decode and preprocess in DataLoader workers, the model in this process.

Its per-batch step (``segment_samples``: batches of equal shape, pinned on CUDA, split on out of
memory, one batch in flight on CUDA, tiles by tiling.py) is what the Ray actors run too.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Optional, Union

from m2f_cli.inputs.batch import ImageDataset, Sample, make_loader
from m2f_cli.config import RunConfig
from m2f_cli.progress import Stages
from m2f_cli.records import Failure, ImageRef, ImageResult
from m2f_cli.segmenter import Segmenter
from m2f_cli.engines.batches import drain, segment_samples
from m2f_cli.engines.video import VideoJob, local_results_with_videos

log = logging.getLogger(__name__)


def local_results(config: RunConfig, segmenter: Segmenter, todo: list[ImageRef], batch_size: int,
                  workers: int, stages: Stages, stopping: Callable[[], bool],
                  notify: Optional[Callable[[str], None]] = None, mid_run: bool = False,
                  started: Optional[EarlyLoader] = None) -> Iterator[tuple[int, Union[ImageResult, Failure]]]:
    """The local engine: decode + preprocess in DataLoader workers, the model in this process
    (mid_run: inputs.batch.make_loader's, for the loaders a run with videos makes as it goes;
    started: the running loader of an EarlyLoader, for exactly these images).
    The loader does not pin (it yields Samples, which torch's pin_memory leaves as they are): each
    batch is stacked into pinned memory instead (start_batch)."""
    if any(isinstance(r, VideoJob) for r in todo):  # videos: read frame by frame (engines/video.py)
        return local_results_with_videos(local_results, config, segmenter, todo, batch_size, workers, stages,
                                         stopping, notify)
    if started is not None:  # an EarlyLoader's iterator, its workers at work since before the model loaded
        loader = started
    else:
        dataset = ImageDataset(todo, segmenter.spec, config.max_pixels, config.fast_decode,
                               tile=getattr(segmenter, "tiling", None))
        loader = make_loader(dataset, workers, mid_run=mid_run)

    def samples() -> Iterator[Sample]:
        with contextlib.closing(drain(loader, stages, stopping)) as drained:
            for s in drained:
                stages.decode += s.decode_s
                stages.preprocess += s.preprocess_s
                yield s

    return segment_samples(segmenter, samples(), batch_size, notify)


class LocalEngine:
    """engines.Engine in this process: results(todo, stages, stopping) over a loaded Segmenter.
    started: an EarlyLoader's running loader over the same todo (EarlyLoader.take)."""

    def __init__(self, config: RunConfig, segmenter: Segmenter, batch_size: int, workers: int,
                 notify: Optional[Callable[[str], None]] = None, started: Optional[EarlyLoader] = None):
        self.config, self.segmenter = config, segmenter
        self.batch_size, self.workers, self.notify, self.started = batch_size, workers, notify, started

    def results(self, todo: list[ImageRef], stages: Stages, stopping: Callable[[], bool]
                ) -> Iterator[tuple[int, Union[ImageResult, Failure]]]:
        started, self.started = self.started, None
        return local_results(self.config, self.segmenter, todo, self.batch_size, self.workers, stages, stopping,
                             self.notify, started=started)


class EarlyLoader:
    """A run's DataLoader started before its model loads, so that its workers decode the first
    images meanwhile (the first 640x480 photo ~0.07 s, a 12 MP one ~0.2 s; the model's load
    0.2-3 s), and forked before the model's memory and the cache files' locks are in the process.
    take() hands it over when the loaded model preprocesses as it was made for; iterated (once),
    it gives its running iterator and keeps no reference, so the one who iterates
    (engines.batches.drain) holds the only one and the workers stop when that goes, as with a loader
    made on the spot. Not taken, or on close(), the iterator is dropped: torch's loader stops its
    workers when its iterator goes."""

    def __init__(self, config: RunConfig, todo: list[ImageRef], spec, tiling, workers: int):
        self.made_for = (spec, tiling, workers)
        dataset = ImageDataset(todo, spec, config.max_pixels, config.fast_decode, tile=tiling)
        self._running: Optional[Iterator[Sample]] = iter(make_loader(dataset, workers))
        log.debug("%d decode worker(s) started before the model loads", workers)

    def take(self, spec, tiling, workers: int) -> Optional[EarlyLoader]:
        """This loader if (spec, tiling, workers) is what it was made for, else None (closed)."""
        if self._running is not None and (spec, tiling, workers) == self.made_for:
            return self
        self.close()
        return None

    def __iter__(self) -> Iterator[Sample]:
        running, self._running = self._running, None
        if running is None:
            raise RuntimeError("an early loader is iterated once")
        return running

    def close(self) -> None:
        self._running = None
