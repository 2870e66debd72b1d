import numpy as np
import pytest
from PIL import Image

from m2f_cli.errors import DecodeError
from m2f_cli.inputs.decode import decode
from m2f_cli.inputs.preprocess import PreprocessSpec


def _rgb(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_modes_become_rgb(tmp_path):
    base = Image.fromarray(_rgb(40, 30))
    cases = {"l.png": base.convert("L"), "rgba.png": base.convert("RGBA"), "p.png": base.convert("P"),
             "cmyk.jpg": base.convert("CMYK"), "la.png": base.convert("LA"), "one.png": base.convert("1")}
    for name, img in cases.items():
        img.save(tmp_path / name)
        d = decode(str(tmp_path / name))
        assert d.rgb.shape == (30, 40, 3) and d.rgb.dtype == np.uint8, name
        assert (d.width, d.height) == (40, 30)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(arr).save(tmp_path / "g16.png")
    d = decode(str(tmp_path / "g16.png"))
    assert d.rgb[0, 0, 0] == 0 and d.rgb[0, -1, 0] == 255
    assert 120 <= d.rgb[0, 32, 0] <= 135  # mid-grey stays mid-grey (clipping would give 255)


def test_exif_orientation_is_applied(tmp_path):
    # Stored landscape 60x20 with a red left part; orientation 6 = rotate 90 CW to display.
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    d = decode(str(tmp_path / "rot.jpg"))
    assert (d.width, d.height) == (20, 60) and d.rgb.shape == (60, 20, 3)
    assert d.rgb[2, 10, 0] > 200 and d.rgb[-3, 10, 0] < 60  # red ends up at the top


def test_first_frame_of_animation_and_multipage(tmp_path):
    frames = [Image.new("RGB", (16, 12), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "m.tiff", save_all=True, append_images=frames[1:])
    for name in ("a.gif", "m.tiff"):
        d = decode(str(tmp_path / name))
        assert d.rgb.shape == (12, 16, 3) and d.rgb[0, 0, 0] > 200 and d.rgb[0, 0, 1] < 50


@pytest.mark.parametrize("content,needle", [(b"", "cannot identify"), (b"hello, not an image", "cannot identify")])
def test_not_images(tmp_path, content, needle):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(DecodeError) as e:
        decode(str(p))
    assert needle in str(e.value) and str(p) not in str(e.value)


def test_truncated_jpeg(tmp_path):
    Image.fromarray(_rgb(200, 150)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError) as e:
        decode(str(tmp_path / "cut.jpg"))
    assert "truncated" in str(e.value)


def test_pixel_limit_checked_before_decoding(tmp_path):
    Image.new("L", (4000, 3000)).save(tmp_path / "big.png")
    with pytest.raises(DecodeError) as e:
        decode(str(tmp_path / "big.png"), max_pixels=1_000_000)
    assert "too large" in str(e.value) and "4000x3000" in str(e.value)
    assert decode(str(tmp_path / "big.png"), max_pixels=None).rgb.shape == (3000, 4000, 3)


def test_draft_decode_keeps_the_original_size(tmp_path):
    Image.fromarray(_rgb(2000, 1500)).save(tmp_path / "big.jpg")
    d = decode(str(tmp_path / "big.jpg"), draft=PreprocessSpec())
    assert (d.width, d.height) == (2000, 1500)
    assert d.rgb.shape[0] >= 384 and d.rgb.shape[1] >= 384 and d.rgb.shape[1] < 2000


def test_tiny_and_extreme_aspect(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "1.png")
    Image.new("RGB", (10000, 20)).save(tmp_path / "wide.png")
    assert decode(str(tmp_path / "1.png")).rgb.shape == (1, 1, 3)
    assert decode(str(tmp_path / "wide.png")).rgb.shape == (20, 10000, 3)


@pytest.mark.parametrize("ext", ["heic", "avif"])
def test_heic_and_avif_photos_decode_upright(tmp_path, ext):
    """Stored landscape 60x20, red on the left, EXIF orientation 6: decoded upright 20x60 with the
    red on top, whichever plugin reads the format (pillow-heif for HEIC, Pillow for AVIF)."""
    from m2f_cli.inputs.decode import _register_plugins
    _register_plugins()
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :15] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / f"photo.{ext}"
    img.save(path, exif=exif.tobytes(), quality=95)
    d = decode(str(path))
    assert (d.width, d.height) == (20, 60) and d.rgb.shape == (60, 20, 3)
    assert d.rgb[3, 10, 0] > 180 and d.rgb[-4, 10, 0] < 80  # red ends up at the top, once
