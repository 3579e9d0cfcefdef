# ISDA: the two commands of the README are `make main` and `make test`; both set up first.
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export ISDA_VENV := $(VENV)

.PHONY: setup test test-fallback main cuda-check gpu-check
setup:
	@bash tools/setup/setup.sh

# CUDA compile check first, the pytest suite last (its summary line closes the output).
test: setup
	@bash tools/setup/cuda_compile_check.sh
	@bash tools/setup/compiler_check.sh
	$(PY) -m pytest tests

# The same suite on the registry fallback Detectron2 (v0.6 Python code, no compiled ops), in a
# second virtual environment (CI runs both flavours: .ci/run). Test files that run no Detectron2
# code are marked flavour_independent and left out here: the first flavour covers them.
FALLBACK_VENV ?= $(CURDIR)/.venv-fallback
test-fallback:
	@ISDA_VENV=$(FALLBACK_VENV) ISDA_DETECTRON2_FLAVOUR=fallback bash tools/setup/setup.sh
	$(FALLBACK_VENV)/bin/python -m pytest tests -m "not flavour_independent"

main: setup
	$(PY) tools/main_job.py

cuda-check: setup
	@bash tools/setup/cuda_compile_check.sh

# On a GPU machine: the CUDA kernels and the tiny model on the GPU (docs/gpu.md); skips without CUDA.
gpu-check: setup
	@bash tools/gpu_check.sh
