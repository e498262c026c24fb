"""ONNX Runtime sessions: providers, the graphs (features, classifier, scorer) and chunked scoring.

Sessions are created once and reused. The *main* session is the scorer (mask nodes + classifier,
see ``maskgraph``) of the explainer's mask kind, with the target layer as a second output and an
offset input: one run with an all-zero map and offset 1 gives the image's logits and activations,
and the same session scores the masks, so the weights are loaded once, not three times
(classifier, feature graph, scorer). Plain classifier and feature-graph sessions are made only
when asked for (``classifier``, ``features``: batches of images, the benchmark's floor).

No ONNX proto outlives the session built from it: the engine takes the graphs as loaders (a bundle's
``load_model``/``load_features``, which read the file again) and keeps only names and hashes, so the one
copy of the weights in the process is ONNX Runtime's (prepacked), as for a bare session of the classifier.
Sessions are shared by every engine of the same graph (same sha256) and settings in a process (a
weak cache), so a second explainer of a bundle (a service's workers) costs no second copy of the weights.

Threads and processes. One Engine may be shared by any number of threads: ONNX Runtime sessions are
safe to run concurrently, and the sessions made on first use are made under a lock (once). A process
forked after load (multiprocessing's ``fork``, gunicorn/uvicorn workers, ``os.fork``) must not use or
destroy the sessions it inherits (their thread pools belong to the parent: a run may stall and
destroying one hangs in ``pthread_join``, onnxruntime PR #31961), so in the child every inherited
session is dropped without being destroyed and rebuilt on first use (from the files, or the graphs a bundle holds).

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
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from . import external
from .contract import BundleError
from .maskgraph import EPS, IMAGE, MAPS, OFFSET, build_scorer
from .scorecam import MaskSpec, get_preset

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "int8", "fp16")
DEFAULT_BATCH = {CPU: 16, CUDA: 128}  # masked inputs per run at 224 x 224; scaled by the input area

Progress = Callable[[int, int], None]
#: ``reduce(outputs of one chunk, n) -> [n, T]``: what a detector keeps of a chunk's raw outputs
Reduce = Callable[[list[np.ndarray], int], np.ndarray]
Graph = onnx.ModelProto | Callable[[], onnx.ModelProto]  # a proto, or a loader that reads it again

# sessions shared by every engine of the same graph and settings in this process (freed with the last engine)
_shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_shared_lock = threading.RLock()
_infos: dict[tuple, tuple] = {}  # names read from a graph, by its key: a second engine need not load it


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
    global _shared_lock
    _shared_lock = threading.RLock()  # another thread may have held it at the fork
    for engine in list(_ENGINES):
        engine._forget_inherited_sessions()
    for sess in list(_shared.values()):  # the process-wide cache would hand the parent's sessions out again
        _keep_forever(sess)
    _shared.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def release_freed_memory() -> None:
    """Give the heap memory freed so far back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Parsing and serializing a graph in Python leaves freed-but-retained heap pages of the weights' size;
    ONNX Runtime's own copy is allocated elsewhere (mmap), so without this the process keeps both."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim = None


def _spill(data: bytes) -> str | None:
    """``data`` written to a new private (0600) temporary ``.onnx`` file: its path, or None if that fails."""
    import tempfile

    try:
        fd, path = tempfile.mkstemp(prefix="scorecam-", suffix=".onnx")
    except OSError:
        return None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError:
        _unlink(path)
        return None
    return path


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def batch_for(provider: str, input_size: tuple[int, int]) -> int:
    """Masked inputs per run on ``provider``: its 224 x 224 batch scaled by the input area, in [1, 256]."""
    h, w = input_size
    return max(1, min(256, round(DEFAULT_BATCH[provider] * 224 * 224 / (h * w))))


