"""``export()``: probe, export once, split, stamp metadata, verify, and move the bundle into place.

Everything is written into a temporary sibling folder of ``out_dir`` that is renamed into place
only after verification passed, so a failed export leaves nothing behind and ``force`` replaces
an old bundle only with a good one.

Both graphs are single files, except for a model too big for one (protobuf's 2 GB limit: its weights
are over :data:`EXTERNAL_ABOVE` bytes) or when asked (``external_data=True``, ``--external-data``): then
the weights go to ONE file ``model.onnx.data`` that both graphs read (the feature graph's weights are a
subset of the classifier's, stored once), and each graph's sha256 covers it (:func:`graph_sha256`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import onnx.defs
import torch
from torch import nn

from runtime.contract import (
    FEATURES_FILE,
    MODEL_FILE,
    REPORT_FILE,
    BundleError,
    BundleMeta,
    Preprocessing,
    graph_sha256,
    write_metadata,
)
from runtime.external import is_external

from . import __version__
from .errors import ExportError
from .graphs import MIN_OPSET, export_joint, split
from .layers import check_layer, probe
from .report import build_report
from .verify import TOLERANCE, default_sample_images
from .verify import verify as verify_bundle

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_OPSET = MIN_OPSET
#: weights (parameters and buffers) above this many bytes are written as external data: a graph must
#: serialize under protobuf's 2 GiB, and the graph itself needs some room beside its weights
EXTERNAL_ABOVE = 2**31 - (128 << 20)
DATA_FILE = MODEL_FILE + ".data"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what its ONNX graph's initializers hold)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def export(
    model: nn.Module,
    layer: str,
    out_dir: str | os.PathLike,
    input_size: tuple[int, int] = (224, 224),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: float = 1.0 / 255.0,
    color_order: str = "RGB",
    labels: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    verify: bool = True,
    sample_images: Sequence[str | os.PathLike] | None = None,
    tolerance: float = TOLERANCE,
    finish: Callable[[Path], object] | None = None,
    external_data: bool | None = None,
) -> dict:
    """Export ``model`` and its ``layer`` into a bundle folder ``out_dir``; return the export report.

    Args:
        model: a classifier mapping float32 [N,3,H,W] to [N,C] (put in eval mode here).
        layer: name of the target submodule (as in ``model.named_modules()``), output [N,K,h,w].
        out_dir: the bundle folder; must be absent or empty unless ``force``.
        input_size, mean, std, scale, color_order: preprocessing,
            ``x = (pixel * scale - mean) / std`` on 0..255 pixels resized to H x W.
        labels: one class name per output, or None.
        opset: ONNX opset (>= 18: torch 2.13's exporter has no lower translations).
        force: replace a non-empty ``out_dir`` (only once the new bundle verified).
        verify: compare ONNX Runtime with torch (relative error <= ``tolerance``) before writing.
        sample_images: photos for verification and the top-1 report; None = the project's samples/.
        tolerance: largest relative error ``max|ort - torch| / max|torch|`` accepted.
        finish: called with the temporary bundle folder after verification, before it is moved into
            place (e.g. to add ``model.int8.onnx``); an exception from it aborts the export.
        external_data: write the weights to ``model.onnx.data`` beside the graphs (None: only when they
            do not fit one file, over :data:`EXTERNAL_ABOVE` bytes).

    Raises:
        ExportError: anything wrong, with a one-line message; nothing is written then.
    """
    out = Path(out_dir)
    check_destination(out, force)
    pre = make_preprocessing(input_size, scale, mean, std, color_order)
    check_opset(opset)
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model.eval()
    found = probe(model, pre.input_size)
    check_layer(model, layer, found)
    num_classes = _check_output(found.output_shape)
    if labels is not None:
        labels = tuple(str(s) for s in labels)
        if len(labels) != num_classes:
            raise ExportError(f"got {len(labels)} labels for a model with {num_classes} outputs")

    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_ABOVE
    if not external_data:
        joint = export_joint(model, layer, pre.input_size, int(opset))
        classifier, features, kind = split(joint)
        del joint

    created = _missing_parents(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        _remove_empty(created)
        raise ExportError(f"cannot write into {out.parent}: {e.strerror or e}") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
        if external_data:  # torch writes the joint graph's weights to model.onnx.data; both graphs point there
            joint = export_joint(model, layer, pre.input_size, int(opset), external_path=tmp / MODEL_FILE)
            classifier, features, kind = split(joint)
            del joint
            _share_data(features, classifier)
        folder = tmp if external_data else None
        versions = {"exporter": __version__, "opset": str(int(opset)), "torch": torch.__version__,
                    "onnx": onnx.__version__}
        meta = BundleMeta("classifier", layer, pre, kind, labels, "", versions)
        hashes = {MODEL_FILE: graph_sha256(classifier, folder), FEATURES_FILE: graph_sha256(features, folder)}
        write_metadata(classifier, meta.with_role("classifier", hashes[FEATURES_FILE]))
        write_metadata(features, meta.with_role("features", hashes[MODEL_FILE]))
        onnx.save_model(classifier, tmp / MODEL_FILE)
        onnx.save_model(features, tmp / FEATURES_FILE)
        if external_data:
            for name in (MODEL_FILE, FEATURES_FILE):
                onnx.checker.check_model(str(tmp / name))  # by path: the checker reads the data file beside it
        checked = None
        if verify:
            photos = default_sample_images() if sample_images is None else [Path(p) for p in sample_images]
            checked = verify_bundle(model, layer, tmp / MODEL_FILE, tmp / FEATURES_FILE, pre, photos,
                                    kind, labels, tolerance)
        report = build_report(classifier, features, tmp, layer, pre, kind, labels, versions, hashes, checked)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if finish is not None:
            finish(tmp)
        _move_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if isinstance(e, OSError):
            raise ExportError(f"cannot write the bundle {out}: {e.strerror or e}") from None
        raise
    return report


def _share_data(features: onnx.ModelProto, classifier: onnx.ModelProto) -> None:
    """Check that every external tensor of the feature graph is the classifier's (same name, same place in
    ``model.onnx.data``): the data file is shared, so the bundle stores each weight once."""
    where = {t.name: [(e.key, e.value) for e in t.external_data] for t in classifier.graph.initializer
             if is_external(t)}
    for t in features.graph.initializer:
        if is_external(t) and where.get(t.name) != [(e.key, e.value) for e in t.external_data]:
            raise ExportError(f"the feature graph's weight {t.name!r} is not the classifier's; export without "
                              "--external-data")


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def make_preprocessing(input_size: Sequence[int] | int, scale: float, mean: Sequence[float],
                       std: Sequence[float], color_order: str = "RGB") -> Preprocessing:
    """A checked :class:`Preprocessing`, or :class:`ExportError` saying which value is bad."""
    try:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(int(v) for v in input_size)
        if len(size) != 2:
            raise BundleError(f"input size needs H and W, got {list(size)}")
        return Preprocessing(
            input_size=(size[0], size[1]), color_order=str(color_order).upper(), scale=float(scale),
            mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        )
    except (BundleError, TypeError, ValueError) as e:
        raise ExportError(f"bad preprocessing: {e}") from None


def check_opset(opset: int) -> None:
    """Refuse an opset that torch's exporter or this onnx cannot write."""
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= int(opset) <= newest:
        raise ExportError(
            f"opset must be between {MIN_OPSET} and {newest} (torch {torch.__version__} exports opset >= 18), "
            f"got {opset}"
        )


def check_destination(out: Path, force: bool) -> None:
    """Refuse a destination that is a file, or a non-empty folder without ``force``."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty; use --force (force=True) to replace it")


def _check_output(shape: tuple[int, ...] | None) -> int:
    if shape is None or len(shape) != 2:
        what = "a non-tensor value" if shape is None else f"shape {list(shape)}"
        raise ExportError(f"the model must return one tensor [N,C] of class scores, got {what}")
    return int(shape[1])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _missing_parents(out: Path) -> list[Path]:
    """Folders above ``out`` that do not exist yet, deepest first (to remove after a failure)."""
    missing = []
    parent = out.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is set aside first and removed after."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / out.name, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
