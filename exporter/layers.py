"""Find target layers: probe one forward pass with hooks, name 4-D maps, and tap one of them.

A target layer is a submodule, named as in ``model.named_modules()``, that runs exactly once per
forward pass and returns a 4-D tensor [N,K,h,w].
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ExportError, first_line


@dataclass(frozen=True)
class LayerInfo:
    """What one submodule returned during a probe forward pass."""

    name: str
    shape: tuple[int, ...] | None  # shape of its (last) tensor output; None if not a tensor
    calls: int  # times it ran in one forward pass
    order: int  # position of its last call among all calls

    @property
    def is_map(self) -> bool:
        """True when the output is a 4-D map [N,K,h,w] with some spatial extent (h * w > 1)."""
        return self.shape is not None and len(self.shape) == 4 and self.shape[2] * self.shape[3] > 1

    @property
    def usable(self) -> bool:
        """True when this layer can be a Score-CAM target."""
        return self.is_map and self.calls == 1


@dataclass(frozen=True)
class Probe:
    """One forward pass: every submodule's output plus the model's own output shape."""

    layers: dict[str, LayerInfo]
    output_shape: tuple[int, ...] | None

    def maps(self) -> list[LayerInfo]:
        """Submodules that returned a 4-D map (larger than 1 x 1), deepest (last run) first."""
        return sorted((info for info in self.layers.values() if info.is_map), key=lambda i: -i.order)


def probe(model: nn.Module, input_size: tuple[int, int], batch: int = 2) -> Probe:
    """Run ``model`` once on a random [batch,3,H,W] input with a hook on every submodule."""
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...] | None] = {}
    order: dict[str, int] = {}
    counter = iter(range(1 << 30))

    def hook_for(name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            calls[name] = calls.get(name, 0) + 1
            shapes[name] = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            order[name] = next(counter)

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            out = model(torch.randn(batch, 3, *input_size))
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported in one line
        raise ExportError(
            f"the model failed on a {batch}x3x{input_size[0]}x{input_size[1]} input: "
            f"{type(e).__name__}: {first_line(e)}"
        ) from None
    finally:
        for h in handles:
            h.remove()
    layers = {n: LayerInfo(n, shapes[n], calls[n], order[n]) for n in calls}
    return Probe(layers, tuple(out.shape) if isinstance(out, torch.Tensor) else None)


def module_names(model: nn.Module) -> list[str]:
    """Every named submodule (the root, named ``""``, excluded)."""
    return [n for n, _ in model.named_modules() if n]


def check_layer(model: nn.Module, layer: str, found: Probe) -> LayerInfo:
    """The probe's record of ``layer``, or :class:`ExportError` saying why it cannot be a target."""
    names = module_names(model)
    if layer not in names:
        close = difflib.get_close_matches(layer, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run with --list-layers to see the choices"
        raise ExportError(f"unknown layer {layer!r}: {hint}")
    info = found.layers.get(layer)
    if info is None:
        raise ExportError(f"layer {layer!r} does not run in the model's forward pass")
    if not info.is_map:
        shape = info.shape
        what = ("a non-tensor value" if shape is None else f"a {len(shape)}-D tensor {list(shape)}"
                if len(shape) != 4 else f"a map without spatial extent {list(shape)}")
        raise ExportError(
            f"layer {layer!r} outputs {what}; Score-CAM needs a 4-D map [N,K,h,w] (see --list-layers)"
        )
    if info.calls != 1:
        raise ExportError(
            f"layer {layer!r} runs {info.calls} times per forward pass (a shared module); "
            "give each use its own module and target that one"
        )
    return info


class FeatureTap(nn.Module):
    """Wrap ``model`` so that it returns ``(logits, output of layer)`` from one forward pass."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        self.model = model
        self.layer_name = layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        taken: list[torch.Tensor] = []
        module = self.model.get_submodule(self.layer_name)
        handle = module.register_forward_hook(lambda _m, _i, out: taken.append(out))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return logits, taken[-1]

