"""Score-CAM, the algorithm, in pure numpy (no I/O, no ONNX).

Notation (DESIGN.md): activations ``A`` [K,h,w] of the target layer, class ``c``, ``f`` the
classifier's logits, ``up`` bilinear resize to H x W, ``norm(m) = (m - min m) / (max m - min m + eps)``.
Every preset scores the K masked inputs ``x * H_k`` once (``masked_logits`` [K,C], shared by all
classes) and then differs only in how a mask is made, how a score becomes a weight and how the
weighted sum is finished:

=========== ================================ ============================ ================ ===========
preset      mask ``H_k``                     score ``s_k``                weights ``a``    map
=========== ================================ ============================ ================ ===========
paper       norm(up(A_k)), half-pixel        f_c(x * H_k)                 softmax over k   norm(up(ReLU(sum a_k A_k)))
gradcam     norm(up(A_k)), align_corners     f_c(x * H_k)                 softmax over k   pytorch-grad-cam scaling
torchcam    up(norm(A_k)), half-pixel        f_c(x * H_k) - f_c(x)        softmax over k   norm(ReLU(nansum a_k A_k))
official    norm(up(A_k)), constant skipped  softmax(f(x * H_k))_c        a_k = s_k        norm(ReLU(up(sum a_k A_k)))
=========== ================================ ============================ ================ ===========

A channel whose activation is constant gives an all-zero mask (never a NaN); ``official`` skips it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MASK_EPS = 1e-8
GRADCAM_EPS = 1e-7


@dataclass(frozen=True)
class MaskSpec:
    """How a channel becomes a mask: the order of ``norm``/``up`` and the upsampling grid."""

    align_corners: bool = False
    norm_first: bool = False
    eps: float = MASK_EPS

    @property
    def key(self) -> str:
        return f"{'norm-up' if self.norm_first else 'up-norm'}-{'ac' if self.align_corners else 'hp'}"


@dataclass(frozen=True)
class Preset:
    """One Score-CAM variant: its mask, its score -> weight rule and how the map is finished."""

    name: str
    mask: MaskSpec
    weights: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    finish: Callable[[np.ndarray, tuple[int, int]], tuple[np.ndarray, np.ndarray]]
    skip_constant: bool = False
    description: str = ""


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------------------- helpers


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """``exp(z - max z) / sum exp(z - max z)`` along ``axis``, in float64 for stability.

    ``z`` is made C-contiguous first: numpy sums a contiguous axis pairwise and a strided one in order, so a
    transposed [n,K] view would give row sums that change with ``n``."""
    z = np.ascontiguousarray(z, np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


#: beyond this magnitude float32 differences and sums may overflow: such values are handled in float64
#: (or rescaled, which every normalised map is invariant to)
SAFE_MAGNITUDE = 1e37


def minmax(m: np.ndarray, eps: float = 0.0, axes: tuple[int, ...] = (-2, -1)) -> np.ndarray:
    """``(m - min m) / (max m - min m + eps)`` over ``axes``; a constant map becomes all zeros.

    Values so large that ``max - min`` could overflow float32 are normalised in float64.
    """
    m = np.asarray(m, np.float32)
    lo = m.min(axis=axes, keepdims=True)
    if m.size and not (np.abs(lo).max() < SAFE_MAGNITUDE and np.abs(m.max(axis=axes)).max() < SAFE_MAGNITUDE):
        m64 = m.astype(np.float64)
        lo64 = lo.astype(np.float64)
        rng64 = m64.max(axis=axes, keepdims=True) - lo64 + eps
        safe64 = np.where(rng64 > 0, rng64, 1.0)
        return np.where(rng64 > 0, (m64 - lo64) / safe64, 0.0).astype(np.float32)
    rng = m.max(axis=axes, keepdims=True) - lo + np.float32(eps)
    safe = np.where(rng > 0, rng, np.float32(1))
    return np.where(rng > 0, (m - lo) / safe, np.float32(0)).astype(np.float32)


def interp_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear interpolation, as torch's ``F.interpolate`` computes it.

    half-pixel (``align_corners=False``): ``src = max((i + 0.5) * n_in / n_out - 0.5, 0)``;
    ``align_corners=True``: ``src = i * (n_in - 1) / (n_out - 1)``.
    """
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
    else:
        src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    w = np.zeros((n_out, n_in), np.float64)
    np.add.at(w, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(w, (np.arange(n_out), i1), lam)
    return w


def upsample(m: np.ndarray, size: tuple[int, int], align_corners: bool = False) -> np.ndarray:
    """Bilinear resize of ``m`` [..., h, w] to ``size`` (H, W): ``Wy @ m @ Wx^T``."""
    m = np.asarray(m, np.float32)
    h, w = m.shape[-2:]
    wy = interp_matrix(h, size[0], align_corners).astype(np.float32)
    wx = interp_matrix(w, size[1], align_corners).astype(np.float32)
    return np.ascontiguousarray(wy @ m @ wx.T, dtype=np.float32)


def make_masks(acts: np.ndarray, size: tuple[int, int], spec: MaskSpec) -> np.ndarray:
    """Masks [K,H,W] of activations [K,h,w] per ``spec`` (the numpy twin of the ONNX mask graph)."""
    if spec.norm_first:
        return upsample(minmax(acts, spec.eps), size, spec.align_corners)
    # a channel constant at h x w gets the all-zero mask, not norm() of up()'s float32 rounding noise
    varies = ~constant_channels(acts)
    return minmax(upsample(acts, size, spec.align_corners), spec.eps) * varies[:, None, None]


def constant_channels(acts: np.ndarray) -> np.ndarray:
    """Boolean [K]: channels whose activation map is constant (max == min)."""
    flat = acts.reshape(acts.shape[0], -1)
    return flat.max(axis=1) == flat.min(axis=1)


def weighted_sum(weights: np.ndarray, acts: np.ndarray) -> np.ndarray:
    """``sum_k a_k A_k``: weights [n,K], activations [K,h,w] -> float32 [n,h,w] (NaN activations ignored).

    One row at a time, in float64: ``a_i @ A`` is the same [K] x [K,h*w] product whatever ``n``, so a class's
    map is bit for bit the same whether it is explained alone or with others (one [n,K] @ [K,h*w] product
    would let BLAS pick another kernel, and another rounding, for each ``n``). A row beyond float32's range is
    divided by its largest magnitude (every preset's map is invariant to a positive scale; only the
    unnormalised ``cam`` of ``paper`` changes, and it could not be held anyway).
    """
    a = np.nan_to_num(acts.astype(np.float32), nan=0.0).astype(np.float64)
    k, h, w = a.shape
    a = a.reshape(k, h * w)
    w64 = np.asarray(weights, np.float64)
    out = np.empty((w64.shape[0], h * w), np.float32)
    for i, row in enumerate(w64):
        s = np.ascontiguousarray(row) @ a
        peak = np.abs(s).max(initial=0.0)
        out[i] = s / peak if peak > SAFE_MAGNITUDE else s
    return out.reshape(-1, h, w)


def mask_safe(acts: np.ndarray) -> np.ndarray:
    """Activations [K,h,w] with every channel whose magnitude exceeds :data:`SAFE_MAGNITUDE` divided by
    its largest magnitude, so the mask graph's ``max - min`` stays finite in float32. ``norm(up(A_k))``
    is invariant to a positive per-channel scale (up to eps), so the masks are the same."""
    a = np.asarray(acts, np.float32)
    peak = np.abs(a.reshape(a.shape[0], -1)).max(axis=1, initial=0.0)
    big = peak >= SAFE_MAGNITUDE
    if not big.any():
        return a
    a = a.copy()
    a[big] = (a[big].astype(np.float64) / peak[big, None, None]).astype(np.float32)
    return a


def channel_spread(acts: np.ndarray) -> np.ndarray:
    """The spatial standard deviation of each channel [K] (Faster Score-CAM's ranking), in float64:
    float32 squares of large activations overflow."""
    return acts.reshape(acts.shape[0], -1).astype(np.float64).std(axis=1)


# ------------------------------------------------------------------------------ weights per preset
# Each takes (masked_logits [K,C], base_logits [C], classes [n], ignore [K]) -> weights [n,K],
# where ``ignore`` marks channels that were not scored (they get weight 0).


def _softmax_over_scored(s: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """Softmax over k of ``s`` [n,K], leaving out (weight 0) the channels in ``ignore``."""
    if ignore.all():
        return np.zeros_like(s, dtype=np.float64)
    return softmax(np.where(ignore[None, :], -np.inf, s), axis=1)


def _softmax_of_logits(masked: np.ndarray, base: np.ndarray, classes: np.ndarray,
                       ignore: np.ndarray) -> np.ndarray:
    """``a_k = softmax_k(f_c(x * H_k))`` (the paper's Algorithm 1; pytorch-grad-cam)."""
    return _softmax_over_scored(masked[:, classes].T, ignore)


def _softmax_of_logit_increase(masked: np.ndarray, base: np.ndarray, classes: np.ndarray,
                               ignore: np.ndarray) -> np.ndarray:
    """``a_k = softmax_k(f_c(x * H_k) - f_c(x))`` (torchcam)."""
    return _softmax_over_scored(masked[:, classes].T - base[classes][:, None], ignore)


def _class_probability(masked: np.ndarray, base: np.ndarray, classes: np.ndarray,
                       ignore: np.ndarray) -> np.ndarray:
    """``a_k = softmax(f(x * H_k))_c``, 0 for channels not scored (constant ones: the authors' code)."""
    probs = softmax(masked, axis=1)[:, classes].T
    return np.where(ignore[None, :], 0.0, probs)


# ------------------------------------------------------------------------------ finishing per preset
# Each takes the weighted sum S = sum_k a_k A_k [h,w] and the input size -> (cam [h,w], saliency [H,W]).


def _finish_paper(s: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """cam = ReLU(S); saliency = minmax(up(cam)), half-pixel bilinear."""
    cam = np.maximum(s, 0)
    return cam, minmax(upsample(cam, size))


def _finish_gradcam(s: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-grad-cam: c = ReLU(S); c -= min; c /= 1e-7 + max; cv2.resize; ReLU, -min, /(1e-7+max)."""
    import cv2

    cam = np.maximum(s, 0).astype(np.float32)
    cam = cam - cam.min()
    cam = cam / (GRADCAM_EPS + cam.max())
    sal = cv2.resize(cam, (size[1], size[0]))
    sal = np.maximum(sal, 0)
    sal = sal - sal.min()
    sal = sal / (GRADCAM_EPS + sal.max())
    return cam.astype(np.float32), sal.astype(np.float32)


def _finish_torchcam(s: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """torchcam: cam = ReLU(S); cam -= min; cam /= max + 1e-8 (at h x w); saliency = minmax(up(cam))."""
    cam = np.maximum(s, 0)
    cam = cam - cam.min()
    cam = (cam / (cam.max() + np.float32(MASK_EPS))).astype(np.float32)
    return cam, minmax(upsample(cam, size))


def _finish_official(s: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Authors' code: saliency = minmax(ReLU(up(S))) at H x W (up is linear, so up(sum) = sum of up)."""
    return minmax(np.maximum(s, 0)), minmax(np.maximum(upsample(s, size), 0))


register(Preset("paper", MaskSpec(), _softmax_of_logits, _finish_paper,
                description="Algorithm 1 of the paper (default)"))
register(Preset("gradcam", MaskSpec(align_corners=True), _softmax_of_logits, _finish_gradcam,
                description="pytorch-grad-cam's ScoreCAM, step for step"))
register(Preset("torchcam", MaskSpec(norm_first=True), _softmax_of_logit_increase, _finish_torchcam,
                description="torchcam's ScoreCAM (map at feature resolution)"))
register(Preset("official", MaskSpec(eps=0.0), _class_probability, _finish_official, skip_constant=True,
                description="the authors' released code (probability weights, constant channels skipped)"))


# ------------------------------------------------------------------------------------- the driver


@dataclass
class Maps:
    """The outcome for one class: the map at feature resolution and at input resolution."""

    class_index: int
    cam: np.ndarray
    saliency: np.ndarray
    weights: np.ndarray


def maps_from_scores(preset: Preset, acts: np.ndarray, masked_logits: np.ndarray,
                     base_logits: np.ndarray, classes: list[int], size: tuple[int, int],
                     skipped: np.ndarray | None = None,
                     channel_mask: np.ndarray | None = None) -> list[Maps]:
    """Turn the scores of the K masked inputs into one map per class.

    ``masked_logits`` [K,C] are the classifier's logits for ``x * H_k``; rows of channels that were
    not scored (``channel_mask`` False, or skipped by the preset) are ignored and get weight 0.
    """
    k = acts.shape[0]
    skipped = constant_channels(acts) if skipped is None else skipped
    ignore = skipped.copy() if preset.skip_constant else np.zeros(k, bool)
    if channel_mask is not None:
        ignore |= ~channel_mask
    cls = np.asarray(classes, np.int64)
    masked = np.where(ignore[:, None], 0.0, np.nan_to_num(masked_logits.astype(np.float64)))
    w = preset.weights(masked, base_logits.astype(np.float64), cls, ignore)
    sums = weighted_sum(w, acts)
    out = []
    for i, c in enumerate(cls):
        cam, sal = preset.finish(sums[i], size)
        out.append(Maps(int(c), np.nan_to_num(cam).astype(np.float32),
                        np.clip(np.nan_to_num(sal), 0, 1).astype(np.float32), w[i].astype(np.float32)))
    return out
