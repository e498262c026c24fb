"""What a detector's outputs mean, in pure numpy: proposals, detections, and the D-RISE similarity.

Head kinds (boxes always in the network input's pixels, ``x0, y0, x1, y1``):

========== =========================================== ===============================================
``yolo8``  one output [B, 4+C, N] (Ultralytics v8/v11,    rows cx, cy, w, h, then C class scores
           YOLO-NAS style raw head, no objectness)        (sigmoid, in [0,1])
``yolo5``  one output [B, N, 5+C] (Ultralytics v5/v7)     cx, cy, w, h, objectness, C class scores
``boxes``  boxes [N,4] (or [1,N,4]) + scores [N] +        after NMS (torchvision SSD / RetinaNet /
           labels [N], or boxes + scores [N,C]             Faster R-CNN exports); or every proposal with
                                                           its class-score vector (NMS not in the graph)
========== =========================================== ===============================================

Each proposal ``d`` has a box ``b_d``, a class vector ``p_d`` and, for ``yolo5``, an objectness ``o_d``.
The D-RISE similarity (Petsiuk et al. 2021) of a masked image to a target detection ``(b, p)`` is

    s = max_d IoU(b, b_d) * cos(p, p_d) * o_d        (o_d = 1 without objectness)

Heads without objectness give class scores that do not sum to one and have no background class, so a
proposal that sees nothing (every score near 0) would still point the same way as the target; their class
vector gets the background component D-RISE's softmax heads have, ``p~ = [p_1 .. p_C, 1 - max_c p_c]``
(after NMS, with only a label and a score: ``[score at the label, 1 - score]``). A target given as a box and
a class has ``p = one-hot(class)`` (background 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("yolo8", "yolo5", "boxes")


@dataclass(frozen=True)
class Head:
    """How to read a detector's outputs."""

    kind: str
    outputs: tuple[str, ...]  # yolo: (out,); boxes: (boxes, scores) or (boxes, scores, labels)
    num_classes: int | None = None  # C (None after NMS when no labels say it)
    label_offset: int = 0  # subtracted from a label to index ``labels`` (torchvision's COCO: 0 is background)

    @property
    def objectness(self) -> bool:
        return self.kind == "yolo5"

    @property
    def nms_in_graph(self) -> bool:
        return self.kind == "boxes" and len(self.outputs) == 3


@dataclass
class Proposals:
    """The proposals of one image: boxes [N,4] xyxy, class vectors [N,D], objectness [N] or None, and
    ``labels`` [N] / ``scores`` [N] (the detection score: objectness x best class score where there is one)."""

    boxes: np.ndarray
    vectors: np.ndarray | None  # None after NMS: the vector is (label, score), see :func:`cosine`
    objectness: np.ndarray | None
    labels: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class Target:
    """One box to explain: its box (network pixels), class, class vector and score on the image."""

    box: np.ndarray  # [4] xyxy, network input pixels
    class_index: int
    vector: np.ndarray | None  # [D] (None after NMS: one-hot at class_index scaled by score)
    score: float = 1.0


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    """``cx, cy, w, h`` -> ``x0, y0, x1, y1`` along the last axis."""
    b = np.asarray(b, np.float64)
    half = b[..., 2:4] / 2
    return np.concatenate([b[..., 0:2] - half, b[..., 0:2] + half], axis=-1)


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box [4] with boxes [..., 4] (0 where the union is empty)."""
    box = np.asarray(box, np.float64)
    boxes = np.asarray(boxes, np.float64)
    w = np.clip(np.minimum(box[2], boxes[..., 2]) - np.maximum(box[0], boxes[..., 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[..., 3]) - np.maximum(box[1], boxes[..., 1]), 0, None)
    inter = w * h
    area = max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
    areas = np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(boxes[..., 3] - boxes[..., 1], 0, None)
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def with_background(p: np.ndarray) -> np.ndarray:
    """``[p_1 .. p_C, 1 - max_c p_c]`` along the last axis (class scores without a background class)."""
    p = np.clip(np.nan_to_num(np.asarray(p, np.float64)), 0.0, 1.0)
    return np.concatenate([p, 1.0 - p.max(axis=-1, keepdims=True, initial=0.0)], axis=-1)


def _flat(a: np.ndarray, rank: int) -> np.ndarray:
    """``a`` without a leading batch axis of 1 when it has one rank too many."""
    a = np.asarray(a)
    return a[0] if a.ndim == rank + 1 and a.shape[0] == 1 else a


def decode_batch(head: Head, arrays: list[np.ndarray]) -> list[Proposals]:
    """The proposals of each image in one run's outputs (``arrays`` in the order of ``head.outputs``)."""
    if head.kind in ("yolo8", "yolo5"):
        out = np.nan_to_num(np.asarray(arrays[0], np.float64))
        if head.kind == "yolo8":
            out = out.transpose(0, 2, 1)  # [B,N,4+C]
            probs = out[..., 4:]
            obj = None
        else:
            probs = out[..., 5:]
            obj = np.clip(out[..., 4], 0.0, 1.0)
        boxes = cxcywh_to_xyxy(out[..., :4])
        labels = probs.argmax(axis=-1) if probs.shape[-1] else np.zeros(probs.shape[:-1], np.int64)
        best = probs.max(axis=-1, initial=0.0)
        scores = best * obj if obj is not None else best
        vectors = probs if obj is not None else with_background(probs)
        return [Proposals(boxes[i], vectors[i], None if obj is None else obj[i], labels[i], scores[i])
                for i in range(out.shape[0])]
    boxes = np.nan_to_num(_flat(arrays[0], 2).astype(np.float64)).reshape(-1, 4)
    scores = np.nan_to_num(np.asarray(arrays[1], np.float64))
    if len(arrays) == 3:  # after NMS: a label and a score per detection
        s = _flat(scores, 1).reshape(-1)
        labels = _flat(np.asarray(arrays[2]), 1).reshape(-1).astype(np.int64)
        return [Proposals(boxes, None, None, labels, np.clip(s, 0.0, 1.0))]
    probs = np.clip(_flat(scores, 2).reshape(boxes.shape[0], -1), 0.0, 1.0)
    return [Proposals(boxes, with_background(probs), None, probs.argmax(axis=-1), probs.max(axis=-1, initial=0.0))]


