"""COCO panoptic results and PQ: hand-computed cases, values recorded from panopticapi's pq_compute,
the refusals, and a tiny panoptic checkpoint end to end (-f coco round trip, m2f eval)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from m2f_cli import RunConfig, run
from m2f_cli.outputs import coco_panoptic
from m2f_cli.model.categories import COCO_NAMES
from m2f_cli.cli import app
from m2f_cli.errors import ExitCode
from m2f_cli.tools.eval_panoptic import evaluate_panoptic, pq_image, pq_summary
from m2f_cli.errors import EvalError

from panoptic_planted import CATEGORIES, perturb, random_scene, write_panoptic
from tiny import make_tiny_model

runner = CliRunner()


def test_rgb_encoding_is_cocos():
    ids = np.array([[0, 1, 255], [256, 65536 + 2 * 256 + 3, (1 << 24) - 1]], np.uint32)
    rgb = coco_panoptic.ids_to_rgb(ids)
    assert rgb[1, 1].tolist() == [3, 2, 1]  # id = R + 256 G + 256^2 B
    assert rgb[1, 0].tolist() == [0, 1, 0]
    assert (coco_panoptic.rgb_to_ids(rgb) == ids).all()
    with pytest.raises(ValueError, match="24-bit"):
        coco_panoptic.ids_to_rgb(np.array([[1 << 24]]))


def _one(gt, gt_segs, pred, pred_segs):
    counts = {}
    pq_image(gt, {k: {"category_id": c, "iscrowd": cr} for k, (c, cr) in gt_segs.items()}, pred, pred_segs,
             counts)
    return counts


def test_pq_of_a_hand_computed_image():
    gt = np.zeros((10, 10), np.uint32)
    gt[:5, :5], gt[:5, 5:], gt[5:] = 1, 2, 3          # two persons (25 px each), road (50 px)
    pred = np.zeros_like(gt)
    pred[:5, :4] = 7                                   # person A less a column: IoU 20/25 = 0.8 -> TP
    pred[:2, 4:] = 8                                   # 12 px over A and B: IoU with B 10/27 -> FP, B a FN
    pred[5:] = 9                                       # road exactly: IoU 1 -> TP
    counts = _one(gt, {1: (1, 0), 2: (1, 0), 3: (187, 0)}, pred, {7: 1, 8: 1, 9: 187})
    assert (counts[1].tp, counts[1].fp, counts[1].fn) == (1, 1, 1) and counts[1].iou == pytest.approx(0.8)
    assert (counts[187].tp, counts[187].fp, counts[187].fn) == (1, 0, 0) and counts[187].iou == 1.0
    stats, rows = pq_summary(counts, CATEGORIES)
    # person: PQ = 0.8 / (1 + 0.5 + 0.5) = 0.4, SQ 0.8, RQ 0.5; road: 1, 1, 1; car, sky: not counted
    assert stats["PQ_th"] == pytest.approx(0.4) and stats["SQ_th"] == pytest.approx(0.8)
    assert stats["RQ_th"] == pytest.approx(0.5) and stats["PQ_st"] == 1.0
    assert stats["PQ"] == pytest.approx(0.7) and stats["RQ"] == pytest.approx(0.75) and stats["N"] == 2
    assert [r["pq"] for r in rows if r["id"] in (3, 184)] == [None, None]


def test_void_and_crowd_are_not_held_against_predictions():
    gt = np.zeros((10, 10), np.uint32)                 # rows 0-3 void
    gt[4:7, :] = 1                                     # a person, 30 px
    gt[7:, :] = 2                                      # a crowd of persons, 30 px
    pred = np.zeros_like(gt)
    pred[2:7, :] = 5                                   # the person + 20 px on void: union leaves them out
    pred[0:2, :3] = 6                                  # a car on void only: not a FP
    pred[7:, :6] = 7                                   # a person on the crowd: not a FP
    counts = _one(gt, {1: (1, 0), 2: (1, 1)}, pred, {5: 1, 6: 3, 7: 1})
    assert (counts[1].tp, counts[1].fp, counts[1].fn, counts[1].iou) == (1, 0, 0, 1.0)
    assert 3 not in counts or counts[3].fp == 0
    counts = _one(gt, {1: (1, 0), 2: (3, 1)}, pred, {5: 1, 6: 3, 7: 1})  # the crowd is of cars now
    assert counts[1].fp == 1


@pytest.mark.parametrize("seed,expected,per_class", [
    # pq_compute (panopticapi 7bb4655) on the same files: PQ, SQ, RQ of All, Things, Stuff; PQ per category
    (0, [0.525672, 0.748138, 0.692857, 0.380228, 0.689573, 0.552381, 0.671116, 0.806702, 0.833333],
     {1: 0.373675, 3: 0.386782, 184: 0.542344, 187: 0.799888}),
    (3, [0.365384, 0.719463, 0.498485, 0.285738, 0.605389, 0.463636, 0.44503, 0.833536, 0.533333],
     {1: 0.454234, 3: 0.117241, 184: 0.331981, 187: 0.558079}),
])
def test_pq_equals_panopticapi_on_planted_scenes(tmp_path, seed, expected, per_class):
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for i in range(4):
        h, w = int(rng.integers(30, 90)), int(rng.integers(30, 90))
        ids, segs = random_scene(rng, h, w)
        p, ps = perturb(rng, ids, segs)
        gts.append((f"im{i}.jpg", ids, segs))
        preds.append((f"im{i}.jpg", p, ps))
    r = evaluate_panoptic(write_panoptic(tmp_path, "gt", gts), write_panoptic(tmp_path, "pred", preds))
    got = [r.stats[f"{m}{s}"] for s in ("", "_th", "_st") for m in ("PQ", "SQ", "RQ")]
    assert got == pytest.approx(expected, abs=1e-6)
    assert {row["id"]: row["pq"] for row in r.per_class} == pytest.approx(per_class, abs=1e-6)
    assert r.images == 4


def _planted_pair(tmp_path, **gt_kw):
    rng = np.random.default_rng(11)
    scenes = [random_scene(rng, 40, 60) for _ in range(2)]
    gt = write_panoptic(tmp_path, "gt", [(f"val/a{i}.jpg", ids, segs) for i, (ids, segs) in enumerate(scenes)],
                        image_ids=[4000, 4007], **gt_kw)
    pred = write_panoptic(tmp_path, "pred", [(f"a{i}.jpg", ids, segs) for i, (ids, segs) in enumerate(scenes)])
    return gt, pred


def test_predictions_are_matched_by_file_name_and_score_1(tmp_path):
    gt, pred = _planted_pair(tmp_path)
    r = runner.invoke(app, ["eval", "--gt", gt, "--pred", pred, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["PQ"] == 1.0 and out["N_th"] >= 1 and out["N_st"] == 2 and out["images"] == 2
    assert "2 images evaluated (matched by file name)" in r.stderr
    table = runner.invoke(app, ["eval", "--gt", gt, "--pred", pred]).stdout
    assert "Things" in table and "100.0" in table


@pytest.mark.parametrize("case,needle", [
    ("names", "none of its 2 images"),
    ("sizes", "not the same image"),
    ("categories", "no category id in common"),
    ("empty", "no segment on the 2 evaluated images"),
    ("png", "cannot read the panoptic PNG"),
])
def test_panoptic_ground_truths_that_do_not_fit_are_refused(tmp_path, case, needle):
    gt, pred = _planted_pair(tmp_path)
    doc = json.loads(Path(gt).read_text())
    if case == "names":
        for im in doc["images"]:
            im["file_name"] = im["file_name"].replace("/a", "/b")
    elif case == "sizes":
        doc["images"][1]["width"] = 61
    elif case == "categories":
        doc["categories"] = [{"id": 500 + c["id"], "name": c["name"], "isthing": c["isthing"]} for c in CATEGORIES]
    elif case == "empty":
        for a in doc["annotations"]:
            a["segments_info"] = []
    else:
        doc["annotations"][0]["file_name"] = "missing.png"
    Path(gt).write_text(json.dumps(doc))
    r = runner.invoke(app, ["eval", "--gt", gt, "--pred", pred])
    assert r.exit_code == ExitCode.USAGE, r.output
    assert needle in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    with pytest.raises(EvalError):
        evaluate_panoptic(gt, pred)


def test_other_png_sizes_and_unlisted_segments_are_refused(tmp_path):
    gt, pred = _planted_pair(tmp_path)
    png = tmp_path / "pred" / "a0.png"
    ids = coco_panoptic.read_png(str(png))
    png.write_bytes(coco_panoptic.encode_png(ids[:, :50]))
    with pytest.raises(EvalError, match="50x40, its ground truth"):
        evaluate_panoptic(gt, pred)
    ids[0, 0] = 77
    png.write_bytes(coco_panoptic.encode_png(ids))
    with pytest.raises(EvalError, match=r"segment ids \[77\]"):
        evaluate_panoptic(gt, pred)


PANOPTIC_LABELS = {i: n for i, n in enumerate(list(COCO_NAMES[:6]) + ["wall", "sky", "road", "grass"])}


@pytest.fixture(scope="module")
def panoptic_model(tmp_path_factory):
    # seed 7 with 8 queries: 2-3 confident thing segments per planted image (most random tiny models
    # give none: their masks overlap too much for the 0.8 overlap rule)
    return make_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny-coco-panoptic"), seed=7, num_queries=8,
                           id2label=PANOPTIC_LABELS)


def test_coco_panoptic_results_round_trip(tmp_path, image_dir, panoptic_model):
    out = tmp_path / "out"
    s = run(RunConfig(inputs=[str(image_dir)], out=str(out), model=panoptic_model, formats=("coco", "png"),
                      workers=0))
    assert s.images == 4 and s.failed == 0
    doc = json.loads((out / "panoptic.json").read_text())
    assert {c["name"]: c["isthing"] for c in doc["categories"]}["person"] == 1
    assert {c["name"]: c["isthing"] for c in doc["categories"]}["road"] == 0
    images = {im["id"]: im for im in doc["images"]}
    segments = 0
    for ann in doc["annotations"]:
        im = images[ann["image_id"]]
        ids = coco_panoptic.read_png(str(out / "panoptic" / ann["file_name"]))
        rel = ann["file_name"][:-4]
        side = json.loads((out / f"{rel}.json").read_text())
        assert ids.shape == (im["height"], im["width"]) == (side["height"], side["width"])
        assert (ids == np.asarray(Image.open(out / f"{rel}.png"))).all()  # the png format's segment ids
        stats = coco_panoptic.segment_stats(ids)
        assert set(stats) == {s["id"] for s in ann["segments_info"]}
        for seg, ours in zip(ann["segments_info"], side["segments_info"]):
            assert (seg["id"], seg["category_id"], seg["iscrowd"]) == (ours["id"], ours["category_id"], 0)
            assert [seg["area"], seg["bbox"]] == [stats[seg["id"]][0], stats[seg["id"]][1]] == \
                [ours["area"], ours["bbox"]]
            segments += 1
    assert segments >= 4
    # the run scored against itself as ground truth: PQ 1
    r = runner.invoke(app, ["eval", "--gt", str(out / "panoptic.json"), "--pred", str(out / "panoptic.json"),
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["PQ"] == pytest.approx(1.0) and json.loads(r.stdout)["N"] >= 1


def test_coco_annotations_give_the_ground_truths_ids(tmp_path, image_dir, panoptic_model):
    first = tmp_path / "first"
    run(RunConfig(inputs=[str(image_dir)], out=str(first), model=panoptic_model, formats=("coco",), workers=0))
    doc = json.loads((first / "panoptic.json").read_text())
    # a ground truth with other image ids and COCO panoptic's category ids, and no "bus"
    by_name = {"person": 1, "bicycle": 2, "car": 3, "motorcycle": 4, "airplane": 5, "wall": 171, "sky": 187,
               "road": 149, "grass": 193}
    cats = [{"id": v, "name": k, "isthing": int(v < 100)} for k, v in by_name.items()]
    gt = {"images": [{**im, "id": 9000 + im["id"]} for im in doc["images"]], "annotations": [],
          "categories": cats}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "out"
    run(RunConfig(inputs=[str(image_dir)], out=str(out), model=panoptic_model, formats=("coco",), workers=0,
                  coco_annotations=str(tmp_path / "gt.json")))
    mapped = json.loads((out / "panoptic.json").read_text())
    assert sorted(im["id"] for im in mapped["images"]) == sorted(9000 + im["id"] for im in doc["images"])
    assert mapped["categories"] == cats
    used = {s["category_id"] for a in mapped["annotations"] for s in a["segments_info"]}
    assert used and used <= set(by_name.values())
    for ann in mapped["annotations"]:  # PNG and JSON agree (a bus segment would be void in both)
        ids = coco_panoptic.read_png(str(out / "panoptic" / ann["file_name"]))
        assert set(coco_panoptic.segment_stats(ids)) == {s["id"] for s in ann["segments_info"]}


def test_semantic_models_are_refused_for_coco(tmp_path, image_dir):
    model = make_tiny_model(str(tmp_path / "tiny-ade-semantic"), id2label={0: "wall", 1: "sky", 2: "road"})
    r = runner.invoke(app, ["segment", str(image_dir), "--out", str(tmp_path / "o"), "--model", model, "-f", "coco"])
    assert r.exit_code == 2 and "--format labels" in r.stderr
