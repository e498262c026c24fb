"""Long-run check: many explanations in one process; resident memory and open files must not grow.

``python -m tests.soak --n 1000`` explains ``n`` images with ``max_channels=16`` on a tiny bundle (or
``--model PATH``): mixed sizes (16x16 to 640x480) and kinds (PNG, JPEG, WebP, BMP, GIF, TIFF files,
file objects, PIL images, arrays; grayscale, palette, RGBA), top-1 to top-3, and prints one JSON line:
RSS (MiB) and the number of open file descriptors after every 100th explanation.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = (("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("BMP", ".bmp"), ("GIF", ".gif"), ("TIFF", ".tif"))
SIZES = ((16, 16), (31, 47), (224, 224), (480, 640), (97, 13), (300, 200), (64, 64))
MODES = ("RGB", "L", "P", "RGBA")


def rss_mib() -> float:
    """Resident set size of this process, MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def make_inputs(directory: Path, seed: int = 0) -> list:
    """56 inputs: every size x format as a file (modes rotating; every 7th read as bytes), plus an RGB
    array and a grayscale PIL image per size."""
    rng = np.random.default_rng(seed)
    out: list = []
    for i, (h, w) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([255 * xx / max(w - 1, 1), 255 * yy / max(h - 1, 1), rng.uniform(0, 255, (h, w))], -1)
        rgb = Image.fromarray(base.astype(np.uint8))
        for j, (fmt, ext) in enumerate(FORMATS):
            mode = MODES[(i + j) % len(MODES)]
            img = rgb.convert(mode)
            if fmt == "JPEG" and mode in ("P", "RGBA"):
                img = rgb
            path = directory / f"img{i}_{j}{ext}"
            img.save(path, fmt)
            out.append(path)
        out.append(np.asarray(rgb))  # an RGB array
        out.append(rgb.convert("L"))  # a PIL image
    for k in range(0, len(out), 7):  # some as open binary file objects (bytes in memory)
        if isinstance(out[k], Path):
            out[k] = ("bytes", out[k].read_bytes())
    return out


def soak(model, n: int = 1000, max_channels: int = 16, every: int = 100) -> dict:
    from runtime import Explainer

    ex = Explainer(model, device="cpu", max_channels=max_channels)
    with tempfile.TemporaryDirectory(prefix="scorecam-soak-") as tmp:
        inputs = make_inputs(Path(tmp))
        marks: list[dict] = []
        for i in range(1, n + 1):
            item = inputs[i % len(inputs)]
            src = io.BytesIO(item[1]) if isinstance(item, tuple) else item
            results = ex.explain(src, top_k=1 + i % 3)
            assert all(np.isfinite(r.saliency).all() for r in results)
            if i % every == 0:
                marks.append({"n": i, "rss_mib": round(rss_mib(), 2), "fds": open_fds()})
    return {"n": n, "max_channels": max_channels, "inputs": len(inputs), "marks": marks}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="explanations (default 1000)")
    p.add_argument("--model", default=None, help="a bundle or .onnx (default: a tiny bundle made here)")
    p.add_argument("--max-channels", type=int, default=16)
    args = p.parse_args(argv)
    model = args.model
    if model is None:
        from tests.bundles import make_bundle

        model = make_bundle(Path(tempfile.mkdtemp(prefix="scorecam-soak-bundle-")) / "b", size=48, channels=32)
    print(json.dumps(soak(model, args.n, args.max_channels)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
