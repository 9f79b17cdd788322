"""The op set on plain PyTorch: the CPU fallback and the ground truth for every other backend.

Every op works on one `Flat` (one device and dtype) with whole-buffer tensor ops, so the
number of launches does not depend on the number of parameter tensors. Device scalars
(`coef`, `ok`) are 0-dim tensors: nothing here reads a value back to the host.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..flat import Flat
from ..layout import NPART
from .base import Backend, Decays

# The TRAINING ops walk their buffers in tiles of this many elements, so a tile written by
# one op is still in cache for the next (the direction's norm, zeroing the gradient): about
# eight streams over memory per update instead of twelve. A pure speed choice: every result
# is the same elementwise; ‖d‖² is summed per tile in a fixed order.
TILE = 1 << 19


def _tiles(flat: Flat, buf: torch.Tensor) -> List[torch.Tensor]:
    """Views of `buf` in tiles of TILE elements, made once per buffer."""
    cache = flat.__dict__.setdefault("_eager_tiles", {})
    key = (buf.data_ptr(), buf.numel(), buf.dtype)
    if key not in cache:
        cache[key] = list(buf.split(TILE))
    return cache[key]


def _scratch(flat: Flat) -> torch.Tensor:
    """One tile of the accumulation dtype, made once per flat: ḡ's norm is summed tile by
    tile through it, so no step allocates a buffer of the gradient's size."""
    buf = flat.__dict__.get("_eager_scratch")
    if buf is None or buf.device != flat.device or buf.dtype != flat.acc_dtype:
        buf = flat.__dict__["_eager_scratch"] = torch.empty(
            min(TILE, max(flat.numel, 1)), dtype=flat.acc_dtype, device=flat.device)
    return buf


def _mean_gradient(flat: Flat, summed: bool, inv_m: float) -> torch.Tensor:
    """ḡ, written where it costs the least: into grad_sum, or (m = 1, same dtype) the grad itself."""
    if summed:
        g = flat.grad_sum
        g.add_(flat.grad).mul_(inv_m)
    elif flat.acc_dtype != flat.dtype:
        g = flat.need_grad_sum()
        g.copy_(flat.grad)
    else:
        g = flat.grad
    return g


def _add_decay(x: torch.Tensor, theta: torch.Tensor, segments, decays: Decays) -> None:
    """x += wd·θ, segment by segment."""
    for (_, start, end), wd in zip(segments, decays):
        if wd != 0.0:
            x[start:end].add_(theta[start:end], alpha=wd)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """⟨x, y⟩ in fp64; low-precision inputs are summed in fp32 (fp16 overflows past 65504)."""
    if x.dtype != y.dtype or x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    return torch.dot(x, y).to(torch.float64)


class EagerBackend(Backend):
    name = "eager"

    def accumulate(self, flat: Flat, first: bool) -> None:
        grad_sum = flat.need_grad_sum()
        if first:
            grad_sum.copy_(flat.grad)
        else:
            grad_sum.add_(flat.grad)
        flat.grad.zero_()

    def grad_sqnorm(self, flat: Flat, *, summed: bool, inv_m: float) -> torch.Tensor:
        """Tile by tile, ḡ formed exactly as `form_direction` forms it (in the accumulation
        dtype), its squares summed as ‖d‖² is."""
        if flat.numel == 0:
            return torch.zeros((), dtype=torch.float64, device=flat.device)
        grads = _tiles(flat, flat.grad)
        sums = _tiles(flat, flat.grad_sum) if summed else grads
        squares = []
        for gp, sp in zip(grads, sums):
            if summed or flat.acc_dtype != flat.dtype:
                x = _scratch(flat)[:gp.numel()]
                if summed:
                    torch.add(sp, gp, out=x).mul_(inv_m)
                else:
                    x.copy_(gp)
            else:
                x = gp
            squares.append(_dot(x, x))
        return squares[0] if len(squares) == 1 else torch.stack(squares).sum()

    def form_direction(self, flat: Flat, *, summed: bool, inv_m: float, momentum: float,
                       decays: Decays, line_terms: bool,
                       grad_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As the contract says; ḡ is left in grad_sum (or grad) as a side effect (the
        objective's gradient in a measurement, the scaled one in TRAINING)."""
        g = _mean_gradient(flat, summed, inv_m)
        d, theta = flat.direction, flat.param
        zero = torch.zeros((), dtype=torch.float64, device=d.device)
        if grad_scale is None:
            _add_decay(g, theta, flat.segments, decays)
        elif line_terms:
            # d from the clipped loss gradient; g becomes the objective's own gradient (the
            # slope ⟨ḡ, d⟩ is the loss's along d)
            if momentum != 0.0:
                d.mul_(momentum).addcmul_(g, grad_scale)
            else:
                torch.mul(g, grad_scale, out=d)
            _add_decay(d, theta, flat.segments, decays)
            _add_decay(g, theta, flat.segments, decays)
        else:
            g.mul_(grad_scale)
            _add_decay(g, theta, flat.segments, decays)
        if line_terms:  # a measurement: whole-buffer passes, clearest over speed
            if grad_scale is None:  # (with clipping, d is formed above)
                if momentum != 0.0:
                    torch.add(g, d, alpha=momentum, out=d)
                else:
                    d.copy_(g)
            parts = [_dot(d, d), _dot(g, d)]
            wdd, wtd, wtt = zero, zero, zero
            for (_, start, end), wd in zip(flat.segments, decays):
                if wd != 0.0:
                    ds, ts = d[start:end], theta[start:end]
                    wdd = wdd + wd * _dot(ds, ds)
                    wtd = wtd + wd * _dot(ts, ds)
                    wtt = wtt + wd * _dot(ts, ts)
            parts += [wdd, wtd, wtt]
            flat.grad.zero_()
            return torch.stack(parts)
        squares = []
        for gp, dp, zp in zip(_tiles(flat, g), _tiles(flat, d), _tiles(flat, flat.grad)):
            if momentum != 0.0:
                torch.add(gp, dp, alpha=momentum, out=dp)
            else:
                dp.copy_(gp)
            squares.append(_dot(dp, dp))
            zp.zero_()
        nsq = squares[0] if len(squares) == 1 else torch.stack(squares).sum()
        return torch.stack([nsq] + [zero] * (NPART - 1))

    def train_update(self, flat: Flat, coef: torch.Tensor, ok: torch.Tensor) -> None:
        """A non-finite direction is cleared (the momentum restarts) and never reaches θ: coef
        is 0 then, and 0·d must not be NaN."""
        keep = ok.to(flat.direction.dtype)
        for dp, tp in zip(_tiles(flat, flat.direction), _tiles(flat, flat.param)):
            torch.nan_to_num_(dp, nan=0.0, posinf=0.0, neginf=0.0)  # identity on a finite d
            dp.mul_(keep)
            tp.addcmul_(dp, coef)

    def line_move(self, flat: Flat, coef: torch.Tensor) -> None:
        torch.addcmul(flat.origin, flat.direction, coef, out=flat.param)


BACKEND = EagerBackend()
