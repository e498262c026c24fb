"""The bundle contract shared by the exporter and the runtime.

A bundle is a directory with two ONNX graphs that come from one export:

- ``model.onnx``: ``input`` float32 [N,3,H,W] -> ``logits`` float32 [N,C] (or ``probabilities``);
- ``features.onnx``: ``input`` -> ``features`` float32 [N,K,h,w], the target layer's output.

Both carry the same metadata (ONNX ``metadata_props``, keys prefixed ``scorecam.``) except ``role``
and ``sibling_sha256``, the sha256 of the *other* file's serialised ``GraphProto`` (graph only, so
the two hashes are not circular). Preprocessing is always ``x = (pixel * scale - mean) / std`` per
channel on pixels 0..255 in ``color_order``, resized to H x W.

This module is pure Python + onnx: the exporter writes with it, the runtime reads with it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

MODEL_FILE = "model.onnx"
FEATURES_FILE = "features.onnx"
INT8_FILE = "model.int8.onnx"
REPORT_FILE = "export.json"

INPUT_NAME = "input"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"
FEATURES_NAME = "features"

PREFIX = "scorecam."
FORMAT_VERSION = "1"
ROLES = ("classifier", "features")
OUTPUT_KINDS = ("logits", "probabilities")
COLOR_ORDERS = ("RGB", "BGR")


class BundleError(ValueError):
    """A bundle (or a model file) does not satisfy the contract; the message says what is wrong."""


@dataclass(frozen=True)
class Preprocessing:
    """``x = (pixel * scale - mean) / std`` per channel, pixels 0..255 in ``color_order``, size H x W."""

    input_size: tuple[int, int] = (224, 224)
    color_order: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        h, w = self.input_size
        if int(h) < 1 or int(w) < 1:
            raise BundleError(f"input size must be positive, got {self.input_size}")
        if self.color_order not in COLOR_ORDERS:
            raise BundleError(f"colour order must be one of {COLOR_ORDERS}, got {self.color_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise BundleError("mean and std need three values (one per colour channel)")
        if not all(np.isfinite(float(v)) for v in (*self.mean, *self.std)):
            raise BundleError(f"mean and std must be finite numbers, got mean {list(self.mean)}, std {list(self.std)}")
        if any(float(s) == 0.0 for s in self.std):
            raise BundleError("std must not contain 0")
        if not np.isfinite(self.scale) or self.scale == 0:
            raise BundleError(f"scale must be a finite non-zero number, got {self.scale}")
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # checked on the next line
            ends = (np.array([[0.0], [255.0]]) * float(self.scale) - np.asarray(self.mean, np.float64)) / \
                np.asarray(self.std, np.float64)
        if not (np.abs(ends) < np.finfo(np.float32).max).all():
            raise BundleError(f"scale {self.scale}, mean {list(self.mean)} and std {list(self.std)} map pixels "
                              "outside the float32 range")

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """Map an H x W x 3 uint8 RGB array (already at ``input_size``) to float32 [3,H,W]."""
        pix = np.asarray(rgb, dtype=np.float32)
        if self.color_order == "BGR":
            pix = pix[..., ::-1]
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        x = (pix * np.float32(self.scale) - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


@dataclass(frozen=True)
class BundleMeta:
    """What one graph of a bundle says about itself."""

    role: str
    layer: str
    preprocessing: Preprocessing
    output_kind: str = "logits"
    labels: tuple[str, ...] | None = None
    sibling_sha256: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)

    def with_role(self, role: str, sibling_sha256: str) -> BundleMeta:
        return BundleMeta(role, self.layer, self.preprocessing, self.output_kind, self.labels,
                          sibling_sha256, dict(self.versions))

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` key/value strings for this metadata."""
        if self.role not in ROLES:
            raise BundleError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.output_kind not in OUTPUT_KINDS:
            raise BundleError(f"output kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        p = self.preprocessing
        props = {
            "format": FORMAT_VERSION,
            "role": self.role,
            "layer": self.layer,
            "input_size": json.dumps([int(p.input_size[0]), int(p.input_size[1])]),
            "color_order": p.color_order,
            "scale": repr(float(p.scale)),
            "mean": json.dumps([float(v) for v in p.mean]),
            "std": json.dumps([float(v) for v in p.std]),
            "output_kind": self.output_kind,
            "sibling_sha256": self.sibling_sha256,
        }
        if self.labels is not None:
            props["labels"] = json.dumps(list(self.labels))
        for k, v in self.versions.items():
            props[f"version.{k}"] = str(v)
        return {PREFIX + k: v for k, v in props.items()}

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "model") -> BundleMeta:
        """Parse ``metadata_props``; raise :class:`BundleError` naming the first bad or missing key."""
        ours = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        if not ours:
            raise BundleError(f"{source} carries no Score-CAM bundle metadata")

        def need(key: str) -> str:
            if key not in ours:
                raise BundleError(f"{source}: metadata key {PREFIX + key} is missing")
            return ours[key]

        try:
            size = json.loads(need("input_size"))
            if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int for v in size)):
                raise BundleError(f"{source}: metadata key {PREFIX}input_size must be [H, W] (two whole numbers), "
                                  f"got {ours['input_size'][:40]!r}")
            pre = Preprocessing(
                input_size=(size[0], size[1]),
                color_order=need("color_order"),
                scale=float(need("scale")),
                mean=_floats(json.loads(need("mean")), f"{source}: {PREFIX}mean"),
                std=_floats(json.loads(need("std")), f"{source}: {PREFIX}std"),
            )
            labels = None
            if "labels" in ours:
                raw = json.loads(ours["labels"])
                if not isinstance(raw, list) or not all(isinstance(v, (str, int, float)) for v in raw):
                    raise BundleError(f"{source}: metadata key {PREFIX}labels must be a JSON list of class names")
                labels = tuple(str(v) for v in raw)
        except BundleError:
            raise
        except (ValueError, TypeError, IndexError, KeyError, OverflowError, RecursionError) as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise BundleError(f"{source}: malformed bundle metadata ({reason})") from None
        versions = {k[len("version."):]: v for k, v in ours.items() if k.startswith("version.")}
        meta = cls(need("role"), need("layer"), pre, ours.get("output_kind", "logits"), labels,
                   ours.get("sibling_sha256", ""), versions)
        if meta.role not in ROLES:
            raise BundleError(f"{source}: unknown role {meta.role!r}")
        if meta.output_kind not in OUTPUT_KINDS:
            raise BundleError(f"{source}: unknown output kind {meta.output_kind!r}")
        return meta


