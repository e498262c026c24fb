"""Score-CAM for one detection: ``DetectionExplainer(model).explain(image, detection=0)``.

For a target detection ``(b, p)`` (a box and a class vector: one of the model's detections on the image, or
a box and a class given by the user), every channel ``k`` of the chosen feature map ``A`` [K,h,w] becomes a
mask ``H_k`` (the preset's, as for classifiers; a channel with several blobs gives one mask per blob,
:mod:`.parts`), the masked image ``x * H_k`` goes through the detector, and
its score is the D-RISE similarity ``s_k = max_d IoU(b, b_d) cos(p, p_d) o_d`` (:mod:`.heads`). The weights:

- ``centred`` (default): ``a_k = s_k - mean_j s_j``, D-RISE's estimator (masks weighted by their
  similarity) with the mean similarity taken off, as RISE's and D-RISE's maps are centred: a part whose mask
  keeps the target no better than the average mask weighs nothing or less;
- ``similarity``: ``a_k = s_k``;
- ``softmax``: ``a_k = softmax_k(s_k)``, the preset's rule on the similarity as it is on a logit.

The map is the preset's: ``ReLU(sum_k a_k A_k)`` upsampled and min-max normalised (``paper``). The feature map
is a level of the detector's neck: ``layer="auto"`` takes, per box, the deepest level whose stride is at most
half the box's shorter side (its cells resolve the box), ``"fuse"`` every level (the mean of the levels' maps),
or a tensor name. With ``max_channels`` only N channels per level are scored (chosen by ``cover``, the channels
whose normalised maps cover the others, or ``std``); ``fill="kernel"`` (the default with a cap, as for
classifiers) predicts the others' similarities by kernel ridge regression on the maps
(:func:`runtime.selection.kernel_fill`), ``"zero"`` gives them weight 0.
"""

from __future__ import annotations

import difflib
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .. import images
from ..blas import one_blas_thread
from ..contract import BundleError
from ..engine import Engine, Progress, require_finite
from ..explainer import TargetError, default_fill
from ..scorecam import constant_channels, get_preset, mask_safe, minmax, softmax
from ..selection import COVER_POWER, cover, distinct_masks, kernel_fill, spatial_std, top_channels
from .geometry import Geometry, place
from .heads import Head, Proposals, Target, decode_batch, detections, similarities, target_of
from .model import RESOLVE_CELLS, Detector, Level, key_of, open_detector
from .parts import split_channels

WEIGHTINGS = ("centred", "similarity", "softmax")
FILLS = ("zero", "kernel")
SELECTS = ("auto", "cover", "std")
DEFAULT_SCORE_THRESHOLD = 0.25
DEFAULT_NMS_IOU = 0.5


@dataclass
class Detection:
    """One detection of the model on the image."""

    index: int  # rank by score (0 = best)
    box: np.ndarray  # photo pixels, x0 y0 x1 y1
    class_index: int
    label: str
    score: float

    def to_dict(self) -> dict:
        return {"detection": self.index, "box": [round(float(v), 2) for v in self.box],
                "class_index": self.class_index, "label": self.label, "score": round(self.score, 6)}


@dataclass
class BoxResult:
    """The explanation of one box."""

    saliency: np.ndarray  # float32 [H,W] in [0,1] at the network input (letterbox padding included)
    box: np.ndarray  # photo pixels
    box_network: np.ndarray  # network input pixels
    class_index: int
    label: str
    score: float  # the detection's score (a given box: the similarity of the image itself to it)
    similarity: float  # D-RISE similarity of the unmasked image to the target
    detection: int | None  # rank of the detection explained (None: a box given by the user)
    layers: list[str]
    channels_used: int
    passes: int
    seconds: float
    provider: str
    preset: str
    weighting: str
    fill: str
    geometry: Geometry = field(repr=False)
    weights: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.geometry.shape

    def saliency_cropped(self) -> np.ndarray:
        """The map over the photo at the network's scale (letterbox padding cut off)."""
        return np.ascontiguousarray(self.geometry.crop(self.saliency), np.float32)

    def saliency_on_image(self) -> np.ndarray:
        """The map resized onto the photo, float32 [h,w] in [0,1]."""
        return images.saliency_to_image(self.saliency_cropped(), self.geometry.shape)

    def overlay(self, image, alpha: float = 0.5) -> np.ndarray:
        """The JET overlay on the photo with the box drawn, RGB uint8."""
        from .render import draw_box

        rgb = images.load_image(image)
        out = images.overlay(rgb, self.saliency_cropped(), alpha)
        return draw_box(out, self.box, f"{self.label} {self.score:.2f}")

    def to_dict(self) -> dict:
        return {"box": [round(float(v), 2) for v in self.box], "class_index": self.class_index,
                "label": self.label, "score": round(float(self.score), 6),
                "similarity": round(float(self.similarity), 6), "detection": self.detection,
                "layers": self.layers, "channels_used": self.channels_used, "passes": self.passes,
                "seconds": round(self.seconds, 4), "provider": self.provider, "preset": self.preset,
                "weighting": self.weighting, "fill": self.fill,
                "image_shape": [int(self.geometry.shape[0]), int(self.geometry.shape[1])]}


