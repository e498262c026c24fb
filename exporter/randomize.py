"""Cascading model-parameter randomisation (Adebayo et al., "Sanity Checks for Saliency Maps", 2018).

Starting from the trained model, the layers are re-initialised one after another from the top (the
logits) down; after each step the partly random model is exported as its own bundle. A saliency
method that explains the *model* must give maps that drift away from the original ones as more
layers are randomised (``python -m runtime.evaluate MODEL IMAGES --cascade DIR`` measures the
Spearman rank correlation and SSIM against the original map); a method whose maps stay the same is
an edge detector, not an explanation.

Layout written under ``out_dir``::

    cascade.json        {"seed": s, "layers": [...], "steps": [{"step": 1, "layer": "fc", "bundle": "01-fc"}, ...]}
    01-fc/              the bundle with ``fc`` re-initialised
    02-conv3/           ``fc`` and ``conv3`` re-initialised
    ...
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

MANIFEST = "cascade.json"  # read back, torch-free, by runtime.evaluate.read_cascade

#: ``export_fn(model, bundle_dir)`` writes one bundle of ``model`` (same target layer, preprocessing
#: and labels as the original export) into ``bundle_dir``.
ExportFn = Callable[[nn.Module, Path], object]


def default_layer_order(model: nn.Module) -> list[str]:
    """The top-level modules that hold parameters, last first (a ``ModuleList`` counts item by item).

    For the toy net: ``fc, conv3, stage3, stage2, stage1``; for EfficientNet-Lite0: ``_fc, _bn1, _conv_head,
    _blocks.15, ..., _blocks.0, _bn0, _conv_stem``.
    """
    names: list[str] = []
    for name, child in model.named_children():
        items = list(child.named_children()) if isinstance(child, nn.ModuleList) else [("", child)]
        for sub, mod in items:
            if any(True for _ in mod.parameters()):
                names.append(f"{name}.{sub}" if sub else name)
    return names[::-1]


def reinitialize(module: nn.Module, generator_seed: int) -> int:
    """Re-initialise every submodule of ``module`` that has ``reset_parameters`` (its own default init,
    BatchNorm's running statistics included), with torch's RNG seeded by ``generator_seed`` and
    restored afterwards. Returns the number of submodules reset."""
    n = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(generator_seed))
        for mod in module.modules():
            reset = getattr(mod, "reset_parameters", None)
            if callable(reset):
                reset()
                n += 1
    return n


def _folder(step: int, layer: str) -> str:
    return f"{step:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', layer)}"


def randomize_cascade(model: nn.Module, layer_order: Sequence[str] | None, out_dir: str | os.PathLike,
                      export_fn: ExportFn, seed: int = 0,
                      progress: Callable[[int, int, str], None] | None = None) -> list[Path]:
    """Randomise ``layer_order`` cumulatively (top first) in a copy of ``model``; one bundle per step.

    Args:
        model: the trained model (left untouched: a deep copy is randomised).
        layer_order: module names, in the order to randomise them (None: :func:`default_layer_order`).
        out_dir: where the step bundles and ``cascade.json`` go.
        export_fn: ``export_fn(model, bundle_dir)`` exports one bundle (e.g. ``exporter.export`` with
            the original recipe's target layer and preprocessing bound).
        seed: step ``i`` re-initialises with torch seed ``seed + i``.

    Returns:
        the bundle directories, one per step.

    Raises:
        ValueError: a layer name is not a module of ``model``, or the order is empty.
    """
    order = list(layer_order) if layer_order is not None else default_layer_order(model)
    if not order:
        raise ValueError("nothing to randomise: the layer order is empty")
    work = copy.deepcopy(model).eval()
    modules = dict(work.named_modules())
    missing = [name for name in order if name not in modules]
    if missing:
        raise ValueError(f"unknown layer(s) {', '.join(map(repr, missing))}; the model's top-level layers "
                         f"are {', '.join(default_layer_order(model))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundles: list[Path] = []
    steps = []
    for i, name in enumerate(order, 1):
        if reinitialize(modules[name], seed + i) == 0:
            raise ValueError(f"layer {name!r} has no parameters to re-initialise")
        folder = _folder(i, name)
        if progress:
            progress(i, len(order), name)
        export_fn(work, out / folder)
        bundles.append(out / folder)
        steps.append({"step": i, "layer": name, "bundle": folder})
    (out / MANIFEST).write_text(json.dumps({"seed": seed, "layers": order, "steps": steps}, indent=2) + "\n")
    return bundles


def run_cascade(model: nn.Module, out_dir: str | os.PathLike, export_fn: ExportFn,
                layers: str | Sequence[str] | None = None, seed: int = 0, quiet: bool = False) -> list[Path]:
    """The ``--randomize cascade`` entry point: ``layers`` may be a comma-separated string; progress
    goes to stderr."""
    import sys

    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()] or None

    def report(i: int, n: int, name: str) -> None:
        if not quiet:
            print(f"[{i}/{n}] randomising {name} -> {out_dir}", file=sys.stderr)

    return randomize_cascade(model, layers, out_dir, export_fn, seed=seed, progress=report)


def recipe_export_fn(name: str, verify: bool = False, **overrides) -> ExportFn:
    """An ``export_fn`` exporting with built-in recipe ``name``'s defaults (target layer, size,
    preprocessing, labels); ``verify=False``: a random model's agreement with torch is checked by
    nothing downstream, and the original export was verified already."""
    from .bundle import export
    from .recipes import RECIPES

    recipe = RECIPES[name]
    options = {"layer": recipe.layer, "input_size": recipe.input_size, "scale": recipe.scale,
               "mean": recipe.mean, "std": recipe.std, "color_order": recipe.color_order,
               "labels": recipe.labels() if recipe.labels else None, "verify": verify, "force": True}
    options.update(overrides)

    def export_one(model: nn.Module, bundle_dir: Path) -> object:
        return export(model, out_dir=bundle_dir, **options)

    return export_one


def cascade_recipe(name: str, out_dir: str | os.PathLike, layers: str | Sequence[str] | None = None,
                   seed: int = 0, quiet: bool = False, **overrides) -> list[Path]:
    """``python -m exporter NAME --randomize cascade``: the cascade of built-in recipe ``name``."""
    from .recipes import build_torch

    size = overrides.get("input_size")
    return run_cascade(build_torch(name, size), out_dir, recipe_export_fn(name, **overrides), layers=layers,
                       seed=seed, quiet=quiet)


__all__ = ["MANIFEST", "cascade_recipe", "default_layer_order", "randomize_cascade", "recipe_export_fn",
           "reinitialize", "run_cascade"]
