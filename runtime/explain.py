"""``python -m runtime.explain MODEL IMAGE [IMAGE ...]``: Score-CAM overlays and maps from the command line.

For every image and explained class it writes ``OUT/<stem>.<class>.png`` (the JET overlay at the
image's own size) and ``OUT/<stem>.<class>.npy`` (the saliency, float32 [H,W] in [0,1] at the
network's input size), ``<class>`` being the class index. All-or-nothing: every image is decoded,
the model loaded and the targets resolved before anything is written; outputs are staged as
temporary files in OUT and renamed into place only once every explanation succeeded, so a failed
run leaves OUT as it found it. A user error prints ONE line ``error: ...`` on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import images, thirdparty
from .cliargs import one_line, positive_int
from .contract import BundleError
from .engine import DEVICES, PRECISIONS, EngineError
from .explainer import BASELINES, FILLS, MODES, Explainer, Result, TargetError
from .fusion import DEFAULT_FUSION, FUSIONS
from .images import ImageError
from .scorecam import PRESETS
from .selection import SELECTS
from .stages import parse_layers

EXIT_USAGE = 2
#: decoded images kept in memory between validation and explanation (beyond it: decoded again)
CACHE_BYTES = 512 * 2**20

USER_ERRORS = (BundleError, EngineError, ImageError, TargetError, ValueError)

EPILOG = """\
outputs (in --out, default ./out):
  <stem>.<class>.png   the saliency as a JET heat map over the image, at the image's own size
  <stem>.<class>.npy   the saliency map, float32 [H,W] in [0,1] at the network's input size
  <class> is the class index (e.g. chelsea.281.png for ImageNet class 281, "tabby cat").

MODEL is a bundle directory (model.onnx + features.onnx written by `python -m exporter`), its
model.onnx, or the name of a bundle under models/ (or $SCORECAM_MODELS).

examples:
  python -m runtime.explain efficientnet_lite0 samples/chelsea.png
  python -m runtime.explain models/efficientnet_lite0 cat.jpg dog.png --top-k 3 --out maps/
  python -m runtime.explain efficientnet_lite0 photo.jpg --target 281 "tiger cat" --alpha 0.4
  python -m runtime.explain efficientnet_lite0 *.jpg --json > results.jsonl
  python -m runtime.explain efficientnet_lite0 photo.jpg --device cuda --batch-size 256
  python -m runtime.explain efficientnet_lite0 photo.jpg --max-channels 64   # fast (~8x): cover + kernel fill
  python -m runtime.explain efficientnet_lite0 photo.jpg --layers 3 --max-channels 16   # a finer map, fast
  python -m runtime.explain efficientnet_lite0 photo.jpg --mode qrise   # finer, higher insertion, ~1/2 exact's time
  python -m runtime.explain efficientnet_lite0 photo.jpg --mode qrise-check   # the most faithful: + a self-check
  python -m runtime.explain yolov8n.onnx photo.jpg --top-k 3          (a detector: one map per box)
  python -m runtime.explain yolov8n.onnx photo.jpg --box 50 40 300 250 --target dog

detectors (docs/detection.md): OUT/<stem>.det<N>.png|.npy|.json per detection N (a --box: <stem>.box.*):
the overlay with the box drawn, the saliency over the photo, and the box, class and score.

