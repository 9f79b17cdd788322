"""The versions labpal_fast is run with (README "Supported versions"), checked at run time.

pip enforces the same ranges (pyproject.toml) at install time; these checks catch what pip does
not see: `--no-deps` installs, a torch or triton upgraded afterwards, a source checkout on the
path. Outside the range nothing is known to break, it is just not run, hence a warning for torch
and Python; an untested triton only disables the Triton backend (`auto` then picks another one).
Keep the numbers in step with pyproject.toml.
"""
from __future__ import annotations

import re
import sys
import warnings
from typing import Optional, Tuple

# [low, high): major.minor releases. torch: 2.13 in CI, 2.11 on the GPU machine. triton: what
# those torch wheels pin (2.11 -> 3.6.0, 2.12 -> 3.7.0, 2.13 -> 3.7.1). Python: 3.11 in CI, 3.12
# on the GPU machine.
TORCH = ((2, 11), (2, 14))
TRITON = ((3, 6), (3, 8))
PYTHON = ((3, 11), (3, 13))


def release(version: str) -> Tuple[int, int]:
    """(major, minor) of a version string: '2.13.0+cpu' and '2.14.0a0+git12ab' -> (2, 13), (2, 14)."""
    match = re.match(r"\s*v?(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def _span(bounds) -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = bounds
    return f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"


def _outside(name: str, version: str, bounds) -> Optional[str]:
    low, high = bounds
    if low <= release(version) < high:
        return None
    return f"{name} {version} is outside the versions labpal_fast is tested with ({name}{_span(bounds)})"


def unsupported(torch_version: Optional[str] = None,
                python_version: Optional[str] = None) -> Optional[str]:
    """None when torch and Python are in the tested ranges, else what is outside (in words)."""
    if torch_version is None:
        import torch
        torch_version = torch.__version__
    if python_version is None:
        python_version = "{}.{}.{}".format(*sys.version_info[:3])
    reasons = [r for r in (_outside("torch", torch_version, TORCH),
                           _outside("Python", python_version, PYTHON)) if r]
    return "; ".join(reasons) or None


_warned = False


def warn_if_unsupported() -> None:
    """Warn once per process when torch or Python is outside the tested ranges."""
    global _warned
    reason = unsupported()
    if reason is not None and not _warned:
        _warned = True
        warnings.warn(f"{reason}: it may work, but it is not run (README: Supported versions)",
                      RuntimeWarning, stacklevel=2)


def triton_unsupported(version: str) -> Optional[str]:
    """None when this triton version is one the Triton backend is tested with, else why not."""
    reason = _outside("triton", version, TRITON)
    if reason is None:
        return None
    return f"{reason}; install labpal-fast[triton] for a matching one"
