"""Find target layers: probe one forward pass with hooks, name maps and token layers, and tap one of them.

A target layer is a submodule, named as in ``model.named_modules()``, that runs exactly once per
forward pass and returns the K maps of an h x w grid in one of the layouts of :mod:`runtime.layout`:
[N,K,h,w] (NCHW), channels-last [N,h,w,K] (NHWC: Swin) or tokens [N,T,K] (NLC: ViT, DeiT), T = aux +
h*w. The grid is inferred from the reduction (timm's word): a 4-D output is NCHW when its last two axes
are one of the image's grids (the outputs of the convolutions and poolings, and their halvings), NHWC when
only its axes 1 and 2 are; the grid of T tokens is the patch embedding's (the nearest convolution before
the layer with h*w <= T), the rest of the tokens being auxiliary (CLS, distillation, registers), else the
split of T into the fewest auxiliary tokens and a grid of the image's aspect ratio. ``--grid`` and
``--aux-tokens`` override that.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

import torch
from torch import nn

from runtime.layout import NCHW, NHWC, NLC, Layout, LayoutError, grid_family, is_grid, split_tokens

from .errors import ExportError, first_line

#: module types whose 4-D output has its channels last (they act on the last axis)
CHANNELS_LAST_MODULES = ("LayerNorm", "Linear", "Permute")
#: module types whose 4-D output is a grid of the image (they define the family of grids)
GRID_MODULES = ("Conv", "Pool")


@dataclass(frozen=True)
class LayerInfo:
    """What one submodule returned during a probe forward pass."""

    name: str
    shape: tuple[int, ...] | None  # shape of its (last) tensor output; None if not a tensor
    calls: int  # times it ran in one forward pass
    order: int  # position of its last call among all calls
    first: int = 0  # position of its first call
    module: str = ""  # its class name
    layout: Layout | None = None  # how its output holds maps (inferred); None: it holds none

    @property
    def is_map(self) -> bool:
        """True when the output holds maps with some spatial extent (h * w > 1) in a known layout."""
        return self.layout is not None

    @property
    def usable(self) -> bool:
        """True when this layer can be a Score-CAM target."""
        return self.is_map and self.calls == 1

    @property
    def maps_shape(self) -> tuple[int, int, int]:
        """(K, h, w) of its maps."""
        return self.layout.maps_shape(self.shape)


@dataclass(frozen=True)
class Probe:
    """One forward pass: every submodule's output plus the model's own output shape."""

    layers: dict[str, LayerInfo]
    output_shape: tuple[int, ...] | None
    input_size: tuple[int, int] = (224, 224)

    def maps(self) -> list[LayerInfo]:
        """Submodules whose output holds maps (NCHW, NHWC or tokens), deepest (last run) first."""
        return sorted((info for info in self.layers.values() if info.is_map), key=lambda i: -i.order)

    def grids_before(self, info: LayerInfo) -> list[tuple[int, int]]:
        """The grids of the convolutions and poolings that ran before ``info``, nearest first."""
        before = [i for i in self.layers.values() if i.first < info.first and i.shape is not None
                  and len(i.shape) == 4 and i.module.endswith(GRID_MODULES)]
        return [(int(i.shape[2]), int(i.shape[3])) for i in sorted(before, key=lambda i: -i.first)]

    def family(self) -> set[tuple[int, int]]:
        return grid_family([(int(i.shape[2]), int(i.shape[3])) for i in self.layers.values()
                            if i.shape is not None and len(i.shape) == 4 and i.module.endswith(GRID_MODULES)],
                           self.input_size)

    def layout_of(self, info: LayerInfo, grid: tuple[int, int] | None = None, aux: int | None = None,
                  kind: str | None = None, family: set | None = None) -> Layout | None:
        """The layout of ``info``'s output (see the module docstring); ``grid``/``aux``/``kind`` override
        the inference. None when it holds no maps; :class:`ExportError` when an override does not fit."""
        shape = info.shape
        family = self.family() if family is None else family
        given = grid is not None or aux is not None or kind is not None
        if shape is None or len(shape) not in (3, 4):
            if given:
                what = "a non-tensor value" if shape is None else f"a {len(shape)}-D tensor {list(shape)}"
                raise ExportError(f"layer {info.name!r} outputs {what}; --grid/--aux-tokens/--layout apply to "
                                  "[N,K,h,w], [N,h,w,K] and [N,T,K] outputs")
            return None
        if kind is None:
            kind = NLC if len(shape) == 3 else self._kind_4d(info, family, grid)
        try:
            if kind == NLC:
                if len(shape) != 3:
                    raise LayoutError(f"layout NLC needs [N,T,K] tokens, and layer {info.name!r} outputs "
                                      f"{list(shape)}")
                split = split_tokens(int(shape[1]), self.grids_before(info), family, self.input_size, grid, aux)
                if split is None:
                    if not given:
                        return None
                    raise LayoutError(_no_split(info, grid, aux))
                layout = Layout(NLC, split[0], split[1])
            else:
                if aux:
                    raise LayoutError(f"--aux-tokens applies to token layers [N,T,K]; layer {info.name!r} "
                                      f"outputs {list(shape)}")
                if kind is None and grid is not None:
                    raise LayoutError(f"--grid {grid[0]} {grid[1]} is neither axes 2-3 nor axes 1-2 of "
                                      f"{list(shape)}")
                if kind is None:
                    return None
                layout = Layout(kind, grid)
                layout.maps_shape(shape)
                if kind == NHWC and grid is None:  # recorded: the grid is not where a map has it
                    layout = Layout(NHWC, (int(shape[1]), int(shape[2])))
        except LayoutError as e:
            raise ExportError(f"layer {info.name!r}: {e}") from None
        k, h, w = layout.maps_shape(shape)
        return layout if h * w > 1 else None

    @staticmethod
    def _kind_4d(info: LayerInfo, family: set, grid) -> str | None:
        """NCHW or NHWC for a 4-D output: where the image's grid is (``grid``: the one given)."""
        _, a, b, c = info.shape
        nchw = (b, c) == tuple(grid) if grid is not None else is_grid((b, c), family)
        nhwc = (a, b) == tuple(grid) if grid is not None else is_grid((a, b), family)
        if nhwc and (not nchw or info.module.endswith(CHANNELS_LAST_MODULES)):
            return NHWC
        if nchw or (grid is None and b * c > 1):  # not a grid of the image either way: read as NCHW, as ever
            return NCHW
        return None


