"""The op set on the compiled extension `labpal_fast._C` (csrc/): fused C++ / CUDA passes.

Importing this module never fails: when the extension was not built at install time it is
compiled here on first use (`ext_build`); when that cannot be done either, `available` is
False and `why` / `unavailable_reason` say why. The fused passes call
`torch.ops.labpal_fast.*`; plain copies and fills stay torch ops (already one pass).

One difference from eager, by design: `form_direction` with m > 1 reads `grad_sum` and
does not write the mean gradient back into it (it is scratch after the direction is formed).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..flat import Flat
from .base import Backend, Decays

try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.labpal_fast.*)
except Exception as exc:  # ImportError, or OSError from the dynamic loader
    # not built at install time (pip's build isolation hides torch): compiled on first use
    from .ext_build import load as _compile
    _C, why = _compile(f"the compiled extension labpal_fast._C is not built ({exc})")
else:
    why: Optional[str] = None
available = _C is not None
cuda_built = bool(getattr(_C, "WITH_CUDA", 0))


if available:
    @torch.library.register_fake("labpal_fast::accumulate")
    def _accumulate_fake(grad_sum, grad, first):
        return None

    @torch.library.register_fake("labpal_fast::grad_sqnorm")
    def _grad_sqnorm_fake(grad, grad_sum, inv_m):
        return grad.new_empty((), dtype=torch.float64)

    @torch.library.register_fake("labpal_fast::form_direction")
    def _form_direction_fake(direction, grad, grad_sum, param, seg_starts, seg_ends, decays,
                             inv_m, momentum, line_terms, grad_scale=None):
        return direction.new_empty(5, dtype=torch.float64)

    @torch.library.register_fake("labpal_fast::train_update")
    def _train_update_fake(param, direction, coef, ok):
        return None

    @torch.library.register_fake("labpal_fast::line_move")
    def _line_move_fake(param, origin, direction, coef):
        return None


def _on(t: torch.Tensor, flat: Flat) -> torch.Tensor:
    """A device scalar where the op runs (a copy only when the line lives elsewhere)."""
    return t if t.device == flat.device else t.to(flat.device)


class ExtBackend(Backend):
    name = "ext"

    def unavailable_reason(self, devices) -> Optional[str]:
        """None when the extension is loaded and has kernels for every device, else the reason."""
        if not available:
            return why
        for device in devices:
            device = torch.device(device)
            if device.type == "cuda" and not cuda_built:
                return ("labpal_fast._C was built without CUDA kernels (it needs a CUDA build of "
                        "torch and a CUDA toolkit at build time)")
            if device.type not in ("cpu", "cuda"):
                return f"labpal_fast._C has no kernels for device type {device.type!r}"
        return None

    def accumulate(self, flat: Flat, first: bool) -> None:
        torch.ops.labpal_fast.accumulate(flat.need_grad_sum(), flat.grad, bool(first))

    def grad_sqnorm(self, flat: Flat, *, summed: bool, inv_m: float) -> torch.Tensor:
        if summed and flat.grad_sum is None:
            raise RuntimeError("grad_sqnorm(summed=True) before any accumulate()")
        return torch.ops.labpal_fast.grad_sqnorm(flat.grad, flat.grad_sum if summed else None,
                                                 float(inv_m))

    def form_direction(self, flat: Flat, *, summed: bool, inv_m: float, momentum: float,
                       decays: Decays, line_terms: bool,
                       grad_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        starts = [start for _, start, _ in flat.segments]
        ends = [end for _, _, end in flat.segments]
        return torch.ops.labpal_fast.form_direction(
            flat.direction, flat.grad, flat.need_grad_sum() if summed else None, flat.param,
            starts, ends, [float(w) for w in decays], float(inv_m), float(momentum),
            bool(line_terms), None if grad_scale is None else _on(grad_scale, flat))

    def train_update(self, flat: Flat, coef: torch.Tensor, ok: torch.Tensor) -> None:
        torch.ops.labpal_fast.train_update(flat.param, flat.direction, _on(coef, flat),
                                           _on(ok, flat))

    def line_move(self, flat: Flat, coef: torch.Tensor) -> None:
        torch.ops.labpal_fast.line_move(flat.param, flat.origin, flat.direction, _on(coef, flat))


BACKEND = ExtBackend()
