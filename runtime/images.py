"""Image edges: decoding any common image into RGB uint8, preprocessing, and the overlay.

Decoding goes through Pillow, restricted to the raster formats a photo comes in (JPEG, PNG, WebP,
BMP, TIFF, GIF, PPM/PGM, TGA, AVIF): formats that run external programs (EPS) or are exotic are
refused. EXIF orientation is applied; grayscale, palette (with or without transparency), RGBA/LA
(alpha dropped, as ``Image.convert("RGB")`` does), CMYK, 16-bit and float images become 8-bit RGB;
an image with more pixels than a limit is refused from its header, before it is decoded
(decompression bombs). Every failure is an :class:`ImageError` whose message names the file.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .contract import Preprocessing

MAX_PIXELS = 100_000_000  # 100 megapixels

# Pillow logs what it finds in damaged files (``logger.error`` in its TIFF plugin, ...); with no handler
# Python's last-resort handler would print that on the user's terminal. The failure itself is an ImageError.
logging.getLogger("PIL").addHandler(logging.NullHandler())

#: Pillow format ids accepted by :func:`load_image` (those not built into this Pillow are ignored).
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF", "PPM", "TGA", "AVIF")

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageError(ValueError):
    """An image cannot be used; the message names the file and the reason."""


def _formats() -> list[str]:
    Image.init()
    return [f for f in FORMATS if f in Image.OPEN]


def _to_rgb(img: Image.Image) -> np.ndarray:
    """8-bit RGB array of any Pillow image (16-bit and float scaled to 0..255, alpha dropped)."""
    if img.mode in (*_SIXTEEN_BIT, "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode in _SIXTEEN_BIT:
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif img.mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0  # float images in 0..1
        elif arr.size and np.nanmax(arr) > 255:
            arr = arr / 257.0  # 32-bit integer image holding 16-bit samples
        gray = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # the palette's transparency, then drop alpha like any RGBA
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)


def _check_size(name: str, size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"{name}: empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                         "(possible decompression bomb; raise the pixel limit if the image is genuine)")


def _decode(fp, name: str, max_pixels: int) -> np.ndarray:
    """Open ``fp`` (a path or a binary file object), check its size from the header, decode it."""
    try:
        with warnings.catch_warnings():  # Pillow's notes on damaged files (corrupt EXIF, ...): not the user's
            warnings.simplefilter("ignore")  # concern when the pixels decode; a real failure raises below
            with Image.open(fp, formats=_formats()) as img:
                _check_size(name, img.size, max_pixels)
                img.load()
                img = ImageOps.exif_transpose(img) or img
                rgb = _to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        # Pillow refuses on its own past 2 x Image.MAX_IMAGE_PIXELS, before our check can run
        what = str(e).split(", could be")[0]
        raise ImageError(f"{name}: too many pixels: {what} (possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image this reader accepts (supported: "
                         f"{', '.join(_formats())})") from None
    except PermissionError:
        raise ImageError(f"{name}: cannot read the file (permission denied)") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode the image") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError) as e:
        # Pillow's plugins report a damaged file with any of these
        reason = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise ImageError(f"{name}: corrupt or truncated image ({reason})") from None
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageError(f"{name}: empty image")
    return rgb


def load_image(src, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An H x W x 3 uint8 RGB array from a path, a binary file object, a PIL image or an array.

    Arrays may be uint8 HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA, alpha dropped). Paths and file
    objects are decoded as described in the module docstring; ``max_pixels`` bounds width x height.
    """
    if int(max_pixels) < 1:
        raise ValueError(f"the pixel limit must be >= 1, got {max_pixels}")
    if isinstance(src, np.ndarray):
        return array_to_rgb(src)
    if isinstance(src, Image.Image):
        try:
            return _to_rgb(ImageOps.exif_transpose(src) or src)
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot convert a {src.mode} PIL image to RGB ({e})") from None
    if hasattr(src, "read"):
        return _decode(src, str(getattr(src, "name", "<stream>")), max_pixels)
    try:
        path = Path(os.fspath(src))
    except TypeError:
        raise ImageError(f"cannot read an image from a {type(src).__name__}; give a path, a PIL image "
                         "or an H x W x 3 uint8 array") from None
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image file")
    if not path.is_file():
        raise ImageError(f"{path}: not a regular file")
    return _decode(path, str(path), max_pixels)


def array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """Validate an array image: uint8 HxW, HxWx1, HxWx3 or HxWx4 (alpha dropped) -> HxWx3 RGB."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        raise ImageError(f"an image array must be uint8 (0..255 RGB), got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageError(f"an image array must be H x W x 3 RGB, got shape {tuple(np.shape(arr))}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (Pillow) of an RGB uint8 array to ``size`` = (H, W)."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))


def preprocess(rgb: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """[1,3,H,W] float32 network input: resize to H x W, then ``(pixel * scale - mean) / std``."""
    return pre.apply(resize_rgb(rgb, pre.input_size))[None]


def colorize(saliency: np.ndarray) -> np.ndarray:
    """RGB uint8 JET heat map of a [0,1] map (NaN counts as 0)."""
    import cv2

    s = np.clip(np.nan_to_num(np.asarray(saliency, np.float32)), 0, 1)
    heat = cv2.applyColorMap(np.uint8(s * 255 + 0.5), cv2.COLORMAP_JET)
    return cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)


def saliency_to_image(saliency: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The network-resolution map resized (bilinear) onto an image of ``shape`` = (h, w).

    The network saw the image squashed to its input size; stretching the map back to (h, w) undoes
    that, so the map lines up with the original picture and its aspect ratio.
    """
    import cv2

    s = np.asarray(saliency, np.float32)
    if s.ndim != 2:
        raise ValueError(f"a saliency map must be 2-D, got shape {s.shape}")
    h, w = int(shape[0]), int(shape[1])
    if s.shape != (h, w):
        s = cv2.resize(s, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(s, 0, 1)


def overlay(rgb: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * image + alpha * JET(saliency)`` at the image's own size, RGB uint8."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = array_to_rgb(rgb)
    heat = colorize(saliency_to_image(saliency, rgb.shape[:2])).astype(np.float32)
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
