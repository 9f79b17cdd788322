# Everything runs in a local virtual environment built from scratch.
# torch is pinned to the CPU build first, so the project's torch requirement
# is already met and pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# constraints.txt pins torch (the CPU build) for every install, extras included
CONSTRAINTS ?= constraints.txt
TORCH  ?= $(shell grep '^torch==' $(CONSTRAINTS))

.PHONY: setup demo test test-all bench gpu-verify check-figures clean suite suite-quick suite-labpal suite-baselines

# csrc/: the editable install builds the compiled extension labpal_fast._C; rebuild on change
$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS) $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) 'setuptools>=70.1'  # the build backend, used without isolation
	$(PY) -m pip install -q --no-build-isolation -c $(CONSTRAINTS) -e '.[test,triton,cli]'
	touch $@

# the [integrations] extra (Lightning, transformers, Accelerate, TensorBoard: ~110 s to install),
# which only tests/test_integration_*.py need: its requirements read from pyproject.toml and
# installed alone (installing the extra through the package would build labpal_fast._C again)
INTEGRATIONS = $(shell $(PYTHON) -c 'import shlex, tomllib; \
	print(" ".join(map(shlex.quote, tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["integrations"])))')
$(VENV)/.installed-all: $(VENV)/.installed
	$(PY) -m pip install -q -c $(CONSTRAINTS) $(INTEGRATIONS)
	touch $@

# everything: the package with every extra
setup: $(VENV)/.installed-all

# what the demo alone needs: torch and the package with its [cli] extra (numpy, scikit-learn,
# matplotlib, tqdm), not the test tools, Triton or the framework packages
$(VENV)/.demo: pyproject.toml setup.py $(CONSTRAINTS) $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) 'setuptools>=70.1'
	$(PY) -m pip install -q --no-build-isolation -c $(CONSTRAINTS) -e '.[cli]'
	touch $@

# the first thing to run: LABPAL against SGD, Adam, ... on scikit-learn's digits (CPU, minutes);
# a venv already set up in full (make setup / test) serves as it is
demo: $(if $(wildcard $(VENV)/.installed),$(VENV)/.installed,$(VENV)/.demo)
	$(VENV)/bin/labpal-fast compare --task digits --out runs/digits-demo

# the quality suite (docs/quality.md): LABPAL's configurations against Adam, AdamW, tuned SGD and
# the untuned peers (the [suite] extra) on 11 small tasks; resumable, results in runs/suite*
$(VENV)/.suite: $(VENV)/.installed
	$(PY) -m pip install -q --no-build-isolation -c $(CONSTRAINTS) -e '.[suite]'
	touch $@

SUITE_ARGS ?=
suite: $(VENV)/.suite          # everything trained afresh, 3 seeds (~60 min on 2 cores)
	$(VENV)/bin/labpal-fast suite --full --out runs/suite $(SUITE_ARGS)

suite-labpal: $(VENV)/.suite   # the 4 LABPAL configurations against the committed baselines (~15 min)
	$(VENV)/bin/labpal-fast suite --labpal --out runs/suite-labpal $(SUITE_ARGS)

suite-quick: $(VENV)/.suite    # seed 0, the 4 LABPAL configurations and Adam (~5 min)
	$(VENV)/bin/labpal-fast suite --quick --out runs/suite-quick $(SUITE_ARGS)

suite-baselines: $(VENV)/.suite  # rewrites benchmarks/suite/baselines.jsonl (~30 min)
	$(VENV)/bin/labpal-fast suite --labpal --regenerate-baselines --out runs/suite-baselines $(SUITE_ARGS)


# `make test`: the behaviour suites, every backend (every suite but the ones listed below).
# `make test-all` (CI) adds what needs more set-up or time: installing from the built sdist and
# wheel, the framework integrations (their packages come with .installed-all) and the multi-rank
# suites (gloo process groups). pytest's exit code 5 (no tests ran) fails both. Both run the
# tests in one pytest worker per core (pytest-xdist), a file's tests in one worker (its module and
# session fixtures run once); PYTEST_WORKERS=0: all in this process.
TEST_ALL_ONLY := tests/test_install.py tests/test_integration_*.py tests/test_distributed.py \
	tests/test_fsdp.py tests/test_docs_ranks.py
PYTEST_WORKERS ?= auto
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests $(addprefix --ignore=,$(wildcard $(TEST_ALL_ONLY)))

test-all: $(VENV)/.installed-all
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests

# GPU code checked without a GPU (README, "Verifying GPU code without a GPU"): every recorded
# Triton specialization compiled for sm_80/sm_90, the CUDA extension built against the CUDA torch
GPU_VERIFY_ARGS ?=
gpu-verify: $(VENV)/.installed-all  # without --records it runs the tests (all but test_install)
	$(PY) tools/gpu_verify.py $(GPU_VERIFY_ARGS)

# the documentation's tables, each compared with what its tool prints now: the scripts that take
# minutes rerun, the long runs (the quality suite, SGD mode's rates) re-rendered from their
# committed raw results (tools/check_figures.py; --list: what it covers and what not);
# CHECK_FIGURES_ARGS="--write" puts the fresh tables in the pages, "--cheap" the seconds-long ones
CHECK_FIGURES_ARGS ?=
check-figures: $(VENV)/.installed  # ~10 min on 2 idle cores (mixed precision ~5, the demo 1-3)
	$(PY) tools/check_figures.py $(CHECK_FIGURES_ARGS)

bench: $(VENV)/.installed
	$(PY) -m pytest -q -s benchmarks --benchmark-enable --benchmark-columns=min,median,mean,rounds

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks runs
