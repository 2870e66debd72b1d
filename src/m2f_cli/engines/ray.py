"""``--ray``: the per-batch work on a Ray cluster, one model per actor; this process keeps the outputs.

What runs where. This process (the driver: ``m2f segment ... --ray auto``, or the entrypoint of
``ray job submit``) walks the inputs, skips what is done and holds the output folder, its lock, the
journals and the writers, exactly as a local run does (pipeline.py, engines/local.py). Ray actors, each loading the
model once, take chunks of ``(seq, ImageRef)``, decode and preprocess them with ``load_sample`` and
run ``segment_samples``: the same code as a local run, so an image's outputs are the same. Results
(label maps are numpy arrays) come back through Ray's object store.

Ray places the actors and restarts them; this module only keeps each actor fed with at most
IN_FLIGHT chunks, in input order, and watches a per-chunk timeout:

- resources: one actor per GPU (1 GPU + --ray-cpus-per-actor CPUs each, default a GPU node's CPUs
  less one shared by its GPUs, at most 8: the actor decodes in that many threads and sets its torch
  threads to it); on CPU clusters, actors of ``--threads``
  CPUs each, as many as fit while one CPU of the cluster stays free. Actors are the only thing
  this run schedules, so they cannot starve another stage of CPUs; chunks go only to actors that
  have started, so an actor Ray cannot place yet never holds work.
- faults: a killed actor is restarted by Ray and its chunks retried (max_restarts,
  max_task_retries). A chunk that runs longer than ``--ray-timeout`` gets its actor killed and
  restarted (Ray retries the chunk); a second timeout kills the actor for good. A chunk that still
  fails is retried once more image by image (on a new actor when its actor died), and an image
  that fails again becomes an ``engine`` failure: the run goes on and exits 3, like any failed input.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from m2f_cli.inputs.batch import load_sample
from m2f_cli.config import RunConfig
from m2f_cli.errors import EngineError
from m2f_cli.choices import segmenter_options, tile_of
from m2f_cli.progress import Stages
from m2f_cli.records import Failure, ImageRef, ImageResult
from m2f_cli.segmenter import Segmenter
from m2f_cli.engines.batches import segment_samples
from m2f_cli.engines.ray_schedule import RESTARTS, Schedule, Slot, ray_line
from m2f_cli.engines.video import VideoJob, run_chunk

log = logging.getLogger(__name__)



class _Actor:
    """One model in a Ray actor process. Built on the actor: the driver never loads the model."""

    def __init__(self, options: dict, factory: Optional[Callable[[], Segmenter]], threads: Optional[int],
                 batch_size: int, max_pixels: Optional[int], fast_decode: bool, decoders: int = 1, tile=None):
        import torch
        if threads:
            torch.set_num_threads(threads)
        self.segmenter = factory() if factory is not None else Segmenter(**options)
        if tile is not None:  # options.tile_of: --tile with the formats a windowed raster cannot give
            self.segmenter.tiling = tile
        self.batch_size, self.max_pixels, self.fast_decode = batch_size, max_pixels, fast_decode
        self.decoders = max(1, decoders)

    def _load(self, items: list[tuple[int, ImageRef]]) -> list:
        """Decode + preprocess a chunk, in `decoders` threads (Pillow's decoders and resizes release
        the GIL), in input order."""
        seg = self.segmenter

        def one(item):
            # --tile: an image's tiles are cut, run and merged here, on one actor (tiling.py)
            return load_sample(item[0], item[1], seg.spec, self.max_pixels, self.fast_decode,
                               getattr(seg, "tiling", None))
        if self.decoders == 1 or len(items) == 1:
            return [one(it) for it in items]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(min(self.decoders, len(items))) as pool:
            return list(pool.map(one, items))

    def ready(self) -> str:
        return str(self.segmenter.device)

    def process(self, items: list[tuple[int, ImageRef]]
                ) -> tuple[list[tuple[int, Union[ImageResult, Failure]]], dict[str, float]]:
        """A chunk of (seq, ref) -> ((seq, result or failure) per image, stage seconds). A chunk
        of a video (one VideoJob) -> its frames', its end or where the next chunk starts."""
        seg = self.segmenter
        if isinstance(items[0][1], VideoJob):
            return run_chunk(seg, items[0][0], items[0][1], self.batch_size)
        samples = self._load(items)
        f0, p0 = seg.times.forward_s, seg.times.postprocess_s
        out = list(segment_samples(seg, samples, self.batch_size))
        return out, {"decode": sum(s.decode_s for s in samples),
                     "preprocess": sum(s.preprocess_s for s in samples),
                     "forward": seg.times.forward_s - f0, "postprocess": seg.times.postprocess_s - p0}


@dataclass
class Plan:
    """How many actors of which size: see RayEngine.plan."""

    actors: int
    num_cpus: int
    num_gpus: int
    threads: Optional[int]
    device: str
    batch_size: int


# CPUs a GPU actor asks for by default, at most: decoding a 640x480 JPEG and resizing it takes
# ~5-10 ms a core, and one GPU runs Swin-T at several hundred images/s (benchmarks/gpu.py measures it)
GPU_ACTOR_MAX_CPUS = 8


