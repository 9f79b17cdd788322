"""The line model, as pure tensor math on device scalars: nothing here syncs with the host.

Along ℓ(s) = L(θ₀ − s·d/‖d‖) the loss samples of each position are summed (NaN / inf
skipped and counted), a quadratic a·s² + b·s + c is fitted by least squares over all
samples (its 3×3 normal equations, solved by Cramer's rule), weight decay's exact parabola
is added, and the step rule (docs/algorithm.md) turns the fit into `s_upd` and `η`.
Nothing here walks parameter memory: moving parameters is the backends' business.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .hyper import LOSS_SCALE_GROWTH_INTERVAL, MAX_LOSS_SCALE, Hyper
from .layout import NPART, Abandon, Partial

# added to ‖ḡ‖ in the clipping factor, as torch.nn.utils.clip_grad_norm_ does
CLIP_EPS = 1e-6


class Line:
    """Device-resident state of the line search: samples, current rate, histories, counters."""

    def __init__(self, hyper: Hyper, device: torch.device):
        f64 = dict(dtype=torch.float64, device=device)
        self.hyper = hyper
        positions = hyper.line_positions
        self.scale = max(positions)  # positions are fitted in t = s/scale, all O(1)
        self.positions = torch.tensor(positions, **f64)
        self.sums = torch.zeros(len(positions), **f64)
        self.counts = torch.zeros(len(positions), **f64)
        self.partials = torch.zeros(NPART, **f64)
        self.s_upd = torch.zeros((), **f64)  # 0 until a rate exists: moving there = staying
        self.eta = torch.zeros((), **f64)
        self.lr = torch.zeros((), **f64)  # what param_groups[i]["lr"] shows
        # the measured s_upd and η before lr_multiplier_schedule: s_upd = s_base·multiplier
        self.s_base = torch.zeros((), **f64)
        self.eta_base = torch.zeros((), **f64)
        self.multiplier: Optional[float] = 1.0  # None: unknown (after a load), set it again
        self.hist_s = torch.zeros(hyper.averaging_window, **f64)
        self.hist_eta = torch.zeros(hyper.averaging_window, **f64)
        self.hist_n = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_updates = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_samples = torch.zeros((), dtype=torch.int64, device=device)
        self._slots = torch.arange(hyper.averaging_window, device=device)
        # ‖ḡ‖ before clipping of the last direction formed (NaN while max_grad_norm is None:
        # not computed), and its clipping factor (a buffer the direction ops read)
        self.clip = torch.tensor([float("nan"), 1.0], **f64)
        self.grad_norm, self.clip_factor = self.clip[0], self.clip[1]
        # loss scaling (README, "Mixed precision"): the closure's loss is multiplied by S before
        # backward and ḡ divided by it in the direction op; `scale_good` counts the finite
        # directions in a row since S last changed (dynamic scaling doubles S after
        # LOSS_SCALE_GROWTH_INTERVAL of them, and halves it at an overflow)
        self.loss_scale = torch.tensor(hyper.initial_loss_scale, **f64)
        self.scale_good = torch.zeros((), dtype=torch.int64, device=device)
        self._unscale = torch.ones((), **f64)  # c/S, the factor of ḡ (a buffer, see `unscale`)

    # tensors that make up the state (for state_dict), in a fixed order
    STATE = ("sums", "counts", "partials", "s_upd", "eta", "lr", "hist_s", "hist_eta", "hist_n",
             "skipped_updates", "skipped_samples", "s_base", "eta_base", "loss_scale",
             "scale_good")

    # -- samples --------------------------------------------------------------------
    def reset_samples(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    def record(self, j: int, loss: torch.Tensor) -> None:
        """Add one loss sample at position index j; a non-finite sample is skipped and counted."""
        y = loss.detach().reshape(()).to(self.sums.dtype)
        finite = torch.isfinite(y)
        self.sums[j:j + 1].add_(torch.where(finite, y, 0.0))
        self.counts[j:j + 1].add_(finite)
        self.skipped_samples.add_(~finite)

    def drop_unless_repeated(self, first: torch.Tensor, again: torch.Tensor,
                             tolerance: float) -> torch.Tensor:
        """Whether a closure evaluated again at θ₀ missed its first (finite) loss by more than
        `tolerance` relative; then every sample is dropped, so the fit is invalid and no rate
        comes from samples that are not of one line."""
        first = first.detach().reshape(()).to(self.sums)
        again = again.detach().reshape(()).to(self.sums)
        close = (again - first).abs() <= tolerance * torch.maximum(first.abs(), again.abs())
        missed = torch.isfinite(first) & ~close  # NaN again: missed
        self.counts.mul_(~missed)
        self.sums.mul_(~missed)
        return missed

    def set_partials(self, partials: torch.Tensor) -> None:
        """The direction op's partial sums. Under loss scaling the op took ⟨ḡ, d⟩ with the
        scaled gradient, S·ḡ_loss + wd·θ: its loss part is divided by S here (the weight-decay
        part Σ wd·⟨θ, d⟩ is WD_TD itself), so the slope is the loss's own."""
        self.partials.copy_(partials)
        if self.hyper.loss_scale is not None:
            self.unscale_slope()

    def unscale_slope(self) -> None:
        """⟨S·ḡ + wd·θ, d⟩ in the partials → ⟨ḡ + wd·θ, d⟩ (see `set_partials`)."""
        gd, wtd = self.partials[Partial.GD], self.partials[Partial.WD_TD]
        gd.copy_((gd - wtd) / self.loss_scale + wtd)

    # -- loss scaling ------------------------------------------------------------------
    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """S·loss, for backward (in fp32 or wider: an fp16 loss times 2**16 would overflow)."""
        if loss.dtype in (torch.float16, torch.bfloat16):
            loss = loss.float()
        return loss * self.loss_scale.to(loss.device)

    def unscale(self, clip: Optional[torch.Tensor]) -> torch.Tensor:
        """The factor of the summed gradient in the direction op under loss scaling: c/S, with
        c the clipping factor (1 without clipping). Returns a buffer the next call overwrites."""
        if clip is None:
            torch.reciprocal(self.loss_scale, out=self._unscale)
        else:
            torch.div(clip, self.loss_scale, out=self._unscale)
        return self._unscale

    def update_loss_scale(self) -> None:
        """After a direction is formed, dynamic scaling: a direction that is not finite (the
        scaled gradient overflowed; the update or measurement is skipped) halves S; after
        LOSS_SCALE_GROWTH_INTERVAL finite ones in a row S doubles (at most MAX_LOSS_SCALE)."""
        if self.hyper.loss_scale != "dynamic":
            return
        finite = torch.isfinite(self.partials[Partial.DD])
        good = torch.where(finite, self.scale_good + 1, 0)
        grow = good >= LOSS_SCALE_GROWTH_INTERVAL
        factor = torch.where(finite, torch.where(grow, 2.0, 1.0), 0.5)
        self.loss_scale.copy_((self.loss_scale * factor).clamp(max=MAX_LOSS_SCALE))
        self.scale_good.copy_(torch.where(grow, 0, good))

    # -- the direction ----------------------------------------------------------------
    def clip_scale(self, sqnorm: torch.Tensor) -> torch.Tensor:
        """The factor of ḡ for clipping to max_grad_norm, from ‖ḡ‖² over every flat:
        min(1, max_grad_norm / (‖ḡ‖ + 1e-6)) as torch's clip_grad_norm_; NaN when ‖ḡ‖ is not
        finite, so that the direction is not finite either and the skip rule takes it.
        Keeps ‖ḡ‖ in `grad_norm`. Returns a buffer that the next call overwrites."""
        norm = sqnorm.to(self.grad_norm.dtype).sqrt()
        if self.hyper.loss_scale is not None:  # ‖S·ḡ‖ → ‖ḡ‖
            norm = norm / self.loss_scale
        self.grad_norm.copy_(norm)
        factor = (self.hyper.max_grad_norm / (norm + CLIP_EPS)).clamp(max=1.0)
        self.clip_factor.copy_(torch.where(torch.isfinite(norm), factor, float("nan")))
        return self.clip_factor

    def _norm(self) -> torch.Tensor:
        """max(‖d‖, ε): the divisor of every move along d/‖d‖."""
        return self.partials[Partial.DD].sqrt().clamp(min=self.hyper.epsilon)

    def abandon_code(self) -> torch.Tensor:
        """0 to go on, else the `layout.Abandon` bits: the slope −⟨ḡ,d⟩/‖d‖ is not negative;
        ‖d‖ is outside direction_norm_range or not finite."""
        low, high = self.hyper.direction_norm_range
        norm = self.partials[Partial.DD].sqrt()
        slope = -self.partials[Partial.GD] / self._norm()
        bad_slope = ~(slope < 0)
        bad_norm = ~((norm >= low) & (norm <= high))
        code = int(Abandon.SLOPE) * bad_slope.long() + int(Abandon.NORM) * bad_norm.long()
        return self._overflowed(code)

    def _overflowed(self, code: torch.Tensor) -> torch.Tensor:
        """Under loss scaling a direction that is not finite is an overflow of the scaled
        gradient (S is halved): said as such (`Abandon.OVERFLOW`), not as a bad norm."""
        if self.hyper.loss_scale is None:
            return code
        overflow = ~torch.isfinite(self.partials[Partial.DD])
        return torch.where(overflow, int(Abandon.OVERFLOW), code)

    def position_coef(self, s: float) -> torch.Tensor:
        """The factor of d that moves θ₀ to position s: −s/‖d‖."""
        return -s / self._norm()

    def target_coef(self) -> torch.Tensor:
        """The factor of d for the measurement's own move, to s_upd (0 while no rate exists)."""
        return -self.s_upd / self._norm()

    def train_coef(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(factor of d, direction finite) for a TRAINING update; counts a skipped update."""
        ok = torch.isfinite(self.partials[Partial.DD])
        if self.hyper.mode == "SGD":
            coef = torch.where(ok, -self.eta, 0.0)
        else:
            step = self.s_upd / self._norm()
            coef = torch.where(ok, -step, 0.0)
            self.lr.copy_(torch.where(ok, step, self.lr))
        self.skipped_updates.add_(~ok)
        return coef, ok

    # -- the rate in use: the measured one times lr_multiplier_schedule's factor -----------
    def set_multiplier(self, multiplier: float) -> None:
        """s_upd, η (and lr) = the measured ones × `multiplier` (nothing to do if unchanged)."""
        if multiplier == self.multiplier:
            return
        self.multiplier = multiplier
        torch.mul(self.s_base, multiplier, out=self.s_upd)
        torch.mul(self.eta_base, multiplier, out=self.eta)
        self._show_rate()

    def _show_rate(self) -> None:
        """lr as used: η (SGD), or s_upd/‖d‖ for the last direction (NSGD; the next update
        sets it again for its own direction)."""
        self.lr.copy_(self.eta if self.hyper.mode == "SGD" else self.s_upd / self._norm())

    # -- the fit and the step rule ----------------------------------------------------
    def fit(self, averaged: bool) -> Dict[str, torch.Tensor]:
        """Fit the parabola, apply the step rule, update s_upd / η / lr (× the multiplier).
        Returns the record."""
        record = self._fit_rate(averaged)
        valid = record["valid"]
        self.s_base.copy_(torch.where(valid, self.s_upd, self.s_base))
        self.eta_base.copy_(torch.where(valid, self.eta, self.eta_base))
        if self.multiplier != 1.0:  # a fresh rate is scaled like the one it replaces
            self.s_upd.copy_(torch.where(valid, self.s_base * self.multiplier, self.s_upd))
            self.eta.copy_(torch.where(valid, self.eta_base * self.multiplier, self.eta))
            self._show_rate()
            record.update(s_upd=self.s_upd.clone(), eta=self.eta.clone())
        return record

    def _fit_rate(self, averaged: bool) -> Dict[str, torch.Tensor]:
        """The fit and the step rule: s_upd / η / lr as measured (where valid)."""
        h = self.hyper
        t = self.positions / self.scale
        n, y = self.counts, self.sums
        m0, m1, m2, m3, m4 = ((n * t ** p).sum() for p in range(5))
        r0, r1, r2 = ((y * t ** p).sum() for p in range(3))
        # normal equations [[m4 m3 m2] [m3 m2 m1] [m2 m1 m0]] (A B C)ᵀ = (r2 r1 r0)ᵀ
        det = _det3(m4, m3, m2, m3, m2, m1, m2, m1, m0)
        A = _det3(r2, m3, m2, r1, m2, m1, r0, m1, m0) / det
        B = _det3(m4, r2, m2, m3, r1, m1, m2, r0, m0) / det
        C = _det3(m4, m3, r2, m3, m2, r1, m2, m1, r0) / det
        norm = self._norm()
        wd_dd, wd_td, wd_tt = (self.partials[i] for i in (Partial.WD_DD, Partial.WD_TD,
                                                          Partial.WD_TT))
        a = A / self.scale ** 2 + 0.5 * wd_dd / norm ** 2
        b = B / self.scale - wd_td / norm
        c = C + 0.5 * wd_tt
        valid = (self.counts > 0).all() & torch.isfinite(a) & torch.isfinite(b) & (a > 0) & (b < 0)
        s_min = torch.where(valid, -b / (2 * a), 0.0)
        s_new = (h.update_step_adaptation * s_min.clamp(max=h.max_step_size)).clamp(min=h.epsilon)
        eta_new = (s_new / norm).clamp(min=h.epsilon)
        if averaged:
            slot = valid & (self._slots == self.hist_n % h.averaging_window)
            self.hist_s.copy_(torch.where(slot, s_new, self.hist_s))
            self.hist_eta.copy_(torch.where(slot, eta_new, self.hist_eta))
            self.hist_n.add_(valid)
            filled = self._slots < self.hist_n
            count = self.hist_n.clamp(min=1, max=h.averaging_window)
            s_use = (self.hist_s * filled).sum() / count
            eta_use = (self.hist_eta * filled).sum() / count
        else:
            s_use, eta_use = s_new, eta_new
        self.s_upd.copy_(torch.where(valid, s_use, self.s_upd))
        self.eta.copy_(torch.where(valid, eta_use, self.eta))
        self.lr.copy_(self.eta if h.mode == "SGD" else self.s_upd / norm)
        return {"sums": self.sums.clone(), "counts": self.counts.clone(),
                "partials": self.partials.clone(), "a": a, "b": b, "c": c, "s_min": s_min,
                "s_new": s_new, "eta_new": eta_new, "s_upd": self.s_upd.clone(),
                "eta": self.eta.clone(), "valid": valid}


def _det3(a, b, c, d, e, f, g, h, i):
    """Determinant of [[a b c] [d e f] [g h i]]."""
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
