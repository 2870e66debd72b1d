"""``open_output``: the output folder for ``--out``, local or on object storage (the one place that
knows both implementations of outputs/folder.py's OutputFolder)."""

from __future__ import annotations

from typing import Optional

from m2f_cli.outputs.folder import OutputFolder
from m2f_cli.outputs.local import LocalOutputFolder
from m2f_cli.outputs.remote import RemoteOutputFolder
from m2f_cli.urls import is_url, local_path


def open_output(out: str, shard: Optional[tuple[int, int]] = None) -> OutputFolder:
    """The OutputFolder for --out: remote for fsspec URLs, local otherwise."""
    if is_url(out):
        return RemoteOutputFolder(out, shard)
    return LocalOutputFolder(local_path(out), shard)
