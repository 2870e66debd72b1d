"""A segmenter factory for the Ray crash test, imported by the Ray actors (tests/ is on their
PYTHONPATH): the actor process dies (os._exit) the first time it is given one image; the marker
file makes that happen once across actor restarts."""

import os

from m2f_cli.segmenter import Segmenter


class CrashOnce:
    def __init__(self, options: dict, marker: str, victim: str):
        self.options, self.marker, self.victim = options, marker, victim

    def __call__(self) -> Segmenter:
        seg = Segmenter(**self.options)
        start = seg.start  # every engine's per-batch step (engines.batches.start_batch)

        def crashing_start(pixel_values, refs, valids, originals):
            if any(r.name == self.victim for r in refs) and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(1)  # a worker killed mid-run, as by the OOM killer or a lost node
            return start(pixel_values, refs, valids, originals)

        seg.start = crashing_start
        return seg
