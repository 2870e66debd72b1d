"""``--format labelme``: one LabelMe JSON per image, ``<out>/labelme/<name>.json``.

``{"version", "flags": {}, "shapes": [...], "imagePath", "imageData": null, "imageHeight",
"imageWidth"}``; one shape per part of each object: ``{"label", "points": [[x, y], ...],
"group_id": <instance id>, "description": "score 0.973", "shape_type": "polygon", "flags": {},
"mask": null, "score", "category_id"}``. The parts of one instance share its group_id (LabelMe's
way of grouping shapes into one object); LabelMe keeps the keys it does not know (score,
category_id) in the shape's other_data and writes them back when it saves. LabelMe polygons have no
holes, so each hole is joined to its part by a zero-width seam (polygons.seamed): the ring runs into
the hole and back along one segment, and fills give back the hole.

imagePath is the image's path relative to the JSON's folder (local inputs and outputs), so
``labelme imgs --output <out>/labelme`` opens each image with its shapes (that option pairs files by
base name: use it on flat folders), as does opening one JSON file. Remote paths are written as given.
"""

from __future__ import annotations

import json
import os

from m2f_cli.outputs.polygons import seamed
from m2f_cli.records import ImageRef, ImageResult
from m2f_cli.urls import is_url, local_path
from m2f_cli.outputs.writers.base import register
from m2f_cli.outputs.writers.vector import PerImagePolygonWriter, number

LABELME_VERSION = "5.5.0"  # the label-file layout written here is the one of LabelMe 5.x and 6.x


@register
class LabelmeWriter(PerImagePolygonWriter):
    name = "labelme"
    prefix, suffix = "labelme/", ".json"

    def _image_path(self, ref: ImageRef, json_path: str) -> str:
        if is_url(ref.path) or is_url(json_path):
            return ref.path
        src, dst = os.path.abspath(local_path(ref.path)), os.path.abspath(local_path(json_path))
        return os.path.relpath(src, os.path.dirname(dst)).replace(os.sep, "/")

    def document(self, result: ImageResult, json_path: str) -> dict:
        out = []
        shapes = self.shapes(result)
        tracked = any(s.track_id is not None for s in shapes)  # --track: group_id is the track
        for s in shapes:
            desc = "" if s.score is None else f"score {s.score:.3f}"
            if s.track_id is not None:
                desc = f"track {s.track_id}, {desc}"
            for part in s.parts:
                shape = {"label": s.label, "points": [[number(x), number(y)] for x, y in seamed(part)],
                         "group_id": s.track_id if tracked else s.id, "description": desc,
                         "shape_type": "polygon", "flags": {}, "mask": None}
                if s.score is not None:
                    shape["score"] = round(s.score, 6)
                shape["category_id"] = s.category_id
                if tracked:
                    shape["track_id"] = s.track_id
                out.append(shape)
        return {"version": LABELME_VERSION, "flags": {}, "shapes": out,
                "imagePath": self._image_path(result.ref, json_path), "imageData": None,
                "imageHeight": result.height, "imageWidth": result.width}

    def write(self, result: ImageResult) -> None:
        path = self._path(result.ref)
        doc = self.document(result, path)
        self.ctx.folder.write_bytes(path, json.dumps(doc, ensure_ascii=False).encode())