def gpu_actor_cpus(nodes: list[dict], total_cpus: int, gpus: int) -> int:
    """Default CPUs per GPU actor: on each GPU node its CPUs less one (the driver, Ray itself) shared
    by its GPUs; the smallest share over the nodes (so every GPU's actor can be placed), between 1 and
    GPU_ACTOR_MAX_CPUS. Nodes that do not list their GPUs: the cluster's CPUs less one per GPU."""
    shares = [(int(n.get("CPU", 0)) - 1) // int(n["GPU"]) for n in nodes if int(n.get("GPU", 0)) > 0]
    if not shares:
        shares = [(total_cpus - 1) // max(1, gpus)]
    return max(1, min(GPU_ACTOR_MAX_CPUS, min(shares)))


@contextlib.contextmanager
def _stdout_to_stderr():
    """Ray prints its cluster messages (worker died, task retried) on sys.stdout; stdout is ours
    (--out - streams JSON Lines there, and the writer holds the real stream already)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


class RayEngine:
    """pipeline.Engine on Ray: ``run(config, engine=RayEngine(config))``, or ``config.ray`` set.

    task: the resolved task (pipeline passes it); segmenter_factory: a picklable callable that
    builds each actor's Segmenter instead of ``Segmenter(**segmenter_options(config, task))``
    (tests, custom models); m2f must be importable on every node.
    """

    def __init__(self, config: RunConfig, task: Optional[str] = None,
                 segmenter_factory: Optional[Callable[[], Segmenter]] = None):
        self.config = config
        self.task = task or config.task
        self.factory = segmenter_factory
        self.plan_used: Optional[Plan] = None
        self._remote = None

    # -- connection ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connected(self):
        """Connect (or start a local cluster); shut Ray down afterwards only if we started it."""
        import ray
        if ray.is_initialized():
            yield
            return
        address = self.config.ray or "auto"
        kwargs: dict = dict(log_to_driver=False, logging_level=logging.ERROR)
        if address == "auto":
            address = os.environ.get("RAY_ADDRESS") or "auto"
        elif address == "local":
            kwargs["include_dashboard"] = False
        # ray.init installs its own SIGTERM handler; ours (stop after the work in flight) stays
        main = threading.current_thread() is threading.main_thread()
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise EngineError(f"--ray {self.config.ray}: cannot connect to a Ray cluster: {ray_line(e)}") \
                from None
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        try:
            yield
        finally:
            ray.shutdown()

    # -- sizing ----------------------------------------------------------------------------------

    def plan(self) -> Plan:
        """Actors for the cluster as it is now. GPUs (unless --device cpu): one actor per GPU.
        CPUs: actors of --threads CPUs (default: a node's CPUs less one, at most 4), at most
        (cluster CPUs - 1) // threads of them, so one CPU always stays free; --ray-actors N overrides
        the count (actors Ray cannot place wait, and get no work, until it can)."""
        import ray
        c = self.config
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        batch_size = c.batch_size
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        total = int(res.get("CPU", 0))
        if gpus > 0 and c.device not in ("cpu", "mps"):
            cpus = c.ray_cpus_per_actor or gpu_actor_cpus(nodes, total, gpus)
            return Plan(c.ray_actors or gpus, cpus, 1, c.threads or cpus, "cuda", batch_size or 16)
        node_cpus = [int(n.get("CPU", 0)) for n in nodes]
        if total < 1 or not node_cpus:
            raise EngineError("the Ray cluster has no CPUs")
        threads = c.ray_cpus_per_actor or c.threads or max(1, min(4, max(node_cpus) - 1))
        if threads > max(node_cpus):
            what = "--ray-cpus-per-actor" if c.ray_cpus_per_actor else "--threads"
            raise EngineError(f"{what} {threads}: no node of the Ray cluster has {threads} CPUs "
                              f"(largest: {max(node_cpus)})")
        fit = sum(n // threads for n in node_cpus)
        actors = c.ray_actors or max(1, min((total - 1) // threads, fit))
        device = "cpu" if c.device == "auto" else c.device
        return Plan(actors, threads, 0, c.threads or threads, device, batch_size or 2)

    def _new_actor(self, plan: Plan) -> Slot:
        import ray
        options = segmenter_options(self.config, self.task)
        options["device"] = plan.device
        if self._remote is None:
            self._remote = ray.remote(_Actor)
        remote = self._remote.options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
                                      max_restarts=RESTARTS, max_task_retries=RESTARTS)
        # GPU actors decode in their CPUs' threads; CPU actors' CPUs are the model's threads
        decoders = plan.num_cpus if plan.num_gpus else 1
        handle = remote.remote(options, self.factory, plan.threads, plan.batch_size, self.config.max_pixels,
                               self.config.fast_decode, decoders, tile_of(self.config))
        return Slot(handle, handle.ready.remote())

    # -- the engine ------------------------------------------------------------------------------

    def results(self, todo: list[ImageRef], stages: Stages, stopping: Callable[[], bool]
                ) -> Iterator[tuple[int, Union[ImageResult, Failure]]]:
        with _stdout_to_stderr(), self._connected():
            yield from self._results(todo, stages, stopping)

    def _results(self, todo, stages, stopping):
        run = Schedule(self, todo, stages)
        try:
            while run.pending():
                if stopping():
                    return
                if not run.live() and not any(s.queue for s in run.slots):
                    yield from run.give_up()  # every actor and every replacement died
                    return
                run.feed()
                for ref in run.wait():
                    yield from run.collect(ref)
                run.check_timeouts()
                run.check_actors_running()
        finally:
            run.close()
