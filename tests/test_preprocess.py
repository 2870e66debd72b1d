import numpy as np
import pytest
from PIL import Image

from m2f_cli.inputs.decode import decode
from m2f_cli.inputs.preprocess import (PreprocessSpec, load_checkpoint_spec, paper_resized_size, preprocess,
    spec_for_resize, spec_from_processor_dict)

from tiny import CHECKPOINT_PREPROCESSOR


def _photo(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    arr = np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.convert(mode) if mode != "RGB" else img


@pytest.mark.parametrize("size,mode", [((640, 480), "RGB"), ((333, 517), "RGB"), ((1000, 37), "RGB"),
                                       ((384, 384), "RGB"), ((250, 180), "L"), ((300, 200), "RGBA"),
                                       ((301, 199), "P"), ((210, 160), "CMYK")])
def test_checkpoint_mode_matches_transformers(tmp_path, tiny_model, size, mode):
    """Same pixel_values as Mask2FormerImageProcessorPil for the same upright RGB image."""
    from transformers.models.mask2former import Mask2FormerImageProcessorPil
    hf = Mask2FormerImageProcessorPil.from_pretrained(tiny_model)
    p = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    _photo(*size, mode=mode).save(p)
    rgb = decode(str(p)).rgb
    ours = preprocess(rgb, load_checkpoint_spec(tiny_model))
    theirs = hf(images=Image.fromarray(rgb), return_tensors="np")["pixel_values"][0]
    assert ours.pixel_values.shape == theirs.shape == (3, 384, 384)
    assert np.abs(ours.pixel_values - theirs).max() <= 1e-4
    assert ours.valid == (384, 384)


def test_spec_reads_legacy_keys():
    spec = spec_from_processor_dict(CHECKPOINT_PREPROCESSOR)
    assert (spec.mode, spec.height, spec.width, spec.size_divisor) == ("fixed", 384, 384, 32)
    legacy = spec_from_processor_dict({"size": 800, "max_size": 1333, "size_divisibility": 32})
    assert (legacy.mode, legacy.short, legacy.long) == ("hf_shortest", 800, 1333)


def _reference_paper(h, w, short=800, long=1333):
    """Straight from docs/mask2former.md: scale the shortest edge to 800, cap the longest at 1333,
    sizes rounded int(x + 0.5); pad bottom/right to a multiple of 32."""
    s = short / min(h, w)
    if max(h, w) * s > long:
        s = long / max(h, w)
    nh, nw = int(h * s + 0.5), int(w * s + 0.5)
    return (nh, nw), (-(-nh // 32) * 32, -(-nw // 32) * 32)


@pytest.mark.parametrize("h,w", [(480, 640), (427, 640), (333, 517), (1080, 1920), (3000, 4000),
                                 (37, 1000), (601, 599), (800, 1333), (1, 1)])
def test_paper_sizes_match_protocol(h, w):
    spec = spec_for_resize("paper", PreprocessSpec())
    (rh, rw), (ph, pw) = _reference_paper(h, w)
    assert spec.resized_size(h, w) == (rh, rw)
    assert spec.padded_size(h, w) == (ph, pw)
    assert paper_resized_size(h, w, 800, 1333) == (rh, rw)


def test_paper_mode_normalises_then_pads_bottom_right():
    rgb = np.asarray(_photo(517, 333))
    spec = spec_for_resize("paper", PreprocessSpec())
    mi = preprocess(rgb, spec)
    (rh, rw), (ph, pw) = _reference_paper(333, 517)
    assert mi.pixel_values.shape == (3, ph, pw) and mi.valid == (rh, rw)
    ref = np.asarray(Image.fromarray(rgb).resize((rw, rh), Image.BILINEAR), np.float32) / 255.0
    ref = (ref - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    assert np.abs(mi.pixel_values[:, :rh, :rw] - ref.transpose(2, 0, 1)).max() <= 1e-5
    # zero padding AFTER normalisation (not normalised zeros): exactly 0 outside the valid area
    assert np.all(mi.pixel_values[:, rh:, :] == 0) and np.all(mi.pixel_values[:, :, rw:] == 0)
    assert ph > rh or pw > rw


def test_custom_resize_and_errors():
    spec = spec_for_resize("512,640", PreprocessSpec())
    assert spec.resized_size(480, 640) == (480, 640)  # 512/480*640 = 683 > 640 -> capped
    assert spec_for_resize("600", PreprocessSpec()).long is None
    for bad in ("big", "10", "1,2,3"):
        with pytest.raises(ValueError):
            spec_for_resize(bad, PreprocessSpec())
