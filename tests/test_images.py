"""runtime.images: every decoding case with real files written here, and the overlay geometry."""

from __future__ import annotations

import io
import os
import time
import warnings

import numpy as np
import pytest
from bundles import bomb_png, photo
from PIL import Image

from runtime import images
from runtime.contract import Preprocessing
from runtime.images import ImageError, load_image, overlay, saliency_to_image

RGB = photo(24, 40)  # H=24, W=40


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


# ------------------------------------------------------------------------------- lossless formats


@pytest.mark.parametrize("ext,kw", [("png", {}), ("bmp", {}), ("tif", {}), ("tiff", {"compression": "tiff_lzw"}),
                                    ("webp", {"lossless": True}), ("ppm", {}), ("tga", {})])
def test_lossless_formats_round_trip(tmp_path, ext, kw):
    p = _save(Image.fromarray(RGB), tmp_path / f"x.{ext}", **kw)
    out = load_image(p)
    assert out.dtype == np.uint8 and out.shape == (24, 40, 3)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("ext,kw", [("jpg", {"quality": 95}), ("webp", {"quality": 90})])
def test_lossy_formats(tmp_path, ext, kw):
    out = load_image(_save(Image.fromarray(RGB), tmp_path / f"x.{ext}", **kw))
    assert out.shape == (24, 40, 3)
    assert np.abs(out.astype(int) - RGB).mean() < 6


