"""How a target layer holds its K maps of h x w: NCHW, channels-last NHWC, or NLC tokens (pure numpy).

The words are timm's (``feature_info``, ``forward_intermediates(output_fmt=...)``, ``num_prefix_tokens``):

- ``NCHW`` [N,K,h,w]: a CNN's map (the layout of every bundle before layouts were recorded);
- ``NHWC`` [N,h,w,K]: channels last (Swin's blocks and norms, some ConvNeXt exports);
- ``NLC`` [N,T,K]: tokens, ``T = aux + h*w``: the grid's h*w cells in row-major order and ``aux``
  auxiliary tokens (CLS, DeiT's distillation token, register tokens) before the grid (``first``,
  timm's prefix tokens) or after it (``last``). The channel axis is 1, 3 and 2 respectively.

:meth:`Layout.to_maps` turns one image's tensor into [K,h,w] (the auxiliary tokens dropped): the
runtime applies it ONCE, where the activations leave the engine, so Score-CAM's arithmetic never sees a
layout. :meth:`Layout.from_maps` is its inverse for graphs that take the layer's tensor back (the
classifier's tail, :mod:`runtime.methods`).

The module also holds what the exporter and the graph reader share to *infer* a layout: whether an
(h, w) is one of the image's grids (:func:`grid_family`, :func:`is_grid`) and how T tokens split into
auxiliary tokens and a grid (:func:`split_tokens`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

NCHW = "NCHW"
NHWC = "NHWC"
NLC = "NLC"
LAYOUTS = (NCHW, NHWC, NLC)
AUX_POSITIONS = ("first", "last")
CHANNEL_AXIS = {NCHW: 1, NHWC: 3, NLC: 2}
#: most auxiliary tokens an inferred token layout may have (CLS + distillation + registers stay far below)
MAX_AUX = 32


class LayoutError(ValueError):
    """A layout that does not fit its tensor, or a bad layout description; the message says which."""


Grid = tuple[int, int]


@dataclass(frozen=True)
class Layout:
    """Where the channels, the grid and the auxiliary tokens are in the target layer's tensor.

    ``grid`` is required for ``NLC`` (tokens do not say their grid) and optional otherwise (the tensor's
    own spatial axes); ``aux_tokens`` / ``aux_position`` apply to ``NLC`` only.
    """

    kind: str = NCHW
    grid: Grid | None = None
    aux_tokens: int = 0
    aux_position: str = "first"

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise LayoutError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.kind!r}")
        if self.grid is not None:
            g = tuple(self.grid)
            if len(g) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
                                      for v in g):
                raise LayoutError(f"grid must be two positive whole numbers (h w), got {list(g)}")
            object.__setattr__(self, "grid", (int(g[0]), int(g[1])))
        if not isinstance(self.aux_tokens, (int, np.integer)) or isinstance(self.aux_tokens, bool) \
                or self.aux_tokens < 0:
            raise LayoutError(f"aux tokens must be a whole number >= 0, got {self.aux_tokens!r}")
        object.__setattr__(self, "aux_tokens", int(self.aux_tokens))
        if self.aux_position not in AUX_POSITIONS:
            raise LayoutError(f"aux position must be 'first' or 'last', got {self.aux_position!r}")
        if self.kind == NLC and self.grid is None:
            raise LayoutError("an NLC (token) layout needs its grid (h w)")
        if self.kind != NLC and self.aux_tokens:
            raise LayoutError(f"only token layers (NLC) have auxiliary tokens; layout {self.kind} has none")

    # ------------------------------------------------------------------------------ properties
    @property
    def channel_axis(self) -> int:
        """The channel axis of the batched tensor: 1 (NCHW), 3 (NHWC) or 2 (NLC)."""
        return CHANNEL_AXIS[self.kind]

    @property
    def is_nchw(self) -> bool:
        return self.kind == NCHW

    @property
    def tokens(self) -> int | None:
        """T = aux + h*w for NLC, else None."""
        return self.aux_tokens + self.grid[0] * self.grid[1] if self.kind == NLC else None

    def describe(self) -> str:
        """``NLC 197 tokens = 1 aux (first) + 14x14`` / ``NHWC 7x7`` / ``NCHW``."""
        if self.kind == NLC:
            h, w = self.grid
            aux = f"{self.aux_tokens} aux ({self.aux_position}) + " if self.aux_tokens else ""
            return f"NLC {self.tokens} tokens = {aux}{h}x{w}"
        return self.kind + (f" {self.grid[0]}x{self.grid[1]}" if self.grid else "")

    # --------------------------------------------------------------------------------- shapes
    def maps_shape(self, shape: Sequence[int | None]) -> tuple[int | None, int | None, int | None]:
        """(K, h, w) of a batched tensor ``shape`` in this layout; :class:`LayoutError` when it does not fit."""
        shape = tuple(shape)
        want = 3 if self.kind == NLC else 4
        if len(shape) != want:
            what = {NCHW: "[N,K,h,w]", NHWC: "[N,h,w,K]", NLC: "[N,T,K] tokens"}[self.kind]
            raise LayoutError(f"layout {self.kind} needs a {want}-D tensor {what}, got {list(shape)}")
        if self.kind == NLC:
            t, k = shape[1], shape[2]
            if t is not None and t != self.tokens:
                h, w = self.grid
                raise LayoutError(f"the layer has {t} tokens, and {self.aux_tokens} aux + {h}x{w} grid = "
                                  f"{self.tokens} (T != aux + h*w)")
            return k, self.grid[0], self.grid[1]
        k, h, w = (shape[1], shape[2], shape[3]) if self.kind == NCHW else (shape[3], shape[1], shape[2])
        if self.grid is not None and None not in (h, w) and (h, w) != self.grid:
            raise LayoutError(f"the layer's grid is {h}x{w}, the layout says {self.grid[0]}x{self.grid[1]}")
        return k, h, w

    def _grid_slice(self) -> slice:
        n = self.grid[0] * self.grid[1]
        return slice(self.aux_tokens, self.aux_tokens + n) if self.aux_position == "first" else slice(0, n)

    def to_maps(self, a: np.ndarray) -> np.ndarray:
        """One image's tensor (no batch axis) -> maps [K,h,w]; NCHW is returned as it is (no copy).

        NHWC: ``a.transpose(2, 0, 1)``; NLC: the h*w grid tokens [h*w,K] -> [h,w,K] -> [K,h,w].
        """
        a = np.asarray(a)
        self.maps_shape((1, *a.shape))
        if self.kind == NCHW:
            return a
        if self.kind == NHWC:
            return np.ascontiguousarray(a.transpose(2, 0, 1))
        h, w = self.grid
        cells = a[self._grid_slice()]
        return np.ascontiguousarray(cells.reshape(h, w, a.shape[1]).transpose(2, 0, 1))

    def aux_of(self, a: np.ndarray) -> np.ndarray | None:
        """The auxiliary tokens [aux,K] of one image's NLC tensor [T,K]; None for the other layouts."""
        if self.kind != NLC:
            return None
        a = np.asarray(a)
        return a[: self.aux_tokens] if self.aux_position == "first" else a[a.shape[0] - self.aux_tokens:]

    def from_maps(self, maps: np.ndarray, aux: np.ndarray | None = None) -> np.ndarray:
        """Maps [B,K,h,w] -> the layer's batched tensor in this layout (the inverse of :meth:`to_maps`).

        NLC: the grid tokens [B,h*w,K], with ``aux`` [aux,K] (the same for every row; zeros when None)
        put back where the layout keeps them.
        """
        maps = np.asarray(maps)
        if self.kind == NCHW:
            return maps
        if self.kind == NHWC:
            return np.ascontiguousarray(maps.transpose(0, 2, 3, 1))
        b, k, h, w = maps.shape
        cells = maps.reshape(b, k, h * w).transpose(0, 2, 1)
        if not self.aux_tokens:
            return np.ascontiguousarray(cells)
        extra = np.zeros((self.aux_tokens, k), maps.dtype) if aux is None else np.asarray(aux, maps.dtype)
        extra = np.broadcast_to(extra, (b, self.aux_tokens, k))
        parts = (extra, cells) if self.aux_position == "first" else (cells, extra)
        return np.ascontiguousarray(np.concatenate(parts, axis=1))

    # ----------------------------------------------------------------------------- metadata
    def to_props(self) -> dict[str, str]:
        """``metadata_props`` entries (without the ``scorecam.`` prefix); none for a plain NCHW layout."""
        if self.kind == NCHW and self.grid is None:
            return {}
        props = {"layout": self.kind, "channel_axis": str(self.channel_axis)}
        if self.grid is not None:
            props["grid"] = json.dumps(list(self.grid))
        if self.kind == NLC:
            props["aux_tokens"] = str(self.aux_tokens)
            props["aux_position"] = self.aux_position
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "model") -> Layout:
        """Parse what :meth:`to_props` wrote (keys without prefix); no ``layout`` key: NCHW (older bundles)."""
        if "layout" not in props:
            return cls()
        try:
            grid = json.loads(props["grid"]) if "grid" in props else None
            if grid is not None and not (isinstance(grid, list) and len(grid) == 2
                                         and all(type(v) is int for v in grid)):
                raise LayoutError(f"grid must be [h, w] (two whole numbers), got {props['grid'][:40]!r}")
            aux = props.get("aux_tokens", "0")
            if not aux.isdigit():
                raise LayoutError(f"aux_tokens must be a whole number, got {aux[:20]!r}")
            layout = cls(props["layout"], tuple(grid) if grid else None, int(aux), props.get("aux_position", "first"))
        except (LayoutError, ValueError) as e:
            raise LayoutError(f"{source}: bad layout metadata ({e})") from None
        if "channel_axis" in props and props["channel_axis"] != str(layout.channel_axis):
            raise LayoutError(f"{source}: layout {layout.kind} has its channels on axis {layout.channel_axis}, "
                              f"the metadata says {props['channel_axis'][:10]!r}")
        return layout


