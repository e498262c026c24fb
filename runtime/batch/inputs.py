"""Expanding the batch job's INPUT arguments into a list of files to explain.

An INPUT is an image file, a folder (walked recursively; hidden files and folders are left out), a
glob (``photos/**/*.jpg``; ``**`` recurses), or a manifest: a ``.txt``/``.lst`` file with one path per
line, or a ``.csv``/``.tsv`` file whose ``path`` (or ``source``, ``file``, ``image``, ``filename``)
column, else its first column, holds the paths. Relative paths in a manifest are relative to the
manifest's folder. Every file a folder holds is listed, images or not: a file that is not an image
becomes a result row with an ``error``, it never stops the job.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Iterable
from pathlib import Path

MANIFEST_SUFFIXES = (".txt", ".lst", ".csv", ".tsv")
PATH_COLUMNS = ("path", "source", "file", "image", "filename", "filepath")


class InputError(ValueError):
    """An INPUT argument names nothing (no such file, a glob that matches nothing, an empty manifest)."""


def is_manifest(path: Path) -> bool:
    return path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file()


def _walk(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, f) for f in sorted(files) if not f.startswith("."))
    return out


def read_manifest(path: Path) -> list[str]:
    """The paths a manifest lists (blank lines and ``#`` comments skipped), relative to its folder."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the manifest ({getattr(e, 'strerror', None) or e})") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if path.suffix.lower() in (".csv", ".tsv"):
        rows = list(csv.reader(lines, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
        header = [c.strip().lower() for c in rows[0]] if rows else []
        col = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
        if col is not None:
            rows = rows[1:]
        names = [r[col or 0].strip() for r in rows if len(r) > (col or 0) and r[col or 0].strip()]
    else:
        names = [ln.strip() for ln in lines]
    return [n if os.path.isabs(n) else os.path.join(path.parent, n) for n in names]


def expand(inputs: Iterable[str]) -> list[str]:
    """Every file the INPUT arguments name, as absolute paths (workers may run elsewhere), in order, each once.

    Paths listed in a manifest (or named on the command line) that do not exist are kept: they
    become error rows. A glob that matches nothing, or a missing INPUT that is no glob, is refused.
    """
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append(key)

    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            for f in _walk(path):
                add(f)
        elif is_manifest(path):
            names = read_manifest(path)
            if not names:
                raise InputError(f"{arg}: the manifest lists no paths")
            for n in names:
                if os.path.isdir(n):
                    for f in _walk(Path(n)):
                        add(f)
                else:
                    add(n)
        elif path.exists():
            add(arg)
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise InputError(f"{arg}: the pattern matches no files")
            for m in matches:
                if os.path.isdir(m):
                    for f in _walk(Path(m)):
                        add(f)
                else:
                    add(m)
        else:
            raise InputError(f"{arg}: no such file, folder or manifest")
    return out
