# make test  - create .venv, install torch (CPU by default) and the dev dependencies, build, test
# make demo  - build, train a small model with tracing, write out/demo.arrow, serve the viewer
#
# Bring your own CUDA torch: make test VENV_FLAGS=--system-site-packages TORCH_SPEC=
# (an empty TORCH_SPEC installs no torch; the venv then sees the system's).
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: all deps build test test-fast demo bench lint format cuda-check clean

all: test

$(VENV)/.deps: requirements/dev.txt
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(strip $(TORCH_SPEC)),$(PIP) install -q "$(TORCH_SPEC)")
	$(PIP) install -q -r requirements/dev.txt $(if $(strip $(TORCH_SPEC)),"$(TORCH_SPEC)")
	touch $@

deps: $(VENV)/.deps

# Against the torch in the venv, without build isolation (isolation would pull another torch).
build: deps
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: build
	$(PY) -m pytest -m "not ui and not slow" $(PYTEST_ARGS)

demo: build
	$(PY) -m dnntrace.demo --out out/demo.arrow $(DEMO_ARGS)
	$(VENV)/bin/dnntrace-view out/demo.arrow out/demo-mlp.arrow

bench: build
	$(PIP) install -q -r requirements/bench.txt
	$(PY) bench/bench_summary.py --quick
	$(PY) bench/bench_overhead.py --quick

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

format: deps
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/clang-format -i $$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

cuda-check: deps
	tools/cuda_compile_check.sh $(PY)

clean:
	rm -rf build out
