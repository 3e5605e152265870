# tuneline: every command sets itself up. State lives under .tuneline/ (git-ignored).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= configs/demo.yaml
STATE := $(CURDIR)/.tuneline
export DAGSTER_HOME := $(STATE)/dagster
export MLFLOW_TRACKING_URI := sqlite:///$(STATE)/mlflow.db?timeout=60
export TUNELINE_HOME := $(STATE)
export GX_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test test-long ui serve drift-demo prod-up prod-run prod-down clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first (the CPU wheel), then the project; the stamp is renewed when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
	@mkdir -p $(DAGSTER_HOME)
	@cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

run: install
	$(BIN)/tuneline run --recipe $(RECIPE)

# two pytest-xdist workers, one test file each at a time, one torch thread each: the tests are mostly single-threaded
# Python, so both cores of a small machine work (AVX2-only AMD EPYC: 13 min 56 s against 22 min 17 s one by one).
# TEST_WORKERS=0 runs them in this process, one after another, with torch's own thread count.
TEST_WORKERS ?= 2
test: install
	$(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
		--durations=15

# the whole-graph drills make test leaves out (each has a short version in make test)
test-long: install
	$(BIN)/python -m pytest -q -m long

ui: install
	$(BIN)/tuneline ui

serve: install
	$(BIN)/tuneline serve --recipe $(RECIPE)

drift-demo: install
	RECIPE=$(RECIPE) $(BIN)/python -m pipelines.drift_demo

# The production stack on this machine: PostgreSQL (must be reachable: TUNELINE_PG_HOST/PORT/USER, PGPASSWORD),
# an MLflow server on it, the Dagster daemon and webserver; all bound to 127.0.0.1, stopped by PID.
prod-up: install
	$(BIN)/tuneline prod up --recipe $(RECIPE)

prod-run: install
	$(BIN)/tuneline prod run --recipe $(RECIPE)

prod-down:
	$(BIN)/tuneline prod down

clean:
	rm -rf $(STATE)
