"""Packaging: the wheel installs ``runtime`` and ``exporter`` (with their package data) and nothing else; the
benchmarks (``bench``) run from a checkout only; the command lines share one set of argument types.

The wheel is built for real with pip from a copy of the sources (so the checkout gets no ``build/`` or
``*.egg-info``): without build isolation where this environment's setuptools is new enough for
pyproject.toml (>= 77), else in pip's isolated build environment (which installs setuptools from the index).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from runtime.cliargs import non_negative_float, non_negative_int, number, one_line, positive_float, positive_int

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DATA = ("runtime/py.typed", "exporter/py.typed", "exporter/toy_weights.npz",
                "exporter/toy_detector_weights.npz", "runtime/serve/static/index.html", "runtime/serve/static/app.js",
                "runtime/serve/static/style.css")


def _setuptools_major() -> int:
    try:
        return int(version("setuptools").split(".")[0])
    except Exception:  # not installed, or an odd version string: build in isolation
        return 0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("runtime", "exporter", "bench"):  # bench is copied too: the build must leave it out
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".cache",
                                                                            "results"))
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(tmp / "dist")]
    if _setuptools_major() >= 77:
        cmd.append("--no-build-isolation")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = (tmp / "dist").glob("scorecam_onnx-*.whl")
    return built


def test_the_wheel_holds_runtime_and_exporter_and_their_data_only(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"runtime", "exporter"}, sorted(tops)
    assert not any(n.startswith("bench/") for n in names)
    for data in PACKAGE_DATA:
        assert data in names, data
    # every module of the two packages is in it
    modules = {p.relative_to(ROOT).as_posix() for pkg in ("runtime", "exporter") for p in (ROOT / pkg).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules <= names, sorted(modules - names)
    (meta,) = dist_info
    entry_points = zipfile.ZipFile(wheel).read(f"{meta}/entry_points.txt").decode()
    assert "runtime.explain:main" in entry_points and "exporter.__main__:main" in entry_points


def test_bench_still_runs_from_a_checkout():
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()


# ------------------------------------------------------------------------------------ argument types


@pytest.mark.parametrize("parse, good, bad", [
    (positive_int, [("1", 1), ("64", 64)],
     [("0", "must be >= 1, got 0"), ("-3", "must be >= 1"), ("two", "must be a whole number >= 1, got 'two'"),
      ("1.5", "whole number")]),
    (non_negative_int, [("0", 0), ("16", 16)], [("-1", "must be >= 0, got -1"), ("x", "whole number")]),
    (positive_float, [("0.5", 0.5), ("120", 120.0)],
     [("0", "must be > 0, got 0"), ("-2", "must be > 0"), ("nan", "must be a finite number > 0, got nan"),
      ("inf", "finite"), ("fast", "must be a number > 0, got 'fast'")]),
    (non_negative_float, [("0", 0.0), ("0.25", 0.25)], [("-0.5", "must be >= 0"), ("", "must be a number")]),
])
def test_the_shared_number_types(parse, good, bad):
    for text, want in good:
        got = parse(text)
        assert got == want and type(got) is type(want)
    for text, message in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=message.replace("(", r"\(")):
            parse(text)
    assert number(int, 2)("2") == 2


def test_the_command_lines_share_one_set_of_types_and_one_line_errors():
    """The CLIs use the shared types (no copies left) and word a bad number alike."""
    from runtime.batch.cli import build_parser as batch_parser
    from runtime.explain import build_parser as explain_parser
    from runtime.serve.cli import build_parser as serve_parser

    for parser, flag in ((explain_parser(), "--top-k"), (batch_parser(), "--top-k"), (serve_parser(), "--workers")):
        action = next(a for a in parser._actions if flag in a.option_strings)
        assert action.type is positive_int, flag
    for path in ("runtime/explain.py", "runtime/serve/cli.py", "runtime/batch/cli.py", "runtime/batch/job.py"):
        text = (ROOT / path).read_text()
        assert "def _positive" not in text and "def _one_line" not in text, path
    assert one_line(ValueError("two\n  lines")) == "two lines" and one_line(KeyError()) == "KeyError"
