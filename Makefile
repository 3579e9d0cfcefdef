# ISDA: the two commands of the README are `make main` and `make test`; both set up first.
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export ISDA_VENV := $(VENV)

.PHONY: setup test main cuda-check gpu-check
setup:
	@bash tools/setup/setup.sh

# CUDA compile check first, the pytest suite last (its summary line closes the output).
test: setup
	@bash tools/setup/cuda_compile_check.sh
	@bash tools/setup/compiler_check.sh
	$(PY) -m pytest tests

main: setup
	$(PY) tools/main_job.py

cuda-check: setup
	@bash tools/setup/cuda_compile_check.sh

# On a GPU machine: the CUDA kernels and the tiny model on the GPU (docs/gpu.md); skips without CUDA.
gpu-check: setup
	@bash tools/gpu_check.sh
