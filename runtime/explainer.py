"""The Python API: ``Explainer(model).explain(image, targets=None, top_k=1)``.

One explanation of one image runs: the feature graph once (activations ``A`` [K,h,w]), the classifier
once (the image's own logits), and the scorer over the K masks chunk by chunk (logits [K,C] of every
masked input). The masked outputs do not depend on the class, so every requested class is
explained from that ONE scoring pass; :mod:`runtime.scorecam` turns scores into maps.

Multi-layer Score-CAM (``layers=3``): the same main run also gives the activations of finer layers
(:mod:`runtime.stages`), each layer's channels are scored through the same scoring session (its masks are
made at its own grid), each layer gets its own Score-CAM map, and :mod:`runtime.fusion` fuses them into
one finer map. ``baseline="blur"``: the masked-out pixels take the image blurred (the deletion/insertion
metrics' blurred canvas) instead of 0.
"""

from __future__ import annotations

import difflib
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from . import images
from .blas import one_blas_thread
from .contract import BundleError
from .engine import Engine, Progress, require_finite
from .fusion import DEFAULT_FUSION, FUSIONS, finer_map, fuse
from .head import LinearHead, linear_head
from .metrics import blur
from .scorecam import (
    Maps,
    MaskSpec,
    constant_channels,
    get_preset,
    maps_from_scores,
    mask_safe,
    minmax,
    softmax,
    upsample,
)
from .selection import (
    COVER_POWER,
    SELECTS,
    cover,
    distinct_masks,
    feature_scores,
    kernel_fill,
    relevance,
    spatial_std,
    top_channels,
)
from .stages import Stage, as_maps, find_stages, parse_layers
from .thirdparty import open_model

MODES = ("scorecam", "preview", "qrise", "qrise-check")
#: the modes made by :meth:`Explainer._explain_qrise` (``qrise-check``: with the self-check)
QRISE_MODES = ("qrise", "qrise-check")
#: the Score-CAM factor's channel cap in mode qrise when ``max_channels`` is not given
QRISE_CHANNELS = 16
#: the linear head of each classifier opened in this process (by graph hashes and tensor names): read once
_HEADS: dict[tuple, LinearHead | None] = {}
#: the finer layers of each classifier and request (by graph hashes, target layer and ``layers``): found once
_STAGES: dict[tuple, list[Stage]] = {}
BASELINES = ("zero", "blur")
FILLS = ("kernel", "zero", "preview")


def default_fill(fill: str | None, max_channels: int | None) -> str:
    """The fill that runs: ``fill`` when asked, else ``kernel`` when channels are capped, else ``zero`` (exact
    Score-CAM leaves no channel out, so nothing is filled)."""
    if fill is not None:
        return fill
    return "kernel" if max_channels else "zero"


class TargetError(ValueError):
    """A requested class does not exist in the model."""


def check_layer_options(layers, mode: str, fill: str, fusion: str, baseline: str, precision: str = "fp32") -> None:
    """ValueError naming the first option that does not go with the others (multi-layer, baseline, precision)."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    if layers and mode == "preview":
        raise ValueError("mode 'preview' scores the target layer through its linear head and has no multi-layer "
                         "form; use layers with mode 'scorecam' (and max_channels with fill 'kernel' to be fast)")
    if layers and fill == "preview":
        raise ValueError("fill 'preview' needs the linear head after the layer, which a finer layer has not; "
                         "use fill 'kernel' with layers")
    if baseline == "blur" and mode == "preview":
        raise ValueError("mode 'preview' masks the features, not the image: a baseline does not apply")
    if layers and mode in QRISE_MODES:
        raise ValueError(f"mode {mode!r} refines its regression map with the target layer's fast Score-CAM and has "
                         "no multi-layer form; use layers with mode 'scorecam'")
    if baseline == "blur" and mode in QRISE_MODES:
        raise ValueError(f"mode {mode!r} masks the image towards zero (the metric it is measured on); a baseline "
                         "applies to mode 'scorecam'")
    if mode in QRISE_MODES and precision != "fp32":
        raise ValueError(f"mode {mode!r} scores its masks with the fp32 classifier; use precision 'fp32'")


@dataclass
class _Plan:
    """Which channels of one layer are scored (see ``Explainer._plan``)."""

    acts: np.ndarray
    head: LinearHead | None
    skipped: np.ndarray
    scored: np.ndarray
    masks: int  # masked inputs it takes
    filling: bool  # the channels left out get a filled score
    finer: bool = False  # a finer layer of a multi-layer explanation (runtime.fusion.finer_map)


@dataclass
class _Layer:
    """One layer's outcome: a map per class, which channels weighed, the masked inputs scored."""

    maps: list[Maps]
    scored: np.ndarray
    skipped: np.ndarray
    passes: int
    select: str


