"""``m2f report OUT``: one static page about a run, built from what the run left in ``OUT``.

``build_report(out)`` writes ``OUT/report/index.html`` (plus ``thumbs/``, ``overlays/`` and
``no_instances.txt`` next to it) without running the model, for a finished or interrupted run, local
or remote (fsspec URL) ``--out``. The page needs nothing but the files beside it: no server, no CDN,
plots are inline SVG (report_html.py), the filters a few lines of inline JavaScript.

Streaming, so memory stays flat in the number of images:
- one pass over the per-image records: the PNG sidecars (``<name>.json`` next to ``<name>.png``),
  or, for runs without ``--format png``, ``predictions.jsonl`` (or its shard parts);
- only counters and fixed-bin histograms are kept (per class: count, images, score histogram), plus
  a bounded **sample** for the gallery: the images of smallest hash of their name (bottom-k), ``gallery``
  of them over all images and ``per_stratum`` in each stratum (each class, each score band of 0.1,
  images with no instance, failed inputs). Hash order makes the sample deterministic and lets strata
  share images, so the gallery of a million-image run is a few hundred cards and the page opens at once;
- thumbnails (at most ``thumb_px`` on a side, lazy-loaded) are drawn for the sampled images only: from
  the run's overlay when there is one, else an overlay is drawn into ``report/overlays/`` from the PNG
  map, the sidecar and the input image with writers/overlay.render_overlay (the overlay writer's own
  drawing). Files are named by a digest of the record they show, so a rebuilt report reuses them.

Remote folders: the listing of OUT (names only) is held in memory; sidecars are fetched 64 at a time.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import math
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

from m2f_cli.tools.report_html import AREA_DECADES, AREA_PER_DECADE, COUNT_BINS, SCORE_BINS, render_page
from m2f_cli.outputs.folder import OutputFolder, open_output
from m2f_cli.outputs.remote import RemoteOutputFolder
from m2f_cli.urls import is_url, local_path
from m2f_cli.errors import RemoteError, ReportError, one_line

REPORT_DIR = "report"
FAILURE_ROWS = 1000        # failures listed in the page; all of them stay in failures.jsonl
MAX_MODELS = 20            # distinct model ids counted (a folder normally has one)
FETCH_BATCH = 64           # remote sidecars fetched per concurrent request round
OVERLAY_MAX_PX = 1600      # longest side of the overlays the report draws itself (drawn_size)

Progress = Callable[[str, int, Optional[int]], None]
"""progress(phase, done, total): phase "read" (total unknown) or "draw" (total known)."""


@dataclass
class ReportSummary:
    """What build_report wrote. index: the page (a path, or a URL for remote OUT)."""

    index: str
    source: str
    images: int
    instances: int
    no_instance: int
    failed: int
    gallery: int
    drawn: int
    seconds: float

    def line(self) -> str:
        return (f"{self.index}: {self.images} images, {self.instances} instances, {self.no_instance} with "
                f"none, {self.failed} failed; gallery of {self.gallery} ({self.drawn} thumbnails drawn) "
                f"in {self.seconds:.1f} s")


# ---------------------------------------------------------------------------------------------
# Per-image records and aggregate statistics


@dataclass
class Item:
    """One instance (or panoptic/semantic segment) of an image, as the outputs describe it."""

    id: int
    label: str
    category_id: int
    score: Optional[float]
    area: int
    bbox: tuple
    isthing: bool = True


@dataclass
class ImageRecord:
    """One image's outputs. digest: of the bytes the record came from (names its thumbnail)."""

    rel: str
    name: str
    path: str
    width: int
    height: int
    task: str
    model: Optional[str]
    revision: Optional[str]
    threshold: Optional[float]
    items: list
    digest: str
    has_map: bool


