# Set-up, build, tests, demo and benchmarks. Everything runs in a local virtual environment (.venv)
# that the first target creates, so `make demo` and `make test` work on a fresh machine.
#   LETHE_BUILD_CUDA=0 make test   skips the CUDA build while iterating (CI builds everything)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS_STAMP := $(VENV)/.deps5-$(subst =,-,$(TORCH_SPEC))
# one stamp per build setting, so that changing LETHE_BUILD_CUDA, the archs or LETHE_DEBUG rebuilds
BUILD_STAMP = build/.built-cuda$(LETHE_BUILD_CUDA)-$(subst ;,_,$(TORCH_CUDA_ARCH_LIST))-debug$(LETHE_DEBUG)
SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0a

.PHONY: all deps build test demo bench info gpu-check clean

all: build

$(PY):
	python3 -m venv $(VENV)

$(DEPS_STAMP): $(PY)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install "$(TORCH_SPEC)" numpy ninja pytest pytest-benchmark transformers peft \
	  tokenizers safetensors scipy scikit-learn rouge-score matplotlib tqdm curvlinops-for-pytorch \
	  sentence-transformers
	touch $@

deps: $(DEPS_STAMP)

# pip's output is kept: it carries ptxas's register and spill report for every CUDA kernel.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	mkdir -p build
	$(PY) -m pip install -v --no-build-isolation -e . 2>&1 | tee build/build.log \
	  | grep --line-buffered -E "lethe build:|\[[0-9]+/[0-9]+\] |error" | cut -c1-160
	$(PY) -c "import lethe._C"
	rm -f build/.built-*
	touch $@

build: $(BUILD_STAMP)

info: build
	$(PY) -m lethe.info

test: build
	$(PY) -m lethe.info
	$(PY) tools/ptxas_report.py build/build.log
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: build
	$(PY) -m lethe.cli demo

bench: build
	$(PY) -m pytest -q -s -o python_files="bench_*.py" -p no:cacheprovider benchmarks --benchmark-columns=min,median,mean,rounds

# The prepared check for a GPU machine (docs/architecture.md): build for sm_90a against the torch
# found there, sanitizer, GPU tests, GPU benchmarks, a summary in OUT. Dry without a GPU.
OUT ?= build/gpu-check
GPU_PY = $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PY=$(GPU_PY) tools/gpu_check.sh $(OUT)

clean:
	rm -rf build python/lethe/*.so python/lethe.egg-info
