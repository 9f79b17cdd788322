"""Backend choice. A backend is a `base.Backend` (the op set and the composite steps), one
instance per module: `eager` (plain PyTorch, the reference), `ext` (the compiled extension,
csrc/) and `triton` (Triton kernels).

"auto" takes the fastest backend that works for the parameters' devices (Triton, then the
compiled extension, on CUDA; the extension on CPU) and falls back to eager, saying once per
process which backend it took and why the faster ones were passed over. An explicit
request that cannot work raises. `LABPAL_FAST_BACKEND` overrides "auto".
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Iterable, List, Optional

import torch

from .base import Backend
from .eager import BACKEND as EAGER

BACKENDS = ("auto", "eager", "triton", "ext")


def load(name: str) -> Backend:
    """The backend `name`; ImportError when it (or what it needs) is not installed."""
    if name == "eager":
        return EAGER
    return importlib.import_module(f"{__name__}.{name}").BACKEND


def why_unavailable(name: str, devices: Iterable[torch.device]) -> Optional[str]:
    """None when backend `name` can run on `devices`, else the reason in words."""
    try:
        backend = load(name)
    except ImportError as exc:
        return f"it cannot be imported ({exc})"
    return backend.unavailable_reason(list(devices))


def resolve(name: str, devices: Iterable[torch.device]) -> Backend:
    """The backend for `name` on parameters living on `devices`."""
    devices = list(devices)
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        name = os.environ.get("LABPAL_FAST_BACKEND", "") or "auto"
        if name not in BACKENDS:
            raise ValueError(f"LABPAL_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        reason = why_unavailable(name, devices)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} cannot run on {sorted(map(str, set(devices)))}: "
                               f"{reason}")
        return load(name)
    candidates: List[str] = ["triton", "ext"] if any(d.type == "cuda" for d in devices) else ["ext"]
    passed = []
    for candidate in candidates + ["eager"]:
        reason = why_unavailable(candidate, devices) if candidate != "eager" else None
        if reason is None:
            if passed:
                _say_once(f"labpal_fast: backend 'auto' uses {candidate!r} on "
                          f"{'/'.join(sorted({d.type for d in devices}))}, not the faster "
                          + "; ".join(f"{name!r}: {why}" for name, why in passed))
            return load(candidate)
        passed.append((candidate, reason))
    raise AssertionError("eager runs everywhere")


_said = set()


def _say_once(message: str) -> None:
    """One warning per process and message: a fallback is said, never silent, and never
    repeated for every optimizer built."""
    if message not in _said:
        _said.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
