"""Stage 3b: decode and preprocess in DataLoader workers, then group samples into batches.

Workers turn ImageRefs into Samples (decoding failures become Samples with an error, never a
substitute image). The main process groups samples of equal padded shape into batches through a
bounded buffer, so a batch never mixes shapes (no padding ever changes a prediction) and memory
and latency stay bounded. Batches can come out of input order; the pipeline restores it.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from m2f_cli.errors import DecodeError
from m2f_cli.inputs.decode import decode
from m2f_cli.inputs.preprocess import PreprocessSpec, preprocess
from m2f_cli.records import ImageRef
from m2f_cli.outputs.local import HELD_LOCK_FDS

if TYPE_CHECKING:
    from m2f_cli.tiling.grid import TiledImage
    from m2f_cli.tiling.options import TileOptions


@dataclass
class Sample:
    """One preprocessed image, or the reason it could not be.

    seq: position in this run's work list (results are emitted in seq order); a video's frames
        have (seq, j), j counting the items of its unit (engines/video.py).
    pixel_values: (3, Hp, Wp) float32 tensor, None on error.
    valid: (h, w) unpadded part of pixel_values; original: (H0, W0) upright image size.
    tiles: with --tile (tiling.py), the image cut into tiles; pixel_values is then the whole
        image's input for --tile-full, else None. Such a sample is one unit: batched alone.
    """

    seq: int
    ref: ImageRef
    pixel_values: Optional[torch.Tensor]
    valid: tuple[int, int]
    original: tuple[int, int]
    error: Optional[str] = None
    decode_s: float = 0.0
    preprocess_s: float = 0.0
    tiles: Optional["TiledImage"] = None
    image: Optional[np.ndarray] = None  # a video frame's upright RGB, for writers that draw on it (engines/video.py)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixel_values.shape[-2:]) if self.pixel_values is not None else (0, 0)


class ImageDataset(Dataset):
    """refs -> Samples. Pure function of the file, so any worker can do any item."""

    def __init__(self, refs: Sequence[ImageRef], spec: PreprocessSpec, max_pixels: Optional[int],
                 fast_decode: bool = False, tile: Optional["TileOptions"] = None):
        self.refs = list(refs)
        self.spec = spec
        self.max_pixels = max_pixels
        self.fast_decode = fast_decode
        self.tile = tile

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> Sample:
        return load_sample(i, self.refs[i], self.spec, self.max_pixels, self.fast_decode, self.tile)


def load_sample(seq: int, ref: ImageRef, spec: PreprocessSpec, max_pixels: Optional[int],
                fast_decode: bool = False, tile: Optional["TileOptions"] = None) -> Sample:
    """Decode + preprocess one image: what a DataLoader worker (local run) or a Ray actor does.
    tile: --tile's options: the image is cut into tiles (tiling.cut_tiles) unless one covers it."""
    t0 = time.perf_counter()
    if tile is not None:  # --tile over a TIFF above --max-pixels: read in windows (issue 28, tiling/stream.py)
        from m2f_cli.tiling.stream import windowed_tiles
        windowed = windowed_tiles(ref, spec, tile, max_pixels)
        if isinstance(windowed, str):
            return Sample(seq, ref, None, (0, 0), (0, 0), error=windowed)
        if windowed is not None:
            return Sample(seq, ref, None, (0, 0), windowed.size, tiles=windowed)
    try:
        img = decode(ref.path, max_pixels, draft=spec if fast_decode and tile is None else None)
    except DecodeError as e:
        return Sample(seq, ref, None, (0, 0), (0, 0), error=str(e), decode_s=time.perf_counter() - t0)
    return rgb_sample(seq, ref, img.rgb, (img.height, img.width), spec, tile, time.perf_counter() - t0)