class DetectionExplainer:
    """Score-CAM with the D-RISE similarity for an ONNX object detector (see the module doc).

    Args:
        model: a detector ``.onnx`` (YOLOv8/v11, YOLOv5, torchvision SSD/RetinaNet/Faster R-CNN exports), or a
            folder holding one as ``model.onnx`` (``python -m exporter annotate``, the toy detector's export).
        device, batch_size, threads, preset: as :class:`runtime.Explainer`.
        layer: ``auto`` (per box: the deepest neck level that resolves it), ``fuse`` (every level, maps
            averaged) or a feature map's tensor name (see :func:`runtime.detect.model.format_levels`).
        max_channels, select, fill: the fast mode (module doc).
        weighting: ``centred`` (default), ``similarity`` or ``softmax``.
        split: cut channels into their blobs (:mod:`.parts`; default True).
        score_threshold, nms_iou: which proposals are detections (raw heads: NMS here).
        input_size, mean, std, scale, bgr, labels, letterbox, head: preprocessing and head, over the sidecar and
            the model's metadata (:func:`runtime.detect.model.open_detector`).
    """

    def __init__(self, model: str | os.PathLike, device: str = "auto", batch_size: int | None = None,
                 preset: str = "paper", threads: int | None = None, max_channels: int | None = None, *,
                 layer: str | None = "auto", select: str = "auto", fill: str | None = None,
                 weighting: str = "centred", score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                 nms_iou: float = DEFAULT_NMS_IOU, input_size=None, mean=None, std=None, scale=None,
                 bgr: bool = False, labels=None, letterbox: bool | None = None, head: str | None = None,
                 split: bool = True) -> None:
        self.preset = get_preset(preset)
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if max_channels is not None and int(max_channels) < 1:
            raise ValueError(f"max channels must be >= 1, got {max_channels}")
        if fill is not None and fill not in FILLS:
            raise ValueError(f"fill {fill!r} does not apply to detectors; choose one of {', '.join(FILLS)}")
        if select not in SELECTS:
            raise ValueError(f"select {select!r} does not apply to detectors; choose one of {', '.join(SELECTS)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if not 0.0 <= float(score_threshold) <= 1.0 or not 0.0 < float(nms_iou) <= 1.0:
            raise ValueError(f"score threshold must be in [0, 1] and the NMS IoU in (0, 1], got {score_threshold} "
                             f"and {nms_iou}")
        self.max_channels = int(max_channels) if max_channels else None
        self.select, self.fill, self.weighting = select, default_fill(fill, self.max_channels), weighting
        self.split = bool(split)
        self.score_threshold, self.nms_iou = float(score_threshold), float(nms_iou)
        self.detector: Detector = open_detector(model, input_size=input_size, mean=mean, std=std, scale=scale,
                                                bgr=bgr or None, labels=labels, letterbox=letterbox, head=head)
        det = self.detector
        self.layer = layer or "auto"
        if self.layer in ("auto", "fuse"):
            self.levels: list[Level] = det.neck
        else:
            self.levels = [det.level(self.layer)]
        names = [lv.name for lv in self.levels]
        self.engine = Engine(det.load, det.load, device=device, threads=threads, input_size=det.input_size,
                             mask=self.preset.mask, features_output=names[0], extra_outputs=names[1:],
                             key=key_of(det), data_dir=det.data_dir)
        self.batch_size = int(batch_size) if batch_size else self.engine.default_batch_size()
        if det.batch is not None:
            self.batch_size = int(det.batch)
        self._labels = det.labels

    # ------------------------------------------------------------------------------ properties
    @property
    def head(self) -> Head:
        return self.detector.head

    @property
    def provider(self) -> str:
        return self.engine.provider

    @property
    def input_size(self) -> tuple[int, int]:
        return self.detector.input_size

    @property
    def labels(self) -> list[str]:
        return list(self._labels or [])

    def label_of(self, index: int) -> str:
        return self.detector.label_of(index)

    @property
    def num_classes(self) -> int | None:
        if self.head.num_classes is not None:
            return self.head.num_classes
        return len(self._labels) + self.head.label_offset if self._labels else None

    # ------------------------------------------------------------------------------ the image
    def prepare(self, image) -> tuple[np.ndarray, np.ndarray, Geometry]:
        """(RGB photo, network input [1,3,H,W], geometry)."""
        rgb = images.load_image(image)
        placed, geo = place(rgb, self.input_size, self.detector.letterbox)
        return rgb, self.detector.preprocessing.apply(placed)[None], geo

    def run(self, x: np.ndarray) -> tuple[Proposals, list[np.ndarray]]:
        """The image's proposals and the activations of every level in :attr:`levels` ([K,h,w] each)."""
        raw, acts = self._run(x)
        return decode_batch(self.head, raw)[0], acts

    def _run(self, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(the head's raw outputs, the levels' activations) of one input [1,3,H,W], in one pass."""
        n = len(self.head.outputs)
        outs = self.engine.main_outputs(x, [*self.head.outputs, *(lv.name for lv in self.levels)])
        acts = [a[0] for a in outs[n:]]
        for a, lv in zip(acts, self.levels, strict=True):
            require_finite(np.zeros((1, 1)), a, lv.name)
        return outs[:n], acts

    def detect(self, image) -> list[Detection]:
        """The model's detections on ``image`` (score >= the threshold, after NMS), best first."""
        _, x, geo = self.prepare(image)
        props, _ = self.run(x)
        return self._detections(props, geo)

    def _detections(self, props: Proposals, geo: Geometry) -> list[Detection]:
        idx = detections(self.head, props, self.score_threshold, self.nms_iou)
        return [Detection(r, geo.to_photo(props.boxes[i]), int(props.labels[i]), self.label_of(int(props.labels[i])),
                          float(props.scores[i])) for r, i in enumerate(idx)]

    # ------------------------------------------------------------------------------ targets
    def class_index(self, target) -> int:
        """A class index from an index or a label (TargetError when the model has no such class)."""
        labels, off = self.labels, self.head.label_offset
        n = self.num_classes
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            idx = int(target)
        elif isinstance(target, str) and target.strip().lstrip("-").isdigit():
            idx = int(target)
        elif isinstance(target, str):
            key = target.strip().casefold()
            hits = [i for i, lab in enumerate(labels) if lab.casefold() == key]
            if hits:
                return hits[0] + off
            if not labels:
                raise TargetError(f"target {target!r}: the detector has no class labels; give a class index")
            close = difflib.get_close_matches(target, labels, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise TargetError(f"unknown class label {target!r}{hint}")
        else:
            raise TargetError(f"a target class must be an index or a label, got {target!r}")
        if idx < 0 or (n is not None and idx >= n):
            top = f"0..{n - 1}" if n is not None else ">= 0"
            raise TargetError(f"target class {idx} is out of range: the detector has classes {top}")
        return idx

    def box_target(self, box, target, geo: Geometry) -> Target:
        """A :class:`Target` from a box in photo pixels and a class (TargetError for a bad box)."""
        try:
            b = np.asarray([float(v) for v in box], np.float64)
        except (TypeError, ValueError):
            raise TargetError(f"a box is four numbers X1 Y1 X2 Y2, got {box!r}") from None
        if b.shape != (4,) or not np.isfinite(b).all():
            raise TargetError(f"a box is four finite numbers X1 Y1 X2 Y2, got {list(np.atleast_1d(b))}")
        if not (b[2] > b[0] and b[3] > b[1]):
            raise TargetError(f"the box {_fmt(b)} is empty: it needs X2 > X1 and Y2 > Y1")
        h, w = geo.shape
        if b[0] < 0 or b[1] < 0 or b[2] > w or b[3] > h:
            raise TargetError(f"the box {_fmt(b)} is outside the image ({w}x{h} pixels: X in 0..{w}, Y in 0..{h})")
        if target is None:
            raise TargetError("a box needs its class: give --target CLASS with --box")
        return Target(geo.to_network(b), self.class_index(target), None, 1.0)

    # ------------------------------------------------------------------------------ explaining
    def explain(self, image, detection: int | list[int] | None = None, box=None, target=None, top_k: int = 1,
                progress: Progress | None = None) -> list[BoxResult]:
        """One :class:`BoxResult` per box: ``box`` + ``target`` (a box in photo pixels and its class), else the
        ``detection``-th detection(s) (0 = best), else the ``top_k`` best detections."""
        t0 = time.perf_counter()
        rgb, x, geo = self.prepare(image)
        with one_blas_thread():
            results = self._explain(x, geo, detection, box, target, top_k, progress)
        seconds = time.perf_counter() - t0
        for r in results:
            r.seconds = seconds
        return results

    def _explain(self, x, geo, detection, box, target, top_k, progress) -> list[BoxResult]:
        raw, acts = self._run(x)
        props = decode_batch(self.head, raw)[0]
        dets = detections(self.head, props, self.score_threshold, self.nms_iou)
        if box is not None:
            targets = [self.box_target(box, target, geo)]
            ranks: list[int | None] = [None]
        else:
            if detection is not None:
                wanted = [detection] if isinstance(detection, (int, np.integer)) else list(detection)
            else:
                if int(top_k) < 1:
                    raise TargetError(f"top-k must be >= 1, got {top_k}")
                wanted = list(range(min(int(top_k), len(dets))))
            if not len(dets):
                raise TargetError(f"the detector finds nothing on this image at score >= {self.score_threshold:g}; "
                                  "lower --score-threshold, or explain a box with --box X1 Y1 X2 Y2 --target CLASS")
            for d in wanted:
                if not 0 <= int(d) < len(dets):
                    raise TargetError(f"detection {d} does not exist: the detector finds {len(dets)} on this image "
                                      f"(0..{len(dets) - 1}) at score >= {self.score_threshold:g}")
            targets = [target_of(props, int(dets[int(d)])) for d in wanted]
            ranks = [int(d) for d in wanted]
        base = similarities(self.head, targets, raw, 1)[0]
        groups: dict[tuple[int, ...], list[int]] = {}
        for t, tg in enumerate(targets):
            groups.setdefault(self.levels_for(tg.box), []).append(t)
        total = sum(self._channel_count(acts[i]) for key in groups for i in key)
        done = [0]

        def step(d: int, _n: int) -> None:
            if progress:
                progress(min(done[0] + d, total), total)

        results: list[BoxResult | None] = [None] * len(targets)
        for key, members in groups.items():
            sub = [targets[t] for t in members]
            sal = np.zeros((len(sub), *self.input_size), np.float64)
            used = passes = 0
            weights: list[list[np.ndarray]] = [[] for _ in sub]
            for i in key:
                s, w, u, p = self._level_maps(x, acts[i], sub, step)
                done[0] += self._channel_count(acts[i])
                sal += s
                used, passes = used + u, passes + p
                for j in range(len(sub)):
                    weights[j].append(w[j])
            for j, t in enumerate(members):
                tg = targets[t]
                label = self.label_of(tg.class_index)
                results[t] = BoxResult(
                    saliency=minmax(sal[j].astype(np.float32)), box=geo.to_photo(tg.box), box_network=tg.box.copy(),
                    class_index=tg.class_index, label=label,
                    score=float(tg.score) if ranks[t] is not None else float(base[t]), similarity=float(base[t]),
                    detection=ranks[t], layers=[self.levels[i].name for i in key], channels_used=used,
                    passes=passes, seconds=0.0, provider=self.provider, preset=self.preset.name,
                    weighting=self.weighting, fill=self.fill if self._capped(acts, key) else "zero", geometry=geo,
                    weights=weights[j])
        return [r for r in results if r is not None]

    def levels_for(self, box: np.ndarray) -> tuple[int, ...]:
        """Indices into :attr:`levels` used for a box (network pixels): see ``layer``."""
        if self.layer == "fuse" or len(self.levels) == 1:
            return tuple(range(len(self.levels)))
        side = float(min(box[2] - box[0], box[3] - box[1]))
        ok = [i for i, lv in enumerate(self.levels) if lv.stride * RESOLVE_CELLS <= side]
        return (max(ok, key=lambda i: self.levels[i].stride),) if ok else \
            (min(range(len(self.levels)), key=lambda i: self.levels[i].stride),)

    def _capped(self, acts, key) -> bool:
        return self.max_channels is not None and any(self.max_channels < acts[i].shape[0] for i in key)

    def _channel_count(self, a: np.ndarray) -> int:
        k = a.shape[0]
        return min(k, self.max_channels) if self.max_channels else k

    def channels_to_score(self, acts: np.ndarray, skipped: np.ndarray) -> np.ndarray:
        """Boolean [K]: all channels, or with ``max_channels`` N of them (``cover`` / ``std``)."""
        scored = np.ones(acts.shape[0], bool)
        if self.max_channels is None or self.max_channels >= int((~skipped).sum()):
            return scored
        rank = spatial_std(acts)
        if self.select == "std" or (self.select == "auto" and self.fill != "kernel"):
            return top_channels(rank, ~skipped, self.max_channels)
        return cover(acts, rank ** COVER_POWER, ~skipped, self.max_channels)

    def parts(self, acts: np.ndarray) -> np.ndarray:
        """The masks' source maps [P,h,w]: each channel, or, where it has several blobs, each blob apart
        (:func:`runtime.detect.parts.split_channels`)."""
        return split_channels(acts) if self.split else acts

    def score_level(self, x: np.ndarray, acts: np.ndarray, targets: list[Target],
                    progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """``(s [K,T], weighed [K], passes)``: the similarity of every masked input ``x * H_k`` to each target
        (rows of channels not scored: filled per :attr:`fill`, else 0 and not weighed)."""
        spec = self.preset.mask
        k = acts.shape[0]
        skipped = constant_channels(acts)
        scored = self.channels_to_score(acts, skipped)
        out = np.zeros((k, len(targets)), np.float64)

        def reduce(arrays, n):
            return similarities(self.head, targets, arrays, n)

        idx = np.flatnonzero(scored & ~skipped)
        passes = 0
        if idx.size:
            safe = mask_safe(acts[idx])
            first, inverse = distinct_masks(safe, spec)
            got = self.engine.score(x, safe[first], spec, self.batch_size, progress, outputs=self.head.outputs,
                                    reduce=reduce)
            out[idx] = got[inverse]
            passes = int(first.size)
        if skipped.any():  # every constant channel's mask is all zero: x * 0, scored once
            zero = self.engine.score(np.zeros_like(x), np.zeros((1, *acts.shape[1:]), np.float32), spec, 1, None,
                                     outputs=self.head.outputs, reduce=reduce)
            out[skipped] = zero[0]
        weighed = scored | skipped
        if self.fill == "kernel" and not weighed.all():
            out = kernel_fill(acts, weighed, out, ~skipped)
            weighed = np.ones(k, bool)
        return np.clip(np.nan_to_num(out), 0.0, 1.0), weighed, passes

    def weights_of(self, s: np.ndarray, weighed: np.ndarray) -> np.ndarray:
        """[T,K] weights from the similarities [K,T] (module doc); channels not weighed get 0."""
        if self.weighting == "centred":
            mean = s[weighed].mean(axis=0) if weighed.any() else np.zeros(s.shape[1])
            return np.where(weighed[None, :], s.T - mean[:, None], 0.0)
        if self.weighting == "softmax":
            z = np.where(weighed[None, :], s.T, -np.inf)
            return softmax(z, axis=1) if weighed.any() else np.zeros_like(s.T)
        return np.where(weighed[None, :], s.T, 0.0)

    def _level_maps(self, x, acts, targets, progress):
        """(saliency [T,H,W] in [0,1], weights [T][K], channels used, passes) for one level."""
        acts = self.parts(acts)
        s, weighed, passes = self.score_level(x, acts, targets, progress)
        a = self.weights_of(s, weighed)
        flat = np.nan_to_num(acts.reshape(acts.shape[0], -1).astype(np.float64))
        sums = (a @ flat).reshape(len(targets), *acts.shape[1:])
        sal = np.stack([self.preset.finish(sums[j].astype(np.float32), self.input_size)[1]
                        for j in range(len(targets))]) if len(targets) else np.zeros((0, *self.input_size))
        return np.clip(np.nan_to_num(sal), 0, 1), [a[j].astype(np.float32) for j in range(len(targets))], \
            int(weighed.sum()), passes


def _fmt(b: np.ndarray) -> str:
    return "[" + " ".join(f"{v:g}" for v in b) + "]"


__all__ = ["BoxResult", "Detection", "DetectionExplainer", "BundleError"]
