# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv/ first (idempotent).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pip on this machine lists local wheel folders that may not exist; hide only those lines.
PIP_QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install test demo clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt requirements-reference.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing pinned dependencies into $(VENV)/ (first time: a few minutes)..."
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt $(PIP_QUIET)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-reference.txt $(PIP_QUIET)
	@touch $@

test: install
	$(PY) -m pytest tests

demo: install
	$(PY) -m scripts.demo --workdir data/demo

clean-demo:
	rm -rf data/demo
