"""The local staging folders of remote runs, and the sweep that removes those of dead runs.

A remote output folder (outputs/remote.py) writes each output into a local staging folder,
``<tmp>/m2f-stage-<pid>-*``, before uploading it whole. A run killed hard cannot remove its own;
the next remote run on the machine removes those whose process is gone (nothing in them was
uploaded, so nothing is lost).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

STAGE_PREFIX = "m2f-stage-"


def new_stage() -> str:
    """A fresh staging folder of this process: <tmp>/m2f-stage-<pid>-<random>."""
    return tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-")


def sweep_stale_stages(root: Optional[str] = None) -> list[str]:
    """Remove staging folders (<tmp>/m2f-stage-<pid>-*) of this user's runs whose process is gone
    (a SIGKILLed run cannot clean up; what it staged was never uploaded). Returns those removed."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        entries = os.listdir(root)
    except OSError:
        return removed
    for name in entries:
        if not name.startswith(STAGE_PREFIX):
            continue
        pid_text = name[len(STAGE_PREFIX):].split("-", 1)[0]
        path = os.path.join(root, name)
        try:
            if not pid_text.isdigit() or os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid_text), 0)
            continue  # alive (or a reused pid): leave it
        except ProcessLookupError:
            pass
        except (PermissionError, OSError):
            continue  # another user's process, or unreadable: not ours to remove
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
