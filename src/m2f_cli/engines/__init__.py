"""Where the per-batch work of a run happens, behind one small interface.

- ``local.py``: DataLoader workers decode, the model runs in this process (the default).
- ``ray.py``: Ray actors, one model each, decode and run chunks of images (``--ray``).
- ``devices.py``: one worker process per device (``--devices``), each a whole local run over its
  shard, merged at the end: it runs *runs*, not batches, so it wraps ``pipeline.run`` instead of
  implementing Engine.

An Engine yields ``(seq, ImageResult | Failure)`` for every input of ``todo`` (seq is the input's
position in todo) in any order; pipeline.py restores the order and does all the writing, so resume,
journals and the output folder behave the same whichever engine ran the model.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol, Union

from m2f_cli.progress import Stages
from m2f_cli.records import Failure, ImageRef, ImageResult


class Engine(Protocol):
    """Where the per-batch work runs when it is not this process (``--ray``).

    results(todo, stages, stopping): (seq, ImageResult or Failure) for every ref of todo (seq is
    the ref's position in todo), in any order; add the stage seconds it measured to stages (forward
    and postprocess included); stop early when stopping() is true. Outputs are written by the
    caller, so resume, journals and the output folder work as in a local run.
    """

    def results(self, todo: list[ImageRef], stages: Stages, stopping: Callable[[], bool]
                ) -> Iterator[tuple[int, Union[ImageResult, Failure]]]: ...
