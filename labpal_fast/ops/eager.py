"""The op set on plain PyTorch: the CPU fallback and the ground truth for every other backend.

Every op works on one `Flat` (one device and dtype) with whole-buffer tensor ops, so the
number of launches does not depend on the number of parameter tensors. Device scalars
(`coef`, `ok`) are 0-dim tensors: nothing here reads a value back to the host.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..flat import Flat

NAME = "eager"


def unavailable_reason(devices) -> None:
    """Plain PyTorch runs wherever the parameters do."""
    return None

# Decays: per-segment weight decay, aligned with flat.segments (Python floats).
Decays = Sequence[float]


# The TRAINING ops walk their buffers in pieces of this many elements, so a piece written by
# one op is still in cache for the next (the direction's norm, zeroing the gradient): about
# eight streams over memory per update instead of twelve. A pure speed choice: every result
# is the same elementwise; ‖d‖² is summed per piece in a fixed order.
PIECE = 1 << 19


def _pieces(flat: Flat, buf: torch.Tensor) -> List[torch.Tensor]:
    """Views of `buf` in pieces of PIECE elements, made once per buffer."""
    cache = flat.__dict__.setdefault("_eager_pieces", {})
    key = (buf.data_ptr(), buf.numel(), buf.dtype)
    if key not in cache:
        cache[key] = list(buf.split(PIECE))
    return cache[key]


def accumulate(flat: Flat, first: bool) -> None:
    """grad_sum (+)= grad; grad = 0.  One micro-batch of an update that averages several."""
    grad_sum = flat.need_grad_sum()
    if first:
        grad_sum.copy_(flat.grad)
    else:
        grad_sum.add_(flat.grad)
    flat.grad.zero_()


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


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """⟨x, y⟩ in fp64; low-precision inputs are summed in fp32 (fp16 overflows past 65504)."""
    if x.dtype != y.dtype or x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    return torch.dot(x, y).to(torch.float64)


def form_direction(flat: Flat, *, summed: bool, inv_m: float, momentum: float, decays: Decays,
                   line_terms: bool) -> torch.Tensor:
    """ḡ = (grad_sum + grad)·inv_m + wd·θ;  d = β·d + ḡ;  grad = 0.

    Returns the partial sums, fp64 [5]: ‖d‖², ⟨ḡ,d⟩, Σ wd·‖d‖², Σ wd·⟨θ,d⟩, Σ wd·‖θ‖² (per
    segment). The last four are computed only with `line_terms` (a measurement); else 0.
    """
    g = _mean_gradient(flat, summed, inv_m)
    d, theta = flat.direction, flat.param
    for (_, start, end), wd in zip(flat.segments, decays):
        if wd != 0.0:
            g[start:end].add_(theta[start:end], alpha=wd)
    zero = torch.zeros((), dtype=torch.float64, device=d.device)
    if line_terms:  # a measurement: whole-buffer passes, clearest over speed
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
    for gp, dp, zp in zip(_pieces(flat, g), _pieces(flat, d), _pieces(flat, flat.grad)):
        if momentum != 0.0:
            torch.add(gp, dp, alpha=momentum, out=dp)
        else:
            dp.copy_(gp)
        squares.append(_dot(dp, dp))
        zp.zero_()
    nsq = squares[0] if len(squares) == 1 else torch.stack(squares).sum()
    return torch.stack([nsq, zero, zero, zero, zero])


def train_update(flat: Flat, coef: torch.Tensor, ok: torch.Tensor) -> None:
    """θ += coef·d, where `ok` (device bool) says the direction is finite.

    A non-finite direction is cleared (the momentum restarts) and never reaches θ: coef is 0
    then, and 0·d must not be NaN.
    """
    keep = ok.to(flat.direction.dtype)
    for dp, tp in zip(_pieces(flat, flat.direction), _pieces(flat, flat.param)):
        torch.nan_to_num_(dp, nan=0.0, posinf=0.0, neginf=0.0)  # identity on a finite d
        dp.mul_(keep)
        tp.addcmul_(dp, coef)


def line_move(flat: Flat, coef: torch.Tensor) -> None:
    """θ = θ₀ + coef·d, θ₀ kept in flat.origin."""
    torch.addcmul(flat.origin, flat.direction, coef, out=flat.param)


def save_origin(flat: Flat) -> None:
    flat.need_origin().copy_(flat.param)


def restore_origin(flat: Flat) -> None:
    flat.param.copy_(flat.origin)


def save_direction(flat: Flat) -> None:
    """Keep d (before a measurement forms a new one) in the spare origin buffer."""
    flat.need_origin().copy_(flat.direction)


def restore_direction(flat: Flat) -> None:
    flat.direction.copy_(flat.origin)


def clear_direction(flat: Flat) -> None:
    flat.direction.zero_()


def zero_grad(flat: Flat) -> None:
    flat.grad.zero_()


OPS: Tuple[str, ...] = ("accumulate", "form_direction", "train_update", "line_move", "save_origin",
                        "restore_origin", "save_direction", "restore_direction", "clear_direction",
                        "zero_grad")
