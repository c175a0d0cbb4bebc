# `make run`: set up .venv if needed and run the whole pipeline on the embedded default (dvc repro).
# `make test`: set up .venv if needed, check ruff, run every test (the slow end-to-end ones included).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dvc runs each stage's `wflw ...` command through the shell: put the venv's scripts first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test lint reference clean

run: $(STAMP)
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

test: lint
	$(BIN)/python -m pytest

# The reference recipe on real WFLW (needs a GPU to finish in reasonable time): see README.
reference: $(STAMP)
	cp configs/deeppose_res50_wingloss_wflw.yaml params.yaml
	$(BIN)/dvc repro

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