def rgb_sample(seq: int, ref: ImageRef, rgb, original: tuple[int, int], spec: PreprocessSpec,
               tile: Optional["TileOptions"] = None, decode_s: float = 0.0) -> Sample:
    """Preprocess one decoded image: rgb (h, w, 3) uint8 upright (smaller than original (H0, W0)
    only after a draft decode); cut into tiles with --tile (tiling.py) unless one covers it."""
    t1 = time.perf_counter()
    if tile is not None:  # --tile (issue 17): the whole hook; see tiling.py
        from m2f_cli.tiling.grid import cut_tiles
        tiles = cut_tiles(rgb, spec, tile)
        if tiles is not None:
            full = preprocess(rgb, spec) if tile.full else None
            return Sample(seq, ref, torch.from_numpy(full.pixel_values) if full else None,
                          full.valid if full else (0, 0), original, decode_s=decode_s,
                          preprocess_s=time.perf_counter() - t1, tiles=tiles)
    mi = preprocess(rgb, spec, original=original)
    return Sample(seq, ref, torch.from_numpy(mi.pixel_values), mi.valid, original,
                  decode_s=decode_s, preprocess_s=time.perf_counter() - t1)


def _worker_init(main_pid: int, _: int) -> None:
    # One intra-op thread per worker: the model's threads own the cores. Ctrl-C is the main
    # process's business; workers must not die with a traceback of their own.
    torch.set_num_threads(1)
    if os.getppid() != main_pid:  # forked by the forkserver: torch's watchdog watches the server
        _exit_with(main_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in list(HELD_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    HELD_LOCK_FDS.clear()


def _exit_with(main_pid: int) -> None:
    """Leave when the run's process is gone, however it ended (kill -9 included): a worker forked
    by the forkserver would otherwise wait for its tasks, and keep the server, forever."""
    import threading

    def watch() -> None:
        try:
            fd = os.pidfd_open(main_pid)  # readable once that process has exited (Linux 5.3+)
            select.select([fd], [], [])
        except (AttributeError, OSError):
            while True:  # no pidfd: poll
                try:
                    os.kill(main_pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:  # that PID is another user's now: ours has gone
                    break
                time.sleep(1.0)
        os._exit(0)
    threading.Thread(target=watch, name="m2f-main-watch", daemon=True).start()


def make_loader(dataset: Dataset, workers: int, pin_memory: bool = False, sampler: Optional[Iterable] = None,
                mid_run: bool = False) -> DataLoader:
    """sampler: the keys the workers get, drawn lazily in this process (default: 0..len-1).
    mid_run: the loader is made while other threads of this process work (the writer thread, a
    progress bar): its workers are then forked from a forkserver, never from this process, whose
    threads may hold a lock at that moment (a module import: the forked worker would wait for it
    forever). The first loader of a run forks at once, before any of them has started work."""
    context = _fork_server() if mid_run and workers > 0 else None
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, sampler=sampler,
                      worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers > 0 else None,
                      pin_memory=pin_memory, prefetch_factor=4 if workers > 0 else None,
                      persistent_workers=False, multiprocessing_context=context)


_FORK_SERVER = None


def _fork_server():
    """multiprocessing's forkserver context, with the workers' modules imported in the server once
    (its start costs ~2-3 s of importing torch, once per process)."""
    global _FORK_SERVER
    if _FORK_SERVER is None:
        import multiprocessing
        _FORK_SERVER = multiprocessing.get_context("forkserver")
        _FORK_SERVER.set_forkserver_preload(["torch", "m2f_cli.inputs.batch", "m2f_cli.inputs.video"])
    return _FORK_SERVER


def group_batches(samples: Iterable[Sample], batch_size: int, max_buffered: Optional[int] = None
                  ) -> Iterator[list[Sample]]:
    """Group samples of equal padded shape into batches of at most batch_size.

    Failed samples and tiled ones (Sample.tiles) come out alone at once. When more than
    max_buffered samples wait (default 4 x batch_size), the oldest group is flushed even if it is
    not full. The rest is flushed at the end.
    """
    limit = max_buffered if max_buffered is not None else 4 * batch_size
    groups: "OrderedDict[tuple[int, int], list[Sample]]" = OrderedDict()
    waiting = 0
    for s in samples:
        if s.error is not None or s.tiles is not None:  # a tiled image is batched by tiling.py
            yield [s]
            continue
        g = groups.setdefault(s.shape, [])
        g.append(s)
        waiting += 1
        if len(g) >= batch_size:
            del groups[s.shape]
            waiting -= len(g)
            yield g
        elif waiting > limit:
            _, oldest = groups.popitem(last=False)
            waiting -= len(oldest)
            yield oldest
    for g in groups.values():
        yield g
