# `make demo` and `make test` work on a fresh machine that has only Python 3.10+.
# torch is installed first and pinned (a CPU build); the project's extras come after it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  := models/efficientnet_lite0
OUT    ?= out/demo

.PHONY: install demo test test-deps lint bench serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[export,test,serve,batch,ray]'
	touch $(STAMP)

install: $(STAMP)

$(MODEL)/model.onnx: $(STAMP)
	$(BIN)/python -m exporter efficientnet_lite0 --out $(MODEL) --force

demo: $(MODEL)/model.onnx
	$(BIN)/python -m runtime.explain $(MODEL) samples/chelsea.png --top-k 1 --out $(OUT)
	@echo "overlay written: $(OUT)/chelsea.*.png"

test-deps:
	scripts/install-test-deps.sh

# SCORECAM_STRICT_TOOLS: a test whose outside tool (chromium, node, ray) is missing fails instead of skipping
test: $(STAMP) test-deps
	$(BIN)/python -m ruff check .
	SCORECAM_STRICT_TOOLS=1 $(BIN)/python -m pytest -q

serve: $(MODEL)/model.onnx
	$(BIN)/python -m runtime.serve $(MODEL)

lint: $(STAMP)
	$(BIN)/python -m ruff check .

bench: $(MODEL)/model.onnx
	$(BIN)/python -m bench

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
