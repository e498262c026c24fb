"""Photo <-> network input geometry: letterbox or stretch, boxes both ways, the map back onto the photo.

Letterbox (Ultralytics): the photo is scaled by ``r = min(H/h, W/w)`` to ``round(w r) x round(h r)`` (bilinear)
and centred on an H x W canvas of grey 114, so ``x_net = x r + left``, ``y_net = y r + top``. Stretch: resized
to H x W (``x_net = x W/w``). Boxes are ``x0, y0, x1, y1`` in pixels (continuous: a pixel spans [i, i+1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD_VALUE = 114


@dataclass(frozen=True)
class Geometry:
    """How a photo of ``shape`` (h, w) maps onto the network input of ``size`` (H, W)."""

    shape: tuple[int, int]
    size: tuple[int, int]
    scale: tuple[float, float]  # (sy, sx)
    offset: tuple[float, float]  # (top, left)

    def to_network(self, box) -> np.ndarray:
        b = np.asarray(box, np.float64)
        sy, sx = self.scale
        top, left = self.offset
        return np.array([b[0] * sx + left, b[1] * sy + top, b[2] * sx + left, b[3] * sy + top])

    def to_photo(self, box) -> np.ndarray:
        """A network box in photo pixels, clipped to the photo."""
        b = np.asarray(box, np.float64)
        sy, sx = self.scale
        top, left = self.offset
        out = np.array([(b[0] - left) / sx, (b[1] - top) / sy, (b[2] - left) / sx, (b[3] - top) / sy])
        h, w = self.shape
        return np.clip(out, 0, [w, h, w, h])

    @property
    def content(self) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the photo inside the network input."""
        top, left = self.offset
        return (int(round(top)), int(round(left)), int(round(self.shape[0] * self.scale[0])),
                int(round(self.shape[1] * self.scale[1])))

    def crop(self, saliency: np.ndarray) -> np.ndarray:
        """The part of a network-resolution map that covers the photo (the letterbox padding removed)."""
        top, left, h, w = self.content
        return saliency[top:top + max(h, 1), left:left + max(w, 1)]


def place(rgb: np.ndarray, size: tuple[int, int], letterbox: bool) -> tuple[np.ndarray, Geometry]:
    """The photo at the network's size (letterboxed or stretched), uint8 RGB, and its geometry."""
    import cv2

    h, w = rgb.shape[:2]
    H, W = int(size[0]), int(size[1])
    if not letterbox:
        out = rgb if (h, w) == (H, W) else cv2.resize(rgb, (W, H), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(out), Geometry((h, w), (H, W), (H / h, W / w), (0.0, 0.0))
    r = min(H / h, W / w)
    nh, nw = max(1, int(round(h * r))), max(1, int(round(w * r)))
    scaled = rgb if (nh, nw) == (h, w) else cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
    dh, dw = (H - nh) / 2, (W - nw) / 2
    top, left = int(round(dh - 0.1)), int(round(dw - 0.1))
    out = np.full((H, W, 3), PAD_VALUE, np.uint8)
    out[top:top + nh, left:left + nw] = scaled
    return out, Geometry((h, w), (H, W), (nh / h, nw / w), (float(top), float(left)))
