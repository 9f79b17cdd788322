# Everything runs in a local virtual environment built from scratch.
# torch is pinned to the CPU build first, so the project's torch requirement
# is already met and pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# constraints.txt pins torch (the CPU build) for every install, extras included
CONSTRAINTS ?= constraints.txt
TORCH  ?= $(shell grep '^torch==' $(CONSTRAINTS))

.PHONY: setup demo test bench gpu-verify clean

SOURCES := pyproject.toml setup.py $(CONSTRAINTS) $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
# extras: what `make demo` needs (the command's), then what the tests need besides
DEMO_EXTRAS := cli
ALL_EXTRAS  := test,triton,cli,integrations
# $(call install,EXTRAS): the venv, torch, and the package editable with EXTRAS; the editable
# install builds the compiled extension labpal_fast._C (rebuilt when csrc/ changes)
define install
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) 'setuptools>=70.1'  # the build backend, used without isolation
	$(PY) -m pip install -q --no-build-isolation -c $(CONSTRAINTS) -e '.[$(1)]'
endef

$(VENV)/.installed: $(SOURCES)
	$(call install,$(ALL_EXTRAS))
	touch $@ $(VENV)/.demo

# the demo alone: torch, numpy, scikit-learn, matplotlib, tqdm (no test tools, Triton, Lightning)
$(VENV)/.demo: $(SOURCES)
	$(call install,$(DEMO_EXTRAS))
	touch $@

setup: $(VENV)/.installed

# the first thing to run: LABPAL against SGD, Adam, ... on scikit-learn's digits (CPU, minutes)
demo: $(VENV)/.demo
	$(VENV)/bin/labpal-fast compare --task digits --out runs/digits-demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# GPU code checked without a GPU (README, "Verifying GPU code without a GPU"): every recorded
# Triton specialization compiled for sm_80/sm_90, the CUDA extension built against the CUDA torch
GPU_VERIFY_ARGS ?=
gpu-verify: $(VENV)/.installed
	$(PY) tools/gpu_verify.py $(GPU_VERIFY_ARGS)

bench: $(VENV)/.installed
	$(PY) -m pytest -q -s benchmarks --benchmark-enable --benchmark-columns=min,median,mean,rounds

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks runs
