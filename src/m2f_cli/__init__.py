"""m2f: Mask2Former instance segmentation over folders of images.

Library first: ``segment(images, ...)`` for any iterable of images in memory or on disk (batched,
in input order), ``Segmenter`` for one image at a time, ``run(RunConfig)`` for whole folders.
Heavy modules (torch, transformers) are imported on first use, so importing m2f_cli is cheap.
"""

from __future__ import annotations

from m2f_cli.version import __version__ as __version__  # re-exported: m2f_cli.__version__
__all__ = ["segment", "Result", "Failure", "Cutout", "Segmenter", "RunConfig", "run", "ImageResult", "Instance",
           "CategoryTable"]


def __getattr__(name: str):
    if name == "segment":
        from m2f_cli.api import segment
        return segment
    if name == "Result":
        from m2f_cli.result import Result
        return Result
    if name == "Cutout":
        from m2f_cli.outputs.writers.cutout import Cutout
        return Cutout
    if name == "Segmenter":
        from m2f_cli.segmenter import Segmenter
        return Segmenter
    if name == "run":
        from m2f_cli.pipeline import run
        return run
    if name == "RunConfig":
        from m2f_cli.config import RunConfig
        return RunConfig
    if name in ("ImageResult", "Instance", "Failure"):
        from m2f_cli import records
        return getattr(records, name)
    if name == "CategoryTable":
        from m2f_cli.model.categories import CategoryTable
        return CategoryTable
    raise AttributeError(name)
