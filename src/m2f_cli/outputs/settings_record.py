"""The settings record: what the files of an output folder depend on, kept per writer.

``<out>/.m2f/<writer>.settings.json`` = ``{"writer", "schema", "m2f", "settings": {...}}``, where
settings holds what every writer's files depend on (the model's identity: name, revision and a
content fingerprint of its files; task, resize, fast decode, dtype, top-k, classes, tiling), the writer's
own threshold, and the options it declares in ``Writer.recorded``, and the videos' frame selection
(--every/--fps/--start/--end). Shards of one run share it.

The rule, checked before the model loads (``check``):
- a writer with a record: the new settings must equal it (the model by fingerprint, the COCO
  annotation file by content), else the run is refused with every differing setting, old and new,
  and the ways out (``--overwrite`` redoes the outputs, or another ``--out``);
- a writer with no record and no outputs: new, nothing to compare;
- a writer with no record but outputs (a folder written before m2f kept records): adopted with a
  warning that its outputs are assumed to match, and recorded from then on.

The record is saved before the writer's first file of a run is written (``Recorder``), so a record
exists whenever its outputs do, and a run that fails before its first image leaves none behind.
Adding a format to an existing folder (``-f png`` then ``-f png -f coco``) compares only the writers
that have a record: the PNGs are kept and only the COCO files are made.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from m2f_cli.version import __version__
from m2f_cli.model.startup.fingerprint import file_digest, model_fingerprint
from m2f_cli.errors import SettingsConflict

log = logging.getLogger(__name__)

RECORD_FORMAT = 1  # the layout of the record file itself


@dataclass(frozen=True)
class ModelIdentity:
    """name: as given (hub id or folder); revision/commit: hub revision asked for and resolved;
    fingerprint: content hash of the model folder's JSON and weight files (fingerprint.py)."""

    name: str
    revision: Optional[str]
    commit: Optional[str]
    fingerprint: str

    def as_dict(self) -> dict:
        return {"name": self.name, "revision": self.revision, "commit": self.commit,
                "fingerprint": self.fingerprint}


def model_identity(name: str, local_dir: Optional[str], revision: Optional[str] = None,
                   commit: Optional[str] = None) -> ModelIdentity:
    """The identity of a model folder; a model with no folder (a custom Predictor) is known by name."""
    fp = model_fingerprint(local_dir) if local_dir else f"name:{name}"
    return ModelIdentity(name, revision, commit, fp)


def common_settings(model: ModelIdentity, task: str, resize: str, fast_decode: bool, dtype: str,
                    top_k: int, classes: Optional[Sequence[str]], tile: Optional[dict] = None,
                    frames: Optional[dict] = None) -> dict:
    """What every writer's files depend on. dtype: the resolved name (float32, bfloat16, ...);
    classes: the kept class names, sorted, or None for all; tile: --tile/--tile-full as
    tiling.TileOptions.record() gives them, None without tiles (as in records made before --tile
    existed, which therefore match an untiled rerun); frames: the videos' frame selection
    (video.FrameSelection.record(), None for every frame, as in records made before videos)."""
    return {"model": model.as_dict(), "task": task, "resize": resize, "fast_decode": bool(fast_decode),
            "dtype": dtype, "top_k": int(top_k), "classes": sorted(classes) if classes is not None else None,
            "tile": tile, "frames": frames}


def _option_value(name: str, value: Any) -> Any:
    """How a writer option is recorded: files by content (a moved copy of the same file is the same)."""
    if name == "coco_annotations" and value:
        return {"path": str(value), "digest": file_digest(str(value))}
    return value


def writer_record(writer, common: dict) -> dict:
    """The record of one writer for this run."""
    settings = dict(common)
    settings["threshold"] = round(float(writer.threshold), 6)
    for name in writer.recorded:
        settings[name] = _option_value(name, writer.ctx.options.get(name))
    return {"format": RECORD_FORMAT, "writer": writer.name, "schema": writer.schema, "m2f": __version__,
            "settings": settings}


def _compared(name: str, value: Any) -> Any:
    """The part of a setting that decides equality: content, not where the file was found."""
    if isinstance(value, dict):
        if name == "model":
            return value.get("fingerprint")
        if "digest" in value:
            return value["digest"]
    return value


def _shown(name: str, value: Any) -> str:
    if isinstance(value, dict):
        if name == "model":
            rev = f"@{value['revision']}" if value.get("revision") else ""
            return f"{value.get('name')}{rev} (fingerprint {str(value.get('fingerprint'))[:12]})"
        if "digest" in value:
            return f"{value.get('path')} (content {str(value['digest'])[:12]})"
    return json.dumps(value)


def differences(old: dict, new: dict) -> list[str]:
    """'name: old -> new' for each setting (and the schema) that differs between two records."""
    out = []
    if old.get("schema") != new.get("schema"):
        out.append(f"output schema: {old.get('schema')} -> {new.get('schema')}")
    a, b = old.get("settings", {}), new.get("settings", {})
    for name in sorted(set(a) | set(b), key=lambda n: (n != "model", n)):
        if _compared(name, a.get(name)) != _compared(name, b.get(name)):
            out.append(f"{name}: {_shown(name, a.get(name))} -> {_shown(name, b.get(name))}")
    return out


def record_path(folder, writer_name: str) -> str:
    return f"{folder.state}/{writer_name}.settings.json"


def read_record(folder, writer_name: str) -> Optional[dict]:
    """The saved record of a writer, or None. An unreadable record counts as none, with a warning."""
    path = record_path(folder, writer_name)
    try:
        if not folder.exists(path):
            return None
        return json.loads(folder.read_bytes(path))
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable settings record (%s); treated as missing", path, e)
        return None


def check(folder, writers, records: dict[str, dict], has_outputs, overwrite: bool) -> list[str]:
    """Refuse (SettingsConflict) a rerun whose settings differ from the folder's record.

    records: this run's record per writer name; has_outputs(writer) -> whether any of its files
    exist (asked only for writers without a record). overwrite: outputs are redone, so any
    difference is fine (the new record replaces the old one when the first file is written).
    Returns the writers adopted: outputs without a record, assumed to match (record them now).
    """
    problems = []
    adopted = []
    for w in writers:
        old = read_record(folder, w.name)
        if old is None:
            if not overwrite and has_outputs(w):
                log.warning("%s: %s outputs written by an m2f that kept no settings record; assuming they "
                            "match this run's settings (--overwrite redoes them)", folder.out, w.name)
                adopted.append(w.name)
            continue
        if overwrite:
            continue
        diff = differences(old, records[w.name])
        if diff:
            problems.append(f"{w.name}: " + "; ".join(diff))
    if problems:
        raise SettingsConflict(
            f"{folder.out} holds outputs made with other settings ({' | '.join(problems)}); "
            f"rerun with --overwrite to redo them, or write to another --out")
    return adopted


class Recorder:
    """Saves each writer's record once, just before that writer's first file of this run."""

    def __init__(self, folder, records: dict[str, dict]):
        self.folder = folder
        self.records = records
        self._saved: set[str] = set()
        self._lock = threading.Lock()

    def before_write(self, writer_name: str) -> None:
        if writer_name in self._saved or self.folder is None or writer_name not in self.records:
            return  # (the frames journal, video_resume.FrameLog, has no record)
        with self._lock:
            if writer_name in self._saved:
                return
            data = json.dumps(self.records[writer_name], indent=1, ensure_ascii=False).encode()
            self.folder.write_bytes(record_path(self.folder, writer_name), data)
            self._saved.add(writer_name)
