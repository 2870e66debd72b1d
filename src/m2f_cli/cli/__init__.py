"""The ``m2f`` command: parse, call the library, render, pick the exit code (one module per group of
commands: segment.py, tools.py, cache.py; common.py holds the app and what they share)."""

from m2f_cli.cli import segment, tools, cache  # noqa: F401, I001  (each registers its commands, in this order)
from m2f_cli.cli.common import app, main

from m2f_cli.cli.segment import SEGMENT_PANELS

__all__ = ["app", "main", "SEGMENT_PANELS"]
