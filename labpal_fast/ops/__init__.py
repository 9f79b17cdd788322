"""Backend choice. Every backend is a module implementing the op set of `eager` (ops.eager.OPS).

"auto" picks the fastest backend that works for the parameters' device and falls back to
eager; an explicit request that cannot work raises. `LABPAL_FAST_BACKEND` overrides "auto".
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Iterable

import torch

from . import eager

BACKENDS = ("auto", "eager")


def resolve(name: str, devices: Iterable[torch.device]) -> ModuleType:
    """The backend module for `name` on parameters living on `devices`."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        name = os.environ.get("LABPAL_FAST_BACKEND", "auto") or "auto"
        if name not in BACKENDS:
            raise ValueError(f"LABPAL_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    list(devices)  # every device is served by eager; faster backends choose per device
    return eager
