# `make demo` and `make test` work on a fresh machine that has only Python 3.10+.
# torch and torchvision are installed first and pinned (both lie on the machine's disk; a bare `torch`
# requirement resolved on its own may pull a multi-GB CUDA build); the project's extras come after them.
# pytorch-grad-cam (the parity reference) goes in without its dependencies: it would pull opencv-python,
# which clashes with the runtime's opencv-python-headless. So does ultralytics (the YOLOv8n export in the
# detector tests): its imports for an ONNX export are already here (torch, torchvision, numpy, pyyaml, pillow,
# matplotlib, requests, onnx; YOLO_OFFLINE=1 keeps it from fetching anything).
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
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[export,test,serve,batch,ray]'
	$(BIN)/python -m pip install -q --no-deps grad-cam==1.5.7 ttach==0.0.3
	$(BIN)/python -m pip install -q --no-deps ultralytics==8.4.190
	touch $(STAMP)

install: $(STAMP)

$(MODEL)/model.onnx: $(STAMP)
	$(BIN)/python -m exporter efficientnet_lite0 --out $(MODEL) --force

demo: $(MODEL)/model.onnx
	$(BIN)/python -m runtime.explain $(MODEL) samples/chelsea.png --top-k 1 --out $(OUT)
	@echo "overlay written: $(OUT)/chelsea.*.png"

test-deps:
	scripts/install-test-deps.sh

# SCORECAM_STRICT_TOOLS: a test whose outside tool (chromium, node, ray) is missing fails instead of skipping.
# Then the numerics tests again under the OpenBLAS kernels other CPUs pick (Haswell with OPENBLAS_L2_SIZE=512,
# as an AMD EPYC VM runs; SkylakeX where AVX-512 is; Zen): no test may depend on this machine's BLAS kernel.
test: $(STAMP) test-deps
	$(BIN)/python -m ruff check .
	SCORECAM_STRICT_TOOLS=1 $(BIN)/python -m pytest -q
	SCORECAM_STRICT_TOOLS=1 scripts/test-blas-kernels.sh $(BIN)/python

serve: $(MODEL)/model.onnx
	$(BIN)/python -m runtime.serve $(MODEL)

lint: $(STAMP)
	$(BIN)/python -m ruff check .

bench: $(MODEL)/model.onnx
	$(BIN)/python -m bench

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
