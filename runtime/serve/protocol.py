"""Pure parsing and encoding of the service's requests and responses (no server, no model).

KServe V1 ``:explain`` / ``:predict`` and Open Inference Protocol V2 ``infer`` bodies are plain dicts
in and out; every problem raises :class:`ProtocolError` carrying the HTTP status that names it
(400 malformed, 413 over a limit, 422 a well-formed but unusable value), so these functions can be
fuzzed without a server.

The saliency wire formats (``saliency_encoding``):

- ``b64``: base64 of the float32 little-endian row-major [H,W] map (the default; 4 bytes per pixel);
- ``list``: nested JSON lists [H][W] of floats;
- ``png16``: base64 of a 16-bit grayscale PNG, pixel = round(saliency * 65535) (lossless to 1/65535).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, field

import numpy as np

from ..explainer import BASELINES, FILLS, MODES
from ..fusion import FUSIONS
from ..scorecam import PRESETS
from ..selection import SELECTS
from ..stages import parse_layers

ENCODINGS = ("b64", "list", "png16")
MAX_TOP_K = 1000
TASKS = ("classify", "detect")
MAX_DETECTION = 100_000


class ProtocolError(ValueError):
    """A request the service refuses; ``status`` is the HTTP status that names the cause."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_instances: int = 8
    max_pixels: int = 100_000_000
    max_channels_cap: int | None = None  # None: any positive max_channels


@dataclass
class Options:
    """Request-level parameters (V1 ``parameters``, V2 ``parameters``, or query parameters)."""

    saliency_encoding: str = "b64"
    overlay: bool = False
    alpha: float = 0.5
    preset: str | None = None  # None: the server's
    max_channels: int | None = None  # None: the server's
    exact: bool = False  # True: max_channels explicitly off (all channels) even if the server caps them
    select: str | None = None  # None: the server's (auto, cover, relevance, std: how max_channels chooses channels)
    mode: str | None = None  # None: the server's (scorecam, qrise, preview)
    fill: str | None = None  # None: the server's when it set one, else kernel with max_channels (kernel, zero, preview)
    layers: int | tuple[str, ...] | None = None  # None: the server's; 1: the target layer alone; N or names
    fusion: str | None = None  # None: the server's (poly, product, sum)
    baseline: str | None = None  # None: the server's (zero, blur)
    task: str | None = None  # None: the model's (classify or detect); a request naming the other one is refused
    score_threshold: float | None = None  # detectors: None: the server's


@dataclass
class Instance:
    """One image to explain: its encoded file bytes and which classes."""

    image: bytes
    targets: list | None = None
    top_k: int = 1
    extra: dict = field(default_factory=dict)
    box: list[float] | None = None  # detectors: a box [x1, y1, x2, y2] in the photo's pixels (its class: targets)
    detection: list[int] | None = None  # detectors: the N-th detection(s) by score (0 = best)


# ----------------------------------------------------------------------------------- small parsers


