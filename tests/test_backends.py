"""Backend choice: explicit requests, "auto", the environment variable, and clear refusals."""
import importlib.util
import os

import pytest
import torch

from labpal_fast import LABPAL
from labpal_fast import ops


def test_unknown_backend_and_environment_value_are_rejected(monkeypatch):
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="backend must be one of"):
        LABPAL(p, backend="fast")
    monkeypatch.setenv("LABPAL_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LABPAL_FAST_BACKEND"):
        LABPAL(p)


def test_auto_on_cpu_takes_the_extension_when_built_else_eager(monkeypatch):
    monkeypatch.delenv("LABPAL_FAST_BACKEND", raising=False)
    opt = LABPAL([torch.nn.Parameter(torch.randn(3))])
    expected = "ext" if ops.why_unavailable("ext", [torch.device("cpu")]) is None else "eager"
    assert opt.backend == expected


@pytest.mark.parametrize("name", ["eager", "ext", "triton"])
def test_environment_variable_forces_a_backend_or_says_why_not(monkeypatch, name):
    monkeypatch.setenv("LABPAL_FAST_BACKEND", name)
    p = [torch.nn.Parameter(torch.randn(3))]
    reason = ops.why_unavailable(name, [torch.device("cpu")])
    if reason is None:
        assert LABPAL(p).backend == name
    else:
        with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run"):
            LABPAL(p)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        LABPAL([torch.nn.Parameter(torch.randn(3))], backend="triton")


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI must run the Triton kernels")
def test_ci_has_triton_so_its_kernel_tests_do_not_skip():
    assert importlib.util.find_spec("triton") is not None
    assert ops.why_unavailable("triton", [torch.device("cpu")]) is None
