"""The batch job's core, shared by both engines: settings, the row schema, THE per-image function
(:func:`explain_file`), parquet parts, ``run.json`` and resuming.

Output folder ``DIR``::

    DIR/run.json                  settings, their key, versions, and one record per run (counts, time)
    DIR/results.parquet/*.parquet one row per image x class (an unusable image: one row with ``error``)
    DIR/maps/ab/<sha256>.<class>.npy      the saliency, float32 [H,W] in [0,1] at the network's input size
    DIR/overlays/ab/<sha256>.<class>.png  with --overlays: the JET overlay at the image's own size

An object detector (``task`` ``detect``, docs/detection.md) gives one row per box instead: its box in the
photo's pixels, class, score, detection rank and D-RISE similarity; the map ``<sha256>.det<N>.npy`` (a box
given with ``--box``: ``<sha256>.box.npy``) is the saliency over the photo at the network's scale (letterbox
padding cut off, as ``python -m runtime.explain`` writes it); the overlay has the box drawn.

Every file is written atomically (a hidden temporary name, then a rename), and a row only after its
map exists, so a crash loses at most the images in flight. Resuming skips every image that has rows
made with the same settings (their key is in each row) for the same file content (sha256).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__, images
from ..bundle import resolve_model_path
from ..cliargs import one_line
from ..contract import MODEL_FILE, BundleError
from ..engine import EngineError
from ..explainer import Explainer, TargetError, default_fill
from ..images import ImageError
from ..thirdparty import file_sha256, model_sha256

RESULTS = "results.parquet"
RUN_JSON = "run.json"
MAPS = "maps"
OVERLAYS = "overlays"
USER_ERRORS = (BundleError, EngineError, ImageError, TargetError, ValueError)

#: the columns of results.parquet, in order: (name, pyarrow type name)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("source", "string"),          # the file's absolute path
    ("sha256", "string"),          # of the file's bytes (null when the file could not be read)
    ("width", "int32"),            # of the image (null when it could not be decoded)
    ("height", "int32"),
    ("class_index", "int32"),      # the explained class (null on an error row)
    ("label", "string"),
    ("probability", "float64"),    # of that class on the image
    ("score", "float64"),          # its logit
    ("channels_used", "int32"),    # channels weighing in the map (all K when exact or filled; N with --fill zero)
    ("seconds", "float64"),        # explanation time of the image (all its classes at once)
    ("provider", "string"),        # the ONNX Runtime execution provider
    ("preset", "string"),
    ("mode", "string"),            # scorecam, qrise (masks + regression), or preview (one pass, closed form)
    ("select", "string"),          # all channels, or how --max-channels chose them (cover, relevance, std)
    ("fill", "string"),            # what the channels left out weighed: kernel, zero or preview (zero: none left out)
    ("passes", "int32"),           # masked inputs actually scored (one per distinct mask)
    ("map", "string"),             # the .npy, relative to DIR
    ("overlay", "string"),         # the overlay .png relative to DIR (null without --overlays)
    ("error", "string"),           # null, or why the image has no explanation
    ("settings", "string"),        # the key of the settings in run.json that made this row
    # object detectors (the rest null for a classifier's rows): one row per box
    ("task", "string"),            # classify or detect
    ("detection", "int32"),        # the box's rank among the image's detections (null: a box given with --box)
    ("box_x1", "float64"),         # the box, in the photo's pixels
    ("box_y1", "float64"),
    ("box_x2", "float64"),
    ("box_y2", "float64"),
    ("similarity", "float64"),     # D-RISE similarity of the image itself to the box (1 for its own detection)
    ("flat", "bool_"),             # the detector's output did not change under any mask: the map is all zero
)


class BatchError(ValueError):
    """A batch job that cannot run as asked (missing dependency, changed settings, bad output folder)."""


def pyarrow():
    """The pyarrow module, or a one-line :class:`BatchError` saying how to install it."""
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise BatchError("the batch job writes parquet and needs pyarrow: pip install 'scorecam-onnx[batch]' "
                         "(or pip install pyarrow)") from None
    return pa


def schema():
    pa = pyarrow()
    return pa.schema([pa.field(name, getattr(pa, kind)()) for name, kind in COLUMNS])


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """Everything that changes a row or a map. A resumed run must have the same (else ``--force``).

    Not here, on purpose: the engine, workers, device and batch size (they change the speed, not the
    results beyond float rounding).
    """

    model: str                        # the model as resolved (absolute path)
    model_sha256: str                 # of model.onnx and its external data files, if any (a bundle's feature
    #                                   graph is pinned to it by hash)
    targets: tuple[str, ...] | None   # as given; None: the top-k classes
    top_k: int = 1
    preset: str = "paper"
    max_channels: int | None = None
    select: str = "auto"
    mode: str = "scorecam"
    fill: str = "zero"                # as it runs: Settings.make resolves None (kernel with max_channels)
    precision: str = "fp32"
    overlays: bool = False
    alpha: float = 0.5
    thirdparty: dict = field(default_factory=dict)  # --layer, --size, --mean, ... for models without metadata
    layers: int | tuple[str, ...] | None = None  # multi-layer Score-CAM (None: the target layer alone)
    fusion: str = "product"
    baseline: str = "zero"
    task: str = "classify"            # or detect (an object detector: one row per box)
    detector: dict = field(default_factory=dict)  # detect: detection, box, score_threshold, nms_iou, weighting, ...

    @classmethod
    def make(cls, model, targets=None, **kw) -> Settings:
        path = resolve_model_path(model).resolve()
        onnx_file = path / MODEL_FILE if path.is_dir() else path
        if not onnx_file.is_file():
            raise BundleError(f"model not found: {onnx_file}")
        tp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in (kw.pop("thirdparty", None) or {}).items()
              if v not in (None, False)}
        kw["fill"] = default_fill(kw.get("fill"), kw.get("max_channels"))
        return cls(str(path), model_sha256(onnx_file), tuple(str(t) for t in targets) if targets else None,
                   thirdparty=tp, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets) if self.targets else None
        d["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        for k, default in (("layers", None), ("fusion", "product"), ("baseline", "zero")):
            if d[k] == default:  # left out at their defaults: the settings of runs made before them keep their key
                del d[k]
        if self.task == "classify":  # a classifier's settings (and their key) as before detectors came
            del d["task"], d["detector"]
        return d

    @property
    def key(self) -> str:
        """A short hash of the settings: every row carries it."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def explainer(self, device: str = "cpu", batch_size: int | None = None, threads: int | None = None):
        """The Explainer (a DetectionExplainer for task ``detect``) these settings describe (built once per worker
        process or Ray actor)."""
        tp = dict(self.thirdparty)
        for k in ("input_size", "mean", "std"):
            if tp.get(k) is not None:
                tp[k] = tuple(tp[k])
        if self.task == "detect":
            from ..detect import DetectionExplainer

            kw = {k: v for k, v in self.detector.items() if k not in ("detection", "box")}
            tp = {k: v for k, v in tp.items() if k in ("layer", "input_size", "mean", "std", "scale", "bgr", "labels")}
            return DetectionExplainer(self.model, device=device, batch_size=batch_size, preset=self.preset,
                                      threads=threads, max_channels=self.max_channels, select=self.select,
                                      fill=self.fill, **tp, **kw)
        return Explainer(self.model, device=device, batch_size=batch_size, preset=self.preset, threads=threads,
                         max_channels=self.max_channels, precision=self.precision, select=self.select,
                         mode=self.mode, fill=self.fill, layers=self.layers, fusion=self.fusion,
                         baseline=self.baseline, **tp)


