"""What the development studies (``bench.multilayer_rules``, ``bench.insertion_study``) record per map."""

from __future__ import annotations

import numpy as np


def measure_maps(meter, x: np.ndarray, class_index: int, maps: dict[str, np.ndarray], image: str, steps: int,
                 boxes=None, shape: tuple[int, int] | None = None) -> list[dict]:
    """One row per map of ``maps``: insertion, deletion and LeRF-MoRF AUCs on the zero substrate (``steps``
    steps, :meth:`runtime.metrics.Metrics.curves`) and the energy pointing game on ``boxes`` (image ``shape``;
    None without boxes)."""
    from runtime.metrics import energy_pointing_game

    rows = []
    for name, sal in maps.items():
        cur = meter.curves(x, sal, class_index, steps=steps)
        e = energy_pointing_game(sal, np.asarray(boxes), shape) if boxes is not None else None
        rows.append({"image": image, "map": name, "ins": cur.insertion_auc, "dele": cur.deletion_auc,
                     "gap": cur.gap, "epg": e})
    return rows
