# `make demo` and `make test` work on a fresh machine: they create .venv if needed and keep an installed torch.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.trainwatch-installed
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint ui clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Keep a torch that is already installed; otherwise take $(TORCH) (the local CPU wheel on these machines).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/trainwatch demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q -ra -n auto

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf .trainwatch mlflow.db mlartifacts lightning_logs .pytest_cache
