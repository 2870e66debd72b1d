"""m2f's own Mask2Former definition (model/native) against transformers' on the same weights:
random models of several shapes and the trained fixture, batches and sizes that are no multiple
of the windows; the fallback to transformers for what it does not cover; a run that never imports
transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from m2f_cli.model import native
from m2f_cli.model.loading import HFPredictor, NativePredictor, eager_predictor, load_model, resolve_model
from tiny import make_tiny_model

CPU = torch.device("cpu")
FIXTURE = Path(__file__).parent / "fixtures" / "shapes_model"


def _both(folder: str, x: torch.Tensor, dtype: torch.dtype = torch.float32):
    want = HFPredictor(load_model(resolve_model(folder)), CPU, dtype)(x)
    model = native.load(folder)
    assert model is not None
    got = NativePredictor(model, CPU, dtype)(x)
    return got, want


def _assert_close(got, want, atol_logits: float = 1e-4):
    (cls, masks), (cls_w, masks_w) = got, want
    assert cls.shape == cls_w.shape and masks.shape == masks_w.shape
    torch.testing.assert_close(cls, cls_w, atol=atol_logits, rtol=1e-4)
    torch.testing.assert_close(masks, masks_w, atol=atol_logits * 10, rtol=1e-3)


@pytest.mark.parametrize("size,batch", [((384, 384), 1), ((100, 75), 2), ((200, 333), 1)])
def test_trained_fixture_matches_transformers(size, batch):
    torch.manual_seed(1)
    x = torch.randn(batch, 3, *size)
    got, want = _both(str(FIXTURE), x)
    _assert_close(got, want)
    # the masks m2f cuts from them: the same pixels (no logit near 0 moves across it here)
    assert torch.equal(got[1] > 0, want[1] > 0)


@pytest.mark.parametrize("kwargs", [
    {},  # tiny_config: window 4, one block per stage (no shifted block), 3 decoder layers
    {"depths": [2, 2, 2, 2], "window_size": 7, "num_heads": [1, 2, 2, 4], "decoder_layers": 5},
    {"feature_size": 64, "enforce_input_projection": True},  # decoder input projections
])
def test_random_models_match_transformers(tmp_path, kwargs):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    backbone = SwinConfig(embed_dim=16, depths=kwargs.pop("depths", [1, 1, 1, 1]),
                          num_heads=kwargs.pop("num_heads", [1, 1, 1, 1]), window_size=kwargs.pop("window_size", 4),
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = dict(hidden_dim=32, mask_feature_size=32, feature_size=32, num_queries=12, encoder_layers=2,
               decoder_layers=3, dim_feedforward=64, encoder_feedforward_dim=64, num_attention_heads=2, num_labels=7)
    cfg.update(kwargs)
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=backbone, **cfg)).save_pretrained(tmp_path)
    x = torch.randn(2, 3, 224, 160)
    got, want = _both(str(tmp_path), x)
    _assert_close(got, want)


def test_bf16_autocast_as_close_to_float32_as_transformers(tiny_model):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("bfloat16 autocast on this CPU has no fast kernels; m2f refuses --dtype bfloat16 here")
    torch.manual_seed(2)
    x = torch.randn(1, 3, 128, 128)
    (cls, masks), (cls_w, masks_w) = _both(tiny_model, x, torch.bfloat16)
    (cls32, masks32), _ = _both(tiny_model, x, torch.float32)
    # both round to bf16 in different places: each is judged by its distance to float32
    err, err_w = (cls.float() - cls32).abs().max().item(), (cls_w.float() - cls32).abs().max().item()
    assert err <= 2 * err_w + 0.05, (err, err_w)
    agree, agree_w = [((m > 0) == (masks32 > 0)).float().mean().item() for m in (masks, masks_w)]
    assert agree >= agree_w - 0.01 and agree > 0.97, (agree, agree_w)


def _copy(src: str, dst: Path) -> Path:
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((Path(src) / name).read_bytes())
    return dst


def test_unsupported_config_falls_back_to_transformers(tmp_path, tiny_model):
    d = _copy(tiny_model, tmp_path / "prenorm")
    cfg = json.loads((d / "config.json").read_text())
    cfg["pre_norm"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    assert native.unsupported(cfg) == "pre-norm decoder"
    assert native.load(str(d)) is None
    pred = eager_predictor(resolve_model(str(d)), CPU, torch.float32)
    assert type(pred) is HFPredictor


def test_unknown_weight_falls_back_to_transformers(tmp_path, tiny_model):
    d = _copy(tiny_model, tmp_path / "extra")
    state = load_file(str(d / "model.safetensors"))
    state["model.transformer_module.extra.weight"] = torch.zeros(3)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert native.load(str(d)) is None


def test_env_switch_and_default(tiny_model, monkeypatch):
    source = resolve_model(tiny_model)
    assert type(eager_predictor(source, CPU, torch.float32)) is NativePredictor
    monkeypatch.setenv("M2F_NATIVE_MODEL", "0")
    assert type(eager_predictor(source, CPU, torch.float32)) is HFPredictor


def test_a_first_run_never_imports_transformers(tmp_path, tiny_model):
    """The point of the native model: a run without a start-up cache entry does not pay for
    transformers' import. The real CLI in a subprocess, with an empty cache."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image
    Image.new("RGB", (96, 64), (120, 30, 200)).save(imgs / "a.png")
    env = dict(os.environ, HF_HUB_OFFLINE="1", M2F_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "m2f_cli", "segment", str(imgs),
                        "--out", str(tmp_path / "out"), "--model", tiny_model],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "m2f_cli.model.native.swin" in imported  # the probe sees the run's imports
    assert not [m for m in imported if m.split(".")[0] == "transformers"]
    assert (tmp_path / "out").is_dir() and any((tmp_path / "out").rglob("*.png"))


def test_reference_deformable_attention_path_matches(monkeypatch):
    """Off CPU (or with M2F_FAST_DEFORMABLE=0) the pixel decoder samples with grid_sample, as
    transformers does: that path, run here on CPU, gives the same outputs as the fast one."""
    torch.manual_seed(3)
    x = torch.randn(1, 3, 160, 224)
    fast, want = _both(str(FIXTURE), x)
    monkeypatch.setenv("M2F_FAST_DEFORMABLE", "0")
    reference = NativePredictor(native.load(str(FIXTURE)), CPU)(x)
    _assert_close(reference, want)
    _assert_close(reference, fast)
