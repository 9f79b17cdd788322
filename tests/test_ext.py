"""The compiled extension (csrc/, `labpal_fast._C`): what is its own. Its ops against eager
and its trajectories are in test_backend_ops.py and test_trajectories.py, with the other
backends'. Here: opcheck, determinism across thread counts, argument checks, the fallback
without it, and the CUDA sources (`nvcc -c`)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

from labpal_fast import ops as backends
from labpal_fast.ops import ext

from backend_cases import make_flat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ext = pytest.mark.skipif(not ext.available, reason=f"extension not built: {ext.why}")


def test_extension_is_built_in_ci():
    """CI builds the extension from source: a silent build failure must not pass unnoticed."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("not CI (set CI=true to require the extension)")
    assert ext.available, ext.why


@needs_ext
def test_reductions_are_deterministic_whatever_the_threads():
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 1, max(threads, 2)):
            torch.set_num_threads(t)
            flat = make_flat(300_007, torch.float32, seed=11)
            results.append(ext.BACKEND.form_direction(flat, summed=True, inv_m=0.5, momentum=0.9,
                                                      decays=[0.01, 0.02, 0.0], line_terms=True))
            results.append(ext.BACKEND.grad_sqnorm(make_flat(300_007, torch.float16, seed=12),
                                                   summed=True, inv_m=0.25).reshape(1))
    finally:
        torch.set_num_threads(threads)
    for i, r in enumerate(results[2:]):
        assert torch.equal(r, results[i % 2])


@needs_ext
def test_bad_arguments_raise_with_a_message():
    a = make_flat(10, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="direction"):
        torch.ops.labpal_fast.form_direction(a.direction[:5], a.grad, None, a.param, [0], [10], [0.0],
                                             1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="segment"):
        torch.ops.labpal_fast.form_direction(a.direction, a.grad, None, a.param, [0], [11], [0.0],
                                             1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="grad_sum"):
        torch.ops.labpal_fast.accumulate(a.grad_sum.double(), a.grad, True)


# ------------------------------------------------------------------------------ opcheck
def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    n = 1000
    r = lambda dtype=torch.float32: torch.randn(n, generator=g).to(dtype)  # noqa: E731
    coef = torch.tensor(-0.5, dtype=torch.float64)
    return [
        ("accumulate", (r(), r(torch.float16), True)),
        ("accumulate", (r(), r(), False)),
        ("form_direction", (r(), r(), None, r(), [0, 400], [400, n], [0.0, 0.1], 1.0, 0.9, True)),
        ("form_direction", (r(), r(torch.bfloat16), r(), r(torch.bfloat16), [0], [n], [0.01], 0.5,
                            0.0, False)),
        ("form_direction", (r(), r(), r(), r(), [0], [n], [0.01], 0.5, 0.9, True,
                            torch.tensor(0.25, dtype=torch.float64))),
        ("grad_sqnorm", (r(), None, 1.0)),
        ("grad_sqnorm", (r(torch.float16), r(), 0.5)),
        ("train_update", (r(), r(), coef, torch.tensor(True))),
        ("train_update", (r(torch.float16), r(), coef, torch.tensor(False))),
        ("line_move", (r(), r(), r(), coef)),
    ]


@needs_ext
@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.labpal_fast, name).default, args)


# ------------------------------------------------------------------------------ choice, fallback
def test_auto_takes_ext_on_cpu_when_built(monkeypatch):
    monkeypatch.delenv("LABPAL_FAST_BACKEND", raising=False)
    chosen = backends.resolve("auto", [torch.device("cpu")])
    assert chosen.name == ("ext" if ext.available else "eager")
    monkeypatch.setenv("LABPAL_FAST_BACKEND", "eager")
    assert backends.resolve("auto", [torch.device("cpu")]).name == "eager"


