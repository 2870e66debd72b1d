"""What a run leaves about itself in --out: ``m2f-run.json`` (the last run's summary and whether it
got through its inputs; ``m2f merge`` reads it to find incomplete shards) and ``failures.jsonl``."""

from __future__ import annotations

import json

from .config import RunConfig
from .progress import RunSummary
from .records import Failure
from .state import OutputFolder


def write_manifest(folder: OutputFolder, config: RunConfig, summary: RunSummary, complete: bool) -> None:
    """<out>/m2f-run.json (m2f-run.shard-I-of-N.json for shards): what the last run did, and
    whether it got through all its inputs; ``m2f merge`` reads it to find incomplete shards."""
    doc = {"formats": list(config.formats), "shard": list(config.shard) if config.shard else None,
           "complete": complete and not summary.interrupted and not summary.stopped_early,
           **summary.as_dict()}
    folder.write_bytes(folder.run_file("m2f-run", ".json"), json.dumps(doc, indent=1).encode())


def _frame(f: Failure) -> dict:
    frame = getattr(f.ref, "frame", None)
    return {"frame": frame.index} if frame is not None else {}


def write_failures(folder: OutputFolder, failures: list[Failure]) -> None:
    """<out>/failures.jsonl, rewritten each run: {"path", "stage", "error"} per failed input, and
    "frame" (its index) for a video that failed at a frame."""
    data = "".join(json.dumps({"path": f.ref.path, "stage": f.stage, "error": f.error, **_frame(f)},
                              ensure_ascii=False) + "\n" for f in failures)
    folder.write_bytes(folder.run_file("failures", ".jsonl"), data.encode())
