"""Install tests from the built artifacts (sdist and wheel), not the editable tree.

The artifacts are built once per session: the sdist from this tree, the wheel from that sdist
(so the sdist is proven complete enough to build). Each install goes into one fresh virtual
environment (no system site-packages) holding torch and nothing of this checkout; a small
LABPAL run there checks the installed package, with the compiled extension when one was built
(or compiled on first use, after a plain `pip install` that built without torch).

Needs PyPI (torch's dependencies, setuptools for the isolated build) and, for torch, the
local CPU wheel that pip's configuration finds on this machine. Elsewhere set
LABPAL_INSTALL_TEST_TORCH to a pip requirement for torch, or to `system` to create the venv with
the system site-packages (a machine whose Python already holds torch and has no index).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# setup.py builds labpal_fast._C whenever torch is importable and a C++ compiler is found
EXPECT_EXT = shutil.which(os.environ.get("CXX", "c++")) is not None
TORCH_REQ = os.environ.get("LABPAL_INSTALL_TEST_TORCH") or f"torch=={torch.__version__.split('+')[0]}"
NO_TORCH_MESSAGE = "torch is not importable at build time"

SMOKE = r"""
import sys
import torch
import labpal_fast
from labpal_fast import LABPAL
from labpal_fast.ops import ext

expect_ext = sys.argv[1] == "1"
assert "site-packages" in labpal_fast.__file__, labpal_fast.__file__  # not this checkout
assert ext.available == expect_ext, (ext.available, ext.why)
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
for device in devices:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3)).to(device)
    x, y = torch.randn(64, 6, device=device), torch.randint(0, 3, (64,), device=device)
    opt = LABPAL(model.parameters(), model=model, backend="ext" if expect_ext else "eager",
                 noise_factor=1.0, reuse_updates=10, warmup_updates=0)
    closure = lambda: torch.nn.functional.cross_entropy(model(x), y)
    first = float(closure().detach())
    for _ in range(40):
        opt.step(closure)
    last = float(closure().detach())
    assert opt.measurements(), "no line measurement ran"
    assert last < first, (first, last)
    print(f"{device}: backend={opt.backend} loss {first:.4f} -> {last:.4f}, "
          f"{len(opt.measurements())} measurements")
print("torch", torch.__version__, "python", sys.version.split()[0], "ext", ext.available)
"""


def _env(**extra):
    """The environment minus what would leak this checkout or a backend choice into a child."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LABPAL_FAST_NO_EXT", "LABPAL_FAST_NO_CUDA",
                        "LABPAL_FAST_BACKEND", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def _run(cmd, cwd, timeout=600, check=True, **env):
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(**env), timeout=timeout,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stdout[-6000:]}")
    return result


@pytest.fixture(scope="session")
def sdist(tmp_path_factory):
    """The sdist built from a clean copy of this tree (`python -m build --sdist`). A copy,
    because setuptools adds the files listed in a left-over *.egg-info/SOURCES.txt to the sdist,
    which would hide a gap in MANIFEST.in (and the build writes nothing into the checkout)."""
    where = tmp_path_factory.mktemp("build")
    src, out = where / "src", where / "dist"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".*cache",
        ".hypothesis", ".benchmarks", "runs"))
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, src],
         cwd=where)
    (found,) = out.glob("labpal_fast-*.tar.gz")
    return found


@pytest.fixture(scope="session")
def artifacts(sdist):
    """(sdist, wheel): the wheel built from the sdist with the torch that runs the tests."""
    out = sdist.parent
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
          "--no-cache-dir", "-w", out, sdist], cwd=out, timeout=1800)
    (wheel,) = out.glob("labpal_fast-*.whl")
    return sdist, wheel


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory):
    """A new venv with torch (and setuptools, for --no-build-isolation) and nothing else."""
    where = tmp_path_factory.mktemp("venv")
    system = TORCH_REQ == "system"
    venv.EnvBuilder(with_pip=True, system_site_packages=system).create(where / "env")
    python = where / "env" / "bin" / "python"
    if not system:  # with system site-packages, pip finds torch and the build tools already there
        _run([python, "-m", "pip", "install", "-q", TORCH_REQ, "setuptools>=70.1"],
             cwd=where)
    return python