@dataclass(frozen=True)
class Task:
    """What a worker needs to explain files: the settings, the resolved classes and the run options."""

    settings: Settings
    classes: tuple[int, ...] | None  # resolved from settings.targets on the driver; None: top-k
    out: str
    device: str = "cpu"
    batch_size: int | None = None
    threads: int | None = None

    def explainer(self) -> Explainer:
        return self.settings.explainer(self.device, self.batch_size, self.threads)


# ------------------------------------------------------------------------------------ one image


def _atomic_write(final: Path, save) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            save(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _row(source: str, key: str, **values) -> dict:
    row = dict.fromkeys(name for name, _ in COLUMNS)
    row.update(source=source, settings=key, **values)
    return row


def explain_file(explainer: Explainer, source: str, task: Task) -> list[dict]:
    """Explain one file into rows (one per class) and write its maps: THE function both engines call.

    Never raises for a bad file: an unreadable, corrupt or non-image file (or a failing explanation)
    is ONE row whose ``error`` says why. Maps are ``Explainer.explain(image)``'s saliency, unchanged.
    """
    s, out = task.settings, Path(task.out)
    key = s.key
    if s.task == "detect":
        return explain_boxes_file(explainer, source, task)
    t0 = time.perf_counter()
    try:
        data = Path(source).read_bytes()
    except FileNotFoundError:
        return [_row(source, key, error=f"{source}: no such file")]
    except IsADirectoryError:
        return [_row(source, key, error=f"{source}: is a directory")]
    except OSError as e:
        return [_row(source, key, error=f"{source}: cannot read the file ({e.strerror or e})")]
    sha = hashlib.sha256(data).hexdigest()
    width = height = None
    try:
        stream = io.BytesIO(data)
        stream.name = source
        rgb = images.load_image(stream)
        height, width = (int(v) for v in rgb.shape[:2])
        results = explainer.explain(rgb, targets=list(task.classes) if task.classes else None, top_k=s.top_k)
        for r in results:
            if not np.isfinite(r.saliency).all():
                raise ValueError(f"class {r.class_index}: the map is not finite")
    except USER_ERRORS as e:
        return [_row(source, key, sha256=sha, width=width, height=height, error=one_line(e))]
    except Exception as e:  # a job over a million files must not stop for one: record, go on
        where = traceback.extract_tb(e.__traceback__)[-1]
        return [_row(source, key, sha256=sha, width=width, height=height,
                     error=f"internal error {type(e).__name__}: {one_line(e)} ({Path(where.filename).name}:"
                           f"{where.lineno})")]
    rows = []
    seconds = time.perf_counter() - t0
    for r in results:
        rel_map = f"{MAPS}/{sha[:2]}/{sha}.{r.class_index}.npy"
        _atomic_write(out / rel_map, lambda f, r=r: np.save(f, np.asarray(r.saliency, np.float32)))
        rel_png = None
        if s.overlays:
            rel_png = f"{OVERLAYS}/{sha[:2]}/{sha}.{r.class_index}.png"
            pic = images.overlay(rgb, r.saliency, s.alpha)
            _atomic_write(out / rel_png, lambda f, pic=pic: _save_png(pic, f))
        rows.append(_row(source, key, sha256=sha, width=width, height=height, class_index=r.class_index,
                         label=r.label, probability=r.probability, score=r.score, channels_used=r.channels_used,
                         seconds=seconds, provider=r.provider, preset=r.preset, mode=r.mode, select=r.select,
                         fill=r.fill, passes=r.passes, map=rel_map, overlay=rel_png, task="classify"))
    return rows


def _read(source: str, key: str) -> tuple[bytes | None, list[dict] | None]:
    try:
        return Path(source).read_bytes(), None
    except FileNotFoundError:
        return None, [_row(source, key, error=f"{source}: no such file")]
    except IsADirectoryError:
        return None, [_row(source, key, error=f"{source}: is a directory")]
    except OSError as e:
        return None, [_row(source, key, error=f"{source}: cannot read the file ({e.strerror or e})")]


def explain_boxes_file(explainer, source: str, task: Task) -> list[dict]:
    """:func:`explain_file` for an object detector: one row per box (``--detection`` / ``--box`` / the top-k
    detections), its map (and overlay, box drawn) written; an unusable image, a box outside it or an image with
    no detection is ONE row whose ``error`` says why."""
    s, out = task.settings, Path(task.out)
    key = s.key
    t0 = time.perf_counter()
    data, failed = _read(source, key)
    if failed:
        return failed
    sha = hashlib.sha256(data).hexdigest()
    width = height = None
    det = s.detector
    try:
        stream = io.BytesIO(data)
        stream.name = source
        rgb = images.load_image(stream)
        height, width = (int(v) for v in rgb.shape[:2])
        box = det.get("box")
        results = explainer.explain(rgb, detection=det.get("detection"), box=box,
                                    target=task.classes[0] if box is not None and task.classes else None,
                                    top_k=s.top_k)
        for r in results:
            if not np.isfinite(r.saliency).all():
                raise ValueError(f"box {r.detection}: the map is not finite")
    except USER_ERRORS as e:
        return [_row(source, key, sha256=sha, width=width, height=height, task="detect", error=one_line(e))]
    except Exception as e:  # a job over a million files must not stop for one: record, go on
        where = traceback.extract_tb(e.__traceback__)[-1]
        return [_row(source, key, sha256=sha, width=width, height=height, task="detect",
                     error=f"internal error {type(e).__name__}: {one_line(e)} ({Path(where.filename).name}:"
                           f"{where.lineno})")]
    rows = []
    seconds = time.perf_counter() - t0
    for r in results:
        tag = "box" if r.detection is None else f"det{r.detection}"
        rel_map = f"{MAPS}/{sha[:2]}/{sha}.{tag}.npy"
        _atomic_write(out / rel_map, lambda f, r=r: np.save(f, r.saliency_cropped()))
        rel_png = None
        if s.overlays:
            rel_png = f"{OVERLAYS}/{sha[:2]}/{sha}.{tag}.png"
            pic = r.overlay(rgb, s.alpha)
            _atomic_write(out / rel_png, lambda f, pic=pic: _save_png(pic, f))
        x1, y1, x2, y2 = (float(v) for v in r.box)
        rows.append(_row(source, key, sha256=sha, width=width, height=height, class_index=r.class_index,
                         label=r.label, score=r.score, channels_used=r.channels_used, seconds=seconds,
                         provider=r.provider, preset=r.preset, mode="scorecam", select=s.select, fill=r.fill,
                         passes=r.passes, map=rel_map, overlay=rel_png, task="detect", detection=r.detection,
                         box_x1=x1, box_y1=y1, box_x2=x2, box_y2=y2, similarity=r.similarity, flat=r.flat))
    return rows


def explain_files(explainer: Explainer, sources: Iterable[str], task: Task) -> list[dict]:
    return [row for src in sources for row in explain_file(explainer, src, task)]


def _save_png(rgb: np.ndarray, f) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(f, format="PNG")


# ------------------------------------------------------------------------------------- parquet parts


def to_table(rows: Sequence[dict]):
    """A pyarrow Table of rows, in the fixed schema (so parts with only error rows still match)."""
    pa = pyarrow()
    sch = schema()
    return pa.Table.from_pydict({name: [r[name] for r in rows] for name in sch.names}, schema=sch)


def write_part(out: str | os.PathLike, rows: Sequence[dict], name: str) -> Path:
    """Write one parquet part atomically into ``DIR/results.parquet/``."""
    import pyarrow.parquet as pq

    table = to_table(rows)
    final = Path(out) / RESULTS / name
    _atomic_write(final, lambda f: pq.write_table(table, f))
    return final


def part_files(out: str | os.PathLike) -> list[Path]:
    d = Path(out) / RESULTS
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix == ".parquet" and not p.name.startswith((".", "_")))


