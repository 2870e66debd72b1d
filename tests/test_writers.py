"""Every writer through one parametrised test, plus the COCO round trip through pycocotools."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from m2f_cli import RunConfig, Segmenter, run
from m2f_cli.model.categories import CategoryTable
from m2f_cli.tools.evaluate import evaluate
from m2f_cli.outputs.writers import REGISTRY

from planted import PlantedPredictor, planted_dir, planted_image

SIZES = [(320, 240), (200, 300), (500, 180)]


def _planted_dir(tmp_path):
    return planted_dir(tmp_path, SIZES)


def _check_file(path):
    """Every file a writer leaves must load completely."""
    if path.suffix in (".png", ".jpg"):
        with Image.open(path) as im:
            im.load()
    elif path.suffix in (".json", ".geojson"):
        json.loads(path.read_text())
    elif path.suffix == ".xml":
        import xml.etree.ElementTree as ET
        ET.parse(path)
    elif path.suffix == ".yaml":
        import yaml
        assert yaml.safe_load(path.read_text())["names"]
    elif path.suffix == ".txt":
        for line in path.read_text().splitlines():
            cls, *xy = line.split()
            assert int(cls) >= 0 and len(xy) >= 6 and len(xy) % 2 == 0 and all(0 <= float(v) <= 1 for v in xy)
    elif path.suffix == ".jsonl":
        for line in path.read_text().splitlines():
            json.loads(line)
    else:
        raise AssertionError(f"unexpected output {path}")


@pytest.mark.parametrize("fmt", sorted(REGISTRY))
def test_every_writer_writes_valid_files_and_resumes(tmp_path, fmt):
    d, _ = _planted_dir(tmp_path)
    out = tmp_path / "out"
    cfg = RunConfig(inputs=[str(d)], out=str(out), formats=(fmt,), workers=0)
    s1 = run(cfg, segmenter=Segmenter(PlantedPredictor()))
    assert s1.images == len(SIZES) and s1.failed == 0
    files = [p for p in out.rglob("*") if p.is_file() and ".m2f" not in p.parts]
    assert files
    for p in files:
        _check_file(p)
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