def parse_json(body: bytes) -> dict:
    """The JSON object of a request body (400 when it is not one)."""
    if not body:
        raise ProtocolError(400, "empty request body; send a JSON object (or an image with Content-Type: image/*)")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise ProtocolError(400, "the body is not UTF-8 JSON; to send an image file as the body, set "
                                 "Content-Type: image/jpeg (or image/png, ...)") from None
    except json.JSONDecodeError as e:
        raise ProtocolError(400, f"bad JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ProtocolError(400, "bad JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ProtocolError(400, f"the JSON body must be an object, got {type(data).__name__}")
    return data


def decode_b64(text, what: str) -> bytes:
    """Standard or URL-safe base64 (padding optional; a ``data:...;base64,`` prefix is allowed)."""
    if not isinstance(text, str):
        raise ProtocolError(400, f"{what} must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    if not text:
        raise ProtocolError(400, f"{what} is empty")
    alt = b"-_" if ("-" in text or "_" in text) else None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=alt, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(400, f"{what} is not valid base64") from None


def parse_int(value, what: str, low: int = 1, high: int | None = None) -> int:
    """A whole number in [low, high] (422 otherwise); numeric strings are accepted (query parameters)."""
    if isinstance(value, bool):
        raise ProtocolError(422, f"{what} must be a whole number, got {json.dumps(value)}")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ProtocolError(422, f"{what} must be a whole number, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise ProtocolError(422, f"{what} must be a whole number, got {json.dumps(value, default=str)}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in {low}..{high}"
        raise ProtocolError(422, f"{what} must be {rng}, got {value}")
    return value


def parse_bool(value, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ProtocolError(422, f"{what} must be true or false, got {json.dumps(value, default=str)}")


def parse_targets(value, what: str = "targets") -> list | None:
    """A list of class indices and/or labels (a single one is accepted too); None when absent."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ProtocolError(422, f"{what} is empty; give class indices or labels, or leave it out for top_k")
    out: list = []
    for t in items:
        if isinstance(t, bool) or not isinstance(t, (int, str)) or (isinstance(t, str) and not t.strip()):
            raise ProtocolError(422, f"{what}: a target must be a class index or a label, got "
                                     f"{json.dumps(t, default=str)}")
        out.append(t)
    return out


def split_query_targets(values: list[str]) -> list | None:
    """``?targets=281&targets=tabby`` or ``?targets=281,282``: labels with commas must be repeated
    parameters, one each (a comma-separated item that is a whole label is kept whole)."""
    if not values:
        return None
    out: list = []
    for v in values:
        parts = [p.strip() for p in v.split(",")]
        if len(parts) > 1 and all(p.lstrip("-").isdigit() for p in parts):
            out.extend(parts)
        else:
            out.append(v.strip())
    return parse_targets(out)


def parse_box(value, what: str = "box") -> list[float] | None:
    """A box ``[x1, y1, x2, y2]`` of finite numbers (or ``"x1,y1,x2,y2"``); None when absent. Whether it fits the
    photo is the explainer's check (a 422 naming the cause)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split()]
    if not isinstance(value, list) or len(value) != 4:
        raise ProtocolError(422, f"{what} must be four numbers [x1, y1, x2, y2] in the photo's pixels, got "
                                 f"{json.dumps(value, default=str)[:80]}")
    out = []
    for v in value:
        try:
            f = float(v) if not isinstance(v, bool) and isinstance(v, (int, float, str)) else math.nan
        except ValueError:
            f = math.nan
        if not math.isfinite(f):
            raise ProtocolError(422, f"{what} must be four finite numbers [x1, y1, x2, y2], got "
                                     f"{json.dumps(value, default=str)[:80]}")
        out.append(f)
    return out


def parse_detection(value, what: str = "detection") -> list[int] | None:
    """One detection rank or a list of them (0 = the best detection); None when absent."""
    if value is None:
        return None
    if isinstance(value, str) and "," in value:
        value = [v for v in value.split(",") if v.strip()]
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ProtocolError(422, f"{what} is empty; give detection ranks (0 = the best), or leave it out for top_k")
    if len(items) > MAX_TOP_K:
        raise ProtocolError(413, f"{what}: {len(items)} detections in one request; the limit is {MAX_TOP_K}")
    return [parse_int(v, what, 0, MAX_DETECTION) for v in items]


def check_box_request(inst: Instance, where: str) -> Instance:
    """A box needs exactly one class (``targets``) and excludes ``detection``."""
    if inst.box is not None:
        if inst.detection is not None:
            raise ProtocolError(422, f"{where}: give a box or a detection, not both")
        if not inst.targets or len(inst.targets) != 1:
            raise ProtocolError(422, f"{where}: a box needs its class: give exactly one target "
                                     "(\"targets\": [CLASS], an index or a label)")
    return inst


def parse_options(params, base: Options | None = None) -> Options:
    """Request-level ``parameters`` -> :class:`Options` (422 for a bad value, unknown keys ignored)."""
    opts = Options(**vars(base)) if base else Options()
    if params is None:
        return opts
    if not isinstance(params, dict):
        raise ProtocolError(422, f"parameters must be an object, got {type(params).__name__}")
    if "saliency_encoding" in params:
        enc = params["saliency_encoding"]
        if enc not in ENCODINGS:
            raise ProtocolError(422, f"saliency_encoding must be one of {', '.join(ENCODINGS)}, "
                                     f"got {json.dumps(enc, default=str)}")
        opts.saliency_encoding = enc
    if "overlay" in params:
        opts.overlay = parse_bool(params["overlay"], "overlay")
    if "alpha" in params:
        a = params["alpha"]
        try:
            a = float(a) if not isinstance(a, bool) else None
        except (TypeError, ValueError):
            a = None
        if a is None or not 0.0 <= a <= 1.0:
            raise ProtocolError(422, "alpha must be a number in [0, 1], got "
                                     f"{json.dumps(params['alpha'], default=str)}")
        opts.alpha = a
    if params.get("preset") is not None:
        if not isinstance(params["preset"], str) or params["preset"] not in PRESETS:
            raise ProtocolError(422, f"preset must be one of {', '.join(PRESETS)}, "
                                     f"got {json.dumps(params['preset'], default=str)}")
        opts.preset = params["preset"]
    for key, allowed in (("select", SELECTS), ("mode", MODES), ("fill", FILLS), ("fusion", tuple(FUSIONS)),
                         ("baseline", BASELINES)):
        if params.get(key) is not None:
            if not isinstance(params[key], str) or params[key] not in allowed:
                raise ProtocolError(422, f"{key} must be one of {', '.join(allowed)}, "
                                         f"got {json.dumps(params[key], default=str)}")
            setattr(opts, key, params[key])
    if params.get("layers") is not None:
        try:
            opts.layers = parse_layers(params["layers"]) or 1
        except ValueError as e:
            raise ProtocolError(422, str(e)) from None
    if params.get("task") is not None:
        if not isinstance(params["task"], str) or params["task"] not in TASKS:
            raise ProtocolError(422, f"task must be one of {', '.join(TASKS)}, "
                                     f"got {json.dumps(params['task'], default=str)}")
        opts.task = params["task"]
    if params.get("score_threshold") is not None:
        t = params["score_threshold"]
        try:
            t = float(t) if not isinstance(t, bool) else None
        except (TypeError, ValueError):
            t = None
        if t is None or not 0.0 <= t <= 1.0:
            raise ProtocolError(422, "score_threshold must be a number in [0, 1], got "
                                     f"{json.dumps(params['score_threshold'], default=str)}")
        opts.score_threshold = t
    if "max_channels" in params:
        mc = params["max_channels"]
        if mc in (None, 0, "0", "", "all", "exact"):
            opts.max_channels, opts.exact = None, True
        else:
            opts.max_channels, opts.exact = parse_int(mc, "max_channels"), False
    return opts


# ------------------------------------------------------------------------------------------ V1


def _instance(item, i: int, limits: Limits) -> Instance:
    where = f"instances[{i}]"
    if isinstance(item, str):  # {"instances": ["<b64>"]}: the image alone
        return Instance(decode_b64(item, where))
    if not isinstance(item, dict):
        raise ProtocolError(400, f"{where} must be an object with an \"image\", got {type(item).__name__}")
    img = item.get("image", item.get("b64"))
    if isinstance(img, dict):
        img = img.get("b64")
    if img is None:
        raise ProtocolError(400, f"{where} has no image; send {{\"image\": {{\"b64\": \"<base64 of the file>\"}}}}")
    data = decode_b64(img, f"{where}.image.b64")
    targets = parse_targets(item.get("targets", item.get("target")), f"{where}.targets")
    top_k = parse_int(item.get("top_k", 1), f"{where}.top_k", 1, MAX_TOP_K)
    box = parse_box(item.get("box"), f"{where}.box")
    detection = parse_detection(item.get("detection"), f"{where}.detection")
    return check_box_request(Instance(data, targets, top_k, box=box, detection=detection), where)


def parse_v1(data: dict, limits: Limits) -> tuple[list[Instance], Options]:
    """A V1 ``:explain`` / ``:predict`` body -> (instances, options)."""
    items = data.get("instances")
    if items is None:
        raise ProtocolError(400, "the body has no \"instances\" list")
    if not isinstance(items, list):
        raise ProtocolError(400, f"\"instances\" must be a list, got {type(items).__name__}")
    if not items:
        raise ProtocolError(400, "\"instances\" is empty")
    if len(items) > limits.max_instances:
        raise ProtocolError(413, f"{len(items)} instances in one request; the limit is {limits.max_instances}")
    return [_instance(it, i, limits) for i, it in enumerate(items)], parse_options(data.get("parameters"))


def check_image_header(data: bytes, what: str, max_pixels: int) -> tuple[int, int]:
    """(h, w) from the image header alone, without decoding: 400 if not an image, 413 over the pixel limit."""
    from PIL import Image, UnidentifiedImageError

    from ..images import _formats

    try:
        with Image.open(io.BytesIO(data), formats=_formats()) as img:
            w, h = img.size
    except UnidentifiedImageError:
        raise ProtocolError(400, f"{what}: not an image (supported: {', '.join(_formats())})") from None
    except Image.DecompressionBombError:
        raise ProtocolError(413, f"{what}: too many pixels (possible decompression bomb)") from None
    except Exception as e:  # Pillow's plugins report a damaged header with many exception types
        raise ProtocolError(400, f"{what}: corrupt image header ({type(e).__name__})") from None
    if w < 1 or h < 1:
        raise ProtocolError(400, f"{what}: empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ProtocolError(413, f"{what}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,}")
    return h, w


# ----------------------------------------------------------------------------------- encodings


def encode_saliency(saliency: np.ndarray, encoding: str) -> dict:
    """``{"shape": [H, W], "dtype": "float32", "encoding": ..., "data": ...}`` of a [0,1] map."""
    s = np.ascontiguousarray(np.nan_to_num(np.asarray(saliency, np.float32)), dtype="<f4")
    out = {"shape": [int(s.shape[0]), int(s.shape[1])], "dtype": "float32", "encoding": encoding}
    if encoding == "b64":
        out["data"] = base64.b64encode(s.tobytes()).decode("ascii")
    elif encoding == "list":
        out["data"] = s.tolist()
    elif encoding == "png16":
        out["data"] = base64.b64encode(png16(s)).decode("ascii")
    else:
        raise ProtocolError(422, f"saliency_encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    return out


def decode_saliency(obj: dict) -> np.ndarray:
    """The inverse of :func:`encode_saliency` (for clients and tests): float32 [H,W]."""
    shape = tuple(obj["shape"])
    if obj["encoding"] == "b64":
        return np.frombuffer(base64.b64decode(obj["data"]), "<f4").reshape(shape)
    if obj["encoding"] == "list":
        return np.asarray(obj["data"], np.float32).reshape(shape)
    if obj["encoding"] == "png16":
        from PIL import Image

        with Image.open(io.BytesIO(base64.b64decode(obj["data"]))) as im:
            return (np.asarray(im, np.float64) / 65535.0).astype(np.float32).reshape(shape)
    raise ValueError(f"unknown saliency encoding {obj['encoding']!r}")


def png16(saliency: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG of a [0,1] map: pixel = round(s * 65535)."""
    import cv2

    q = np.rint(np.clip(saliency, 0, 1) * 65535).astype(np.uint16)
    ok, buf = cv2.imencode(".png", q)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def png(rgb: np.ndarray) -> bytes:
    """An RGB uint8 array as PNG bytes."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def finite(x: float) -> float:
    """A JSON-safe float (no NaN / inf ever reaches a response)."""
    x = float(x)
    return x if math.isfinite(x) else 0.0


def result_v1(r, options: Options, overlay_png: bytes | None = None) -> dict:
    """One explained class of one image, as the V1 response writes it."""
    d = {"class_index": int(r.class_index), "label": str(r.label), "probability": finite(r.probability),
         "score": finite(r.score), "channels_used": int(r.channels_used),
         "channels_skipped": int(r.channels_skipped), "seconds": round(finite(r.seconds), 4),
         "provider": str(r.provider), "preset": str(r.preset), "mode": str(r.mode), "select": str(r.select),
         "fill": str(r.fill), "passes": int(r.passes),
         "layers": [str(r.target_layer), *(str(name) for name in r.layers)], "baseline": str(r.baseline),
         "saliency": encode_saliency(r.saliency, options.saliency_encoding)}
    if overlay_png is not None:
        d["overlay"] = {"format": "png", "b64": base64.b64encode(overlay_png).decode("ascii")}
    return d


def prediction(probs: np.ndarray, label_of, k: int = 5) -> list[dict]:
    """The top-k classes of a probability vector: ``[{"class_index", "label", "probability"}]``."""
    order = np.argsort(-probs, kind="stable")[: min(k, probs.shape[0])]
    return [{"class_index": int(i), "label": str(label_of(int(i))), "probability": finite(probs[i])} for i in order]


# ------------------------------------------------------------------------------------------ V2


#: request-level parameters (V1 ``parameters``, V2 ``parameters``, the raw-image route's query)
OPTION_KEYS = ("saliency_encoding", "overlay", "alpha", "preset", "max_channels", "select", "mode", "fill", "layers",
               "fusion", "baseline", "task", "score_threshold")


def parse_v2(data: dict, limits: Limits) -> tuple[list[Instance], Options]:
    """An Open Inference Protocol ``infer`` body -> (instances, options).

    Input ``image``: BYTES [N], each a base64 string of an image file. Request ``parameters`` (or the
    input's): ``top_k``, ``targets`` (list), the V1 options (``preset``, ``max_channels``, ...) and, for a
    detector, ``box`` or ``detection`` (for every image).
    """
    inputs = data.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(400, "the body needs an \"inputs\" list with one BYTES input named \"image\"")
    image = next((i for i in inputs if isinstance(i, dict) and i.get("name") == "image"), None)
    if image is None:
        names = [i.get("name") for i in inputs if isinstance(i, dict)]
        raise ProtocolError(400, f"no input named \"image\" (got {names}); send BYTES [N] base64 image files")
    if image.get("datatype", "BYTES") != "BYTES":
        raise ProtocolError(422, f"input \"image\" must have datatype BYTES, got {image.get('datatype')!r}")
    values = image.get("data")
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not values:
        raise ProtocolError(400, "input \"image\" has no data; send a list of base64 strings")
    if any(isinstance(v, list) for v in values):  # shape [N,1] written nested
        values = [w for v in values for w in (v if isinstance(v, list) else [v])]
    shape = image.get("shape")
    if shape is not None and (not isinstance(shape, list) or math.prod(int(s) for s in shape
                                                                         if isinstance(s, int)) != len(values)):
        raise ProtocolError(400, f"input \"image\" has shape {shape} but {len(values)} values")
    if len(values) > limits.max_instances:
        raise ProtocolError(413, f"{len(values)} images in one request; the limit is {limits.max_instances}")
    params = {**(image.get("parameters") or {}), **(data.get("parameters") or {})} \
        if isinstance(data.get("parameters") or {}, dict) and isinstance(image.get("parameters") or {}, dict) \
        else None
    if params is None:
        raise ProtocolError(422, "parameters must be an object")
    targets = parse_targets(params.get("targets"), "parameters.targets")
    if isinstance(params.get("targets"), str) and "," in params["targets"]:
        targets = split_query_targets([params["targets"]])
    top_k = parse_int(params.get("top_k", 1), "parameters.top_k", 1, MAX_TOP_K)
    box = parse_box(params.get("box"), "parameters.box")
    detection = parse_detection(params.get("detection"), "parameters.detection")
    opts = parse_options({k: v for k, v in params.items() if k in OPTION_KEYS})
    check_box_request(Instance(b"", targets, top_k, box=box, detection=detection), "parameters")
    return [Instance(decode_b64(v, f"image[{i}]"), targets, top_k, box=box, detection=detection)
            for i, v in enumerate(values)], opts


def v2_outputs(results: list[list], input_size: tuple[int, int]) -> list[dict]:
    """V2 outputs of N images x k classes: saliency FP32 [N,k,H,W], class_index INT64 [N,k],
    probability FP32 [N,k], label BYTES [N,k] (row-major flat ``data``, as the protocol writes tensors)."""
    n, k = len(results), len(results[0])
    h, w = input_size
    sal = np.stack([np.stack([np.nan_to_num(r.saliency) for r in rs]) for rs in results]).astype(np.float32)
    return [
        {"name": "saliency", "datatype": "FP32", "shape": [n, k, h, w], "data": sal.ravel().tolist()},
        {"name": "class_index", "datatype": "INT64", "shape": [n, k],
         "data": [int(r.class_index) for rs in results for r in rs]},
        {"name": "probability", "datatype": "FP32", "shape": [n, k],
         "data": [finite(r.probability) for rs in results for r in rs]},
        {"name": "label", "datatype": "BYTES", "shape": [n, k], "data": [str(r.label) for rs in results for r in rs]},
    ]


# ------------------------------------------------------------------------------------ detectors


def result_detect_v1(r, options: Options, overlay_png: bytes | None = None) -> dict:
    """One explained box (:class:`runtime.detect.BoxResult`) as the V1 response writes it: the box (photo pixels),
    class, score, the D-RISE similarity, and the saliency over the photo at the network's scale (letterbox
    padding cut off, as ``python -m runtime.explain`` saves it)."""
    d = {"detection": r.detection, "box": [round(finite(v), 3) for v in r.box], "class_index": int(r.class_index),
         "label": str(r.label), "score": finite(r.score), "similarity": finite(r.similarity),
         "layers": list(r.layers), "channels_used": int(r.channels_used), "passes": int(r.passes),
         "seconds": round(finite(r.seconds), 4), "provider": str(r.provider), "preset": str(r.preset),
         "weighting": str(r.weighting), "fill": str(r.fill), "flat": bool(r.flat),
         "saliency": encode_saliency(r.saliency_cropped(), options.saliency_encoding)}
    if r.note:
        d["note"] = r.note
    if overlay_png is not None:
        d["overlay"] = {"format": "png", "b64": base64.b64encode(overlay_png).decode("ascii")}
    return d


def detection_v1(d) -> dict:
    """One detection of the model (:class:`runtime.detect.Detection`): ``:predict`` on a detector."""
    return {"detection": int(d.index), "box": [round(finite(v), 3) for v in d.box], "class_index": int(d.class_index),
            "label": str(d.label), "score": finite(d.score)}


def v2_detect_outputs(results: list[list], input_size: tuple[int, int]) -> list[dict]:
    """V2 outputs of a detector: the M boxes of all N images in one list (images may have different counts):
    ``image_index`` INT64 [M], ``saliency`` FP32 [M,H,W] (at the network input, letterbox padding included),
    ``content`` INT64 [M,4] (top, left, height, width of the photo in it: crop, then resize to the photo),
    ``box`` FP32 [M,4] (photo pixels), ``detection`` INT64 [M] (-1: a box given by the request), ``class_index``
    INT64 [M], ``score`` FP32 [M], ``similarity`` FP32 [M], ``label`` BYTES [M]."""
    flat = [(i, r) for i, rs in enumerate(results) for r in rs]
    m = len(flat)
    h, w = input_size
    sal = np.stack([np.nan_to_num(r.saliency) for _, r in flat]).astype(np.float32) if m else \
        np.zeros((0, h, w), np.float32)
    return [
        {"name": "image_index", "datatype": "INT64", "shape": [m], "data": [i for i, _ in flat]},
        {"name": "saliency", "datatype": "FP32", "shape": [m, h, w], "data": sal.ravel().tolist()},
        {"name": "content", "datatype": "INT64", "shape": [m, 4],
         "data": [int(v) for _, r in flat for v in r.geometry.content]},
        {"name": "box", "datatype": "FP32", "shape": [m, 4], "data": [finite(v) for _, r in flat for v in r.box]},
        {"name": "detection", "datatype": "INT64", "shape": [m],
         "data": [-1 if r.detection is None else int(r.detection) for _, r in flat]},
        {"name": "class_index", "datatype": "INT64", "shape": [m], "data": [int(r.class_index) for _, r in flat]},
        {"name": "score", "datatype": "FP32", "shape": [m], "data": [finite(r.score) for _, r in flat]},
        {"name": "similarity", "datatype": "FP32", "shape": [m], "data": [finite(r.similarity) for _, r in flat]},
        {"name": "label", "datatype": "BYTES", "shape": [m], "data": [str(r.label) for _, r in flat]},
    ]
