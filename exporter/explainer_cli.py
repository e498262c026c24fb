"""``python -m exporter explainer MODEL --out explainer.onnx``: the whole explainer as ONE ONNX graph.

Torch-free: reads a bundle or any ONNX image classifier (third-party derivation as in the runtime) and
writes a self-contained Score-CAM model any ONNX Runtime binding runs (C/C++, Node, the browser, Triton).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

EPILOG = """\
The graph: inputs  pixels uint8 [1,H,W,3] (RGB, already resized to the network's input size H x W) and
class_index int64 [1] (-1: the top-1 class); outputs saliency float32 [1,H,W] in [0,1], explained_class
int64 [1] and probabilities float32 [1,C]. The bundle's preprocessing is inside; labels, preprocessing,
preset, channel budget, chunk size and the sha256 of the source classifier are in its metadata (keys
scorecam.*). It equals Explainer(MODEL, preset=P, max_channels=N, fill="zero").explain_tensor(x) to ~1e-6.

The graph has no kernel fill (the Python Explainer's default with a channel cap): --max-channels needs
--fill zero, asked explicitly (Faster Score-CAM: the channels left out weigh 0; less faithful on photos
unlike those the budget was chosen on). Without --max-channels the graph is exact Score-CAM.

examples:
  python -m exporter explainer efficientnet_lite0 --out explainer.onnx
  python -m exporter explainer models/efficientnet_lite0 --out lite0-mc64.onnx --max-channels 64 --fill zero
  python -m exporter explainer resnet50.onnx --out explainer.onnx --triton triton_repo

A classifier whose weights sit beside it (model.onnx + model.onnx.data, torch's dynamo export) gives ONE
self-contained file whenever it fits protobuf's 2 GB limit; over it (or with --external-data) the weights go
into OUT.data beside OUT (keep the two together; ONNX Runtime finds OUT.data by OUT's folder).
"""


class UsageError(ValueError):
    """A bad argument: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from runtime import thirdparty
    from runtime.explainer import FILLS
    from runtime.scorecam import PRESETS

    from .explainer_graph import SELECTS

    p = _Parser(prog="python -m exporter explainer",
                description="Write the Score-CAM explainer of MODEL as one self-contained ONNX graph "
                            "(no Python, no torch needed to run it).",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="a bundle directory, its model.onnx, a name under models/, "
                   "or any ONNX image classifier")
    p.add_argument("--out", metavar="FILE", help="the explainer .onnx to write (replaced only after success)")
    p.add_argument("--preset", default="paper", choices=list(PRESETS), help="Score-CAM variant (default paper)")
    p.add_argument("--max-channels", type=int, metavar="N", default=None,
                   help="score only N channels, chosen in the graph by --select, the others weighing 0; needs "
                   "--fill zero (default: all, exact)")
    p.add_argument("--fill", default=None, choices=list(FILLS),
                   help="what the channels --max-channels leaves out weigh: only zero here (Faster Score-CAM), and "
                   "it must be asked for explicitly with --max-channels (the Python Explainer's default, kernel, "
                   "is not in the graph)")
    p.add_argument("--select", default="auto", choices=list(SELECTS),
                   help="the --max-channels rule: relevance = the N of largest |W[c,k]| * spatial std for the class "
                   "explained (needs a global-pooling -> linear head), std = the N of largest spatial std, auto "
                   "(default) = relevance where the head allows it, else std (as the Python Explainer)")
    p.add_argument("--chunk", type=int, metavar="B", default=None,
                   help="masked inputs per Loop iteration (default: the Python engine's CPU batch, 16 at 224x224)")
    p.add_argument("--triton", metavar="REPO", default=None,
                   help="also write REPO/NAME/1/model.onnx and REPO/NAME/config.pbtxt (Triton's ONNX Runtime backend)")
    p.add_argument("--triton-name", metavar="NAME", default=None,
                   help="the Triton model name (default: the --out file's stem)")
    p.add_argument("--external-data", action="store_true",
                   help="keep the weights of a classifier stored as external data in OUT.data beside OUT, even when "
                        "one file would fit (always so over 2 GB)")
    thirdparty.add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; 0 on success, 2 after a one-line ``error: ...`` on stderr."""
    from runtime.contract import BundleError

    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.list_layers:
            from runtime.thirdparty import layers_report

            print(layers_report(args.model, args.size, args.model_output))
            return 0
        return _write(args)
    except (UsageError, BundleError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _write(args: argparse.Namespace) -> int:
    from runtime.contract import BundleError
    from runtime.thirdparty import cli_kwargs, open_model

    from .explainer_graph import Options, build_explainer, check_fill

    if not args.out:
        raise UsageError("--out FILE is required")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give the .onnx file to write")
    if not out.parent.is_dir():
        raise UsageError(f"--out: the folder {out.parent} does not exist")
    if args.max_channels is not None and args.max_channels < 1:
        raise UsageError(f"--max-channels must be >= 1, got {args.max_channels}")
    if args.chunk is not None and args.chunk < 1:
        raise UsageError(f"--chunk must be >= 1, got {args.chunk}")
    check_fill(args.max_channels, args.fill, flags=True)
    name = args.triton_name or _triton_name(out.stem)
    if args.triton and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise UsageError(f"--triton-name {name!r}: use letters, digits, '_', '.' and '-' only")
    print(f"loading {args.model}", file=sys.stderr)
    try:
        bundle = open_model(args.model, **cli_kwargs(args))
    except BundleError as e:
        if "unknown role 'explainer'" in str(e):
            raise UsageError(f"{args.model} is already an explainer graph; give the classifier (a bundle or "
                             "its model.onnx, or any ONNX classifier)") from None
        from runtime.detect.model import looks_like_detector

        if looks_like_detector(args.model):
            raise UsageError(f"{args.model} is an object detector: the one-graph explainer takes classifiers only "
                             "(explain detectors with python -m runtime.explain; docs/detection.md)") from None
        raise
    print(f"building the explainer graph (preset {args.preset}, "
          f"{f'{args.max_channels} channels, fill zero' if args.max_channels else 'all channels'})", file=sys.stderr)
    model = build_explainer(bundle, Options(args.preset, args.max_channels, args.chunk, args.select,
                                            external_data=args.external_data, fill=args.fill))
    written = save_explainer(model, out, bundle.data_dir)
    props = {p.key: p.value for p in model.metadata_props}
    wrote = sum(os.path.getsize(f) for f in written)
    size = os.path.getsize(bundle.model_path) + sum(os.path.getsize(bundle.directory / f) for f in bundle.data_files)
    print(f"wrote {' + '.join(map(str, written))} ({wrote / 1e6:.1f} MB, {wrote / size:.3f}x the classifier's "
          f"{size / 1e6:.1f} MB): preset {props['scorecam.preset']}, {props['scorecam.channels']} channels, "
          f"budget {props['scorecam.max_channels']}, chunk {props['scorecam.chunk']}")
    if args.triton:
        folder = write_triton(Path(args.triton), name, written, model)
        print(f"wrote the Triton model {folder}/ (1/model.onnx, config.pbtxt; platform onnxruntime_onnx)")
    return 0


def _triton_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "scorecam_explainer"


def save_explainer(model, out: Path, base_dir=None) -> list[Path]:
    """Write ``model`` to ``out`` atomically (temporary names, then renames; nothing partial is left); the files
    written. Tensors stored externally (relative to ``base_dir``) are streamed into ONE data file
    ``<out>.data`` beside it (offsets aligned for ONNX Runtime), and the result is checked by path."""
    from runtime import external

    out = Path(out)
    if not external.has_external(model):
        _atomic_write(out, model.SerializeToString())
        return [out]
    location = out.name + ".data"
    data_tmp = _temp_beside(out.with_name(location))
    graph_tmp = None
    try:
        external.relocate([model], base_dir, data_tmp, location)
        graph_tmp = _temp_beside(out)
        Path(graph_tmp).write_bytes(model.SerializeToString())
        for tmp in (data_tmp, graph_tmp):
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes them private; the result is ordinary files
        os.replace(data_tmp, out.with_name(location))
        os.replace(graph_tmp, out)
    except BaseException:
        for tmp in (data_tmp, graph_tmp):
            if tmp:
                Path(tmp).unlink(missing_ok=True)
        raise
    from .explainer_graph import _check

    _check(str(out))
    return [out, out.with_name(location)]


def _temp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place (never half a file)."""
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 7: "TYPE_INT64"}


def triton_config(name: str, model) -> str:
    """``config.pbtxt`` for Triton's ONNX Runtime backend (``max_batch_size: 0``: the shapes are exact)."""

    def tensors(values) -> str:
        items = []
        for v in values:
            t = v.type.tensor_type
            dims = ", ".join(str(d.dim_value) for d in t.shape.dim)
            items.append(f'  {{\n    name: "{v.name}"\n    data_type: {_TRITON_TYPES[t.elem_type]}\n'
                         f"    dims: [ {dims} ]\n  }}")
        return ",\n".join(items)

    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
            f"input [\n{tensors(model.graph.input)}\n]\noutput [\n{tensors(model.graph.output)}\n]\n")


def write_triton(repo: Path, name: str, written: list[Path], model) -> Path:
    """``repo/name/1/model.onnx`` (a copy of the explainer file ``written[0]``, and of its data file
    ``written[1]`` under the name the graph gives it, if any) + ``repo/name/config.pbtxt``; returns ``repo/name``."""
    import shutil

    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(written[::-1]):  # the data file first: the graph never names a missing file
        final = folder / "1" / ("model.onnx" if i == len(written) - 1 else src.name)
        tmp = _temp_beside(final)
        try:
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    _atomic_write(folder / "config.pbtxt", triton_config(name, model).encode())
    return folder


if __name__ == "__main__":
    sys.exit(main())
