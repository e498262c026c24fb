#!/usr/bin/env bash
# The explain service's install steps, in ONE place: both Dockerfiles run this, and CI runs it in a
# fresh venv (tests/test_serve_deploy.py) and starts the server from that venv.
#
#   deploy/install.sh VENV          CPU: the project with its [serve] extra (onnxruntime)
#   deploy/install.sh VENV --gpu    CUDA: the same, with onnxruntime-gpu in place of onnxruntime
#
# No torch, no kserve SDK: numpy + onnxruntime + Pillow + OpenCV (headless) + FastAPI/uvicorn/prometheus-client.
set -euo pipefail
VENV=${1:?usage: deploy/install.sh VENV [--gpu]}
GPU=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "$ROOT[serve]"
if [ "$GPU" = "--gpu" ]; then
    # onnxruntime and onnxruntime-gpu install the same module: keep only the GPU build
    "${PIP[@]}" uninstall -y onnxruntime
    "${PIP[@]}" install "onnxruntime-gpu>=1.18"
elif [ -n "$GPU" ]; then
    echo "error: unknown option $GPU (only --gpu)" >&2
    exit 2
fi
# the installed package must import without the source tree and without torch
(cd / && "$VENV/bin/python" -c "import sys, runtime.serve.app; assert 'torch' not in sys.modules; print('installed', runtime.__file__)")
