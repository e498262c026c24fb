"""Faithfulness, localisation and sanity metrics of saliency maps (numpy + ONNX Runtime, no torch).

Everything is measured on the network's own input: ``x`` the preprocessed image [1,3,H,W], ``S``
the saliency [H,W] in [0,1] at the input size, ``c`` the class, ``p_c(.)`` the class probability
(softmax of the logits, or the model's own probabilities). Definitions, as torchcam 0.5.0 computes
them (``torchcam.metrics.ClassificationMetric`` / ``DeletionInsertionMetric``), so the numbers agree:

- Average Drop % = mean_i max(0, Y_c - O_c) / (Y_c + 1e-7) * 100 and Average Increase % = 100 *
  share of images with O_c > Y_c, where Y_c = p_c(x), O_c = p_c(S * x) (the map multiplies the
  preprocessed input). ``keep=0.5`` first zeroes all but the top 50 % pixels of ``S``.
- Deletion / insertion: pixels ranked by ``S`` (descending, stable ties); ``n_j`` = 0, s, 2s, ...,
  P with s = ceil(P / steps) (steps = 100: 1 % of the pixels per step). Deletion replaces the
  ``n_j`` top pixels by the substrate, insertion starts from the substrate and restores them; the
  curve is p_c at each step and its AUC is the trapezoid rule over the fraction n_j / P.
  Substrate ``zero`` (0 in input space, the paper; torchcam's default) or ``blur`` (the input blurred
  by an 11 x 11 Gaussian of sigma 5, RISE's insertion substrate).
- LeRF - MoRF gap: AUC of deleting the least relevant first minus AUC of deleting the most relevant
  first (higher is better); deletion alone rewards maps that break the image (rank by the gap).
- Energy-based pointing game: sum of S inside the object box(es) / sum of S.
- Sanity (Adebayo et al. 2018): Spearman rank correlation and SSIM between two maps.

The perturbed batches are made inside ONNX Runtime by two small graphs in front of the classifier
(``x * W_b`` and ``rank < n_b ? a : b``), so only a rank map and the step counts cross the bus.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .scorecam import softmax

DROP_EPS = 1e-7
SUBSTRATES = ("zero", "blur")
BLUR_KSIZE = 11
BLUR_SIGMA = 5.0

# ------------------------------------------------------------------------------- pure numpy parts


def step_counts(n_pixels: int, steps: int) -> np.ndarray:
    """Pixels perturbed at each point: 0, s, 2s, ..., then ``n_pixels``, with s = ceil(P / steps)."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = -(-int(n_pixels) // int(steps))
    return np.asarray([*range(0, int(n_pixels), s), int(n_pixels)], np.int64)


def pixel_ranks(saliency: np.ndarray, most_relevant_first: bool = True) -> np.ndarray:
    """Rank [H,W] of every pixel (0 = perturbed first), ties kept in raster order (stable sort)."""
    flat = np.asarray(saliency, np.float32).ravel()
    order = np.argsort(-flat if most_relevant_first else flat, kind="stable")
    ranks = np.empty(flat.size, np.int64)
    ranks[order] = np.arange(flat.size)
    return ranks.reshape(np.shape(saliency))


def auc(curve: np.ndarray, fractions: np.ndarray) -> float:
    """Trapezoid-rule area under ``curve`` over ``fractions`` (the last axis)."""
    c = np.asarray(curve, np.float64)
    f = np.asarray(fractions, np.float64)
    return np.sum((c[..., 1:] + c[..., :-1]) * np.diff(f) / 2.0, axis=-1)


def keep_top(saliency: np.ndarray, fraction: float) -> np.ndarray:
    """``S`` with all but its top ``fraction`` of pixels (by rank) set to 0."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the kept fraction must be in (0, 1], got {fraction}")
    s = np.asarray(saliency, np.float32)
    n = int(round(fraction * s.size))
    return np.where(pixel_ranks(s) < n, s, np.float32(0)).astype(np.float32)


def drop_and_increase(y: np.ndarray, o: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: drop = max(0, Y - O) / (Y + 1e-7) (a fraction) and increase = O > Y."""
    y = np.asarray(y, np.float64)
    o = np.asarray(o, np.float64)
    return np.maximum(y - o, 0.0) / (y + DROP_EPS), o > y


