"""The runtime never imports torch: checked in a fresh interpreter and in the source."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from bundles import make_bundle, photo
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "runtime"

SCRIPT = textwrap.dedent("""
    import json, sys
    bundle, image, out = sys.argv[1:4]
    import runtime
    from runtime import Explainer
    from runtime.explain import main

    results = Explainer(bundle, device="cpu").explain(image, top_k=2)
    assert len(results) == 2 and results[0].saliency.shape == (32, 32)
    results[0].overlay(image, 0.5)
    code = main([bundle, image, "--out", out, "--json", "--top-k", "2"])
    assert code == 0, code
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision", "torchcam")))
    print(json.dumps({"torch_modules": loaded, "runtime": runtime.__file__}), file=sys.stderr)
""")


def test_runtime_and_cli_run_without_importing_torch(tmp_path):
    bundle = make_bundle(tmp_path / "tiny")
    image = tmp_path / "pic.png"
    Image.fromarray(photo(30, 50)).save(image)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle), str(image), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert Path(report["runtime"]).resolve().parent == RUNTIME  # this checkout's runtime, not another one
    assert report["torch_modules"] == []
    assert len(proc.stdout.splitlines()) == 2  # the CLI's two JSON lines
    assert len(list(out.glob("pic.*.png"))) == 2


def test_no_runtime_module_imports_torch():
    pattern = re.compile(r"^\s*(import\s+torch|from\s+torch[\w.]*\s+import|import\s+torch\w*)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in sorted(RUNTIME.rglob("*.py"))
                 if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
    assert len(list(RUNTIME.rglob("*.py"))) >= 8  # the scan did see the package
