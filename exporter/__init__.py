"""Export a torch classifier once into a Score-CAM bundle (``model.onnx`` + ``features.onnx``).

>>> from exporter import export
>>> report = export(model, "layer4", "models/resnet50")  # doctest: +SKIP

The runtime (``runtime/``) then explains images with numpy and ONNX Runtime alone.
"""

from __future__ import annotations

__version__ = "0.1.0"

# the torch-side names are imported on first use (PEP 562), so the torch-free parts of the package
# (``python -m exporter explainer``, ``exporter.explainer_graph``) never import torch
_LAZY = {"export": ".bundle", "ExportError": ".errors", "LayerInfo": ".layers", "probe": ".layers",
         "RECIPES": ".recipes", "Recipe": ".recipes", "export_recipe": ".recipes"}

__all__ = ["RECIPES", "ExportError", "LayerInfo", "Recipe", "__version__", "export", "export_recipe", "list_layers"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def list_layers(model, input_size: tuple[int, int] = (224, 224)) -> list:
    """Every submodule whose output is a 4-D map, deepest (last run) first, from one forward pass."""
    from .layers import probe

    model.eval()
    return probe(model, input_size).maps()