def box_mask(shape: tuple[int, int], boxes, image_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean [H,W]: the union of ``boxes`` (x0, y0, x1, y1; x1, y1 exclusive).

    Boxes are in pixels of an image of ``image_shape`` (h, w), default ``shape``; they are scaled to
    ``shape`` with the pixel-area convention (a pixel belongs when its centre is inside).
    """
    h, w = int(shape[0]), int(shape[1])
    ih, iw = image_shape if image_shape is not None else (h, w)
    sy, sx = h / ih, w / iw
    ys = (np.arange(h) + 0.5) / sy
    xs = (np.arange(w) + 0.5) / sx
    mask = np.zeros((h, w), bool)
    for b in np.asarray(boxes, np.float64).reshape(-1, 4):
        x0, y0, x1, y1 = b
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"a box must have x1 > x0 and y1 > y0, got {list(b)}")
        mask |= ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    return mask


def energy_pointing_game(saliency: np.ndarray, boxes, image_shape: tuple[int, int] | None = None) -> float:
    """Share of the saliency energy inside the box(es): sum(S * inside) / sum(S) (0 for an empty map)."""
    s = np.clip(np.nan_to_num(np.asarray(saliency, np.float64)), 0, None)
    total = s.sum()
    if total <= 0:
        return 0.0
    return float((s * box_mask(s.shape, boxes, image_shape)).sum() / total)


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n of the flattened ``a``, ties given their average rank (``scipy.stats.rankdata``)."""
    flat = np.asarray(a, np.float64).ravel()
    order = np.argsort(flat, kind="stable")
    sorted_ = flat[order]
    starts = np.r_[True, sorted_[1:] != sorted_[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    counts = np.diff(np.r_[first, flat.size])
    avg = first + (counts + 1) / 2.0  # mean of the 1-based ranks first+1 .. first+count
    ranks = np.empty(flat.size, np.float64)
    ranks[order] = avg[group]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (Pearson of their average ranks); NaN if one is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _gaussian_filter(img: np.ndarray, sigma: float, truncate: float) -> np.ndarray:
    """Separable Gaussian filter, mirror ('reflect', edge sample repeated) borders."""
    r = int(truncate * sigma + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    p = np.pad(img, r, mode="symmetric")
    h, w = img.shape
    tmp = sum(k[i] * p[i:i + h, :] for i in range(2 * r + 1))
    return sum(k[i] * tmp[:, i:i + w] for i in range(2 * r + 1))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> float:
    """Mean structural similarity (Wang et al. 2004) with an 11 x 11 Gaussian window (sigma 1.5).

    SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)), C1 = (k1 L)^2,
    C2 = (k2 L)^2, local moments from the Gaussian window; averaged over the map less a border of the
    window radius (``skimage.metrics.structural_similarity(gaussian_weights=True,
    use_sample_covariance=False)``).
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"SSIM needs two 2-D maps of one shape, got {a.shape} and {b.shape}")
    truncate = 3.5
    g = lambda m: _gaussian_filter(m, sigma, truncate)  # noqa: E731
    mu_a, mu_b = g(a), g(b)
    vaa = g(a * a) - mu_a * mu_a
    vbb = g(b * b) - mu_b * mu_b
    vab = g(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * vab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (vaa + vbb + c2))
    pad = int(truncate * sigma + 0.5)
    if min(a.shape) > 2 * pad:
        s = s[pad:-pad, pad:-pad]
    return float(s.mean())


def blur(x: np.ndarray, ksize: int = BLUR_KSIZE, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """The input [1,3,H,W] blurred per channel by a ``ksize`` x ``ksize`` Gaussian (RISE's substrate)."""
    import cv2

    chans = [cv2.GaussianBlur(np.ascontiguousarray(c, np.float32), (ksize, ksize), sigma,
                              borderType=cv2.BORDER_REFLECT_101) for c in np.asarray(x, np.float32)[0]]
    return np.stack(chans)[None].astype(np.float32)


def substrate_of(x: np.ndarray, kind: str) -> np.ndarray:
    """The substrate [1,3,H,W] that deleted pixels become: ``zero`` or ``blur``."""
    if kind == "zero":
        return np.zeros_like(x, dtype=np.float32)
    if kind == "blur":
        return blur(x)
    raise ValueError(f"unknown substrate {kind!r}; choose one of {', '.join(SUBSTRATES)}")


# ---------------------------------------------------------------------------- the ONNX graphs

_IMAGE = "metric_image"
_WEIGHT = "metric_weight"
_FILL = "metric_fill"
_RANK = "metric_rank"
_COUNT = "metric_count"


def _front(classifier: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           input_name: str) -> onnx.ModelProto:
    """The classifier with ``nodes`` (writing ``input_name``) in front and ``inputs`` as its inputs."""
    model = onnx.ModelProto()
    model.CopyFrom(classifier)
    g = model.graph
    if input_name not in {i.name for i in g.input}:
        raise ValueError(f"the classifier has no input named {input_name!r}")
    kept = [i for i in g.input if i.name != input_name]
    del g.input[:]
    g.input.extend([*inputs, *kept])
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old)
    return model


def product_graph(classifier: onnx.ModelProto, size: tuple[int, int], input_name: str) -> onnx.ModelProto:
    """``f(IMAGE [1,3,H,W] * WEIGHT [B,1,H,W])``: the explanation map applied to the input."""
    h, w = size
    f = TensorProto.FLOAT
    return _front(classifier, [helper.make_node("Mul", [_IMAGE, _WEIGHT], [input_name])],
                  [helper.make_tensor_value_info(_IMAGE, f, [1, 3, h, w]),
                   helper.make_tensor_value_info(_WEIGHT, f, ["B", 1, h, w])], input_name)


def perturb_graph(classifier: onnx.ModelProto, size: tuple[int, int], input_name: str) -> onnx.ModelProto:
    """``f(RANK < COUNT_b ? FILL : IMAGE)``: the ``COUNT_b`` first-ranked pixels take the fill.

    Deletion: IMAGE = x, FILL = substrate; insertion: IMAGE = substrate, FILL = x.
    """
    h, w = size
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Less", [_RANK, _COUNT], ["metric/first"]),
             helper.make_node("Where", ["metric/first", _FILL, _IMAGE], [input_name])]
    return _front(classifier, nodes,
                  [helper.make_tensor_value_info(_IMAGE, f, [1, 3, h, w]),
                   helper.make_tensor_value_info(_FILL, f, [1, 3, h, w]),
                   helper.make_tensor_value_info(_RANK, f, [1, 1, h, w]),
                   helper.make_tensor_value_info(_COUNT, f, ["B", 1, 1, 1])], input_name)


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _session(engine, kind: str):
    """The engine's session of the ``product`` or ``perturb`` graph (built once per engine)."""
    cache = _SESSIONS.setdefault(engine, {})
    if kind not in cache:
        name = engine.input_name
        build = product_graph if kind == "product" else perturb_graph
        data = build(engine.classifier_proto, engine.input_size, name).SerializeToString()
        cache[kind] = engine.session(data, f"{kind} metric graph")
    return cache[kind]


# ------------------------------------------------------------------------------- the runner


@dataclass
class Curves:
    """Deletion (MoRF), insertion and LeRF-deletion curves of one map, and their AUCs."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    lerf: np.ndarray | None = None

    @property
    def deletion_auc(self) -> float:
        return float(auc(self.deletion, self.fractions))

    @property
    def insertion_auc(self) -> float:
        return float(auc(self.insertion, self.fractions))

    @property
    def lerf_auc(self) -> float:
        return float(auc(self.lerf, self.fractions)) if self.lerf is not None else float("nan")

    @property
    def gap(self) -> float:
        """LeRF - MoRF deletion AUC (higher is better)."""
        return self.lerf_auc - self.deletion_auc


class Metrics:
    """Metrics computed through one engine's ONNX Runtime sessions.

    Args:
        engine: a :class:`runtime.engine.Engine` (``Explainer(...).engine``).
        probabilities: the classifier already outputs probabilities (no softmax).
        batch_size: inputs per run (None: the engine's default).
    """

    def __init__(self, engine, probabilities: bool = False, batch_size: int | None = None) -> None:
        self.engine = engine
        self.probabilities = probabilities
        self.batch_size = int(batch_size or engine.default_batch_size())

    @classmethod
    def of(cls, explainer, batch_size: int | None = None) -> Metrics:
        return cls(explainer.engine, explainer.meta.output_kind == "probabilities",
                   batch_size or explainer.batch_size)

    def _probs(self, out: np.ndarray, c: int) -> np.ndarray:
        out = np.asarray(out, np.float64)
        return (out if self.probabilities else softmax(out, axis=1))[:, c]

    def probability(self, x: np.ndarray, c: int) -> float:
        """p_c(x) of one input [1,3,H,W]."""
        return float(self._probs(self.engine.classify(x), c)[0])

    def masked_probability(self, x: np.ndarray, maps: np.ndarray, c: int) -> np.ndarray:
        """p_c(W_b * x) for every map W_b in ``maps`` [B,H,W] (one run per chunk)."""
        sess = _session(self.engine, "product")
        out_name = sess.get_outputs()[0].name
        x = np.ascontiguousarray(x, np.float32)
        w = np.ascontiguousarray(np.asarray(maps, np.float32)[:, None])
        outs = [sess.run([out_name], {_IMAGE: x, _WEIGHT: w[i:i + self.batch_size]})[0]
                for i in range(0, w.shape[0], self.batch_size)]
        return self._probs(np.concatenate(outs), c)

    def average_drop(self, x: np.ndarray, saliency: np.ndarray, c: int,
                     keep: float | None = None) -> tuple[float, bool]:
        """(drop as a fraction, increase) of one image and map; ``keep`` keeps only the top pixels."""
        s = np.asarray(saliency, np.float32)
        if keep is not None:
            s = keep_top(s, keep)
        y = self.probability(x, c)
        o = self.masked_probability(x, s[None], c)[0]
        d, inc = drop_and_increase(y, o)
        return float(d), bool(inc)

    def _perturbed(self, image: np.ndarray, fill: np.ndarray, ranks: np.ndarray, counts: np.ndarray,
                   c: int) -> np.ndarray:
        sess = _session(self.engine, "perturb")
        out_name = sess.get_outputs()[0].name
        feeds = {_IMAGE: np.ascontiguousarray(image, np.float32),
                 _FILL: np.ascontiguousarray(fill, np.float32),
                 _RANK: np.ascontiguousarray(ranks, np.float32).reshape(1, 1, *ranks.shape)}
        cnt = np.asarray(counts, np.float32).reshape(-1, 1, 1, 1)
        outs = [sess.run([out_name], {**feeds, _COUNT: cnt[i:i + self.batch_size]})[0]
                for i in range(0, cnt.shape[0], self.batch_size)]
        return self._probs(np.concatenate(outs), c)

    def deletion_curve(self, x: np.ndarray, ranks: np.ndarray, c: int, counts: np.ndarray,
                       substrate: np.ndarray) -> np.ndarray:
        """p_c with the ``n_j`` first-ranked pixels replaced by the substrate, for each count."""
        return self._perturbed(x, substrate, ranks, counts, c)

    def insertion_curve(self, x: np.ndarray, ranks: np.ndarray, c: int, counts: np.ndarray,
                        substrate: np.ndarray) -> np.ndarray:
        """p_c of the substrate with the ``n_j`` first-ranked pixels restored, for each count."""
        return self._perturbed(substrate, x, ranks, counts, c)

    def curves(self, x: np.ndarray, saliency: np.ndarray, c: int, steps: int = 100,
               substrate: str = "zero", insertion_substrate: str | None = None,
               lerf: bool = True) -> Curves:
        """Deletion, insertion (and LeRF deletion) curves of one map, ``steps`` points apart."""
        s = np.asarray(saliency, np.float32)
        counts = step_counts(s.size, steps)
        fractions = counts.astype(np.float32) / np.float32(s.size)  # float32, as torchcam
        sub_del = substrate_of(x, substrate)
        sub_ins = sub_del if insertion_substrate in (None, substrate) else substrate_of(x, insertion_substrate)
        morf = pixel_ranks(s, True)
        dele = self.deletion_curve(x, morf, c, counts, sub_del)
        ins = self.insertion_curve(x, morf, c, counts, sub_ins)
        le = self.deletion_curve(x, pixel_ranks(s, False), c, counts, sub_del) if lerf else None
        return Curves(fractions.astype(np.float64), dele, ins, le)


__all__ = ["Curves", "Metrics", "SUBSTRATES", "auc", "blur", "box_mask", "drop_and_increase",
           "energy_pointing_game", "keep_top", "pixel_ranks", "rankdata", "spearman", "ssim",
           "step_counts", "substrate_of"]
