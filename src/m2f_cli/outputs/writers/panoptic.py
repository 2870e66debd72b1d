"""``--format coco`` of a panoptic model: COCO panoptic results (the format: coco_panoptic.py).

- ``<out>/panoptic/<name>.png``: the image's segment ids in RGB (id = R + 256 G + 256^2 B, 0 = void),
  at the original image size; the ids are those of the ``png`` format's 16-bit map.
- ``<out>/panoptic.json``: ``{"info", "images": [{"id", "file_name", "width", "height"}],
  "annotations": [{"image_id", "file_name": "<name>.png", "segments_info": [{"id", "category_id",
  "area", "bbox", "iscrowd": 0, "score"}]}], "categories": [{"id", "name", "supercategory",
  "isthing"}]}``: panopticapi's ``pq_compute(gt.json, OUT/panoptic.json)`` and detectron2 read the
  pair as it is (the PNG folder of X.json is X/).

Image and category ids follow the ``coco`` writer's rules: with --coco-annotations (a COCO panoptic
ground truth, or any COCO file) image ids come from the file by file name and category ids from its
categories by name (isthing too); segments of classes the file lacks are left out of the JSON and
their pixels written as void, so that PNG and JSON always agree. Records stream into a journal; the
JSON is rebuilt from it atomically at the end of every run.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from m2f_cli.outputs import coco_panoptic
from m2f_cli.records import ImageRef, ImageResult
from m2f_cli.outputs.writers.base import register_variant
from m2f_cli.outputs.writers.coco import JournaledImagesWriter

log = logging.getLogger(__name__)

PNG_FOLDER = "panoptic"


@register_variant("panoptic")
class PanopticCocoWriter(JournaledImagesWriter):
    journal_name = "coco_panoptic"
    results_file = "panoptic.json"

    def _png(self, ref: ImageRef) -> str:
        return self.ctx.folder.path(f"{PNG_FOLDER}/{ref.rel}", ".png")

    def done(self, ref: ImageRef) -> bool:
        if self._unlisted_ref(ref):
            return True  # nothing to write for it
        return ref.rel in self._done and self.ctx.folder.complete(self._png(ref))

    def segments(self, result: ImageResult) -> tuple[np.ndarray, list[dict]]:
        """The (H, W) uint32 id map to encode and its segments_info, in the output's category ids."""
        ids = result.label_map.astype(np.uint32)
        cmap = self.cat_map
        dropped = [s.id for s in result.segments if cmap is not None and s.category_id not in cmap]
        if dropped:
            ids[np.isin(ids, dropped)] = coco_panoptic.VOID
        info = [{"id": s.id, "category_id": s.category_id if cmap is None else cmap[s.category_id],
                 "area": s.area, "bbox": list(s.bbox), "iscrowd": 0,
                 **({"score": round(s.score, 6)} if s.score is not None else {})}
                for s in result.segments if s.id not in dropped]
        return ids, info

    def write(self, result: ImageResult) -> None:
        ref = result.ref
        if self._unlisted_ref(ref):
            return
        ids, info = self.segments(result)
        self.ctx.folder.write_bytes(self._png(ref), coco_panoptic.encode_png(ids))
        if ref.rel in self._done:  # journaled by a run killed before its PNG landed: keep its id
            return
        self.journal.append({"rel": ref.rel, "image": self._image(result),
                             "ann": {"file_name": f"{ref.rel}.png", "segments_info": info}})
        self._done.add(ref.rel)

    def categories(self) -> list[dict]:
        """The categories of panoptic.json, each with isthing (the file's own where it says)."""
        from m2f_cli.postprocess.panoptic import is_thing
        if self.index is None or not self.index.categories:
            return [{"id": c.id, "name": c.name, "supercategory": "", "isthing": int(is_thing(c.name))}
                    for c in self.ctx.categories.categories]
        return [{**c, "isthing": int(c.get("isthing", is_thing(str(c.get("name", "")))))}
                for c in self.index.categories]

    def close(self) -> None:
        self.journal.close()
        folder = self.ctx.folder
        info = {"description": "COCO panoptic results of an m2f run",
                "image_ids": "run" if self.index is None else "annotations"}

        def write(f):
            f.write(b'{"info":' + json.dumps(info).encode() + b',"images":[')
            self._images_array(f)
            f.write(b'],"annotations":[')
            for n, r in enumerate(self._records()):
                ann = {"image_id": r["image"]["id"], **r["ann"]}
                f.write((b",\n" if n else b"") + json.dumps(ann, ensure_ascii=False).encode())
            f.write(b'],"categories":' + json.dumps(self.categories(), ensure_ascii=False).encode() + b"}\n")
        folder.write_atomic(folder.run_file("panoptic", ".json"), write)
