"""``python -m runtime.explain DETECTOR IMAGE ...``: the command line for detectors (flags added to runtime.explain).

A detector is recognised by its outputs or metadata (``--task detect`` forces it). For every image and box it
writes ``OUT/<stem>.det<N>.png`` (the overlay with the box drawn, at the photo's size), ``.npy`` (the saliency
over the photo at the network's scale, letterbox padding cut off: float32 [h,w] in [0,1]) and ``.json`` (box in
the photo's pixels, class, label, score, similarity, layers); a box given with ``--box`` is ``<stem>.box``.
Same rules as for classifiers: everything checked before anything is written, staged files, one ``error:``
line and exit 2 for a bad input (a box outside the image or empty, an unknown class, no detection).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

TASKS = ("auto", "classify", "detect")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The detector flags of ``runtime.explain``."""
    from .explainer import DEFAULT_NMS_IOU, DEFAULT_SCORE_THRESHOLD, WEIGHTINGS
    from .heads import KINDS

    g = p.add_argument_group("object detectors (YOLOv8/v11, YOLOv5, torchvision SSD / RetinaNet / Faster R-CNN)")
    g.add_argument("--task", choices=TASKS, default="auto",
                   help="auto (default: a detector is recognised by its outputs / metadata), classify or detect")
    g.add_argument("--detection", metavar="N", type=int, nargs="+", default=None,
                   help="explain the N-th detection(s) of the model on the image, by score (0 = best); default: the "
                        "top --top-k detections, each its own map")
    g.add_argument("--box", metavar=("X1", "Y1", "X2", "Y2"), nargs=4, type=float, default=None,
                   help="explain this box (the photo's pixels) for the class given with --target (a detector with "
                        "random weights detects little: name the box and the class)")
    g.add_argument("--score-threshold", metavar="S", type=float, default=DEFAULT_SCORE_THRESHOLD,
                   help=f"a proposal is a detection from this score up (default {DEFAULT_SCORE_THRESHOLD})")
    g.add_argument("--nms-iou", metavar="T", type=float, default=DEFAULT_NMS_IOU,
                   help=f"non-maximum suppression IoU for raw heads (default {DEFAULT_NMS_IOU})")
    g.add_argument("--letterbox", action=argparse.BooleanOptionalAction, default=None,
                   help="letterbox the photo into the input (default: the sidecar's / metadata's; Ultralytics "
                        "exports: yes; others: stretch)")
    g.add_argument("--head", choices=KINDS, default=None, help="the head's kind when it is not recognised")
    g.add_argument("--weighting", choices=WEIGHTINGS, default="centred",
                   help="part weights from the D-RISE similarity s: centred (s - mean s, default), similarity (s) or "
                        "softmax")


def is_detection_run(args) -> bool:
    from .model import looks_like_detector

    task = getattr(args, "task", "auto")
    return task == "detect" or (task == "auto" and looks_like_detector(args.model))


def explainer_kwargs(args) -> dict:
    """``DetectionExplainer`` keyword arguments from the command line (runtime.explain's and ours)."""
    return {"device": args.device, "batch_size": args.batch_size, "preset": args.preset, "threads": args.threads,
            "max_channels": args.max_channels, "layer": args.layer or "auto",
            "select": "auto" if args.select == "relevance" else args.select, "fill": args.fill,
            "weighting": args.weighting, "score_threshold": args.score_threshold, "nms_iou": args.nms_iou,
            "input_size": args.size, "mean": args.mean, "std": args.std, "scale": args.scale, "bgr": args.bgr,
            "labels": args.labels, "letterbox": args.letterbox, "head": args.head}


def run(args, stdout, stderr) -> int:
    """Explain boxes of every image into staged files, commit them, print one line (or JSON) per box."""
    from .. import images
    from ..explain import ProgressBar, UsageError, _jsonable, _load_images, _prepare_out, _save_png, _Staged
    from .explainer import DetectionExplainer
    from .model import format_levels, open_detector

    if args.list_layers:
        det = open_detector(args.model, input_size=args.size, head=args.head)
        side = min(det.input_size) / 4
        auto = max((lv for lv in det.neck if lv.stride * 2 <= side), key=lambda lv: lv.stride, default=None)
        print(format_levels(det, auto.name if auto else None), file=stdout)
        return 0
    if not args.images:
        raise UsageError("the following arguments are required: IMAGE")
    if args.mode != "scorecam" or args.precision != "fp32":
        raise UsageError("detectors are explained with --mode scorecam and --precision fp32")
    if args.box is not None and args.detection is not None:
        raise UsageError("give --box or --detection, not both")
    if args.box is not None and not args.target:
        raise UsageError("--box needs the class: add --target CLASS")
    if args.target and args.box is None:
        raise UsageError("--target names the class of a --box for a detector; to pick detections use --detection N")
    if args.target and len(args.target) != 1:
        raise UsageError("--box takes one --target class")
    items = _load_images(args.images, args.max_pixels)
    ex = DetectionExplainer(args.model, **explainer_kwargs(args))
    target = args.target[0] if args.target else None
    if target is not None:
        ex.class_index(target)  # an unknown class fails before any work
    bar = ProgressBar(stderr, stderr.isatty() if args.progress is None else args.progress)
    staged = _Staged(args.out)
    lines: list[str] = []
    try:
        _prepare_out(args.out, staged)
        for i, item in enumerate(items, 1):
            bar.start(f"[{i}/{len(items)}] {item.path.name}")
            rgb = item.rgb if item.rgb is not None else images.load_image(item.path, args.max_pixels)
            results = ex.explain(rgb, detection=args.detection, box=args.box, target=target, top_k=args.top_k,
                                 progress=bar)
            bar.finish()
            for r in results:
                tag = "box" if r.detection is None else f"det{r.detection}"
                stem = args.out / f"{item.stem}.{tag}"
                png, npy, js = (Path(f"{stem}.{ext}") for ext in ("png", "npy", "json"))
                record = {"image": item.arg, **r.to_dict(),
                          "outputs": {"overlay": str(png), "saliency": str(npy), "json": str(js)}}
                pic = r.overlay(rgb, args.alpha)
                staged.write(png, lambda f, pic=pic: _save_png(pic, f))
                staged.write(npy, lambda f, r=r: np.save(f, r.saliency_cropped()))
                text = json.dumps(record, default=_jsonable)
                staged.write(js, lambda f, text=text: f.write((text + "\n").encode()))
                lines.append(text if args.json else
                             f"{item.arg}: {tag} class {r.class_index} {r.label!r} score={r.score:.4f} box="
                             f"[{' '.join(f'{v:.0f}' for v in r.box)}] {r.seconds:.2f}s {r.provider} -> {png}")
            item.rgb = None
        staged.commit()
    except BaseException:
        bar.finish()
        staged.rollback()
        raise
    for line in lines:
        print(line, file=stdout)
    stdout.flush()
    return 0
