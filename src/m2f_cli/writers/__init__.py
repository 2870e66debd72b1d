"""Stage 6: writers. Small classes behind one interface, found through one registry.

The registry (format name -> Writer class) has the names of formats.py, which feeds the CLI's
``--format`` choices and help without importing these modules; the parametrised writer test runs
every registered writer.
"""

from __future__ import annotations

from .base import REGISTRY, Writer, WriterContext, register, writer_class
from . import png, coco, jsonl, overlay, yolo, labelme, cvat, geojson, labels, panoptic, cutout  # noqa: F401  (each registers its writer)

__all__ = ["REGISTRY", "Writer", "WriterContext", "register", "writer_class"]
