"""Weights stored beside the graph (ONNX *external data*): checking, reading, hashing and copying them.

A tensor whose ``data_location`` is ``EXTERNAL`` keeps its bytes in a file: its ``external_data`` entries
name the file (``location``, relative to the model's folder), the first byte (``offset``, default 0) and
the byte count (``length``, default: what its dims and type need). torch's default (dynamo) exporter
writes ``model.onnx`` + ``model.onnx.data`` this way, and any model over protobuf's 2 GB limit must.

The graph proto is read WITHOUT its external data (the weights stay on disk): ONNX Runtime is pointed at
the model's folder (:func:`point_to`) and reads them itself, so no Python copy of them ever exists on
the way to a session; the few tensors we read in Python (a linear head's ``W``, shape constants) are read
one at a time (:func:`read_tensor`).

The rules are ONNX Runtime's (``ValidateExternalDataPathFromDir``), applied by every reader here before
any file is opened: a location is a relative path, and the file it names, symlinks resolved, lies inside
the model's folder (symlinks resolved; or inside the folder of the file the model path links to, as for
a Hugging Face cache snapshot). ``../secret.bin`` or ``/etc/passwd`` is refused in one line naming the
model and the tensor, as is a data file that is missing or too short for the bytes a tensor claims.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .contract import BundleError

#: the session option that tells ONNX Runtime where the external data of a graph given as bytes lies
FOLDER_KEY = "session.model_external_initializers_file_folder_path"
#: protobuf cannot serialize a message of 2 GiB or more: a graph that big must keep its weights outside
PROTO_LIMIT = 2**31 - 1
#: ONNX Runtime version that first reads external data of a graph loaded from bytes (the option above)
MIN_ORT = (1, 21)


@dataclass(frozen=True)
class Ref:
    """Where one tensor's bytes are: ``location`` (relative to the model's folder), ``offset``, ``length``."""

    tensor: str
    location: str
    offset: int
    length: int | None  # None: the tensor's own size


def all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor of ``model``: initializers and ``Constant``-style attribute tensors, in every subgraph."""

    def graph(g: onnx.GraphProto) -> Iterator[TensorProto]:
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("g"):
                    yield from graph(a.g)
                for sub in a.graphs:
                    yield from graph(sub)

    yield from graph(model.graph)
    for f in model.functions:
        for node in f.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def external_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    return [t for t in all_tensors(model) if is_external(t)]


def has_external(model: onnx.ModelProto) -> bool:
    """Whether any tensor of ``model`` keeps its bytes in a file beside it."""
    return any(is_external(t) for t in all_tensors(model))


def ref(t: TensorProto, source: str = "the model") -> Ref:
    """The ``external_data`` entries of ``t``, parsed (BundleError, one line, when malformed)."""
    entries = {e.key: e.value for e in t.external_data}
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise BundleError(f"{source}: tensor {t.name!r} has a malformed external data entry "
                          f"(offset {entries.get('offset')!r}, length {entries.get('length')!r})") from None
    if offset < 0 or (length is not None and length < 0):
        raise BundleError(f"{source}: tensor {t.name!r} has a negative external data offset or length")
    return Ref(t.name, entries.get("location", ""), offset, length)


def nbytes(t: TensorProto) -> int | None:
    """Bytes the tensor's dims and type need (None for strings and unknown types)."""
    if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    bits = {TensorProto.INT4: 4, TensorProto.UINT4: 4}.get(t.data_type)
    count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    return (count * bits + 7) // 8 if bits else count * size


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def resolve(r: Ref, base: Path, source: str = "the model", model_path: Path | None = None) -> Path:
    """The file of ``r`` under ``base``, refused (BundleError, one line) when it escapes the model's folder."""
    loc = r.location
    if not loc:
        raise BundleError(f"{source}: tensor {r.tensor!r} is stored externally but names no data file")
    if os.path.isabs(loc) or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
        raise BundleError(f"{source}: the external data of tensor {r.tensor!r} is the absolute path {loc!r}; "
                          "refused (as ONNX Runtime does): a data file must lie in the model's folder, named "
                          "relative to it")
    path = Path(base) / loc
    real = Path(os.path.realpath(path))
    allowed = [Path(os.path.realpath(base))]
    if model_path is not None:
        allowed.append(Path(os.path.realpath(model_path)).parent)
    if not any(_inside(real, a) for a in allowed):
        raise BundleError(f"{source}: the external data of tensor {r.tensor!r} is {loc!r}, which escapes the "
                          f"model's folder {base}; refused (as ONNX Runtime does): keep the data files inside it")
    return path


