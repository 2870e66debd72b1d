"""The output formats m2f writes: name -> one-line summary, in the order the help lists them.

The torch- and numpy-free half of the writer registry: the CLI builds its ``--format`` choices and
help from it without importing the writers (``m2f --help`` stays fast); each writer module in
``writers/`` registers the class of one of these names, and a test keeps the two equal.
"""

from __future__ import annotations

FORMATS: dict[str, str] = {
    "png": "<name>.png 16-bit instance map + <name>.json sidecar (instances with RLE masks)",
    "coco": "predictions.json COCO results (+ predictions_bbox.json, images.json); panoptic models: "
            "panoptic.json + panoptic/<name>.png COCO panoptic results",
    "overlay": "<name>.overlay.jpg: masks, contours and labels drawn on the image",
    "jsonl": "predictions.jsonl, or stdout with --out -: one JSON object per image",
    "yolo": "labels/<name>.txt Ultralytics YOLO segmentation labels + data.yaml",
    "labelme": "labelme/<name>.json: LabelMe polygons with label and score",
    "cvat": "annotations.xml: CVAT for images 1.1 polygons with a score attribute",
    "labels": "<name>.labels.png: class index per pixel (255 = none), palette PNG + labels.json",
    "geojson": "<name>.geojson: FeatureCollection of (Multi)Polygons; GeoTIFFs in their CRS",
    "cutout": "cutouts/<name>/<id>_<label>.png: each instance as an RGBA PNG cropped to its box",
}
