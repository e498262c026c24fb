"""``python -m exporter annotate MODEL.onnx``: make a bundle out of a third-party ONNX classifier (or object
detector), once.

    python -m exporter annotate resnet50.onnx --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 \\
        --labels imagenet.txt [--scale S] [--size H W] [--bgr] [--layer NAME] [--output NAME] [--out OUT]

Writes a bundle (``model.onnx`` + ``features.onnx``, metadata and sibling hashes as the exporter
writes them), so later runs need no flags: ``python -m runtime.explain OUT image.jpg``.

What is written: the classifier *normalised* to the bundle contract by :mod:`runtime.thirdparty`
(input ``input`` NCHW float32 with a dynamic batch, output ``logits``, a trailing Softmax cut off,
so it computes logits where the original may have computed probabilities) and the feature graph
extracted from it. The metadata never goes into the original file: a feature graph derived at load
time could not carry a hash that the original's metadata promised, so both graphs are written
together and each records the other's hash (the runtime refuses a pair whose hashes differ).

``--out`` is a directory (default: ``<stem>/`` beside the model) that receives ``model.onnx`` and
``features.onnx``, or a path ending in ``.onnx`` for the classifier, ``features.onnx`` beside it.
Needs no torch: numpy, onnx and onnxruntime only.

An object detector (recognised by its outputs, or ``--task detect``; docs/detection.md) needs no feature graph:
the runtime takes its feature maps from the detector itself. Annotating it writes a copy of the graph, unchanged,
carrying the ``scorecam.task = detect`` metadata :mod:`runtime.detect` reads: input size, colour order, scale,
mean, std, letterbox, labels, the head's kind and whether its class scores have a background column. Flags win
over the sidecar, the sidecar over what the model says about itself (an Ultralytics export: its ``imgsz``,
letterbox, class names), and those over the detectors' defaults (RGB, 1/255, mean 0, std 1, stretched)::

    python -m exporter annotate yolov8n.onnx --out models/yolov8n          # then: runtime.explain yolov8n a.jpg
    python -m exporter annotate ssd.onnx --task detect --size 320 320 --labels coco.txt --no-letterbox
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

EXIT_USAGE = 2


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise _UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m exporter annotate",
                description="Write Score-CAM bundle metadata for a third-party ONNX image classifier (a bundle: "
                            "model.onnx + features.onnx) or object detector (model.onnx carrying its preprocessing), "
                            "so that later runs need no flags.")
    p.add_argument("model", metavar="MODEL.onnx", type=Path, help="the ONNX classifier or detector (no bundle "
                   "metadata)")
    p.add_argument("--mean", nargs=3, metavar="M", help="per-channel mean of x = (pixel*scale - mean)/std "
                   "(a classifier: required unless the sidecar MODEL.json gives it; a detector: default 0 0 0)")
    p.add_argument("--std", nargs=3, metavar="S", help="per-channel std (a classifier: required unless the sidecar "
                   "gives it; a detector: default 1 1 1)")
    p.add_argument("--scale", type=float, metavar="S", help="pixel scale (default 1/255)")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                   help="input size (default: the model's; 224x224 when its height/width are dynamic)")
    p.add_argument("--bgr", action="store_true", help="the model expects BGR pixels (default RGB)")
    p.add_argument("--labels", metavar="FILE", help="class labels: text (one per line) or JSON (list or {index: name})")
    p.add_argument("--layer", metavar="NAME", help="target layer tensor (default: automatic; see "
                   "python -m runtime.explain MODEL --list-layers)")
    p.add_argument("--output", metavar="NAME", help="the class-score output when the model has several "
                   "(default: the first 2-D one)")
    p.add_argument("--out", metavar="OUT", type=Path,
                   help="bundle directory, or OUT.onnx (features.onnx is written beside it); default <stem>/ "
                        "beside the model")
    from runtime.detect.heads import KINDS

    g = p.add_argument_group("object detectors")
    g.add_argument("--task", choices=("auto", "classify", "detect"), default="auto",
                   help="auto (default: a detector is recognised by its outputs), classify or detect")
    g.add_argument("--letterbox", action=argparse.BooleanOptionalAction, default=None,
                   help="the detector takes the photo letterboxed (scaled to fit, grey 114 padding) rather than "
                        "stretched (default: the sidecar's / the model's own, Ultralytics: yes; else no)")
    g.add_argument("--head", choices=KINDS, default=None,
                   help="the head's kind, when it is not recognised from the outputs")
    g.add_argument("--background", action=argparse.BooleanOptionalAction, default=None,
                   help="the class scores (boxes + scores [N,C], no NMS in the graph) have a background class in "
                        "column 0, softmax-style (torchvision SSD / Faster R-CNN); default no")
    return p


def _targets(model: Path, out: Path | None) -> tuple[Path, Path]:
    from runtime.contract import FEATURES_FILE, MODEL_FILE, BundleError

    if out is None:
        out = model.with_suffix("") if model.suffix else model.with_name(model.name + ".bundle")
    if out.suffix.lower() == ".onnx":
        if out.name == FEATURES_FILE:
            raise BundleError(f"--out {out}: {FEATURES_FILE} is the feature graph's name; choose another file name")
        model_path, features_path = out, out.with_name(FEATURES_FILE)
    else:
        if out.exists() and not out.is_dir():
            raise BundleError(f"--out {out} is a file; give a directory or a path ending in .onnx")
        model_path, features_path = out / MODEL_FILE, out / FEATURES_FILE
    for p in (model_path, features_path):
        if p.exists() and model.exists() and os.path.samefile(p, model):
            raise BundleError(f"--out would overwrite the source model {model}; choose another --out")
    return model_path, features_path


def _detector_target(model: Path, out: Path | None) -> Path:
    from runtime.contract import MODEL_FILE, BundleError

    if out is None:
        out = model.with_suffix("") if model.suffix else model.with_name(model.name + ".bundle")
    if out.suffix.lower() != ".onnx":
        if out.exists() and not out.is_dir():
            raise BundleError(f"--out {out} is a file; give a directory or a path ending in .onnx")
        out = out / MODEL_FILE
    if out.exists() and model.exists() and os.path.samefile(out, model):
        raise BundleError(f"--out would overwrite the source model {model}; choose another --out")
    return out


def annotate_detector(args: argparse.Namespace) -> Path:
    """Write the detector with its preprocessing in its metadata (module doc), check that it opens as written
    without flags, and return the path written."""
    import onnx

    from runtime.contract import BundleError
    from runtime.detect.model import detection_props, open_detector

    model = args.model
    if args.layer or args.output:
        raise BundleError("--layer and --output are for classifiers; a detector's feature maps are chosen per box "
                          "(python -m runtime.explain MODEL --list-layers; --layer at explain time)")
    # everything resolved as the runtime would resolve it (flags > sidecar > the model's own > defaults)
    det = open_detector(model, input_size=args.size, mean=args.mean, std=args.std, scale=args.scale,
                        bgr=args.bgr or None, labels=args.labels, letterbox=args.letterbox, head=args.head)
    background = bool(args.background)
    if background and (det.head.kind != "boxes" or det.head.nms_in_graph):
        raise BundleError("--background applies to a boxes + scores [N,C] head without NMS in the graph; this "
                          f"detector's head is {det.head.kind}" + (" with NMS" if det.head.nms_in_graph else ""))
    for w in det.warnings:
        print(f"warning: {w}", file=sys.stderr)
    target = _detector_target(model, args.out)
    try:
        proto = onnx.load(str(model))
    except Exception as e:
        raise BundleError(f"{model} is not a valid ONNX model ({type(e).__name__})") from None
    props = detection_props(det.preprocessing, det.letterbox, det.labels, det.head.kind, background)
    kept = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".annotate-", dir=target.parent))
    try:
        big = proto.ByteSize() > 2**31 - 2**20
        onnx.save_model(proto, tmp / target.name, save_as_external_data=big,
                        location=f"{target.name}.data" if big else None)
        for f in tmp.iterdir():
            os.replace(f, target.parent / f.name)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    again = open_detector(target)  # the file opens as annotated, with no flag
    pre = again.preprocessing
    if (again.input_size, again.letterbox, again.head.kind, again.labels) != \
            (det.input_size, det.letterbox, det.head.kind, det.labels):
        raise BundleError(f"{target} does not read back as annotated; it was not kept")
    print(f"wrote {target}: detector, head {again.head.kind} ({again.head.num_classes or '?'} classes"
          f"{', background column 0' if again.head.background else ''}"
          f"{', NMS in the graph' if again.head.nms_in_graph else ''}), input {pre.input_size[0]}x{pre.input_size[1]} "
          f"{pre.color_order} {'letterboxed' if again.letterbox else 'stretched'}, scale {pre.scale:.6g}, mean "
          f"{' '.join(f'{v:g}' for v in pre.mean)}, std {' '.join(f'{v:g}' for v in pre.std)}, "
          + (f"{len(again.labels)} labels" if again.labels else "no labels")
          + f"; feature levels at strides {' '.join(f'{lv.stride:g}' for lv in again.neck)}")
    return target


def annotate(args: argparse.Namespace) -> Path:
    """Derive, write and re-check the bundle; return the classifier path written (a detector: the detector)."""
    import onnx

    from runtime.bundle import load_bundle, load_onnx
    from runtime.contract import PREFIX, BundleError, read_props
    from runtime.thirdparty import Options, derive_checked, make_meta, write_pair

    model = args.model
    if not model.is_file():
        raise BundleError(f"model not found: {model}")
    header = load_onnx(model, "model")
    if any(k.startswith(PREFIX) for k in read_props(header)):
        raise BundleError(f"{model} already carries Score-CAM bundle metadata; nothing to annotate")
    if args.task == "detect" or (args.task == "auto" and _looks_like_detector(model)):
        return annotate_detector(args)
    if args.letterbox is not None or args.head or args.background is not None:
        raise BundleError("--letterbox, --head and --background are for object detectors; this model is a "
                          "classifier (--task detect if it is a detector)")
    opts = Options.make(model, layer=args.layer, output=args.output, input_size=args.size, mean=args.mean,
                        std=args.std, scale=args.scale, bgr=args.bgr or None, labels=args.labels)
    if opts.mean is None or opts.std is None:
        raise BundleError("give the model's normalisation with --mean M M M --std S S S (or a sidecar "
                          f"{model.with_suffix('.json').name}): it is written into the bundle for good")
    model_path, features_path = _targets(model, args.out)
    try:
        source = onnx.load(str(model))
    except Exception as e:
        raise BundleError(f"{model} is not a valid ONNX model ({type(e).__name__})") from None
    d = derive_checked(source, opts.layer, opts.output, opts.input_size)
    meta = make_meta(d, opts)
    for w in d.prepared.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if d.max_batch:
        raise BundleError(f"the model's batch size is fixed to {d.max_batch} and could not be made dynamic; a "
                          "bundle needs a dynamic batch (explain the model directly: it is scored one image at a time)")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".annotate-", dir=model_path.parent))
    try:
        write_pair(d, meta, tmp / model_path.name, tmp / features_path.name)
        os.replace(tmp / features_path.name, features_path)
        os.replace(tmp / model_path.name, model_path)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    load_bundle(model_path)  # the contract holds: metadata parse, sibling hashes
    cand = d.prepared.info.candidate(d.layer)
    pre = meta.preprocessing
    print(f"wrote {model_path} + {features_path.name}: layer {d.layer} ({cand.channels} channels, "
          f"{cand.spatial[0]}x{cand.spatial[1]}), input {pre.input_size[0]}x{pre.input_size[1]} {pre.color_order}, "
          f"output {d.prepared.source_output!r}" + (f" ({d.prepared.softmax_cut} cut off: logits)"
                                                      if d.prepared.softmax_cut else "")
          + (f", {len(meta.labels)} labels" if meta.labels else ", no labels"))
    return model_path


def _looks_like_detector(model: Path) -> bool:
    from runtime.detect.model import looks_like_detector

    return looks_like_detector(model)


def main(argv=None) -> int:
    from runtime.contract import BundleError
    from runtime.engine import EngineError

    try:
        args = build_parser().parse_args(argv)
        annotate(args)
    except (_UsageError, BundleError, EngineError, ValueError, OSError) as e:
        text = str(e) if not isinstance(e, OSError) else f"{e.strerror or e}: {e.filename or ''}"
        print(f"error: {text}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
