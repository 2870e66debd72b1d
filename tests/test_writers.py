"""Every writer through one parametrised test, plus the COCO round trip through pycocotools."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from m2f_cli import RunConfig, Segmenter, run
from m2f_cli.model.categories import CategoryTable
from m2f_cli.tools.evaluate import evaluate
from m2f_cli.outputs.writers import REGISTRY

from planted import BLUE_CLASS, RED_CLASS, PlantedPredictor, bbox_of, iou, planted_dir, planted_image
from rasterize import decode
from vector_readers import cvat_masks, geojson_masks, labelme_masks, yolo_masks

SIZES = [(320, 240), (200, 300), (500, 180)]


def _planted_dir(tmp_path):
    return planted_dir(tmp_path, SIZES)


# What the planted images must produce (PlantedPredictor): in every image exactly two instances above
# the 0.5 threshold, the red ellipse as a person and the blue rectangle as a dog, whose masks match
# the planted pixels (predicted at 1/4 resolution: measured IoU >= 0.994 in every format here).
PLANTED = {"person": ("red", RED_CLASS, 1), "dog": ("blue", BLUE_CLASS, 18)}  # label: colour, index, COCO id
MASK_IOU = 0.97


def _image(truth, name):
    """(height, width, {label: planted mask}) of one planted image."""
    masks = truth[name]
    h, w = masks["red"].shape
    return h, w, {label: masks[colour] for label, (colour, _, _) in PLANTED.items()}


def _check_masks(found: dict, want: dict, where):
    """found: {label: mask} read from an output; want: {label: planted mask}."""
    assert sorted(found) == sorted(want), where
    for label, m in found.items():
        assert m.shape == want[label].shape and iou(m, want[label]) >= MASK_IOU, (where, label, iou(m, want[label]))


def _check_instances(insts: list, h, w, want: dict, where):
    """JSON instances (png sidecars, jsonl): one per planted object, their schema, and their masks
    (RLE, when written) or else their boxes against the planted ones."""
    for i in insts:
        assert set(i) >= {"id", "label", "category_id", "score", "bbox", "area"}, where
        assert PLANTED[i["label"]][2] == i["category_id"] and i["score"] >= 0.5, (where, i)
    assert len(insts) == len(want), where
    if all("segmentation" in i for i in insts):
        masks = {i["label"]: decode(i["segmentation"]) for i in insts}
        assert all(masks[i["label"]].sum() == i["area"] for i in insts), where
        _check_masks(masks, want, where)
    else:
        _check_masks({i["label"]: _box_mask(i["bbox"], h, w) for i in insts},
                     {k: _box_mask(bbox_of(m), h, w) for k, m in want.items()}, where)


def _box_mask(box, h, w):
    x, y, bw, bh = (round(v) for v in box)
    m = np.zeros((h, w), bool)
    m[y:y + bh, x:x + bw] = True
    return m


def _check_coco(out: Path, truth):
    images = json.loads((out / "images.json").read_text())
    assert [(i["file_name"], i["height"], i["width"]) for i in images["images"]] == \
        [(n, *_image(truth, n)[:2]) for n in sorted(truth)]
    assert len(images["categories"]) == 80
    ids = {i["id"]: i["file_name"] for i in images["images"]}
    preds = json.loads((out / "predictions.json").read_text())
    boxes = json.loads((out / "predictions_bbox.json").read_text())
    assert [(p["image_id"], p["category_id"], p["score"]) for p in preds] == \
        [(b["image_id"], b["category_id"], b["score"]) for b in boxes]
    top_k = RunConfig(inputs=[], out="").top_k
    for image_id, name in ids.items():
        h, w, want = _image(truth, name)
        mine = [p for p in preds if p["image_id"] == image_id]
        assert len(mine) == top_k  # threshold 0 (the COCO protocol): the top-k (query, class) pairs
        assert all(p["segmentation"]["size"] == [h, w] for p in mine)
        sure = [p for p in mine if p["score"] >= 0.5]
        names = {cid: label for label, (_, _, cid) in PLANTED.items()}
        _check_masks({names.get(p["category_id"], p["category_id"]): decode(p["segmentation"]) for p in sure},
                     want, name)
        assert len(sure) == len(want)
        sure_boxes = [b for b in boxes if b["image_id"] == image_id and b["score"] >= 0.5]
        _check_masks({names.get(b["category_id"], b["category_id"]): _box_mask(b["bbox"], h, w) for b in sure_boxes},
                     {k: _box_mask(bbox_of(m), h, w) for k, m in want.items()}, name)


def _check_format(out: Path, fmt: str, truth) -> set:
    """Check what fmt must write for the planted images; returns the files it checked."""
    names = sorted(truth)
    stems = [Path(n).stem for n in names]
    if fmt == "png":
        for n, stem in zip(names, stems):
            h, w, want = _image(truth, n)
            side = json.loads((out / f"{stem}.json").read_text())
            assert (side["name"], side["height"], side["width"]) == (n, h, w)
            _check_instances(side["instances"], h, w, want, stem)
            ids = np.asarray(Image.open(out / f"{stem}.png"))
            assert ids.shape == (h, w) and ids.dtype == np.uint16
            _check_masks({i["label"]: ids == i["id"] for i in side["instances"]}, want, stem)
        return {f"{s}{ext}" for s in stems for ext in (".png", ".json")}
    if fmt == "jsonl":
        recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert [r["name"] for r in recs] == names
        for r in recs:
            h, w, want = _image(truth, r["name"])
            assert (r["height"], r["width"]) == (h, w)
            _check_instances(r["instances"], h, w, want, r["name"])
        return {"predictions.jsonl"}
    if fmt == "coco":
        _check_coco(out, truth)
        return {"images.json", "predictions.json", "predictions_bbox.json"}
    if fmt == "yolo":
        import yaml
        data = yaml.safe_load((out / "data.yaml").read_text())
        assert data["nc"] == 80 and len(data["names"]) == 80
        assert {data["names"][i] for _, i, _ in PLANTED.values()} == set(PLANTED)
        index = {i: label for label, (_, i, _) in PLANTED.items()}
        for n, stem in zip(names, stems):
            h, w, want = _image(truth, n)
            for line in (out / "labels" / f"{stem}.txt").read_text().splitlines():
                _, *xy = line.split()
                assert len(xy) >= 6 and len(xy) % 2 == 0 and all(0 <= float(v) <= 1 for v in xy)
            rows = yolo_masks(out / "labels" / f"{stem}.txt", h, w)
            assert len(rows) == len(want)
            _check_masks({index.get(c, f"class {c}"): m for c, m in rows}, want, stem)
        return {"data.yaml"} | {f"labels/{s}.txt" for s in stems}
    if fmt == "cvat":
        root = ET.parse(out / "annotations.xml").getroot()
        assert len(root.findall("meta/task/labels/label")) == 80
        images = root.findall("image")
        assert [(i.get("name"), int(i.get("height")), int(i.get("width"))) for i in images] == \
            [(n, *_image(truth, n)[:2]) for n in names]
        masks = cvat_masks(out / "annotations.xml")
        for im in images:
            n = im.get("name")
            polys = im.findall("polygon")
            label = {int(p.get("group_id")): p.get("label") for p in polys}
            assert all(0.5 <= float(p.findtext("attribute[@name='score']")) <= 1 for p in polys)
            _check_masks({label[g]: m for g, m in masks[n].items()}, _image(truth, n)[2], n)
        return {"annotations.xml"}
    if fmt == "geojson":
        for n, stem in zip(names, stems):
            h, w, want = _image(truth, n)
            doc = json.loads((out / f"{stem}.geojson").read_text())
            assert (doc["type"], doc["name"], doc["height"], doc["width"]) == ("FeatureCollection", n, h, w)
            label = {f["id"]: f["properties"]["label"] for f in doc["features"]}
            assert all(f["geometry"]["type"] in ("Polygon", "MultiPolygon") for f in doc["features"])
            _check_masks({label[k]: m for k, m in geojson_masks(out / f"{stem}.geojson").items()}, want, stem)
        return {f"{s}.geojson" for s in stems}
    if fmt == "labelme":
        for n, stem in zip(names, stems):
            h, w, want = _image(truth, n)
            path = out / "labelme" / f"{stem}.json"
            doc = json.loads(path.read_text())
            assert (doc["imageHeight"], doc["imageWidth"]) == (h, w)
            assert (path.parent / doc["imagePath"]).resolve() == (out.parent / "imgs" / n).resolve()
            label = {s["group_id"]: s["label"] for s in doc["shapes"]}
            _check_masks({label[g]: m for g, m in labelme_masks(path).items()}, want, stem)
        return {f"labelme/{s}.json" for s in stems}
    if fmt == "labels":
        classes = json.loads((out / "labels.json").read_text())["classes"]
        assert len(classes) == 80 and all(classes[i]["name"] == label for label, (_, i, _) in PLANTED.items())
        for n, stem in zip(names, stems):
            h, w, want = _image(truth, n)
            with Image.open(out / f"{stem}.labels.png") as im:
                assert im.mode == "P"
                index = np.asarray(im)
            assert index.shape == (h, w) and set(np.unique(index)) == {255} | {i for _, i, _ in PLANTED.values()}
            _check_masks({label: index == i for label, (_, i, _) in PLANTED.items()}, want, stem)
        return {"labels.json"} | {f"{s}.labels.png" for s in stems}
    if fmt == "overlay":
        for n, stem in zip(names, stems):
            h, w, _ = _image(truth, n)
            with Image.open(out / f"{stem}.overlay.jpg") as im:
                im.load()
                assert im.size == (w, h) and im.mode == "RGB"  # what is drawn: test_overlay_* below
        return {f"{s}.overlay.jpg" for s in stems}
    if fmt == "cutout":
        found = set()
        for n, stem in zip(names, stems):
            h, w, want = _image(truth, n)
            index = json.loads((out / "cutouts" / stem / "index.json").read_text())
            assert (index["name"], index["height"], index["width"]) == (n, h, w)
            masks = {}
            for c in index["cutouts"]:
                x, y, bw, bh = c["box"]
                with Image.open(out / "cutouts" / stem / c["file"]) as im:
                    assert im.mode == "RGBA" and im.size == (bw, bh)
                    alpha = np.asarray(im)[..., 3] > 0
                m = np.zeros((h, w), bool)
                m[y:y + bh, x:x + bw] = alpha
                masks[c["label"]] = m
                found.add(f"cutouts/{stem}/{c['file']}")
            _check_masks(masks, want, stem)
            found.add(f"cutouts/{stem}/index.json")
        return found
    raise AssertionError(f"no check for --format {fmt}: add one")


def _check_outputs(out: Path, fmt: str, truth):
    """Every file the run leaves is what the planted images must produce: the format's files (all of
    them, with their content checked), an empty failures.jsonl and a complete run record."""
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".m2f" not in p.parts}
    checked = _check_format(out, fmt, truth)
    assert files == checked | {"failures.jsonl", "m2f-run.json"}, files ^ (checked | {"failures.jsonl", "m2f-run.json"})
    assert (out / "failures.jsonl").read_text() == ""
    record = json.loads((out / "m2f-run.json").read_text())
    assert record["complete"] and (record["images"], record["failed"]) == (len(truth), 0)
    assert record["formats"] == [fmt] and record["instances"] == len(truth) * len(PLANTED)


@pytest.mark.parametrize("fmt", sorted(REGISTRY))
def test_every_writer_writes_valid_files_and_resumes(tmp_path, fmt):
    d, truth = _planted_dir(tmp_path)
    out = tmp_path / "out"
    cfg = RunConfig(inputs=[str(d)], out=str(out), formats=(fmt,), workers=0)
    s1 = run(cfg, segmenter=Segmenter(PlantedPredictor()))
    assert s1.images == len(SIZES) and s1.failed == 0
    _check_outputs(out, fmt, truth)
    files = [p for p in out.rglob("*") if p.is_file() and ".m2f" not in p.parts]
    assert not list((out / ".m2f" / "tmp").iterdir())  # no temporary files left behind
    before = {p: p.read_bytes() for p in files}
    s2 = run(cfg, segmenter=Segmenter(PlantedPredictor()))
    assert (s2.images, s2.skipped) == (0, len(SIZES))
    after = {p: p.read_bytes() for p in files if not p.name.startswith(("failures", "m2f-run"))}
    assert all(after[p] == before[p] for p in after)  # resumed run rebuilt identical files


def _gt_file(path, truth, shift=0):
    coco = CategoryTable.coco()
    images, anns = [], []
    for n, (name, masks) in enumerate(sorted(truth.items()), start=100):
        h, w = masks["red"].shape
        images.append({"id": n, "file_name": name, "width": w, "height": h})
        for colour, cid in (("red", 1), ("blue", 18)):
            m = np.roll(masks[colour], shift, axis=1) if shift else masks[colour]
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            anns.append({"id": len(anns) + 1, "image_id": n, "category_id": cid, "segmentation": rle,
                         "area": float(m.sum()), "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0})
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": coco.coco_categories()}))
    return path


def test_coco_round_trip_gives_ap_1(tmp_path):
    d, truth = _planted_dir(tmp_path)
    gt = _gt_file(tmp_path / "gt.json", truth)
    out = tmp_path / "out"
    run(RunConfig(inputs=[str(d)], out=str(out), formats=("coco", "png"), workers=0,
                  coco_annotations=str(gt)), segmenter=Segmenter(PlantedPredictor()))
    preds = json.loads((out / "predictions.json").read_text())
    assert {p["image_id"] for p in preds} == {100, 101, 102}
    assert all(isinstance(p["segmentation"]["counts"], str) and "bbox" not in p for p in preds)
    boxes = json.loads((out / "predictions_bbox.json").read_text())
    assert len(boxes) == len(preds) and all(len(b["bbox"]) == 4 for b in boxes)
    # COCO protocol: threshold 0 for coco (top-k pairs), while the PNG sidecars keep 0.5
    assert len(preds) > 2 * len(SIZES)
    side = json.loads((out / "im0.json").read_text())
    assert side["threshold"] == 0.5 and len(side["instances"]) == 2
    stats = evaluate(str(gt), str(out / "predictions.json"))
    assert stats["AP"] == pytest.approx(1.0, abs=1e-6)
    box_stats = evaluate(str(gt), str(out / "predictions_bbox.json"), iou_type="bbox")
    assert box_stats["AP"] > 0.9
    shifted = _gt_file(tmp_path / "shifted.json", truth, shift=40)
    assert evaluate(str(shifted), str(out / "predictions.json"))["AP"] < 0.8


def test_coco_without_annotations_writes_a_loadable_dataset(tmp_path):
    d, _ = _planted_dir(tmp_path)
    out = tmp_path / "out"
    run(RunConfig(inputs=[str(d)], out=str(out), formats=("coco",), workers=0),
        segmenter=Segmenter(PlantedPredictor()))
    images = json.loads((out / "images.json").read_text())
    assert [i["file_name"] for i in images["images"]] == ["im0.png", "im1.png", "im2.png"]
    assert [i["id"] for i in images["images"]] == [1, 2, 3] and len(images["categories"]) == 80
    from pycocotools.coco import COCO
    gt = COCO(str(out / "images.json"))
    dt = gt.loadRes(str(out / "predictions.json"))
    assert len(dt.getAnnIds()) > 0


def test_unlisted_images_are_reported(tmp_path, caplog):
    d, truth = _planted_dir(tmp_path)
    gt = _gt_file(tmp_path / "gt.json", {k: v for k, v in truth.items() if k != "im1.png"})
    out = tmp_path / "out"
    run(RunConfig(inputs=[str(d)], out=str(out), formats=("coco",), workers=0,
                  coco_annotations=str(gt)), segmenter=Segmenter(PlantedPredictor()))
    assert any("im1.png" in r.message and "not listed" in r.message for r in caplog.records)
    preds = json.loads((out / "predictions.json").read_text())
    assert {p["image_id"] for p in preds} == {100, 101}


def test_overlay_colours_the_mask_and_nothing_far_away(tmp_path):
    d, truth = _planted_dir(tmp_path)
    out = tmp_path / "out"
    run(RunConfig(inputs=[str(d)], out=str(out), formats=("overlay",), overlay_format="png", workers=0),
        segmenter=Segmenter(PlantedPredictor()))
    for n, (w, h) in enumerate(SIZES):
        orig = np.asarray(Image.open(d / f"im{n}.png").convert("RGB")).astype(int)
        over = np.asarray(Image.open(out / f"im{n}.overlay.png")).astype(int)
        assert over.shape == orig.shape
        red = truth[f"im{n}.png"]["red"]
        from scipy.ndimage import binary_dilation, binary_erosion
        inner = binary_erosion(red, iterations=4)
        far = ~binary_dilation(red | truth[f"im{n}.png"]["blue"], iterations=max(w, h) // 10)
        far[: h // 4, :] = False  # labels may sit above boxes
        changed = np.abs(over - orig).sum(-1) > 30
        assert changed[inner].mean() > 0.9
        assert changed[far].mean() < 0.01 and far.sum() > 100


class _LeftThird(PlantedPredictor):
    """One confident person whose mask is the left third of the image, whatever the pixels."""

    def __call__(self, pixel_values):
        cls, masks = super().__call__(pixel_values)
        masks[:] = -20.0
        masks[:, 0, :, : masks.shape[-1] // 3] = 20.0
        return cls, masks


def test_overlay_of_grayscale_and_rgba_inputs_is_colour(tmp_path):
    """A grayscale or RGBA input gets a colour overlay: inside the mask the person's colour is
    blended in at --overlay-alpha, outside it the pixels are the input's (lossless PNG overlays)."""
    from m2f_cli.model.categories import CategoryTable
    d = tmp_path / "imgs"
    d.mkdir()
    img, _ = planted_image(210, 150)
    img.convert("RGBA").save(d / "rgba.png")
    img.convert("L").save(d / "gray.png")
    out = tmp_path / "out"
    s = run(RunConfig(inputs=[str(d)], out=str(out), formats=("overlay",), workers=0, overlay_format="png",
                      overlay_scores=False), segmenter=Segmenter(_LeftThird()))
    assert s.failed == 0 and s.instances == 2
    person = np.array(CategoryTable.coco().by_id(1).color, float)
    for name, mode in (("rgba", "RGB"), ("gray", "L")):
        src = np.asarray(img.convert(mode).convert("RGB"), float)
        with Image.open(out / f"{name}.overlay.png") as im:
            assert im.mode == "RGB" and im.size == (210, 150)
            ov = np.asarray(im, float)
        inside, outside = ov[70:135, 10:55], ov[70:135, 150:200]  # away from the contour and the tag
        want = 0.5 * src[70:135, 10:55] + 0.5 * person
        assert np.abs(inside - want).max() <= 1.0
        assert np.abs(outside - src[70:135, 150:200]).max() == 0
        if name == "gray":
            assert (inside.max(axis=2) - inside.min(axis=2)).min() > 40  # colour, not gray


