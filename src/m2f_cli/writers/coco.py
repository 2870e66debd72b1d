"""``--format coco``: COCO results files for the whole run.

- ``<out>/predictions.json``: the segm results list pycocotools' COCO.loadRes accepts
  ({image_id, category_id, segmentation (RLE, counts str), score}); no bbox in it, so that mask
  area, not box area, decides small/medium/large in COCOeval.
- ``<out>/predictions_bbox.json``: the same detections as boxes ({image_id, category_id, bbox, score}).
- ``<out>/images.json`` (without --coco-annotations): a COCO dataset skeleton (images, categories)
  so the pair loads as a dataset elsewhere.

Records stream into a journal as images finish; the files are rebuilt from it atomically at the end
of every run (interrupted or not), so memory stays flat and resumed runs lose or repeat nothing.
Default score threshold 0: the COCO protocol keeps the top 100 per image.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from ..records import ImageRef, ImageResult
from .base import Writer, register, unique_records

log = logging.getLogger(__name__)


class AnnotationIndex:
    """Image ids by file name from a COCO annotation file: relative path first, then base name."""

    def __init__(self, path: str):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            images = data["images"]
            self.categories = data.get("categories", [])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a COCO annotation file ({e})") from None
        self.by_path: dict[str, int] = {}
        by_base: dict[str, list[int]] = {}
        for im in images:
            fn = str(im["file_name"]).replace("\\", "/")
            self.by_path[fn] = int(im["id"])
            by_base.setdefault(os.path.basename(fn), []).append(int(im["id"]))
        # A base name shared by several annotated images is ambiguous: only full paths match it.
        self.by_base = {k: v[0] for k, v in by_base.items() if len(v) == 1}

    def lookup(self, name: str) -> Optional[int]:
        if name in self.by_path:
            return self.by_path[name]
        return self.by_base.get(os.path.basename(name))


@register
class CocoWriter(Writer):
    name = "coco"
    recorded = ("coco_annotations",)
    help = "<out>/predictions.json (COCO segm results) + predictions_bbox.json + images.json"
    default_threshold = 0.0

    def __init__(self, ctx):
        super().__init__(ctx)
        ann = ctx.options.get("coco_annotations")
        self.index = AnnotationIndex(ann) if ann else None
        self.journal = ctx.folder.journal("coco", fresh=ctx.overwrite)
        self._done: set[str] = set()
        self._next_id = 1
        self._unlisted: set[str] = set()
        for r in self.journal.records():  # every id ever given, also those of dropped records
            self._next_id = max(self._next_id, int(r["image"]["id"]) + 1)
        self._done = {r["rel"] for r in self._records()}

    def _records(self):
        """The journal's records, one per image and per image id (base.unique_records)."""
        return unique_records(self.journal.records(), lambda r: r["image"]["id"])

    def done(self, ref: ImageRef) -> bool:
        if ref.rel in self._done:
            return True
        if self.index is not None and self.index.lookup(ref.name) is None:
            self._report_unlisted(ref)
            return True  # nothing to write for it
        return False

    def _report_unlisted(self, ref: ImageRef) -> None:
        if ref.rel not in self._unlisted:
            self._unlisted.add(ref.rel)
            log.warning("%s: not listed in --coco-annotations; left out of predictions.json", ref.path)

    def write(self, result: ImageResult) -> None:
        ref = result.ref
        if ref.rel in self._done:
            # Already journaled (a run killed between this writer and the next one redoes the image
            # for the others): one record per image, with the id it was given first.
            return
        if self.index is not None:
            image_id = self.index.lookup(ref.name)
            if image_id is None:
                self._report_unlisted(ref)
                return
        else:
            image_id = self._next_id
            self._next_id += 1
        dets = [{"category_id": i.category_id, "score": round(i.score, 6), "segmentation": i.rle,
                 "bbox": list(i.bbox)} for i in result.instances_above(self.threshold)]
        self.journal.append({"rel": ref.rel, "image": {"id": image_id, "file_name": ref.name,
                                                       "width": result.width, "height": result.height},
                             "dets": dets})
        self._done.add(ref.rel)

    def close(self) -> None:
        self.journal.close()
        folder = self.ctx.folder

        def stream(keys: tuple[str, ...]):
            def write(f):
                f.write(b"[")
                first = True
                for r in self._records():
                    iid = r["image"]["id"]
                    for d in r["dets"]:
                        rec = {"image_id": iid, "category_id": d["category_id"]}
                        rec.update({k: d[k] for k in keys})
                        f.write((b"" if first else b",\n") + json.dumps(rec, separators=(",", ":")).encode())
                        first = False
                f.write(b"]\n")
            return write

        folder.write_atomic(folder.run_file("predictions", ".json"), stream(("segmentation", "score")))
        folder.write_atomic(folder.run_file("predictions_bbox", ".json"), stream(("bbox", "score")))
        if self.index is None:
            def images(f):
                f.write(b'{"images":[')
                for n, r in enumerate(self._records()):
                    f.write((b"," if n else b"") + json.dumps(r["image"], ensure_ascii=False).encode())
                f.write(b'],"annotations":[],"categories":')
                f.write(json.dumps(self.ctx.categories.coco_categories()).encode() + b"}\n")
            folder.write_atomic(folder.run_file("images", ".json"), images)
