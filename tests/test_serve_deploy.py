"""The container's install steps (deploy/install.sh, run by both Dockerfiles) in a fresh venv: the
server then starts from that venv, without this checkout on the path, and answers. Also checks that
the Dockerfiles run that script and that the KServe manifest's timeout exceeds the server's.

No Docker engine is needed (nor used): the image itself is not built here.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys

import httpx
from bundles import make_bundle, photo
from servers import ROOT, ServeProcess

DEPLOY = ROOT / "deploy"


def test_dockerfiles_run_the_install_script():
    for name, extra in (("Dockerfile", ""), ("Dockerfile.cuda", " --gpu")):
        text = (DEPLOY / name).read_text()
        assert f"RUN deploy/install.sh /opt/venv{extra}" in text
        assert 'ENTRYPOINT ["python", "-m", "runtime.serve", "--host", "0.0.0.0"' in text
        assert "SCORECAM_MODEL=/mnt/models" in text


def test_kserve_manifest_explainer_timeout_exceeds_the_servers():
    import yaml

    doc = yaml.safe_load((DEPLOY / "kserve.yaml").read_text())
    assert doc["kind"] == "InferenceService"
    explainer = doc["spec"]["explainer"]
    args = " ".join(explainer["containers"][0]["args"])
    server_timeout = float(re.search(r"--timeout[= ](\S+)", args).group(1))
    assert explainer["timeout"] > server_timeout
    probe = explainer["containers"][0]["readinessProbe"]["httpGet"]
    assert probe == {"path": "/v2/health/ready", "port": 8080}


def docker_context(dest):
    """What deploy/Dockerfile's COPY lines put into the image, copied into ``dest`` (the image's /app)."""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *sources, target = line.split()[1:]
            for src in sources:
                to = dest / target / src if target.endswith("/") and len(sources) > 1 or target == "./" \
                    else dest / target
                if (ROOT / src).is_dir():
                    shutil.copytree(ROOT / src, to, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    to.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / src, to)
    return dest


def test_install_script_in_a_fresh_venv_then_serve(tmp_path):
    """deploy/install.sh run in a copy of the Dockerfile's build context (only what it COPYs), as the image would."""
    venv = tmp_path / "venv"
    ctx = docker_context(tmp_path / "app")
    assert sorted(p.name for p in ctx.iterdir()) == ["README.md", "deploy", "pyproject.toml", "runtime"]
    out = subprocess.run(["bash", str(ctx / "deploy" / "install.sh"), str(venv)], capture_output=True, text=True,
                         timeout=1200, env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path),
                                            "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout + out.stderr
    assert str(venv) in out.stdout  # the import check ran from the installed package, not this checkout
    python = str(venv / "bin" / "python")
    bundle = make_bundle(tmp_path / "fruit")
    img = tmp_path / "p.png"
    from PIL import Image

    Image.fromarray(photo()).save(img)
    with ServeProcess(bundle, python=python, installed=True) as s:
        assert httpx.get(s.url + "/v2/health/ready").json() == {"ready": True}
        r = httpx.post(s.url + "/v1/models/fruit:explain", timeout=60,
                       json={"instances": [{"image": {"b64": base64.b64encode(img.read_bytes()).decode()}}]})
        assert r.status_code == 200, r.text
        for asset in ("/", "/static/app.js", "/static/style.css"):  # the page is package data of the wheel
            assert httpx.get(s.url + asset).status_code == 200, asset
        assert "/site-packages/" in subprocess.run(
            [python, "-c", "import runtime.serve; print(runtime.serve.__file__)"], capture_output=True, text=True,
            cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}).stdout
