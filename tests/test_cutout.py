"""``--format cutout``: geometry, colours, alpha, naming, visible parts, resume, settings, remote, shards."""

import json

import fsspec
import numpy as np
import pytest
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from m2f_cli import RunConfig, Segmenter, run
from m2f_cli.errors import UsageError
from m2f_cli.outputs.writers.cutout import safe_label

from planted import PlantedPredictor, planted_dir, planted_image

SIZES = [(320, 240), (200, 300), (500, 180)]


class Overlapping(PlantedPredictor):
    """Three instances whatever the pixels: person (score ~1.0) on columns [0, W/2), dog (~0.73) on
    [W/3, W), cat (~0.62) on [0, W/4): the dog half hidden, the cat hidden entirely under the person."""

    def __call__(self, pixel_values):
        cls, masks = super().__call__(pixel_values)
        w = masks.shape[-1]
        masks[:] = -20.0
        masks[:, 0, :, : w // 2] = 20.0
        masks[:, 1, :, w // 3:] = 20.0
        masks[:, 2, :, : w // 4] = 20.0
        cls[:, 1, 16], cls[:, 1, 80] = 2.0, 1.0
        cls[:, 2, :] = -10.0
        cls[:, 2, 15], cls[:, 2, 80] = 2.0, 1.5
        return cls, masks


def _rle(seg):
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


def _cutouts(out, stem):
    index = json.loads((out / "cutouts" / stem / "index.json").read_text())
    files = sorted(p.name for p in (out / "cutouts" / stem).glob("*.png"))
    assert files == [c["file"] for c in index["cutouts"]]  # the index names exactly the files, in name order
    return index


def _rgba(path):
    with Image.open(path) as im:
        assert im.mode == "RGBA"
        return np.asarray(im)


def test_cutouts_are_the_masks_in_the_image_colours(tmp_path):
    d, truth = planted_dir(tmp_path, SIZES)
    out = tmp_path / "out"
    s = run(RunConfig(inputs=[str(d)], out=str(out), formats=("png", "cutout"), workers=0, cutout_pad=7),
            segmenter=Segmenter(PlantedPredictor()))
    assert s.failed == 0
    checked = 0
    for n, (w, h) in enumerate(SIZES):
        rgb = np.asarray(Image.open(d / f"im{n}.png").convert("RGB"))
        side = json.loads((out / f"im{n}.json").read_text())
        index = _cutouts(out, f"im{n}")
        assert [c["id"] for c in index["cutouts"]] == [i["id"] for i in side["instances"]] == [1, 2]
        assert [c["file"] for c in index["cutouts"]] == [f"{i['id']:03d}_{i['label']}.png" for i in side["instances"]]
        scores = [c["score"] for c in index["cutouts"]]
        assert scores == sorted(scores, reverse=True)  # file order is score order
        for c, inst in zip(index["cutouts"], side["instances"]):
            x, y, bw, bh = inst["bbox"]
            x0, y0 = max(0, x - 7), max(0, y - 7)
            x1, y1 = min(w, x + bw + 7), min(h, y + bh + 7)
            assert c["box"] == [x0, y0, x1 - x0, y1 - y0]
            rgba = _rgba(out / "cutouts" / f"im{n}" / c["file"])
            assert rgba.shape == (y1 - y0, x1 - x0, 4)
            inside = _rle(inst["segmentation"])[y0:y1, x0:x1]
            assert np.array_equal(rgba[..., 3] == 255, inside) and set(np.unique(rgba[..., 3])) == {0, 255}
            assert np.array_equal(rgba[..., :3][inside], rgb[y0:y1, x0:x1][inside])
            assert not rgba[..., :3][~inside].any()  # nothing of the background leaks
            colour = "red" if inst["label"] == "person" else "blue"
            assert (inside & truth[f"im{n}.png"][colour][y0:y1, x0:x1]).sum() > 0.9 * inside.sum()
            checked += 1
    assert checked == 2 * len(SIZES)


def test_visible_cutouts_are_what_the_map_shows(tmp_path):
    d, _ = planted_dir(tmp_path, SIZES[:1])
    whole, visible = tmp_path / "whole", tmp_path / "visible"
    for out, vis in ((whole, False), (visible, True)):
        run(RunConfig(inputs=[str(d)], out=str(out), formats=("png", "cutout"), workers=0, cutout_visible=vis),
            segmenter=Segmenter(Overlapping()))
    side = json.loads((whole / "im0.json").read_text())
    assert [i["label"] for i in side["instances"]] == ["person", "dog", "cat"]
    imap = np.asarray(Image.open(whole / "im0.png"))
    a, b = _cutouts(whole, "im0")["cutouts"], _cutouts(visible, "im0")["cutouts"]
    assert [c["label"] for c in a] == ["person", "dog", "cat"]
    assert [c["label"] for c in b] == ["person", "dog"]  # the cat shows no pixel
    for c, inst in zip(a, side["instances"]):  # whole: the RLE, overlaps included
        x, y, w, h = c["box"]
        assert np.array_equal(_rgba(whole / "cutouts/im0" / c["file"])[..., 3] > 0,
                              _rle(inst["segmentation"])[y:y + h, x:x + w])
    for c in b:  # visible: the pixels of the map, box shrunk to them
        x, y, w, h = c["box"]
        shown = imap == c["id"]
        ys, xs = np.nonzero(shown)
        assert [x, y, w, h] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert np.array_equal(_rgba(visible / "cutouts/im0" / c["file"])[..., 3] > 0, shown[y:y + h, x:x + w])
    assert b[1]["box"][2] < a[1]["box"][2]  # the dog's hidden part is cut off


def test_exif_orientation_is_applied(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    upright, truth = planted_image(300, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned; a viewer rotates it 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(d / "turned.png", exif=exif)
    with Image.open(d / "turned.png") as im:
        shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert shown.shape == (200, 300, 3)
    out = tmp_path / "out"
    run(RunConfig(inputs=[str(d)], out=str(out), formats=("cutout",), workers=0),
        segmenter=Segmenter(PlantedPredictor()))
    person = next(c for c in _cutouts(out, "turned")["cutouts"] if c["label"] == "person")
    x, y, w, h = person["box"]
    rgba = _rgba(out / "cutouts/turned" / person["file"])
    inside = rgba[..., 3] > 0
    assert np.array_equal(rgba[..., :3][inside], shown[y:y + h, x:x + w][inside])
    assert (inside & truth["red"][y:y + h, x:x + w]).sum() > 0.9 * inside.sum()


def test_labels_become_safe_file_names():
    assert safe_label("sports ball") == "sports-ball"
    assert safe_label("a/b..c") == "a-b-c"
    assert safe_label("été_2") == "été_2"
    assert safe_label("../") == "object"


def test_resume_settings_record_and_overwrite(tmp_path):
    d, _ = planted_dir(tmp_path, SIZES[:2])
    out = tmp_path / "out"
    cfg = RunConfig(inputs=[str(d)], out=str(out), formats=("cutout",), workers=0)
    assert run(cfg, segmenter=Segmenter(Overlapping())).images == 2
    assert run(cfg, segmenter=Segmenter(Overlapping())).skipped == 2
    record = json.loads((out / ".m2f" / "cutout.settings.json").read_text())["settings"]
    assert (record["cutout_pad"], record["cutout_visible"]) == (0, False)
    with pytest.raises(UsageError, match="cutout_pad: 0 -> 3"):
        run(RunConfig(inputs=[str(d)], out=str(out), formats=("cutout",), workers=0, cutout_pad=3),
            segmenter=Segmenter(Overlapping()))
    assert [c["label"] for c in _cutouts(out, "im0")["cutouts"]] == ["person", "dog", "cat"]
    s = run(RunConfig(inputs=[str(d)], out=str(out), formats=("cutout",), workers=0, threshold=0.7,
                      overwrite=True), segmenter=Segmenter(Overlapping()))
    assert s.images == 2
    for stem in ("im0", "im1"):  # the cat (0.62) is gone, its file with it
        assert [c["label"] for c in _cutouts(out, stem)["cutouts"]] == ["person", "dog"]


def test_a_negative_pad_is_refused(tmp_path):
    d, _ = planted_dir(tmp_path, SIZES[:1])
    with pytest.raises(UsageError, match="--cutout-pad"):
        run(RunConfig(inputs=[str(d)], out=str(tmp_path / "out"), formats=("cutout",), cutout_pad=-1),
            segmenter=Segmenter(PlantedPredictor()))


def test_remote_output_and_shards(tmp_path):
    d, _ = planted_dir(tmp_path, SIZES)
    fs = fsspec.filesystem("memory")
    root = f"/cutout-test-{tmp_path.name}"
    url = f"memory://{root}"
    try:
        for i in range(2):
            run(RunConfig(inputs=[str(d)], out=url, formats=("cutout",), workers=0, shard=(i, 2)),
                segmenter=Segmenter(PlantedPredictor()))
        local = tmp_path / "local"
        run(RunConfig(inputs=[str(d)], out=str(local), formats=("cutout",), workers=0),
            segmenter=Segmenter(PlantedPredictor()))
        for n in range(len(SIZES)):
            index = json.loads(fs.cat_file(f"{root}/cutouts/im{n}/index.json"))
            assert index == json.loads((local / f"cutouts/im{n}/index.json").read_text())
            for c in index["cutouts"]:
                assert fs.cat_file(f"{root}/cutouts/im{n}/{c['file']}") == \
                    (local / f"cutouts/im{n}/{c['file']}").read_bytes()
        s = run(RunConfig(inputs=[str(d)], out=url, formats=("cutout",), workers=0),
                segmenter=Segmenter(PlantedPredictor()))
        assert s.skipped == len(SIZES)
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_segments_of_panoptic_and_semantic_maps_are_cut_from_the_map():
    """Hand-made records: a semantic map with two regions; a pad larger than the margins is clipped."""
    from m2f_cli.records import ImageRef, ImageResult, Segment
    from m2f_cli.outputs.writers.cutout import cut_out
    imap = np.zeros((60, 80), np.uint8)
    imap[10:30, 5:25] = 7
    imap[40:60, 50:80] = 21
    imap[12:14, 60:62] = 21  # a second part far away: the box spans both
    segs = [Segment(7, "grass", 7, 3, False, None, int((imap == 7).sum()), (5, 10, 20, 20)),
            Segment(21, "sky sky", 21, 9, False, None, int((imap == 21).sum()), (50, 12, 30, 48))]
    result = ImageResult(ImageRef("x", "x", "x", 0), 80, 60, [], imap, 0.0, task="semantic", segments=segs)
    rgb = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    cuts = cut_out(rgb, result, threshold=0.9, pad=40)
    assert [c.file for c in cuts] == ["007_grass.png", "021_sky-sky.png"]
    assert [c.box for c in cuts] == [(0, 0, 65, 60), (10, 0, 70, 60)]
    for c in cuts:
        x, y, w, h = c.box
        inside = imap[y:y + h, x:x + w] == c.id
        assert np.array_equal(c.rgba[..., 3] == 255, inside) and c.score is None
        assert np.array_equal(c.rgba[..., :3][inside], rgb[y:y + h, x:x + w][inside])
    with pytest.raises(ValueError, match="not the result's"):
        cut_out(rgb[:, :70], result, 0.5)
