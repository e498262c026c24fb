"""int8 classifier for a bundle: static QDQ quantization of ``model.onnx`` -> ``model.int8.onnx``.

``quantize_bundle(bundle_dir, calib)`` runs ONNX Runtime's ``quantize_static`` (QDQ format, per-channel
int8 weights, uint8 activations, MinMax calibration) on the bundle's classifier, leaving the first
``keep_first`` and the last ``keep_fp32`` weighted layers in fp32. The first ones matter most: Score-CAM
feeds the classifier masked inputs ``x * H_k``, mostly small values (the mask is ~0 over much of the
frame), and rounding the input, the stem and the first block to 8 bits over their full calibrated range
adds a per-mask error that the rest of the network carries to the class score (on
EfficientNet-Lite0 the first block in fp32 cuts that error by ~3x, for a few % of the FLOPs; see the
README's "int8 that keeps the map"). The last ones are few FLOPs, and their error would go straight into
every score. Calibration inputs are the given photos and their augmented copies
(mirrored, centre-cropped, zoomed out: :func:`augmentations`), preprocessed exactly as the bundle's
metadata says (``runtime.images``) and, since the int8 graph only ever scores *masked* inputs
``x * H_k``, a few Score-CAM masked copies of each (masks from the bundle's own feature graph), so the
activation ranges cover what the runtime feeds it.

The result carries the classifier's bundle metadata (role ``classifier``, ``sibling_sha256`` = hash of
``features.onnx``'s graph, so :meth:`runtime.bundle.Bundle.load_int8` accepts it) plus the version
entries ``quantization`` (``int8 QDQ ...``) and ``calibration_images``. It is written atomically
(temp file in the bundle dir + ``os.replace``).

A bundle whose weights are external data (``model.onnx.data``) is quantized from a private copy of its data
files in the temporary folder, so ONNX Runtime's quantizer finds
them beside the graph; the int8 model is one file when it fits protobuf's 2 GB limit (int8 weights are a
quarter of the fp32 ones), else ``model.int8.onnx`` + ``model.int8.onnx.data``.

Standalone: ``python -m exporter.quantize BUNDLE_DIR CALIB_DIR_OR_IMAGES... [--masked-per-image N]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from runtime import external
from runtime.bundle import load_bundle
from runtime.contract import FEATURES_FILE, INT8_FILE, BundleError, write_metadata

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
MASKED_PER_IMAGE = 8
KEEP_FIRST = 3  # the first weighted layers left in fp32 (Lite0: the stem and first block; README, int8)
KEEP_FP32 = 2  # the last weighted layers left in fp32 (chosen by measurement: bench/README.md)
AUGMENT = ("flip", "crop", "zoom")
#: bumped whenever the quantization settings change (``version.quantization_recipe`` in the file)
RECIPE = "qdq-u8s8-minmax-aug-first3-keep2-3"


class QuantizeError(RuntimeError):
    """The bundle cannot be quantized as asked (no calibration images, ONNX Runtime refused, ...)."""


def calibration_files(calib: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image paths from a directory (its image files, sorted) or from a list of paths/directories."""
    items = [calib] if isinstance(calib, (str, os.PathLike)) else list(calib)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise QuantizeError(f"calibration image not found: {p}")
    if not files:
        raise QuantizeError(f"no calibration images in {', '.join(map(str, items))} "
                            f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def augmentations(rgb: np.ndarray, kinds: Sequence[str] = AUGMENT) -> Iterator[np.ndarray]:
    """``rgb`` [H,W,3] uint8, then for each of ``kinds``: ``flip`` (mirrored left-right), ``crop`` (the
    central 70 %, so objects fill more of the frame), ``zoom`` (shrunk to half size and padded to the
    original frame with its mean colour, so objects fill less of it)."""
    yield rgb
    h, w = rgb.shape[:2]
    for kind in kinds:
        if kind == "flip":
            yield np.ascontiguousarray(rgb[:, ::-1])
        elif kind == "crop":
            dh, dw = int(h * 0.15), int(w * 0.15)
            yield np.ascontiguousarray(rgb[dh:h - dh or h, dw:w - dw or w])
        elif kind == "zoom":
            from PIL import Image

            small = np.asarray(Image.fromarray(rgb).resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR))
            out = np.empty_like(rgb)
            out[:] = rgb.reshape(-1, 3).mean(axis=0).astype(np.uint8)
            y0, x0 = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
            out[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
            yield out
        else:
            raise QuantizeError(f"unknown augmentation {kind!r}; choose from {', '.join(AUGMENT)}")


def calibration_inputs(bundle, files: Sequence[Path], masked_per_image: int = MASKED_PER_IMAGE,
                       seed: int = 0, augment: Sequence[str] = AUGMENT) -> Iterator[np.ndarray]:
    """[1,3,H,W] float32 inputs: each photo and its ``augment`` copies as preprocessed by the bundle, each
    followed by ``masked_per_image`` copies ``x * norm(up(A_k))`` for channels k drawn (seeded) among
    those with the largest spread."""
    import onnxruntime as ort

    from runtime import images
    from runtime.scorecam import MaskSpec, make_masks

    pre = bundle.meta.preprocessing
    feats = None
    if masked_per_image > 0:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        external.point_to(opts, bundle.data_dir)
        feats = ort.InferenceSession(bundle.features.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    for f in files:
        for rgb in augmentations(images.load_image(f), augment):
            yield from _with_masked(images.preprocess(rgb, pre).astype(np.float32), feats, masked_per_image, rng,
                                    pre.input_size, make_masks, MaskSpec)


def _with_masked(x, feats, masked_per_image, rng, size, make_masks, spec_cls) -> Iterator[np.ndarray]:
    """``x``, then ``masked_per_image`` masked copies of it (none without a feature session)."""
    yield x
    if feats is None:
        return
    acts = feats.run(None, {feats.get_inputs()[0].name: x})[0][0]
    spread = acts.reshape(acts.shape[0], -1).std(axis=1)
    live = np.flatnonzero(spread > 0)
    if live.size == 0:
        return
    top = live[np.argsort(-spread[live], kind="stable")][: max(4 * masked_per_image, 1)]
    pick = rng.choice(top, size=min(masked_per_image, top.size), replace=False)
    for m in make_masks(acts[pick], size, spec_cls()):
        yield (x * m[None, None]).astype(np.float32)


class _Reader:
    """A ``CalibrationDataReader`` over a list of inputs (onnxruntime's base class is duck-typed)."""

    def __init__(self, name: str, inputs: list[np.ndarray]) -> None:
        self.name = name
        self._it = iter(inputs)

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {self.name: x}


def quantize_bundle(bundle_dir: str | os.PathLike, calib: str | os.PathLike | Sequence[str | os.PathLike],
                    masked_per_image: int = MASKED_PER_IMAGE, per_channel: bool = True,
                    preprocess: bool = True, reduce_range: bool = False, out_name: str = INT8_FILE,
                    quiet: bool = True, keep_fp32: int = KEEP_FP32, augment: Sequence[str] = AUGMENT,
                    nodes_to_exclude: Sequence[str] = (), keep_first: int = KEEP_FIRST,
                    inputs: Sequence[np.ndarray] | None = None) -> Path:
    """Write ``<bundle_dir>/model.int8.onnx`` (static QDQ int8 of ``model.onnx``); return its path.

    Args:
        bundle_dir: an exported bundle (``model.onnx`` + ``features.onnx``).
        calib: a directory of calibration photos, or a list of image paths (or directories).
        masked_per_image: Score-CAM-masked copies of each photo added to the calibration set (0: none).
        per_channel: per-output-channel weight scales (recommended for convolutions).
        preprocess: run ``onnxruntime.quantization.quant_pre_process`` (shape inference + graph
            optimisation) first, as ONNX Runtime recommends; falls back to the raw graph if it fails.
        reduce_range: 7-bit weights, for x86 CPUs without VNNI where u8 x s8 products can saturate.
        keep_fp32: the last N weighted nodes (Conv, Gemm, MatMul, in graph order) left in fp32.
        keep_first: the first N weighted nodes left in fp32 (fewer if only they and the last ``keep_fp32``
            would be left: at least one weighted node is quantized).
        inputs: the calibration inputs ([1,3,H,W] float32, preprocessed) instead of those
            :func:`calibration_inputs` makes from ``calib`` (which then only counts the photos).
        augment: augmented copies of each calibration photo (:func:`augmentations`; () for none).
        nodes_to_exclude: more node names left in fp32.

    Activations are uint8 (asymmetric), weights int8 (symmetric): with that pairing ONNX Runtime's CPU
    provider fuses every DQ-Conv-Q into QLinearConv and every residual Add into QLinearAdd (int8
    activations leave the 1x1 convolutions around the residual Adds in float on ORT 1.32, and the int8
    graph is then no faster than fp32).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    bundle = load_bundle(bundle_dir)
    directory = bundle.directory
    files = calibration_files(calib)
    model = bundle.model
    in_name = model.graph.input[0].name
    inputs = list(calibration_inputs(bundle, files, masked_per_image, augment=augment) if inputs is None else inputs)

    big = not external.fits_one_file(model)  # the fp32 graph cannot be one file: keep its weights external
    big_args = dict(save_as_external_data=True, all_tensors_to_one_file=True) if big else {}
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=directory) as tmp:
        src = Path(tmp) / "model.fp32.onnx"
        _copy_data(bundle, Path(tmp))
        onnx.save(model, str(src))
        del model
        if preprocess:
            pre = Path(tmp) / "model.pre.onnx"
            try:
                from onnxruntime.quantization.shape_inference import quant_pre_process

                quant_pre_process(str(src), str(pre), skip_symbolic_shape=False,
                                  **({"save_as_external_data": True, "all_tensors_to_one_file": True,
                                      "external_data_location": "model.pre.onnx.data"} if big else {}))
                src = pre
            except Exception as e:  # the symbolic shape inference refuses some graphs
                if not quiet:
                    print(f"warning: quant_pre_process failed ({type(e).__name__}: {e}); quantizing the raw graph",
                          file=sys.stderr)
        raw = Path(tmp) / "model.int8.raw.onnx"
        exclude = list(nodes_to_exclude)
        if keep_fp32 > 0 or keep_first > 0:
            graph = onnx.load(str(src))
            if _name_nodes(graph):
                onnx.save(graph, str(src), **big_args, **({"location": src.name + ".named.data"} if big else {}))
            exclude = [*fp32_weighted_nodes(graph, keep_first, keep_fp32), *exclude]
            del graph
        try:
            quantize_static(str(src), str(raw), _Reader(in_name, inputs), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=exclude, use_external_data_format=big)
        except Exception as e:
            raise QuantizeError(f"ONNX Runtime could not quantize {bundle.model_path}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        q = onnx.load(str(raw))
        versions = dict(bundle.meta.versions)
        versions["quantization"] = (f"int8 QDQ static (onnxruntime {_ort_version()}, u8 activations, s8 "
                                    f"{'per-channel' if per_channel else 'per-tensor'} weights"
                                    f"{' reduced range' if reduce_range else ''}, MinMax, "
                                    f"{len(exclude)} weighted nodes fp32)")
        versions["quantization_recipe"] = RECIPE
        versions["quantization_fp32_nodes"] = ",".join(exclude)
        versions["calibration_images"] = str(len(files))
        versions["calibration_augment"] = ",".join(augment)
        versions["calibration_inputs"] = str(len(inputs))
        meta = replace(bundle.meta.with_role("classifier", bundle.features_sha256), versions=versions)
        write_metadata(q, meta)
        fd, tmp_out = tempfile.mkstemp(prefix=".model.int8.", suffix=".onnx", dir=directory)
        os.close(fd)
        try:
            if external.fits_one_file(q):
                onnx.save(q, tmp_out)
            else:  # the data file under its final name first: the graph, renamed last, never names a missing one
                onnx.save(q, tmp_out, save_as_external_data=True, all_tensors_to_one_file=True,
                          location=out_name + ".data")
            os.chmod(tmp_out, 0o666 & ~_umask())
            os.replace(tmp_out, directory / out_name)
        except BaseException:
            Path(tmp_out).unlink(missing_ok=True)
            raise
    return directory / out_name


def _copy_data(bundle, folder: Path) -> None:
    """The bundle's external data files copied into ``folder`` under their relative names (streamed by the
    kernel), so the quantizer finds them beside the fp32 graph (onnx's loader refuses hard links and
    symlinks there, as a guard against link attacks)."""
    external.copy_data(bundle.data_files, bundle.directory, folder)


def fp32_weighted_nodes(model: onnx.ModelProto, first: int, last: int) -> list[str]:
    """Names of the weighted nodes left in fp32: the last ``last`` Conv / Gemm / MatMul nodes of ``model``
    and its first ``first`` ones, in graph order, the first ones cut back so that at least one weighted node
    is still quantized (a tiny graph is not left all fp32 by the defaults)."""
    weighted = [node.name for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    tail = last_weighted_nodes(model, last)
    head = weighted[:max(0, min(first, len(weighted) - len(tail) - 1))]
    return [*head, *tail]


def last_weighted_nodes(model: onnx.ModelProto, n: int) -> list[str]:
    """Names of the last ``n`` Conv / Gemm / MatMul nodes of ``model``, in graph order."""
    weighted = [node.name for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    return weighted[-n:] if n > 0 else []


def _name_nodes(model: onnx.ModelProto) -> bool:
    """Give every unnamed node a unique name (``nodes_to_exclude`` works by name); True if any was."""
    taken = {node.name for node in model.graph.node}
    changed = False
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            changed = True
    return changed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m exporter.quantize",
                                 description="Add an int8 (static QDQ) classifier, model.int8.onnx, to a bundle.")
    ap.add_argument("bundle", help="bundle directory (model.onnx + features.onnx)")
    ap.add_argument("calib", nargs="+", help="calibration images: a directory of photos and/or image files")
    ap.add_argument("--masked-per-image", type=int, default=MASKED_PER_IMAGE,
                    help=f"Score-CAM-masked copies of each photo added to the calibration (default {MASKED_PER_IMAGE})")
    ap.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default: per-channel)")
    ap.add_argument("--no-preprocess", action="store_true", help="skip quant_pre_process")
    ap.add_argument("--reduce-range", action="store_true", help="7-bit weights (x86 CPUs without VNNI)")
    ap.add_argument("--keep-first", type=int, default=KEEP_FIRST, metavar="N",
                    help=f"leave the first N Conv/Gemm/MatMul nodes in fp32 (default {KEEP_FIRST}: the stem and "
                         "first block of EfficientNet-Lite0, where int8 rounding of Score-CAM's masked inputs "
                         "costs the most)")
    ap.add_argument("--keep-fp32", type=int, default=KEEP_FP32, metavar="N",
                    help=f"leave the last N Conv/Gemm/MatMul nodes in fp32 (default {KEEP_FP32})")
    ap.add_argument("--no-augment", action="store_true",
                    help="calibrate on the photos only (default: also mirrored, cropped and zoomed-out copies)")
    args = ap.parse_args(argv)
    try:
        out = quantize_bundle(args.bundle, args.calib, masked_per_image=args.masked_per_image,
                              per_channel=not args.per_tensor, preprocess=not args.no_preprocess,
                              reduce_range=args.reduce_range, quiet=False, keep_fp32=args.keep_fp32,
                              keep_first=args.keep_first,
                              augment=() if args.no_augment else AUGMENT)
    except (BundleError, QuantizeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (sibling of {FEATURES_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
