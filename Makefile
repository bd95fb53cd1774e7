# Developer entry points. `make test` is what CI runs (through .ci/run).
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
BUILD  ?= build/cpu
STAMP  := $(BUILD)/.installed
SOURCES := CMakeLists.txt pyproject.toml $(wildcard cpp/*.cpp cpp/*.h cuda/*.cu cuda/*.h cuda/*.cuh)

.PHONY: dev test test-all lint demo model bench gpu-check clean

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# Editable install with a persistent build dir: re-running only recompiles what changed.
# flock: several shells (or engineers) running make at once share one build dir safely.
$(STAMP): $(VPY) $(SOURCES)
	@mkdir -p $(BUILD)
	flock $(BUILD)/../.lock sh -c "$(VPY) -m pip install -q scikit-build-core pybind11 cmake ninja && \
	  CMAKE_BUILD_PARALLEL_LEVEL=2 $(VPY) -m pip install -q --no-build-isolation -Cbuild-dir=$(BUILD) -e '.[test,bench]'"
	@touch $@

dev: $(STAMP)

model: $(STAMP)
	$(VPY) -m realizar.cli pull smollm2-135m --quiet

lint: $(STAMP)
	$(VENV)/bin/ruff check python tests benchmarks

test: lint model
	$(VPY) -m pytest -q -p no:cacheprovider

test-all: lint model
	$(VPY) -m pytest -q -p no:cacheprovider -m ''

demo: $(STAMP)
	$(VENV)/bin/realizar serve --demo

bench: $(STAMP)
	$(VPY) benchmarks/compare_llamacpp.py

# On a machine with an NVIDIA GPU (no network needed): builds both modules with CUDA into build/gpu, runs
# tests/test_cuda.py and benchmarks against PyTorch fp16, printing one table (about 4-6 minutes). Uses the
# plain $(PYTHON), not the venv, so a device image's own PyTorch and build tools are used.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf build $(VENV)