def _items(doc: dict) -> list:
    raw = doc.get("instances")
    if raw is None:
        raw = doc.get("segments_info") or []
    out = []
    for i in raw:
        score = i.get("score")
        out.append(Item(int(i.get("id", 0)), str(i.get("label", "?")), int(i.get("category_id", 0)),
                        None if score is None else float(score), int(i.get("area", 0)),
                        tuple(i.get("bbox") or (0, 0, 0, 0)), bool(i.get("isthing", True))))
    return out


def record_of(doc: dict, rel: str, digest: str, has_map: bool) -> ImageRecord:
    """An ImageRecord from a sidecar or a JSON Lines record (the same keys, README "Outputs")."""
    return ImageRecord(rel=rel, name=str(doc.get("name", rel)), path=str(doc.get("image", "")),
                       width=int(doc.get("width", 0)), height=int(doc.get("height", 0)),
                       task=str(doc.get("task", "instance")), model=doc.get("model"),
                       revision=doc.get("revision"), threshold=doc.get("threshold"), items=_items(doc),
                       digest=digest, has_map=has_map)


@dataclass
class ClassStats:
    count: int = 0
    images: int = 0
    score_sum: float = 0.0
    scored: int = 0
    scores: list = field(default_factory=lambda: [0] * SCORE_BINS)
    category_id: int = 0


def _area_bin(area: int, image_area: int) -> int:
    """Bin of log10(area / image_area) over [-AREA_DECADES, 0]; tinier masks go to bin 0."""
    if area <= 0 or image_area <= 0:
        return 0
    x = math.log10(min(1.0, area / image_area))
    return max(0, min(AREA_DECADES * AREA_PER_DECADE - 1, int((x + AREA_DECADES) * AREA_PER_DECADE)))


def score_bin(score: float, bins: int = SCORE_BINS) -> int:
    return max(0, min(bins - 1, int(score * bins)))


@dataclass
class Stats:
    """Counters and fixed-bin histograms over every image: constant memory per image."""

    images: int = 0
    instances: int = 0
    no_instance: int = 0
    classes: dict = field(default_factory=dict)        # label -> ClassStats
    per_image: list = field(default_factory=lambda: [0] * COUNT_BINS)
    areas: list = field(default_factory=lambda: [0] * (AREA_DECADES * AREA_PER_DECADE))
    coco_sizes: dict = field(default_factory=lambda: {"small": 0, "medium": 0, "large": 0})
    scores: list = field(default_factory=lambda: [0] * SCORE_BINS)
    models: dict = field(default_factory=dict)          # (model, revision) -> images
    tasks: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)

    def add(self, r: ImageRecord) -> None:
        self.images += 1
        n = len(r.items)
        self.instances += n
        self.no_instance += n == 0
        self.per_image[min(n, COUNT_BINS - 1)] += 1
        key = (r.model, r.revision)
        if key in self.models or len(self.models) < MAX_MODELS:
            self.models[key] = self.models.get(key, 0) + 1
        self.tasks[r.task] = self.tasks.get(r.task, 0) + 1
        if r.threshold is not None:
            self.thresholds[r.threshold] = self.thresholds.get(r.threshold, 0) + 1
        image_area = r.width * r.height
        seen = set()
        for i in r.items:
            c = self.classes.get(i.label)
            if c is None:
                c = self.classes[i.label] = ClassStats(category_id=i.category_id)
            c.count += 1
            if i.label not in seen:
                seen.add(i.label)
                c.images += 1
            if i.score is not None:
                b = score_bin(i.score)
                c.scores[b] += 1
                self.scores[b] += 1
                c.score_sum += i.score
                c.scored += 1
            self.areas[_area_bin(i.area, image_area)] += 1
            # COCOeval's size ranges (pixels): small < 32^2 <= medium < 96^2 <= large
            size = "small" if i.area < 32 ** 2 else "medium" if i.area < 96 ** 2 else "large"
            self.coco_sizes[size] += 1


# ---------------------------------------------------------------------------------------------
# The gallery sample


def name_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


