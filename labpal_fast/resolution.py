"""What a move of the parameters must exceed to be seen by the loss: the rounding of the
dtype the forward pass computes in (resolve_positions, `Line.set_resolution`).

A closure may compute in a lower precision than its parameters are stored in (autocast inside
the closure, the usual mixed-precision recipe): the weights are then rounded to the autocast
dtype in every matmul, and a move below that dtype's ulps is invisible to the loss. The probe
below watches one closure call (the measurement's first) and notes the autocast dtype in
force while it ran, so the positions are scaled to the coarser of the two roundings.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

_DEVICE_TYPES = ("cpu", "cuda")


class AutocastProbe(TorchFunctionMode):
    """A torch function mode that records the autocast dtype in force when the closure calls
    torch (None: no autocast). It only looks: each call runs as it would without it."""

    def __init__(self) -> None:
        super().__init__()
        self.dtype: Optional[torch.dtype] = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.dtype is None:
            for device in _DEVICE_TYPES:
                if torch.is_autocast_enabled(device):
                    self.dtype = torch.get_autocast_dtype(device)
                    break
        return func(*args, **(kwargs or {}))

    @property
    def eps(self) -> float:
        """The machine epsilon of the autocast dtype seen, 0 when none was."""
        return 0.0 if self.dtype is None else torch.finfo(self.dtype).eps
