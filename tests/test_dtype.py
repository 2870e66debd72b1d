"""bfloat16 against float32 on the same trained model: the masks must agree.

m2f refuses ``--dtype bfloat16`` on CPUs without bf16 kernels (it runs ~35x slower there), so the
two predictors are built directly here: the question is what bf16 arithmetic does to the masks,
not how fast it is. tests/fixtures/shapes_model gives meaningful masks (see test_trained_model.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2f_cli.tools.evaluate import Agreement
from m2f_cli.model.loading import HFPredictor, load_model, resolve_model
from m2f_cli.inputs.preprocess import load_checkpoint_spec
from m2f_cli.segmenter import Segmenter

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "fixtures" / "shapes_model"
sys.path.insert(0, str(ROOT / "scripts"))
import shapes  # noqa: E402

CPU = torch.device("cpu")


def _segmenter(model, dtype: torch.dtype) -> Segmenter:
    pred = HFPredictor(model, CPU, dtype)
    pred.preprocess_spec = load_checkpoint_spec(str(MODEL))
    return Segmenter(pred, threshold=0.5)


def test_bfloat16_masks_agree_with_float32(tmp_path):
    shapes.write_val_set(str(tmp_path), n=12, seed=777)
    model = load_model(resolve_model(str(MODEL)))
    fp32, bf16 = _segmenter(model, torch.float32), _segmenter(model, torch.bfloat16)
    agreement = Agreement()
    for f in sorted(p for p in os.listdir(tmp_path) if p.endswith(".jpg")):
        rgb = np.asarray(Image.open(tmp_path / f).convert("RGB"))
        agreement.add(fp32(rgb), bf16(rgb))
    s = agreement.summary()
    # measured (12 images): 56/56 instances matched, mean IoU 0.994 (min 0.857), scores within
    # 0.0076, 99.984% of pixels drawn with the same class
    assert s["instances_a"] >= 20
    assert s["matched_fraction"] >= 0.9, s
    assert s["mean_iou"] >= 0.95, s
    assert s["pixel_agreement"] >= 0.99, s


def test_agreement_counts_what_differs(planted):
    from planted import planted_image
    seg = Segmenter(planted, threshold=0.5)
    img, _ = planted_image(400, 300, seed=4)
    a = seg(img)
    assert len(a.instances) >= 2
    same = Agreement()
    same.add(a, a)
    assert same.summary()["matched_fraction"] == 1.0 and same.summary()["pixel_agreement"] == 1.0
    assert same.summary()["mean_iou"] == 1.0

    # one instance lost: it is unmatched and its pixels no longer agree
    b = seg(img)
    lost = b.instances.pop()
    b.label_map = np.where(b.label_map == lost.id, 0, b.label_map).astype(b.label_map.dtype)
    fewer = Agreement()
    fewer.add(a, b)
    assert fewer.matched == len(a.instances) - 1
    drawn = int((a.label_map == lost.id).sum())
    assert fewer.pixel_agreement == pytest.approx(1 - drawn / a.label_map.size)

    # the same masks under another class do not match
    c = seg(img)
    c.instances = [replace(i, label_index=i.label_index + 1) for i in c.instances]
    other = Agreement()
    other.add(a, c)
    assert other.matched == 0 and other.pixel_agreement < 1.0