def session_options(threads: int | None = None, spin: bool = True) -> ort.SessionOptions:
    """Our session options; ``spin=False``: the intra-op threads sleep between runs instead of spinning (an
    int8 explainer alternates two sessions, whose spinning pools would fight over the cores)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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

    def __init__(self, classifier: Graph, features: Graph, device: str = "auto",
                 threads: int | None = None, input_size: tuple[int, int] = (224, 224),
                 precision: str = "fp32", int8_classifier: Callable[[], onnx.ModelProto] | None = None,
                 tf32: bool = False, mask: MaskSpec | None = None, *, features_output: str | None = None,
                 key: str | None = None, inspect: Callable[[onnx.ModelProto, Engine], None] | None = None,
                 int8_key: str | None = None, extra_outputs: Sequence[str] = (),
                 data_dir: str | os.PathLike | None = None) -> None:
        """``classifier``/``features``: the graphs, or loaders returning them (then no proto is kept).
        ``features_output``: the feature graph's output (None: read from the graph). ``key``: names
        the two graphs (their sha256s); engines with the same key and settings share their sessions.
        ``inspect(classifier, engine)``: called with the classifier graph when the engine loads it, before
        the main session is built on it (read what you need of it then: it is not kept). ``int8_key``: names
        the int8 classifier file (its path, size and mtime), so an int8 session is shared only by engines of
        that very file. ``extra_outputs``: more tensors of the classifier the main session outputs after the
        target layer (a detector's other feature levels: :mod:`runtime.detect`). ``data_dir``: the folder of the
        graphs' external data files (weights stored beside them, ``model.onnx.data``); ONNX Runtime reads them
        from there, None when the graphs hold their weights."""
        if precision not in PRECISIONS:
            raise EngineError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.device = device
        self.threads = threads
        self.input_size = input_size
        self.precision = precision
        self.tf32 = bool(tf32)
        self._load_classifier = classifier if callable(classifier) else (lambda: classifier)
        self._load_features = features if callable(features) else (lambda: features)
        self._int8_classifier = int8_classifier
        self.key = key
        self.int8_key = int8_key
        self.extra_outputs = tuple(extra_outputs)
        self.data_dir = data_dir
        self.providers = providers_for(device)
        if precision == "fp16" and self.providers[0] != CUDA:
            raise EngineError("precision 'fp16' needs the CUDA provider; on CPU use 'fp32' or 'int8'")
        self.mask = mask if mask is not None else get_preset("paper").mask
        info = _infos.get((key, features_output)) if key else None
        model = None
        if info is None:
            model = self._load_classifier()
            input_name, class_output, num_classes, produced = _graph_info(model)
            if features_output is None:
                features_output = _graph_info(self._load_features())[1]
            if not input_name or not class_output or not features_output:
                raise EngineError("the classifier or the feature graph has no input or no output")
            info = (input_name, class_output, num_classes, features_output, features_output in produced)
            del produced
        # the target layer is a tensor of the classifier (fused): the main session gives A too
        self.input_name, self.class_output, self.num_classes, self.features_output, self.fused = info
        self._lock = threading.RLock()  # made-on-first-use sessions are made once, whatever the threads
        self._plain: dict[str, ort.InferenceSession] = {}
        self._scorers: dict[str, ort.InferenceSession] = {}  # by mask kind and precision
        self._extra: dict[object, ort.InferenceSession] = {}  # other graphs on this classifier (runtime.methods)
        _ENGINES.add(self)
        if model is not None and inspect is not None:
            inspect(model, self)
        # a proto we loaded ourselves is handed over (and built on in place); one we were given is not touched
        handed = [model] if model is not None and callable(classifier) else []
        del model
        if self.fused:
            self.scorer(self.mask, "fp32", _take=handed)  # the main session, now: a refused graph fails here
        else:
            handed.clear()
            self.classifier, self.features  # noqa: B018 - both made now, for the same reason
        if key:
            _infos[(key, features_output)] = info

    @property
    def classifier_proto(self) -> onnx.ModelProto:
        """The fp32 classifier graph, for graphs built on top of it (loaded again on each use: the
        caller owns it and should drop it once its session exists)."""
        return self._load_classifier()

    @property
    def features_proto(self) -> onnx.ModelProto:
        """The feature graph (loaded again on each use)."""
        return self._load_features()

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

    def session(self, proto: onnx.ModelProto | bytes, what: str, spin: bool = True) -> ort.InferenceSession:
        """An ONNX Runtime session of ``proto`` (or its serialized bytes) on this engine's providers
        (CPU fallback, one-line errors).

        The serialized graph is spilled to a private temporary file and ONNX Runtime loads it from there,
        with no Python copy left: from bytes it would parse them while they are still alive, so the weights
        would be held once more at the peak than by a session made from a path (where the temporary
        directory is not writable, the bytes are passed as before). A graph whose weights are external data
        (``data_dir``) is small: it is passed as bytes, and ONNX Runtime reads the weights from ``data_dir``
        itself (its own check that no data path escapes that folder applies)."""
        data = proto if isinstance(proto, bytes) else proto.SerializeToString()
        del proto
        spilled = _spill(data) if self.data_dir is None else None
        source: str | bytes = data
        if spilled is not None:
            source = spilled
            del data
        release_freed_memory()  # the graph's Python copies are gone: before ONNX Runtime makes its own
        try:
            try:
                opts = session_options(self.threads, spin)
                external.point_to(opts, self.data_dir)
                sess = ort.InferenceSession(source, opts, providers=self._provider_args())
            except BundleError as e:
                raise EngineError(str(e)) from None
            except Exception as e:  # onnxruntime raises its own exception types
                raise EngineError(f"ONNX Runtime cannot load the {what}: {str(e).splitlines()[0]}") from None
            if self.providers[0] == CUDA and sess.get_providers()[0] != CUDA:
                if self.device == "cuda":
                    raise EngineError("device 'cuda' is not available: the CUDA provider failed to load "
                                      "(check the CUDA/cuDNN libraries onnxruntime-gpu needs)")
                _warn("the CUDA provider failed to load; running on CPU")
                self.providers = [CPU]
                del sess
                return self.session(source if isinstance(source, bytes) else _read(source), what, spin)
            return sess
        finally:
            if spilled is not None:
                _unlink(spilled)

    def _provider_args(self) -> list:
        """The providers with their options: CUDA without TF32 unless ``tf32`` (cuDNN and cuBLAS would
        otherwise round fp32 convolutions and GEMMs to a 10-bit mantissa on Ampere and later)."""
        return [(p, {"use_tf32": "1" if self.tf32 else "0"}) if p == CUDA else p for p in self.providers]

    def shared_session(self, kind: str, build: Callable[[], onnx.ModelProto | bytes],
                       what: str, spin: bool = True) -> ort.InferenceSession:
        """The session of graph ``kind`` built on this classifier: taken from another live engine of the
        same classifier (``key``) and settings when there is one, else ``build()`` and made now."""
        key = ((self.key, kind, tuple(self.providers), self.threads, self.tf32, self.input_size, spin)
               if self.key else None)
        with _shared_lock:
            sess = _shared.get(key) if key else None
            if sess is None:
                sess = self.session(build(), what, spin)
                if key and self.providers[0] == key[2][0]:  # not after a CPU fallback
                    _shared[key] = sess
            return sess

    @property
    def classifier(self) -> ort.InferenceSession:
        """A plain session of the classifier (made on first use)."""
        return self.cached(self._plain, "classifier", lambda: self.shared_session(
            "classifier", lambda: self.classifier_proto.SerializeToString(), "classifier"))

    @property
    def features(self) -> ort.InferenceSession:
        """A plain session of the feature graph (made on first use)."""
        return self.cached(self._plain, "features", lambda: self.shared_session(
            "features", lambda: self.features_proto.SerializeToString(), "feature graph"))

    @property
    def provider(self) -> str:
        return self.providers[0]

    @property
    def on_cuda(self) -> bool:
        return self.provider == CUDA

    def default_batch_size(self) -> int:
        """Masked inputs per run: the device's 224 x 224 batch scaled by the input area, so the memory a
        chunk takes stays about the same at any input size (CPU: 16 at 224², 4 at 448²)."""
        return batch_for(self.provider, self.input_size)

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

            proto = self.classifier_proto
            if self.data_dir is not None:  # the converter rewrites every weight: read them in (fp16: CUDA only)
                external.inline(proto, self.data_dir)
            return convert_float_to_float16(proto, keep_io_types=True)
        return self.classifier_proto

    def scorer(self, spec: MaskSpec, precision: str | None = None,
               _take: list[onnx.ModelProto] | None = None) -> ort.InferenceSession:
        """The session of the mask graph + classifier for this kind of mask and precision (built once)."""
        precision = precision or self.precision
        key = f"{spec.key}/{precision}"

        def make() -> ort.InferenceSession:
            main = self._is_main(spec, precision)

            def build() -> bytes:
                # serialized at once and the proto dropped, so ONNX Runtime's copy is the only one left
                own = bool(_take)
                proto = _take.pop() if own else self.scoring_classifier(precision)
                return build_scorer(proto, spec, self.input_size, input_name=self.input_name, offset=main,
                                    extra_outputs=[self.features_output, *self.extra_outputs] if main else (),
                                    in_place=own).SerializeToString()

            kind = (f"scorer/{key}" + (f"/main:{self.features_output}" if main else "")
                    + (f"/extra:{','.join(self.extra_outputs)}" if main and self.extra_outputs else "")
                    + (f"/int8:{self.int8_key}" if precision == "int8" else ""))
            # an int8 engine runs the fp32 main session (class, A) once, then the int8 scorer: the fp32
            # session's threads spinning after its run would take the cores from the int8 one (Lite0, int8 +
            # 16 channels: 74 -> 60 ms); the int8 scorer, run chunk after chunk, keeps spinning
            spin = not (self.precision == "int8" and precision == "fp32")
            return self.shared_session(kind, build, "scoring graph", spin)

        return self.cached(self._scorers, key, make)

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

    def main_outputs(self, x: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        """Tensors ``outputs`` (graph outputs, the target layer, :attr:`extra_outputs`) of one preprocessed image
        [1,3,H,W] from the main session in one pass (needs the target layer to be a tensor of the graph)."""
        if not self.fused:
            raise EngineError("the target layer is not a tensor of the model graph: no main session")
        return self._main_run(np.ascontiguousarray(x, dtype=np.float32), list(outputs))

    def _main_run(self, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """The main session on one image: an all-zero map (the zero mask in every preset) plus offset 1
        makes the masked input ``x * 1``, i.e. ``x``. ``eps`` is 1 here, so that norm(0) = 0 / (0 + eps)
        is 0 even for the presets whose eps is 0."""
        sess = self.scorer(self.mask, "fp32")
        one = np.ones((1, 1, 1, 1), np.float32)
        return sess.run(outputs, {IMAGE: x, MAPS: np.zeros((1, 1, 1, 1), np.float32),
                                  EPS: np.asarray(1.0, np.float32), OFFSET: one})

    def score(self, x: np.ndarray, maps: np.ndarray, spec: MaskSpec, batch_size: int | None = None,
              progress: Progress | None = None, outputs: Sequence[str] | None = None,
              reduce: Reduce | None = None) -> np.ndarray:
        """Classifier outputs [K,C] of ``x * H_k`` for every map in ``maps`` [K,h,w], chunk by chunk.

        At a reduced precision (fp16, int8) an output row that is not finite (fp16 overflows past
        65504) is scored again in fp32, with a one-line warning, so no NaN reaches the map.

        ``outputs`` + ``reduce`` (a detector, :mod:`runtime.detect`): each chunk's graph outputs ``outputs``
        (default: the first) go through ``reduce(arrays, n) -> [n, T]`` at once, so only the reduced scores
        are kept (memory O(batch) however large the raw outputs); the result is their [K,T] concatenation.
        """
        bs = int(batch_size or self.default_batch_size())
        maps4 = np.ascontiguousarray(maps[:, None], dtype=np.float32)
        eps = np.asarray(spec.eps, np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if reduce is not None:
            return self._run_chunks(self.scorer(spec), x, maps4, eps, bs, progress, outputs, reduce)
        out = self._run_chunks(self.scorer(spec), x, maps4, eps, bs, progress)
        if self.precision != "fp32" and out.size:
            bad = ~np.isfinite(out).all(axis=1)
            if bad.any():
                _warn(f"{self.precision} overflowed on {int(bad.sum())} of {bad.size} masked inputs; "
                      "those were scored again in fp32")
                out[bad] = self._run_chunks(self.scorer(spec, "fp32"), x, maps4[bad], eps, bs, None)
        return out

    def _run_chunks(self, sess: ort.InferenceSession, x: np.ndarray, maps4: np.ndarray, eps: np.ndarray,
                    bs: int, progress: Progress | None, outputs: Sequence[str] | None = None,
                    reduce: Reduce | None = None) -> np.ndarray:
        """Outputs of ``sess`` for the maps [K,1,h,w] in chunks of ``bs`` (on CUDA: IO binding, padded chunks);
        with ``reduce``, ``reduce(outputs of the chunk, n)`` per chunk (see :meth:`score`)."""
        names = list(outputs) if outputs else [sess.get_outputs()[0].name]

        def keep(arrays: list[np.ndarray], n: int) -> np.ndarray:
            return np.asarray(reduce(arrays, n)) if reduce is not None else arrays[0][:n]

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
                for name in names:
                    binding.bind_output(name, "cpu")
                sess.run_with_iobinding(binding)
                got = binding.copy_outputs_to_cpu()
                results.append(keep([a[:n] for a in got] if n < bs else got, n))
                binding.clear_binding_outputs()
                if progress:
                    progress(min(start + bs, k), k)
        else:
            for start in range(0, k, bs):
                chunk = maps4[start:start + bs]
                feeds = {IMAGE: x, MAPS: chunk, EPS: eps}
                if has_offset:
                    feeds[OFFSET] = np.zeros((chunk.shape[0], 1, 1, 1), np.float32)
                results.append(keep(sess.run(names, feeds), chunk.shape[0]))
                if progress:
                    progress(min(start + bs, k), k)
        return np.concatenate(results, axis=0) if results else np.zeros((0, 0), np.float32)


def _graph_info(model: onnx.ModelProto) -> tuple[str | None, str | None, int | None, set[str]]:
    """(first real input, first output, class count if stated, every tensor a node produces) of a graph,
    as plain Python values (a reference into a proto would keep the whole proto, weights included, alive)."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [str(i.name) for i in g.input if i.name not in inits]
    out = str(g.output[0].name) if g.output else None
    classes = None
    if g.output:
        dims = g.output[0].type.tensor_type.shape.dim
        classes = int(dims[-1].dim_value) if len(dims) and dims[-1].dim_value > 0 else None
        del dims
    produced = {str(o) for n in g.node for o in n.output}
    return (inputs[0] if inputs else None), out, classes, produced


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
