"""The polygon formats (yolo, labelme, cvat, geojson): round trips against the instances' RLE on
planted masks with a hole and with two parts, their real consumers where one installs cleanly,
georeferenced GeoJSON, shards and merge. The trained-model round trip is in test_trained_model.py."""

import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from m2f_cli import RunConfig, Segmenter, run
from m2f_cli.tools.merge import merge
from m2f_cli.errors import UsageError

from planted import PlantedPredictor
from rasterize import decode, iou
from vector_readers import (cvat_masks, cvat_masks_pycocotools, geojson_masks, labelme_masks, yolo_masks,
                            yolo_masks_cv2)

VECTOR = ("yolo", "labelme", "cvat", "geojson")
SIZES = [(320, 240), (400, 300), (240, 320)]
# Ultralytics' rasteriser (cv2.fillPoly on int32 vertices) fills every pixel a polygon's edge passes
# through: one more column and row at the right and bottom edges of a pixel-corner polygon, and the
# seams. Measured on these planted masks: IoU 0.964..0.988 (the 10-22 k pixel blobs here; larger
# objects lose less, the small trained-fixture shapes more, see test_trained_model.py).
YOLO_CV2_IOU = 0.95


def ring_image(w: int, h: int, seed: int = 0):
    """A red ring (an annulus: one part, one hole) and two separate blue rectangles (one instance,
    two parts) on a textured grey-green background; PlantedPredictor finds them as "person" and "dog"."""
    rng = np.random.default_rng(seed)
    bg = np.clip(np.full((h, w, 3), (90, 140, 90), int) + rng.integers(-25, 25, (h, w, 1)), 0, 255)
    img = Image.fromarray(bg.astype(np.uint8))
    d = ImageDraw.Draw(img)
    cx, cy, r = int(w * 0.3), int(h * 0.5), int(min(w, h) * 0.28)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(230, 20, 20))
    d.ellipse((cx - r // 2, cy - r // 2, cx + r // 2, cy + r // 2), fill=(90, 140, 90))
    d.rectangle((int(w * 0.65), int(h * 0.08), int(w * 0.92), int(h * 0.38)), fill=(20, 20, 230))
    d.rectangle((int(w * 0.62), int(h * 0.6), int(w * 0.95), int(h * 0.9)), fill=(20, 20, 230))
    return img, (cx, cy)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vector")
    d = root / "imgs"
    d.mkdir()
    holes = {}
    for n, (w, h) in enumerate(SIZES):
        img, centre = ring_image(w, h, seed=n)
        img.save(d / f"ring{n}.png")
        holes[f"ring{n}"] = centre
    out = root / "out"
    s = run(RunConfig(inputs=[str(d)], out=str(out), formats=("png",) + VECTOR, workers=0),
            segmenter=Segmenter(PlantedPredictor()))
    assert s.images == len(SIZES) and s.failed == 0
    return {"root": root, "imgs": d, "out": out, "holes": holes}


def _instances(out: Path, stem: str) -> tuple[dict, list[dict]]:
    side = json.loads((out / f"{stem}.json").read_text())
    return side, side["instances"]


def test_round_trip_keeps_holes_and_parts(planted_run):
    out = planted_run["out"]
    cvat = cvat_masks(out / "annotations.xml")
    coco = cvat_masks_pycocotools(out / "annotations.xml")  # CVAT's own path from polygons to masks
    for stem, (cx, cy) in planted_run["holes"].items():
        side, insts = _instances(out, stem)
        h, w = side["height"], side["width"]
        assert [i["label"] for i in insts] == ["dog", "person"] or [i["label"] for i in insts] == ["person", "dog"]
        truth = {i["id"]: decode(i["segmentation"]) for i in insts}
        ring_id = next(i["id"] for i in insts if i["label"] == "person")
        assert truth[ring_id].any() and not truth[ring_id][cy, cx]  # the RLE has the hole
        read = {"geojson": geojson_masks(out / f"{stem}.geojson"),
                "labelme": labelme_masks(out / "labelme" / f"{stem}.json"),
                "cvat": cvat[f"{stem}.png"], "cvat via pycocotools": coco[f"{stem}.png"]}
        for fmt, masks in read.items():
            assert set(masks) == set(truth), fmt
            for k, m in masks.items():
                assert iou(m, truth[k]) == 1.0, (fmt, stem, k)  # exact polygons: the mask itself
            assert not masks[ring_id][cy, cx], f"{fmt} lost the ring's hole"
        rows = yolo_masks(out / "labels" / f"{stem}.txt", h, w)
        assert [c for c, _ in rows] == [i["label_index"] if "label_index" in i else {"person": 0, "dog": 16}[i["label"]]
                                        for i in insts]
        for (_, m), inst in zip(rows, insts):  # one polygon per instance, seams and all: exact by centre fill
            assert iou(m, truth[inst["id"]]) == 1.0
        for (_, m), inst in zip(yolo_masks_cv2(out / "labels" / f"{stem}.txt", h, w), insts):
            assert iou(m, truth[inst["id"]]) >= YOLO_CV2_IOU, stem


def test_multi_part_and_hole_structure_in_each_format(planted_run):
    out = planted_run["out"]
    side, insts = _instances(out, "ring0")
    ids = {i["label"]: i["id"] for i in insts}
    feats = {f["id"]: f for f in json.loads((out / "ring0.geojson").read_text())["features"]}
    assert feats[ids["dog"]]["geometry"]["type"] == "MultiPolygon"
    assert len(feats[ids["dog"]]["geometry"]["coordinates"]) == 2
    ring = feats[ids["person"]]["geometry"]
    assert ring["type"] == "Polygon" and len(ring["coordinates"]) == 2  # exterior + one hole
    assert feats[ids["person"]]["properties"] == {"id": ids["person"], "label": "person", "category_id": 1,
                                                  "score": pytest.approx(insts[ids["person"] - 1]["score"], abs=1e-6)}
    lm = json.loads((out / "labelme" / "ring0.json").read_text())
    assert sorted(s["group_id"] for s in lm["shapes"]) == sorted([ids["dog"], ids["dog"], ids["person"]])
    root = ET.parse(out / "annotations.xml").getroot()
    im = next(i for i in root.findall("image") if i.get("name") == "ring0.png")
    assert sorted(int(p.get("group_id")) for p in im.findall("polygon")) == sorted(
        [ids["dog"], ids["dog"], ids["person"]])
    yolo = (out / "labels" / "ring0.txt").read_text().splitlines()
    assert len(yolo) == 2  # one line per instance, parts joined


def test_geojson_is_valid_for_shapely(planted_run):
    from shapely.geometry import shape
    n = 0
    for p in planted_run["out"].glob("*.geojson"):
        doc = json.loads(p.read_text())
        assert doc["type"] == "FeatureCollection" and doc["coordinates"] == "pixel"
        for f in doc["features"]:
            g = shape(f["geometry"])
            assert g.is_valid and g.geom_type in ("Polygon", "MultiPolygon") and g.area > 0
            for poly in getattr(g, "geoms", [g]):  # RFC 7946: exterior counter-clockwise, holes clockwise
                assert poly.exterior.is_ccw and all(not r.is_ccw for r in poly.interiors)
            n += 1
    assert n == 2 * len(SIZES)


def test_cvat_xml_has_the_required_elements(planted_run):
    root = ET.parse(planted_run["out"] / "annotations.xml").getroot()
    assert root.tag == "annotations" and root.findtext("version") == "1.1"
    task = root.find("meta/task")
    assert int(task.findtext("size")) == len(SIZES)
    labels = {el.findtext("name"): el for el in task.findall("labels/label")}
    assert len(labels) == 80 and labels["person"].findtext("attributes/attribute/name") == "score"
    images = root.findall("image")
    assert [im.get("id") for im in images] == ["0", "1", "2"]
    assert [im.get("name") for im in images] == ["ring0.png", "ring1.png", "ring2.png"]
    for im, (w, h) in zip(images, SIZES):
        assert (int(im.get("width")), int(im.get("height"))) == (w, h)
        for p in im.findall("polygon"):
            assert p.get("label") in labels and p.get("source") == "auto" and p.get("occluded") == "0"
            pts = [tuple(map(float, xy.split(","))) for xy in p.get("points").split(";")]
            assert len(pts) >= 3 and all(0 <= x <= w and 0 <= y <= h for x, y in pts)
            assert 0 <= float(p.findtext("attribute[@name='score']")) <= 1


def test_labelme_files_in_labelme(planted_run):
    """LabelMe's own loader and its rasteriser. LabelMe pulls PyQt5, onnxruntime and matplotlib
    (~300 MB, a Qt GUI stack): it is not in the test extra; `pip install labelme` runs this test."""
    pytest.importorskip("labelme", reason="labelme (a Qt GUI app, ~300 MB with PyQt5 and onnxruntime) is not "
                        "in the test extra; pip install labelme to read the files with LabelMe itself")
    from labelme import utils
    from labelme._label_file import read_label_file
    out = planted_run["out"]
    for stem in planted_run["holes"]:
        path = out / "labelme" / f"{stem}.json"
        data = read_label_file(str(path))  # also opens imagePath relative to the JSON, checks its size
        side, insts = _instances(out, stem)
        assert Image.open(planted_run["imgs"] / f"{stem}.png").size == (side["width"], side["height"])
        truth = {i["id"]: decode(i["segmentation"]) for i in insts}
        scores = {i["id"]: i["score"] for i in insts}
        masks: dict = {}
        for s in data.shapes:
            assert s["shape_type"] == "polygon" and s["other_data"]["score"] == pytest.approx(scores[s["group_id"]], abs=1e-6)
            m = utils.shape_to_mask((side["height"], side["width"]), s["points"], shape_type="polygon")
            masks[s["group_id"]] = masks.get(s["group_id"], False) | m
        for k, m in masks.items():
            # PIL fills the pixels on the right/bottom edges too (polygons.py): measured >= 0.96 here
            assert iou(m, truth[k]) >= 0.95, (stem, k, iou(m, truth[k]))


def test_yolo_dataset_in_ultralytics(planted_run, tmp_path):
    """Ultralytics' dataset checks and label loading (YOLODataset: verify_image_label on every file).
    Ultralytics needs torchvision, whose PyPI release pins its own torch (installing it replaces the
    CPU torch of CI), plus opencv-python, matplotlib and polars: not in the test extra;
    `pip install ultralytics torchvision==<the one for your torch>` runs this test."""
    pytest.importorskip("ultralytics", reason="ultralytics pulls torchvision (which pins another torch), "
                        "opencv-python, matplotlib and polars: not in the test extra")
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset
    ds = tmp_path / "ds"
    shutil.copytree(planted_run["out"], ds)
    # the README's recipe, cp -rs: a real images/ folder of links to the images, beside labels/
    # (not a link to the folder: Ultralytics resolves the folder and would look for labels beside it)
    (ds / "images").mkdir()
    for p in planted_run["imgs"].iterdir():
        os.symlink(p, ds / "images" / p.name)
    data = check_det_dataset(str(ds / "data.yaml"))
    assert data["nc"] == 80 and data["names"][0] == "person" and Path(data["train"]) == ds / "images"
    dataset = YOLODataset(img_path=data["train"], data=data, task="segment", augment=False, imgsz=320)
    labels = dataset.get_labels()
    assert len(labels) == len(SIZES)
    for lb in labels:
        stem = Path(lb["im_file"]).stem
        _, insts = _instances(planted_run["out"], stem)
        assert len(lb["segments"]) == len(insts) == len(lb["cls"])


def test_geojson_of_a_geotiff_is_in_its_crs(tmp_path):
    import rasterio  # in the test extra: missing, this fails (never a skip)
    from rasterio.transform import from_origin
    img, _ = ring_image(320, 240)
    arr = np.asarray(img)
    d = tmp_path / "imgs"
    d.mkdir()
    transform = from_origin(500000.0, 4100000.0, 0.5, 0.5)  # UTM 33N, 0.5 m pixels, north up
    with rasterio.open(d / "scene.tif", "w", driver="GTiff", width=320, height=240, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=transform) as dst:
        dst.write(arr.transpose(2, 0, 1))
    img.save(d / "plain.tif")  # a TIFF without georeferencing: pixel coordinates
    out = tmp_path / "out"
    run(RunConfig(inputs=[str(d)], out=str(out), formats=("geojson",), workers=0),
        segmenter=Segmenter(PlantedPredictor()))
    geo = json.loads((out / "scene.geojson").read_text())
    pix = json.loads((out / "plain.geojson").read_text())
    assert pix["coordinates"] == "pixel" and "crs" not in pix
    assert geo["coordinates"] == "crs" and geo["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    from shapely.geometry import shape
    for fg, fp in zip(geo["features"], pix["features"]):
        g, p = shape(fg["geometry"]), shape(fp["geometry"])
        assert g.is_valid and g.area == pytest.approx(p.area * 0.25)  # 0.5 m x 0.5 m per pixel
        xy = np.array([c for poly in getattr(g, "geoms", [g]) for c in poly.exterior.coords])
        back = (xy - (transform.c, transform.f)) / (transform.a, transform.e)  # north up: no rotation terms
        assert np.allclose(back, np.round(back), atol=1e-6)  # vertices land back on pixel corners
        assert back[:, 0].min() >= 0 and back[:, 0].max() <= 320 and back[:, 1].max() <= 240
        for poly in getattr(g, "geoms", [g]):
            assert poly.exterior.is_ccw  # oriented again after the y flip
    assert sorted(f["properties"]["label"] for f in geo["features"]) == ["dog", "person"]


def test_simplify_option(planted_run, tmp_path):
    out = tmp_path / "out"
    run(RunConfig(inputs=[str(planted_run["imgs"])], out=str(out), formats=("geojson",), workers=0, simplify=1.0),
        segmenter=Segmenter(PlantedPredictor()))
    for stem in planted_run["holes"]:
        exact = json.loads((planted_run["out"] / f"{stem}.geojson").read_text())
        simple = json.loads((out / f"{stem}.geojson").read_text())
        n_exact = len(json.dumps(exact["features"]))
        assert len(json.dumps(simple["features"])) < 0.7 * n_exact
        _, insts = _instances(planted_run["out"], stem)
        masks = geojson_masks(out / f"{stem}.geojson")
        for i in insts:
            assert iou(masks[i["id"]], decode(i["segmentation"])) >= 0.97
    with pytest.raises(UsageError, match="--simplify"):
        run(RunConfig(inputs=[str(planted_run["imgs"])], out=str(tmp_path / "o2"), formats=("yolo",), simplify=-1),
            segmenter=Segmenter(PlantedPredictor()))


def test_shards_and_merge_give_the_files_of_one_run(planted_run, tmp_path):
    out = tmp_path / "sharded"
    for i in range(2):
        s = run(RunConfig(inputs=[str(planted_run["imgs"])], out=str(out), formats=VECTOR, workers=0, shard=(i, 2)),
                segmenter=Segmenter(PlantedPredictor()))
        assert s.failed == 0
    assert (out / "annotations.shard-0-of-2.xml").exists() and not (out / "annotations.xml").exists()
    report = merge(str(out))
    assert report.ok and "annotations.xml" in report.written
    one = planted_run["out"]
    assert (out / "annotations.xml").read_bytes() == (one / "annotations.xml").read_bytes()
    assert (out / "data.yaml").read_bytes() == (one / "data.yaml").read_bytes()
    for stem in planted_run["holes"]:
        for rel in (f"labels/{stem}.txt", f"{stem}.geojson"):
            assert (out / rel).read_bytes() == (one / rel).read_bytes(), rel
        a, b = (json.loads((o / "labelme" / f"{stem}.json").read_text()) for o in (out, one))
        for o, doc in ((out, a), (one, b)):  # relative to the JSON's folder, so it differs; same image
            assert (o / "labelme" / doc.pop("imagePath")).resolve() == (planted_run["imgs"] / f"{stem}.png").resolve()
        assert a == b
    # a shard rerun resumes: nothing redone, its part rebuilt the same
    for i in range(2):
        before = (out / f"annotations.shard-{i}-of-2.xml").read_bytes()
        s = run(RunConfig(inputs=[str(planted_run["imgs"])], out=str(out), formats=VECTOR, workers=0,
                          shard=(i, 2)), segmenter=Segmenter(PlantedPredictor()))
        assert s.images == 0 and s.failed == 0
        assert (out / f"annotations.shard-{i}-of-2.xml").read_bytes() == before


def test_cvat_resume_after_a_kill_keeps_one_image_element_each(planted_run, tmp_path):
    """A run killed after the CVAT journal got some images: the rerun adds the rest, once each."""
    out = tmp_path / "out"
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(planted_run["imgs"] / "ring0.png", imgs)
    run(RunConfig(inputs=[str(imgs)], out=str(out), formats=("cvat",), workers=0),
        segmenter=Segmenter(PlantedPredictor()))
    (out / "annotations.xml").unlink()  # as if killed before close() rebuilt it
    for n in (1, 2):
        shutil.copy(planted_run["imgs"] / f"ring{n}.png", imgs)
    s = run(RunConfig(inputs=[str(imgs)], out=str(out), formats=("cvat", "png"), workers=0),
            segmenter=Segmenter(PlantedPredictor()))
    assert s.images == len(SIZES)  # ring0 redone for png only
    root = ET.parse(out / "annotations.xml").getroot()
    assert [im.get("name") for im in root.findall("image")] == ["ring0.png", "ring1.png", "ring2.png"]
    assert [im.get("id") for im in root.findall("image")] == ["0", "1", "2"]
    assert root.findtext("meta/task/size") == "3"