exit status: 0 success; 2 bad arguments, unreadable image or model, unknown class, unusable
device (a one-line "error: ..." on stderr, and nothing written).
"""


class UsageError(Exception):
    """A bad command line (raised instead of argparse's print-usage-and-exit)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's contract: must not return
        raise UsageError(f"{message} (see --help)")


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_mode_arguments(p: argparse.ArgumentParser, note: str = "", cap: str = "") -> None:
    """``--max-channels``, ``--select``, ``--fill`` and ``--mode`` (the fast modes), as every CLI of the project
    offers them; ``note`` ends each help text (the service: a request may ask for another), ``cap`` the
    one of ``--max-channels``."""
    p.add_argument("--max-channels", metavar="N", type=positive_int, default=None,
                   help="the fast mode: score only N channels, chosen by --select, and weigh the others as --fill "
                        "says (kernel by default: their scores predicted from the scored ones'); default: all "
                        "channels, exact" + (cap or note))
    p.add_argument("--select", choices=list(SELECTS), default="auto",
                   help="how --max-channels chooses the channels: cover (the channels whose normalised maps cover "
                        "all the others), relevance (|W[c,k]| x spatial std, for the classes explained; needs a "
                        "global-pooling -> linear head), std (spatial std, class-blind) or auto (default: cover with "
                        "--fill kernel, else relevance where the head allows it, else std)" + note)
    p.add_argument("--fill", choices=list(FILLS), default=None,
                   help="with --max-channels, what the channels left out weigh: kernel (the default: scores "
                        "predicted from the scored channels by kernel regression on the maps; any head), zero "
                        "(Faster Score-CAM: weight 0; unsafe on photos unlike those the budget was chosen on) or "
                        "preview (their feature-space score, calibrated on the scored ones; needs a global-pooling "
                        "-> linear head)" + note)
    p.add_argument("--mode", choices=list(MODES), default="scorecam",
                   help="scorecam (default); qrise: quasi-random RISE refined by the fast Score-CAM, 320 smooth "
                        "input masks ridge-regressed + --max-channels (default 16) channels, a finer map that "
                        "scores higher on insertion than exact Score-CAM at about half its time (fp32, one "
                        "layer, zero baseline; docs/evaluation.md); qrise-check: qrise, then of five maps made "
                        "from its passes the one whose top pixels the model needs most (30 passes more; the most "
                        "faithful mode, less localised); or preview: one classifier pass plus numpy, "
                        "each channel's mask applied to the features and scored in closed form (needs a "
                        "global-pooling -> linear head). A rough sketch, not safe for live use: on photos unlike "
                        "the samples its map can be unrelated to Score-CAM's (r 0.01 on retina.jpg); interactive "
                        "use: --max-channels 64 (min r 0.93 over 109 photos; 96: 0.97; docs/fast-modes.md)" + note)
    p.add_argument("--layers", metavar="N|NAMES", type=_layers, default=None,
                   help="multi-layer Score-CAM, a finer map: N = the target layer plus the N-1 stage outputs next "
                        "finer than it, found in the model (3: on EfficientNet-Lite0 14x14 and 28x28), or "
                        "comma-separated layer names; each layer scored like the target layer (--max-channels "
                        "and --fill apply per layer) and the maps fused (--fusion); default 1: the target layer "
                        "alone" + note)
    p.add_argument("--fusion", choices=list(FUSIONS), default=DEFAULT_FUSION,
                   help="with --layers, how the layers' maps are fused: product (default), poly (Poly-CAM's local "
                        "normalisation) or sum" + note)
    p.add_argument("--baseline", choices=list(BASELINES), default="zero",
                   help="what masked-out pixels become: zero (default, the paper) or blur (x*H + blur(x)*(1-H), "
                        "the blurred canvas of the insertion metric)" + note)


def _layers(text: str):
    """``--layers``: a count or comma-separated layer names (:func:`runtime.stages.parse_layers`)."""
    try:
        return parse_layers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m runtime.explain",
        description="Explain what an exported classifier sees: Score-CAM saliency maps computed with\n"
                    "ONNX Runtime (no PyTorch), one overlay PNG and one .npy map per image and class.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="bundle directory, its model.onnx, or a name under models/")
    p.add_argument("images", metavar="IMAGE", nargs="*",
                   help="images to explain (JPEG, PNG, WebP, BMP, TIFF, GIF, ...)")
    p.add_argument("--target", "-t", metavar="C", nargs="+", action="extend", default=None,
                   help="class(es) to explain, by index or label (quote labels with spaces; put --target "
                        "after the images); default: the top-k predicted classes")
    p.add_argument("--top-k", "-k", metavar="K", type=positive_int, default=1,
                   help="without --target, explain the K most probable classes (default 1)")
    p.add_argument("--out", "-o", metavar="DIR", type=Path, default=Path("out"),
                   help="output directory, created if needed (default: ./out)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto (CUDA when onnxruntime-gpu can use it, else CPU), cpu, or cuda (default auto)")
    p.add_argument("--batch-size", "-b", metavar="N", type=positive_int, default=None,
                   help="masked images scored per ONNX Runtime call (default: 16 on CPU, 128 on CUDA at 224x224, "
                        "scaled by the input area)")
    add_mode_arguments(p)
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="fp32 (exact, default), int8 (the bundle's quantized classifier, from exporter --int8) "
                        "or fp16 (CUDA only) for the masked passes")
    p.add_argument("--tf32", action="store_true",
                   help="on CUDA, allow TF32 tensor-core math for fp32 (Ampere and later; maps differ from "
                        "the CPU's by ~2e-3; default off: exact)")
    p.add_argument("--threads", metavar="N", type=positive_int, default=None,
                   help="ONNX Runtime intra-op threads (default: ONNX Runtime's choice, the physical cores)")
    p.add_argument("--preset", choices=list(PRESETS), default="paper",
                   help="Score-CAM variant (default paper; see DESIGN.md): "
                        + ", ".join(PRESETS))
    p.add_argument("--alpha", "-a", metavar="A", type=_alpha, default=0.5,
                   help="heat-map opacity of the overlay, 0..1 (default 0.5)")
    p.add_argument("--max-pixels", metavar="N", type=positive_int, default=images.MAX_PIXELS,
                   help=f"refuse images with more than N pixels (default {images.MAX_PIXELS:,}); "
                        "guards against decompression bombs")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per result on stdout instead of the summary lines")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on stderr (default: only when stderr is a terminal)")
    thirdparty.add_arguments(p)
    from .detect.cli import add_arguments as add_detector_arguments

    add_detector_arguments(p)
    return p


