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

# serve-install: the MONAI Label app's tests start a real server (they skip without it)
test: install serve-install
	$(PY) -m pytest tests

demo: install
	$(PY) -m scripts.demo --workdir data/demo

clean-demo:
	rm -rf data/demo

# MONAI Label server for QuPath / DSA (apps/monailabel; docs/monailabel.md). serve-install adds MONAI Label
# 0.8.5 to .venv without moving any pin (requirements.txt is the constraint file).
STUDIES ?= data/demo/cohort/slides
CHECKPOINTS ?= models/model.pt
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_CONF ?=

.PHONY: serve-install serve
serve-install: $(VENV)/.monailabel

$(VENV)/.monailabel: $(VENV)/.installed apps/monailabel/requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps monailabel==0.8.5 ./apps/monailabel/stubs/pydicom_seg $(PIP_QUIET)
	$(PY) -m pip install -q --disable-pip-version-check -r apps/monailabel/requirements.txt -c requirements.txt $(PIP_QUIET)
	@touch $@

serve: serve-install
	$(PY) -m monailabel.main start_server --app apps/monailabel --studies $(STUDIES) --host $(HOST) --port $(PORT) \
		--conf models smile --conf checkpoints $(CHECKPOINTS) $(SERVE_CONF)
