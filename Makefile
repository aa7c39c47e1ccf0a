# dicom-node — `make run` starts the node, `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed

.PHONY: run test lint typecheck check install clean help

help:
	@echo "make run        create .venv if needed, install, start the node (Ctrl-C stops it)"
	@echo "make test       same set-up, then the whole test suite"
	@echo "make lint       ruff;  make typecheck: mypy"

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependency list changes. The constraints file pins torch's
# version, so a build installed first (CPU or CUDA, README "GPU install") is kept.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dicom-node serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