def cosine(target: Target, props: Proposals) -> np.ndarray:
    """``cos(p~_t, p~_d)`` [N] for every proposal (module doc; 0 for a zero vector)."""
    if props.vectors is None:  # after NMS: p~ = [s at the label, 1 - s]
        s = props.scores
        st = float(target.score) if target.vector is None else float(target.vector[target.class_index])
        same = (props.labels == target.class_index).astype(np.float64)
        num = st * s * same + (1 - st) * (1 - s)
        den = np.sqrt(st * st + (1 - st) ** 2) * np.sqrt(s * s + (1 - s) ** 2)
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    v = target.vector if target.vector is not None else None
    if v is None or v.shape[0] != props.vectors.shape[1]:
        v = np.zeros(props.vectors.shape[1])
        v[target.class_index] = 1.0
    num = props.vectors @ v
    den = np.linalg.norm(props.vectors, axis=1) * np.linalg.norm(v)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def similarity(targets: list[Target], props: Proposals) -> np.ndarray:
    """D-RISE ``max_d IoU(b, b_d) cos(p, p_d) o_d`` [T] of one image's proposals for each target (0 when
    it has none)."""
    out = np.zeros(len(targets))
    if not len(props):
        return out
    for t, target in enumerate(targets):
        s = iou(target.box, props.boxes) * cosine(target, props)
        if props.objectness is not None:
            s = s * props.objectness
        out[t] = float(np.clip(s.max(), 0.0, 1.0))
    return out


def similarities(head: Head, targets: list[Target], arrays: list[np.ndarray], n: int) -> np.ndarray:
    """[n, T] similarities of the ``n`` masked images of one chunk (the engine's ``reduce``)."""
    props = decode_batch(head, arrays)
    if len(props) < n:
        raise ValueError(f"the detector returned {len(props)} results for {n} images")
    return np.stack([similarity(targets, p) for p in props[:n]])


def nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by class-aware greedy non-maximum suppression, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(scores.shape[0], bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        same = labels == labels[i]
        suppressed |= same & (iou(boxes[i], boxes) > iou_threshold)
    return np.asarray(keep, np.int64)


def detections(head: Head, props: Proposals, score_threshold: float, iou_threshold: float) -> np.ndarray:
    """Indices of the proposals that are detections, best first: score >= threshold, then NMS (unless the
    graph did it), boxes with a positive area only."""
    b = props.boxes
    ok = (props.scores >= score_threshold) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    idx = np.flatnonzero(ok)
    if head.nms_in_graph:
        return idx[np.argsort(-props.scores[idx], kind="stable")]
    kept = nms(b[idx], props.scores[idx], props.labels[idx], iou_threshold)
    return idx[kept]


def target_of(props: Proposals, i: int) -> Target:
    """The target for proposal ``i`` of the image itself."""
    vec = None if props.vectors is None else props.vectors[i].copy()
    return Target(props.boxes[i].copy(), int(props.labels[i]), vec, float(props.scores[i]))
