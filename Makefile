# Set-up is part of every target: each creates .venv if needed and installs the package (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-slow test-all demo bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned through constraints.txt to the local CPU wheel (an unpinned torch pulls CUDA builds).
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The default tier stays under ~3 minutes; tests marked `slow` (more than ~10 s each) run in CI too.
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: test test-slow

demo: $(STAMP)
	$(BIN)/imprompt demo

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_generation.py

clean:
	rm -rf $(VENV) build src/*.egg-info