def test_jsonl_streams_through_a_real_pipe(tmp_path, tiny_model):
    d, _ = _planted_dir(tmp_path)
    listing = "\n".join(str(p) for p in sorted(d.iterdir())) + "\n"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "m2f_cli", "segment", "-", "--format", "jsonl", "--out", "-",
                        "--model", tiny_model, "--rle", "--threshold", "0"],
                       input=listing, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [os.path.basename(r["image"]) for r in recs] == ["im0.png", "im1.png", "im2.png"]
    assert all(r["instances"] for r in recs)
    inst = recs[0]["instances"][0]
    assert set(inst) >= {"label", "category_id", "score", "bbox", "area", "segmentation"}
    assert mask_utils.decode(inst["segmentation"]).shape == (240, 320)
    assert "done: 3 images" in p.stderr


def test_image_redone_for_another_writer_keeps_one_record_and_its_id(tmp_path):
    """A run killed after the COCO journal got an image but before the JSON Lines journal did
    redoes that image for jsonl: COCO must keep one record per image, with its first id."""
    d, _ = _planted_dir(tmp_path)
    out = tmp_path / "out"
    run(RunConfig(inputs=[str(d)], out=str(out), formats=("coco",), workers=0), segmenter=Segmenter(PlantedPredictor()))
    first = (out / "predictions.json").read_text()
    s = run(RunConfig(inputs=[str(d)], out=str(out), formats=("coco", "jsonl"), workers=0),
            segmenter=Segmenter(PlantedPredictor()))
    assert s.images == len(SIZES)  # redone for jsonl
    assert (out / "predictions.json").read_text() == first
    images = json.loads((out / "images.json").read_text())["images"]
    assert sorted(im["id"] for im in images) == [1, 2, 3]
    s = run(RunConfig(inputs=[str(d)], out=str(out), formats=("jsonl",), workers=0),
            segmenter=Segmenter(PlantedPredictor()))
    assert s.skipped == len(SIZES)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == len(SIZES)
