#!/usr/bin/env bash
# The numerics tests again under the OpenBLAS kernels other machines pick, so that no test depends on the
# BLAS kernel of the machine it was written on (`make test` runs this after the whole suite, which ran with
# this machine's own kernel). OpenBLAS (numpy's, built for every x86 core) reads OPENBLAS_CORETYPE at load;
# an AMD EPYC VM that failed the suite ran Haswell kernels with OPENBLAS_L2_SIZE=512, so Haswell runs so.
# A kernel this CPU cannot execute (SkylakeX needs AVX-512) is skipped with a line saying so; without an
# x86 CPU or without OpenBLAS under numpy there is nothing to force, and the script says so and exits 0.
# Usage: scripts/test-blas-kernels.sh [PYTHON]   (default .venv/bin/python; extra pytest args via PYTEST_ARGS)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}

# the tests whose outcome a BLAS kernel can change: the algorithm in numpy (scorecam, selection, the fills,
# the preview), its parity with the peers, the one-graph explainer's parity, the metrics, threads (bit for
# bit), huge activations; without the tests on the real Lite0 bundle (-m 'not lite0': its export and its
# 1280-pass torch references take minutes per run; the main run has them)
FILES=(tests/test_scorecam.py tests/test_kernel_fill.py tests/test_interactive.py tests/test_parity.py
       tests/test_explainer_graph.py tests/test_metrics.py tests/test_threads.py tests/test_zoo.py)
# kernel, then extra environment ("-" for none)
RUNS=("Haswell OPENBLAS_L2_SIZE=512" "SkylakeX -" "Zen -")

if [ "$(uname -m)" != x86_64 ]; then
    echo "blas kernels: $(uname -m) is not x86-64: OPENBLAS_CORETYPE names x86 kernels; nothing to force"
    exit 0
fi
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() { for f in "$@"; do [[ $flags == *" $f "* ]] || return 1; done; }

corename() {  # the kernel OpenBLAS loads in a fresh process under the environment "$@" (empty: no OpenBLAS)
    env "$@" "$PY" - <<'EOF'
import ctypes

import numpy as np

np.dot(np.ones((2, 2)), np.ones((2, 2)))  # numpy loads its BLAS lazily on some builds
paths = sorted({line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower() and "/" in line})
for path in paths:
    lib = ctypes.CDLL(path)
    for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename64_",
                 "openblas_get_corename"):
        if hasattr(lib, name):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_char_p
            print(fn().decode())
            raise SystemExit
EOF
}

own=$(corename)
if [ -z "$own" ]; then
    echo "blas kernels: numpy does not use OpenBLAS here; nothing to force"
    exit 0
fi
echo "blas kernels: this machine's own is $own (the main run); now ${FILES[*]}"
failed=0
for run in "${RUNS[@]}"; do
    read -r core extra <<<"$run"
    case $core in
        SkylakeX) need=(avx512f avx512cd avx512bw avx512dq avx512vl) ;;
        *) need=(avx2 fma) ;;
    esac
    if ! has "${need[@]}"; then
        echo "blas kernels: skip $core (this CPU lacks ${need[*]})"
        continue
    fi
    env_=(OPENBLAS_CORETYPE="$core")
    [ "$extra" != - ] && env_+=("$extra")
    loaded=$(corename "${env_[@]}")
    echo "blas kernels: ${env_[*]} (OpenBLAS loads $loaded)"
    # shellcheck disable=SC2086
    if ! env "${env_[@]}" "$PY" -m pytest -q -p no:cacheprovider -m "not lite0" ${PYTEST_ARGS:-} "${FILES[@]}"; then
        echo "blas kernels: FAILED under ${env_[*]}"
        failed=1
    fi
done
exit $failed