def _reinstall(python, *args, **env):
    _run([python, "-m", "pip", "uninstall", "-y", "-q", "labpal-fast"], cwd=python.parent)
    # --no-cache-dir: pip would reuse a wheel it built from the same sdist with other settings
    return _run([python, "-m", "pip", "install", "--no-cache-dir", *args], cwd=python.parent, **env)


def _smoke(python, expect_ext, **env):
    # cwd outside the checkout and -I: only the installed labpal_fast can be imported
    result = _run([python, "-I", "-c", SMOKE, "1" if expect_ext else "0"], cwd=python.parent,
                  **env)
    print(result.stdout)


def test_sdist_carries_sources(sdist):
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
                if p.suffix in (".cpp", ".h", ".cu")}
    assert {"csrc/labpal_ops.cpp", "csrc/cuda/kernels.cu", "csrc/cuda/kernels.h"} <= expected
    assert expected <= names, sorted(expected - names)
    assert {"setup.py", "pyproject.toml", "README.md", "labpal_fast/__init__.py"} <= names


def test_wheel_installs_and_runs(artifacts, fresh_venv):
    _, wheel = artifacts
    with zipfile.ZipFile(wheel) as whl:
        has_ext = any(n.startswith("labpal_fast/_C") and n.endswith(".so") for n in whl.namelist())
        # the sources travel with the package: compiled on first use where no _C was built
        assert "labpal_fast/_csrc/labpal_ops.cpp" in whl.namelist()
    assert has_ext == EXPECT_EXT, f"{wheel.name}: extension built {has_ext}, expected {EXPECT_EXT}"
    _reinstall(fresh_venv, wheel)
    _smoke(fresh_venv, EXPECT_EXT)


def test_sdist_installs_without_isolation(artifacts, fresh_venv):
    sdist, _ = artifacts
    _reinstall(fresh_venv, "--no-build-isolation", sdist)
    _smoke(fresh_venv, EXPECT_EXT)


TORCH_NOW = "import torch; print(torch.__version__, torch.__file__)"
FIRST_USE = r"""
import torch, warnings
from labpal_fast import LABPAL
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    net = torch.nn.Linear(3, 2)
    backends = [LABPAL(net.parameters()).backend for _ in range(2)]
print("backends", *backends)
for w in caught:
    print("warning:", w.message)
"""


def test_plain_pip_install_compiles_on_first_use(sdist, fresh_venv, tmp_path):
    """`pip install <sdist>` as people type it (build isolation: no torch in the build): it
    succeeds, keeps the installed torch, and the first LABPAL compiles the extension against
    that torch into the cache, which later processes load. With LABPAL_FAST_NO_EXT=1 (or no
    compiler) "auto" falls back to eager and says so once per process."""
    before = _run([fresh_venv, "-I", "-c", TORCH_NOW], cwd=tmp_path).stdout
    installed = _reinstall(fresh_venv, sdist)  # no flags
    assert "Successfully installed" in installed.stdout, installed.stdout[-3000:]
    assert _run([fresh_venv, "-I", "-c", TORCH_NOW], cwd=tmp_path).stdout == before
    cache = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}

    first = _run([fresh_venv, "-I", "-c", FIRST_USE], cwd=tmp_path, timeout=1800, **cache).stdout
    compiled = "labpal_fast: compiling the extension labpal_fast._C" in first
    assert compiled == EXPECT_EXT, first
    _smoke(fresh_venv, EXPECT_EXT, **cache)
    again = _run([fresh_venv, "-I", "-c", FIRST_USE], cwd=tmp_path, **cache).stdout
    assert "compiling" not in again and "warning:" not in again, again
    assert "backends ext ext" in again or not EXPECT_EXT, again

    off = _run([fresh_venv, "-I", "-c", FIRST_USE], cwd=tmp_path, LABPAL_FAST_NO_EXT="1",
               TORCH_EXTENSIONS_DIR=str(tmp_path / "unused")).stdout
    assert "backends eager eager" in off and "compiling" not in off, off
    (warning,) = [line for line in off.splitlines() if line.startswith("warning:")]
    assert "backend 'auto' uses 'eager' on cpu" in warning and "LABPAL_FAST_NO_EXT" in warning
