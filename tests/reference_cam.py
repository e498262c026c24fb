"""Torch re-implementations of Score-CAM as the peer libraries compute it (the parity references).

- :func:`gradcam_scorecam`: pytorch-grad-cam's ``ScoreCAM.get_cam_weights`` + ``BaseCAM`` (``get_cam_image``,
  ``compute_cam_per_layer``, ``aggregate_multi_layers``, ``utils.image.scale_cam_image``), step for step.
- :func:`paper_scorecam`: Algorithm 1 of the paper as DESIGN.md's ``paper`` row states it.
- :func:`official_scorecam`: the authors' released code (``haofanwang/Score-CAM``, ``cam/scorecam.py``).
- :func:`torchcam_scorecam`: the real ``torchcam.methods.ScoreCAM`` (the package itself, not a copy).

The peers build every masked input at once (K x 3 x H x W floats); here masks are built and scored in
batches of ``batch_size`` channels, which changes nothing but the memory (each mask depends on its own
channel only). The masked passes do not depend on the class, so each ``*_masked_logits`` function
returns the logits of every class and the per-class functions accept them (``masked=``) to share one
pass among classes and, for ``paper`` and ``official`` (the same masks), among presets.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def activations_of(model: nn.Module, layer_module: nn.Module, x: torch.Tensor,
                   reshape=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [1,C], activations A [1,K,h,w]) of ``x`` via a forward hook on ``layer_module``; ``reshape``
    (pytorch-grad-cam's ``reshape_transform``) turns a token or channels-last output into [1,K,h,w]."""
    store: list[torch.Tensor] = []
    reshape = reshape or (lambda t: t)
    handle = layer_module.register_forward_hook(
        lambda _m, _i, out: store.append(reshape(out.detach()).contiguous().clone()))
    try:
        with torch.inference_mode():
            logits = model(x)
    finally:
        handle.remove()
    return logits, store[-1]


def _batches(k: int, batch_size: int):
    for i in range(0, k, batch_size):
        yield slice(i, min(i + batch_size, k))


def _score_masks(model: nn.Module, x: torch.Tensor, masks_of, zero: torch.Tensor, n_classes: int,
                 batch_size: int) -> torch.Tensor:
    """Logits [K,C] of ``x * masks_of(idx)`` for every channel, ``batch_size`` masked inputs a forward.

    ``masks_of(idx)`` gives the masks [len(idx),1,H,W] of the channels ``idx``; channels flagged in
    ``zero`` have an all-zero mask (a constant map), hence all the same masked input ``x * 0``: it is
    scored once for them all (bit-for-bit the same input, so the same logits; a pure saving).
    """
    out = torch.empty(zero.shape[0], n_classes)
    todo = torch.nonzero(~zero).flatten()
    for sl in _batches(todo.shape[0], batch_size):
        out[todo[sl]] = model(x * masks_of(todo[sl]))
    if zero.any():
        out[zero] = model(x * torch.zeros(1, 1, *x.shape[-2:]))
    return out