def check(model: onnx.ModelProto, base: str | os.PathLike, model_path: Path | None = None) -> list[str]:
    """Check every external tensor of ``model`` against the files under ``base``: each location stays in the
    folder, each file exists and holds the bytes its tensors claim. The distinct locations (normalised, in
    the order first met); [] for a model without external data. BundleError (one line) on the first fault.
    """
    base = Path(base)
    source = str(model_path) if model_path is not None else "the model"
    sizes: dict[Path, int] = {}
    seen: dict[str, None] = {}
    resolved: dict[str, Path] = {}  # by location: a big model has thousands of tensors in one file
    for t in all_tensors(model):
        if not is_external(t):
            continue
        r = ref(t, source)
        path = resolved.get(r.location)
        if path is None:
            path = resolved[r.location] = resolve(r, base, source, model_path)
        if path not in sizes:
            try:
                if not path.is_file():
                    raise FileNotFoundError
                sizes[path] = path.stat().st_size
            except OSError:
                raise BundleError(f"{source}: the external data file {path} of tensor {r.tensor!r} is missing "
                                  "(a model's data files must travel with it)") from None
        need = nbytes(t)
        if r.length is not None and need is not None and r.length != need:
            raise BundleError(f"{source}: tensor {r.tensor!r} needs {need} bytes but its external data entry "
                              f"says {r.length}")
        length = r.length if r.length is not None else need
        end = r.offset + (length or 0)
        if end > sizes[path]:
            raise BundleError(f"{source}: the external data file {path} is truncated: tensor {r.tensor!r} needs "
                              f"bytes {r.offset}..{end}, the file has {sizes[path]}")
        seen[os.path.normpath(r.location)] = None
    return list(seen)


def read_bytes(t: TensorProto, base: str | os.PathLike, model_path: Path | None = None) -> bytes:
    """The bytes of one external tensor (only its own range of the file is read)."""
    source = str(model_path) if model_path is not None else "the model"
    r = ref(t, source)
    path = resolve(r, Path(base), source, model_path)
    length = r.length if r.length is not None else nbytes(t)
    try:
        with open(path, "rb") as f:
            f.seek(r.offset)
            data = f.read() if length is None else f.read(length)
    except OSError as e:
        raise BundleError(f"{source}: cannot read the external data file {path} of tensor {r.tensor!r} "
                          f"({e.strerror or e})") from None
    if length is not None and len(data) != length:
        raise BundleError(f"{source}: the external data file {path} is truncated: tensor {r.tensor!r} needs "
                          f"bytes {r.offset}..{r.offset + length}, the file has {r.offset + len(data)}")
    return data


def read_tensor(t: TensorProto, base: str | os.PathLike | None, model_path: Path | None = None) -> np.ndarray:
    """The numpy value of ``t``, external or not (an external one needs ``base``, the model's folder)."""
    if not is_external(t):
        return numpy_helper.to_array(t)
    if base is None:
        raise BundleError(f"tensor {t.name!r} is stored in an external data file, and the model's folder is "
                          "not known here")
    inline = TensorProto()
    inline.CopyFrom(t)
    del inline.external_data[:]
    inline.data_location = TensorProto.DEFAULT
    inline.raw_data = read_bytes(t, base, model_path)
    return numpy_helper.to_array(inline)


def inline(model: onnx.ModelProto, base: str | os.PathLike, model_path: Path | None = None) -> None:
    """Read every external tensor of ``model`` into the proto (in place): one self-contained graph. This
    puts the weights in Python memory; it is for writers of single files, never on a session's path."""
    check(model, base, model_path)
    for t in external_tensors(model):
        data = read_bytes(t, base, model_path)
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
        t.raw_data = data


#: external tensors this small are read into the graph wherever we build one: ONNX Runtime's shape inference
#: cannot read an external shape, axes or pads input (a model saved with ``size_threshold=0``), and onnx's own
#: default keeps tensors under 1 KiB in the graph anyway
SMALL = 1024


def inline_small(model: onnx.ModelProto, base: str | os.PathLike, limit: int = SMALL) -> int:
    """Read the external tensors of at most ``limit`` bytes into ``model`` (in place); how many."""
    n = 0
    for t in external_tensors(model):
        size = nbytes(t)
        if size is not None and size <= limit:
            data = read_bytes(t, base)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = data
            n += 1
    return n


