"""torch -> ONNX: one export with two outputs, split into the classifier and the features graph.

The wrapped model (:class:`~exporter.layers.FeatureTap`) returns ``(logits, features)`` from one
forward pass; torch exports that once, and :class:`onnx.utils.Extractor` cuts the graph twice, so
``features.onnx`` is exactly the sub-graph that ``model.onnx`` computes on the way to its logits.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx.utils
import torch
from torch import nn

from runtime.contract import FEATURES_NAME, INPUT_NAME, LOGITS_NAME, PROBABILITIES_NAME
from runtime.external import has_external

from .errors import ExportError, first_line, root_cause
from .layers import FeatureTap

#: torch 2.13's exporter (``dynamo=True``) has no translations below opset 18.
MIN_OPSET = 18
_EXAMPLE_BATCH = 2  # not 1: torch.export would specialise a batch of 1 to a constant


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress lines, warnings and log records (errors still raise)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_joint(model: nn.Module, layer: str, input_size: tuple[int, int], opset: int,
                 external_path: Path | None = None) -> onnx.ModelProto:
    """Export ``model`` with outputs ``logits`` and ``features`` (``layer``'s output), batch dynamic.

    With ``external_path``, the graph is saved there with its weights in ``<external_path>.data`` (torch
    writes them tensor by tensor: the way past protobuf's 2 GB limit) and returned without them."""
    tap = FeatureTap(model, layer).eval()
    example = torch.randn(_EXAMPLE_BATCH, 3, *input_size)
    try:
        with _quiet():
            program = torch.onnx.export(
                tap,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[LOGITS_NAME, FEATURES_NAME],
                opset_version=opset,
                dynamo=True,
                external_data=external_path is not None,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                optimize=True,
                verbose=False,
            )
            if external_path is None:
                proto = program.model_proto
            else:
                program.save(str(external_path), external_data=True)
                del program
                proto = onnx.load(str(external_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export"
        cause = root_cause(e)
        raise ExportError(
            f"torch could not export the model: {type(cause).__name__}: {first_line(cause)}"
        ) from None
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ExportError(f"torch wrote opset {got} instead of the requested {opset}; try --opset {got}")
    return proto


def split(joint: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto, str]:
    """Cut ``joint`` into (classifier, features graph, output kind).

    The classifier's output is renamed ``probabilities`` (kind ``"probabilities"``) when the graph
    ends in a Softmax, and stays ``logits`` (kind ``"logits"``) otherwise.
    """
    extractor = onnx.utils.Extractor(joint)
    classifier = extractor.extract_model([INPUT_NAME], [LOGITS_NAME])
    features = extractor.extract_model([INPUT_NAME], [FEATURES_NAME])
    kind = "logits"
    last = next(n for n in classifier.graph.node if LOGITS_NAME in n.output)
    if last.op_type == "Softmax":
        _rename_output(classifier, LOGITS_NAME, PROBABILITIES_NAME)
        kind = "probabilities"
    for proto, name in ((classifier, "scorecam_classifier"), (features, "scorecam_features")):
        proto.graph.name = name
        proto.producer_name = "scorecam-exporter"
        proto.producer_version = torch.__version__
        if not has_external(proto):  # with external data, checked by path once written (exporter.bundle)
            onnx.checker.check_model(proto)
    return classifier, features, kind


def _rename_output(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]
    for out in model.graph.output:
        if out.name == old:
            out.name = new


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """A graph input's or output's shape: ints, or names for symbolic dimensions."""
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
