"""Shared test set-up. Triton kernels run on the CPU through its interpreter when there is no
GPU; the variable must be set before anything imports triton, hence here, at collection."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run benchmarks/gpu_check on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def eager_backend(monkeypatch):
    """Make backend="auto" resolve to eager: the ground truth the optimizer tests pin down."""
    monkeypatch.setenv("LABPAL_FAST_BACKEND", "eager")
