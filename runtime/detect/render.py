"""Drawing a box (and its caption) on an RGB image, with OpenCV."""

from __future__ import annotations

import numpy as np

BOX_COLOUR = (255, 255, 255)
EDGE_COLOUR = (0, 0, 0)


def draw_box(rgb: np.ndarray, box, caption: str = "") -> np.ndarray:
    """``rgb`` (uint8 HxWx3) with ``box`` (x0, y0, x1, y1 in its pixels) outlined white on black, and a caption."""
    import cv2

    out = np.ascontiguousarray(rgb.copy())
    h, w = out.shape[:2]
    t = max(1, round(min(h, w) / 200))
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    x1, y1 = min(max(x1 - 1, x0), w - 1), min(max(y1 - 1, y0), h - 1)
    cv2.rectangle(out, (x0, y0), (x1, y1), EDGE_COLOUR, 2 * t + 1, cv2.LINE_AA)
    cv2.rectangle(out, (x0, y0), (x1, y1), BOX_COLOUR, t, cv2.LINE_AA)
    if caption:
        scale = max(0.35, min(h, w) / 700)
        (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y0 - 4 if y0 - th - 6 >= 0 else min(y0 + th + 4, h - 2)
        cv2.rectangle(out, (x0, ty - th - 2), (min(x0 + tw + 4, w - 1), ty + base), EDGE_COLOUR, -1)
        cv2.putText(out, caption, (x0 + 2, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, BOX_COLOUR, 1, cv2.LINE_AA)
    return out
