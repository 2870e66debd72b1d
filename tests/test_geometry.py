"""Known answers through the real pipeline: the planted predictor marks red and blue pixels, so the
PNG masks and sidecar boxes must reproduce the planted regions at the ORIGINAL resolution."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from m2f_cli import RunConfig, Segmenter, run

from planted import PlantedPredictor, bbox_of, iou, planted_image

SIZES = [(640, 480), (300, 500), (1000, 250), (384, 384), (517, 333), (90, 700)]


def _make(tmp_path, fmt="png"):
    d = tmp_path / "imgs"
    d.mkdir()
    truth = {}
    for n, (w, h) in enumerate(SIZES):
        img, masks = planted_image(w, h, seed=n)
        img.save(d / f"p{n}.png")
        truth[f"p{n}"] = masks
    return d, truth


@pytest.mark.parametrize("resize,batch,workers", [("checkpoint", 1, 0), ("checkpoint", 4, 1), ("paper", 3, 1)])
def test_png_masks_match_planted_regions(tmp_path, resize, batch, workers):
    d, truth = _make(tmp_path)
    out = tmp_path / "out"
    seg = Segmenter(PlantedPredictor(), resize=resize)
    summary = run(RunConfig(inputs=[str(d)], out=str(out), batch_size=batch, workers=workers), segmenter=seg)
    assert summary.images == len(SIZES) and summary.failed == 0
    compared = 0
    for rel, masks in truth.items():
        png = np.asarray(Image.open(out / f"{rel}.png"))
        side = json.loads((out / f"{rel}.json").read_text())
        h, w = masks["red"].shape
        assert png.shape == (h, w) and png.dtype == np.uint16
        assert (side["width"], side["height"]) == (w, h)
        by_label = {i["label"]: i for i in side["instances"]}
        assert set(by_label) == {"person", "dog"}
        for colour, label in (("red", "person"), ("blue", "dog")):
            inst = by_label[label]
            got = png == inst["id"]
            assert iou(got, masks[colour]) >= 0.95, (rel, colour, iou(got, masks[colour]))
            full = mask_utils.decode(inst["segmentation"]).astype(bool)
            assert iou(full, masks[colour]) >= 0.95
            tb = bbox_of(masks[colour])
            assert all(abs(a - b) <= max(3, 0.02 * max(w, h)) for a, b in zip(inst["bbox"], tb)), (inst["bbox"], tb)
            compared += 1
    assert compared == 2 * len(SIZES)


def test_batches_never_mix_shapes_in_paper_mode(tmp_path):
    """Same-shape images share a batch, never another shape's: a predictor that sees every batch
    checks, and the images of one shape are batched together (batching is on)."""
    d = tmp_path / "imgs"
    d.mkdir()
    sizes = [(640, 480), (300, 500), (640, 480), (300, 500), (640, 480), (1000, 250), (640, 480)]
    for n, (w, h) in enumerate(sizes):
        planted_image(w, h, seed=n)[0].save(d / f"im{n}.png")
    shapes = []

    class Recording(PlantedPredictor):
        def __call__(self, pixel_values):
            shapes.append(tuple(pixel_values.shape))
            return super().__call__(pixel_values)

    seg = Segmenter(Recording(), resize="paper")
    s = run(RunConfig(inputs=[str(d)], out=str(tmp_path / "o"), batch_size=4, workers=0), segmenter=seg)
    assert s.images == len(sizes)
    assert sum(b for b, *_ in shapes) == len(sizes)
    assert max(b for b, *_ in shapes) == 4  # the four 640x480 images went through as one batch
    assert len({s[2:] for s in shapes}) == 3


def test_group_batches_flushes_the_oldest_group_when_the_buffer_is_full():
    """Shapes that never fill a batch are flushed oldest first once more than max_buffered wait,
    so memory and latency stay bounded; a failed sample comes out alone at once."""
    from m2f_cli.inputs.batch import Sample, group_batches
    from m2f_cli.records import ImageRef
    import torch

    def sample(seq, shape, error=None):
        ref = ImageRef(f"{seq}.png", f"{seq}.png", str(seq), seq)
        pv = None if error else torch.zeros(3, *shape)
        return Sample(seq, ref, pv, shape, shape, error=error)
    stream = [sample(0, (8, 8)), sample(1, (8, 16)), sample(2, (16, 8)), sample(3, (0, 0), "bad"),
              sample(4, (8, 8)), sample(5, (8, 32)), sample(6, (8, 16))]
    batches = [[s.seq for s in b] for b in group_batches(stream, batch_size=3, max_buffered=3)]
    assert batches[0] == [3]                          # the failure, at once
    assert batches[1] == [0, 4]                       # buffer over 3: the oldest shape flushed, not full
    assert sorted(x for b in batches for x in b) == list(range(7))
    for b in batches:
        assert len({stream[x].shape for x in b}) == 1


def test_segmenter_api_on_arrays_and_pil():
    img, masks = planted_image(320, 240)
    seg = Segmenter(PlantedPredictor())
    r1 = seg(img)
    r2 = seg.segment([np.asarray(img)])[0]
    assert (r1.width, r1.height) == (320, 240)
    assert [i.label for i in r1.instances] == [i.label for i in r2.instances]
    red = next(i for i in r1.instances if i.label == "person")
    assert iou(r1.label_map == red.id, masks["red"]) >= 0.95
