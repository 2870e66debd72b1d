"""``m2f merge OUT``: combine the part files of ``--shard I/N`` runs into the files one run writes.

Reads ``m2f-run.shard-I-of-N.json`` manifests to find missing or incomplete shards, then writes
predictions.json, predictions_bbox.json, images.json (image ids renumbered 1..n in sorted name
order, as one run over a folder assigns them), predictions.jsonl, failures.jsonl and the CVAT
annotations.xml (images renumbered 0..n-1 in sorted name order), atomically.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from m2f_cli.outputs.folder import OutputFolder
from m2f_cli.outputs.open import open_output
from m2f_cli.errors import MergeError, OutputLockedError, RemoteError
from m2f_cli.inputs.walk import order_key
from m2f_cli.outputs.writers.cvat import read_document, write_document

_PART = re.compile(r"\.shard-(\d+)-of-(\d+)\.")


@dataclass
class MergeReport:
    count: int = 0
    missing: list[int] = field(default_factory=list)
    incomplete: list[int] = field(default_factory=list)
    images: int = 0
    records: int = 0
    written: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.incomplete


def _parts(folder: OutputFolder, names: set[str], stem: str, ext: str, n: int) -> list[tuple[int, str]]:
    """(shard index, path) of the part files of one output that exist."""
    return [(i, folder.join(name)) for i in range(n) if (name := f"{stem}.shard-{i}-of-{n}{ext}") in names]


def merge(out: str) -> MergeReport:
    """Merge the shard part files in out (a local folder or an fsspec URL)."""
    try:
        folder = open_output(out)
    except RemoteError as e:
        raise MergeError(str(e)) from None
    names = set(folder.names())
    counts = {int(m.group(2)) for name in names if (m := _PART.search(name))}
    if not counts:
        raise MergeError(f"{out}: no shard part files (m2f segment --shard I/N writes them)")
    if len(counts) > 1:
        raise MergeError(f"{out}: part files of different shard counts {sorted(counts)}; remove the stale ones")
    n = counts.pop()
    report = MergeReport(count=n)
    for i in range(n):
        manifest = f"m2f-run.shard-{i}-of-{n}.json"
        if manifest not in names:
            report.missing.append(i)
        elif not json.loads(folder.read_bytes(folder.join(manifest))).get("complete"):
            report.incomplete.append(i)

    folder.check_writable()
    try:
        folder.lock()
    except RemoteError as e:
        raise MergeError(str(e)) from None
    shards: list[OutputFolder] = []
    try:
        shards = _lock_shards(out, n)
        _merge_files(folder, names, n, report)
    finally:
        for f in shards:
            f.unlock()
        folder.unlock()
    return report


def _lock_shards(out: str, n: int) -> list[OutputFolder]:
    """Take every shard's lock (<out>/.m2f/lock.shard-I-of-N, the one its run holds): a shard still
    running makes the merge refuse (OutputLockedError, exit 4) instead of merging half its outputs."""
    held: list[OutputFolder] = []
    try:
        for i in range(n):
            f = open_output(out, (i, n))
            try:
                f.lock()
            except OutputLockedError:
                raise OutputLockedError(f"{out}: shard {i}/{n} is still running (it holds its lock); "
                                        f"merge when it has finished") from None
            held.append(f)
    except BaseException:
        for f in held:
            f.unlock()
        raise
    return held


def _merge_files(folder: OutputFolder, names: set[str], n: int, report: MergeReport) -> None:
    def load(path: str):
        return json.loads(folder.read_bytes(path))

    image_parts = _parts(folder, names, "images", ".json", n)
    remap: dict[tuple[int, int], int] = {}  # (shard, id in its part) -> merged id
    if image_parts:
        images = []
        keep_ids = False  # ids from --coco-annotations are the ground truth's: never renumbered
        for k, p in image_parts:
            doc = load(p)
            categories, info = doc["categories"], doc.get("info")
            keep_ids = keep_ids or (info or {}).get("image_ids") == "annotations"
            images += [(order_key(im["file_name"]), k, im) for im in doc["images"]]
        images.sort(key=lambda t: t[0])
        merged_images = []
        for new_id, (_, k, im) in enumerate(images, start=1):
            if not keep_ids:
                remap[(k, im["id"])] = new_id
                im = {**im, "id": new_id}
            merged_images.append(im)
        report.images = len(merged_images)
        doc = {"images": merged_images, "annotations": [], "categories": categories}
        if info is not None:
            doc = {"info": info, **doc}
        folder.write_bytes(folder.join("images.json"), json.dumps(doc, ensure_ascii=False).encode())
        report.written.append("images.json")

    for stem in ("predictions", "predictions_bbox"):
        parts = _parts(folder, names, stem, ".json", n)
        if not parts:
            continue
        recs = []
        for k, p in parts:
            for r in load(p):
                if remap:
                    r["image_id"] = remap[(k, r["image_id"])]
                recs.append(r)
        recs.sort(key=lambda r: (r["image_id"], -r["score"]))
        report.records = len(recs) if stem == "predictions" else report.records
        folder.write_bytes(folder.join(f"{stem}.json"),
                           ("[" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in recs) + "]\n").encode())
        report.written.append(f"{stem}.json")

    for stem in ("predictions", "failures"):
        parts = _parts(folder, names, stem, ".jsonl", n)
        if not parts:
            continue
        lines = []
        for _, p in parts:
            lines += [json.loads(line) for line in folder.read_bytes(p).splitlines() if line.strip()]
        key = "name" if stem == "predictions" else "path"
        lines.sort(key=lambda r: order_key(str(r.get(key, ""))))
        folder.write_bytes(folder.join(f"{stem}.jsonl"),
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode())
        report.written.append(f"{stem}.jsonl")

    cvat_parts = _parts(folder, names, "annotations", ".xml", n)
    if cvat_parts:
        _merge_cvat(folder, [p for _, p in cvat_parts])
        report.written.append("annotations.xml")


def _merge_cvat(folder: OutputFolder, parts: list[str]) -> None:
    """One CVAT XML from the shards' parts: their images in sorted name order, ids 0..n-1, written
    as one run writes it (writers/cvat.py)."""
    labels, records = [], []
    for p in parts:
        labels, recs = read_document(folder.read_bytes(p))
        records += recs
    records.sort(key=lambda r: order_key(r["name"]))

    def write(f):
        write_document(f, labels, enumerate(records), len(records))
    folder.write_atomic(folder.join("annotations.xml"), write)
