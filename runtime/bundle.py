"""Finding and checking a bundle: the two graphs, their metadata, and the sibling hashes."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx

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
    """Load an ONNX file, or fail with a one-line reason."""
    if not path.is_file():
        raise BundleError(f"{what} not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise BundleError(f"{path} is not a valid ONNX model ({type(e).__name__})") from None


@dataclass
class Bundle:
    """A loaded bundle: both graphs (protos) and the classifier's metadata."""

    directory: Path
    model_path: Path
    features_path: Path
    model: onnx.ModelProto
    features: onnx.ModelProto
    meta: BundleMeta
    source: Path | None = None  # the third-party model this bundle was derived from (runtime.thirdparty)
    max_batch: int | None = None  # the classifier's fixed batch size, when it could not be made dynamic

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
        meta = BundleMeta.from_props(read_props(proto), source=str(self.int8_path))
        if meta.role != "classifier" or meta.sibling_sha256 != graph_sha256(self.features):
            raise BundleError(f"{self.int8_path} does not belong to this bundle's {FEATURES_FILE}; export again")
        return proto


def bundle_paths(model: str | os.PathLike) -> tuple[Path, Path]:
    """(directory, classifier file) of a bundle dir, a ``model.onnx`` (or any .onnx) path, or a name."""
    path = resolve_model_path(model)
    return (path, path / MODEL_FILE) if path.is_dir() else (path.parent, path)


def is_bundle_graph(proto: onnx.ModelProto) -> bool:
    """Whether a graph carries Score-CAM bundle metadata (else it is a third-party model)."""
    return any(k.startswith(PREFIX) for k in read_props(proto))


def load_bundle(model: str | os.PathLike, **derive) -> Bundle:
    """Open a bundle from its directory or its ``model.onnx``; refuse a mismatched pair.

    A model file with no ``scorecam.*`` metadata is not a bundle: :func:`runtime.thirdparty.open_model`
    derives one from it (that is how :class:`~runtime.Explainer` opens any model). The derivation
    depends on this module, never the other way round.
    """
    directory, model_path = bundle_paths(model)
    return open_bundle(directory, model_path, load_onnx(model_path, "classifier graph"), **derive)


def open_bundle(directory: Path, model_path: Path, proto: onnx.ModelProto, **derive) -> Bundle:
    """The bundle whose classifier graph ``proto`` was read from ``model_path`` (see :func:`load_bundle`);
    ``derive`` (third-party options) is ignored with a warning, since a bundle fixes them at export."""
    if not is_bundle_graph(proto):
        raise BundleError(f"{model_path} carries no Score-CAM bundle metadata: it is not a bundle "
                          "(runtime.thirdparty.open_model, which Explainer uses, derives one from any classifier)")
    given = sorted(k for k, v in derive.items() if v is not None and v is not False)
    if given:
        print(f"warning: {model_path} is a Score-CAM bundle; its layer and preprocessing are fixed at export, "
              f"ignoring {', '.join(given)}", file=sys.stderr)
    meta = BundleMeta.from_props(read_props(proto), source=str(model_path))
    if meta.role != "classifier":
        raise BundleError(f"{model_path} is the {meta.role} graph of a bundle; pass the bundle's {MODEL_FILE}")
    features_path = directory / FEATURES_FILE
    if not features_path.is_file():
        raise BundleError(f"{features_path} is missing: a bundle needs {MODEL_FILE} and {FEATURES_FILE} side by side")
    fproto = load_onnx(features_path, "feature graph")
    fmeta = BundleMeta.from_props(read_props(fproto), source=str(features_path))
    if fmeta.role != "features":
        raise BundleError(f"{features_path} is not a feature graph (role {fmeta.role!r})")
    if meta.sibling_sha256 != graph_sha256(fproto) or fmeta.sibling_sha256 != graph_sha256(proto):
        raise BundleError(f"{model_path.name} and {features_path.name} in {directory} do not come from the same "
                          "export (sibling hashes differ); export the bundle again")
    return Bundle(directory, model_path, features_path, proto, fproto, meta)