def read_results(out: str | os.PathLike, columns: Sequence[str] | None = None, repair: bool = True,
                 warn=None) -> list[tuple[Path, object]]:
    """Every readable part as (path, pyarrow Table). A part cut short by a crash is removed (its images are
    explained again) when ``repair``; ``warn(msg)`` is told."""
    import pyarrow.parquet as pq

    pyarrow()
    out_parts = []
    for p in part_files(out):
        try:
            out_parts.append((p, pq.read_table(p, columns=list(columns) if columns else None)))
        except Exception as e:  # a truncated file: pyarrow raises ArrowInvalid / OSError
            if repair:
                with contextlib.suppress(OSError):
                    p.unlink()
                if warn:
                    warn(f"removed the unreadable part {p.name} ({one_line(e)}); its images are explained again")
    return out_parts


# ------------------------------------------------------------------------------------- run.json


def versions() -> dict:
    import onnxruntime

    v = {"scorecam-onnx": __version__, "python": platform.python_version(), "numpy": np.__version__,
         "onnxruntime": onnxruntime.__version__, "platform": platform.platform()}
    for mod in ("pyarrow", "ray"):
        with contextlib.suppress(ImportError):
            v[mod] = __import__(mod).__version__
    return v


def read_run_json(out: Path) -> dict | None:
    p = out / RUN_JSON
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise BatchError(f"{p}: cannot read it ({one_line(e)}); use --force to start the folder afresh") from None


