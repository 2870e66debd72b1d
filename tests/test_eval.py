"""``m2f eval`` against ground truths that do not fit the run: matched by file name, or refused."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from m2f_cli import RunConfig, Segmenter, run
from m2f_cli.model.categories import CategoryTable
from m2f_cli.cli import app
from m2f_cli.errors import ExitCode
from m2f_cli.tools.evaluate import evaluate_run
from m2f_cli.errors import EvalError

from planted import PlantedPredictor, planted_dir

runner = CliRunner()
SIZES = [(320, 240), (200, 300), (500, 180)]


@pytest.fixture()
def planted_run(tmp_path):
    """A COCO run (no --coco-annotations: ids 1..3) over planted images, and their true masks."""
    d, truth = planted_dir(tmp_path, SIZES)
    out = tmp_path / "out"
    run(RunConfig(inputs=[str(d)], out=str(out), formats=("coco",), workers=0),
        segmenter=Segmenter(PlantedPredictor()))
    return out, truth


def _gt(path, truth, first_id=39769, names=None, cats=None, size_of=None, extra_images=0, annotate=True):
    """A COCO ground truth whose ids are not the run's 1..n (as COCO val2017's are not)."""
    images, anns = [], []
    for n, (name, masks) in enumerate(sorted(truth.items())):
        h, w = masks["red"].shape if size_of is None else size_of
        iid = first_id + 7 * n
        images.append({"id": iid, "file_name": (names or {}).get(name, f"val2017/{name}"), "width": w, "height": h})
        for colour, cid in (("red", 1), ("blue", 18)):
            rle = mask_utils.encode(np.asfortranarray(masks[colour].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            if annotate:
                anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cid, "segmentation": rle,
                             "area": float(masks[colour].sum()), "bbox": mask_utils.toBbox(rle).tolist(),
                             "iscrowd": 0})
    for k in range(extra_images):
        images.append({"id": 5 + k, "file_name": f"val2017/unseen{k}.png", "width": 64, "height": 64})
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": cats or CategoryTable.coco().coco_categories()}))
    return path


def _eval(gt, pred, *extra):
    return runner.invoke(app, ["eval", "--gt", str(gt), "--pred", str(pred), *map(str, extra)])


def test_a_run_without_annotations_is_matched_by_file_name(tmp_path, planted_run):
    out, truth = planted_run
    gt = _gt(tmp_path / "gt.json", truth)
    r = _eval(gt, out / "predictions.json", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["AP"] == pytest.approx(1.0, abs=1e-6)
    assert "3 images evaluated (matched by file name)" in r.stderr


def test_ground_truth_images_the_run_did_not_see_are_not_counted_unless_asked(tmp_path, planted_run):
    out, truth = planted_run
    gt = _gt(tmp_path / "gt.json", truth, extra_images=2)
    # the unseen images carry annotations: counting them must lower recall
    doc = json.loads(gt.read_text())
    doc["annotations"].append({**doc["annotations"][0], "id": 99, "image_id": 5})
    gt.write_text(json.dumps(doc))
    only_run = evaluate_run(str(gt), str(out / "predictions.json"))
    assert only_run.stats["AR100"] == pytest.approx(1.0, abs=1e-6) and only_run.images == 3
    assert any("2 ground-truth images not in this run: not counted" in n for n in only_run.notes)
    counted = evaluate_run(str(gt), str(out / "predictions.json"), all_gt_images=True)
    assert counted.images == 5 and counted.stats["AR100"] < 0.9


def test_without_images_json_ids_must_match(tmp_path, planted_run):
    out, truth = planted_run
    gt = _gt(tmp_path / "gt.json", truth)
    (out / "images.json").unlink()
    r = _eval(gt, out / "predictions.json")
    assert r.exit_code == ExitCode.USAGE and "image ids are not in" in r.stderr and "images.json" in r.stderr


@pytest.mark.parametrize("case,needle", [
    ("names", "none of the run's 3 images"),
    ("sizes", "not the same image"),
    ("categories", "no category id in common"),
    ("empty", "no annotation on the 3 evaluated images"),
])
def test_ground_truths_that_do_not_fit_are_refused(tmp_path, planted_run, case, needle):
    out, truth = planted_run
    kw = {"names": {"names": {k: f"other/{k}.jpg" for k in truth}},
          "sizes": {"size_of": (10, 20)},
          "categories": {"cats": [{"id": 200 + i, "name": f"thing{i}"} for i in range(3)]},
          "empty": {"annotate": False}}[case]
    gt = _gt(tmp_path / "gt.json", truth, **kw)
    if case == "categories":  # annotations of the ground truth's own categories
        doc = json.loads(gt.read_text())
        doc["annotations"] = [{**a, "category_id": 200} for a in doc["annotations"]]
        gt.write_text(json.dumps(doc))
    r = _eval(gt, out / "predictions.json")
    assert r.exit_code == ExitCode.USAGE, r.output
    assert needle in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    with pytest.raises(EvalError):
        evaluate_run(str(gt), str(out / "predictions.json"))


def test_mask_sizes_are_checked_without_images_json(tmp_path, planted_run):
    out, truth = planted_run
    (out / "images.json").unlink()
    gt = _gt(tmp_path / "gt.json", truth, first_id=1, size_of=(10, 20))
    doc = json.loads(gt.read_text())
    doc["images"] = [{**im, "id": n + 1} for n, im in enumerate(doc["images"])]
    gt.write_text(json.dumps(doc))
    r = _eval(gt, out / "predictions.json")
    assert r.exit_code == ExitCode.USAGE and "masks of image 1" in r.stderr


def test_coco_annotations_map_categories_by_name(tmp_path):
    """A ground truth with its own category ids for the model's classes: the predictions take the
    file's ids (matched by name); classes the file lacks are left out; no common name is refused."""
    d, truth = planted_dir(tmp_path, SIZES)
    cats = [{"id": 7, "name": "person"}, {"id": 3, "name": "dog"}]
    gt = _gt(tmp_path / "gt.json", truth, first_id=100, names={k: k for k in truth}, cats=cats)
    doc = json.loads(gt.read_text())
    for a in doc["annotations"]:
        a["category_id"] = {1: 7, 18: 3}[a["category_id"]]
    gt.write_text(json.dumps(doc))
    out = tmp_path / "out"
    run(RunConfig(inputs=[str(d)], out=str(out), formats=("coco",), workers=0, coco_annotations=str(gt)),
        segmenter=Segmenter(PlantedPredictor()))
    preds = json.loads((out / "predictions.json").read_text())
    assert preds and {p["category_id"] for p in preds} <= {7, 3}
    assert evaluate_run(str(gt), str(out / "predictions.json")).stats["AP"] == pytest.approx(1.0, abs=1e-6)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({**doc, "categories": [{"id": 1, "name": "cell"}, {"id": 2, "name": "nucleus"}]}))
    with pytest.raises(Exception, match="none of its categories"):
        run(RunConfig(inputs=[str(d)], out=str(tmp_path / "o2"), formats=("coco",), workers=0,
                      coco_annotations=str(foreign)), segmenter=Segmenter(PlantedPredictor()))
    assert not (tmp_path / "o2").exists()
