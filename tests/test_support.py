"""The declared version ranges: what pip is told (pyproject.toml) and what is checked at run time
(labpal_fast._support) say the same, and the checks name the versions."""
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

from labpal_fast import _support

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def _requirement(name, requirements):
    (spec,) = [r for r in requirements if r.split(">")[0].split("<")[0].split("=")[0].strip() == name]
    return spec.replace(" ", "")


def test_pyproject_declares_the_checked_ranges():
    project = PYPROJECT["project"]
    assert _requirement("torch", project["dependencies"]) == "torch" + _support._span(_support.TORCH)
    assert _requirement("triton", project["optional-dependencies"]["triton"]) \
        == "triton" + _support._span(_support.TRITON)
    lo, hi = _support.PYTHON
    assert project["requires-python"] == f">={lo[0]}.{lo[1]}"
    classified = {c.rsplit(" :: ", 1)[1] for c in project["classifiers"]
                  if c.startswith("Programming Language :: Python :: 3.")}
    assert classified == {f"3.{minor}" for minor in range(lo[1], hi[1])}


def test_this_run_is_inside_the_ranges():
    assert _support.unsupported() is None, _support.unsupported()
    assert _support.PYTHON[0] <= sys.version_info[:2] < _support.PYTHON[1]
    assert _support.TORCH[0] <= _support.release(torch.__version__) < _support.TORCH[1]


@pytest.mark.parametrize("version, expected", [
    ("2.13.0+cpu", (2, 13)), ("2.11.0+cu130", (2, 11)), ("2.14.0a0+git1234", (2, 14)),
    ("3.7.1", (3, 7)), ("10.2", (10, 2))])
def test_release(version, expected):
    assert _support.release(version) == expected


def test_release_rejects_garbage():
    with pytest.raises(ValueError, match="not a version"):
        _support.release("unknown")


@pytest.mark.parametrize("torch_version, python_version, named", [
    ("2.10.1", "3.11.7", ["torch 2.10.1", "torch>=2.11,<2.14"]),
    ("2.14.0", "3.11.7", ["torch 2.14.0"]),
    ("2.13.0", "3.10.13", ["Python 3.10.13", "Python>=3.11,<3.13"]),
    ("2.1.0", "3.13.0", ["torch 2.1.0", "Python 3.13.0"]),
])
def test_unsupported_names_the_versions(torch_version, python_version, named):
    reason = _support.unsupported(torch_version, python_version)
    assert reason is not None
    for words in named:
        assert words in reason, reason


@pytest.mark.parametrize("torch_version, python_version",
                         [("2.11.0+cu130", "3.12.3"), ("2.13.0+cpu", "3.11.7"), ("2.12.1", "3.12.0")])
def test_supported_is_quiet(torch_version, python_version):
    assert _support.unsupported(torch_version, python_version) is None


def test_warns_once(monkeypatch):
    monkeypatch.setattr(_support, "_warned", False)
    monkeypatch.setattr(torch, "__version__", "2.9.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _support.warn_if_unsupported()
        _support.warn_if_unsupported()
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    assert "torch 2.9.0" in str(caught[0].message) and "torch>=2.11,<2.14" in str(caught[0].message)


def test_no_warning_inside_the_range(monkeypatch):
    monkeypatch.setattr(_support, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _support.warn_if_unsupported()


@pytest.mark.parametrize("version, ok", [("3.6.0", True), ("3.7.1", True), ("3.5.1", False),
                                         ("3.8.0", False), ("3.4.0+git5b1b4e3a", False)])
def test_triton_unsupported(version, ok):
    reason = _support.triton_unsupported(version)
    assert (reason is None) == ok, reason
    if not ok:
        assert f"triton {version}" in reason and "triton>=3.6,<3.8" in reason \
            and "labpal-fast[triton]" in reason
