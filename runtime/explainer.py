"""The Python API: ``Explainer(model).explain(image, targets=None, top_k=1)``.

One explanation of one image runs: the feature graph once (activations ``A`` [K,h,w]), the classifier
once (the image's own logits), and the scorer over the K masks chunk by chunk (logits [K,C] of every
masked input). The masked outputs do not depend on the class, so every requested class is
explained from that ONE scoring pass; :mod:`runtime.scorecam` turns scores into maps.
"""

from __future__ import annotations

import difflib
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import images
from .bundle import load_bundle
from .contract import BundleError
from .engine import Engine, Progress
from .scorecam import constant_channels, get_preset, maps_from_scores, softmax


class TargetError(ValueError):
    """A requested class does not exist in the model."""


@dataclass
class Result:
    """One explanation: one image, one class."""

    saliency: np.ndarray  # float32 [H,W] in [0,1], at the network's input size
    cam: np.ndarray  # float32 [h,w], the map at feature resolution before upsampling
    class_index: int
    label: str
    score: float  # the class logit on the image
    probability: float
    channels_used: int
    channels_skipped: int
    seconds: float
    provider: str
    preset: str = "paper"
    weights: np.ndarray | None = field(default=None, repr=False)  # a_k [K]
    image_shape: tuple[int, int] | None = None  # (h, w) of the original image, when known

    def overlay(self, image, alpha: float = 0.5) -> np.ndarray:
        """The saliency as a JET heat map over ``image`` (path, PIL or RGB array), RGB uint8 at its size."""
        return images.overlay(images.load_image(image), self.saliency, alpha)

    def saliency_on_image(self, shape: tuple[int, int] | None = None) -> np.ndarray:
        """The saliency resized onto the original image (aspect ratio restored), float32 in [0,1]."""
        shape = shape or self.image_shape
        if shape is None:
            return self.saliency
        return images.saliency_to_image(self.saliency, shape)

    def to_dict(self) -> dict:
        """JSON-ready summary (no arrays)."""
        return {"class_index": self.class_index, "label": self.label, "score": self.score,
                "probability": self.probability, "channels_used": self.channels_used,
                "channels_skipped": self.channels_skipped, "seconds": round(self.seconds, 4),
                "provider": self.provider, "preset": self.preset}


