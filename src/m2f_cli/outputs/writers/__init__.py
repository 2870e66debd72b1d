"""Stage 6: writers. Small classes behind one interface, found through one registry.

The registry (format name -> Writer class) has the names of formats.py, which feeds the CLI's
``--format`` choices and help without importing these modules; the parametrised writer test runs
every registered writer.
"""

from __future__ import annotations

from m2f_cli.outputs.writers.base import REGISTRY, Writer, WriterContext, register, writer_class
# each module registers its writer when imported
from m2f_cli.outputs.writers import png, coco, jsonl, overlay, yolo, labelme  # noqa: F401
from m2f_cli.outputs.writers import cvat, geojson, labels, panoptic, cutout  # noqa: F401

__all__ = ["REGISTRY", "Writer", "WriterContext", "register", "writer_class"]