# ------------------------------------------------------------------------------------------ helpers


class ProgressBar:
    """A one-line text bar on a stream, fed by ``Explainer.explain``'s ``progress(done, total)``."""

    def __init__(self, stream, enabled: bool, width: int = 28) -> None:
        self.stream, self.enabled, self.width = stream, enabled, width
        self.label = ""
        self._drawn = False
        self._last = 0.0
        self._t0 = time.monotonic()

    def start(self, label: str) -> None:
        self.label = label
        self._t0 = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        fill = int(round(frac * self.width))
        bar = "#" * fill + "." * (self.width - fill)
        spent = now - self._t0
        eta = f" ETA {spent * (total - done) / done:.0f}s" if 0 < done < total else f" {spent:.1f}s"
        tail = f" [{bar}] {done}/{total} masks{eta}"
        room = max(shutil.get_terminal_size((80, 20)).columns - len(tail) - 1, 10)
        label = self.label if len(self.label) <= room else "..." + self.label[-(room - 3):]
        self.stream.write(f"\r{label}{tail}")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


@dataclass
class _Image:
    arg: str
    path: Path
    stem: str
    shape: tuple[int, int]
    rgb: np.ndarray | None  # None when not cached: decoded again when its turn comes


@dataclass
class _Staged:
    """Temporary files written into the output dir, renamed into place by :meth:`commit`."""

    directory: Path
    pending: list[tuple[Path, Path]] = field(default_factory=list)  # (temp, final)
    committed: list[Path] = field(default_factory=list)
    created_dirs: list[Path] = field(default_factory=list)

    def write(self, final: Path, save) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.directory)
        self.pending.append((Path(tmp), final))
        with os.fdopen(fd, "wb") as f:
            save(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions

    def commit(self) -> None:
        while self.pending:
            tmp, final = self.pending[0]
            os.replace(tmp, final)
            self.pending.pop(0)
            self.committed.append(final)

    def rollback(self) -> None:
        for p in [t for t, _ in self.pending] + self.committed:
            with contextlib.suppress(OSError):
                p.unlink()
        self.pending.clear()
        self.committed.clear()
        for d in reversed(self.created_dirs):  # only the dirs this run made, and only if empty
            with contextlib.suppress(OSError):
                d.rmdir()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _load_images(args: list[str], max_pixels: int) -> list[_Image]:
    """Decode every image once (so a bad one fails before anything runs); reject clashing names."""
    out: list[_Image] = []
    seen: dict[Path, str] = {}
    stems: dict[str, str] = {}
    cached = 0
    for arg in args:
        path = Path(arg)
        key = path.resolve()
        if key in seen:
            continue  # the same file twice: explain it once
        rgb = images.load_image(path, max_pixels=max_pixels)
        stem = path.stem
        if stem in stems:
            raise UsageError(f"{stems[stem]} and {arg} would both write {stem}.<class>.png; "
                             "rename one or explain them in separate runs")
        seen[key], stems[stem] = arg, arg
        keep = cached + rgb.nbytes <= CACHE_BYTES
        cached += rgb.nbytes if keep else 0
        out.append(_Image(arg, path, stem, rgb.shape[:2], rgb if keep else None))
    return out


def _prepare_out(out: Path, staged: _Staged) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    missing = []
    d = out
    while not d.exists():
        missing.append(d)
        d = d.parent
    staged.created_dirs = list(reversed(missing))  # removed again on failure (when still empty)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output directory {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write into the output directory {out} (permission denied)")


def _summary(item: _Image, r: Result, png: Path) -> str:
    return (f"{item.arg}: class {r.class_index} {r.label!r} p={r.probability:.4f} "
            f"{r.seconds:.2f}s {r.provider} -> {png}")


def _record(item: _Image, r: Result, png: Path, npy: Path) -> dict:
    d = {"image": item.arg, "outputs": {"overlay": str(png), "saliency": str(npy)}}
    d.update(r.to_dict())
    d.setdefault("image_shape", [int(item.shape[0]), int(item.shape[1])])
    return d


# --------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace, stdout, stderr) -> int:
    """Validate everything, explain every image into staged files, commit them, print the results."""
    from PIL import Image

    # Pillow refuses images over 2 x its own limit before ours is checked: never let it be the stricter one
    pillow_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(pillow_limit or 0, args.max_pixels)
    try:
        return _run(args, stdout, stderr)
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def _run(args: argparse.Namespace, stdout, stderr) -> int:
    from .detect.cli import is_detection_run

    if is_detection_run(args):  # an object detector: runtime.detect (docs/detection.md)
        from .detect.cli import run as run_detection

        return run_detection(args, stdout, stderr)
    if args.box is not None or args.detection is not None:
        raise UsageError("--box and --detection apply to object detectors; this model is a classifier")
    if args.list_layers:
        print(thirdparty.layers_report(args.model, args.size, args.model_output), file=stdout)
        return 0
    if not args.images:
        raise UsageError("the following arguments are required: IMAGE")
    items = _load_images(args.images, args.max_pixels)
    explainer = Explainer(args.model, device=args.device, batch_size=args.batch_size,
                          preset=args.preset, max_channels=args.max_channels, precision=args.precision,
                          select=args.select, mode=args.mode, fill=args.fill, layers=args.layers,
                          fusion=args.fusion, baseline=args.baseline,
                          tf32=args.tf32, threads=args.threads, **thirdparty.cli_kwargs(args))
    targets = None
    if args.target:
        try:
            n = explainer.num_classes
        except (TypeError, ValueError):  # a symbolic class dimension: checked per image instead
            n = None
        targets = explainer.resolve_targets(list(args.target), np.zeros(n), args.top_k) if n else args.target

    bar = ProgressBar(stderr, stderr.isatty() if args.progress is None else args.progress)
    staged = _Staged(args.out)
    lines: list[str] = []
    try:
        _prepare_out(args.out, staged)
        for i, item in enumerate(items, 1):
            bar.start(f"[{i}/{len(items)}] {item.path.name}")
            rgb = item.rgb if item.rgb is not None else images.load_image(item.path, args.max_pixels)
            results = explainer.explain(rgb, targets=targets, top_k=args.top_k, progress=bar)
            bar.finish()
            for r in results:
                png = args.out / f"{item.stem}.{r.class_index}.png"
                npy = args.out / f"{item.stem}.{r.class_index}.npy"
                pic = images.overlay(rgb, r.saliency, args.alpha)
                staged.write(png, lambda f, pic=pic: _save_png(pic, f))
                staged.write(npy, lambda f, r=r: np.save(f, np.asarray(r.saliency, np.float32)))
                lines.append(json.dumps(_record(item, r, png, npy), default=_jsonable) if args.json
                             else _summary(item, r, png))
            item.rgb = None
        staged.commit()
    except BaseException:
        bar.finish()
        staged.rollback()
        raise
    try:
        for line in lines:
            print(line, file=stdout)
        stdout.flush()
    except BrokenPipeError:  # `... | head`: the outputs are written; stop printing quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
    return 0


def _jsonable(o):
    """numpy scalars and arrays (should ``Result.to_dict`` ever hold one) as plain JSON values."""
    return o.tolist() if hasattr(o, "tolist") else str(o)


def _save_png(rgb: np.ndarray, f) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(f, format="PNG")


def parse_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None, stderr) -> argparse.Namespace | int:
    """The parsed command line, or the exit status when there is nothing to run: a bad command line is
    one ``error: ...`` line and :data:`EXIT_USAGE`; ``--help`` prints its text and gives 0."""
    try:
        return parser.parse_args(argv)
    except UsageError as e:
        print(f"error: {one_line(e)}", file=stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m runtime.explain`` / ``scorecam-explain``; returns the exit status."""
    stdout, stderr = sys.stdout, sys.stderr
    args = parse_cli(build_parser(), argv, stderr)
    if isinstance(args, int):
        return args
    try:
        return run(args, stdout, stderr)
    except (UsageError, *USER_ERRORS) as e:
        print(f"error: {one_line(e)}", file=stderr)
        return EXIT_USAGE
    except OSError as e:  # writing the outputs: disk full, permissions, ... (already rolled back)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or one_line(e)}; nothing was written", file=stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