class Sampler:
    """Bottom-k sampling per stratum: each stratum keeps the k entries of smallest hash.

    Entries are stored once however many strata hold them and dropped when none does, so memory
    is bounded by the sum of the ks whatever the number of images.
    """

    def __init__(self, sizes: Callable[[str], int]):
        self.sizes = sizes
        self.heaps: dict[str, list] = {}     # stratum -> max-heap of (-hash, key)
        self.entries: dict[str, list] = {}   # key -> [card, number of strata holding it]

    def offer(self, key: str, strata: Iterable[str], card: Callable[[], dict]) -> None:
        h = name_hash(key)
        for s in strata:
            k = self.sizes(s)
            heap = self.heaps.setdefault(s, [])
            if k <= 0 or (len(heap) >= k and h >= -heap[0][0]):
                continue
            if key in self.entries:
                if any(e[1] == key for e in heap):  # offered twice for one stratum: once is enough
                    continue
                self.entries[key][1] += 1
            else:
                self.entries[key] = [card(), 1]
            heapq.heappush(heap, (-h, key))
            if len(heap) > k:
                _, dropped = heapq.heappop(heap)
                e = self.entries[dropped]
                e[1] -= 1
                if e[1] == 0:
                    del self.entries[dropped]

    def cards(self) -> list[dict]:
        return [e[0] for e in self.entries.values()]


def strata_of(r: ImageRecord) -> list[str]:
    """The strata an image counts in: all, each of its classes, each score band, no instance."""
    s = ["all"] + sorted({f"class:{i.label}" for i in r.items})
    s += sorted({f"score:{score_bin(i.score, 10)}" for i in r.items if i.score is not None})
    if not r.items:
        s.append("empty")
    return s


def card_of(r: ImageRecord) -> dict:
    """What the gallery and the thumbnail drawing need of one sampled image (no masks)."""
    return {"rel": r.rel, "name": r.name, "path": r.path, "width": r.width, "height": r.height,
            "task": r.task, "threshold": r.threshold, "digest": r.digest, "has_map": r.has_map,
            "items": r.items, "failed": None}


# ---------------------------------------------------------------------------------------------
# Reading OUT


class _Reader:
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


def iter_records(reader: _Reader) -> tuple[str, Iterator[ImageRecord]]:
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


def read_failures(reader: _Reader, on_failure: Callable[[dict], None]) -> tuple[int, dict, list, list]:
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


@dataclass
class Candidates:
    """Scores of every detection in the COCO results (kept down to the coco writer's threshold,
    0 by default): where the map threshold could go. per_class: category id -> score histogram."""

    count: int = 0
    scores: list = field(default_factory=lambda: [0] * SCORE_BINS)
    per_class: dict = field(default_factory=dict)


def read_candidates(reader: _Reader) -> Optional[Candidates]:
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


def read_manifest(reader: _Reader) -> Optional[dict]:
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


def read_settings(reader: _Reader) -> dict:
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


# ---------------------------------------------------------------------------------------------
# Thumbnails and overlays


class _Palette:
    """The overlay writer's colours (categories.py: stable per category id), without the model's
    category table: a sidecar names each instance's category id and label."""

    def by_id(self, category_id: int):
        from m2f_cli.model.categories import Category, _color
        return Category(0, category_id, "", _color(category_id))


