"""The line model, as pure tensor math on device scalars: nothing here syncs with the host.

Along ℓ(s) = L(θ₀ − s·d/‖d‖) the loss samples of each position are summed (NaN / inf
skipped and counted), a quadratic a·s² + b·s + c is fitted by least squares over all
samples (its 3×3 normal equations, solved by Cramer's rule; or 2×2 with b from ⟨ḡ,d⟩ under
line_fit="gradient"), weight decay's exact parabola is added, and the step rule
(docs/algorithm.md) turns the fit into `s_upd` and `η`. With resolve_positions the positions
are first moved to where the parameters' dtype and the loss resolve them (`set_resolution`).
Nothing here walks parameter memory: moving parameters is the backends' business.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from .hyper import LOSS_SCALE_GROWTH_INTERVAL, MAX_LOSS_SCALE, Hyper
from .layout import NPART, Abandon, Partial

# added to ‖ḡ‖ in the clipping factor, as torch.nn.utils.clip_grad_norm_ does
CLIP_EPS = 1e-6
# resolve_positions (`Line.set_resolution`): the smallest nonzero position moves θ by at least
# this many ulps, as a root-mean-square over coordinates (ulps of each parameter's dtype at its
# own value) (README "What differs from the paper": measured with tools/line_accuracy.py)
RESOLVE_ULPS = 4.0
# and the rounding error of the move, ~‖ε·θ‖/√12 in a direction of its own, changes the loss by
# at most 1/RESOLVE_AGGREGATE of the slope's change over s₁ (‖g‖‖e‖/√n of n coordinates): on
# small models this, not RESOLVE_ULPS, sets the floor
RESOLVE_AGGREGATE = 1e3
# and the slope's change over it is this many times the loss's own rounding (eps of the loss's
# dtype × |loss|), which makes the curvature visible above that rounding too
RESOLVE_LOSS = 1e4
# the positions as given are kept when they resolve already: the smallest moves θ by no less
# than the ulps above, and changes the loss by at least RESOLVE_LITERAL times the loss's own
# rounding (|b|·s₁ ≥ RESOLVE_LITERAL·ε_loss·|L₀|: one rounding is at most 1% of that change).
# Small fp32 models then measure where the paper does; bf16, autocast and large fp32 models
# (their ulps) move as before (docs/algorithm.md, "Positions the dtype resolves")
RESOLVE_LITERAL = 1e2
# sgd_rate="robust" (docs/algorithm.md "SGD mode" has the measurements behind both numbers):
# n̄, the running mean of ‖d‖ over TRAINING updates, is an exponential mean with weight
# 1/NORM_MEAN_UPDATES on each new ‖d‖ (about the updates a measured rate is reused for);
NORM_MEAN_UPDATES = 1000
# and no update moves further than STEP_CAP·s_upd (η·‖d‖ <= STEP_CAP·s_upd). Exact in fp32:
# the Triton kernel receives it as a runtime float.
STEP_CAP = 2.0
# step_check (docs/algorithm.md "The step check"): where the loss at the proposed step is not
# below ℓ(0), the step becomes the minimum of the parabola through ℓ(0) with the fit's slope and
# the checked loss, as a fraction of the proposed step within these bounds (at most 1/2 there)
CHECK_SHRINK = (0.05, 0.5)
# and the step passes only where the loss there is this fraction of the fit's own decrease at
# its (clamped) minimum below ℓ(0)
CHECK_DECREASE = 0.5


class Line:
    """Device-resident state of the line search: samples, current rate, histories, counters."""

    def __init__(self, hyper: Hyper, device: torch.device):
        f64 = dict(dtype=torch.float64, device=device)
        self.hyper = hyper
        positions = hyper.line_positions
        self.positions = torch.tensor(positions, **f64)
        self._index = {p: j for j, p in enumerate(positions)}
        self.first = min(p for p in positions if p > 0)  # the smallest nonzero position
        # resolve_positions: lo/s₁ and the positions moved to (`set_resolution`; off: as given)
        self.resolve = torch.ones((), **f64)
        self.at = self.positions.clone()
        # [Σ loss, count] at s = 0 over every rank, set by the optimizer under torch.distributed
        # before `set_resolution` (None: this process's own samples)
        self.origin_global: Optional[torch.Tensor] = None
        self.sums = torch.zeros(len(positions), **f64)
        self.counts = torch.zeros(len(positions), **f64)
        self.partials = torch.zeros(NPART, **f64)
        self.s_upd = torch.zeros((), **f64)  # 0 until a rate exists: moving there = staying
        self.eta = torch.zeros((), **f64)
        self.lr = torch.zeros((), **f64)  # what param_groups[i]["lr"] shows
        # the measured s_upd and η before lr_multiplier_schedule: s_upd = s_base·multiplier
        self.s_base = torch.zeros((), **f64)
        self.eta_base = torch.zeros((), **f64)
        # n̄ of sgd_rate="robust" (0: unknown; the next TRAINING update's ‖d‖ sets it)
        self.norm_mean = torch.zeros((), **f64)
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
        # step_check, within one measurement: [proposed step s_c, loss sum at s_c, samples,
        # non-finite samples, the factor r of the step]. Not state: a measurement saved
        # mid-way starts over. `checking` is off under torch.distributed (optimizer).
        self.checking = hyper.checking
        self.check = torch.zeros(5, **f64)
        self.check[4] = 1.0

    # tensors that make up the state (for state_dict), in a fixed order
    STATE = ("sums", "counts", "partials", "s_upd", "eta", "lr", "hist_s", "hist_eta", "hist_n",
             "skipped_updates", "skipped_samples", "s_base", "eta_base", "norm_mean",
             "loss_scale", "scale_good")

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
                             tolerance: float, last: Optional[torch.Tensor] = None,
                             late: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Whether a closure evaluated again at θ₀ missed its first (finite) loss by more than
        `tolerance` relative, or came nearer to the `last` kept closure's first loss than to its
        own (late-bound: it computes the latest batch's), or `late` (nonzero: a variable it
        reads changed, `binding.check`); then every sample is dropped, so the fit is invalid
        and no rate comes from samples that are not of one line."""
        first = first.detach().reshape(()).to(self.sums)
        again = again.detach().reshape(()).to(self.sums)
        close = (again - first).abs() <= tolerance * torch.maximum(first.abs(), again.abs())
        if last is not None:
            last = last.detach().reshape(()).to(self.sums)
            close &= ~((again - last).abs() < (again - first).abs())  # a NaN is not nearer
        missed = torch.isfinite(first) & ~close  # NaN again: missed
        if late is not None:
            missed |= late.to(self.sums.device) != 0
        self.counts.mul_(~missed)
        self.sums.mul_(~missed)
        return missed

    def set_partials(self, partials: torch.Tensor) -> None:
        """The direction op's partial sums over the model, as the op took them."""
        self.partials.copy_(partials)

    def unscale_slope(self) -> None:
        """⟨S·ḡ + wd·θ, d⟩ in the partials → ⟨ḡ + wd·θ, d⟩. Under loss scaling the direction
        op takes ⟨ḡ, d⟩ with the scaled gradient, S·ḡ_loss + wd·θ: its loss part is divided
        by S here (the weight-decay part Σ wd·⟨θ, d⟩ is WD_TD itself), so the slope is the
        loss's own."""
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

    def set_resolution(self, ulp_sqnorm: torch.Tensor, loss_eps: float = 0.0,
                       count: int = 1) -> None:
        """resolve_positions: the positions moved to (`at`), on the device (docs/algorithm.md,
        "Positions the dtype resolves"). The smallest nonzero position s₁ becomes
            lo = max(s₁, K·‖ε·θ‖, min(RESOLVE_LOSS·loss_eps·|L₀|/|b|, cap·s₁/s_max))
        (‖ε·θ‖² = `ulp_sqnorm` over every parameter, ε its dtype's epsilon, `count` parameters,
        K = max(RESOLVE_ULPS, RESOLVE_AGGREGATE/√(12·count)): a typical coordinate moves by K
        ulps, and the move's rounding changes the loss by 1/RESOLVE_AGGREGATE of the slope's
        change at most; the loss changes by RESOLVE_LOSS times its own rounding;
        b = −⟨ḡ,d⟩/‖d‖, L₀ the mean loss at s = 0 so far), the largest s_max becomes
            hi = min(s_max·lo/s₁, max(cap, 2·lo)),  cap = max(s_max, min(|L₀|/|b|, max_step_size))
        (no farther than the step rule's own range, nor where the tangent reaches L = 0, unless
        the dtype needs it), and the others follow on a log scale, s·(lo/s₁)·(s/s₁)^(γ−1) with
        γ = log(hi/lo)/log(s_max/s₁): a plain factor lo/s₁ when nothing caps it; unless the
        positions as given resolve already (K·‖ε·θ‖ ≤ s₁ and |b|·s₁ ≥ RESOLVE_LITERAL·ε_loss·|L₀|):
        then they stay as they are. `resolve` keeps lo/s₁ (1 when they stay). Under
        torch.distributed L₀ is the mean over every rank's samples (`origin_global`)."""
        s1, top = self.first, max(self.hyper.line_positions)
        f64 = self.resolve.dtype
        slope = (self.partials[Partial.GD] / self._norm()).abs()
        origin = self.origin_global if self.origin_global is not None else \
            torch.stack([self.sums[0], self.counts[0]])
        level = (origin[0] / origin[1]).abs()
        reach = torch.where(torch.isfinite(level / slope), level / slope, 0.0)
        cap = reach.clamp(max=self.hyper.max_step_size).clamp(min=top)
        rounding = RESOLVE_LOSS * loss_eps * level / slope
        rounding = torch.where(torch.isfinite(rounding), rounding, 0.0)
        many = max(RESOLVE_ULPS, RESOLVE_AGGREGATE / math.sqrt(12.0 * max(count, 1)))
        ulps = many * ulp_sqnorm.to(f64).sqrt()
        ulps = torch.where(torch.isfinite(ulps), ulps, 0.0)
        lo = torch.maximum(ulps, torch.minimum(rounding, cap * (s1 / top))).clamp(min=s1)
        hi = torch.minimum(lo * (top / s1), torch.maximum(cap, 2 * lo))
        gamma = torch.log(hi / lo) / math.log(top / s1)
        literal = (ulps <= s1) & (slope * s1 >= RESOLVE_LITERAL * loss_eps * level)
        self.resolve.copy_(torch.where(literal, 1.0, lo / s1))
        ratio = (self.positions / s1).clamp(min=1e-300)  # 0 stays 0 below
        moved = torch.where(self.positions > 0, lo * ratio ** gamma, 0.0)
        self.at.copy_(torch.where(literal, self.positions, moved))

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

    def noise_ratio(self, b: torch.Tensor, m: int) -> torch.Tensor:
        """ρ, the noise-to-signal ratio of one closure's gradient along d (its variance over the
        full-batch gradient's square), from the line just fitted: the slope −b averages k·m
        batches, m of which formed d, their own slope along d being ⟨ḡ, d⟩/‖d‖ (loss part);
        the others' estimate ⟨G, d⟩/‖d‖, and r = ⟨G, d⟩/⟨ḡ, d⟩ ≈ 1/(1 + ρ/m). NaN where
        the other batches show no descent along d (r ≤ 0): no signal seen."""
        k = self.hyper.approximation_batches
        own = (self.partials[Partial.GD] - self.partials[Partial.WD_TD]) / self._norm()
        r = (-b - own / k) / ((1 - 1 / k) * own)
        return torch.where(r > 0, m * (1 - r.clamp(max=1)) / r, float("nan"))

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
        """The factor of d that moves θ₀ to position s (× resolve_positions' factor): −s/‖d‖."""
        j = self._index.get(float(s))
        if j is None or not self.hyper.resolving:
            return -s / self._norm()
        return -self.at[j] / self._norm()

    def target_coef(self) -> torch.Tensor:
        """The factor of d for the measurement's own move, to s_upd (0 while no rate exists)."""
        return -self.s_upd / self._norm()

    @property
    def robust_sgd(self) -> bool:
        """SGD mode with sgd_rate="robust": η = s_upd / n̄, n̄ updated by every TRAINING update."""
        return self.hyper.mode == "SGD" and self.hyper.sgd_rate == "robust"

    def train_coef(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(factor of d, direction finite) for a TRAINING update; counts a skipped update."""
        ok = torch.isfinite(self.partials[Partial.DD])
        if self.robust_sgd:
            rate = self._robust_rate(ok)
            coef = torch.where(ok, -rate, 0.0)
            self.lr.copy_(torch.where(ok, rate, self.lr))
        elif self.hyper.mode == "SGD":
            coef = torch.where(ok, -self.eta, 0.0)
        else:
            step = self.s_upd / self._norm()
            coef = torch.where(ok, -step, 0.0)
            self.lr.copy_(torch.where(ok, step, self.lr))
        self.skipped_updates.add_(~ok)
        return coef, ok

    def _robust_rate(self, ok: torch.Tensor) -> torch.Tensor:
        """η of sgd_rate="robust", after ‖d‖ of this update joined n̄ (when finite):
        n̄ ← n̄ + (‖d‖ − n̄)/NORM_MEAN_UPDATES (n̄ ← ‖d‖ while n̄ is unknown: 0), then
        η = max(min(s_upd/max(n̄, ε), STEP_CAP·s_upd/max(‖d‖, ε)), ε)."""
        norm = self.partials[Partial.DD].sqrt()
        mean = torch.where(self.norm_mean > 0,
                           self.norm_mean + (norm - self.norm_mean) / NORM_MEAN_UPDATES, norm)
        self.norm_mean.copy_(torch.where(ok, mean, self.norm_mean))
        return self._robust_eta(self.norm_mean)

    def _robust_eta(self, mean: torch.Tensor) -> torch.Tensor:
        """max(min(s_upd/max(n̄, ε), STEP_CAP·s_upd/max(‖d‖, ε)), ε), n̄ = `mean`."""
        eps = self.hyper.epsilon
        rate = torch.minimum(self.s_upd / mean.clamp(min=eps), STEP_CAP * self.s_upd / self._norm())
        return rate.clamp(min=eps)

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
        sets it again for its own direction); robust SGD: s_upd/n̄ (s_upd/‖d‖ of the last
        direction while n̄ is unknown), the next update's rate up to its own ‖d‖ joining n̄."""
        if self.robust_sgd:
            known = self.norm_mean > 0
            rate = torch.where(known, self._robust_eta(self.norm_mean),
                               self._robust_eta(self._norm()))
            self.lr.copy_(torch.where(self.s_upd > 0, rate, 0.0))  # 0 until a rate exists
        else:
            self.lr.copy_(self.eta if self.hyper.mode == "SGD" else self.s_upd / self._norm())

    def fall_back(self) -> None:
        """The safe step, taken when measurements keep giving no rate (`steps._fall_back`):
        s_upd = min(largest position measured (× resolve_positions' factor), max_step_size),
        η = s_upd/‖d‖ of the last direction (ε when that is not finite), both at least ε.
        The measured rates (s_base, η_base) become these, so lr_multiplier_schedule scales them."""
        s, eta = self._fallback_rates()
        self.s_base.copy_(s)
        self.eta_base.copy_(eta)
        factor = 1.0 if self.multiplier is None else self.multiplier
        torch.mul(self.s_base, factor, out=self.s_upd)
        torch.mul(self.eta_base, factor, out=self.eta)
        self._show_rate()

    def _fallback_rates(self) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.hyper
        s = self.at.max().clamp(max=h.max_step_size, min=h.epsilon)
        eta = (s / self._norm()).clamp(min=h.epsilon)
        return s, torch.where(torch.isfinite(eta), eta, h.epsilon)

    @property
    def rate_reads(self) -> List[torch.Tensor]:
        """For a measurement's host read, what param_groups' lr is made of (`guards.Rate`): the
        measured rate (s_base; paper SGD: η_base) and the one a fall-back would take now."""
        s, eta = self._fallback_rates()
        if self.hyper.mode == "SGD" and not self.robust_sgd:
            return [self.eta_base, eta]
        return [self.s_base, s]

    # -- the fit and the step rule ----------------------------------------------------
    def fit(self, averaged: bool) -> Dict[str, torch.Tensor]:
        """Fit the parabola, apply the step rule, update s_upd / η / lr (× the multiplier).
        Returns the record."""
        if self.checking:
            self.check_step()
        record = self._fit_rate(averaged)
        if self.checking:
            record.update(s_check=self.check[0].clone(),
                          loss_check=self.check[1] / self.check[2],
                          check_factor=self.check[4].clone())
        valid = record["valid"]
        if self.robust_sgd:  # _fit_rate shows the paper's η; the next updates use s_upd / n̄
            self._show_rate()
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
        norm = self._norm()
        a, b, c, valid, s_min = self._judged_fit(norm)
        s_new = (self._alpha(s_min, averaged) * s_min.clamp(max=h.max_step_size)) \
            .clamp(min=h.epsilon)
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
                "eta": self.eta.clone(), "valid": valid, "positions": self.at.clone()}

    def _judged_fit(self, norm: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(a, b, c, valid, s_min): the fit, and whether it gives a step (the paper's refusals
        or the robust ones) with the parabola's minimum (0 where it gives none)."""
        h = self.hyper
        a, b, c = self._fit_line(norm)
        finite = (self.counts > 0).all() & torch.isfinite(a) & torch.isfinite(b)
        if h.line_fit == "paper":  # no curvature, no rate
            valid = finite & (a > 0) & (b < 0)
            s_min = torch.where(valid, -b / (2 * a), 0.0)
        else:  # refused only when not a descending line; no curvature seen: max_step_size
            valid = finite & torch.isfinite(c) & (b < 0)
            s_min = torch.where(valid, torch.where(a > 0, -b / (2 * a), h.max_step_size), 0.0)
        return a, b, c, valid, s_min

    def _alpha(self, s_min: Optional[torch.Tensor], averaged: bool):
        """The multiple of min(s_min, max_step_size) taken: α (a Python float, as the paper),
        × (1 − β) with momentum_correction, × the step check's factor r (a device scalar).
        With max_step_shrink after the warm-up (`averaged`), the step is at least
        min(s_prop, s_in_use/max_step_shrink), s_prop = r·α·min(s_min, max_step_size) the
        step without the correction, s_in_use the measured step in use (s_base; 0: none)."""
        h = self.hyper
        alpha = h.update_step_adaptation * h.step_factor
        alpha = alpha * self.check[4] if self.checking else alpha
        if not averaged or h.max_step_shrink is None:
            return alpha
        s_m = s_min.clamp(max=h.max_step_size)
        alpha = torch.as_tensor(alpha, dtype=s_m.dtype, device=s_m.device)  # a float unchecked
        floor = torch.minimum(alpha / h.step_factor, self.s_base / h.max_step_shrink / s_m)
        return torch.where(s_m > 0, torch.maximum(alpha, floor), alpha)

    # -- the step check (docs/algorithm.md "The step check") --------------------------------
    def check_coef(self) -> torch.Tensor:
        """After the line's samples: the proposed step s_c = α·min(s_min, max_step_size) of
        their fit (0 when it gives none), and the factor of d that moves θ₀ there (−s_c/‖d‖).
        The check's samples are reset."""
        h = self.hyper
        norm = self._norm()
        _, _, _, valid, s_min = self._judged_fit(norm)
        s_c = h.update_step_adaptation * s_min.clamp(max=h.max_step_size)
        self.check.copy_(torch.stack([torch.where(valid, s_c, 0.0)] + [s_c * 0] * 3
                                     + [torch.ones_like(s_c)]))
        return -self.check[0] / norm

    def record_check(self, loss: torch.Tensor) -> None:
        """One loss sample at s_c; a non-finite one is counted as such (the check fails)."""
        y = loss.detach().reshape(()).to(self.check.dtype)
        finite = torch.isfinite(y)
        self.check[1:2].add_(torch.where(finite, y, 0.0))
        self.check[2:3].add_(finite)
        self.check[3:4].add_(~finite)

    def check_step(self) -> None:
        """The factor r of the step (`check[4]`): 1 where the mean loss at s_c is below the mean
        loss at every measured position (the same batches: ℓ(0) and the short steps the fit
        came from) and CHECK_DECREASE of the fit's decrease at min(s_min, max_step_size) below
        ℓ(0); else the minimum of the parabola through ℓ(0) with the fit's slope b and
        ℓ(s_c), over s_c, within CHECK_SHRINK (the lower bound when a sample at s_c is not
        finite)."""
        norm = self._norm()
        a, b, _, valid, s_min = self._judged_fit(norm)
        s_c, total, n, bad = self.check[0], self.check[1], self.check[2], self.check[3]
        l0 = self.sums[0] / self.counts[0]
        lc = total / n
        s_m = s_min.clamp(max=self.hyper.max_step_size)
        promised = -(b * s_m + a * s_m * s_m)  # the fit's decrease at its (clamped) minimum
        passed = (bad == 0) & (n > 0) & (lc < (self.sums / self.counts).min()) \
            & (l0 - lc >= CHECK_DECREASE * promised)
        curv = (lc - l0 - b * s_c) / (s_c * s_c)  # > 0 where lc >= l0 (b < 0)
        back = (-b / (2 * curv) / s_c).clamp(*CHECK_SHRINK)
        back = torch.where(torch.isfinite(back) & (bad == 0), back, CHECK_SHRINK[0])
        self.check[4:5].copy_(torch.where(passed | ~valid | (s_c <= 0), 1.0, back))

    def _fit_line(self, norm: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """a·s² + b·s + c by least squares over every sample, at the positions moved to
        (`at`: the positions as given unless resolve_positions), weight decay's exact parabola
        added. With line_fit="gradient" the slope b at s = 0 is the directional derivative
        −⟨ḡ,d⟩/‖d‖ instead (ḡ: the measurement's first m batches, weight decay included) and
        only a and c are fitted (2×2 normal equations of y − b·s). (a, b, c); `_fit_rate`
        judges them (docs/algorithm.md: the paper's refusals, or the robust ones)."""
        p = self.partials
        scale = self.at.max()  # fitted in t = s/scale, all O(1)
        t = self.at / scale
        n, y = self.counts, self.sums
        if self.hyper.line_fit == "gradient":
            b = -p[Partial.GD] / norm
            b_loss = b + p[Partial.WD_TD] / norm  # the closures' own slope (decay's removed)
            y = y - n * (b_loss * scale) * t
            u = t * t
            m0, m2, m4 = n.sum(), (n * u).sum(), (n * u * u).sum()
            r0, r2 = y.sum(), (y * u).sum()
            # normal equations [[m4 m2] [m2 m0]] (A C)ᵀ = (r2 r0)ᵀ
            det = m4 * m0 - m2 * m2
            A = (r2 * m0 - m2 * r0) / det
            C = (m4 * r0 - m2 * r2) / det
        else:
            A, B, C = _quadratic_fit(n, y, t)
            b = B / scale - p[Partial.WD_TD] / norm
        a = A / scale ** 2 + 0.5 * p[Partial.WD_DD] / norm ** 2
        c = C + 0.5 * p[Partial.WD_TT]
        return a, b, c


def _quadratic_fit(n: torch.Tensor, y: torch.Tensor, t: torch.Tensor):
    """Least squares of A·t² + B·t + C over the samples: `n` of them at each position `t`,
    their losses summing to `y` there. The normal equations
    [[m4 m3 m2] [m3 m2 m1] [m2 m1 m0]] (A B C)ᵀ = (r2 r1 r0)ᵀ, solved by Cramer's rule."""
    m0, m1, m2, m3, m4 = ((n * t ** p).sum() for p in range(5))
    r0, r1, r2 = ((y * t ** p).sum() for p in range(3))
    det = _det3(m4, m3, m2, m3, m2, m1, m2, m1, m0)
    A = _det3(r2, m3, m2, r1, m2, m1, r0, m1, m0) / det
    B = _det3(m4, r2, m2, m3, r1, m1, m2, r0, m0) / det
    C = _det3(m4, m3, r2, m3, m2, r1, m2, m1, r0) / det
    return A, B, C


def _det3(a, b, c, d, e, f, g, h, i):
    """Determinant of [[a b c] [d e f] [g h i]]."""
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
