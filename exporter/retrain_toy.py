"""``python -m exporter.retrain_toy``: train the toy model (seed 0) and rewrite ``exporter/toy_weights.npz``."""

from __future__ import annotations

import sys

from .toy import WEIGHTS, accuracy, make_dataset, save_weights, train_toy


def main() -> int:
    model = train_toy(seed=0)
    images, labels, _ = make_dataset(512, seed=123)
    save_weights(model)
    print(f"wrote {WEIGHTS} (held-out accuracy {accuracy(model, images, labels):.3f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
