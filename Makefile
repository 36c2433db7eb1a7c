# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test install install-test rtsp-deps lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel

# torch first, pinned, so nothing pulls a multi-GB CUDA build; setup.cfg keeps torch>=2.3.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/aiflow demo

rtsp-deps:
	bash scripts/install_rtsp_deps.sh

lint: install-test
	$(BIN)/ruff check aiflow_stream tests bench graphs drivers
	$(BIN)/mypy aiflow_stream

test: install-test rtsp-deps lint
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: install-test
	$(BIN)/python bench/transport.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
