"""Property-based fuzzing (hypothesis) of the runtime's input edges: every case ends in a result or in
the one-line error of the documented type, never another exception, a traceback or a bad result.

Targets (each a hypothesis test function, see :data:`TARGETS`):

- ``image_bytes``: :func:`runtime.images.load_image` on mutated encodings of real images (PNG 8/16-bit,
  palette with transparency, grayscale, JPEG RGB/L/CMYK, BMP, GIF, WebP, TIFF, PPM, TGA: bytes flipped,
  spliced, inserted, truncated) and on random bytes behind each format's magic -> RGB uint8 or ImageError;
- ``image_arrays``: arrays of any dtype and shape -> RGB uint8 or ImageError;
- ``bundle_metadata``: :meth:`runtime.contract.BundleMeta.from_props` on metadata_props with wrong
  types, bad JSON, NaN/inf, odd labels -> a sane BundleMeta or BundleError;
- ``bundle_files``: :func:`runtime.bundle.load_bundle` on a real tiny bundle whose metadata was
  rewritten (roles, hashes, keys dropped or garbled) -> a Bundle or BundleError;
- ``sidecar``: :meth:`runtime.thirdparty.Options.make` with a random sidecar ``MODEL.json`` (and labels
  file) -> Options or BundleError.

``python -m tests.fuzz --minutes 10`` runs them all, round-robin with fresh seeds, for that long;
the test suite runs a bounded, reproducible (derandomized) share of it (tests/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.bundle import load_bundle
from runtime.contract import PREFIX, BundleError, BundleMeta
from runtime.images import ImageError, load_image
from runtime.thirdparty import Options

FUZZ_MAX_PIXELS = 4_000_000  # the pixel limit under fuzzing (header-claimed sizes beyond it are refused)


def one_line(e: BaseException) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)


# ----------------------------------------------------------------------------------------- images


def _seed_images() -> dict[str, bytes]:
    """Small valid encodings of many kinds, the starting points of the mutations."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
    out: dict[str, bytes] = {}

    def save(name, img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out[name] = buf.getvalue()

    save("png", rgb, "PNG")
    save("png16", Image.fromarray(rng.integers(0, 65535, (9, 12), dtype=np.uint16)), "PNG")
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    save("png_palette_alpha", pal, "PNG", transparency=0)
    save("png_la", rgb.convert("LA"), "PNG")
    save("jpeg", rgb, "JPEG", quality=80)
    save("jpeg_gray", rgb.convert("L"), "JPEG")
    save("jpeg_cmyk", rgb.convert("CMYK"), "JPEG")
    save("bmp", rgb, "BMP")
    save("gif", rgb.convert("P"), "GIF")
    save("webp", rgb, "WEBP")
    save("tiff", rgb, "TIFF")
    save("tiff_float", Image.fromarray(rng.random((9, 12)).astype(np.float32)), "TIFF")
    save("ppm", rgb, "PPM")
    save("tga", rgb, "TGA")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    save("jpeg_exif", rgb, "JPEG", exif=exif.tobytes())
    return out


SEEDS = _seed_images()
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"II*\0", b"MM\0*",
          b"P6\n", b"P5\n", b""]

mutation = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "splice"]), st.floats(0, 1),
                     st.integers(0, 255), st.integers(1, 64))


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, where, byte, n in ops:
        i = min(int(where * len(b)), max(len(b) - 1, 0))
        if op == "flip" and b:
            b[i] ^= 1 << (byte % 8)
        elif op == "set" and b:
            b[i] = byte
        elif op == "insert":
            b[i:i] = bytes([byte]) * n
        elif op == "delete":
            del b[i:i + n]
        elif op == "splice" and b:
            j = (i + 37 * n) % len(b)
            b[i:i + n] = b[j:j + n]
    return bytes(b)


def check_image(data: bytes) -> None:
    said = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(said):
            warnings.simplefilter("error")  # no warning may reach the user's terminal, nor anything logged
            rgb = load_image(io.BytesIO(data), max_pixels=FUZZ_MAX_PIXELS)
    except ImageError as e:
        one_line(e)
        assert not said.getvalue(), said.getvalue()
        return
    assert not said.getvalue(), said.getvalue()
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[0] >= 1 and rgb.shape[1] >= 1
    assert rgb.shape[0] * rgb.shape[1] <= FUZZ_MAX_PIXELS