def test_fallback_when_the_extension_is_absent():
    """A fresh interpreter in which `labpal_fast._C` cannot be imported (and is not compiled on
    first use: LABPAL_FAST_NO_EXT=1): "auto" falls back to eager and says so, once."""
    code = r"""
import sys, torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "labpal_fast._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import warnings
from labpal_fast.ops import ext
from labpal_fast import ops, LABPAL
assert not ext.available and "not built" in ext.why and "blocked" in ext.why, ext.why
assert "LABPAL_FAST_NO_EXT is set" in ext.why, ext.why  # not compiled on first use
assert ext.BACKEND.unavailable_reason([torch.device("cpu")]) == ext.why
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        assert ops.resolve("auto", [torch.device("cpu")]).name == "eager"
(said,) = [str(w.message) for w in caught]  # once per process, naming the reason
assert "'auto' uses 'eager' on cpu" in said and ext.why in said, said
try:
    ops.resolve("ext", [torch.device("cpu")])
except RuntimeError as exc:
    assert "not built" in str(exc)
else:
    raise AssertionError("an explicit ext request must raise")
net = torch.nn.Linear(3, 2)
opt = LABPAL(net.parameters(), approximation_batches=1)
assert opt.backend == "eager"
x = torch.randn(4, 3)
opt.step(lambda: net(x).pow(2).mean())
print("fallback ok")
"""
    env = dict(os.environ, LABPAL_FAST_NO_EXT="1")
    env.pop("LABPAL_FAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout


def test_unavailable_reason_for_devices():
    if not ext.available:
        assert ext.BACKEND.unavailable_reason([torch.device("cpu")]) == ext.why
        return
    assert ext.BACKEND.unavailable_reason([torch.device("cpu")]) is None
    reason = ext.BACKEND.unavailable_reason([torch.device("cuda", 0)])
    assert (reason is None) == ext.cuda_built
    assert ext.BACKEND.unavailable_reason([torch.device("meta")]) is not None


# ------------------------------------------------------------------------------ CUDA sources
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))


def test_cu_files_include_no_torch_headers():
    assert CU_FILES
    for path in CU_FILES + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.h")):
        text = open(path).read()
        for bad in ("<torch/", "<ATen/", "<c10/", '"torch/', '"ATen/', '"c10/'):
            assert bad not in text, f"{path} includes {bad}: keep .cu kernels free of torch headers"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on this machine")
@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_cu_files_compile_with_nvcc(path, tmp_path):
    out = subprocess.run(["nvcc", "-c", path, "-o", str(tmp_path / "x.o")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------ compiled on first use
def test_a_failed_first_use_compile_is_remembered_and_named(tmp_path, monkeypatch):
    """ext_build on sources that do not compile: the reason carries the compiler's error, a
    marker in the cache keeps later processes from compiling in vain, and changed sources get
    a directory of their own (so a fix is compiled)."""
    import shutil as sh

    from labpal_fast.ops import ext_build
    if sh.which("c++") is None or sh.which("ninja") is None:
        pytest.skip("needs a C++ compiler and ninja")
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "labpal_ops.cpp").write_text("this is not C++;\n")
    monkeypatch.setattr(ext_build, "SOURCE_DIRS", (src,))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LABPAL_FAST_NO_EXT", raising=False)
    module, why = ext_build.load("not built (test)")
    assert module is None and why.startswith("not built (test); compiling it on first use failed")
    where = ext_build.build_directory(src, False)
    assert (where / ext_build.FAILED).is_file() and where.parent == tmp_path / "cache"
    module, again = ext_build.load("not built (test)")
    assert module is None and "failed" in again and f"delete {where} to try again" in again
    (src / "labpal_ops.cpp").write_text("// fixed\n")
    assert ext_build.build_directory(src, False) != where
    monkeypatch.setenv("LABPAL_FAST_NO_EXT", "1")
    assert "LABPAL_FAST_NO_EXT is set" in ext_build.load("not built (test)")[1]
