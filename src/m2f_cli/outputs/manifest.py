"""What a run leaves about itself in --out: ``m2f-run.json`` (the last run's summary and whether it
got through its inputs; ``m2f merge`` reads it to find incomplete shards) and ``failures.jsonl``."""

from __future__ import annotations

import json

from m2f_cli.config import RunConfig
from m2f_cli.progress import RunSummary
from m2f_cli.records import Failure
from m2f_cli.outputs.folder import OutputFolder
from m2f_cli.outputs.open import open_output


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


def read_info(out: str) -> dict:
    """What ``m2f info OUT`` shows of an output folder (local or URL), read only: each format's
    settings record (settings_record.py) and the last run of each shard (m2f-run*.json).
    Raises UsageError when out holds no m2f outputs."""
    from m2f_cli.errors import UsageError
    from m2f_cli.outputs.settings_record import read_record
    from m2f_cli.outputs.writers import REGISTRY
    folder = open_output(out)
    records = {name: rec for name in REGISTRY if (rec := read_record(folder, name)) is not None}
    runs = {}
    for path in _run_files(folder):
        try:
            runs[path.rsplit("/", 1)[-1]] = json.loads(folder.read_bytes(path))
        except (OSError, ValueError):
            continue
    if not records and not runs:
        raise UsageError(f"{out}: no m2f outputs here (no settings record, no m2f-run.json)")
    return {"out": out, "settings": records, "runs": runs}


def _run_files(folder) -> list[str]:
    """m2f-run.json and every shard's m2f-run.shard-I-of-N.json in folder."""
    fs = getattr(folder, "fs", None)
    if fs is not None:  # a remote folder (remote.RemoteOutputFolder)
        return sorted(folder.join(p.rsplit("/", 1)[-1]) for p in fs.glob(folder._p(folder.join("m2f-run*.json"))))
    import glob
    import os
    return sorted(glob.glob(os.path.join(glob.escape(folder.out), "m2f-run*.json")))


def info_lines(info: dict) -> list[str]:
    """read_info for a person: the last runs, then each format's settings, one line each."""
    lines = [f"output: {info['out']}"]
    for name, run in info["runs"].items():
        state = "complete" if run.get("complete") else "incomplete (rerun to finish)"
        lines.append(f"last run ({name}): {state}; {run.get('images', 0)} images, {run.get('failed', 0)} failed, "
                     f"{run.get('skipped', 0)} skipped, {run.get('wall_s', 0):.1f} s, exit {run.get('exit_code')}; "
                     f"formats {', '.join(run.get('formats') or [])}")
    for name, rec in info["settings"].items():
        s = dict(rec.get("settings", {}))
        model = s.pop("model", {}) or {}
        shown = ", ".join(f"{k} {v}" for k, v in s.items() if v is not None)
        lines.append(f"{name}: model {model.get('name')}"
                     + (f"@{model['revision']}" if model.get("revision") else "")
                     + f" (m2f {rec.get('m2f')}); {shown}")
    return lines