def _floats(value, what: str) -> tuple[float, ...]:
    """A JSON list of numbers as floats (for mean and std)."""
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise BundleError(f"{what} must be a JSON list of numbers, got {json.dumps(value)[:40]}")
    return tuple(float(v) for v in value)


def graph_sha256(model, base_dir=None) -> str:
    """sha256 of ``model.graph`` serialised (an ``onnx.ModelProto``); metadata does not enter it.

    A graph whose weights lie in external data files (``model.onnx.data``) names them only by location,
    offset and length, so their content enters the hash too: sha256(graph bytes, then the sha256 of each
    data file under ``base_dir``, the graph's folder); a swapped weights file changes the hash. A graph
    without external data hashes exactly as it always did.
    """
    from .external import check, data_digest, has_external  # external imports this module

    h = hashlib.sha256(model.graph.SerializeToString(deterministic=True))
    if has_external(model):
        if base_dir is None:
            raise BundleError("the graph keeps its weights in external data files; its folder is needed to hash it")
        h.update(b"\0external data\0" + data_digest(check(model, base_dir), base_dir).encode())
    return h.hexdigest()


def write_metadata(model, meta: BundleMeta) -> None:
    """Replace the ``scorecam.*`` entries of ``model.metadata_props`` with ``meta``'s."""
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for k, v in keep + sorted(meta.to_props().items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def read_props(model) -> dict[str, str]:
    """``metadata_props`` of an ``onnx.ModelProto`` as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def parse_floats(values: Sequence[str] | str, n: int, what: str) -> tuple[float, ...]:
    """Parse ``n`` floats from CLI words (``"0.5 0.5 0.5"`` or ``["0.5", ...]``) or fail naming ``what``."""
    if not isinstance(values, (str, list, tuple)):
        raise BundleError(f"{what} must be {n} numbers, got {values!r}")
    words = values.replace(",", " ").split() if isinstance(values, str) else list(values)
    try:
        if any(isinstance(w, bool) or not isinstance(w, (str, int, float)) for w in words):
            raise TypeError
        out = tuple(float(w) for w in words)
    except (ValueError, TypeError):
        raise BundleError(f"{what} must be numbers, got {' '.join(map(str, words))[:60]!r}") from None
    if len(out) != n:
        raise BundleError(f"{what} needs {n} values, got {len(out)}")
    if not all(np.isfinite(v) for v in out):
        raise BundleError(f"{what} must be finite numbers, got {' '.join(map(str, out))}")
    return out
