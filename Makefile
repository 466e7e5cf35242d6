# Set-up is complete and idempotent: `make demo` or `make test` on a fresh machine installs what is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
DEMO_DIR ?= demo-output
# Make a parallel pytest run impossible to confuse with a hung one: progress goes to stderr.
export PYTHONUNBUFFERED := 1

VENV_TV := .venv-tv
TORCH_TV ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-fast test-torchvision lint bench clean

setup: $(STAMP) graphviz-bin

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned to the CPU wheel, so that resolving the project never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev,parquet]'
	touch $(STAMP)

graphviz-bin:
	@command -v dot >/dev/null 2>&1 || { \
	  echo "Installing Graphviz (dot) with apt-get" >&2; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && $$SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null; }

demo: setup
	$(BIN)/surrogate demo --out $(DEMO_DIR)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# torchvision's wheels need their own torch build (a CUDA wheel, ~5.5 GB, runs on the CPU): a separate venv.
$(VENV_TV)/.installed: pyproject.toml
	[ -x $(VENV_TV)/bin/python ] || $(PY) -m venv $(VENV_TV)
	$(VENV_TV)/bin/python -m pip install --quiet $(TORCH_TV)
	$(VENV_TV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

test-torchvision: $(VENV_TV)/.installed graphviz-bin
	$(VENV_TV)/bin/python -m pytest -q tests/test_torchvision.py

bench: setup
	bash benchmarks/run_all.sh

lint: setup
	$(BIN)/ruff check concepts surrogate tests benchmarks examples

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
