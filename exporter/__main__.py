"""``python -m exporter SPEC --out DIR``: export a model into a Score-CAM bundle (``scorecam-export``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import ExportError

# torch is imported only by the export commands, so `python -m exporter explainer` runs without it

EPILOG = """\
SPEC is a built-in recipe ({recipes}; the detector toy_detector) or package.module:callable, a function (or
class) that takes no arguments and returns a torch.nn.Module classifier [N,3,H,W] -> [N,C]; the
current directory is importable. Recipes bring their own defaults (layer, size, preprocessing,
labels); for a callable, --layer is required and preprocessing defaults to torchvision ImageNet
(scale 1/255, mean 0.485 0.456 0.406, std 0.229 0.224 0.225).

Preprocessing is x = (pixel * scale - mean) / std per channel, pixels 0..255 resized to H x W.

The bundle DIR gets model.onnx, features.onnx and export.json. Both graphs come from one export
and are checked against torch on random inputs and the sample photos (relative error <= 1e-4);
on any failure nothing is written. Errors print one line and exit with status 2.

examples:
  python -m exporter efficientnet_lite0 --out models/efficientnet_lite0
  python -m exporter efficientnet_lite0 --list-layers
  python -m exporter mypkg.nets:build --layer layer4 --out models/mynet --labels classes.txt
  python -m exporter annotate model.onnx ...   (bundle a third-party ONNX classifier; see its --help)
  python -m exporter explainer efficientnet_lite0 --out explainer.onnx   (Score-CAM as ONE ONNX graph;
                                                                           no torch; see its --help)
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ExportError(message)


