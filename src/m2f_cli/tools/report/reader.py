"""Reading a run's outputs for ``m2f report``, local or remote, streamed: the per-image records (the
PNG sidecars, else ``predictions.jsonl`` or its shard parts), the failures, the COCO candidates'
scores, the run manifest and the settings records."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from typing import Any, Callable, Iterable, Iterator, Optional

from m2f_cli.errors import ReportError
from m2f_cli.outputs.folder import OutputFolder
from m2f_cli.outputs.remote import RemoteOutputFolder
from m2f_cli.tools.report.records import ImageRecord, record_of
from m2f_cli.tools.report.stats import SCORE_BINS, Candidates, score_bin

REPORT_DIR = "report"      # the report's folder in OUT, skipped when the outputs are read
FAILURE_ROWS = 1000        # failures listed in the page; all of them stay in failures.jsonl
FETCH_BATCH = 64           # remote sidecars fetched per concurrent request round


class Reader:
    """Listing and streaming reads of OUT, local or remote, through its OutputFolder."""

    def __init__(self, folder: OutputFolder):
        self.folder = folder
        self.remote = isinstance(folder, RemoteOutputFolder)
        self._listing: Optional[set] = None

    def listing(self) -> set:
        """Remote only: every object under OUT (fs paths), listed once."""
        if self._listing is None:
            f = self.folder
            try:
                self._listing = set(f.fs.find(f.root))
            except FileNotFoundError:
                self._listing = set()
        return self._listing

    def exists(self, path: str) -> bool:
        if self.remote:
            return self.folder._p(path) in self.listing()
        return os.path.exists(path)

    def read(self, path: str) -> Optional[bytes]:
        if not self.exists(path):
            return None
        return self.folder.read_bytes(path)

    def lines(self, path: str) -> Iterator[bytes]:
        """The lines of a file, streamed (not read whole)."""
        if not self.exists(path):
            return
        if self.remote:
            with self.folder.fs.open(self.folder._p(path), "rb") as f:
                yield from f
        else:
            with open(path, "rb") as f:
                yield from f

    def json_lines(self, names: list[str]) -> Iterator[tuple[bytes, Any]]:
        """(line, parsed JSON) of every line of these files in OUT that parses (streamed); blank
        and torn lines are skipped."""
        for name in names:
            for line in self.lines(self.folder.join(name)):
                if not line.strip():
                    continue
                try:
                    yield line, json.loads(line)
                except ValueError:
                    continue

    def top_names(self) -> list[str]:
        return self.folder.names()

    def state_names(self) -> list[str]:
        """Names of the files in OUT/.m2f/."""
        f = self.folder
        if self.remote:
            prefix = f._p(f.state).rstrip("/") + "/"
            return sorted(p[len(prefix):] for p in self.listing()
                          if p.startswith(prefix) and "/" not in p[len(prefix):])
        try:
            return sorted(e.name for e in os.scandir(f.state) if e.is_file())
        except OSError:
            return []

    def sidecars(self) -> Iterator[tuple[str, bytes]]:
        """(rel, sidecar bytes) for every <rel>.json with a <rel>.png beside it, outside report/
        and hidden folders (.m2f/). Local folders are walked with scandir, never listed whole."""
        if self.remote:
            yield from self._remote_sidecars()
            return
        root = self.folder.out
        stack = [""]
        while stack:
            sub = stack.pop()
            d = os.path.join(root, sub) if sub else root
            try:
                it = os.scandir(d)
            except OSError:
                continue
            with it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    rel = f"{sub}/{e.name}" if sub else e.name
                    if e.is_dir(follow_symlinks=False):
                        if rel != REPORT_DIR:
                            stack.append(rel)
                    elif e.name.endswith(".json") and os.path.exists(e.path[:-5] + ".png"):
                        try:
                            with open(e.path, "rb") as f:
                                yield rel[:-5], f.read()
                        except OSError:
                            continue

    def _remote_sidecars(self) -> Iterator[tuple[str, bytes]]:
        f = self.folder
        root = f.root.rstrip("/") + "/"
        listing = self.listing()
        keys = []
        for p in sorted(listing):
            rel = p[len(root):]
            if not p.startswith(root) or not rel.endswith(".json") or rel.startswith(REPORT_DIR + "/"):
                continue
            if any(part.startswith(".") for part in rel.split("/")) or p[:-5] + ".png" not in listing:
                continue
            keys.append((rel[:-5], p))
        for i in range(0, len(keys), FETCH_BATCH):
            batch = keys[i:i + FETCH_BATCH]
            data = f.fs.cat([p for _, p in batch])  # one concurrent round on async backends
            for rel, p in batch:
                yield rel, data[p]


def _is_image_doc(doc) -> bool:
    return isinstance(doc, dict) and "width" in doc and ("instances" in doc or "segments_info" in doc)


def _part_names(names: Iterable[str], stem: str, ext: str) -> list[str]:
    """<stem><ext> if present, else its shard parts <stem>.shard-I-of-N<ext> in shard order."""
    names = list(names)
    if stem + ext in names:
        return [stem + ext]
    parts = [n for n in names if n.startswith(stem + ".shard-") and n.endswith(ext)]

    def index(n: str) -> tuple:
        mid = n[len(stem) + len(".shard-"):-len(ext)].split("-of-")
        return tuple(int(x) if x.isdigit() else 0 for x in mid)
    return sorted(parts, key=index)


def iter_records(reader: Reader) -> tuple[str, Iterator[ImageRecord]]:
    """(source, records): the sidecars when OUT has any, else predictions.jsonl (or its parts)."""
    first = None
    side = reader.sidecars()
    for rel, data in side:
        try:
            doc = json.loads(data)
        except ValueError:
            continue
        if _is_image_doc(doc):
            first = (rel, data, doc)
            break
    if first is not None:
        def from_sidecars() -> Iterator[ImageRecord]:
            rel, data, doc = first
            yield record_of(doc, rel, _digest(data), True)
            for rel, data in side:
                try:
                    doc = json.loads(data)
                except ValueError:
                    continue
                if _is_image_doc(doc):
                    yield record_of(doc, rel, _digest(data), True)
        return "sidecars", from_sidecars()
    parts = _part_names(reader.top_names(), "predictions", ".jsonl")
    if not parts:
        raise ReportError(f"{reader.folder.out}: no outputs to report on: no <name>.json sidecars "
                          "(--format png) and no predictions.jsonl (--format jsonl)")

    def from_jsonl() -> Iterator[ImageRecord]:
        for line, doc in reader.json_lines(parts):
            if _is_image_doc(doc):
                rel = posixpath.splitext(str(doc.get("name", "")))[0] or str(doc.get("image", ""))
                yield record_of(doc, rel, _digest(line), False)
    return "jsonl", from_jsonl()


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=5).hexdigest()


def read_failures(reader: Reader, on_failure: Callable[[dict], None]) -> tuple[int, dict, list, list]:
    """Stream failures.jsonl (or its shard parts): (count, count per stage, first FAILURE_ROWS,
    the names of the files read)."""
    n, stages, rows = 0, {}, []
    names = _part_names(reader.top_names(), "failures", ".jsonl")
    for _, f in reader.json_lines(names):
        f = {"path": str(f.get("path", "")), "stage": str(f.get("stage", "")), "error": str(f.get("error", ""))}
        n += 1
        stages[f["stage"]] = stages.get(f["stage"], 0) + 1
        if len(rows) < FAILURE_ROWS:
            rows.append(f)
        on_failure(f)
    return n, stages, rows, names


_CATEGORY = re.compile(rb'"category_id":\s*(-?\d+)')
_SCORE = re.compile(rb'"score":\s*([0-9.eE+-]+)')


def read_candidates(reader: Reader) -> Optional[Candidates]:
    """Stream predictions_bbox.json (or its shard parts), one detection per line as the coco writer
    writes it; the box file rather than predictions.json, whose lines carry the masks. The two
    fields are found by pattern: a JSON parse per detection costs 10x more, and nothing else on a
    line of that file can spell "score": or "category_id":."""
    names = _part_names(reader.top_names(), "predictions_bbox", ".json")
    if not names:
        return None
    c = Candidates()
    for name in names:
        for line in reader.lines(reader.folder.join(name)):
            cm, sm = _CATEGORY.search(line), _SCORE.search(line)
            if cm is None or sm is None:
                continue
            try:
                b = score_bin(float(sm.group(1)))
            except ValueError:
                continue
            cid = int(cm.group(1))
            hist = c.per_class.get(cid)
            if hist is None:
                hist = c.per_class[cid] = [0] * SCORE_BINS
            hist[b] += 1
            c.scores[b] += 1
            c.count += 1
    return c


def read_manifest(reader: Reader) -> Optional[dict]:
    """m2f-run.json, or the shard manifests summed (wall time: the longest shard)."""
    names = _part_names(reader.top_names(), "m2f-run", ".json")
    docs = []
    for name in names:
        try:
            docs.append(json.loads(reader.read(reader.folder.join(name)) or b""))
        except ValueError:
            continue
    if not docs:
        return None
    if len(docs) == 1 and len(names) == 1 and names[0] == "m2f-run.json":
        return docs[0]
    total = {"shards": len(docs), "formats": docs[0].get("formats")}
    for k in ("total", "images", "skipped", "failed", "instances"):
        total[k] = sum(int(d.get(k) or 0) for d in docs)
    total["wall_s"] = max(float(d.get("wall_s") or 0) for d in docs)
    total["images_per_s"] = sum(float(d.get("images_per_s") or 0) for d in docs)
    total["interrupted"] = next((d.get("interrupted") for d in docs if d.get("interrupted")), None)
    total["stopped_early"] = any(d.get("stopped_early") for d in docs)
    total["complete"] = all(d.get("complete") for d in docs)
    stages: dict = {}
    for d in docs:
        for k, v in (d.get("stages") or {}).items():
            stages[k] = stages.get(k, 0.0) + float(v)
    total["stages"] = stages
    return total


def read_settings(reader: Reader) -> dict:
    """{writer: settings record} from OUT/.m2f/<writer>.settings.json (absent in older runs)."""
    out = {}
    for name in reader.state_names():
        if not name.endswith(".settings.json"):
            continue
        try:
            doc = json.loads(reader.read(reader.folder.state + "/" + name) or b"")
        except ValueError:
            continue
        if isinstance(doc, dict):
            out[str(doc.get("writer") or name[:-len(".settings.json")])] = doc
    return out
