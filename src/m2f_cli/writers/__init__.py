"""Stage 6: writers. Small classes behind one interface, found through one registry.

The registry feeds the CLI's ``--format`` choices, its help text and the parametrised writer test.
"""

from __future__ import annotations

from .base import REGISTRY, Writer, WriterContext, register
from . import png, coco, jsonl, overlay, yolo, labelme, cvat, geojson  # noqa: F401  (each registers its writer)

__all__ = ["REGISTRY", "Writer", "WriterContext", "register"]
