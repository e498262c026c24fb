"""Finding and checking a bundle: the two graphs, their metadata, and the sibling hashes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import onnx

from . import external
from .contract import (
    FEATURES_FILE,
    INT8_FILE,
    MODEL_FILE,
    PREFIX,
    BundleError,
    BundleMeta,
    graph_sha256,
    read_props,
)

MODELS_DIR_ENV = "SCORECAM_MODELS"


def models_dir() -> Path:
    """The model store: ``$SCORECAM_MODELS``, else ``models/`` of the project (or of the cwd)."""
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent / "models"
    return here if here.is_dir() else Path("models")


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A bundle dir, a ``model.onnx`` (or any .onnx) path, or a name under ``models/``."""
    p = Path(model)
    if p.exists():
        return p
    named = models_dir() / str(model)
    if not p.is_absolute() and os.sep not in str(model) and named.exists():
        return named
    raise BundleError(f"model not found: {model} (not a file, a directory, nor a name under {models_dir()}/)")


def load_onnx(path: Path, what: str) -> onnx.ModelProto:
    """Load an ONNX file's graph, or fail with a one-line reason.

    External data (weights in files beside the graph, ``model.onnx.data``) is NOT read: it is checked
    (every location inside the model's folder, every file present and long enough: :func:`external.check`)
    and left on disk for ONNX Runtime, which reads it from the model's folder."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{what} not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise BundleError(f"{path} is not a valid ONNX model ({type(e).__name__})") from None
    external.check(proto, path.parent, path)
    return proto


def data_files(proto: onnx.ModelProto, path: Path) -> list[str]:
    """The external data files (locations relative to the graph's folder) of a graph read from ``path``."""
    return external.check(proto, Path(path).parent, Path(path))


class Bundle:
    """An opened bundle: its paths, the classifier's metadata and both graphs' sha256 (taken at load).

    No graph is kept in memory: :attr:`model` and :attr:`features` load the proto again from its file
    each time they are asked for (and refuse a file changed since the bundle was opened), so whoever
    builds on a graph holds it only as long as it needs it. A bundle derived in memory (a third-party
    model with the cache off) holds its two protos, as there is no file to reload them from.

    Weights in external data files (``data_files``, relative to ``data_dir``) stay on disk: ONNX Runtime
    reads them from :attr:`data_dir` (None when every graph holds its own weights), and a data file
    changed since the bundle was opened is refused like a changed graph file.
    """

    def __init__(self, directory: Path, model_path: Path, features_path: Path, model: onnx.ModelProto | None,
                 features: onnx.ModelProto | None, meta: BundleMeta, source: Path | None = None,
                 max_batch: int | None = None, *, model_sha256: str | None = None,
                 features_sha256: str | None = None, features_output: str | None = None,
                 data_dir: Path | None = None, data_files: tuple[str, ...] = (),
                 data_stats: tuple | None = None) -> None:
        self.directory, self.model_path, self.features_path = Path(directory), Path(model_path), Path(features_path)
        self.meta = meta
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self.data_files = tuple(data_files)
        self._data_stats = data_stats if data_stats is not None or data_dir is None else \
            external.stats(self.data_files, data_dir)
        self._int8_external = False
        self.source = source  # the third-party model this bundle was derived from (runtime.thirdparty)
        self.max_batch = max_batch  # the classifier's fixed batch size, when it could not be made dynamic
        self._held = {"model": model, "features": features}
        self._stat = {k: _stat(p) for k, p in (("model", self.model_path), ("features", self.features_path))
                      if self._held[k] is None}
        self._sha = {"model": model_sha256 or (graph_sha256(model, data_dir) if model is not None else None),
                     "features": features_sha256 or (graph_sha256(features, data_dir) if features is not None
                                                     else None)}
        if features_output is None and features is not None and features.graph.output:
            features_output = target_tensor(features.graph, _produced(model) if model is not None else set())
        self.features_output = features_output

    @property
    def data_dir(self) -> Path | None:
        """The folder ONNX Runtime reads the graphs' external data from; None when they hold their weights."""
        if self._data_dir is None and self._int8_external:
            return self.directory
        return self._data_dir

    @property
    def model_sha256(self) -> str | None:
        return self._sha["model"]

    @property
    def features_sha256(self) -> str | None:
        return self._sha["features"]

    @property
    def model(self) -> onnx.ModelProto:
        """The classifier graph (loaded from ``model_path`` now; the caller owns it)."""
        return self._load("model", self.model_path, "classifier graph")

    @property
    def features(self) -> onnx.ModelProto:
        """The feature graph (loaded from ``features_path`` now; the caller owns it)."""
        return self._load("features", self.features_path, "feature graph")

    def load_model(self) -> onnx.ModelProto:
        return self.model

    def load_features(self) -> onnx.ModelProto:
        return self.features

    def _load(self, which: str, path: Path, what: str) -> onnx.ModelProto:
        held = self._held[which]
        if held is not None:  # a copy: the caller owns what it gets (and may build on it in place)
            copy = onnx.ModelProto()
            copy.CopyFrom(held)
            return copy
        if _stat(path) != self._stat[which]:
            raise BundleError(f"{path} changed since the bundle was opened; open it again")
        if self.data_files and external.stats(self.data_files, self.data_dir) != self._data_stats:
            raise BundleError(f"the external data of {path} ({', '.join(self.data_files)}) changed since the bundle "
                              "was opened; open it again")
        return load_onnx(path, what)

    @property
    def int8_path(self) -> Path:
        return self.directory / INT8_FILE

    def has_int8(self) -> bool:
        return self.int8_path.is_file()

    def load_int8(self) -> onnx.ModelProto:
        """The int8 (QDQ) classifier written by ``exporter --int8``; checked against the feature graph."""
        if not self.has_int8():
            raise BundleError(f"{self.directory} has no {INT8_FILE}: export the bundle with --int8 CALIB_DIR "
                              "to use precision 'int8'")
        proto = load_onnx(self.int8_path, "int8 classifier")
        self._int8_external = self._int8_external or external.has_external(proto)
        meta = BundleMeta.from_props(read_props(proto), source=str(self.int8_path))
        if meta.role != "classifier" or meta.sibling_sha256 != self.features_sha256:
            raise BundleError(f"{self.int8_path} does not belong to this bundle's {FEATURES_FILE}; export again")
        return proto


def bundle_paths(model: str | os.PathLike) -> tuple[Path, Path]:
    """(directory, classifier file) of a bundle dir, a ``model.onnx`` (or any .onnx) path, or a name."""
    path = resolve_model_path(model)
    return (path, path / MODEL_FILE) if path.is_dir() else (path.parent, path)


def is_bundle_graph(proto: onnx.ModelProto) -> bool:
    """Whether a graph carries Score-CAM bundle metadata (else it is a third-party model)."""
    return any(k.startswith(PREFIX) for k in read_props(proto))


# hashes of the bundles opened in this process, by path and (size, mtime) of both files
_opened: dict[tuple, dict] = {}


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def load_bundle(model: str | os.PathLike, **derive) -> Bundle:
    """Open a bundle from its directory or its ``model.onnx``; refuse a mismatched pair.

    A model file with no ``scorecam.*`` metadata is not a bundle: :func:`runtime.thirdparty.open_model`
    derives one from it (that is how :class:`~runtime.Explainer` opens any model). The derivation
    depends on this module, never the other way round.
    """
    directory, model_path = bundle_paths(model)
    seen = opened_before(directory, model_path, **derive)
    if seen is not None:
        return seen
    return open_bundle(directory, model_path, load_onnx(model_path, "classifier graph"), **derive)


def _key(directory: Path, model_path: Path) -> tuple:
    return str(model_path.resolve()), _stat(model_path), _stat(directory / FEATURES_FILE)


def opened_before(directory: Path, model_path: Path, **derive) -> Bundle | None:
    """The bundle of this very pair of files (unchanged since), when this process opened it before: its
    hashes are known, nothing is parsed again. None otherwise."""
    seen = _opened.get(_key(directory, model_path))
    if seen is None:
        return None
    if seen["data_files"] and external.stats(seen["data_files"], seen["data_dir"]) != seen["data_stats"]:
        return None  # a weights file changed beside unchanged graphs: hash it again
    _ignored(model_path, derive)
    return Bundle(directory, model_path, directory / FEATURES_FILE, None, None, **seen)


def open_bundle(directory: Path, model_path: Path, proto: onnx.ModelProto, **derive) -> Bundle:
    """The bundle whose classifier graph ``proto`` was read from ``model_path`` (see :func:`load_bundle`);
    ``derive`` (third-party options) is ignored with a warning, since a bundle fixes them at export."""
    if not is_bundle_graph(proto):
        raise BundleError(f"{model_path} carries no Score-CAM bundle metadata: it is not a bundle "
                          "(runtime.thirdparty.open_model, which Explainer uses, derives one from any classifier)")
    _ignored(model_path, derive)
    features_path = directory / FEATURES_FILE
    opened = _key(directory, model_path)
    meta = BundleMeta.from_props(read_props(proto), source=str(model_path))
    if meta.role != "classifier":
        raise BundleError(f"{model_path} is the {meta.role} graph of a bundle; pass the bundle's {MODEL_FILE}")
    if not features_path.is_file():
        raise BundleError(f"{features_path} is missing: a bundle needs {MODEL_FILE} and {FEATURES_FILE} side by side")
    # hash at load, one graph at a time, and keep neither: sessions are built from the files later (the
    # hashes cover the external data files, read block by block: a swapped weights file is another bundle)
    files = dict.fromkeys(data_files(proto, model_path))
    model_sha = graph_sha256(proto, directory)
    produced = _produced(proto)
    del proto
    fproto = load_onnx(features_path, "feature graph")
    fmeta = BundleMeta.from_props(read_props(fproto), source=str(features_path))
    if fmeta.role != "features":
        raise BundleError(f"{features_path} is not a feature graph (role {fmeta.role!r})")
    files.update(dict.fromkeys(data_files(fproto, features_path)))
    features_sha = graph_sha256(fproto, directory)
    features_output = target_tensor(fproto.graph, produced) if fproto.graph.output else None
    del fproto
    if meta.sibling_sha256 != features_sha or fmeta.sibling_sha256 != model_sha:
        raise BundleError(f"{model_path.name} and {features_path.name} in {directory} do not come from the same "
                          "export (sibling hashes differ); export the bundle again")
    data_dir = directory if files else None
    seen = dict(meta=meta, model_sha256=model_sha, features_sha256=features_sha, features_output=features_output,
                data_dir=data_dir, data_files=tuple(files), data_stats=external.stats(tuple(files), directory))
    _opened[opened] = seen
    return Bundle(directory, model_path, features_path, None, None, **seen)


def _produced(model: onnx.ModelProto) -> set[str]:
    return {str(o) for n in model.graph.node for o in n.output}


def target_tensor(features: onnx.GraphProto, produced: set[str]) -> str:
    """The target layer's tensor in the classifier: the feature graph's output, or the tensor a trailing
    ``Identity`` of it renames (a derived feature graph names its output ``features`` so), when the classifier
    computes that tensor (``produced``). The engine then takes A from the classifier's own pass (one
    session, the weights held once) and the head after it can be read."""
    name = features.output[0].name
    if name in produced:
        return name
    node = next((n for n in features.node if name in n.output), None)
    if node is not None and node.op_type == "Identity" and node.input[0] in produced:
        return str(node.input[0])
    return name


def _ignored(model_path: Path, derive: dict) -> None:
    given = sorted(k for k, v in derive.items() if v is not None and v is not False)
    if given:
        print(f"warning: {model_path} is a Score-CAM bundle; its layer and preprocessing are fixed at export, "
              f"ignoring {', '.join(given)}", file=sys.stderr)
