#!/usr/bin/env bash
# What the test suite needs beyond Python, installed here so `make test` (and so CI) has it:
# Debian's chromium for the browser tests (Playwright drives /usr/bin/chromium; its own browser
# download cannot work without the internet), and the npm packages of the examples that have a
# package.json. Idempotent: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing Debian's chromium (browser tests)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "error: the browser tests need /usr/bin/chromium: run 'sudo apt-get install chromium'" >&2
        exit 1
    fi
fi

# onnxruntime-node's install script fetches CUDA binaries from outside the package registries: skip
# it (the CPU binaries ship inside the package).
export ONNXRUNTIME_NODE_INSTALL=skip
for dir in examples/*/; do
    if [ -f "$dir/package.json" ] && [ ! -d "$dir/node_modules" ]; then
        if ! command -v npm >/dev/null 2>&1; then
            echo "error: $dir needs Node.js and npm (Debian: apt-get install nodejs npm)" >&2
            exit 1
        fi
        echo "npm install in $dir"
        (cd "$dir" && npm install --no-audit --no-fund --ignore-scripts --loglevel=error)
    fi
done
