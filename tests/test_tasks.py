"""Panoptic and semantic checkpoints, task detection, and batch invariance."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from m2f_cli import RunConfig, run
from m2f_cli.model.categories import COCO_NAMES, CategoryTable
from m2f_cli.cli import app
from m2f_cli.postprocess.panoptic import panoptic_from_logits
from m2f_cli.postprocess.semantic import semantic_from_logits
from m2f_cli.segmenter import resolve_task

from tiny import make_tiny_model

STUFF = ["wall", "sky", "road", "grass"]
PANOPTIC_LABELS = {i: n for i, n in enumerate(list(COCO_NAMES[:6]) + STUFF)}


def _labels(n, names=None):
    return CategoryTable.from_id2label({i: (names[i] if names else f"class{i}") for i in range(n)})


def test_resolve_task_from_what_the_checkpoint_says(tmp_path):
    coco = CategoryTable.coco()
    assert resolve_task("auto", "facebook/mask2former-swin-large-ade-semantic", _labels(150)) == "semantic"
    assert resolve_task("auto", "facebook/mask2former-swin-tiny-coco-panoptic", _labels(133)) == "panoptic"
    assert resolve_task("auto", "facebook/mask2former-swin-large-mapillary-vistas-semantic", _labels(65)) \
        == "semantic"
    assert resolve_task("auto", "/models/mine", coco) == "instance"        # COCO's thing classes
    assert resolve_task("auto", "/models/mine", _labels(3, ["cat", "dog", "kite"])) == "instance"  # a subset
    city = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    assert resolve_task("auto", "/models/mine", _labels(8, city)) == "instance"
    assert resolve_task("instance", "x-semantic", _labels(150)) == "instance"
    # label counts shared by panoptic and semantic sets decide nothing: ask
    for n in (19, 65, 133, 150):
        with pytest.raises(ValueError, match="pass --task"):
            resolve_task("auto", "/models/mine", _labels(n))
    # a local folder saved from a hub checkpoint says what it is in its name or config.json
    d = tmp_path / "downloaded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_name_or_path": "facebook/mask2former-swin-base-ade-semantic"}))
    assert resolve_task("auto", str(d), _labels(150), str(d)) == "semantic"
    with pytest.raises(ValueError):
        resolve_task("depth", "x", coco)


def _full_res(mask_logits, padded, valid, original):
    up = F.interpolate(mask_logits[None].float(), size=padded, mode="bilinear", align_corners=False)
    up = up[:, :, : valid[0], : valid[1]]
    return F.interpolate(up, size=original, mode="bilinear", align_corners=False)[0]


def _reference_panoptic(cls, masks, padded, valid, original, things):
    """The original algorithm, written out at full resolution."""
    scores, labels = cls.softmax(-1).max(-1)
    keep = (labels != cls.shape[-1] - 1) & (scores > 0.8)
    sig = _full_res(masks, padded, valid, original).sigmoid()[keep]
    sc, lab = scores[keep], labels[keep]
    seg = torch.zeros(original, dtype=torch.long)
    if sig.shape[0] == 0:
        return seg, []
    ids = (sc.view(-1, 1, 1) * sig).argmax(0)
    info, stuff, cur = [], {}, 0
    for k in range(len(sc)):
        c = int(lab[k])
        area = int((ids == k).sum())
        orig = int((sig[k] >= 0.5).sum())
        m = (ids == k) & (sig[k] >= 0.5)
        if area > 0 and orig > 0 and int(m.sum()) > 0:
            if area / orig < 0.8:
                continue
            if c not in things:
                if c in stuff:
                    seg[m] = stuff[c]
                    continue
                stuff[c] = cur + 1
            cur += 1
            seg[m] = cur
            info.append((cur, c))
    return seg, info


@pytest.mark.parametrize("padded,valid,original", [((96, 128), (96, 128), (240, 320)),
                                                   ((128, 96), (100, 90), (333, 301))])
def test_panoptic_matches_reference(padded, valid, original):
    cats = CategoryTable.from_id2label(PANOPTIC_LABELS)
    things = {i for i, n in PANOPTIC_LABELS.items() if n in COCO_NAMES}
    g = torch.Generator().manual_seed(1)
    q = 12
    cls = torch.randn(q, len(PANOPTIC_LABELS) + 1, generator=g)
    cls[torch.arange(q), torch.randint(0, len(PANOPTIC_LABELS), (q,), generator=g)] += 8  # confident
    h4, w4 = padded[0] // 4, padded[1] // 4
    masks = torch.randn(q, h4, w4, generator=g) - 6
    for k in range(q):  # each query a blob; neighbours overlap, some lose to better ones
        y, x = int(torch.randint(0, h4 - 6, (1,), generator=g)), int(torch.randint(0, w4 - 6, (1,), generator=g))
        masks[k, y:y + h4 // 3, x:x + w4 // 3] += 12
    seg, segments = panoptic_from_logits(cls, masks, padded, valid, original, cats)
    ref, info = _reference_panoptic(cls, masks, padded, valid, original, things)
    assert len(info) >= 3
    assert [(s.id, s.label_index) for s in segments] == info
    assert (seg == ref.numpy()).mean() > 0.999
    for s in segments:
        assert s.isthing == (s.label_index in things)
        assert s.area == int((seg == s.id).sum())


def test_semantic_matches_reference():
    labels = {i: n for i, n in enumerate(["wall", "sky", "road", "car", "tree"])}
    cats = CategoryTable.from_id2label(labels)
    g = torch.Generator().manual_seed(2)
    cls = torch.randn(10, 6, generator=g) * 3
    masks = torch.randn(10, 24, 24, generator=g) * 4
    out, segments = semantic_from_logits(cls, masks, (96, 96), (80, 96), (200, 150), cats)
    probs = cls.softmax(-1)[:, :-1]
    ref = torch.einsum("qc,qhw->chw", probs, _full_res(masks, (96, 96), (80, 96), (200, 150)).sigmoid())
    ref_ids = ref.argmax(0).numpy() + 1  # non-COCO labels: id = index + 1
    assert out.dtype == np.uint8 and out.shape == (200, 150)
    assert (out == ref_ids).mean() > 0.999
    assert sorted(s.id for s in segments) == sorted(np.unique(out).tolist())
    assert sum(s.area for s in segments) == 200 * 150


@pytest.fixture(scope="module")
def panoptic_model(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny-coco-panoptic"), id2label=PANOPTIC_LABELS)


@pytest.fixture(scope="module")
def semantic_model(tmp_path_factory):
    labels = {i: n for i, n in enumerate(["wall", "sky", "road", "car", "tree", "person"])}
    return make_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny-ade-semantic"), id2label=labels)


@pytest.mark.parametrize("which", ["panoptic", "semantic"])
def test_other_tasks_end_to_end(tmp_path, image_dir, panoptic_model, semantic_model, which):
    model = panoptic_model if which == "panoptic" else semantic_model
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["segment", str(image_dir), "--out", str(out), "--model", model,
                                 "-f", "png", "-f", "overlay", "-f", "jsonl", "-q"])
    assert r.exit_code == 0, r.output
    for rel in ("img0", "img1", "img2", "sub/img3"):
        side = json.loads((out / f"{rel}.json").read_text())
        png = np.asarray(Image.open(out / f"{rel}.png"))
        assert side["task"] == which and png.shape == (side["height"], side["width"])
        values = set(np.unique(png).tolist()) - {0}
        assert values == {s["id"] for s in side["segments_info"]}
        for s in side["segments_info"]:
            assert s["area"] == int((png == s["id"]).sum())
        assert Image.open(out / f"{rel}.overlay.jpg").size == (side["width"], side["height"])
    if which == "semantic":
        assert len(side["legend"]) == 6 and png.dtype == np.uint8
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all("segments_info" in json.loads(l) for l in lines)
    r = CliRunner().invoke(app, ["segment", str(image_dir), "--out", str(tmp_path / "c"), "--model", model,
                                 "-f", "coco"])
    if which == "semantic":  # panoptic models write COCO panoptic results (tests/test_eval_panoptic.py)
        assert r.exit_code == 2 and "instance or panoptic results" in r.stderr
    else:
        assert r.exit_code == 0 and (tmp_path / "c" / "panoptic.json").is_file()


def _mixed_dir(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    rng = np.random.default_rng(5)
    sizes = [(640, 480), (480, 640), (640, 480), (500, 333), (640, 480), (333, 500), (640, 480), (90, 400),
             (640, 480), (1000, 200)]
    for n, (w, h) in enumerate(sizes):
        arr = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((w, h), Image.BILINEAR).save(d / f"m{n:02d}.png")
    return d


@pytest.mark.parametrize("resize", ["paper", "checkpoint"])
def test_batch_invariance(tmp_path, tiny_model, resize):
    """An image's result does not depend on what else is in its batch (transformers #39382)."""
    d = _mixed_dir(tmp_path)
    runs = {}
    for bs in (1, 3, 16):
        out = tmp_path / f"bs{bs}"
        s = run(RunConfig(inputs=[str(d)], out=str(out), model=tiny_model, device="cpu", batch_size=bs,
                          workers=0, resize=resize, formats=("png", "jsonl"), rle=True, threshold=0.3))
        assert s.images == 10
        runs[bs] = {json.loads(l)["name"]: json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()}
        assert list(runs[bs]) == sorted(runs[bs])  # output order is the input order whatever the batching
    from pycocotools import mask as mask_utils
    compared = 0
    for name, rec in runs[1].items():
        for bs in (3, 16):
            other = runs[bs][name]["instances"]
            assert [i["label"] for i in rec["instances"]] == [i["label"] for i in other]
            for a, b in zip(rec["instances"], other):
                assert abs(a["score"] - b["score"]) <= 1e-4
                ma, mb = mask_utils.decode(a["segmentation"]), mask_utils.decode(b["segmentation"])
                union = (ma | mb).sum()
                assert union == 0 or (ma & mb).sum() / union >= 0.999
                compared += 1
    assert compared > 20
