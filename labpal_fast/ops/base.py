"""The backend contract: the op set on one `Flat`, and the steps the optimizer runs, built from it.

Basic ops (each one pass over a flat's memory, one launch per flat where the backend can):
  accumulate, grad_sqnorm, form_direction, train_update, line_move — implemented by every backend
  (`eager.EagerBackend` is the reference); the plain copies and fills below are torch's own
  single launches and rarely worth overriding.

Composite steps (what `LABPAL` calls; built from the basic ops): `direction`, `update`,
`resolution`, `move`, `finish`. They take every flat at once, so a decision such as "this
direction is not finite" is made once for the whole line, before any parameter is written.
Their arguments are what changes from step to step (the flats, each group's weight decays, the
micro-batches m); the hyper-parameters (momentum, max_grad_norm, loss_scale) come from
`line.hyper`. The direction protocol (`Backend._direction`: clip, unscale, form, reduce, the
slope unscaled, the loss scale updated) is written once; how results are added up over the
model is a strategy it calls (`LocalSum` here; `shards.ShardSum` over FSDP2's shards;
Triton's fused row buffer), chosen by `_sums`. They call each op (and each `Line` method)
through `run`: plainly by default; the optimizer passes one that finishes a step whose op
raised (`commit.Commit`), so a strategy must call through it each op or launch it fuses.

The line math (`Line`, pure device math on a few scalars) comes from `make_line`; a backend
may return a subclass that does each small computation in fewer launches.

Nothing here reads a device value on the host.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import torch

from ..flat import Flat
from ..hyper import Hyper
from ..line import Line

# elements per fp32 partial norm in `Backend.ulp_sqnorm` (a bounded temporary for half types)
_ULP_CHUNK = 1 << 22

# per-segment weight decays of one flat, aligned with flat.segments (Python floats)
Decays = Sequence[float]


def call(op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`run` of the composite steps when the caller passes none: the op, called plainly."""
    return op(*args, **kwargs)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device scalar on `device` (a copy only when the line lives elsewhere)."""
    return t if t.device == device else t.to(device, non_blocking=True)


class Backend:
    name = "base"

    def unavailable_reason(self, devices: Iterable[torch.device]) -> Optional[str]:
        """None when this backend can run on parameters living on `devices`, else why not."""
        return None

    def make_line(self, hyper: Hyper, device: torch.device) -> Line:
        return Line(hyper, device)

    # ------------------------------------------------------------------ basic ops
    def accumulate(self, flat: Flat, first: bool) -> None:
        """grad_sum (+)= grad; grad = 0 (one micro-batch of an update that averages several)."""
        raise NotImplementedError

    def grad_sqnorm(self, flat: Flat, *, summed: bool, inv_m: float) -> torch.Tensor:
        """‖ḡ‖² of the loss gradient ḡ = (grad_sum + grad)·inv_m (or grad), as an fp64 0-dim
        device tensor (gradient clipping). Reads only; a buffer the next call may reuse."""
        raise NotImplementedError

    def form_direction(self, flat: Flat, *, summed: bool, inv_m: float, momentum: float,
                       decays: Decays, line_terms: bool,
                       grad_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ḡ = c·(grad_sum + grad)·inv_m + wd·θ (per segment);  d = β·d + ḡ;  grad = 0, with
        c = 1, or the device scalar `grad_scale` (clipping; on the flat's device).

        Returns the partial sums as fp64 [NPART] (`layout.Partial`); all but ‖d‖² are 0
        unless `line_terms` (a measurement). ⟨ḡ, d⟩ is taken with the objective's gradient,
        unclipped (c = 1): the slope of the loss along d. The tensor may be a buffer the next
        call reuses.
        """
        raise NotImplementedError

    def train_update(self, flat: Flat, coef: torch.Tensor, ok: torch.Tensor) -> None:
        """θ += coef·d where `ok` (device bool); where not, d is cleared and θ is untouched."""
        raise NotImplementedError

    def line_move(self, flat: Flat, coef: torch.Tensor) -> None:
        """θ = θ₀ + coef·d, θ₀ kept in flat.origin."""
        raise NotImplementedError

    def save_origin(self, flat: Flat) -> None:
        flat.need_origin().copy_(flat.param)

    def restore_origin(self, flat: Flat) -> None:
        flat.param.copy_(flat.origin)

    def save_direction(self, flat: Flat) -> None:
        """Keep d (before a measurement forms a new one) in the spare origin buffer."""
        flat.need_origin().copy_(flat.direction)

    def restore_direction(self, flat: Flat) -> None:
        flat.direction.copy_(flat.origin)

    def clear_direction(self, flat: Flat) -> None:
        flat.direction.zero_()

    def zero_grad(self, flat: Flat) -> None:
        flat.grad.zero_()

    def ulp_sqnorm(self, flat: Flat, compute_eps: float = 0.0) -> torch.Tensor:
        """‖ε·θ‖² over the flat (ε: machine epsilon of the model's dtype, or `compute_eps` when
        larger: autocast's dtype), fp64 0-dim device tensor: the scale of the rounding a move of θ
        suffers (`Line.set_resolution`). Reads only, in chunks accumulated in fp32 (a few digits
        are plenty) so that no copy of θ is made."""
        # the dtype the model sees: with fp32 master weights a move is rounded to the model's
        # fp16 / bf16 parameters (flat.low), not to the master copy's fp32
        eps = max(torch.finfo(flat.model_dtype).eps, compute_eps)
        total = torch.zeros((), dtype=torch.float64, device=flat.param.device)
        wide = torch.promote_types(flat.param.dtype, torch.float32)  # fp32, or fp64 as it is
        for chunk in flat.param.detach().split(_ULP_CHUNK):
            total += torch.linalg.vector_norm(chunk, dtype=wide).double().square()
        return total * eps ** 2

    # ------------------------------------------------------------------ composite steps
    def _sums(self, flats: Sequence[Flat], line: Line) -> "LocalSum":
        """How this backend adds the flats' results up over the model (the strategy the
        composite steps call); a fast backend may fuse, FSDP2 reduces over shards."""
        return LOCAL_SUM

    def resolution(self, flats: Sequence[Flat], line: Line, compute_eps: float = 0.0,
                   loss_eps: float = 0.0, run: Callable = call) -> None:
        """resolve_positions: the factor of the measurement's positions, from ‖ε·θ‖² over every
        flat (`Line.set_resolution`); a device scalar, nothing read by the host."""
        sums = self._sums(flats, line)
        squares = [run(self.ulp_sqnorm, flat, compute_eps) for flat in flats]
        run(line.set_resolution, sums.total(flats, squares, line), loss_eps, sums.count(flats))

    def direction(self, flats: Sequence[Flat], decays: Sequence[Decays], line: Line, *,
                  m: int, line_terms: bool, run: Callable = call) -> None:
        """d ← β·d + ḡ on every flat (β: line.hyper.momentum), the partial sums over the model
        in `line` (`Partial`; all but ‖d‖² only with `line_terms`: a measurement)."""
        self._direction(self._sums(flats, line), flats, decays, line, m=m,
                        line_terms=line_terms, run=run)

    def _direction(self, sums: "LocalSum", flats: Sequence[Flat], decays: Sequence[Decays],
                   line: Line, *, m: int, line_terms: bool, run: Callable) -> None:
        """The direction protocol, the one place of its policy: ḡ (the mean of m micro-batch
        gradients) times the factor c/S, where c clips ḡ by its norm over the model when
        max_grad_norm is set (1 otherwise) and S is the loss scale under loss_scale (the
        gradients are of S·loss; 1 otherwise); d formed and its partial sums added up by
        `sums`; then the slope made the loss's own again, and a dynamic S updated from ‖d‖
        (finite or an overflow)."""
        hyper = line.hyper
        factor = None
        if hyper.max_grad_norm is not None:
            factor = sums.clip_factor(self, flats, line, m=m, run=run)
        if hyper.loss_scale is not None:
            factor = run(line.unscale, factor)
        sums.form(self, flats, decays, line, factor, m=m, line_terms=line_terms, run=run)
        if hyper.loss_scale is not None:
            if line_terms:  # (in TRAINING the op leaves ⟨ḡ, d⟩ 0: nothing to unscale)
                run(line.unscale_slope)
            run(line.update_loss_scale)

    def update(self, flats: Sequence[Flat], decays: Sequence[Decays], line: Line, *, m: int,
               run: Callable = call) -> None:
        """A TRAINING update: d on every flat, then one decision for the whole line (a
        direction that is not finite anywhere moves no parameter and is cleared everywhere),
        then θ += coef·d."""
        sums = self._sums(flats, line)
        self._direction(sums, flats, decays, line, m=m, line_terms=False, run=run)
        sums.train(self, flats, line, run=run)

    def move(self, flats: Sequence[Flat], coef: torch.Tensor, run: Callable = call) -> None:
        """Every flat to θ₀ + coef·d."""
        for flat in flats:
            run(self.line_move, flat, coef)

    def finish(self, flats: Sequence[Flat], line: Line, averaged: bool,
               run: Callable = call) -> Dict[str, torch.Tensor]:
        """The end of a measurement: fit and step rule (`line.fit`), then every flat to s_upd
        (θ₀ itself while no rate exists: s_upd is 0). Returns the record."""
        record = run(line.fit, averaged)
        self.move(flats, run(line.target_coef), run=run)
        return record