class _Steps:
    """One progress count over the layers of a multi-layer explanation: ``at(n)`` is the callback for the
    next layer's ``n`` masks."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def at(self, n: int) -> Progress:
        start = self.done
        self.done += n
        return lambda done, _total: self.progress(min(start + done, self.total), self.total)


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
    mode: str = "scorecam"
    select: str = "all"  # which channels were scored: all, or how max_channels chose them (cover, relevance, std)
    passes: int = 0  # masked inputs scored (one per distinct varying mask; the dead channels' all-zero mask is
    # scored once per explainer and not counted); 0 for the preview
    fill: str = "zero"  # what the channels left out by max_channels weighed: kernel (predicted scores), zero or
    # preview (calibrated feature-space scores); zero when none was left out (select all)
    weights: np.ndarray | None = field(default=None, repr=False)  # a_k [K] (of the target layer)
    image_shape: tuple[int, int] | None = None  # (h, w) of the original image, when known
    layers: tuple[str, ...] = ()  # multi-layer: the finer layers fused with the target layer (finest last)
    baseline: str = "zero"  # what the masked-out pixels became: zero (the paper) or blur
    target_layer: str = ""  # the bundle's target layer (the deepest map)

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
                "provider": self.provider, "preset": self.preset, "mode": self.mode, "select": self.select,
                "fill": self.fill, "passes": self.passes, "layers": [self.target_layer, *self.layers],
                "baseline": self.baseline}


class Explainer:
    """Score-CAM on ONNX Runtime for one exported bundle.

    Args:
        model: a bundle directory, its ``model.onnx``, or a bundle name under ``models/``.
        device: ``auto`` (CUDA if onnxruntime-gpu's provider loads, else CPU), ``cpu`` or ``cuda``.
        batch_size: masked inputs scored per run (None: chosen for the device).
        preset: ``paper`` (default), ``gradcam``, ``torchcam`` or ``official`` (see DESIGN.md).
        threads: ONNX Runtime intra-op threads (None: ONNX Runtime's default, the physical cores).
        max_channels: the fast mode: score only N channels, chosen by ``select``, and weigh the others as
            ``fill`` says (None: all K channels, exact). ``max_channels=N`` alone means ``select="cover"`` +
            ``fill="kernel"``; ``fill="zero"`` is Faster Score-CAM (the others weigh 0).
        select: how ``max_channels`` chooses the channels: ``relevance`` (|W[c,k]| std(A_k), union over the
            classes explained; needs a global-pooling -> linear head after the target layer), ``std``
            (spatial standard deviation, class-blind), ``cover`` (the channels whose normalised maps cover
            all the others: weighted k-means) or ``auto`` (default: ``cover`` with ``fill="kernel"``, else
            relevance where the head allows it, else std). See :mod:`runtime.selection`.
        fill: with ``max_channels``, what the channels left out weigh: ``kernel`` (the default with
            ``max_channels``): their scores predicted from the scored channels' by kernel ridge regression
            on the normalised maps (similar maps, similar masks, similar scores; any head, any preset);
            ``zero`` (Faster Score-CAM: weight 0; unsafe on photos unlike the ones the channel budget was
            chosen on); or ``preview``: their feature-space score (as in ``mode="preview"``), calibrated on
            the scored channels by a least-squares line ``s_exact ~ a s_preview + b`` (a >= 0) per class;
            needs a global-pooling -> linear head; not with the ``official`` preset. None (default):
            :func:`default_fill` (``kernel`` with ``max_channels``, else ``zero``: nothing is left out).
        mode: ``scorecam`` (default) or ``preview``: the one-pass feature-space Score-CAM, each channel's
            mask applied to the features instead of the input, scored in closed form through the linear
            head (no masked passes: one classifier pass plus numpy; needs a global-pooling -> linear head).
            A rough sketch, not for live use: on photos unlike the samples its map can be unrelated to
            Score-CAM's (Pearson r 0.01 on scikit-image's retina.jpg); live use wants ``precision="int8",
            max_channels=32, fill="kernel"`` (docs/fast-modes.md). Or ``qrise``: quasi-random RISE refined
            by the fast Score-CAM (:mod:`runtime.qrise`): 320 smooth masks from Sobol' designs (5 x 5 and
            6 x 6 cells) scored once for every class, the class probability ridge-regressed on the masks,
            times the Score-CAM map of ``max_channels`` (default 16) channels to the power 0.5; finer and
            higher on insertion than exact Score-CAM at about half its time (docs/evaluation.md); fp32 only.
        precision: ``fp32`` (exact), ``int8`` (the bundle's quantized classifier scores the masked
            inputs; export with ``--int8``) or ``fp16`` (CUDA only). The class decision, score and
            probability always come from the fp32 classifier.
        tf32: on CUDA, let cuDNN / cuBLAS use TF32 tensor-core math for fp32 (Ampere and later):
            maps then differ from the CPU's by ~2e-3 instead of ~1e-5 (default False: exact).
        layers: multi-layer Score-CAM: ``N`` uses the target layer plus the N - 1 stage outputs next finer
            than it, found in the classifier graph (:mod:`runtime.stages`; Lite0: 14 x 14 x 112 and 28 x 28 x
            40), or a list of layer names; each layer gets its own Score-CAM map (its channels scored through
            the same session; ``max_channels``, ``select`` and ``fill`` apply per layer) and ``fusion`` fuses
            them into one finer map. None or 1 (default): the target layer alone, exactly as before.
        fusion: how the layers' maps are fused (:mod:`runtime.fusion`): ``product`` (default: the pointing
            game's best at the same insertion, docs/evaluation.md), ``poly`` (Poly-CAM's local normalisation) or
            ``sum``. A finer layer's own map is :func:`runtime.fusion.finer_map`.
        baseline: what the masked-out pixels become: ``zero`` (default, the paper: ``x * H_k``) or ``blur``
            (``x * H_k + blur(x) * (1 - H_k)``, the blurred canvas of the deletion/insertion metrics).
        layer, output, input_size, mean, std, scale, bgr, labels: only for a model file without
            bundle metadata (any ONNX image classifier; see :mod:`runtime.thirdparty`): the target
            tensor (None: automatic), the class-score output (None: the first 2-D one) and the
            preprocessing (None: the sidecar ``<model>.json``'s, else 224, ImageNet mean/std, 1/255, RGB).
        grid, aux_tokens: only for a model file without bundle metadata whose target layer is tokens
            [N,T,D]: its grid (h, w) and auxiliary tokens (CLS, distillation, registers); None: inferred.
    """

    def __init__(self, model: str | os.PathLike, device: str = "auto", batch_size: int | None = None,
                 preset: str = "paper", threads: int | None = None, max_channels: int | None = None,
                 precision: str = "fp32", *, select: str = "auto", mode: str = "scorecam", fill: str | None = None,
                 tf32: bool = False, layers: int | str | Sequence[str] | None = None,
                 fusion: str = DEFAULT_FUSION, baseline: str = "zero",
                 layer: str | None = None, output: str | None = None,
                 input_size: tuple[int, int] | None = None, mean=None, std=None, scale: float | None = None,
                 bgr: bool = False, labels=None, grid: tuple[int, int] | None = None,
                 aux_tokens: int | None = None) -> None:
        self.preset = get_preset(preset)
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if max_channels is not None and int(max_channels) < 1:
            raise ValueError(f"max channels must be >= 1, got {max_channels}")
        self.max_channels = int(max_channels) if max_channels else None
        if select not in SELECTS:
            raise ValueError(f"unknown select {select!r}; choose one of {', '.join(SELECTS)}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if fill is not None and fill not in FILLS:
            raise ValueError(f"unknown fill {fill!r}; choose one of {', '.join(FILLS)}")
        if fill == "preview" and get_preset(preset).name == "official":
            raise ValueError("fill 'preview' does not apply to the 'official' preset (its weights are probabilities "
                             "over every class); use fill 'kernel' or 'zero'")
        #: the fill as asked (None: the default), kept so that a variant with another channel cap re-resolves it
        self.fill_asked = fill
        self.select, self.mode, self.fill = select, mode, default_fill(fill, self.max_channels)
        wanted = parse_layers(layers)
        check_layer_options(wanted, mode, self.fill, fusion, baseline, precision)
        self.fusion, self.baseline = fusion, baseline
        self._zero_scores: np.ndarray | None = None
        try:
            self.bundle = open_model(model, layer=layer, output=output, input_size=input_size, mean=mean, std=std,
                                      scale=scale, bgr=bgr or None, labels=labels, grid=grid, aux_tokens=aux_tokens)
        except BundleError:
            from .detect.model import looks_like_detector

            if looks_like_detector(model):  # one line that says what to use instead
                raise BundleError(f"{model} is an object detector, not a classifier: explain it with "
                                  "runtime.detect.DetectionExplainer (python -m runtime.explain recognises it); "
                                  "the one-graph explainer, the service and the batch job take classifiers only"
                                  ) from None
            raise
        self.meta = self.bundle.meta
        self.pre = self.meta.preprocessing
        if precision == "int8":
            self.bundle.load_int8()  # fail now, not in the middle of the first explanation
        key = f"{self.bundle.model_sha256}:{self.bundle.features_sha256}"
        int8_key = None
        if precision == "int8":  # the int8 file can change beside unchanged fp32 graphs: its identity too
            st = os.stat(self.bundle.int8_path)
            int8_key = f"{os.path.realpath(self.bundle.int8_path)}:{st.st_size}:{st.st_mtime_ns}"
        seen: list[LinearHead | None] = []

        def inspect(proto, engine: Engine) -> None:  # the head is read from the graph the engine loads anyway
            seen.append(linear_head(proto, engine.features_output, engine.class_output, engine.layout,
                                    base_dir=engine.data_dir))

        self._key = key
        self.stages: list[Stage] = self.find_layers(wanted) if wanted else []
        self.engine = Engine(self.bundle.load_model, self.bundle.load_features, device=device, threads=threads,
                             input_size=self.pre.input_size, precision=precision,
                             int8_classifier=self.bundle.load_int8, tf32=tf32, mask=self.mask,
                             features_output=self.bundle.features_output, key=key, inspect=inspect,
                             int8_key=int8_key, data_dir=self.bundle.data_dir, layout=self.meta.layout,
                             extra_outputs=[st.name for st in self.stages])
        self.batch_size = int(batch_size) if batch_size else self.engine.default_batch_size()
        if self.bundle.max_batch:  # a third-party classifier whose batch size is fixed
            self.batch_size = self.bundle.max_batch
        head_key = (key, self.engine.features_output, self.engine.class_output)
        if seen:
            _HEADS[head_key] = seen[0]
        elif head_key not in _HEADS:  # an engine built on graphs read before: read the head once
            _HEADS[head_key] = linear_head(self.engine.classifier_proto, self.engine.features_output,
                                           self.engine.class_output, self.engine.layout,
                                           base_dir=self.engine.data_dir)
        self.head: LinearHead | None = _HEADS[head_key]
        if self.meta.output_kind == "probabilities":
            self.head = None  # a softmax after the linear layer: the closed form does not hold
        needs = ("mode 'preview'" if mode == "preview" else "select 'relevance'" if select == "relevance"
                 else "fill 'preview'" if fill == "preview" else None)
        if needs and self.head is None:
            raise BundleError(f"{needs} needs a global-pooling -> linear head after the target layer "
                              f"({self.meta.layer!r}), and this model has another head; "
                              + ("use mode 'scorecam' with max_channels instead" if mode == "preview"
                                 else "use select 'std'"))

    def find_layers(self, layers: int | Sequence[str]) -> list[Stage]:
        """The finer layers of ``layers`` (a total count or names; :func:`runtime.stages.find_stages`), found
        in the classifier graph once per process."""
        key = (self._key, self.bundle.features_output, layers, tuple(self.pre.input_size))
        found = _STAGES.get(key)
        if found is None:
            if self.meta.layout.kind == "NLC":
                raise BundleError(f"multi-layer Score-CAM needs a map target layer (NCHW or NHWC); this model's is "
                                  f"tokens ({self.meta.layout.describe()}) and its blocks have no finer grid: "
                                  "explain it from one layer")
            proto = self.bundle.load_model()
            g = proto.graph
            inits = {i.name for i in g.initializer}
            input_name = next(i.name for i in g.input if i.name not in inits)
            produced = {o for n in g.node for o in n.output}
            deepest = self.bundle.features_output if self.bundle.features_output in produced else self.meta.layer
            found = _STAGES[key] = find_stages(proto, input_name, g.output[0].name, deepest,
                                               tuple(self.pre.input_size), layers)
            del proto, g
        return found

    @property
    def mask(self) -> MaskSpec:
        """How a channel becomes a masked input here: the preset's mask, blended with ``blur(x)`` for
        ``baseline="blur"``."""
        return replace(self.preset.mask, blend=True) if self.baseline == "blur" else self.preset.mask

    @property
    def selection(self) -> str:
        """The channel choice ``max_channels`` uses here: ``cover``, ``relevance`` or ``std`` (``auto`` resolved)."""
        return self.selection_for(self.head)

    def selection_for(self, head: LinearHead | None) -> str:
        """:attr:`selection` for a layer followed by ``head`` (a finer layer: None, so no ``relevance``)."""
        if self.select == "auto":
            return "cover" if self.fill == "kernel" else "relevance" if head is not None else "std"
        if self.select == "relevance" and head is None:
            return "std"
        return self.select

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
        """Explain an already-preprocessed float32 [1,3,H,W] input -> one Result per class.

        numpy's BLAS runs on one thread meanwhile (:mod:`runtime.blas`: ONNX Runtime's threads own the cores)."""
        t0 = time.perf_counter()
        with one_blas_thread():
            results = self._explain_tensor(x, targets, top_k, progress)
        seconds = time.perf_counter() - t0
        for r in results:
            r.seconds = seconds
        return results

    def _explain_tensor(self, x: np.ndarray, targets, top_k: int, progress: Progress | None) -> list[Result]:
        """:meth:`explain_tensor` (which sets ``seconds``)."""
        x = self._check_tensor(x)
        if self.mode in QRISE_MODES:
            return self._explain_qrise(x, targets, top_k, progress)
        if self.stages:
            logits, acts, extra = self.engine.classify_and_layers(x, [st.name for st in self.stages])
            finer = [as_maps(t, st) for t, st in zip(extra, self.stages, strict=True)]
        else:
            logits, acts = self.engine.classify_and_activations(x)
            finer = []
        require_finite(logits, acts, self.meta.layer)
        for a, st in zip(finer, self.stages, strict=True):
            require_finite(logits, a, st.name)
        base = logits[0].astype(np.float64)
        classes = self.resolve_targets(targets, base, top_k)
        fill_image = blur(x) if self.baseline == "blur" else None
        plans = [self._plan(a, classes, head, i > 0) for i, (a, head) in
                 enumerate(zip([acts, *finer], [self.head] + [None] * len(finer), strict=True))]
        steps = _Steps(progress, sum(p.masks for p in plans)) if progress and finer else None
        layers = [self._explain_layer(x, p, base, classes, steps.at(p.masks) if steps else progress, fill_image)
                  for p in plans]
        probs = self._probabilities(base)
        deep = layers[0]
        out = []
        for i, m in enumerate(deep.maps):
            cam, sal = m.cam, m.saliency
            if finer:
                cam, sal = fuse([lo.maps[i].cam for lo in layers], self.input_size, self.fusion)
            out.append(Result(
                saliency=sal, cam=cam, class_index=m.class_index, label=self.label_of(m.class_index),
                score=float(base[m.class_index]), probability=float(probs[m.class_index]),
                channels_used=sum(int(lo.scored.sum()) for lo in layers),
                channels_skipped=sum(int(lo.skipped.sum()) for lo in layers), seconds=0.0, provider=self.provider,
                preset=self.preset.name, mode=self.mode, select=deep.select, passes=sum(lo.passes for lo in layers),
                fill=self.fill if deep.select != "all" else "zero", weights=m.weights,
                layers=tuple(st.name for st in self.stages), baseline=self.baseline, target_layer=self.meta.layer))
        return out

    def _explain_qrise(self, x: np.ndarray, targets, top_k: int, progress: Progress | None) -> list[Result]:
        """Modes ``qrise`` and ``qrise-check``: one set of :data:`runtime.qrise.QRISE_MASKS` passes for every
        class (:func:`runtime.qrise.scored_masks`), ridge-regressed per class, times the fast Score-CAM's map
        (``max_channels``, default :data:`QRISE_CHANNELS`) ^ 0.5; ``qrise-check`` then runs the self-check
        per class (:func:`runtime.qrise.checked`, :data:`runtime.qrise.CHECK` steps)."""
        from .methods import _variant
        from .qrise import QRISE_MASKS, checked, refine, ridge_map, scored_masks, upsampled

        cap = self.max_channels or QRISE_CHANNELS
        steps = _Steps(progress, cap + QRISE_MASKS) if progress else None
        fast = _variant(self, max_channels=cap, select=self.select, mode="scorecam", fill=self.fill_asked)
        cams = fast._explain_tensor(x, targets, top_k, steps.at(cap) if steps else None)  # resolves the classes
        classes = [r.class_index for r in cams]
        size = tuple(x.shape[-2:])
        low, y = scored_masks(self, x, classes, progress=steps.at(QRISE_MASKS) if steps else None)
        for j, (w, r) in enumerate(zip(upsampled(ridge_map(low, y, 10.0), size), cams, strict=True)):
            cam, r.saliency = r.saliency, refine(w, r.saliency, 0.5)
            r.mode, r.passes = self.mode, r.passes + QRISE_MASKS
            if self.mode == "qrise-check":
                r.saliency, passes = checked(self, x, r.class_index, r.saliency, w, cam, low, y[:, j])
                r.passes += passes
        if progress:
            progress(QRISE_MASKS + cap, QRISE_MASKS + cap)
        return cams

    def _plan(self, acts: np.ndarray, classes: list[int], head: LinearHead | None, finer: bool = False) -> _Plan:
        """Which channels of one layer's activations are scored, and how many masked inputs that takes."""
        skipped = constant_channels(acts)
        if self.mode == "preview":
            scored = ~skipped if self.preset.skip_constant else np.ones(acts.shape[0], bool)
            return _Plan(acts, head, skipped, scored, 0, False, finer)
        scored = self.channels_to_score(acts, skipped, classes, head)
        filling = self.fill != "zero" and not scored.all()  # fill 'preview' without a head: refused at init
        if filling and not self.preset.skip_constant:
            scored = scored | skipped  # the all-zero mask (cached): the many dead channels are exact
        varying = np.flatnonzero(scored & ~skipped)
        n = distinct_masks(mask_safe(acts[varying]), self.mask)[0].size if varying.size else 0
        return _Plan(acts, head, skipped, scored, n, filling, finer)

    def _explain_layer(self, x: np.ndarray, plan: _Plan, base: np.ndarray, classes: list[int],
                       progress: Progress | None, fill_image: np.ndarray | None) -> _Layer:
        """One layer's Score-CAM: its channels scored as ``plan`` says, filled, weighed, one map per class."""
        acts, skipped, scored = plan.acts, plan.skipped, plan.scored
        if self.mode == "preview":
            masked, passes, select = self.preview_scores(acts, classes), 0, "all"
        else:
            allowed = ~skipped if self.preset.skip_constant else np.ones(acts.shape[0], bool)
            select = self.selection_for(plan.head) if (allowed & ~scored).any() else "all"  # none left out
            masked, passes = self.score_channels(x, acts, scored & ~skipped, scored & skipped, base.shape[0],
                                                 progress, count=True, base=fill_image)
            require_finite(masked[scored], masked=True)
            if plan.filling:
                masked, scored = self.fill_scores(acts, masked, scored, skipped, classes, plan.head)
        if plan.finer:  # runtime.fusion.finer_map: the softmax over a finer layer's channels is nearly uniform
            maps = []
            for c in classes:
                cam, w = finer_map(acts, masked[:, c], scored & ~skipped)
                maps.append(Maps(int(c), cam, minmax(upsample(cam, self.input_size)), w))
        else:
            maps = self._maps(acts, masked, base, classes, skipped, scored,
                              columns=self.mode == "preview" and self.preset.name != "official")
        return _Layer(maps, scored, skipped, passes, select)

    def _maps(self, acts, masked, base, classes, skipped, scored, columns: bool = False):
        """:func:`maps_from_scores` on the columns of ``classes`` alone (all columns for ``official``, whose
        weight is a softmax over every class): the [K,C] matrix is not copied three times for one class.
        ``columns``: ``masked`` already holds just those columns ([K,len(classes)], in their order)."""
        if self.preset.name == "official":
            return maps_from_scores(self.preset, acts, masked, base, classes, self.input_size, skipped=skipped,
                                    channel_mask=scored)
        cols = masked if columns else masked[:, classes]
        maps = maps_from_scores(self.preset, acts, cols, base[classes], list(range(len(classes))),
                                self.input_size, skipped=skipped, channel_mask=scored)
        for m, c in zip(maps, classes, strict=True):
            m.class_index = int(c)
        return maps

    def fill_scores(self, acts: np.ndarray, masked: np.ndarray, scored: np.ndarray, skipped: np.ndarray,
                    classes: list[int], head: LinearHead | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(masked, weighed)``: ``masked`` [K,C] with the rows of the channels not scored filled as
        :attr:`fill` says, and the channels that now weigh in the map.

        ``kernel``: :func:`runtime.selection.kernel_fill` in the columns of ``classes`` (every column for
        ``official``, whose weight is a softmax over every class), over the channels the preset does not
        skip. ``preview``: ``a s_k + b`` in the columns of ``classes``, ``s`` the feature-space score,
        ``a >= 0, b`` the least-squares line of the exact scores on ``s`` over the scored varying channels
        (a = 0, b = their mean when fewer than 3); every channel weighs. ``head``: the linear head after
        this layer (default: the target layer's)."""
        out = masked.astype(np.float64)
        if self.fill == "kernel":
            cols = slice(None) if self.preset.name == "official" else classes
            weighed = ~skipped if self.preset.skip_constant else np.ones_like(scored)
            out[:, cols] = kernel_fill(acts, scored, out[:, cols], weighed & ~skipped)
            return out, weighed
        head = head or self.head
        s = feature_scores(acts, head.weight, head.bias, classes)  # [K,n]
        fit = scored & ~skipped
        for i, c in enumerate(classes):
            e, p = out[fit, c], s[fit, i]
            a = float(np.polyfit(p, e, 1)[0]) if fit.sum() >= 3 and np.ptp(p) > 0 else 0.0
            a = max(a, 0.0)
            b = float(np.mean(e - a * p)) if fit.any() else 0.0
            out[~scored, c] = a * s[~scored, i] + b
        return out, np.ones_like(scored)

    def preview_scores(self, acts: np.ndarray, classes: list[int]) -> np.ndarray:
        """The feature-space scores of :func:`runtime.selection.feature_scores`: [K,len(classes)], or [K,C]
        for the ``official`` preset, whose weight is a softmax over every class."""
        if self.preset.name == "official":
            return feature_scores(acts, self.head.weight, self.head.bias)
        return feature_scores(acts, self.head.weight, self.head.bias, classes)

    def score_channels(self, x: np.ndarray, acts: np.ndarray, varying: np.ndarray, constant: np.ndarray,
                       n_classes: int, progress: Progress | None = None, count: bool = False,
                       base: np.ndarray | None = None):
        """Logits [K,C] of ``x * H_k`` (``baseline="blur"``: ``x * H_k + base * (1 - H_k)``, ``base`` =
        ``blur(x)``) for the channels in ``varying | constant`` (other rows 0); with ``count=True`` also the
        number of masked inputs scored.

        One pass per distinct mask: every constant channel has the same all-zero mask (masked input
        ``x * 0 = 0``, whatever the image: scored once per explainer and cached, not counted), and varying
        channels whose maps are equal after min-max normalisation have equal masks
        (:func:`runtime.selection.distinct_masks`); each mask is scored once and its row shared.
        On real networks (dead and saturated ReLU channels) that saves a large share of the K passes
        without changing any output.
        """
        masked = np.zeros((acts.shape[0], n_classes), np.float32)
        idx = np.flatnonzero(varying)
        safe = mask_safe(acts[idx]) if idx.size else acts[:0]  # huge channels rescaled: same masks, finite
        first, inverse = distinct_masks(safe, self.mask) if idx.size else (idx, idx)
        maps = safe[first]
        blended = {"base": blur(x) if base is None else base} if self.mask.blend else {}
        if maps.shape[0]:
            scores = self.engine.score(x, maps, self.mask, self.batch_size, progress, **blended)
            masked[idx] = scores[inverse]
        if constant.any():
            masked[constant] = self.zero_input_scores(x, acts.shape[1:], blended.get("base"))
        return (masked, int(maps.shape[0])) if count else masked

    def zero_input_scores(self, x: np.ndarray, grid: tuple[int, ...], base: np.ndarray | None = None) -> np.ndarray:
        """The classifier's outputs [C] for the all-zero mask's input (every constant channel's mask): ``x * 0``
        is the same for every image, so it is scored once (through the masked-input session, at this
        explainer's precision) and kept; with ``baseline="blur"`` it is ``blur(x)``, scored for each image."""
        zero = np.zeros((1, *grid), np.float32)
        if self.mask.blend:
            return self.engine.score(x, zero, self.mask, 1, None, base=blur(x) if base is None else base)[0]
        row = self._zero_scores
        if row is None:
            row = self.engine.score(np.zeros_like(x), zero, self.mask, 1, None)[0]
            self._zero_scores = row
        return row

    def channels_to_score(self, acts: np.ndarray, skipped: np.ndarray, classes=None,
                          head: LinearHead | None | bool = True) -> np.ndarray:
        """Boolean [K]: the channels whose masks are scored (all, less the preset's skips and, with
        ``max_channels=N``, all but the N ranked first by :attr:`selection` for ``classes``). ``head``: the
        linear head after this layer (default ``True``: the target layer's; a finer layer has none, and
        ``relevance`` then ranks by spatial std)."""
        head = self.head if head is True else head
        scored = ~skipped if self.preset.skip_constant else np.ones(acts.shape[0], bool)
        if self.max_channels is not None and self.max_channels < int(scored.sum()):
            selection = self.selection_for(head)
            if selection in ("relevance", "cover") and classes is not None and head is not None:
                rank = relevance(acts, head.weight, classes)
            else:
                rank = spatial_std(acts)
            if selection == "cover":
                scored = cover(acts, rank ** COVER_POWER, scored & ~skipped, self.max_channels)
            else:
                scored = top_channels(rank, scored, self.max_channels)
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


__all__: Sequence[str] = ("Explainer", "Result", "TargetError", "default_fill", "explain")
