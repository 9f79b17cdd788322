"""Compiling the extension `labpal_fast._C` on first use, against the torch that is installed.

`pip install <clone or sdist>` builds the package under pip's build isolation, where torch is
not importable: the package is then installed without the compiled extension but with its
sources (`labpal_fast/_csrc`, or `csrc/` beside the package in a clone). The first process that
needs the extension compiles it with `torch.utils.cpp_extension.load` into a cache directory
keyed by torch, Python and the sources, so that a later torch gets its own build and every
later process loads the cached one. A failed compile is remembered there too (no process
compiles in vain twice); delete the directory to try again. `LABPAL_FAST_NO_EXT=1` turns the
compile off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

PACKAGE = Path(__file__).resolve().parents[1]
# installed wheel: the sources setup.py copied into the package; a clone: csrc/ beside it
SOURCE_DIRS = (PACKAGE / "_csrc", PACKAGE.parent / "csrc")
FAILED = "FAILED.txt"
# the flags of setup.py: OpenMP for at::parallel_for; -fno-wrapv lets GCC vectorize the loops
CXX_FLAGS = ["-O3", "-fno-wrapv", "-fopenmp"]


def disabled() -> bool:
    return os.environ.get("LABPAL_FAST_NO_EXT", "").strip().lower() not in ("", "0", "false", "no")


def sources() -> Optional[Path]:
    return next((d for d in SOURCE_DIRS if (d / "labpal_ops.cpp").is_file()), None)


def cache_root() -> Path:
    """TORCH_EXTENSIONS_DIR when set (torch's own variable for compiled-on-use extensions)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torch_extensions"


def _with_cuda() -> bool:
    from torch.utils import cpp_extension
    home = cpp_extension.CUDA_HOME
    return bool(torch.version.cuda) and torch.cuda.is_available() and home is not None \
        and os.path.exists(os.path.join(home, "bin", "nvcc"))


def _files(src: Path, cuda: bool) -> List[Path]:
    files = [src / "labpal_ops.cpp"]
    return files + ([src / "cuda" / "kernels.cu", src / "cuda" / "cuda_ops.cpp"] if cuda else [])


def build_directory(src: Path, cuda: bool) -> Path:
    digest = hashlib.sha256(f"{torch.__version__} {sys.version} {cuda}".encode())
    for path in sorted(src.rglob("*")):
        if path.suffix in (".cpp", ".h", ".cu"):
            digest.update(path.name.encode() + path.read_bytes())
    return cache_root() / f"labpal_fast-{digest.hexdigest()[:16]}"


def load(not_built: str) -> Tuple[Optional[object], Optional[str]]:
    """(module, None) once compiled (or found in the cache), else (None, the reason in words).
    `not_built` says why the installed `labpal_fast._C` could not be imported."""
    if disabled():
        return None, f"{not_built}; LABPAL_FAST_NO_EXT is set, so it is not compiled on first use"
    src = sources()
    if src is None:
        return None, f"{not_built}; its sources are not installed, so it cannot be compiled"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return None, f"{not_built}; no C++ compiler (c++ or $CXX) to compile it on first use"
    if shutil.which("ninja") is None:  # torch.utils.cpp_extension.load builds with it
        return None, f"{not_built}; compiling it on first use needs ninja (pip install ninja)"
    cuda = _with_cuda()
    where = build_directory(src, cuda)
    failed = where / FAILED
    if failed.is_file():
        return None, (f"{not_built}; compiling it on first use failed "
                      f"({failed.read_text().strip()[:300]}); delete {where} to try again")
    if not (where / "_C.so").is_file():
        # logging, not a warning: one line on stderr, with no source line under it
        logging.getLogger("labpal_fast").warning(
            f"labpal_fast: compiling the extension labpal_fast._C for torch {torch.__version__} "
            f"({'CPU + CUDA' if cuda else 'CPU'} kernels; first use only, a minute or two; "
            f"cached in {where}; LABPAL_FAST_NO_EXT=1 skips it)")
    where.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension
    try:
        module = cpp_extension.load(
            name="_C", sources=[str(f) for f in _files(src, cuda)], build_directory=str(where),
            extra_cflags=CXX_FLAGS + (["-DLABPAL_WITH_CUDA"] if cuda else []),
            extra_cuda_cflags=["-O3"], extra_ldflags=["-fopenmp"], with_cuda=cuda,
            verbose=False)
    except Exception as exc:  # compile or link error, a missing header
        message = " ".join(str(exc).split())[-600:] or type(exc).__name__
        failed.write_text(message + "\n")
        return None, f"{not_built}; compiling it on first use failed ({message[:300]})"
    return module, None
