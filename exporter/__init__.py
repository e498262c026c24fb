"""Export a torch classifier once into a Score-CAM bundle (``model.onnx`` + ``features.onnx``).

>>> from exporter import export
>>> report = export(model, "layer4", "models/resnet50")  # doctest: +SKIP

The runtime (``runtime/``) then explains images with numpy and ONNX Runtime alone.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .bundle import export  # noqa: E402
from .errors import ExportError  # noqa: E402
from .layers import LayerInfo, probe  # noqa: E402
from .recipes import RECIPES, Recipe, export_recipe  # noqa: E402

__all__ = ["RECIPES", "ExportError", "LayerInfo", "Recipe", "__version__", "export", "export_recipe", "list_layers"]


def list_layers(model, input_size: tuple[int, int] = (224, 224)) -> list[LayerInfo]:
    """Every submodule whose output is a 4-D map, deepest (last run) first, from one forward pass."""
    model.eval()
    return probe(model, input_size).maps()
