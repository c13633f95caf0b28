# fedpi: common developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

ROUNDS ?= 5
OUT ?= runs/local

.PHONY: help venv proto run test test-fast bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

venv: $(STAMP)  ## create .venv and install fedpi with its test tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

proto: $(STAMP)  ## regenerate generated/ from proto/
	$(PY) -m grpc_tools.protoc -Igenerated=proto --python_out=. --pyi_out=. --grpc_python_out=. \
		$(shell find proto -name '*.proto')

run: $(STAMP)  ## three local workers + a coordinator on 127.0.0.1: a real training run
	$(PY) -m coordinator_service demo --rounds $(ROUNDS) --output-dir $(OUT)

test: $(STAMP)  ## the whole test suite
	$(PY) -m pytest

bench: $(STAMP)  ## benchmarks: transport, aggregation memory, reference workload
	$(PY) -m tests.bench

clean:  ## remove the virtualenv and run outputs
	rm -rf $(VENV) runs .pytest_cache