class Explainer:
    """Score-CAM on ONNX Runtime for one exported bundle.

    Args:
        model: a bundle directory, its ``model.onnx``, or a bundle name under ``models/``.
        device: ``auto`` (CUDA if onnxruntime-gpu's provider loads, else CPU), ``cpu`` or ``cuda``.
        batch_size: masked inputs scored per run (None: chosen for the device).
        preset: ``paper`` (default), ``gradcam``, ``torchcam`` or ``official`` (see DESIGN.md).
        threads: ONNX Runtime intra-op threads (None: ONNX Runtime's default, the physical cores).
        max_channels: Faster Score-CAM: score only the N channels with the largest spatial standard
            deviation; the others get weight 0 (None: all K channels, exact).
        precision: ``fp32`` (exact), ``int8`` (the bundle's quantized classifier scores the masked
            inputs; export with ``--int8``) or ``fp16`` (CUDA only). The class decision, score and
            probability always come from the fp32 classifier.
        tf32: on CUDA, let cuDNN / cuBLAS use TF32 tensor-core math for fp32 (Ampere and later):
            maps then differ from the CPU's by ~2e-3 instead of ~1e-5 (default False: exact).
        layer, output, input_size, mean, std, scale, bgr, labels: only for a model file without
            bundle metadata (any ONNX image classifier; see :mod:`runtime.thirdparty`): the target
            tensor (None: automatic), the class-score output (None: the first 2-D one) and the
            preprocessing (None: the sidecar ``<model>.json``'s, else 224, ImageNet mean/std, 1/255, RGB).
    """

    def __init__(self, model: str | os.PathLike, device: str = "auto", batch_size: int | None = None,
                 preset: str = "paper", threads: int | None = None, max_channels: int | None = None,
                 precision: str = "fp32", *, tf32: bool = False, layer: str | None = None, output: str | None = None,
                 input_size: tuple[int, int] | None = None, mean=None, std=None, scale: float | None = None,
                 bgr: bool = False, labels=None) -> None:
        self.preset = get_preset(preset)
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if max_channels is not None and int(max_channels) < 1:
            raise ValueError(f"max channels must be >= 1, got {max_channels}")
        self.max_channels = int(max_channels) if max_channels else None
        self.bundle = load_bundle(model, layer=layer, output=output, input_size=input_size, mean=mean, std=std,
                                  scale=scale, bgr=bgr or None, labels=labels)
        self.meta = self.bundle.meta
        self.pre = self.meta.preprocessing
        if precision == "int8":
            self.bundle.load_int8()  # fail now, not in the middle of the first explanation
        self.engine = Engine(self.bundle.load_model, self.bundle.load_features, device=device, threads=threads,
                             input_size=self.pre.input_size, precision=precision,
                             int8_classifier=self.bundle.load_int8, tf32=tf32, mask=self.preset.mask,
                             features_output=self.bundle.features_output,
                             key=f"{self.bundle.model_sha256}:{self.bundle.features_sha256}")
        self.batch_size = int(batch_size) if batch_size else self.engine.default_batch_size()
        if self.bundle.max_batch:  # a third-party classifier whose batch size is fixed
            self.batch_size = self.bundle.max_batch

    # ---------------------------------------------------------------------------- properties
    @property
    def provider(self) -> str:
        return self.engine.provider

    @property
    def input_size(self) -> tuple[int, int]:
        return self.pre.input_size

    @property
    def num_classes(self) -> int:
        return int(self.engine.num_classes or len(self.labels))

    @property
    def labels(self) -> list[str]:
        return list(self.meta.labels) if self.meta.labels else []

    def label_of(self, index: int) -> str:
        labels = self.meta.labels
        return labels[index] if labels and 0 <= index < len(labels) else str(index)

    # ------------------------------------------------------------------------------ targets
    def resolve_targets(self, targets, logits: np.ndarray, top_k: int = 1) -> list[int]:
        """Class indices for ``targets`` (index, label, or a list of them); None -> the top-k classes."""
        n = logits.shape[-1]
        if targets is None:
            if int(top_k) < 1:
                raise TargetError(f"top-k must be >= 1, got {top_k}")
            return [int(i) for i in np.argsort(-logits, kind="stable")[: min(int(top_k), n)]]
        items = list(targets) if isinstance(targets, (list, tuple)) else [targets]
        if not items:
            raise TargetError("no target class given")
        out: list[int] = []
        for t in items:
            idx = self._target_index(t, n)
            if idx not in out:
                out.append(idx)
        return out

    def _target_index(self, t, n: int) -> int:
        if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
            idx = int(t)
        elif isinstance(t, str) and t.strip().lstrip("-").isdigit():
            idx = int(t)
        elif isinstance(t, str):
            labels = self.labels
            exact = [i for i, lab in enumerate(labels) if lab == t]
            folded = [i for i, lab in enumerate(labels) if lab.casefold() == t.strip().casefold()]
            if exact or folded:
                return (exact or folded)[0]
            if not labels:
                raise TargetError(f"target {t!r}: the model has no class labels; give a class index")
            key = t.strip().casefold()  # one of a label's comma-separated synonyms ('tabby' -> 'tabby, tabby cat')
            synonym = [i for i, lab in enumerate(labels) if key in (w.strip().casefold() for w in lab.split(","))]
            if len(synonym) == 1:
                return synonym[0]
            word = re.compile(rf"\b{re.escape(key)}\b") if key else None
            close = synonym or [i for i, lab in enumerate(labels) if word and word.search(lab.casefold())][:4] or \
                [labels.index(c) for c in difflib.get_close_matches(t, labels, n=3, cutoff=0.5)]
            hint = f"; did you mean {', '.join(f'{labels[i]!r} ({i})' for i in close)}?" if close else ""
            raise TargetError(f"{'ambiguous' if synonym else 'unknown'} class label {t!r}{hint}")
        else:
            raise TargetError(f"a target must be a class index or a label, got {t!r}")
        if not 0 <= idx < n:
            raise TargetError(f"target class {idx} is out of range: the model has {n} classes (0..{n - 1})")
        return idx

    # ------------------------------------------------------------------------------ explaining
    def explain(self, image, targets=None, top_k: int = 1, progress: Progress | None = None):
        """Explain one image (path, PIL image or HxWx3 uint8 RGB array) -> one Result per class.

        A list of images gives a list of such lists.
        """
        if isinstance(image, (list, tuple)):
            return [self.explain(im, targets, top_k, progress) for im in image]
        rgb = images.load_image(image)
        x = images.preprocess(rgb, self.pre)
        results = self.explain_tensor(x, targets, top_k, progress)
        for r in results:
            r.image_shape = rgb.shape[:2]
        return results

    def explain_tensor(self, x: np.ndarray, targets=None, top_k: int = 1,
                       progress: Progress | None = None) -> list[Result]:
        """Explain an already-preprocessed float32 [1,3,H,W] input -> one Result per class."""
        t0 = time.perf_counter()
        x = self._check_tensor(x)
        logits, acts = self.engine.classify_and_activations(x)
        base = logits[0].astype(np.float64)
        classes = self.resolve_targets(targets, base, top_k)
        skipped = constant_channels(acts)
        scored = self.channels_to_score(acts, skipped)
        masked = self.score_channels(x, acts, scored & ~skipped, scored & skipped, base.shape[0], progress)
        maps = maps_from_scores(self.preset, acts, masked, base, classes, self.input_size, skipped=skipped,
                                channel_mask=scored)
        probs = self._probabilities(base)
        seconds = time.perf_counter() - t0
        return [Result(saliency=m.saliency, cam=m.cam, class_index=m.class_index, label=self.label_of(m.class_index),
                       score=float(base[m.class_index]), probability=float(probs[m.class_index]),
                       channels_used=int(scored.sum()), channels_skipped=int(skipped.sum()), seconds=seconds,
                       provider=self.provider,
                       preset=self.preset.name, weights=m.weights)
                for m in maps]

    def score_channels(self, x: np.ndarray, acts: np.ndarray, varying: np.ndarray, constant: np.ndarray,
                       n_classes: int, progress: Progress | None = None) -> np.ndarray:
        """Logits [K,C] of ``x * H_k`` for the channels in ``varying | constant`` (other rows 0).

        Every constant channel has the same all-zero mask, hence the same masked input ``x * 0``:
        it is scored once and shared, which on real networks (many dead ReLU channels) saves
        a large share of the K passes without changing any output.
        """
        masked = np.zeros((acts.shape[0], n_classes), np.float32)
        maps = acts[varying]
        if constant.any():
            maps = np.concatenate([maps, np.zeros((1, *acts.shape[1:]), acts.dtype)])
        if maps.shape[0]:
            scores = self.engine.score(x, maps, self.preset.mask, self.batch_size, progress)
            masked[varying] = scores[: int(varying.sum())]
            if constant.any():
                masked[constant] = scores[-1]
        return masked

    def channels_to_score(self, acts: np.ndarray, skipped: np.ndarray) -> np.ndarray:
        """Boolean [K]: the channels whose masks are scored (all, less the preset's skips and,
        with ``max_channels=N``, all but the N of largest spatial standard deviation)."""
        scored = ~skipped if self.preset.skip_constant else np.ones(acts.shape[0], bool)
        if self.max_channels is not None and self.max_channels < int(scored.sum()):
            std = acts.reshape(acts.shape[0], -1).std(axis=1)
            std = np.where(scored, std, -np.inf)
            keep = np.argsort(-std, kind="stable")[: self.max_channels]
            scored = np.zeros_like(scored)
            scored[keep] = True
        return scored

    def predict(self, image) -> np.ndarray:
        """Class probabilities [C] of one image."""
        x = images.preprocess(images.load_image(image), self.pre)
        return self._probabilities(self.engine.classify(x)[0].astype(np.float64))

    def _probabilities(self, out: np.ndarray) -> np.ndarray:
        return out if self.meta.output_kind == "probabilities" else softmax(out)

    def _check_tensor(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        want = (1, 3, *self.input_size)
        if x.shape != want:
            raise BundleError(f"input tensor must have shape {list(want)}, got {list(x.shape)}")
        if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
            raise BundleError("input tensor must be finite floating-point values")
        return np.ascontiguousarray(x, dtype=np.float32)


def explain(model, image, targets=None, top_k: int = 1, **kwargs) -> list[Result]:
    """One-shot helper: ``Explainer(model, **kwargs).explain(image, targets, top_k)``."""
    return Explainer(model, **kwargs).explain(image, targets, top_k)


__all__: Sequence[str] = ("Explainer", "Result", "TargetError", "explain")
