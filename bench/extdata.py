"""Peak memory of a model whose weights sit beside the graph (torch's dynamo export: ``model.onnx`` +
``model.onnx.data``) against the same network exported as one file (torch's legacy exporter).

``python -m bench.extdata [--model resnet50] [--size 224] [--contender mc64] [--out DIR]`` exports a
torchvision classifier (random weights) both ways into DIR, derives each once (the cache warmed: the measured
run is a cache hit, as every run after the first), then measures, each alone in a fresh torch-free process
(:func:`bench.rss.measure`): the contender (an explanation end to end, see :mod:`bench.contenders`) on both
files, and a bare ONNX Runtime session of each derived classifier (the cache's ``model.onnx``, batch made
dynamic; loaded by path, one batch of 16): the yardstick of "the weights held once". Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from .rss import ROOT, measure

BARE = """
import json, sys
import numpy as np
import onnxruntime as ort
from bench.rss import peak_rss_mb
from runtime.engine import session_options
s = ort.InferenceSession(sys.argv[1], session_options(int(sys.argv[3])), providers=["CPUExecutionProvider"])
n = int(sys.argv[2])
s.run(None, {s.get_inputs()[0].name: np.random.default_rng(0).random((16, 3, n, n), dtype=np.float32)})
print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1)}))
"""


def export(name: str, size: int, out: Path) -> dict[str, Path]:
    """``out/dynamo/model.onnx`` (+ ``.data``) and ``out/legacy/model.onnx`` of torchvision ``name``."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    paths = {}
    for kind in ("dynamo", "legacy"):
        path = out / kind / "model.onnx"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (x,), str(path), dynamo=kind == "dynamo", input_names=["image"])
        paths[kind] = path
    return paths


def bare(path: Path, size: int, threads: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", BARE, str(path), str(size), str(threads)], capture_output=True,
                         text=True, env=env, cwd=str(ROOT), timeout=1800)
    if out.returncode:
        raise RuntimeError(f"the bare session of {path} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.extdata", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="a torchvision classifier (default resnet50)")
    p.add_argument("--size", type=int, default=224, help="input size (default 224)")
    p.add_argument("--contender", default="mc64", help="what is measured (bench.contenders; default mc64)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "scorecam-bench-extdata"),
                   help="where the exports go (default: a folder in the temporary directory)")
    args = p.parse_args(argv)
    from runtime import Explainer

    from .contenders import Context

    paths = export(args.model, args.size, Path(args.out))
    image = ROOT / "samples" / "chelsea.png"
    result: dict = {"model": args.model, "size": args.size, "contender": args.contender, "threads": args.threads,
                    "files_mb": {k: round(sum(f.stat().st_size for f in v.parent.iterdir()) / 2**20, 1)
                                 for k, v in paths.items()}}
    for kind, path in paths.items():
        derived = Explainer(path, device="cpu", threads=args.threads).bundle.model_path  # the cache is warm now
        ctx = Context(model=args.model, bundle=path, image=image, threads=args.threads)
        result[f"{kind}_explain_peak_mb"] = measure(ctx, args.contender)["peak_rss_mb"]
        result[f"{kind}_bare_session_peak_mb"] = bare(derived, args.size, args.threads)
    result["explain_ratio_dynamo_to_legacy"] = round(result["dynamo_explain_peak_mb"] /
                                                     result["legacy_explain_peak_mb"], 3)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
