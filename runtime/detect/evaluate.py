"""Faithfulness of box explanations: deletion / insertion on the box's D-RISE similarity, energy pointing game.

For a target box (one of the model's detections), a saliency ``S`` over the network input and the input ``x``:
pixels ranked by ``S`` (descending, stable ties, :func:`runtime.metrics.pixel_ranks`); deletion replaces the
top ``n_j`` pixels by the substrate (``zero`` in input space, or ``blur``), insertion starts from the substrate
and restores them; the curve is the similarity of each perturbed image to the target (:mod:`.heads`), its AUC
the trapezoid rule over the fraction of pixels (:func:`runtime.metrics.auc`). Energy pointing game: share of
``S`` inside the box. Methods, in one run on one engine: ``scorecam`` (the explainer as configured),
``faster`` (``n`` channels, kernel fill), ``drise`` (``runtime.methods``), ``random`` and ``center`` baselines;
each timed.

    python -m runtime.evaluate DETECTOR IMAGES... --methods scorecam drise random    (routed here)
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np

from .. import metrics
from ..methods import parse_method
from .heads import Target, decode_batch, detections, target_of

DEFAULT_METHODS = ("scorecam", "drise", "random")


@dataclass
class BoxRow:
    """One method on one box."""

    image: str
    method: str
    detection: int
    label: str
    seconds: float
    values: dict = field(default_factory=dict)
    saliency: np.ndarray | None = None


def box_curves(explainer, x: np.ndarray, target: Target, saliency: np.ndarray, steps: int = 50,
               substrate: str = "zero") -> metrics.Curves:
    """Deletion and insertion curves of ``saliency`` [H,W] for ``target`` (module doc)."""
    from .drise import masked_similarity

    sub = metrics.substrate_of(x, substrate)
    ranks = metrics.pixel_ranks(saliency)
    counts = metrics.step_counts(ranks.size, steps)
    curves = {}
    for kind, start, fill in (("deletion", x, sub), ("insertion", sub, x)):
        vals = []
        bs = 16
        for i in range(0, counts.size, bs):
            n = counts[i:i + bs]
            first = (ranks[None] < n[:, None, None])[:, None]  # [b,1,H,W]
            batch = np.where(first, fill, start).astype(np.float32)
            vals.append(masked_similarity(explainer, batch, [target])[:, 0])
        curves[kind] = np.concatenate(vals)
    return metrics.Curves(counts / ranks.size, curves["deletion"], curves["insertion"])


def _variant(explainer, max_channels=None, fill="zero"):
    ex = copy.copy(explainer)
    ex.max_channels = int(max_channels) if max_channels else None
    ex.fill = fill
    return ex


def saliency_of(method: str, explainer, image, x: np.ndarray, target: Target, rank: int) -> np.ndarray:
    """The map [H,W] of ``method`` (``name[:key=value]...``) for detection ``rank`` of ``image``."""
    name, *parts = method.split(":")
    params = dict(p.split("=", 1) for p in parts if "=" in p)
    if name == "scorecam":
        return explainer.explain(image, detection=rank)[0].saliency
    if name == "faster":
        ex = _variant(explainer, int(params.get("n", 16)), params.get("fill", "kernel"))
        return ex.explain(image, detection=rank)[0].saliency
    m, p = parse_method(method)
    if m.task != "detect" and not m.baseline:
        raise ValueError(f"method {name!r} explains classifiers; for detectors use scorecam, faster, drise, random or "
                         "center")
    return np.clip(np.nan_to_num(np.asarray(m.fn(explainer, x, target, **p), np.float32)), 0, 1)


def evaluate_boxes(explainer, samples, methods=DEFAULT_METHODS, top_k: int = 1, steps: int = 50,
                   substrate: str = "zero", progress=None) -> list[BoxRow]:
    """Every method on the ``top_k`` detections of each (name, image) in ``samples``."""
    rows: list[BoxRow] = []
    for name, image in samples:
        _, x, _ = explainer.prepare(image)
        raw, _ = explainer._run(x)
        props = decode_batch(explainer.head, raw)[0]
        dets = detections(explainer.head, props, explainer.score_threshold, explainer.nms_iou)
        for rank in range(min(int(top_k), len(dets))):
            target = target_of(props, int(dets[rank]))
            for method in methods:
                t0 = time.perf_counter()
                sal = saliency_of(method, explainer, image, x, target, rank)
                seconds = time.perf_counter() - t0
                c = box_curves(explainer, x, target, sal, steps, substrate)
                rows.append(BoxRow(name, method, rank, explainer.label_of(target.class_index), seconds,
                                   {"insertion": c.insertion_auc, "deletion": c.deletion_auc,
                                    "pointing": metrics.energy_pointing_game(sal, [target.box])}, sal))
                if progress:
                    progress(f"{name} det{rank} {method}: insertion {rows[-1].values['insertion']:.3f}, "
                             f"pointing {rows[-1].values['pointing']:.3f}, {seconds:.2f}s")
    return rows


def summary(rows: list[BoxRow]) -> dict[str, dict[str, float]]:
    """Per method: mean of each value and of the seconds, and the number of boxes."""
    out: dict[str, dict[str, float]] = {}
    for m in dict.fromkeys(r.method for r in rows):
        sel = [r for r in rows if r.method == m]
        out[m] = {k: float(np.mean([r.values[k] for r in sel])) for k in sel[0].values}
        out[m]["seconds"] = float(np.median([r.seconds for r in sel]))
        out[m]["boxes"] = len(sel)
    return out


def markdown(summ: dict[str, dict[str, float]]) -> str:
    lines = ["| method | insertion AUC ↑ | deletion AUC ↓ | energy pointing game ↑ | s per box (median) | boxes |",
             "|---|---:|---:|---:|---:|---:|"]
    for m, v in summ.items():
        lines.append(f"| {m} | {v['insertion']:.3f} | {v['deletion']:.3f} | {v['pointing']:.3f} | "
                     f"{v['seconds']:.3f} | {int(v['boxes'])} |")
    return "\n".join(lines)