def _no_split(info: LayerInfo, grid, aux) -> str:
    t = info.shape[1]
    if grid is not None:
        h, w = grid
        need = (aux or 0) + h * w
        return (f"outputs {t} tokens; --grid {h} {w}" + (f" with --aux-tokens {aux}" if aux is not None else "")
                + f" makes {need if aux is not None else h * w} (T must be aux + H*W)")
    return f"outputs {t} tokens and no grid of the image fits {t} - {aux} (T must be aux + H*W); give --grid H W"


def probe(model: nn.Module, input_size: tuple[int, int], batch: int = 2) -> Probe:
    """Run ``model`` once on a random [batch,3,H,W] input with a hook on every submodule."""
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...] | None] = {}
    order: dict[str, int] = {}
    first: dict[str, int] = {}
    counter = iter(range(1 << 30))

    def hook_for(name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            calls[name] = calls.get(name, 0) + 1
            shapes[name] = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            order[name] = next(counter)
            first.setdefault(name, order[name])

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
    types = {n: type(m).__name__ for n, m in model.named_modules() if n}
    layers = {n: LayerInfo(n, shapes[n], calls[n], order[n], first[n], types.get(n, "")) for n in calls}
    found = Probe(layers, tuple(out.shape) if isinstance(out, torch.Tensor) else None,
                  (int(input_size[0]), int(input_size[1])))
    family = found.family()
    for n, info in layers.items():
        try:
            layers[n] = replace(info, layout=found.layout_of(info, family=family))
        except ExportError:
            pass
    return found


def module_names(model: nn.Module) -> list[str]:
    """Every named submodule (the root, named ``""``, excluded)."""
    return [n for n, _ in model.named_modules() if n]


def check_layer(model: nn.Module, layer: str, found: Probe, grid: tuple[int, int] | None = None,
                aux: int | None = None, kind: str | None = None) -> LayerInfo:
    """The probe's record of ``layer`` with its layout (inferred, or as ``grid``/``aux``/``kind`` say), or
    :class:`ExportError` saying why it cannot be a target."""
    names = module_names(model)
    if layer not in names:
        close = difflib.get_close_matches(layer, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run with --list-layers to see the choices"
        raise ExportError(f"unknown layer {layer!r}: {hint}")
    info = found.layers.get(layer)
    if info is None:
        raise ExportError(f"layer {layer!r} does not run in the model's forward pass")
    if grid is not None or aux is not None or kind is not None:
        info = replace(info, layout=found.layout_of(info, grid, aux, kind))
    if not info.is_map:
        shape = info.shape
        what = ("a non-tensor value" if shape is None else f"a {len(shape)}-D tensor {list(shape)}"
                if len(shape) not in (3, 4) else f"{list(shape)}, with no grid of the image in it"
                if len(shape) == 3 else f"a map without spatial extent {list(shape)}")
        raise ExportError(
            f"layer {layer!r} outputs {what}; Score-CAM needs maps [N,K,h,w], [N,h,w,K] or tokens [N,T,K] "
            "(see --list-layers; --grid H W and --aux-tokens N say how tokens lie)"
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