def fits_one_file(model: onnx.ModelProto, base: str | os.PathLike | None = None) -> bool:
    """Whether ``model`` with its external data inlined stays under protobuf's 2 GB limit."""
    extra = sum(nbytes(t) or 0 for t in external_tensors(model))
    return model.ByteSize() + extra < PROTO_LIMIT - (1 << 20)


# ------------------------------------------------------------------------------------------- hashing
_digests: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (remembered per file identity: path, inode, size, mtime)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    got = _digests.get(key)
    if got is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        got = _digests[key] = h.hexdigest()
    return got


def data_digest(locations: Sequence[str], base: str | os.PathLike) -> str:
    """sha256 over (location, sha256 of the file) of each data file; "" for none. What a graph's hash adds
    for its external data, so that a swapped weights file changes the hash of the graph that reads it."""
    if not locations:
        return ""
    h = hashlib.sha256()
    for loc in sorted(locations):
        h.update(f"{loc}\0{file_sha256(Path(base) / loc)}\n".encode())
    return h.hexdigest()


def content_sha256(model_path: str | os.PathLike, locations: Sequence[str] = ()) -> str:
    """sha256 of a model file, combined with its data files' when it has some (else the file's own sha256)."""
    own = file_sha256(model_path)
    if not locations:
        return own
    return hashlib.sha256(f"{own}\n{data_digest(locations, Path(model_path).parent)}".encode()).hexdigest()


def stats(locations: Sequence[str], base: str | os.PathLike) -> tuple:
    """(location, size, mtime) of each data file: what tells that one changed since a bundle was opened."""
    out = []
    for loc in locations:
        try:
            st = os.stat(Path(base) / loc)
            out.append((loc, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((loc, None, None))
    return tuple(out)


# ------------------------------------------------------------------------------------------- copying
def copy_data(locations: Sequence[str], base: str | os.PathLike, dest: str | os.PathLike) -> int:
    """Copy each data file from ``base`` to ``dest`` under the same relative name (symlinks followed;
    streamed by the kernel, never read into Python). The bytes copied."""
    total = 0
    for loc in locations:
        target = Path(dest) / loc
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(base) / loc, target)
        total += target.stat().st_size
    return total


def relocate(models: Sequence[onnx.ModelProto], base: str | os.PathLike, out_file: str | os.PathLike,
             location: str, align: int = 4096) -> int:
    """Move every external tensor of ``models`` (files under ``base``) into ONE new file ``out_file``, each
    copied once, block by block, at an offset aligned to ``align`` (so ONNX Runtime can map it), and point
    the tensors at it under the name ``location`` (the file's final name, relative to the graph). A tensor
    shared by several graphs (same source file and range) is stored once. Returns the file's size."""
    written: dict[tuple, int] = {}
    pos = 0
    with open(out_file, "wb") as out:
        for model in models:
            for t in external_tensors(model):
                r = ref(t)
                length = r.length if r.length is not None else (nbytes(t) or 0)
                src = resolve(r, Path(base))
                key = (os.path.realpath(src), r.offset, length)
                if key not in written:
                    pos = -(-pos // align) * align
                    out.seek(pos)
                    with open(src, "rb") as f:
                        f.seek(r.offset)
                        left = length
                        while left:
                            block = f.read(min(left, 1 << 22))
                            if not block:
                                raise BundleError(f"the external data file {src} is truncated at tensor {t.name!r}")
                            out.write(block)
                            left -= len(block)
                    written[key] = pos
                    pos += length
                del t.external_data[:]
                for k, v in (("location", location), ("offset", str(written[key])), ("length", str(length))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
        out.truncate(pos)
    return pos


# ------------------------------------------------------------------------------------- ONNX Runtime
def point_to(options, base: str | os.PathLike | None) -> None:
    """Tell ONNX Runtime (``SessionOptions``) where the external data of a graph given as bytes lies: it
    then reads the weights itself from that folder, with its own check that no path escapes it."""
    if base is None:
        return
    import onnxruntime as ort

    have = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
    if have < MIN_ORT:
        raise BundleError(f"this model keeps its weights in external data files, which needs onnxruntime >= "
                          f"{'.'.join(map(str, MIN_ORT))} (this is {ort.__version__})")
    options.add_session_config_entry(FOLDER_KEY, str(Path(base).resolve()))


__all__ = ["FOLDER_KEY", "PROTO_LIMIT", "Ref", "all_tensors", "check", "content_sha256", "copy_data", "data_digest",
           "external_tensors", "file_sha256", "fits_one_file", "has_external", "inline", "inline_small", "nbytes",
           "point_to",
           "read_bytes", "read_tensor", "ref", "relocate", "resolve", "stats"]