def drawn_size(width: int, height: int) -> tuple[int, int]:
    """The size the report draws an overlay at: the image's, scaled down to OVERLAY_MAX_PX on its
    longest side (a 12 MP photo costs ~1 s to draw at full size, for a page that shows 200 px)."""
    scale = min(1.0, OVERLAY_MAX_PX / max(1, width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _result_from_card(card: dict, label_map):
    """An ImageResult rebuilt from a sampled sidecar, at label_map's size (masks come from the PNG
    map, not RLE; boxes are scaled with it, for the tags)."""
    from m2f_cli.records import ImageRef, ImageResult, Instance, Segment
    ref = ImageRef(card["path"], card["name"], card["rel"], 0)
    h, w = label_map.shape
    sx, sy = w / max(1, card["width"]), h / max(1, card["height"])

    def box(b):
        b = (list(b) + [0, 0, 0, 0])[:4]
        return (round(b[0] * sx), round(b[1] * sy), round(b[2] * sx), round(b[3] * sy))
    items = card["items"]
    if card["task"] == "instance":
        inst = [Instance(i.id, i.label, i.category_id, -1, i.score or 0.0, box(i.bbox), i.area, {}) for i in items]
        return ImageResult(ref, w, h, inst, label_map, map_threshold=float(card["threshold"] or 0.0))
    segs = [Segment(i.id, i.label, i.category_id, -1, i.isthing, i.score, i.area, box(i.bbox)) for i in items]
    return ImageResult(ref, w, h, [], label_map, map_threshold=0.0, task=card["task"], segments=segs)


class _Draft:
    """decode()'s DraftTarget: JPEGs decode at the smallest 1/2^k scale that covers (w, h)."""

    def __init__(self, w: int, h: int):
        self.w, self.h = w, h

    def draft_size(self, h: int, w: int) -> tuple[int, int]:
        return self.w, self.h


def _input_rgb(card: dict, size: tuple[int, int]):
    """The input image at size (w, h), or None when it moved, cannot be read, or is not the image
    of the record any more (another size)."""
    from PIL import Image
    from m2f_cli.errors import DecodeError
    from m2f_cli.inputs.decode import decode
    full = (card["width"], card["height"])
    try:
        img = decode(card["path"], max_pixels=None, draft=None if size == full else _Draft(*size))
    except (DecodeError, OSError, ValueError):
        return None
    if (img.width, img.height) != full:
        return None
    if img.rgb.shape[:2] == (size[1], size[0]):
        return img.rgb
    import numpy as np
    return np.asarray(Image.fromarray(img.rgb).resize(size, Image.Resampling.BILINEAR))


def _gray(size: tuple[int, int]):
    import numpy as np
    return np.full((size[1], size[0], 3), 96, np.uint8)


def _jpeg(img, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class _Drawer:
    """Thumbnails (and overlays where the run drew none) for the sampled cards."""

    def __init__(self, folder: OutputFolder, reader: _Reader, thumb_px: int):
        self.folder, self.reader, self.thumb_px = folder, reader, thumb_px
        self.report = folder.join(REPORT_DIR)
        self.drawn = 0
        self._lock = threading.Lock()  # draw() runs in a thread pool

    def _report_path(self, *parts: str) -> str:
        return self.report + "/" + "/".join(parts) if self.reader.remote else os.path.join(self.report, *parts)

    def run_overlay(self, rel: str) -> Optional[str]:
        for ext in (".overlay.jpg", ".overlay.png"):
            p = self.folder.path(rel, ext)
            if self.reader.exists(p):
                return ext
        return None

    def draw(self, card: dict) -> None:
        """Set card["thumb"] and card["full"] (paths relative to report/), drawing what is missing."""
        from PIL import Image
        rel, digest = card["rel"], card["digest"]
        thumb_rel = f"thumbs/{rel}.{digest}.jpg"
        thumb = self._report_path("thumbs", f"{rel}.{digest}.jpg")
        ext = self.run_overlay(rel)
        card["note"] = None
        if ext is not None:
            card["full"] = "../" + rel + ext
            if not self.reader.exists(thumb):
                img = Image.open(io.BytesIO(self.folder.read_bytes(self.folder.path(rel, ext))))
                img.draft("RGB", (self.thumb_px, self.thumb_px))  # JPEG: decode at a reduced scale
                self._save_thumb(img, thumb)
            card["thumb"] = thumb_rel
            return
        full_rel = f"overlays/{rel}.{digest}.jpg"
        full = self._report_path("overlays", f"{rel}.{digest}.jpg")
        card["full"] = full_rel
        card["thumb"] = thumb_rel
        notes = [] if card["has_map"] else ["boxes only (no PNG maps)"]
        if not (self.reader.exists(full) and self.reader.exists(thumb)):
            rgb = _input_rgb(card, drawn_size(card["width"], card["height"]))
            if rgb is None:
                notes.append("input image not found or changed: drawn on grey")
            img = self._render(card, rgb, notes)
            self.folder.write_bytes(full, _jpeg(img, 90))
            self._save_thumb(img, thumb)
        elif not is_url(card["path"]) and not os.path.exists(local_path(card["path"])):
            notes.append("input image not found: drawn on grey")  # as it was when drawn
        card["note"] = "; ".join(notes) or None

    def _render(self, card: dict, rgb, notes: list):
        """The overlay of a card at drawn_size: masks from the PNG map (the overlay writer's
        drawing), or, for JSON Lines records, boxes; on grey without the input image."""
        from PIL import Image, ImageDraw
        size = drawn_size(card["width"], card["height"])
        base = _gray(size) if rgb is None else rgb
        if card["has_map"]:
            import numpy as np
            from m2f_cli.outputs.writers.overlay import render_overlay
            data = self.folder.read_bytes(self.folder.path(card["rel"], ".png"))
            png = Image.open(io.BytesIO(data))
            if png.size != (card["width"], card["height"]):
                notes.append("instance map of another size: not drawn")
                label_map = np.zeros((size[1], size[0]), np.uint16)
            else:
                if png.size != size:
                    png = png.resize(size, Image.Resampling.NEAREST)  # ids stay ids
                label_map = np.asarray(png)
            return render_overlay(base, _result_from_card(card, label_map), _Palette())
        img = Image.fromarray(base)
        draw = ImageDraw.Draw(img)
        pal = _Palette()
        s = size[0] / max(1, card["width"])
        for i in card["items"]:
            x, y, w, h = [v * s for v in (list(i.bbox) + [0, 0, 0, 0])[:4]]
            draw.rectangle([x, y, x + w, y + h], outline=pal.by_id(i.category_id).color,
                           width=max(1, round(min(img.size) / 200)))
        return img

    def _save_thumb(self, img, path: str) -> None:
        img = img.convert("RGB")
        img.thumbnail((self.thumb_px, self.thumb_px))
        self.folder.write_bytes(path, _jpeg(img, 80))
        with self._lock:
            self.drawn += 1


# ---------------------------------------------------------------------------------------------
# The whole report


def build_report(out: str, *, gallery: int = 240, per_stratum: int = 12, thumb_px: int = 320,
                 workers: Optional[int] = None, progress: Optional[Progress] = None) -> ReportSummary:
    """Write OUT/report/index.html for the run in out (a folder or an fsspec URL).

    gallery: images sampled over the whole run; per_stratum: images sampled in each class, each
    score band, among images with no instance and among failed inputs (0 turns strata off).
    thumb_px: the longest side of a thumbnail. workers: threads drawing thumbnails (default: cores).
    Raises ReportError when OUT holds no outputs, OutputError when report/ cannot be written.
    """
    t0 = time.perf_counter()
    progress = progress or (lambda phase, done, total: None)
    try:
        folder = open_output(out)
    except RemoteError as e:
        raise ReportError(str(e)) from None
    reader = _Reader(folder)
    if not reader.remote and not os.path.isdir(folder.out):
        raise ReportError(f"{out}: no such folder")

    sizes = {"all": gallery, "failed": 2 * per_stratum, "empty": 2 * per_stratum}
    sampler = Sampler(lambda s: sizes.get(s, per_stratum))
    stats = Stats()
    manifest = read_manifest(reader)
    settings = read_settings(reader)

    # Our own staging area: a run starting meanwhile empties .m2f/tmp (outputs/local.py), never this.
    staging = tempfile.mkdtemp(prefix="m2f-report-")
    folder.tmp = staging if reader.remote else os.path.join(folder.out, REPORT_DIR,
                                                              f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(folder.tmp, exist_ok=True)
        empty_list = os.path.join(staging, "no_instances.txt")
        source, records = iter_records(reader)
        with open(empty_list, "wb") as empties:
            for n, r in enumerate(records, 1):
                stats.add(r)
                if not r.items:
                    empties.write(r.rel.encode("utf-8", "surrogateescape") + b"\n")
                sampler.offer(r.rel, strata_of(r), lambda r=r: card_of(r))
                if n % 500 == 0:
                    progress("read", n, None)
        progress("read", stats.images, stats.images)

        def failed_card(f: dict) -> None:
            sampler.offer("failed:" + f["path"], ["failed"],
                          lambda: {"rel": f["path"], "name": f["path"], "failed": f, "items": []})
        failed, failed_stages, failure_rows, failure_files = read_failures(reader, failed_card)

        candidates = read_candidates(reader)
        cards = sorted(sampler.cards(), key=lambda c: (c["failed"] is not None, c["rel"]))
        drawer = _Drawer(folder, reader, thumb_px)
        to_draw = [c for c in cards if c["failed"] is None]
        done = 0
        from PIL import Image
        pixel_limit = Image.MAX_IMAGE_PIXELS  # decode() lifts it while it reads: concurrent calls could leave it lifted
        try:
            with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
                for c, err in zip(to_draw, pool.map(_safe(drawer.draw), to_draw)):
                    if err:
                        c["thumb"] = c["full"] = None
                        c["note"] = f"not drawn: {err}"
                    done += 1
                    if done % 20 == 0:
                        progress("draw", done, len(to_draw))
        finally:
            Image.MAX_IMAGE_PIXELS = pixel_limit
        progress("draw", len(to_draw), len(to_draw))
        if not reader.remote:
            _prune(os.path.join(folder.out, REPORT_DIR), {c[k] for c in to_draw for k in ("thumb", "full") if c.get(k)})

        with open(empty_list, "rb") as src:
            folder.write_atomic(_join(reader, folder, "no_instances.txt"), lambda f: shutil.copyfileobj(src, f))
        page = render_page(out=out, source=source, stats=stats, manifest=manifest, settings=settings,
                           cards=cards, failed=failed, failed_stages=failed_stages, failure_rows=failure_rows,
                           failure_files=failure_files, candidates=candidates,
                           sample_sizes={"gallery": gallery, "per_stratum": per_stratum})
        index = _join(reader, folder, "index.html")
        folder.write_bytes(index, page.encode("utf-8"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not reader.remote:
            shutil.rmtree(folder.tmp, ignore_errors=True)
    return ReportSummary(index=index, source=source, images=stats.images, instances=stats.instances,
                         no_instance=stats.no_instance, failed=failed, gallery=len(cards), drawn=drawer.drawn,
                         seconds=time.perf_counter() - t0)


def _prune(report_dir: str, keep: set) -> None:
    """Remove the thumbnails and drawn overlays of earlier builds that this page no longer shows,
    so that report/ stays as bounded as the sample (local folders; remote ones keep theirs)."""
    for sub in ("thumbs", "overlays"):
        top = os.path.join(report_dir, sub)
        for dirpath, dirnames, filenames in os.walk(top, topdown=False):
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), report_dir).replace(os.sep, "/")
                if rel not in keep:
                    try:
                        os.remove(os.path.join(dirpath, name))
                    except OSError:
                        pass
            if dirpath != top:
                try:
                    os.rmdir(dirpath)  # only when empty
                except OSError:
                    pass


def _join(reader: _Reader, folder: OutputFolder, name: str) -> str:
    return folder.join(f"{REPORT_DIR}/{name}") if reader.remote else os.path.join(folder.out, REPORT_DIR, name)


def _safe(fn: Callable[[dict], None]) -> Callable[[dict], Optional[str]]:
    """fn(card) -> None on success, else the first line of its error: one bad image (a damaged
    map, an unreadable overlay) costs its thumbnail, not the report."""
    def call(card: dict) -> Optional[str]:
        try:
            fn(card)
            return None
        except Exception as e:  # noqa: BLE001 - PIL, numpy and fsspec backends raise their own types
            return one_line(e)
    return call