def image_bytes(seed: str, ops, cut: float) -> None:
    data = mutate(SEEDS[seed], ops)
    if cut < 0.3:  # truncated files are the commonest damage
        data = data[: int(len(data) * cut / 0.3)]
    check_image(data)


def image_random_bytes(magic: bytes, tail: bytes) -> None:
    check_image(magic + tail)


dtypes = st.sampled_from([np.uint8, np.uint16, np.int8, np.float32, np.float64, np.bool_, np.int64])
shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)


def image_arrays(dtype, shape, fill: int) -> None:
    arr = np.full(shape, fill).astype(dtype)
    try:
        rgb = load_image(arr)
    except ImageError as e:
        one_line(e)
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and min(rgb.shape) >= 1


# ------------------------------------------------------------------------------------ bundle metadata

VALID = {"format": "1", "role": "classifier", "layer": "body.3", "input_size": "[32, 32]", "color_order": "RGB",
         "scale": "0.00392156862745098", "mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]",
         "output_kind": "logits", "sibling_sha256": "ab" * 32, "labels": '["a", "b", "c"]'}

json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8)


def _as_text(value) -> str:
    return json.dumps(value)  # NaN and Infinity included, as Python's json writes (and reads) them


prop_value = st.one_of(json_value.map(_as_text), st.text(max_size=24),
                       st.sampled_from(["NaN", "Infinity", "-1", "[1e400, 3]", "[0, 5]", "[3]", "[32, 32, 1]",
                                        '"abc"', "{}", "[]", "[NaN, 1, 1]", "[1, 1, Infinity]", "[0, 0, 0]",
                                        "BGR", "rgb", "probabilities", "features", "1e-320", "0"]))


def bundle_metadata(changes: dict, dropped: set) -> None:
    props = {PREFIX + k: v for k, v in {**VALID, **changes}.items() if k not in dropped}
    try:
        meta = BundleMeta.from_props(props, source="fuzz")
    except BundleError as e:
        one_line(e)
        return
    pre = meta.preprocessing
    h, w = pre.input_size
    assert isinstance(h, int) and isinstance(w, int) and h >= 1 and w >= 1
    assert all(math.isfinite(v) for v in (*pre.mean, *pre.std, pre.scale)) and all(v != 0 for v in pre.std)
    assert meta.labels is None or (isinstance(meta.labels, tuple) and all(isinstance(s, str) for s in meta.labels))
    assert meta.role in ("classifier", "features") and meta.output_kind in ("logits", "probabilities")
    x = pre.apply(np.full((h, w, 3), 128, np.uint8)) if h * w <= 4096 else None
    assert x is None or np.isfinite(x).all()


_BUNDLE_DIR: Path | None = None


def _bundle_dir() -> Path:
    global _BUNDLE_DIR
    if _BUNDLE_DIR is None:
        from tests.bundles import make_bundle

        _BUNDLE_DIR = make_bundle(Path(tempfile.mkdtemp(prefix="scorecam-fuzz-")) / "bundle", size=16, channels=4)
    return _BUNDLE_DIR


def bundle_files(which: str, changes: dict, dropped: set) -> None:
    import onnx

    src = _bundle_dir()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name in ("model.onnx", "features.onnx"):
            m = onnx.load(str(src / name))
            if name == which:
                props = {p.key: p.value for p in m.metadata_props}
                props.update({PREFIX + k: v for k, v in changes.items()})
                for k in dropped:
                    props.pop(PREFIX + k, None)
                del m.metadata_props[:]
                for k, v in props.items():
                    e = m.metadata_props.add()
                    e.key, e.value = k, v
            onnx.save(m, str(d / name))
        try:
            bundle = load_bundle(d)
        except BundleError as e:
            one_line(e)
            return
        assert bundle.meta.role == "classifier"


