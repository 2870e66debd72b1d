"""The per-batch work every engine shares (local, Ray, videos): batches of Samples of one input
shape -> the model on the device -> post-processing, with out-of-memory splits; results keyed by
each sample's seq."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional, Union

from m2f_cli.model.accel import free_device_memory, is_out_of_memory, stack_pixels
from m2f_cli.inputs.batch import Sample, group_batches
from m2f_cli.records import Failure, ImageResult
from m2f_cli.segmenter import InFlight, Segmenter, StageError, describe_error
from m2f_cli.tiling.driver import infer_tiled

log = logging.getLogger(__name__)


def drain(loader: Iterable[Sample], stages, stopping: Callable[[], bool]) -> Iterator[Sample]:
    """A DataLoader's samples until it ends or stopping() says so, each wait counted as idle time
    (stages.idle); the loader's iterator, and with it its workers, goes when this generator ends,
    however it ends (engines/local.py, engines/video.py)."""
    it = iter(loader)
    try:
        while not stopping():
            t0 = time.perf_counter()
            try:
                s = next(it)
            except StopIteration:
                return
            stages.idle += time.perf_counter() - t0
            yield s
    finally:
        del it  # shuts the workers down


def _failures(batch: list[Sample], stage: str, error: str) -> list[tuple[int, Failure]]:
    return [(s.seq, Failure(s.ref, stage, error)) for s in batch]


class StartedBatch:
    """A batch queued on the segmenter (or already answered): finish() -> (seq, result or failure)
    for each of its samples."""

    def __init__(self, batch: list[Sample], flight: Optional[InFlight] = None,
                 done: Optional[list[tuple[int, Union[ImageResult, Failure]]]] = None):
        self.batch, self.flight, self.done = batch, flight, done

    def finish(self) -> list[tuple[int, Union[ImageResult, Failure]]]:
        if self.done is None:
            self.done = [(s.seq, Failure(s.ref, r.stage, str(r)) if isinstance(r, StageError) else r)
                         for s, r in zip(self.batch, self.flight.finish())]
            self.flight = None
        return self.done


def start_batch(segmenter: Segmenter, batch: list[Sample], notify: Optional[Callable[[str], None]] = None
                ) -> StartedBatch:
    """Queue one batch of samples of equal shape (or answer one failed sample).

    The pixels are stacked into pinned memory when the model is on CUDA (accel.stack_pixels), so the
    copy to the card is asynchronous. A device out-of-memory error splits the batch in halves, retried
    one after the other (down to one image at a time), with a one-line notice; later batches are cut
    to the size that fitted (segmenter.max_batch). Any other failure of the model fails the batch's
    images (stage "model"); one of the post-processing fails its image (stage "postprocess").
    """
    if batch[0].error is not None:
        return StartedBatch(batch, done=_failures(batch, "decode", batch[0].error))
    notify = notify or log.warning
    limit = getattr(segmenter, "max_batch", None)
    if limit is not None and len(batch) > limit:
        return StartedBatch(batch, done=_in_parts(segmenter, batch, limit, notify))
    try:
        x = stack_pixels([s.pixel_values for s in batch], pin=segmenter.device.type == "cuda")
        flight = segmenter.start(x, [s.ref for s in batch], [s.valid for s in batch], [s.original for s in batch])
    except StageError as e:
        return StartedBatch(batch, done=_failures(batch, e.stage, str(e)))
    except Exception as e:
        if not is_out_of_memory(e):
            return StartedBatch(batch, done=_failures(batch, "model", describe_error(e)))
        free_device_memory(segmenter.device)
        if len(batch) == 1:
            return StartedBatch(batch, done=_failures(batch, "model", f"out of memory on one image ({describe_error(e)})"))
        half = (len(batch) + 1) // 2
        segmenter.max_batch = half
        notify(f"{segmenter.device.type} out of memory on a batch of {len(batch)} images: "
               f"retrying in batches of {half}")
        return StartedBatch(batch, done=_in_parts(segmenter, batch, half, notify))
    return StartedBatch(batch, flight)


def _in_parts(segmenter: Segmenter, batch: list[Sample], size: int, notify: Callable[[str], None]
              ) -> list[tuple[int, Union[ImageResult, Failure]]]:
    out = []
    for i in range(0, len(batch), size):
        out += start_batch(segmenter, batch[i:i + size], notify).finish()
    return out


def infer_batch(segmenter: Segmenter, batch: list[Sample], notify: Optional[Callable[[str], None]] = None
                ) -> list[tuple[int, Union[ImageResult, Failure]]]:
    """One batch of samples of equal shape (or one failed sample) -> (seq, result or failure) each."""
    return start_batch(segmenter, batch, notify).finish()


def segment_samples(segmenter: Segmenter, samples: Iterable[Sample], batch_size: int,
                    notify: Optional[Callable[[str], None]] = None
                    ) -> Iterator[tuple[int, Union[ImageResult, Failure]]]:
    """Samples -> (seq, result or failure), batching samples of equal shape: the per-batch loop of
    every engine (the local one below, the Ray actors).

    One batch stays in flight while the previous one is post-processed. On CUDA batch n+1 is queued
    (forward and device post-processing) before batch n's host post-processing runs, so the card
    works while the host encodes masks. On CPU (_ahead) batch n+1's forward runs on a thread of this
    call beside batch n's post-processing where that post-processing is worth it (crowded large
    photos, where the mostly single-threaded post-processing costs more than the forward; the
    compiled forward, model/startup/aoti.py, and torch's kernels release the GIL); else each batch
    is finished before the next starts, as on MPS (its timing syncs).
    """
    if segmenter.device.type == "cpu":
        yield from _ahead(segmenter, samples, batch_size, notify)
        return
    overlap = segmenter.device.type == "cuda"
    in_flight: Optional[StartedBatch] = None
    for batch in group_batches(samples, batch_size):
        if batch[0].tiles is not None:  # --tile: one image, its tiles batched by tiling.py
            if in_flight is not None:
                yield from in_flight.finish()
                in_flight = None
            yield from infer_tiled(segmenter, batch[0], batch_size)
            continue
        started = start_batch(segmenter, batch, notify)
        if not overlap:
            yield from started.finish()
            continue
        if in_flight is not None:
            yield from in_flight.finish()
        in_flight = started
    if in_flight is not None:
        yield from in_flight.finish()


# On CPU the next forward runs beside a batch's post-processing only where that post-processing
# is worth it: at least this share of the batch's forward (crowded 12 MP photos: ~2x the forward;
# ~640x480 photos: ~4%, where a forward thread made the whole run 3-7% slower on 2 cores).
AHEAD_SHARE = 0.25
# Before any batch has been measured, the first one is guessed worth it when an image of it has at
# least this many pixels (post-processing cost follows the output size): 4 crowded photos 7.0 ->
# 6.85 s (the first photo's post-processing beside the second forward); a wrong guess costs one
# batch's overlap, then the measured rule above decides.
AHEAD_FIRST_PIXELS = 2_000_000


def _ahead(segmenter: Segmenter, samples: Iterable[Sample], batch_size: int,
           notify: Optional[Callable[[str], None]]) -> Iterator[tuple[int, Union[ImageResult, Failure]]]:
    """segment_samples on CPU. A batch runs here, forward then post-processing, until one's
    post-processing took AHEAD_SHARE of its forward (the first batch: guessed from its images'
    size, AHEAD_FIRST_PIXELS); from then on (each batch decides for the
    next; outputs are the same either way) forwards run in order on one thread of this call, batch
    n+1's beside batch n's post-processing. Serial batches stay on this thread: a second thread
    running torch gets OpenMP threads of its own, which spin beside this thread's (~640x480
    photos: 3-7% slower, measured). The thread ends with the call, however it ends (a closed
    generator or an error cancels the forwards not started and waits for the running one)."""
    pool: Optional[ThreadPoolExecutor] = None
    in_flight: Optional[Future] = None
    ahead: Optional[bool] = None  # None: no batch decided yet (AHEAD_FIRST_PIXELS guesses)
    times = segmenter.times

    def finish(started: StartedBatch) -> list[tuple[int, Union[ImageResult, Failure]]]:
        nonlocal ahead
        forward, post = times.forward_s, times.postprocess_s
        done = started.finish()
        forward, post = times.forward_s - forward, times.postprocess_s - post
        if forward > 0:  # a batch that failed before its forward says nothing
            ahead = post >= AHEAD_SHARE * forward
        return done

    try:
        for batch in group_batches(samples, batch_size):
            if ahead is None:
                ahead = max(s.original[0] * s.original[1] for s in batch) >= AHEAD_FIRST_PIXELS
            if in_flight is not None and (not ahead or batch[0].tiles is not None):
                yield from finish(in_flight.result())
                in_flight = None
            if batch[0].tiles is not None:  # tiles: infer_tiled batches them itself
                yield from infer_tiled(segmenter, batch[0], batch_size)
                continue
            if not ahead:
                yield from finish(start_batch(segmenter, batch, notify))
                continue
            pool = pool or ThreadPoolExecutor(1, thread_name_prefix="m2f-forward")
            started = pool.submit(start_batch, segmenter, batch, notify)
            if in_flight is not None:
                yield from finish(in_flight.result())
            in_flight = started
        if in_flight is not None:
            yield from finish(in_flight.result())
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