def test_file_object_and_pil_and_array_inputs(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(RGB).save(buf, format="PNG")
    buf.seek(0)
    np.testing.assert_array_equal(load_image(buf), RGB)
    np.testing.assert_array_equal(load_image(Image.fromarray(RGB)), RGB)
    np.testing.assert_array_equal(load_image(RGB), RGB)
    gray = RGB[..., 0]
    np.testing.assert_array_equal(load_image(gray), np.repeat(gray[..., None], 3, 2))
    rgba = np.concatenate([RGB, np.full((24, 40, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(load_image(rgba), RGB)


# ------------------------------------------------------------------------------- modes and depths


def test_16bit_grayscale_png_scaled_to_8bit(tmp_path):
    v = np.tile(np.arange(0, 256, 8, dtype=np.uint16), (8, 1))  # 8 x 32
    p = tmp_path / "g16.png"
    Image.fromarray(v * 257).save(p)
    assert Image.open(p).mode.startswith("I")  # really a 16-bit file
    out = load_image(p)
    assert out.shape == (8, 32, 3)
    np.testing.assert_array_equal(out[..., 0], v.astype(np.uint8))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_dark_16bit_png_is_not_mistaken_for_8bit(tmp_path):
    v = np.full((4, 4), 200, np.uint16)  # 200/65535: nearly black
    p = tmp_path / "dark16.png"
    Image.fromarray(v).save(p)
    assert load_image(p).max() <= 1


def test_16bit_tiff_and_float_tiff(tmp_path):
    v = np.tile(np.arange(0, 256, 16, dtype=np.uint16), (4, 1))
    Image.fromarray(v * 257).save(tmp_path / "g16.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "g16.tif")[..., 1], v.astype(np.uint8))
    f = (v / 255.0).astype(np.float32)  # float image in 0..1
    Image.fromarray(f, mode="F").save(tmp_path / "f.tif")
    out = load_image(tmp_path / "f.tif")[..., 0].astype(int)
    assert np.abs(out - v).max() <= 1


def test_grayscale_and_bilevel(tmp_path):
    gray = RGB[..., 1]
    out = load_image(_save(Image.fromarray(gray), tmp_path / "l.png"))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, 2))
    bw = Image.fromarray(gray > 128).convert("1")
    out = load_image(_save(bw, tmp_path / "bw.png"))
    assert set(np.unique(out)) <= {0, 255} and out.shape == (24, 40, 3)


def test_rgba_png_drops_alpha(tmp_path):
    a = np.concatenate([RGB, np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None].repeat(24, 0)], axis=2)
    p = _save(Image.fromarray(a, "RGBA"), tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(p), RGB)
    la = Image.fromarray(RGB[..., 0]).convert("LA")
    out = load_image(_save(la, tmp_path / "la.png"))
    np.testing.assert_array_equal(out[..., 2], RGB[..., 0])


def _palette_image() -> tuple[Image.Image, np.ndarray]:
    idx = (np.arange(24 * 40).reshape(24, 40) // 40 % 4).astype(np.uint8)  # rows of 4 colours
    pal = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]
    img = Image.fromarray(idx, "P")
    img.putpalette(pal + [0] * (768 - len(pal)))
    want = np.asarray(pal, np.uint8).reshape(4, 3)[idx]
    return img, want


@pytest.mark.parametrize("ext", ["gif", "png"])
def test_palette_with_transparency(tmp_path, ext):
    img, want = _palette_image()
    p = tmp_path / f"pal.{ext}"
    img.save(p, transparency=3)
    src = Image.open(p)
    assert src.mode == "P" and "transparency" in src.info
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow warns when a P+transparency image goes straight to RGB
        out = load_image(p)
    np.testing.assert_array_equal(out, want)


def test_cmyk_jpeg(tmp_path):
    p = _save(Image.fromarray(RGB).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    out = load_image(p)
    assert out.shape == (24, 40, 3)
    assert np.abs(out.astype(int) - RGB).mean() < 10


def test_exif_orientation_applied(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # stored landscape: left half red, right half blue
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    img = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif, quality=95)
    out = load_image(p)
    assert out.shape == (40, 20, 3)  # displayed portrait
    top, bottom = out[:15].reshape(-1, 3).mean(0), out[25:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50  # the stored left edge is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_multiframe_gif_uses_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((8, 8, 3), c, np.uint8)) for c in (10, 200)]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert load_image(p).shape == (8, 8, 3)
    assert load_image(p).mean() < 50


# ------------------------------------------------------------------------------------ bad inputs


def test_decompression_bomb_header_refused_without_decoding(tmp_path):
    p = bomb_png(tmp_path / "bomb.png")
    assert p.stat().st_size < 200
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="bomb") as e:
        load_image(p)
    assert time.perf_counter() - t0 < 1.0
    assert str(p) in str(e.value)


def test_pixel_limit_below_pillows(tmp_path):
    p = bomb_png(tmp_path / "big.png", 5000, 5000)  # 25 Mpx: under Pillow's own limit
    with pytest.raises(ImageError, match="over the limit of 1,000,000"):
        load_image(p, max_pixels=1_000_000)
    q = _save(Image.fromarray(RGB), tmp_path / "ok.png")
    assert load_image(q, max_pixels=24 * 40).shape == (24, 40, 3)
    with pytest.raises(ImageError, match="960 pixels is over the limit of 959"):
        load_image(q, max_pixels=24 * 40 - 1)


def test_truncated_jpeg(tmp_path):
    good = _save(Image.fromarray(photo(64, 64)), tmp_path / "good.jpg", quality=95)
    p = tmp_path / "trunc.jpg"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(p)


def test_truncated_png(tmp_path):
    good = _save(Image.fromarray(photo(64, 64)), tmp_path / "good.png")
    p = tmp_path / "trunc.png"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(p)


@pytest.mark.parametrize("content", [b"this is not a picture\n", b"", b"\xff\xd8\xff\xe0garbage"])
def test_not_an_image(tmp_path, content):
    p = tmp_path / "fake.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_eps_is_refused(tmp_path):
    """Pillow would hand an EPS to Ghostscript: not a format an explainer should open."""
    p = tmp_path / "x.eps"
    p.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageError, match="not an image this reader accepts"):
        load_image(p)


def test_missing_directory_and_wrong_types(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="uint8"):
        load_image(RGB.astype(np.float32))
    with pytest.raises(ImageError, match="H x W x 3"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        load_image(42)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    p = _save(Image.fromarray(RGB), tmp_path / "locked.png")
    p.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission denied"):
            load_image(p)
    finally:
        p.chmod(0o644)


# ---------------------------------------------------------------------------- preprocessing, overlay


def test_preprocess_resizes_to_input_size():
    pre = Preprocessing((16, 8), "BGR", 1 / 255, (0, 0, 0), (1, 1, 1))
    x = images.preprocess(RGB, pre)
    assert x.shape == (1, 3, 16, 8) and x.dtype == np.float32
    small = images.resize_rgb(RGB, (16, 8))
    np.testing.assert_allclose(x[0, 0], small[..., 2] / 255, atol=1e-6)  # BGR order


def test_saliency_mapped_back_onto_original_aspect():
    sal = np.zeros((32, 32), np.float32)
    sal[:, :16] = 1.0  # left half of what the network saw
    wide = saliency_to_image(sal, (30, 90))
    assert wide.shape == (30, 90)
    assert wide[:, :40].min() > 0.99 and wide[:, 50:].max() < 0.01
    tall = saliency_to_image(sal, (90, 30))
    assert tall.shape == (90, 30) and tall[:, :13].min() > 0.99


def test_overlay_size_and_alpha():
    sal = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    out = overlay(RGB, sal, 0.5)
    assert out.shape == RGB.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay(RGB, sal, 0.0), RGB)
    heat = overlay(RGB, sal, 1.0)
    np.testing.assert_array_equal(heat, images.colorize(saliency_to_image(sal, (24, 40))))
    assert not np.array_equal(out, RGB) and not np.array_equal(out, heat)
    # JET: low saliency is blue, high is red
    hot = overlay(np.zeros((2, 2, 3), np.uint8), np.ones((2, 2), np.float32), 1.0)[0, 0]
    cold = overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.float32), 1.0)[0, 0]
    assert hot[0] > 100 > hot[2] and cold[2] > 100 > cold[0]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            overlay(RGB, sal, bad)


def test_overlay_survives_nan_saliency():
    sal = np.full((8, 8), np.nan, np.float32)
    out = overlay(RGB, sal, 0.5)
    assert out.shape == RGB.shape
