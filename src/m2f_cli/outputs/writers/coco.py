"""``--format coco``: COCO results files for the whole run.

- ``<out>/predictions.json``: the segm results list pycocotools' COCO.loadRes accepts
  ({image_id, category_id, segmentation (RLE, counts str), score}); no bbox in it, so that mask
  area, not box area, decides small/medium/large in COCOeval.
- ``<out>/predictions_bbox.json``: the same detections as boxes ({image_id, category_id, bbox, score}).
- ``<out>/images.json``: a COCO dataset skeleton (images, categories) so the pair loads as a
  dataset elsewhere, and so ``m2f eval`` knows every image of the run (those with no detection too)
  and matches them to a ground truth by file name. With --coco-annotations it carries the file's
  image ids and categories.

With --coco-annotations, image ids come from the file (matched by file name) and category ids
from its categories, matched to the model's classes by name: a fine-tuned model whose ids are
index + 1 then writes the file's ids. A file none of whose categories is a class of the model is
refused; detections of classes the file does not have are left out (with a warning).

Records stream into a journal as images finish; the files are rebuilt from it atomically at the end
of every run (interrupted or not), so memory stays flat and resumed runs lose or repeat nothing.
Default score threshold 0: the COCO protocol keeps the top 100 per image.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from m2f_cli.model.categories import CategoryTable, canonical_name
from m2f_cli.records import ImageRef, ImageResult
from m2f_cli.outputs.writers.base import Writer, register, unique_records

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

    def category_map(self, model: CategoryTable, path: str) -> Optional[dict[int, int]]:
        """Model category id -> the file's category id, matched by name; None when the file lists no
        categories (ids are then the model's). Raises ValueError when no name matches at all."""
        if not self.categories:
            return None
        try:
            by_name = {canonical_name(str(c["name"])): int(c["id"]) for c in self.categories}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"--coco-annotations {path}: unreadable categories ({e})") from None
        mapping = {c.id: by_name[canonical_name(c.name)] for c in model.categories
                   if canonical_name(c.name) in by_name}
        if not mapping:
            raise ValueError(
                f"--coco-annotations {path}: none of its categories ({_names(self.categories)}) is a class "
                f"of the model ({_names([{'name': c.name} for c in model.categories])}); "
                f"evaluate against a file made for this model")
        moved = sum(1 for a, b in mapping.items() if a != b)
        if moved:
            log.warning("--coco-annotations %s: %d classes have other ids there; its ids are written", path, moved)
        missing = [c.name for c in model.categories if c.id not in mapping]
        if missing:
            log.warning("--coco-annotations %s: %d model classes are not among its categories (%s); "
                        "their detections are left out of the results", path, len(missing),
                        ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""))
        return mapping


def _names(cats: list, n: int = 6) -> str:
    names = [str(c.get("name")) for c in cats]
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


class JournaledImagesWriter(Writer):
    """What the run-level COCO files (instance results here, panoptic results in panoptic.py)
    share: a journal of one record per image ({"rel", "image": {id, file_name, width, height,
    video fields}, ...}) that the files are rebuilt from at the end of every run; image ids from
    --coco-annotations (images it does not list are left out, with one warning each) or given in
    order by the run, never repeated across resumed runs (every id ever journaled counts)."""

    name = "coco"       # --format coco, for instance and panoptic models
    recorded = ("coco_annotations",)
    default_threshold = 0.0
    journal_name = ""   # the journal's name in the output folder
    results_file = ""   # the file the unlisted-image warning names

    def __init__(self, ctx):
        super().__init__(ctx)
        ann = ctx.options.get("coco_annotations")
        self.index = AnnotationIndex(ann) if ann else None
        self.cat_map = self.index.category_map(ctx.categories, ann) if self.index is not None else None
        self.journal = ctx.folder.journal(self.journal_name, fresh=ctx.overwrite)
        self._next_id = 1
        self._unlisted: set[str] = set()
        for r in self.journal.records():  # every id ever given, also those of dropped records
            self._next_id = max(self._next_id, int(r["image"]["id"]) + 1)
        self._done = {r["rel"] for r in self._records()}

    def _records(self):
        """The journal's records, one per image and per image id (base.unique_records)."""
        return unique_records(self.journal.records(), lambda r: r["image"]["id"])

    def has_outputs(self, refs) -> bool:
        return bool(self._done)

    def _unlisted_ref(self, ref: ImageRef) -> bool:
        """Whether --coco-annotations is given and does not list ref (warned once per image)."""
        if self.index is None or self.index.lookup(ref.name) is not None:
            return False
        if ref.rel not in self._unlisted:
            self._unlisted.add(ref.rel)
            log.warning("%s: not listed in --coco-annotations; left out of %s", ref.path, self.results_file)
        return True

    def _image(self, result: ImageResult) -> dict:
        """The image record of a listed image, with its id: the annotation file's, else the next."""
        ref = result.ref
        if self.index is not None:
            image_id = self.index.lookup(ref.name)
        else:
            image_id, self._next_id = self._next_id, self._next_id + 1
        return {"id": image_id, "file_name": ref.name, "width": result.width, "height": result.height,
                **ref.video_fields()}

    def _images_array(self, f) -> None:
        """Write the records' images as a JSON array's items to f (binary)."""
        for n, r in enumerate(self._records()):
            f.write((b"," if n else b"") + json.dumps(r["image"], ensure_ascii=False).encode())


@register
class CocoWriter(JournaledImagesWriter):
    journal_name = "coco"
    results_file = "predictions.json"

    def done(self, ref: ImageRef) -> bool:
        return ref.rel in self._done or self._unlisted_ref(ref)  # an unlisted image: nothing to write

    def write(self, result: ImageResult) -> None:
        ref = result.ref
        if ref.rel in self._done or self._unlisted_ref(ref):
            # Already journaled (a run killed between this writer and the next one redoes the image
            # for the others): one record per image, with the id it was given first.
            return
        cmap = self.cat_map
        dets = [{"category_id": i.category_id if cmap is None else cmap[i.category_id],
                 "score": round(i.score, 6), "segmentation": i.rle, "bbox": list(i.bbox),
                 **({"track_id": i.track_id} if i.track_id is not None else {})}
                for i in result.instances_above(self.threshold)
                if cmap is None or i.category_id in cmap]
        self.journal.append({"rel": ref.rel, "image": self._image(result), "dets": dets})
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
                        if "track_id" in d:  # --track
                            rec["track_id"] = d["track_id"]
                        f.write((b"" if first else b",\n") + json.dumps(rec, separators=(",", ":")).encode())
                        first = False
                f.write(b"]\n")
            return write

        folder.write_atomic(folder.run_file("predictions", ".json"), stream(("segmentation", "score")))
        folder.write_atomic(folder.run_file("predictions_bbox", ".json"), stream(("bbox", "score")))
        categories = self.ctx.categories.coco_categories() if self.index is None or not self.index.categories \
            else self.index.categories

        # merge.py renumbers run-assigned ids across shards, never ids taken from an annotation file
        info = {"description": "images of an m2f run",
                "image_ids": "run" if self.index is None else "annotations"}

        def images(f):
            f.write(b'{"info":' + json.dumps(info).encode() + b',"images":[')
            self._images_array(f)
            f.write(b'],"annotations":[],"categories":')
            f.write(json.dumps(categories, ensure_ascii=False).encode() + b"}\n")
        folder.write_atomic(folder.run_file("images", ".json"), images)