def sidecar(side, raw, labels_text) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = d / "model.onnx"
        (d / "model.json").write_text(raw if raw is not None else json.dumps(side))
        if labels_text is not None:
            (d / "labels.json").write_text(labels_text)
            if isinstance(side, dict) and "labels" in side:
                side["labels"] = "labels.json"
                (d / "model.json").write_text(json.dumps(side))
        try:
            opts = Options.make(model)
        except BundleError as e:
            one_line(e)
            return
        if opts.input_size is not None:
            assert all(isinstance(v, int) and v >= 1 for v in opts.input_size)
        for vals in (opts.mean, opts.std):
            assert vals is None or (len(vals) == 3 and all(math.isfinite(v) for v in vals))
        assert opts.std is None or all(v != 0 for v in opts.std)
        assert opts.scale is None or (math.isfinite(opts.scale) and opts.scale != 0)
        assert opts.labels is None or all(isinstance(s, str) for s in opts.labels)
        opts.preprocessing(opts.input_size or (8, 8))  # the preprocessing these options make is valid


#: name -> (check function, its hypothesis strategies by argument)
_PROPS = st.dictionaries(st.sampled_from(sorted(VALID)), prop_value, max_size=4)
_DROPPED = st.sets(st.sampled_from(sorted(VALID)), max_size=2)
_SIDE_KEYS = st.sampled_from(["input_size", "mean", "std", "scale", "color_order", "labels", "layer", "size"])
TARGETS = {
    "image_bytes": (image_bytes, dict(seed=st.sampled_from(sorted(SEEDS)), ops=st.lists(mutation, max_size=6),
                                      cut=st.floats(0, 1))),
    "image_random_bytes": (image_random_bytes, dict(magic=st.sampled_from(MAGICS), tail=st.binary(max_size=512))),
    "image_arrays": (image_arrays, dict(dtype=dtypes, shape=shapes, fill=st.integers(0, 255))),
    "bundle_metadata": (bundle_metadata, dict(changes=_PROPS, dropped=_DROPPED)),
    "bundle_files": (bundle_files, dict(which=st.sampled_from(["model.onnx", "features.onnx"]), changes=_PROPS,
                                        dropped=_DROPPED)),
    "sidecar": (sidecar, dict(side=st.one_of(st.dictionaries(_SIDE_KEYS, json_value, max_size=4), json_value),
                              raw=st.one_of(st.none(), st.text(max_size=40)),
                              labels_text=st.one_of(st.none(), st.text(max_size=60), json_value.map(_as_text)))),
}


def run(target: tuple, examples: int, seed: int | None = None, derandomize: bool = False) -> int:
    """Run one target for up to ``examples`` cases (no example database, no deadline: timings vary on busy
    machines); the number of cases run (fewer when hypothesis exhausts a small input space)."""
    check, strategies = target
    calls = 0

    def counted(**kw):
        nonlocal calls
        calls += 1
        check(**kw)

    fn = settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
                  suppress_health_check=list(HealthCheck))(given(**strategies)(counted))
    if seed is not None and not derandomize:
        from hypothesis import seed as hseed

        fn = hseed(seed)(fn)
    fn()
    return calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default 10)")
    p.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS))
    p.add_argument("--batch", type=int, default=500, help="cases per target per round (default 500)")
    args = p.parse_args(argv)
    end = time.monotonic() + args.minutes * 60
    counts = dict.fromkeys(args.targets, 0)
    rounds = 0
    while time.monotonic() < end:
        for name in args.targets:
            s = random.randrange(2**32)
            try:
                counts[name] += run(TARGETS[name], args.batch, seed=s)
            except Exception as e:
                print(f"FAIL {name} (seed {s}): {type(e).__name__}: {e}", file=sys.stderr)
                return 1
            if time.monotonic() >= end:
                break
        rounds += 1
        print(f"round {rounds}: " + ", ".join(f"{k} {v}" for k, v in counts.items()), file=sys.stderr, flush=True)
    print(json.dumps({"cases": counts, "total": sum(counts.values()), "minutes": args.minutes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["TARGETS", "run"]