def write_run_json(out: Path, doc: dict) -> None:
    text = json.dumps(doc, indent=2, default=str) + "\n"
    _atomic_write(out / RUN_JSON, lambda f: f.write(text.encode()))


_locks: dict[str, object] = {}


def lock(out: Path) -> None:
    """Take an exclusive lock on ``DIR/.lock`` (until :func:`unlock` or the process ends): one job per folder."""
    import fcntl

    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / ".lock", "a+")  # noqa: SIM115 (held open until the process ends)
    except OSError as e:
        raise BatchError(f"cannot create the output folder {out}: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise BatchError(f"another batch job is writing into {out}; wait for it, or use another --out") from None
    _locks[str(out.resolve())] = f


def unlock(out: Path) -> None:
    f = _locks.pop(str(out.resolve()), None)
    if f is not None:
        f.close()


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) + (" ..." if len(keys) > 4 else "")


def prepare_out(out: Path, settings: Settings, force: bool) -> dict:
    """Check (or, with ``force``, clear) the output folder; return its run.json document (not yet written)."""
    if out.exists() and not out.is_dir():
        raise BatchError(f"--out {out} exists and is not a directory")
    doc = read_run_json(out) if out.is_dir() else None
    ours = [out / n for n in (RESULTS, MAPS, OVERLAYS, RUN_JSON)]
    if force:
        for p in ours:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        doc = None
    elif doc is None and (out / RESULTS).exists():
        raise BatchError(f"{out} holds {RESULTS} but no {RUN_JSON}: not a folder this job can resume; "
                         "use --force to start afresh, or another --out")
    elif doc is not None and doc.get("settings") != settings.to_dict():
        changed = _diff(doc.get("settings") or {}, settings.to_dict())
        raise BatchError(f"{out} holds results made with other settings ({changed}); use --force to discard "
                         "them and start again, or another --out")
    try:
        (out / RESULTS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BatchError(f"cannot create the output folder {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise BatchError(f"cannot write into the output folder {out} (permission denied)")
    return doc or {"settings": settings.to_dict(), "settings_key": settings.key, "runs": []}


# ------------------------------------------------------------------------------------- resuming


@dataclass
class Plan:
    """Which files to explain, and which are already done."""

    todo: list[str]
    skipped: int
    total: int


def plan(out: Path, sources: Sequence[str], settings: Settings, warn=None) -> Plan:
    """Skip every source whose rows (made with these settings) are for the file's current content.

    A source whose file changed, or that could not be read before, is explained again, and its old
    rows are dropped from their parts (rewritten atomically) so each image has one set of rows.
    """
    key = settings.key
    done: dict[str, set[str | None]] = {}
    cols = ("source", "sha256", "settings", "map", "overlay")
    for _, t in read_results(out, columns=cols, warn=warn):
        for src, sha, k, npy, png in zip(*(t.column(c).to_pylist() for c in cols), strict=True):
            if k == key:
                lost = any(f and not (out / f).is_file() for f in (npy, png))  # a map deleted since: redo
                done.setdefault(src, set()).add(None if lost else sha)
    todo, redo, skipped = [], set(), 0
    for src in sources:
        if src not in done:
            todo.append(src)
            continue
        try:
            sha = file_sha256(src)
        except OSError:
            sha = None
        if sha is not None and done[src] == {sha}:
            skipped += 1
        else:  # changed, or unreadable before (or still): explain again
            todo.append(src)
            redo.add(src)
    if redo:
        _drop_rows(out, redo)
    return Plan(todo, skipped, len(sources))


def _drop_rows(out: Path, sources: set[str]) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for path, table in read_results(out, columns=["source"]):
        mask = pc.is_in(table.column("source"), value_set=pyarrow().array(sorted(sources), pyarrow().string()))
        if pc.any(mask).as_py():
            full = pq.read_table(path)
            kept = full.filter(pc.invert(mask))
            if kept.num_rows:
                _atomic_write(path, lambda f, kept=kept: pq.write_table(kept, f))
            else:
                path.unlink()


def count_images(rows: Iterable[dict]) -> tuple[int, int]:
    """(explained images, failed images) among rows (an image's rows share its source)."""
    ok, failed = set(), set()
    for r in rows:
        (failed if r["error"] else ok).add(r["source"])
    return len(ok), len(failed)
