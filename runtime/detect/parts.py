"""Channels split into their blobs, in numpy: one feature map channel that fires on two objects gives two masks.

A detector's feature channels are mostly class- and place-agnostic ("a red blob", "a ring's edge"): one channel
fires on every object of its kind, so its mask keeps them all and its score cannot tell which one made the
target detection. Each channel ``A_k`` [h,w] is therefore cut into its connected blobs ``B_kj`` (8-connected
cells where ``norm(A_k) >= BLOB_LEVEL``, the :data:`MAX_BLOBS` with the most activation), each grown by one
cell; a channel with one blob (or none) stays whole. The parts are ``A_k * grow(B_kj)``: Score-CAM scores each
part's mask and weighs the part, so the map of one object does not light up another that the same channels see.
"""

from __future__ import annotations

import numpy as np

BLOB_LEVEL = 0.3  # of the channel's min-max range
MAX_BLOBS = 4  # per channel, by activation mass


def split_channels(acts: np.ndarray, level: float = BLOB_LEVEL, max_blobs: int = MAX_BLOBS) -> np.ndarray:
    """[P,h,w] parts of activations [K,h,w] (module doc), channel order kept (P >= K)."""
    import cv2

    a = np.nan_to_num(np.asarray(acts, np.float32))
    out: list[np.ndarray] = []
    kernel = np.ones((3, 3), np.uint8)
    for ch in a:
        lo, hi = float(ch.min()), float(ch.max())
        if not hi > lo:
            out.append(ch)
            continue
        on = ((ch - lo) / (hi - lo) >= level).astype(np.uint8)
        n, labels = cv2.connectedComponents(on, connectivity=8)
        if n <= 2:  # background + one blob
            out.append(ch)
            continue
        mass = np.bincount(labels.ravel(), weights=(ch - lo).ravel(), minlength=n)[1:]
        for j in np.argsort(-mass, kind="stable")[:max_blobs] + 1:
            grown = cv2.dilate((labels == j).astype(np.uint8), kernel).astype(bool)
            out.append(np.where(grown, ch, lo).astype(np.float32))
    return np.stack(out) if out else a
