"""Check an exported bundle against torch: ONNX Runtime and torch must agree on the same inputs.

Error measure, per output: ``max|ort - torch| / max|torch|`` (relative to the output's range).
Inputs: random pixel images, the sample photos (decoded and preprocessed by ``runtime.images``, as
the runtime will) as one batch, and the first of them alone (so batch 1 and batch N both run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from runtime.contract import INPUT_NAME, Preprocessing
from runtime.images import ImageError, load_image, preprocess
from runtime.scorecam import softmax

from .errors import ExportError, first_line
from .layers import FeatureTap

TOLERANCE = 1e-4
DEFAULT_SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def default_sample_images() -> list[Path]:
    """The photos in the project's ``samples/`` folder (empty when it is absent)."""
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
    if not DEFAULT_SAMPLES.is_dir():
        return []
    return sorted(p for p in DEFAULT_SAMPLES.iterdir() if p.suffix.lower() in exts)


def load_images(paths: Sequence[str | Path], pre: Preprocessing) -> np.ndarray:
    """Decode ``paths`` and preprocess them exactly as the runtime will: float32 [N,3,H,W]."""
    out = []
    for path in paths:
        try:
            out.append(preprocess(load_image(path), pre)[0])
        except ImageError as e:
            raise ExportError(f"cannot read sample image: {e}") from None
    return np.stack(out) if out else np.zeros((0, 3, *pre.input_size), np.float32)


def random_images(n: int, pre: Preprocessing, seed: int = 0) -> np.ndarray:
    """``n`` uniform-noise pixel images, preprocessed: float32 [n,3,H,W]."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, *pre.input_size, 3), dtype=np.uint8)
    return np.stack([pre.apply(p) for p in pixels])


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """``max|got - want| / max|want|`` (shapes must match)."""
    if got.shape != want.shape:
        return float("inf")
    scale = float(np.abs(want).max()) if want.size else 0.0
    return float(np.abs(got - want).max() / max(scale, 1e-12)) if want.size else 0.0


@dataclass
class Check:
    """One input batch run through both engines."""

    name: str
    batch: int
    output_error: float
    features_error: float

    def as_dict(self) -> dict:
        return {"inputs": self.name, "batch": self.batch,
                "output_rel_error": self.output_error, "features_rel_error": self.features_error}


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any load failure means the graph is unusable
        raise ExportError(f"ONNX Runtime cannot load {path.name}: {first_line(e)}") from None


def verify(model: nn.Module, layer: str, model_path: Path, features_path: Path, pre: Preprocessing,
           sample_images: Sequence[str | Path], output_kind: str,
           labels: Sequence[str] | None, tolerance: float = TOLERANCE) -> dict:
    """Compare ONNX Runtime with torch on random and real inputs; raise :class:`ExportError` on a mismatch.

    Returns the ``verification`` section of the export report (errors per input batch, top-1 per photo).
    """
    tap = FeatureTap(model, layer).eval()
    classifier, features = _session(model_path), _session(features_path)
    batches = [("random", random_images(2, pre))]
    photos = load_images(sample_images, pre)
    if len(photos):
        batches += [("samples", photos), ("samples[0]", photos[:1])]
    else:
        batches += [("random[0]", batches[0][1][:1])]
    checks: list[Check] = []
    outputs: dict[str, np.ndarray] = {}
    for name, x in batches:
        with torch.no_grad():
            want_out, want_feat = (t.numpy() for t in tap(torch.from_numpy(x)))
        try:
            got_out = classifier.run(None, {INPUT_NAME: x})[0]
            got_feat = features.run(None, {INPUT_NAME: x})[0]
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"ONNX Runtime failed on the {name} batch of {len(x)}: {first_line(e)}") from None
        checks.append(Check(name, len(x), rel_error(got_out, want_out), rel_error(got_feat, want_feat)))
        outputs[name] = got_out
        outputs["torch:" + name] = want_out
    worst = max(checks, key=lambda c: max(c.output_error, c.features_error))
    error = max(worst.output_error, worst.features_error)
    if not error <= tolerance:
        which = "output" if worst.output_error >= worst.features_error else "features"
        raise ExportError(
            f"verification failed: ONNX Runtime and torch differ on the {worst.name} inputs "
            f"({which} relative error {error:.3g} > {tolerance:g}); the bundle was not written"
        )
    top1 = []
    if len(photos):
        probs = outputs["samples"] if output_kind == "probabilities" else softmax(outputs["samples"], axis=1)
        torch_best = outputs["torch:samples"].argmax(1)
        for path, p, tb in zip(sample_images, probs, torch_best, strict=True):
            k = int(p.argmax())
            top1.append({"image": Path(path).name, "index": k,
                         "label": labels[k] if labels is not None else str(k),
                         "probability": round(float(p[k]), 6), "torch_agrees": bool(k == int(tb))})
    return {"tolerance": tolerance, "passed": True, "max_rel_error": error,
            "checks": [c.as_dict() for c in checks], "top1": top1}
