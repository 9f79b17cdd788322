"""Shared test set-up. Triton kernels run on the CPU through its interpreter when there is no
GPU; the variable must be set before anything imports triton, hence here, at collection."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the tests' tensors are tiny: one intra-op thread runs them fastest (a second one mostly waits
# for a busy core), and leaves the other cores to the other pytest workers (make test: -n auto)
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run benchmarks/gpu_check on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=("eager", "ext", "triton"))
def backend(request, monkeypatch):
    """Every behaviour test runs once per backend: backend="auto" resolves to it. A backend
    that cannot run here is skipped with the reason (CI asserts that ext and Triton can)."""
    from labpal_fast import ops

    reason = ops.why_unavailable(request.param, [torch.device("cpu")])
    if reason is not None:
        pytest.skip(f"backend {request.param!r} cannot run here: {reason}")
    monkeypatch.setenv("LABPAL_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture
def one_thread():
    """Ops on tiny tensors run fastest on one thread (and wait on no busy core's other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