def build_parser() -> argparse.ArgumentParser:
    from .bundle import DEFAULT_OPSET
    from .recipes import RECIPES

    p = _Parser(
        prog="python -m exporter",
        description="Export a torch classifier into a Score-CAM bundle for the torch-free runtime:\n"
                    "model.onnx (input -> logits) and features.onnx (input -> the target layer's "
                    "[N,K,h,w] map).",
        epilog=EPILOG.format(recipes=", ".join(RECIPES)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", metavar="SPEC", help="recipe name or package.module:callable")
    p.add_argument("--layer", metavar="NAME", help="target layer (a module name; see --list-layers)")
    p.add_argument("--out", metavar="DIR", help="bundle folder to write (absent or empty unless --force)")
    p.add_argument("--input-size", metavar="N", nargs="+", type=int,
                   help="input size in pixels: H [W] (W defaults to H)")
    p.add_argument("--mean", metavar=("R", "G", "B"), nargs=3, type=float, help="per-channel mean")
    p.add_argument("--std", metavar=("R", "G", "B"), nargs=3, type=float, help="per-channel std")
    p.add_argument("--scale", metavar="S", type=float, help="pixel scale, e.g. 0.00392156 (= 1/255)")
    p.add_argument("--color-order", choices=("RGB", "BGR"), help="channel order the model expects")
    p.add_argument("--labels", metavar="FILE", help="class names: one per line, or a JSON list")
    p.add_argument("--opset", metavar="N", type=int, help=f"ONNX opset (default {DEFAULT_OPSET}, the minimum "
                   "torch's exporter writes)")
    p.add_argument("--force", action="store_true", help="replace a non-empty DIR (only after success)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch check")
    p.add_argument("--external-data", action="store_true",
                   help="write the weights to model.onnx.data beside the graphs, which both read (automatic for "
                        "a model over 2 GB, protobuf's limit for one file)")
    p.add_argument("--list-layers", action="store_true",
                   help="print every module whose output is a 4-D map (deepest first) and exit")
    extra = p.add_argument_group("extras")
    extra.add_argument("--int8", metavar="CALIB", nargs="+",
                       help="also write model.int8.onnx (static QDQ), calibrated on these photos or folders")
    extra.add_argument("--randomize", choices=("cascade",),
                       help="instead of one bundle, write a model-parameter randomisation cascade into DIR "
                            "(one bundle per step + cascade.json; see exporter.randomize)")
    extra.add_argument("--randomize-layers", metavar="A,B,...",
                       help="layers to randomise, in order (default: top-level layers, last first)")
    extra.add_argument("--seed", type=int, default=0, help="seed of the randomisation cascade (default 0)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status (0, or 2 after a one-line ``error: ...`` on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["explainer"]:
        from .explainer_cli import main as explainer_main

        return explainer_main(argv[1:])
    if argv[:1] == ["annotate"]:
        from .annotate import main as annotate_main

        return annotate_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        return _list_layers(args) if args.list_layers else _export(args)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `--list-layers | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _input_size(args: argparse.Namespace, default: tuple[int, int]) -> tuple[int, int]:
    if args.input_size is None:
        return default
    if len(args.input_size) > 2 or min(args.input_size) < 1:
        raise ExportError("--input-size needs one or two positive integers: H [W]")
    h = args.input_size[0]
    return h, args.input_size[-1]


def _list_layers(args: argparse.Namespace) -> int:
    from .layers import probe
    from .spec import resolve

    recipe = resolve(args.spec)
    size = _input_size(args, recipe.input_size)
    model = recipe.build(size, False).eval()  # weights do not change shapes
    maps = probe(model, size).maps()
    default = args.layer or recipe.layer
    print(f"{args.spec}: {len(maps)} modules output a 4-D map at {size[0]}x{size[1]}, deepest first "
          "(* = default layer)")
    width = max([len(m.name) for m in maps] + [5])
    print(f"  {'layer':<{width}}  {'output KxHxW':<16}  channels")
    for m in maps:
        _, k, h, w = m.shape
        mark = "*" if m.name == default else " "
        note = "" if m.usable else f"  (runs {m.calls}x per forward: shared, not a valid target)"
        print(f"{mark} {m.name:<{width}}  {f'{k}x{h}x{w}':<16}  {k}{note}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .bundle import DEFAULT_OPSET, check_destination, check_opset, export, make_preprocessing
    from .report import summarize
    from .spec import read_labels, resolve

    if not args.out:
        raise ExportError("--out DIR is required (or use --list-layers)")
    if args.spec in _detector_recipes():  # a detector: one model.onnx carrying its preprocessing (runtime.detect)
        report = _detector_recipes()[args.spec](Path(args.out), force=args.force)
        print(f"wrote {Path(args.out) / 'model.onnx'}: detector, head {report['head']}, input "
              f"{report['input_size'][0]}x{report['input_size'][1]}, {len(report['labels'] or [])} labels "
              f"(verified against torch: max relative error "
              f"{max(c['output_rel_error'] for c in report['verification']['checks']):.2g})")
        return 0
    recipe = resolve(args.spec)
    layer = args.layer or recipe.layer
    if not layer:
        raise ExportError(f"{args.spec} needs --layer NAME (run with --list-layers to see the choices)")
    out = Path(args.out)
    check_destination(out, args.force)
    size = _input_size(args, recipe.input_size)
    pre = make_preprocessing(
        size,
        recipe.scale if args.scale is None else args.scale,
        recipe.mean if args.mean is None else args.mean,
        recipe.std if args.std is None else args.std,
        args.color_order or recipe.color_order,
    )
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    check_opset(opset)
    labels = read_labels(args.labels) if args.labels else (recipe.labels() if recipe.labels else None)
    finish = _int8_step(args.int8) if args.int8 else None
    model = recipe.build(size, True)
    options = dict(input_size=pre.input_size, mean=pre.mean, std=pre.std, scale=pre.scale,
                   color_order=pre.color_order, labels=labels, opset=opset, verify=not args.no_verify,
                   finish=finish, external_data=True if args.external_data else None)
    if args.randomize == "cascade":
        return _cascade(model, layer, out, options, args)
    report = export(model, layer, out, force=args.force, **options)
    print(summarize(report, out))
    return 0


def _detector_recipes() -> dict:
    from .detector import DETECTOR_RECIPES

    return DETECTOR_RECIPES


def _int8_step(calib: list[str]):
    """A ``finish`` step for :func:`export` that adds ``model.int8.onnx`` (checked for photos first)."""
    from .quantize import QuantizeError, calibration_files, quantize_bundle

    try:
        calibration_files(calib)
    except (QuantizeError, OSError) as e:
        raise ExportError(f"--int8: {e}") from None

    def finish(folder: Path) -> None:
        try:
            quantize_bundle(folder, calib)
        except Exception as e:  # noqa: BLE001 - quantization failures of any kind abort the export
            raise ExportError(f"int8 quantization failed: {e}") from None

    return finish


def _cascade(model, layer: str, out: Path, options: dict, args: argparse.Namespace) -> int:
    """``--randomize cascade``: one bundle per randomisation step under ``out`` plus cascade.json."""
    from .bundle import export
    from .randomize import run_cascade

    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--randomize cascade writes into an absent or empty DIR; {out} is not empty")
    try:
        bundles = run_cascade(model, out, lambda m, d: export(m, layer, d, **options),
                              layers=args.randomize_layers, seed=args.seed)
    except ValueError as e:
        raise ExportError(str(e)) from None
    print(f"wrote a randomisation cascade of {len(bundles)} bundles to {out}/ (cascade.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
