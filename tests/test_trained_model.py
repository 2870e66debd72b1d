"""End-to-end accuracy of ``m2f`` with a real, trained tiny Mask2Former.

tests/fixtures/shapes_model is a ~1.3M-parameter Mask2Former trained from scratch on synthetic
shapes (scripts/train_fixture.py, data from scripts/shapes.py: discs, triangles, rings and squares
labelled "sports ball", "kite", "frisbee" and "clock", COCO ids 37, 38, 34, 85). Unlike the random
tiny models of the other tests, it gives meaningful masks, so mask AP measured through the
installed CLI (``m2f segment`` then ``m2f eval``) catches anything that silently hurts accuracy:
geometry, EXIF orientation, resizing, batching, the COCO ids, the PNG instance maps.

A held-out validation set is generated at test time (fixed seed, not a training seed) and every
run goes through a subprocess of the installed entry point, offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "fixtures" / "shapes_model"
sys.path.insert(0, str(ROOT / "scripts"))
import shapes  # noqa: E402

pytestmark = pytest.mark.slow

VAL_SEED = 20240607   # training uses seed 0's stream; this set is never seen in training
N_VAL = 24
# Measured with tests/fixtures/shapes_model on this validation set (m2f segment -f coco, then
# m2f eval): segm AP 0.594 (AP50 0.87). The floor leaves room for libjpeg/numpy/torch differences
# across platforms; a real regression (geometry, category ids, orientation, resizing) costs more.
MEASURED_AP = 0.594
AP_FLOOR = 0.5
AP_TOL = 0.02             # measured differences: EXIF 0.001, wide 0.011, x0.7 0.008, batch 1 / 8 0.000
PNG_IOU = 0.7             # a GT instance is found in a PNG map when IoU >= this and the class agrees
PNG_GOOD_FRACTION = 0.6   # measured 0.79 (57 GT instances, median IoU 0.85); mirrored control 0.0
PNG_MEDIAN_IOU = 0.7
ORIENTATIONS = (6, 8, 3)  # EXIF tag values: rotate 90 CW / 90 CCW / 180 to display upright


def m2f(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "m2f_cli", *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"m2f {' '.join(args)} exited {p.returncode}\n{p.stderr[-3000:]}"
    return p


def segment(inputs: Path, out: Path, gt: Path, *extra: str) -> Path:
    m2f("segment", str(inputs), "--out", str(out), "--model", str(MODEL), "--coco-annotations", str(gt),
        "-q", *extra)
    return out


def coco_eval(gt: Path, pred: Path) -> dict:
    stats = json.loads(m2f("eval", "--gt", str(gt), "--pred", str(pred), "--json").stdout)
    assert set(stats) >= {"AP", "AP50", "AP75"}
    return stats


def _decode_rle(seg: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


def _write_gt(path: Path, images: list, anns: list) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": shapes.coco_categories()}))
    return path


def _subset_predictions(pred: Path, ids: set, out: Path) -> Path:
    recs = [r for r in json.loads(pred.read_text()) if r["image_id"] in ids]
    out.write_text(json.dumps(recs))
    return out


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    """The validation set: plain/ (JPEGs + plain/annotations.json) and variants/ with
    exif/ (rotated pixels + an EXIF orientation that undoes it), wide/ (x1.5 width) and
    small/ (x0.7), one annotation file for all variants and one per variant."""
    if not (MODEL / "model.safetensors").exists():
        pytest.fail(f"{MODEL} is missing: python scripts/train_fixture.py --out {MODEL}")
    root = tmp_path_factory.mktemp("shapes_val")
    plain = root / "plain"
    gt_plain = Path(shapes.write_val_set(str(plain), n=N_VAL, seed=VAL_SEED))
    data = json.loads(gt_plain.read_text())
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)

    variants = root / "variants"
    per_variant: dict[str, tuple[list, list]] = {}
    all_images, all_anns = [], []
    for kind, base in [("exif", 1000), ("wide", 2000), ("small", 3000)]:
        (variants / kind).mkdir(parents=True)
        images, anns = [], []
        for n, im in enumerate(data["images"]):
            upright = Image.open(plain / im["file_name"]).convert("RGB")
            w, h = upright.size
            name = f"{kind}/{im['file_name']}"
            gt_masks = [_decode_rle(a["segmentation"]) for a in by_image.get(im["id"], [])]
            labels = [shapes.COCO_IDS.index(a["category_id"]) for a in by_image.get(im["id"], [])]
            if kind == "exif":
                orientation = ORIENTATIONS[n % len(ORIENTATIONS)]
                undo = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270,
                        3: Image.Transpose.ROTATE_180}[orientation]
                stored = upright.transpose(undo)
                exif = Image.Exif()
                exif[0x0112] = orientation
                # quality 100 without chroma subsampling: a second lossy encoding would move AP by itself
                # (measured: a plain q95 re-encode of the same pixels moves AP by ~0.01)
                stored.save(variants / name, quality=100, subsampling=0, exif=exif)
                # the fixture itself: a viewer (exif_transpose) shows the upright image
                shown = ImageOps.exif_transpose(Image.open(variants / name)).convert("RGB")
                assert shown.size == (w, h)
                diff = np.abs(np.asarray(shown, np.int16) - np.asarray(upright, np.int16)).mean()
                assert diff < 2, diff  # measured <= 0.21 (q100 re-encode); a wrong rotation gives tens
                size = (w, h)
            else:
                f = (1.5, 1.0) if kind == "wide" else (0.7, 0.7)
                size = (max(1, round(w * f[0])), max(1, round(h * f[1])))
                name = name[:-len(".jpg")] + ".png"  # lossless: only the resize differs
                upright.resize(size, Image.Resampling.BILINEAR).save(variants / name)
                gt_masks = [np.asarray(Image.fromarray(m.astype(np.uint8)).resize(size, Image.Resampling.NEAREST))
                            > 0 for m in gt_masks]
            iid = base + im["id"]
            images.append({"id": iid, "file_name": name, "width": size[0], "height": size[1]})
            anns += shapes.coco_annotations_for(np.asarray(gt_masks).reshape(len(gt_masks), size[1], size[0]),
                                                labels, iid, base * 10 + len(anns) + 1)
        per_variant[kind] = (images, anns)
        all_images += images
        all_anns += anns
    gt_variants = _write_gt(root / "variants.json", all_images, all_anns)
    gts = {k: _write_gt(root / f"gt_{k}.json", *per_variant[k]) for k in per_variant}
    assert len(data["annotations"]) >= N_VAL  # the set has instances to find
    return {"root": root, "plain": plain, "gt": gt_plain, "data": data, "variants": variants,
            "gt_variants": gt_variants, "gts": gts, "ids": {k: {i["id"] for i in per_variant[k][0]}
                                                            for k in per_variant}}


@pytest.fixture(scope="module")
def plain_ap(val):
    out = segment(val["plain"], val["root"] / "out_plain", val["gt"], "-f", "coco")
    preds = json.loads((out / "predictions.json").read_text())
    assert len({p["image_id"] for p in preds}) == N_VAL  # every image has detections
    assert {p["category_id"] for p in preds} <= set(shapes.COCO_IDS)
    return coco_eval(val["gt"], out / "predictions.json")["AP"]


def test_mask_ap_of_the_trained_model(plain_ap):
    print(f"plain AP {plain_ap:.4f}")
    assert plain_ap >= AP_FLOOR, f"segm AP {plain_ap:.3f} < {AP_FLOOR}"


@pytest.fixture(scope="module")
def multi_format_run(val):
    """png + coco + jsonl in one run, one image per batch."""
    return segment(val["plain"], val["root"] / "out_multi", val["gt"],
                   "-f", "png", "-f", "coco", "-f", "jsonl", "--batch-size", "1")


def test_several_formats_batch_1_same_ap(val, plain_ap, multi_format_run):
    ap = coco_eval(val["gt"], multi_format_run / "predictions.json")["AP"]
    assert abs(ap - plain_ap) <= AP_TOL, (ap, plain_ap)
    recs = [json.loads(line) for line in (multi_format_run / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == N_VAL
    for r in recs:  # the JSON Lines and the PNG sidecars describe the same instances
        side = json.loads((multi_format_run / (Path(r["name"]).stem + ".json")).read_text())
        assert [i["id"] for i in side["instances"]] == [i["id"] for i in r["instances"]]
        assert [i["category_id"] for i in side["instances"]] == [i["category_id"] for i in r["instances"]]


def test_batch_size_8_same_ap(val, plain_ap):
    out = segment(val["plain"], val["root"] / "out_b8", val["gt"], "-f", "coco", "--batch-size", "8")
    ap = coco_eval(val["gt"], out / "predictions.json")["AP"]
    assert abs(ap - plain_ap) <= AP_TOL, (ap, plain_ap)


@pytest.fixture(scope="module")
def variants_run(val):
    return segment(val["variants"], val["root"] / "out_variants", val["gt_variants"], "-f", "coco")


@pytest.mark.parametrize("kind", ["exif", "wide", "small"])
def test_exif_and_resized_copies_same_ap(val, plain_ap, variants_run, kind):
    """EXIF-rotated copies (ground truth of the upright image) and copies resized to other sizes and
    aspect ratios (ground truth resized with them) score like the originals."""
    pred = _subset_predictions(variants_run / "predictions.json", val["ids"][kind],
                               val["root"] / f"pred_{kind}.json")
    assert json.loads(pred.read_text()), f"no predictions for the {kind} copies"
    ap = coco_eval(val["gts"][kind], pred)["AP"]
    print(f"{kind} AP {ap:.4f} vs plain {plain_ap:.4f}")
    assert abs(ap - plain_ap) <= AP_TOL, (kind, ap, plain_ap)


def _png_matches(out: Path, val, flip: bool = False) -> list[tuple[float, bool]]:
    """For every GT instance: (IoU of the best-matching PNG instance, whether its category agrees)."""
    data = val["data"]
    res = []
    for im in data["images"]:
        stem = Path(im["file_name"]).stem
        inst_map = np.asarray(Image.open(out / f"{stem}.png"))
        assert inst_map.shape == (im["height"], im["width"]) and inst_map.dtype == np.uint16
        if flip:
            inst_map = inst_map[:, ::-1]
        side = json.loads((out / f"{stem}.json").read_text())
        cats = {i["id"]: i["category_id"] for i in side["instances"]}
        assert set(np.unique(inst_map)) - {0} <= set(cats), "PNG ids missing from the sidecar"
        for a in data["annotations"]:
            if a["image_id"] != im["id"]:
                continue
            g = _decode_rle(a["segmentation"])
            best, best_id = 0.0, None
            for k in np.unique(inst_map[g]):
                if k == 0:
                    continue
                p = inst_map == k
                iou = float((p & g).sum() / (p | g).sum())
                if iou > best:
                    best, best_id = iou, int(k)
            res.append((best, best_id is not None and cats[best_id] == a["category_id"]))
    return res


def test_png_instance_maps_match_ground_truth(val, multi_format_run):
    """The 16-bit PNG maps read back from disk (default threshold 0.5): most GT instances have a PNG
    instance of the right category with a high IoU; the same maps mirrored (a control) do not."""
    res = _png_matches(multi_format_run, val)
    assert len(res) == len(val["data"]["annotations"]) > 0
    good = np.mean([iou >= PNG_IOU and ok for iou, ok in res])
    median = float(np.median([iou for iou, _ in res]))
    control = _png_matches(multi_format_run, val, flip=True)
    control_good = np.mean([iou >= PNG_IOU and ok for iou, ok in control])
    print(f"PNG: {len(res)} GT instances, found {good:.3f}, median IoU {median:.3f}, control {control_good:.3f}")
    assert good >= PNG_GOOD_FRACTION, (good, median)
    assert median >= PNG_MEDIAN_IOU, median
    assert control_good < 0.5 * good, (control_good, good)


# Polygon formats on the trained model's real outputs (rings with holes, touching shapes, odd sizes).
# Measured here (88 instances read 5 ways, 16 holes): every instance IoU 1.0 by pixel-centre fill for
# geojson/labelme/cvat/yolo and by pycocotools' polygon fill for cvat (seams included); YOLO through cv2.fillPoly as Ultralytics rasterises it: min 0.680,
# median 0.898 (these shapes are 10-60 px: the extra column and row on the right and bottom edges
# cost a 20-px shape ~10%, and seams add their pixels).
VECTOR_EXACT_IOU = 0.95
YOLO_CV2_MEDIAN_IOU = 0.85
YOLO_CV2_MIN_IOU = 0.6


@pytest.fixture(scope="module")
def vector_run(val):
    return segment(val["plain"], val["root"] / "out_vector", val["gt"],
                   "-f", "png", "-f", "yolo", "-f", "labelme", "-f", "cvat", "-f", "geojson")


def test_polygon_formats_round_trip_on_trained_outputs(val, vector_run):
    from rasterize import decode, iou
    from vector_readers import (cvat_masks, cvat_masks_pycocotools, geojson_masks, labelme_masks, yolo_masks,
                                yolo_masks_cv2)
    cvat = cvat_masks(vector_run / "annotations.xml")
    coco = cvat_masks_pycocotools(vector_run / "annotations.xml")
    exact, cv2_ious, holes = [], [], 0
    for im in val["data"]["images"]:
        stem = Path(im["file_name"]).stem
        side = json.loads((vector_run / f"{stem}.json").read_text())
        truth = {i["id"]: decode(i["segmentation"]) for i in side["instances"]}
        h, w = im["height"], im["width"]
        read = {"geojson": geojson_masks(vector_run / f"{stem}.geojson"),
                "labelme": labelme_masks(vector_run / "labelme" / f"{stem}.json"),
                "cvat": cvat[im["file_name"]], "cvat via pycocotools": coco[im["file_name"]]}
        for fmt, masks in read.items():
            assert set(masks) == {k for k, m in truth.items() if m.any()}, (fmt, stem)
            exact += [(fmt, iou(m, truth[k])) for k, m in masks.items()]
        order = [k for k in sorted(truth) if truth[k].any()]
        rows = yolo_masks(vector_run / "labels" / f"{stem}.txt", h, w)
        assert len(rows) == len(order)
        exact += [("yolo", iou(m, truth[k])) for (_, m), k in zip(rows, order)]
        cv2_ious += [iou(m, truth[k]) for (_, m), k in
                     zip(yolo_masks_cv2(vector_run / "labels" / f"{stem}.txt", h, w), order)]
        doc = json.loads((vector_run / f"{stem}.geojson").read_text())
        holes += sum(len(p) - 1 for f in doc["features"] for p in
                     ([f["geometry"]["coordinates"]] if f["geometry"]["type"] == "Polygon"
                      else f["geometry"]["coordinates"]))
    worst = min(v for _, v in exact)
    print(f"polygons: {len(exact)} instance reads, min IoU {worst:.4f}; {holes} holes; YOLO via cv2.fillPoly: "
          f"min {min(cv2_ious):.3f}, median {np.median(cv2_ious):.3f}")
    assert len(cv2_ious) > N_VAL and holes > 0  # real outputs, with rings' holes among them
    assert worst >= VECTOR_EXACT_IOU, [x for x in exact if x[1] < VECTOR_EXACT_IOU][:5]
    assert np.median(cv2_ious) >= YOLO_CV2_MEDIAN_IOU and min(cv2_ious) >= YOLO_CV2_MIN_IOU
