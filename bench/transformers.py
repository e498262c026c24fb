"""``python -m bench.transformers``: parity of the token and channels-last layers on the full-size models.

The test suite checks parity on reduced transformers (2 blocks, 112 x 112: ``tests/test_transformer_parity.py``);
this checks the real configurations, random weights (nothing is downloaded):

- ``deit``: timm DeiT-tiny (12 blocks, 224 x 224: CLS + 14 x 14 tokens, 192 channels), ``blocks[-1].norm1``;
- ``deit_distilled``: timm's distilled DeiT-tiny (CLS + distillation token + 14 x 14), ``blocks[-1].norm1``;
- ``swin_t``: torchvision's Swin-T (channels last, no CLS), ``features[-1][-1].norm1`` (768 channels, 7 x 7).

For each photo (top-1 class) and preset, the largest absolute difference of our map (``Explainer``, the bundle our
exporter writes) to its reference on the [0,1] scale: ``gradcam`` the REAL pytorch-grad-cam ``ScoreCAM`` with its
``reshape_transform``; ``torchcam`` the REAL torchcam ``ScoreCAM`` fed the same reshape (its map at h x w);
``paper`` and ``official`` the torch re-implementations of ``tests/reference_cam.py``. Target (issue 20): <= 1e-4.
Results: ``bench/results/transformers.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .bundles import DEFAULT_CACHE, sample_photos

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PRESETS = ("gradcam", "paper", "official", "torchcam")
TARGET = 1e-4


def log(msg: str) -> None:
    print(f"[bench.transformers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(name: str):
    """(model, target layer name, reshape_transform) of a full-size model, random weights (seeded)."""
    import timm
    import torch

    torch.manual_seed(0)
    if name == "deit":
        model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
        return model.eval(), "blocks.11.norm1", _tokens(1, (14, 14))
    if name == "deit_distilled":
        model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
        return model.eval(), "blocks.11.norm1", _tokens(2, (14, 14))
    if name == "swin_t":
        from torchvision.models import swin_t

        model = swin_t()
        torch.nn.init.normal_(model.head.weight, std=0.02)
        return model.eval(), "features.7.1.norm1", lambda t: t.permute(0, 3, 1, 2)
    raise ValueError(f"unknown model {name!r}; choose deit, deit_distilled, swin_t")


def _tokens(aux: int, grid: tuple[int, int]):
    def reshape_transform(t):  # pytorch-grad-cam's ViT tutorial, aux leading tokens dropped
        return t[:, aux:, :].reshape(t.size(0), grid[0], grid[1], t.size(2)).permute(0, 3, 1, 2)

    return reshape_transform


def references():
    """tests/reference_cam.py (the torch references of the parity tests)."""
    tests = HERE.parent / "tests"
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    import reference_cam

    return reference_cam


def parity(name: str, photos: list[Path], cache: Path, presets: tuple[str, ...] = PRESETS) -> dict:
    import torch
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from exporter import export
    from runtime import Explainer, images

    ref = references()
    model, layer, reshape = build(name)
    module = model.get_submodule(layer)
    bundle = Path(cache) / f"parity-{name}"
    if not (bundle / "model.onnx").is_file():
        log(f"exporting {name} at {layer} into {bundle}")
        export(model, layer, bundle, force=True)
    out: dict = {"layer": layer, "photos": {}}
    explainers = {p: Explainer(bundle, device="cpu", preset=p) for p in {*presets, "paper"}}
    out["layout"] = explainers["paper"].meta.layout.describe()
    for photo in photos:
        ex = explainers["paper"]
        x_np = images.preprocess(images.load_image(photo), ex.pre)
        x = torch.from_numpy(x_np)
        c = int(np.argmax(ex.engine.classify(x_np)[0]))
        row: dict = {"class": c}
        hp = None
        for preset in presets:
            t0 = time.perf_counter()
            (r,) = explainers[preset].explain_tensor(x_np, targets=[c])
            ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            if preset == "gradcam":
                cam = ScoreCAM(model, [module], reshape_transform=reshape)
                cam.batch_size = 16
                try:
                    want = cam(input_tensor=x, targets=[ClassifierOutputTarget(c)])[0]
                finally:
                    cam.activations_and_grads.release()
            elif preset == "torchcam":
                want = ref.torchcam_scorecam(model, module, x, c, reshape=reshape)
            else:
                hp = hp or ref.halfpixel_masked_logits(model, module, x, reshape=reshape)
                want = (ref.paper_scorecam(model, module, x, c, masked=hp)[1] if preset == "paper"
                        else ref.official_scorecam(model, module, x, c, masked=hp))
            theirs = time.perf_counter() - t0
            got = r.cam if preset == "torchcam" else r.saliency
            row[preset] = {"max_abs_diff": float(np.abs(got - want).max()), "ours_s": round(ours, 2),
                           "reference_s": round(theirs, 2)}
            log(f"{name} {Path(photo).name} {preset}: {row[preset]['max_abs_diff']:.1e} "
                f"(ours {ours:.1f} s, reference {theirs:.1f} s)")
        out["photos"][Path(photo).name] = row
    out["worst"] = {p: max(r[p]["max_abs_diff"] for r in out["photos"].values()) for p in presets}
    return out


def render(results: dict) -> str:
    lines = ["# Transformer parity (full-size models, random weights)", "",
             "Largest absolute difference of our map to the peer's on the [0,1] scale, top-1 class of each photo "
             f"(target <= {TARGET:g}). gradcam: the real pytorch-grad-cam `ScoreCAM` with `reshape_transform`; "
             "torchcam: the real torchcam `ScoreCAM` on the reshaped layer (h x w map); paper, official: the torch "
             "references of tests/reference_cam.py. Command: `python -m bench.transformers`.", "",
             "| model | layer | layout | photos | " + " | ".join(PRESETS) + " | target |",
             "|---|---|---|---:|" + "---:|" * len(PRESETS) + "---|"]
    for name, r in results["models"].items():
        worst = r["worst"]
        ok = all(v <= TARGET for v in worst.values())
        lines.append(f"| {name} | `{r['layer']}` | {r['layout']} | {len(r['photos'])} | "
                     + " | ".join(f"{worst[p]:.1e}" if p in worst else "-" for p in PRESETS)
                     + f" | {'PASS' if ok else 'MISS'} |")
    lines += ["", f"Machine: {results['machine']} (loaded: other jobs shared its cores); torch {results['torch']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.transformers", description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["deit", "deit_distilled", "swin_t"])
    ap.add_argument("--photos", type=int, default=5, help="how many of the five sample photos (default 5)")
    ap.add_argument("--swin-photos", type=int, default=1, help="photos for swin_t (768 channels: slow; default 1)")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import torch

    from .machine import cpu_model

    torch.set_num_threads(2)
    results = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "torch": torch.__version__, "models": {}}
    path = args.out / "transformers.json"
    if path.is_file():  # resumable: models measured before are kept
        results["models"] = json.loads(path.read_text()).get("models", {})
    for name in args.models:
        n = args.swin_photos if name == "swin_t" else args.photos
        results["models"][name] = parity(name, sample_photos()[:n], args.cache, tuple(args.presets))
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "transformers.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
