"""Semantic label PNGs (-f labels), the overlay legend, and mIoU: hand-computed cases, planted label
maps with known scores, the refusals, and a tiny semantic checkpoint end to end."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from m2f_cli import RunConfig, run
from m2f_cli.model.categories import CategoryTable
from m2f_cli.cli import app
from m2f_cli.errors import ExitCode
from m2f_cli.tools.eval_semantic import confusion, evaluate_semantic, read_labels, scores
from m2f_cli.errors import EvalError
from m2f_cli.records import ImageRef, ImageResult, Segment
from m2f_cli.outputs.writers.labels import IGNORE, class_index_map
from m2f_cli.outputs.writers.legend import draw_legend, legend_colors, legend_rows
from m2f_cli.outputs.writers.overlay import _TagFont, render_overlay

from tiny import make_tiny_model

runner = CliRunner()
NAMES = ["wall", "sky", "road"]
GT = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 2, 2]])
PRED = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [2, 1, 0, 0], [2, 2, 2, 255]])


def test_scores_of_a_hand_computed_image():
    conf = confusion(GT, PRED, 3)
    assert conf.sum() == 14  # two ignored pixels left out
    stats, rows = scores(conf, NAMES)
    # wall: TP 3, FN 1 -> IoU 3/4, acc 3/4; sky: TP 4, FP 2 -> 4/6, acc 1; road: TP 4, FN 2 (one a
    # predicted 255) -> 4/6, acc 4/6
    assert [r["iou"] for r in rows] == pytest.approx([3 / 4, 4 / 6, 4 / 6])
    assert [r["acc"] for r in rows] == pytest.approx([3 / 4, 1.0, 4 / 6])
    assert stats["mIoU"] == pytest.approx((3 / 4 + 8 / 6) / 3)
    assert stats["pAcc"] == pytest.approx(11 / 14)
    assert stats["mAcc"] == pytest.approx((3 / 4 + 1 + 4 / 6) / 3)
    assert stats["fwIoU"] == pytest.approx((4 * 3 / 4 + 4 * 4 / 6 + 6 * 4 / 6) / 14)


def test_a_class_only_predicted_has_no_iou_but_costs_the_others():
    gt = np.zeros((2, 4), int)
    pred = np.array([[0, 0, 0, 0], [0, 0, 3, 3]])
    stats, rows = scores(confusion(gt, pred, 4), [])
    assert rows[0]["iou"] == pytest.approx(6 / 8) and rows[3]["iou"] is None and rows[3]["pred_pixels"] == 2
    assert stats["mIoU"] == pytest.approx(6 / 8)  # averaged over the ground truth's classes (detectron2)


def _save(path, a, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(a.astype(np.uint8), mode=mode)
    if mode == "P":  # a whole palette, or Pillow may write fewer bits per pixel
        im.putpalette(list(range(256)) * 3)
    im.save(path)


def _planted(tmp_path):
    """A Cityscapes-style ground truth and a run folder with known scores (the hand-computed image,
    twice: once exact)."""
    gt, pred = tmp_path / "gt", tmp_path / "run"
    _save(gt / "frankfurt" / "f_000001_gtFine_labelTrainIds.png", GT)
    _save(gt / "frankfurt" / "f_000002_gtFine_labelTrainIds.png", GT)
    _save(pred / "f_000001_leftImg8bit.labels.png", PRED, "P")
    _save(pred / "f_000002_leftImg8bit.labels.png", np.where(GT == 255, 0, GT), "P")
    (pred / "labels.json").write_text(json.dumps({"ignore": 255, "classes": [
        {"index": i, "id": i + 1, "name": n, "color": [0, 0, 0]} for i, n in enumerate(NAMES)]}))
    return gt, pred


def test_planted_label_maps_give_known_scores(tmp_path):
    gt, pred = _planted(tmp_path)
    r = runner.invoke(app, ["eval", "--gt", str(gt), "--pred", str(pred), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    # wall TP 7 FN 1, sky TP 8 FP 2, road TP 10 FN 2 over both images
    assert out["mIoU"] == pytest.approx((7 / 8 + 8 / 10 + 10 / 12) / 3)
    assert out["pAcc"] == pytest.approx(25 / 28) and out["images"] == 2
    assert [c["name"] for c in out["per_class"]] == NAMES
    assert "2 images evaluated (matched by file name)" in r.stderr
    table = runner.invoke(app, ["eval", "--gt", str(gt), "--pred", str(pred)]).stdout
    assert "mIoU" in table and "road" in table


def test_raw_ade20k_annotations_with_reduce_zero_label(tmp_path):
    gt, pred = _planted(tmp_path)
    for p in gt.rglob("*.png"):  # ADE's own encoding: 0 = other (ignored), class k stored as k + 1
        a = np.asarray(Image.open(p)).astype(int)
        _save(p, np.where(a == 255, 0, a + 1))
    assert (read_labels(str(next(gt.rglob("*.png"))), reduce_zero_label=True) == GT).all()
    r = evaluate_semantic(str(gt), str(pred), reduce_zero_label=True)
    assert r.stats["pAcc"] == pytest.approx(25 / 28)
    with pytest.raises(EvalError):  # read as 0-based, the raw values leave nothing in common
        unshifted = tmp_path / "raw"
        shutil.copytree(gt, unshifted)
        for p in unshifted.rglob("*.png"):
            _save(p, np.asarray(Image.open(p)).astype(int) + 3)
        evaluate_semantic(str(unshifted), str(pred))


@pytest.mark.parametrize("case,needle", [
    ("names", "none of its 2 label PNGs"),
    ("sizes", "not the same image"),
    ("classes", "no class in common"),
    ("empty", "no labelled pixel"),
    ("rgb", "a colour-coded map?"),
])
def test_semantic_ground_truths_that_do_not_fit_are_refused(tmp_path, case, needle):
    gt, pred = _planted(tmp_path)
    files = sorted(gt.rglob("*.png"))
    for p in files:
        if case == "names":
            p.rename(p.with_name(p.name.replace("f_", "g_")))
        elif case == "sizes":
            _save(p, np.zeros((4, 5)))
        elif case == "classes":
            _save(p, np.full((4, 4), 7))
        elif case == "empty":
            _save(p, np.full((4, 4), 255))
        else:
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(p)
    r = runner.invoke(app, ["eval", "--gt", str(gt), "--pred", str(pred)])
    assert r.exit_code == ExitCode.USAGE, r.output
    assert needle in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def _semantic_result(h=60, w=80):
    cats = CategoryTable.from_id2label(dict(enumerate(NAMES)))
    m = np.ones((h, w), np.uint8)  # category ids (index + 1)
    m[h // 2:] = 3
    m[:, : w // 4] = 2
    segs = [Segment(v, NAMES[v - 1], v, v - 1, False, None, int((m == v).sum()), (0, 0, w, h)) for v in (1, 2, 3)]
    return ImageResult(ImageRef("x.png", "x.png", "x", 0), w, h, [], m, 0.5, task="semantic", segments=segs), cats


def test_label_maps_hold_class_indices_and_ignore():
    result, cats = _semantic_result()
    idx = class_index_map(result, cats)
    assert idx.dtype == np.uint8 and (idx == result.label_map.astype(int) - 1).all()
    pan = np.zeros((4, 4), np.uint16)
    pan[:2] = 5
    pan[2:, :2] = 9
    result = ImageResult(ImageRef("y.png", "y.png", "y", 0), 4, 4, [], pan, 0.5, task="panoptic", segments=[
        Segment(5, "road", 3, 2, False, 0.9, 8, (0, 0, 4, 2)), Segment(9, "sky", 2, 1, False, 0.9, 4, (0, 2, 2, 2))])
    idx = class_index_map(result, cats)
    assert idx[0, 0] == 2 and idx[3, 0] == 1 and idx[3, 3] == IGNORE  # void -> 255


def test_semantic_overlays_carry_a_legend():
    result, cats = _semantic_result(240, 320)
    rows = legend_rows(result, cats)
    assert [r.name for r in rows] == ["road", "wall", "sky"]  # largest area first
    rgb = np.full((240, 320, 3), 128, np.uint8)
    img = np.asarray(render_overlay(rgb, result, cats, alpha=0.5))
    probe = Image.new("RGB", (320, 240))
    box = draw_legend(ImageDraw.Draw(probe), (320, 240), rows, _TagFont())
    assert 0 < box[2] < 320 and 0 < box[3] < 240
    colours = legend_colors(img, box)
    for c in cats.categories:  # each swatch in its class's exact colour (the painted map is blended)
        assert tuple(c.color) in colours


@pytest.fixture(scope="module")
def semantic_model(tmp_path_factory):
    labels = dict(enumerate(["wall", "sky", "road", "car", "tree", "person"]))
    # seed 4: two classes share the planted images (most random tiny models paint one class everywhere)
    return make_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny-ade-semantic"), seed=4, id2label=labels)


def test_semantic_run_writes_label_pngs_and_scores_itself(tmp_path, image_dir, semantic_model):
    out = tmp_path / "out"
    s = run(RunConfig(inputs=[str(image_dir)], out=str(out), model=semantic_model,
                      formats=("labels", "png", "overlay"), workers=0))
    assert s.images == 4 and s.failed == 0
    legend = json.loads((out / "labels.json").read_text())
    assert legend["ignore"] == 255 and [c["name"] for c in legend["classes"]][:2] == ["wall", "sky"]
    gt = tmp_path / "gt"
    seen = set()
    for rel in ("img0", "img1", "img2", "sub/img3"):
        im = Image.open(out / f"{rel}.labels.png")
        assert im.mode == "P" and tuple(im.getpalette()[3:6]) == tuple(legend["classes"][1]["color"])
        idx = np.asarray(im)
        ids = np.asarray(Image.open(out / f"{rel}.png"))
        assert idx.shape == ids.shape and (idx == ids.astype(int) - 1).all()  # category id = index + 1 here
        seen |= set(np.unique(idx).tolist())
        _save(gt / f"{rel}.png", idx)
    assert len(seen) >= 2 and IGNORE not in seen
    r = runner.invoke(app, ["eval", "--gt", str(gt), "--pred", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mIoU"] == 1.0 and json.loads(r.stdout)["images"] == 4
    flipped = np.asarray(Image.open(gt / "img0.png")).copy()
    _save(gt / "img0.png", (flipped + 1) % 6)
    assert evaluate_semantic(str(gt), str(out)).stats["mIoU"] < 1.0
