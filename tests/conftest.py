"""Session fixtures shared by the exporter and runtime tests: bundles exported once per session.

``toy_bundle`` and ``lite0_bundle`` are bundle folders written by the real exporter (with its
verification against torch); ``toy_data`` is a held-out synthetic set (images, labels, boxes).
torch is imported only when one of the bundle fixtures is used.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import pytest

#: the Ray auth token of every test that starts a local Ray instance: Ray reads RAY_AUTH_TOKEN once per process
#: and keeps it, so a second local instance started with another token in the same pytest run fails to connect
#: to its own GCS ("Failed to start GCS"). Not the machine-wide ~/.ray/auth_token.
RAY_TEST_TOKEN = secrets.token_hex(32)

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The CC0 sample photos (chelsea.png, coffee.png, astronaut.png, rocket.jpg, motorcycle_left.png)."""
    return ROOT / "samples"


@pytest.fixture(scope="session")
def toy_bundle(tmp_path_factory) -> Path:
    """A bundle of the ``toy`` recipe (trained here, deterministically): layer ``features`` 32x32x32."""
    from exporter import export_recipe

    out = tmp_path_factory.mktemp("bundles") / "toy"
    export_recipe("toy", out)
    return out


@pytest.fixture(scope="session")
def lite0_bundle(tmp_path_factory) -> Path:
    """A bundle of the ``efficientnet_lite0`` recipe (ImageNet): layer ``head_act`` 1280x7x7."""
    from exporter import export_recipe

    out = tmp_path_factory.mktemp("bundles") / "efficientnet_lite0"
    export_recipe("efficientnet_lite0", out)
    return out


@pytest.fixture(scope="session")
def toy_detector(tmp_path_factory) -> Path:
    """The committed toy detector (:mod:`exporter.toy_detect`: shapes, YOLOv8-style head, 64x64), exported through
    our exporter (verified against torch) into a folder holding ``model.onnx``."""
    from exporter.detector import export_toy_detector

    out = tmp_path_factory.mktemp("det") / "toy_detector"
    export_toy_detector(out)
    return out


@pytest.fixture(scope="session")
def toy_scenes():
    """16 held-out toy detector scenes (training used seed 20000): (images uint8 [16,64,64,3], objects per image
    as [(class, (x0, y0, x1, y1))])."""
    from exporter.toy_detect import make_scenes

    return make_scenes(16, seed=123)


@pytest.fixture(scope="session")
def transformer_bundle(tmp_path_factory):
    """``transformer_bundle(name)``: the bundle of ``tests/transformer_models.py``'s model ``name`` (deit,
    deit_distilled, swin, vit) at its target layer, exported (and verified) once per session."""
    import transformer_models

    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("transformers")

    def get(name: str) -> Path:
        if name not in made:
            made[name] = transformer_models.export(name, root / name)
        return made[name]

    return get


@pytest.fixture(scope="session")
def toy_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """64 held-out toy images: uint8 [64,64,64,3] RGB, labels [64], boxes [64,4] (x0, y0, x1, y1 exclusive)."""
    from exporter.toy import make_dataset

    return make_dataset(64, seed=123)


def pytest_collection_modifyitems(items) -> None:
    """Mark ``lite0`` every test that uses the real Lite0 bundle (exported with torch, 1280 channels: the slow
    ones), so a quick pass can leave them out with ``-m 'not lite0'`` (scripts/test-blas-kernels.sh does)."""
    for item in items:
        if "lite0_bundle" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.lite0)


STRICT_TOOLS_ENV = "SCORECAM_STRICT_TOOLS"


def require_tool(available: bool, what: str) -> None:
    """Skip a test whose outside tool (chromium, node, a Ray install, ...) is missing, except under
    ``SCORECAM_STRICT_TOOLS=1`` (set by ``make test``, hence CI), where a missing tool is a failure:
    a test that silently skips proves nothing."""
    import os

    if available:
        return
    if os.environ.get(STRICT_TOOLS_ENV) == "1":
        pytest.fail(f"{what} is missing ({STRICT_TOOLS_ENV}=1: make test installs it; see "
                    "scripts/install-test-deps.sh)", pytrace=False)
    pytest.skip(f"{what} is not installed")