class LocalSum:
    """The reduction strategy of one process: each flat's result (a device scalar, or the
    partial sums of its direction) is added up on the line's device, in flat order. The
    composite steps call it; `shards.ShardSum` reduces over FSDP2's shards instead, and
    Triton's `_RowBuffer` fuses the flats' passes into one buffer of rows."""

    def total(self, flats: Sequence[Flat], values: Sequence[torch.Tensor],
              line: Line) -> torch.Tensor:
        """Σ values (one device scalar per flat) over the model."""
        if len(values) == 1:
            return values[0]
        return torch.stack([v.to(line.partials.device) for v in values]).sum()

    def count(self, flats: Sequence[Flat]) -> int:
        """The parameters of the model (elements)."""
        return sum(flat.param.numel() for flat in flats)

    def clip_factor(self, ops: Backend, flats: Sequence[Flat], line: Line, *, m: int,
                    run: Callable) -> Any:
        """The clipping factor c of ḡ from its norm over the model (`Line.clip_scale`)."""
        squares = [run(ops.grad_sqnorm, flat, summed=m > 1, inv_m=1.0 / m) for flat in flats]
        return run(line.clip_scale, self.total(flats, squares, line))

    def form(self, ops: Backend, flats: Sequence[Flat], decays: Sequence[Decays], line: Line,
             factor: Optional[torch.Tensor], *, m: int, line_terms: bool,
             run: Callable) -> None:
        """d on every flat (ḡ times `factor`, a device scalar, when there is one), the
        partial sums of the model into `line`."""
        parts = [run(ops.form_direction, flat, summed=m > 1, inv_m=1.0 / m,
                     momentum=line.hyper.momentum, decays=wd, line_terms=line_terms,
                     grad_scale=None if factor is None else _on(factor, flat.device))
                 for flat, wd in zip(flats, decays)]
        self.set_partials(flats, parts, line, run)

    def set_partials(self, flats: Sequence[Flat], parts: Sequence[torch.Tensor], line: Line,
                     run: Callable) -> None:
        if len(parts) == 1:
            run(line.set_partials, parts[0])
        else:
            run(line.set_partials,
                torch.stack([p.to(line.partials.device) for p in parts]).sum(0))

    def train(self, ops: Backend, flats: Sequence[Flat], line: Line, *, run: Callable) -> None:
        """θ += coef·d on every flat, coef and the decision from the line (`Line.train_coef`)."""
        coef, ok = run(line.train_coef)
        for flat in flats:
            run(ops.train_update, flat, coef, ok)


LOCAL_SUM = LocalSum()
