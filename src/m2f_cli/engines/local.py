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
                  notify: Optional[Callable[[str], None]] = None, mid_run: bool = False
                  ) -> Iterator[tuple[int, Union[ImageResult, Failure]]]:
    """The local engine: decode + preprocess in DataLoader workers, the model in this process
    (mid_run: inputs.batch.make_loader's, for the loaders a run with videos makes as it goes).
    The loader does not pin (it yields Samples, which torch's pin_memory leaves as they are): each
    batch is stacked into pinned memory instead (start_batch)."""
    if any(isinstance(r, VideoJob) for r in todo):  # videos: read frame by frame (engines/video.py)
        return local_results_with_videos(local_results, config, segmenter, todo, batch_size, workers, stages,
                                         stopping, notify)
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
    """engines.Engine in this process: results(todo, stages, stopping) over a loaded Segmenter."""

    def __init__(self, config: RunConfig, segmenter: Segmenter, batch_size: int, workers: int,
                 notify: Optional[Callable[[str], None]] = None):
        self.config, self.segmenter = config, segmenter
        self.batch_size, self.workers, self.notify = batch_size, workers, notify

    def results(self, todo: list[ImageRef], stages: Stages, stopping: Callable[[], bool]
                ) -> Iterator[tuple[int, Union[ImageResult, Failure]]]:
        return local_results(self.config, self.segmenter, todo, self.batch_size, self.workers, stages, stopping,
                             self.notify)
