"""Our multi-scale deformable attention (one embedding_bag) against transformers' grid_sample version."""


import pytest
import torch
from transformers.models.mask2former import modeling_mask2former as mm

from m2f_cli.model import deformable

REFERENCE = mm.multi_scale_deformable_attention


@pytest.mark.parametrize("batch, shapes, points, spill", [
    (1, [(12, 12), (6, 6), (3, 3)], 4, 0.0),
    (2, [(10, 7), (5, 4), (3, 2)], 4, 0.2),     # non-square maps, locations well outside [0, 1]
    (3, [(9, 13)], 2, 0.5),
])
def test_equals_transformers(batch, shapes, points, spill):
    g = torch.Generator().manual_seed(batch)
    heads, c = 4, 8
    s = sum(h * w for h, w in shapes)
    q, levels = 17, len(shapes)
    value = torch.randn(batch, s, heads, c, generator=g)
    loc = torch.rand(batch, q, heads, levels, points, 2, generator=g) * (1 + 2 * spill) - spill
    attn = torch.softmax(torch.randn(batch, q, heads, levels * points, generator=g), -1)
    attn = attn.view(batch, q, heads, levels, points)
    want = REFERENCE(value, shapes, loc, attn)
    got = deformable.multi_scale_deformable_attention(value, torch.tensor(shapes), loc, attn)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_model_outputs_agree_and_library_is_restored(tiny_model, monkeypatch):
    from m2f_cli.model.loading import HFPredictor, load_model, resolve_model
    pred = HFPredictor(load_model(resolve_model(tiny_model)), torch.device("cpu"))
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    used = []
    real = deformable.multi_scale_deformable_attention
    monkeypatch.setattr(deformable, "multi_scale_deformable_attention", lambda *a: used.append(1) or real(*a))
    fast_cls, fast_masks = pred(x)
    assert used, "the fast path was not taken on CPU float32"
    assert mm.multi_scale_deformable_attention is REFERENCE  # restored after the forward
    monkeypatch.setenv("M2F_FAST_DEFORMABLE", "0")
    n = len(used)
    ref_cls, ref_masks = pred(x)
    assert len(used) == n  # turned off
    torch.testing.assert_close(fast_cls, ref_cls, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_masks, ref_masks, rtol=1e-4, atol=1e-4)


def test_bfloat16_autocast_takes_the_fast_path_sampled_in_float32(tiny_model):
    """Under bf16 autocast on CPU the pixel decoder uses the embedding_bag version too (the inputs
    sampled in float32, as autocast runs grid_sample), and agrees with transformers' own bf16 path
    as closely as that path agrees with float32. Runs on any CPU (slowly where bf16 has no kernels)."""
    from m2f_cli.model.loading import HFPredictor, load_model, resolve_model
    model = load_model(resolve_model(tiny_model))
    bf16 = HFPredictor(model, torch.device("cpu"), torch.bfloat16)
    fp32 = HFPredictor(model, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calls = []
    real = deformable.multi_scale_deformable_attention

    def spy(value, shapes, locations, weights):
        calls.append((value.dtype, locations.dtype))
        return real(value, shapes, locations, weights)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deformable, "multi_scale_deformable_attention", spy)
        fast = bf16(x)
    assert calls and set(calls) == {(torch.float32, torch.float32)}
    assert mm.multi_scale_deformable_attention is REFERENCE
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("M2F_FAST_DEFORMABLE", "0")
        library = bf16(x)
    want = fp32(x)
    for f, lib, w in zip(fast, library, want):
        assert f.shape == w.shape
        assert (f.float() - w).abs().max() <= 2 * (lib.float() - w).abs().max() + 1e-2
