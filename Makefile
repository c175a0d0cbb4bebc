# `make run`: set up .venv if needed and run the whole pipeline on the embedded default (dvc repro).
# `make test`: set up .venv if needed, check ruff, run every test (the slow end-to-end ones included).
# `make test-fast`: the same without the slow end-to-end tests (the unit tier, a few minutes).
# `make ui`: the MLflow UI for the embedded default store (sqlite:///mlflow.db, artifacts in mlartifacts/) on
#   http://127.0.0.1:5000 (`make ui MLFLOW_PORT=5001` for another port).
# `make prefect-server`: Prefect's server and UI (its SQLite database in ~/.prefect) on http://127.0.0.1:4200.
# `make serve`: serve deployment train-wflw/local from this checkout (`make serve DEPLOYMENT=name` for another).
# `make worker`: create work pool `wflw` (process), deploy prefect.yaml's train-wflw/process, start a worker.
#   Then: `PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run train-wflw/local --watch`.
# `make lock`: re-resolve requirements.lock from pyproject.toml (the dev and s3 extras included) to the newest allowed
#   releases with pip-tools' pip-compile, run from a throwaway venv; `make lock LOCK_FLAGS=` keeps the current pins
#   that still fit and only adds/drops what pyproject.toml changed. .venv installs exactly the lock (see $(STAMP)).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dvc runs each stage's `wflw ...` command through the shell: put the venv's scripts first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
LOCK := requirements.lock
# The lock also pins pip itself, and torch/torchvision to the releases this machine keeps on disk (pip's config caps
# them with a constraint file and finds them through its extra index; pip-compile reads those indexes but not the cap).
LOCK_PINS := pip torch==2.14.1 torchvision==0.29.1
LOCK_TOOLS := pip==26.3 pip-tools==7.6.2
LOCK_FLAGS ?= --upgrade
MLFLOW_PORT ?= 5000
PREFECT_PORT ?= 4200
DEPLOYMENT ?= local
# The Prefect server the serve process, the worker and `prefect deployment run` talk to.
PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api

.PHONY: run test test-fast ui prefect-server serve worker lint reference tuned lock clean

run: $(STAMP)
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

test: lint
	$(BIN)/python -m pytest

test-fast: lint
	$(BIN)/python -m pytest -m "not slow"

# --default-artifact-root (not --artifacts-destination): experiments made in the UI keep a local mlartifacts/<id>
# location, readable by the pipeline's direct sqlite client; runs logged there before are served from their own.
ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db \
		--default-artifact-root ./mlartifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT)

prefect-server: $(STAMP)
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) --analytics-off

serve: $(STAMP)
	PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/python flows/serve.py --name $(DEPLOYMENT)

worker: $(STAMP)
	PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect work-pool create wflw --type process --overwrite
	PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect --no-prompt deploy --all
	PREFECT_API_URL=$(PREFECT_API_URL) WFLW_CHECKOUT=$(CURDIR) $(BIN)/prefect worker start --pool wflw

# The reference recipe on real WFLW (needs a GPU to finish in reasonable time): see README.
reference: $(STAMP)
	cp configs/deeppose_res50_wingloss_wflw.yaml params.yaml
	$(BIN)/dvc repro

# The same with this project's measured choices (README, "The reference recipe on real WFLW").
tuned: $(STAMP)
	cp configs/deeppose_res50_wingloss_wflw_tuned.yaml params.yaml
	$(BIN)/dvc repro

lint: $(STAMP)
	$(BIN)/ruff check src tests flows
	$(BIN)/ruff format --check src tests flows

# The install resolves nothing: every distribution is the lock's own file at its pinned version, checked against
# its hashes and installed with --no-deps, so no release upstream can change or break it. pip and setuptools come
# from the lock first (the venv starts with the pip and setuptools bundled with Python); the rest is installed by
# that pip, and the one sdist in the lock (antlr4-python3-runtime, which hydra-core pins and which has no wheel)
# is built with the locked setuptools (--no-build-isolation), not with whatever an isolated build would fetch.
# Then the project itself, editable, without touching them. `pip check` fails if the lock lacks something a
# package needs (run `make lock`); tests/test_lock.py checks what pip check cannot see: what extras ask for.
BOOTSTRAP := pip setuptools
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	awk -v want="$(BOOTSTRAP)" 'BEGIN { split(want, w, " "); for (i in w) keep[w[i]] } \
		/^[^ #]/ { split($$1, pin, "=="); on = (pin[1] in keep) } on' $(LOCK) > $(VENV)/bootstrap.lock
	$(BIN)/python -m pip install --no-deps --require-hashes -r $(VENV)/bootstrap.lock
	$(BIN)/python -m pip install --no-deps --require-hashes --no-build-isolation -r $(LOCK)
	$(BIN)/python -m pip install --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

# `make lock` is the one step that asks the indexes for the newest releases: that is its job. Its tools are pinned;
# what they need is resolved when it runs, and none of it reaches the lock.
# --generate-hashes hashes the wheels on the local indexes as well as PyPI's, so `pip install -r` (hash-checking)
# accepts the torch/nvidia wheels from disk. Index and find-links options stay out of the lock: pip's config has them.
lock:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp" && \
	"$$tmp/bin/python" -m pip install --quiet $(LOCK_TOOLS) && \
	printf '%s\n' $(LOCK_PINS) | CUSTOM_COMPILE_COMMAND='make lock' "$$tmp/bin/pip-compile" $(LOCK_FLAGS) \
		--quiet --extra dev --extra s3 --allow-unsafe --strip-extras --generate-hashes --no-emit-index-url \
		--no-emit-find-links --output-file $(LOCK) pyproject.toml -

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
