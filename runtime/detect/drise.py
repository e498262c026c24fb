"""D-RISE (Petsiuk et al. 2021) on our engine: random masks, each weighted by the D-RISE similarity to the box.

``map = sum_i s_i M_i / (n p)``, ``M_i`` RISE's masks (:func:`runtime.methods.rise_masks`: binary cells x cells
grids, upsampled and shifted), ``s_i`` the similarity of the masked image ``x * M_i`` to the target
(:func:`runtime.detect.heads.similarity`), scored in batches through the plain detector session: memory
O(batch), never O(n). The reference method Score-CAM for a box is measured against (runtime.evaluate).
"""

from __future__ import annotations

import numpy as np

from ..scorecam import minmax
from .heads import Target, similarities


def masked_similarity(explainer, images: np.ndarray, targets: list[Target]) -> np.ndarray:
    """[B,T] similarities of preprocessed inputs [B,3,H,W] to each target, in chunks of the batch size."""
    engine = explainer.engine
    sess = engine.classifier
    head = explainer.head
    bs = max(1, int(explainer.batch_size))
    out = []
    for start in range(0, images.shape[0], bs):
        chunk = np.ascontiguousarray(images[start:start + bs], np.float32)
        arrays = sess.run(list(head.outputs), {engine.input_name: chunk})
        out.append(similarities(head, targets, arrays, chunk.shape[0]))
    return np.concatenate(out) if out else np.zeros((0, len(targets)))


def drise_map(explainer, x: np.ndarray, target: Target, n: int = 4000, cells: int = 16, p: float = 0.5,
              seed: int = 0) -> np.ndarray:
    """The D-RISE saliency [H,W] in [0,1] of one box (module doc)."""
    from ..methods import rise_masks

    size = tuple(np.shape(x)[-2:])
    bs = max(1, int(explainer.batch_size))
    total = np.zeros(size, np.float64)
    for start in range(0, n, bs):  # mask i from its own generator (seed, i): the same masks whatever the batch
        m = rise_masks(seed, start, min(start + bs, n), size, cells, p)
        s = masked_similarity(explainer, x * m[:, None], [target])[:, 0]
        total += np.tensordot(s, m, axes=1)
    return minmax((total / (n * p)).astype(np.float32))