def _ranges(up_of, k: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max [K] of the upsampled maps ``up_of(idx)`` [b,1,H,W], in batches."""
    lo, hi = [], []
    for sl in _batches(k, batch_size):
        up = up_of(torch.arange(sl.start, sl.stop))
        lo.append(up.amin(dim=(1, 2, 3)))
        hi.append(up.amax(dim=(1, 2, 3)))
    return torch.cat(lo), torch.cat(hi)


# ------------------------------------------------------------------------------ pytorch-grad-cam


def scale_cam_image(cam, target_size=None):
    """pytorch-grad-cam ``utils/image.py`` ``scale_cam_image`` (``target_size`` = (W, H))."""
    result = []
    for img in cam:
        img = img - np.min(img)
        img = img / (1e-7 + np.max(img))
        if target_size is not None:
            img = cv2.resize(np.float32(img), target_size)
        result.append(img)
    return np.float32(result)


@dataclass
class GradcamPass:
    activations: np.ndarray  # [1,K,h,w] float32, as BaseCAM hands them to get_cam_weights
    logits: torch.Tensor  # [K,C] the model outputs of the K masked inputs


def gradcam_masked_logits(model: nn.Module, layer_module: nn.Module, x: torch.Tensor,
                          batch_size: int = 16, reshape=None) -> GradcamPass:
    """``ScoreCAM.get_cam_weights`` up to ``self.model(batch)``, for every class at once."""
    logits, act = activations_of(model, layer_module, x, reshape)
    activations = act.cpu().numpy()  # BaseCAM.compute_cam_per_layer: a.cpu().data.numpy()
    with torch.inference_mode():
        upsample = torch.nn.UpsamplingBilinear2d(size=x.shape[-2:])  # align_corners=True
        activation_tensor = torch.from_numpy(activations)

        def masks_of(idx: torch.Tensor) -> torch.Tensor:
            upsampled = upsample(activation_tensor[:, idx])
            maxs = upsampled.view(upsampled.size(0), upsampled.size(1), -1).max(dim=-1)[0]
            mins = upsampled.view(upsampled.size(0), upsampled.size(1), -1).min(dim=-1)[0]
            maxs, mins = maxs[:, :, None, None], mins[:, :, None, None]
            upsampled = (upsampled - mins) / (maxs - mins + 1e-8)
            # input_tensors = input_tensor[:, None] * upsampled[:, :, None]: image 0's masks [b,1,H,W]
            return upsampled[0][:, None]

        lo, hi = _ranges(lambda idx: upsample(activation_tensor[:, idx])[0][:, None],
                         activations.shape[1], batch_size)
        out = _score_masks(model, x, masks_of, hi == lo, logits.shape[1], batch_size)
    return GradcamPass(activations, out)


def gradcam_scorecam(model: nn.Module, layer_module: nn.Module, x: torch.Tensor, class_idx: int,
                     batch_size: int = 16, masked: GradcamPass | None = None) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-grad-cam ``ScoreCAM`` -> (cam [h,w] after the first scaling, final map [H,W])."""
    p = masked if masked is not None else gradcam_masked_logits(model, layer_module, x, batch_size)
    activations = p.activations
    # get_cam_weights: scores = [target(o).item() for o in model(batch)]; torch.Tensor(scores)
    scores = torch.Tensor(p.logits[:, class_idx].tolist())
    scores = scores.view(activations.shape[0], activations.shape[1])
    weights = torch.nn.Softmax(dim=-1)(scores).numpy()
    # get_cam_image
    weighted_activations = weights[:, :, None, None] * activations
    cam = weighted_activations.sum(axis=1)
    # compute_cam_per_layer
    cam = np.maximum(cam, 0)
    target_size = (x.size(-1), x.size(-2))  # get_target_width_height: (width, height)
    scaled = scale_cam_image(cam, target_size)
    cam_per_target_layer = [scaled[:, None, :]]
    # aggregate_multi_layers
    cam_per_target_layer = np.concatenate(cam_per_target_layer, axis=1)
    cam_per_target_layer = np.maximum(cam_per_target_layer, 0)
    result = np.mean(cam_per_target_layer, axis=1)
    final = scale_cam_image(result)
    return scale_cam_image(cam)[0], final[0]


# ------------------------------------------------------------------ paper (Algorithm 1) and official


@dataclass
class HalfPixelPass:
    """One scoring pass over the masks ``norm(up(A_k))`` (bilinear, align_corners=False)."""

    activations: torch.Tensor  # [K,h,w]
    size: tuple[int, int]
    logits_paper: torch.Tensor  # [K,C] f(x * H_k), H_k = (up - min) / (max - min + 1e-8)
    logits_official: torch.Tensor  # [K,C] f(x * H_k), H_k = (up - min) / (max - min); NaN rows: skipped
    skipped: torch.Tensor  # [K] bool, max == min of up(A_k) (the authors' code skips those)


def halfpixel_masked_logits(model: nn.Module, layer_module: nn.Module, x: torch.Tensor,
                            batch_size: int = 16, reshape=None) -> HalfPixelPass:
    """Score every ``norm(up(A_k))`` once, for all classes and for both ``paper`` and ``official``.

    The two presets differ only in the ``eps`` of ``norm``: the masks differ by the factor
    ``r / (r + 1e-8)`` (``r = max - min``), i.e. by less than 1e-6 relative (below float32 noise) where
    ``r >= 1e-2``, and one forward serves both there; channels with a smaller range get a forward of
    their own paper mask, and constant channels (skipped by ``official``) have the paper mask
    ``0 / 1e-8 = 0``.
    """
    logits, act = activations_of(model, layer_module, x, reshape)
    a, c = act[0], logits.shape[1]
    size = tuple(x.shape[-2:])
    with torch.inference_mode():
        def up_of(idx: torch.Tensor) -> torch.Tensor:
            return F.interpolate(a[idx, None], size=size, mode="bilinear", align_corners=False)

        lo, hi = _ranges(up_of, a.shape[0], batch_size)
        skipped = hi == lo
        lo4, rng4 = lo[:, None, None, None], (hi - lo)[:, None, None, None]

        def official_masks(idx: torch.Tensor) -> torch.Tensor:
            return (up_of(idx) - lo4[idx]) / rng4[idx]

        def paper_masks(idx: torch.Tensor) -> torch.Tensor:
            return (up_of(idx) - lo4[idx]) / (rng4[idx] + 1e-8)

        official = _score_masks(model, x, official_masks, skipped, c, batch_size)
        official[skipped] = float("nan")  # never scored by the authors' code
        own = (hi - lo) < 1e-2
        paper = official.clone()
        paper[own] = _score_masks(model, x, lambda i: paper_masks(torch.nonzero(own).flatten()[i]),
                                  skipped[own], c, batch_size)
    return HalfPixelPass(a, size, paper, official, skipped)


def paper_scorecam(model: nn.Module, layer_module: nn.Module, x: torch.Tensor, class_idx: int,
                   batch_size: int = 16, masked: HalfPixelPass | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DESIGN.md ``paper``: a = softmax_k f_c(x * norm(up(A_k))); cam = ReLU(sum a_k A_k) at h x w;
    saliency = minmax(up(cam)) -> (cam [h,w], saliency [H,W])."""
    p = masked if masked is not None else halfpixel_masked_logits(model, layer_module, x, batch_size)
    with torch.inference_mode():
        alpha = torch.softmax(p.logits_paper[:, class_idx], dim=0)
        cam = F.relu((alpha[:, None, None] * p.activations).sum(0))
        sal = F.interpolate(cam[None, None], size=p.size, mode="bilinear", align_corners=False)[0, 0]
        sal = (sal - sal.min()) / (sal.max() - sal.min())
    return cam.numpy(), sal.numpy()


def official_scorecam(model: nn.Module, layer_module: nn.Module, x: torch.Tensor, class_idx,
                      batch_size: int = 16, masked: HalfPixelPass | None = None):
    """The authors' ``ScoreCAM.forward`` (``haofanwang/Score-CAM``) -> saliency [H,W], None if constant.

    Per channel: up = F.interpolate(A_k, (H, W), bilinear, align_corners=False); skip if max == min;
    score = softmax(f(x * (up - min) / (max - min)))[0, c]; map += score * up. Then ReLU, min-max.
    ``class_idx`` may be a list: one loop over the channels then accumulates every class's map
    (a list of maps is returned).
    """
    p = masked if masked is not None else halfpixel_masked_logits(model, layer_module, x, batch_size)
    classes = list(class_idx) if isinstance(class_idx, (list, tuple)) else [class_idx]
    a = p.activations
    with torch.inference_mode():
        score_saliency_map = torch.zeros((len(classes), 1, *p.size))
        for i in range(a.shape[0]):
            saliency_map = torch.unsqueeze(a[None, i, :, :], 1)
            saliency_map = F.interpolate(saliency_map, size=p.size, mode="bilinear", align_corners=False)
            if saliency_map.max() == saliency_map.min():
                assert bool(p.skipped[i])
                continue
            output = F.softmax(p.logits_official[i:i + 1], dim=1)
            score = output[0][classes]
            score_saliency_map += score[:, None, None, None] * saliency_map
        maps = []
        for m in score_saliency_map:
            m = F.relu(m)
            lo, hi = m.min(), m.max()
            maps.append(None if lo == hi else (m - lo).div(hi - lo)[0].numpy())
    return maps if isinstance(class_idx, (list, tuple)) else maps[0]


# ------------------------------------------------------------------------------------------ torchcam


class ZeroInputOnce(nn.Module):
    """``model`` with every all-zero row of a batch scored once per wrapper (a pure saving).

    torchcam scores each constant channel's all-zero mask, i.e. the input ``x * 0`` again and again
    (752 of EfficientNet-Lite0's 1280 channels on chelsea.png are constant); each such row gets the
    logits of one forward of that same input. The package itself runs unmodified on this module.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._zero: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = (x.flatten(1) == 0).all(dim=1)
        if not zero.any():
            return self.model(x)
        if self._zero is None:
            self._zero = self.model(torch.zeros_like(x[:1]))
        out = self._zero.expand(x.shape[0], -1).clone()
        if (~zero).any():
            out[~zero] = self.model(x[~zero])
        return out


class Reshaped(nn.Module):
    """An identity module that a forward hook on ``layer_module`` calls with ``reshape(output)``: the target of
    a CAM package without a ``reshape_transform`` (torchcam) sees the [N,K,h,w] maps pytorch-grad-cam's
    ``reshape_transform`` would give, while the model itself runs unchanged."""

    def __init__(self, layer_module: nn.Module, reshape) -> None:
        super().__init__()
        self.reshape = reshape
        self.handle = layer_module.register_forward_hook(self._feed)

    def _feed(self, _m, _i, out) -> None:  # returns None: the layer's own output goes on unchanged
        self(self.reshape(out))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t


def torchcam_scorecam(model: nn.Module, layer_module: nn.Module, x: torch.Tensor, class_idx: int,
                      batch_size: int = 16, reshape=None) -> np.ndarray:
    """The real ``torchcam.methods.ScoreCAM``: forward ``x``, then ``extractor(class_idx)`` -> cam [h,w].

    ``reshape``: torchcam has no ``reshape_transform``; its target is then a :class:`Reshaped` probe
    module of the wrapper, fed the reshaped output of ``layer_module`` on every forward."""
    from torchcam.methods import ScoreCAM

    wrapped = ZeroInputOnce(model).eval()
    target = layer_module
    if reshape is not None:
        wrapped.probe = target = Reshaped(layer_module, reshape)
    try:
        with ScoreCAM(wrapped, target_layer=target, batch_size=batch_size,
                      input_shape=tuple(x.shape[1:])) as extractor:
            with torch.inference_mode():
                wrapped(x)
                cams = extractor(int(class_idx))
    finally:
        if reshape is not None:
            target.handle.remove()
    return cams[0][0].numpy()
