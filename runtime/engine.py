"""ONNX Runtime sessions: providers, the graphs (features, classifier, scorer) and chunked scoring.

Sessions are created once and reused. The *main* session is the scorer (mask nodes + classifier,
see ``maskgraph``) of the explainer's mask kind, with the target layer as a second output and an
offset input: one run with an all-zero map and offset 1 gives the image's logits and activations,
and the same session scores the masks, so the weights are loaded once, not three times
(classifier, feature graph, scorer). Plain classifier and feature-graph sessions are made only
when asked for (``classifier``, ``features``: batches of images, the benchmark's floor).

Threads and processes. One Engine may be shared by any number of threads: ONNX Runtime sessions are
safe to run concurrently, and the sessions made on first use are made under a lock (once). A process
forked after load (multiprocessing's ``fork``, gunicorn/uvicorn workers, ``os.fork``) must not use or
destroy the sessions it inherits (their thread pools belong to the parent: a run may stall and
destroying one hangs in ``pthread_join``, onnxruntime PR #31961), so in the child every inherited
session is dropped without being destroyed and rebuilt from the in-memory graphs on first use.

Scoring runs chunk by chunk, so memory grows with the batch size and never with the channel count K.
On CUDA the image is bound on the device once (IO binding), every chunk has the same size (the last
one padded with all-zero maps) so cuDNN's algorithm search runs once, and only the [B,1,h,w] maps
and the [B,C] scores cross the bus. TF32 tensor-core math is off unless asked for (``tf32=True``),
so fp32 maps on the GPU match the CPU's to about 1e-5.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import weakref
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort

from .maskgraph import EPS, IMAGE, MAPS, OFFSET, build_scorer
from .scorecam import MaskSpec, get_preset

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "int8", "fp16")
DEFAULT_BATCH = {CPU: 16, CUDA: 128}  # masked inputs per run at 224 x 224; scaled by the input area

Progress = Callable[[int, int], None]


class EngineError(RuntimeError):
    """The engine cannot run as asked (device unavailable, graph ONNX Runtime refuses, ...)."""


class NonFiniteError(EngineError):
    """The model computes NaN or inf (its outputs or the target layer's activations) for an input."""


def require_finite(logits: np.ndarray, acts: np.ndarray | None = None, layer: str = "", masked: bool = False) -> None:
    """Raise :class:`NonFiniteError` unless the class scores (and activations) are all finite: a NaN or an
    inf would otherwise turn into a map of zeros presented as an answer."""
    if not np.isfinite(logits).all():
        where = f"{int((~np.isfinite(logits)).any(axis=1).sum())} of the masked inputs" if masked else "this image"
        raise NonFiniteError(f"the model's class scores are not finite (NaN or inf) for {where}: "
                             "no map can be computed (the model overflows in float32)")
    if acts is not None and not np.isfinite(acts).all():
        raise NonFiniteError(f"the model's activations at layer {layer!r} are not finite (NaN or inf) for this "
                             "image: no map can be computed (the model overflows in float32)")


_warned: set[str] = set()


def _warn(msg: str) -> None:
    """A one-line warning on stderr, once per process."""
    if msg not in _warned:
        _warned.add(msg)
        print(f"warning: {msg}", file=sys.stderr)


_ENGINES: weakref.WeakSet = weakref.WeakSet()  # every live Engine, for the fork hook below


def _keep_forever(obj: object) -> None:
    """One reference more that is never dropped: ``obj`` is never destroyed in this process."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def _after_fork_in_child() -> None:
    for engine in list(_ENGINES):
        engine._forget_inherited_sessions()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    return opts


def providers_for(device: str) -> list[str]:
    """The provider list to ask for; ``cuda`` fails at once when onnxruntime has no CUDA provider.

    ``auto`` asks for CUDA whenever onnxruntime-gpu offers it; if the provider then fails to load,
    :class:`Engine` falls back to CPU with a one-line warning.
    """
    if device not in DEVICES:
        raise EngineError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        raise EngineError("device 'cuda' is not available: this onnxruntime has no CUDA provider "
                          "(install the [gpu] extra, onnxruntime-gpu, on a machine with an NVIDIA GPU)")
    return [CPU]  # a CPU-only onnxruntime: auto means CPU, nothing to warn about


class Engine:
    """The sessions of one bundle on one device."""

    def __init__(self, classifier: onnx.ModelProto, features: onnx.ModelProto, device: str = "auto",
                 threads: int | None = None, input_size: tuple[int, int] = (224, 224),
                 precision: str = "fp32", int8_classifier: Callable[[], onnx.ModelProto] | None = None,
                 tf32: bool = False, mask: MaskSpec | None = None) -> None:
        if precision not in PRECISIONS:
            raise EngineError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.device = device
        self.threads = threads
        self.input_size = input_size
        self.precision = precision
        self.tf32 = bool(tf32)
        self.classifier_proto = classifier  # the fp32 classifier graph, for graphs built on top of it
        self.features_proto = features
        self._int8_classifier = int8_classifier
        self.providers = providers_for(device)
        if precision == "fp16" and self.providers[0] != CUDA:
            raise EngineError("precision 'fp16' needs the CUDA provider; on CPU use 'fp32' or 'int8'")
        self.mask = mask if mask is not None else get_preset("paper").mask
        inits = {i.name for i in classifier.graph.initializer}
        inputs = [i for i in classifier.graph.input if i.name not in inits]
        if not inputs or not classifier.graph.output or not features.graph.output:
            raise EngineError("the classifier or the feature graph has no input or no output")
        self.input_name = inputs[0].name
        self.class_output = classifier.graph.output[0].name
        self.features_output = features.graph.output[0].name
        produced = {o for n in classifier.graph.node for o in n.output}
        self.fused = self.features_output in produced  # the target layer is a tensor of the classifier
        self._lock = threading.RLock()  # made-on-first-use sessions are made once, whatever the threads
        self._plain: dict[str, ort.InferenceSession] = {}
        self._scorers: dict[str, ort.InferenceSession] = {}  # by mask kind and precision
        self._extra: dict[object, ort.InferenceSession] = {}  # other graphs on this classifier (runtime.methods)
        _ENGINES.add(self)
        if self.fused:
            self.scorer(self.mask, "fp32")  # the main session, now: a graph ONNX Runtime refuses fails here
        else:
            self.classifier, self.features  # noqa: B018 - both made now, for the same reason

    # -------------------------------------------------------------------------------- sessions
    def cached(self, store: dict, key, build: Callable[[], ort.InferenceSession]) -> ort.InferenceSession:
        """``store[key]``, made by ``build()`` the first time (under the engine's lock: once, even when
        many threads ask at the same moment)."""
        sess = store.get(key)
        if sess is None:
            with self._lock:
                sess = store.get(key)
                if sess is None:
                    sess = store[key] = build()
        return sess

    def extra_session(self, key, build: Callable[[], ort.InferenceSession]) -> ort.InferenceSession:
        """A session of another graph built on this engine's classifier, made once and kept with the engine."""
        return self.cached(self._extra, key, build)

    def _forget_inherited_sessions(self) -> None:
        """In a forked child: drop (never destroy) the parent's sessions; the next use makes new ones."""
        self._lock = threading.RLock()  # a lock another thread held at the fork stays held in the child
        for store in (self._plain, self._scorers, self._extra):
            for sess in store.values():
                _keep_forever(sess)
            store.clear()

    def session(self, proto: onnx.ModelProto | bytes, what: str) -> ort.InferenceSession:
        """An ONNX Runtime session of ``proto`` (or its serialized bytes) on this engine's providers
        (CPU fallback, one-line errors)."""
        data = proto if isinstance(proto, bytes) else proto.SerializeToString()
        try:
            sess = ort.InferenceSession(data, session_options(self.threads),
                                        providers=self._provider_args())
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineError(f"ONNX Runtime cannot load the {what}: {str(e).splitlines()[0]}") from None
        if self.providers[0] == CUDA and sess.get_providers()[0] != CUDA:
            if self.device == "cuda":
                raise EngineError("device 'cuda' is not available: the CUDA provider failed to load "
                                  "(check the CUDA/cuDNN libraries onnxruntime-gpu needs)")
            _warn("the CUDA provider failed to load; running on CPU")
            self.providers = [CPU]
            return self.session(data, what)
        return sess

    def _provider_args(self) -> list:
        """The providers with their options: CUDA without TF32 unless ``tf32`` (cuDNN and cuBLAS would
        otherwise round fp32 convolutions and GEMMs to a 10-bit mantissa on Ampere and later)."""
        return [(p, {"use_tf32": "1" if self.tf32 else "0"}) if p == CUDA else p for p in self.providers]

    @property
    def classifier(self) -> ort.InferenceSession:
        """A plain session of the classifier (made on first use)."""
        return self.cached(self._plain, "classifier", lambda: self.session(self.classifier_proto, "classifier"))

    @property
    def features(self) -> ort.InferenceSession:
        """A plain session of the feature graph (made on first use)."""
        return self.cached(self._plain, "features", lambda: self.session(self.features_proto, "feature graph"))

    @property
    def num_classes(self) -> int | None:
        """The class dimension of the classifier's output, when the graph states it."""
        dims = self.classifier_proto.graph.output[0].type.tensor_type.shape.dim
        return int(dims[-1].dim_value) if dims and dims[-1].dim_value > 0 else None

    @property
    def provider(self) -> str:
        return self.providers[0]

    @property
    def on_cuda(self) -> bool:
        return self.provider == CUDA

    def default_batch_size(self) -> int:
        """Masked inputs per run: the device's 224 x 224 batch scaled by the input area, so the memory a
        chunk takes stays about the same at any input size (CPU: 16 at 224², 4 at 448²)."""
        h, w = self.input_size
        return max(1, min(256, round(DEFAULT_BATCH[self.provider] * 224 * 224 / (h * w))))

    def scoring_classifier(self, precision: str | None = None) -> onnx.ModelProto:
        """The classifier graph the masked batches go through, at ``precision`` (default: the engine's)."""
        precision = precision or self.precision
        if precision == "int8":
            if self._int8_classifier is None:
                raise EngineError("precision 'int8' needs a quantized classifier in the bundle "
                                  "(export it with: python -m exporter ... --int8 CALIB_DIR)")
            return self._int8_classifier()
        if precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            return convert_float_to_float16(self.classifier_proto, keep_io_types=True)
        return self.classifier_proto

    def scorer(self, spec: MaskSpec, precision: str | None = None) -> ort.InferenceSession:
        """The session of the mask graph + classifier for this kind of mask and precision (built once)."""
        precision = precision or self.precision

        def build() -> ort.InferenceSession:
            main = self._is_main(spec, precision)
            # serialized at once, so the graph's copy of the weights is freed before ONNX Runtime makes its own
            data = build_scorer(self.scoring_classifier(precision), spec, self.input_size,
                                input_name=self.input_name, offset=main,
                                extra_outputs=[self.features_output] if main else ()).SerializeToString()
            return self.session(data, "scoring graph")

        return self.cached(self._scorers, f"{spec.key}/{precision}", build)

    def _is_main(self, spec: MaskSpec, precision: str) -> bool:
        return self.fused and precision == "fp32" and spec.key == self.mask.key

    # ----------------------------------------------------------------------------------- running
    def classify(self, x: np.ndarray) -> np.ndarray:
        """Classifier outputs [N,C] for preprocessed [N,3,H,W]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.fused and x.shape[0] == 1:
            return self._main_run(x, [self.class_output])[0]
        return self.classifier.run([self.class_output], {self.input_name: x})[0]

    def activations(self, x: np.ndarray) -> np.ndarray:
        """Target-layer activations [K,h,w] of one preprocessed image [1,3,H,W]."""
        return self.classify_and_activations(x)[1]

    def classify_and_activations(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(outputs [1,C], activations [K,h,w]) of one preprocessed image [1,3,H,W], in one pass."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.fused:
            logits, out = self._main_run(x, [self.class_output, self.features_output])
        else:
            logits = self.classifier.run([self.class_output], {self.input_name: x})[0]
            out = self.features.run([self.features_output], {self.features.get_inputs()[0].name: x})[0]
        if out.ndim != 4:
            raise EngineError(f"the feature graph returned a {out.ndim}-D tensor; a [N,K,h,w] map is needed")
        return logits, out[0]

    def _main_run(self, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """The main session on one image: an all-zero map (the zero mask in every preset) plus offset 1
        makes the masked input ``x * 1``, i.e. ``x``. ``eps`` is 1 here, so that norm(0) = 0 / (0 + eps)
        is 0 even for the presets whose eps is 0."""
        sess = self.scorer(self.mask, "fp32")
        one = np.ones((1, 1, 1, 1), np.float32)
        return sess.run(outputs, {IMAGE: x, MAPS: np.zeros((1, 1, 1, 1), np.float32),
                                  EPS: np.asarray(1.0, np.float32), OFFSET: one})

    def score(self, x: np.ndarray, maps: np.ndarray, spec: MaskSpec, batch_size: int | None = None,
              progress: Progress | None = None) -> np.ndarray:
        """Classifier outputs [K,C] of ``x * H_k`` for every map in ``maps`` [K,h,w], chunk by chunk.

        At a reduced precision (fp16, int8) an output row that is not finite (fp16 overflows past
        65504) is scored again in fp32, with a one-line warning, so no NaN reaches the map.
        """
        bs = int(batch_size or self.default_batch_size())
        maps4 = np.ascontiguousarray(maps[:, None], dtype=np.float32)
        eps = np.asarray(spec.eps, np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = self._run_chunks(self.scorer(spec), x, maps4, eps, bs, progress)
        if self.precision != "fp32" and out.size:
            bad = ~np.isfinite(out).all(axis=1)
            if bad.any():
                _warn(f"{self.precision} overflowed on {int(bad.sum())} of {bad.size} masked inputs; "
                      "those were scored again in fp32")
                out[bad] = self._run_chunks(self.scorer(spec, "fp32"), x, maps4[bad], eps, bs, None)
        return out

    def _run_chunks(self, sess: ort.InferenceSession, x: np.ndarray, maps4: np.ndarray, eps: np.ndarray,
                    bs: int, progress: Progress | None) -> np.ndarray:
        """Outputs of ``sess`` for the maps [K,1,h,w] in chunks of ``bs`` (on CUDA: IO binding, padded chunks)."""
        out_name = sess.get_outputs()[0].name
        k = maps4.shape[0]
        results: list[np.ndarray] = []
        has_offset = any(i.name == OFFSET for i in sess.get_inputs())  # the main session: offset 0 here
        if self.on_cuda:
            binding = sess.io_binding()
            binding.bind_ortvalue_input(IMAGE, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
            binding.bind_cpu_input(EPS, eps)
            if has_offset:
                binding.bind_cpu_input(OFFSET, np.zeros((bs, 1, 1, 1), np.float32))
            pad = np.zeros((bs, *maps4.shape[1:]), np.float32)
            for start in range(0, k, bs):
                chunk = maps4[start:start + bs]
                n = chunk.shape[0]
                if n < bs:
                    pad[:n] = chunk
                    pad[n:] = 0
                    chunk = pad
                binding.bind_cpu_input(MAPS, chunk)
                binding.bind_output(out_name, "cpu")
                sess.run_with_iobinding(binding)
                results.append(binding.copy_outputs_to_cpu()[0][:n])
                if progress:
                    progress(min(start + bs, k), k)
        else:
            for start in range(0, k, bs):
                chunk = maps4[start:start + bs]
                feeds = {IMAGE: x, MAPS: chunk, EPS: eps}
                if has_offset:
                    feeds[OFFSET] = np.zeros((chunk.shape[0], 1, 1, 1), np.float32)
                results.append(sess.run([out_name], feeds)[0])
                if progress:
                    progress(min(start + bs, k), k)
        return np.concatenate(results, axis=0) if results else np.zeros((0, 0), np.float32)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