# ------------------------------------------------------------------------------- inference


def grid_family(grids: Iterable[Grid], input_size: Grid) -> set[Grid]:
    """The image's grids: ``input_size``, the ``grids`` given (the outputs of convolutions and poolings),
    and every grid reached from them by halving (rounded up or down, as stride-2 steps and patch merges
    make them: 14 -> 7 -> 4 or 3)."""
    out: set[Grid] = set()
    todo = [tuple(input_size), *[tuple(g) for g in grids]]
    while todo:
        h, w = todo.pop()
        if (h, w) in out or h < 1 or w < 1:
            continue
        out.add((h, w))
        if h > 1 or w > 1:
            todo += [(-(-h // 2), -(-w // 2)), (max(h // 2, 1), max(w // 2, 1))]
    return out


def is_grid(hw: Sequence[int | None], family: set[Grid]) -> bool:
    """Whether (h, w) is one of the image's grids (h*w > 1)."""
    h, w = hw
    return h is not None and w is not None and h * w > 1 and (int(h), int(w)) in family


def split_tokens(tokens: int, grids: Sequence[Grid], family: set[Grid], input_size: Grid,
                 grid: Grid | None = None, aux: int | None = None, fallback: bool = True) -> tuple[Grid, int] | None:
    """((h, w), aux) with ``tokens = aux + h*w``, or None when no split fits.

    ``grid`` / ``aux`` given: checked (and the other one derived). Else the first of ``grids`` (the
    candidate grids, nearest the layer first: the patch embedding's output) with ``h*w <= T`` and fewer
    auxiliary tokens than cells (at most :data:`MAX_AUX`); else the fewest auxiliary tokens whose rest
    factors into a grid of the image's family with its aspect ratio (non-square inputs too; with
    ``fallback=False`` only ``grids`` are tried, unless ``aux`` is given).
    """
    if grid is not None:
        extra = tokens - grid[0] * grid[1]
        if extra < 0 or (aux is not None and extra != aux):
            return None
        return (int(grid[0]), int(grid[1])), extra
    for g in grids:
        extra = tokens - g[0] * g[1]
        if g[0] * g[1] > 1 and 0 <= extra <= MAX_AUX and extra < g[0] * g[1] and (aux is None or extra == aux):
            return (int(g[0]), int(g[1])), extra
    if aux is None and not fallback:
        return None
    tries = [aux] if aux is not None else range(0, min(MAX_AUX, tokens - 2) + 1)
    ih, iw = input_size
    for extra in tries:
        n = tokens - extra
        if n < 2:
            continue
        best = None
        for h in range(1, n + 1):
            if n % h:
                continue
            w = n // h
            if (h, w) not in family:
                continue
            off = abs(math.log((ih / h) / (iw / w)))  # the two strides should agree
            if best is None or off < best[0]:
                best = (off, (h, w))
        if best is not None and best[0] < math.log(1.5):
            return best[1], extra
    return None


__all__ = ["AUX_POSITIONS", "LAYOUTS", "Layout", "LayoutError", "NCHW", "NHWC", "NLC", "grid_family", "is_grid",
           "split_tokens"]
