"""Resolve a SPEC (a recipe name or ``package.module:callable``) and read label files."""

from __future__ import annotations

import difflib
import importlib
import json
from pathlib import Path

from torch import nn

from .errors import ExportError, first_line
from .recipes import RECIPES, Recipe


def resolve(spec: str) -> Recipe:
    """The built-in recipe named ``spec``, or a recipe (no default layer) around ``module:callable``."""
    if spec in RECIPES:
        return RECIPES[spec]
    if ":" not in spec:
        close = difflib.get_close_matches(spec, list(RECIPES), n=2, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ExportError(
            f"unknown recipe {spec!r}: {hint}built-in recipes are {', '.join(RECIPES)}; "
            "or give package.module:callable"
        )
    return Recipe(build=lambda _size, _trained: load_callable(spec), layer=None)


def load_callable(spec: str) -> nn.Module:
    """Import ``package.module:callable`` and call it (no arguments); it must return an ``nn.Module``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ExportError(f"bad SPEC {spec!r}: expected package.module:callable")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - import runs arbitrary user code
        raise ExportError(f"cannot import {module_name!r}: {type(e).__name__}: {first_line(e)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ExportError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ExportError(f"{spec} is a {type(obj).__name__}, not a callable returning a torch.nn.Module")
    try:
        model = obj()
    except Exception as e:  # noqa: BLE001 - user code
        raise ExportError(f"calling {spec} failed: {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ExportError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def read_labels(path: str | Path) -> list[str]:
    """Class names from a text file (one per line, blank lines ignored) or a JSON list of strings."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"cannot read labels file {path}: {first_line(e)}") from None
    if text.lstrip().startswith("["):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExportError(f"labels file {path} is not valid JSON: {first_line(e)}") from None
        if not all(isinstance(s, str | int | float) for s in labels):
            raise ExportError(f"labels file {path} must hold a JSON list of strings")
        labels = [str(s) for s in labels]
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise ExportError(f"labels file {path} holds no labels")
    return labels
