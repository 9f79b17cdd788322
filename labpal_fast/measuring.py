"""A measurement's device work: what happens to the parameters and the line while one runs.

`LABPAL` decides when (its phases, counters and commits); `Measuring` does the work: it forms
the direction and reads whether to abandon it, saves the line's origin (the positions resolved
first), evaluates the kept closures along the line, enters the measurement's collective, fits
and moves to s_upd, and after a fault goes back to the origin. Each method gets the running
`Measurement` and the optimizer's backend `ops` (read at each call: it is `LABPAL.ops`), and
the step's `run` where it writes (`commit.Commit`); the object keeps no state of its own from
call to call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from .closures import Closures
from .commit import Commit
from .distributed import ERRORS, Collectives
from .flat import Flat, publish
from .guards import Rate
from .hyper import Hyper
from .layout import ABANDON_REASONS
from .line import Line
from . import binding
from .measurement import Measurement, read, repeat_failure
from .ops.base import Backend, call
from .replay import BufferSnapshot, capture_rng, cuda_indices, restore_rng


@dataclass
class LineEnd:
    """How a measurement's line ended (`Measuring.finish`)."""
    reason: Optional[str]   # why it gave no rate (None: it did)
    error: Optional[str]    # the error to raise once the commit is done (None: none)
    fit: Optional[Dict[str, Any]]  # the fit's record (None: the measurement failed across ranks)
    valid: bool = False     # the fit gave a rate
    noise: Optional[float] = None  # ρ of `Line.noise_ratio`, where asked for and valid


class Measuring:
    """The device work of a measurement, for `LABPAL`'s phases to call (module doc)."""

    def __init__(self, hyper: Hyper, flats: List[Flat], ops: Backend, model: Any,
                 process_group: Any, trained: List[torch.Tensor]):
        """The objects the work needs, made at construction: the line's state on the device,
        the model's buffers' snapshot, the collectives of the ranks, and the closure calls."""
        self.hyper, self.flats = hyper, flats
        device = flats[0].device
        self.cuda = cuda_indices(f.device for f in flats)
        self.line: Line = ops.make_line(hyper, device)
        self.buffers = BufferSnapshot(model)
        self.dist = Collectives.of(process_group, model, device, len(hyper.line_positions))
        if self.dist is not None and self.line.checking:
            # its samples would be each rank's own (the measurement's collective is after)
            if hyper.step_check:
                raise ValueError("step_check=True is not supported under torch.distributed "
                                 "yet: leave it None (off there) or set it False")
            self.line.checking = False
        self.calls = Closures(flats, ops, self.line, hyper.loss_scale is not None, self.dist,
                              trained)

    # ------------------------------------------------------------------ calls 1..k·m
    def form_direction(self, ops: Backend, meas: Measurement, decays: List[List[float]], m: int,
                       run: Commit, fallback: Optional[Rate] = None) -> Optional[str]:
        """Call m: form d (the old one kept to restore); returns why it is abandoned, if it is
        (the old d is then back). `fallback`: the optimizer's rate when abandoning may make it
        fall back; the rate it would take is read with the rest, into `fallback.fallback`."""
        for flat in self.flats:
            run(ops.save_direction, flat)
        ops.direction(self.flats, decays, self.line, m=m, line_terms=True, run=run)
        meas.formed = True
        extra = [] if fallback is None else self.line.rate_reads[1:]
        flags = read([run(self.line.abandon_code)] + extra)  # host sync 1 of 2
        code = int(flags[0])
        if fallback is not None:
            fallback.fallback = flags[1]
        if not code:
            return None
        for flat in self.flats:
            run(ops.restore_direction, flat)
        return ABANDON_REASONS[code]

    def save_origin(self, ops: Backend, meas: Measurement, run: Commit) -> None:
        """Call k·m: the positions resolved (`_resolve_positions`), then the line's origin, the
        buffers and the RNG, to come back to. From here (a held Ctrl-C included) a fault ends
        the measurement there (`steps._line_faults`, `abort`)."""
        self._resolve_positions(ops, meas, run)
        for flat in self.flats:
            run(ops.save_origin, flat)
        self.buffers.save()
        meas.line_rng = capture_rng(self.cuda)

    def _resolve_positions(self, ops: Backend, meas: Measurement, run: Commit) -> None:
        """Call k·m, before the line evaluations: the positions' factor, on the device
        (Line.set_resolution). Under torch.distributed the loss floor reads every rank's samples
        at s = 0 (one all-reduce), so all move alike; here, where no measurement is abandoned,
        the ranks' collectives stay paired even when one rank abandons alone."""
        if not self.hyper.resolving:
            return
        dtype = meas.first_loss.dtype
        loss_eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
        if self.dist is not None:
            self.line.origin_global = self.dist.origin_loss(self.line)
        ops.resolution(self.flats, self.line, meas.compute_eps, loss_eps, run=run)

    # ------------------------------------------------------------------ the line
    def evaluate(self, ops: Backend, meas: Measurement) -> Optional[torch.Tensor]:
        """Every kept closure at the other positions (user code: Ctrl-C is not held back here;
        a fault ends the measurement, `abort`). First, at θ₀ still, the first closure runs
        again: its loss (returned) must be its first one (`finish`)."""
        try:
            meas.repeating = True
            with torch.no_grad():
                return self._evaluate(ops, meas)
        finally:
            meas.repeating = False

    def _evaluate(self, ops: Backend, meas: Measurement) -> Optional[torch.Tensor]:
        kept = list(zip(meas.closures, meas.rngs, meas.own_backward))
        again = None
        if self.hyper.replay_tolerance is not None and len(kept) > 1:
            # before the closures run again: did a variable they read change? (late binding)
            meas.late_names, meas.late = binding.check(meas.reads, self.line.sums.device)
            again = self._repeat(*kept[0]).clone()  # kept across the repeats (CUDA graphs)
        for j, s in enumerate(self.hyper.line_positions[1:], start=1):
            ops.move(self.flats, self.line.position_coef(s))
            publish(self.flats, call)
            for closure, rng, own in kept:
                self.line.record(j, self._repeat(closure, rng, own))
        if self.line.checking:  # and at the step the fit proposes (docs: "The step check")
            ops.move(self.flats, self.line.check_coef())
            publish(self.flats, call)
            for closure, rng, own in kept:
                self.line.record_check(self._repeat(closure, rng, own))
        return again

    def _repeat(self, closure: Callable, rng, own_backward: bool) -> torch.Tensor:
        """A kept closure evaluated again, with the random state of its first call."""
        restore_rng(rng)
        return self.calls.sample(closure, own_backward)

    def reduce(self, meas: Measurement, again: Optional[torch.Tensor], start_call: int,
               start_update: int) -> None:
        """After the line evaluations: the measurement's one collective (global samples). The
        first closure's repeat is checked here, on this rank's samples, and its verdict travels
        with them (a closure that does not repeat on one rank fails the measurement on all)."""
        if self.dist is None:
            return
        missed = None
        if again is not None:
            missed = self.line.drop_unless_repeated(meas.first_loss, again,
                                                    self.hyper.replay_tolerance,
                                                    meas.last_loss, meas.late)
        meas.reduced = True
        self.dist.reduce_line(self.line, start_call, start_update, missed=missed)

    def finish(self, ops: Backend, meas: Measurement, again: Optional[torch.Tensor], multiplier: float,
               averaged: bool, run: Commit, rate: Rate, may_fall_back: bool,
               noise: bool = False) -> LineEnd:
        """Buffers and RNG back as after call k·m, then fit, step rule and the move to s_upd, on
        the device; without any rate yet s_upd is 0 and the move lands on θ₀ itself. A first
        closure that did not repeat its loss makes the fit invalid (its samples are not of one
        line), and its error is to be raised. The measured rate (and a fall-back's, when
        `may_fall_back`) are read with the verdict into `rate`, which shows it × `multiplier`.
        `noise`: the line's noise ratio is read too (in the same transfer) and kept in the
        record."""
        self.buffers.restore()
        restore_rng(meas.line_rng)
        mismatch = None
        if again is not None and self.dist is None:  # across ranks: checked in `reduce`
            mismatch = run(self.line.drop_unless_repeated, meas.first_loss, again,
                           self.hyper.replay_tolerance, meas.last_loss, meas.late)
        run(self.line.set_multiplier, multiplier)
        fit = ops.finish(self.flats, self.line, averaged, run=run)
        publish(self.flats, run)
        # the verdict: the fit's validity, or across ranks the collective's code (bit 0: valid)
        verdict = fit["valid"] if self.dist is None else run(self.dist.code, fit["valid"])
        # with the measured rate, and the one a fall-back would take when one may follow
        # and the noise ratio when asked for: [verdict, rate, (fall-back rate), (noise), ...]
        decided = self.line.rate_reads[:2 if may_fall_back else 1]
        if noise:
            fit["noise"] = run(self.line.noise_ratio, fit["b"], meas.total //
                               self.hyper.approximation_batches)
            decided = decided + [fit["noise"]]
        flags = read([verdict] + decided + ([] if mismatch is None else
                     [mismatch, meas.first_loss, again, meas.last_loss, meas.late])
                     )  # host sync 2 of 2
        ratio = flags[len(decided)] if noise else None
        code = int(flags[0])
        if self.dist is not None and code & ERRORS:
            return LineEnd("interrupted: failed across ranks",
                           self._fail_across_ranks(ops, meas, again, code, run), None)
        rate.measured = flags[1]
        if may_fall_back:
            rate.fallback = flags[2]
        rate.show(multiplier)
        flags = flags[1 + len(decided):]  # the repeat's check
        valid = bool(code & 1)
        if mismatch is not None and flags[0]:
            error, reason = repeat_failure(*flags[1:], meas.late_names,
                                           self.hyper.replay_tolerance)
            return LineEnd(reason, error, fit, valid)
        return LineEnd(None if valid else "fit invalid", None, fit, valid,
                       ratio if valid else None)

    def _fail_across_ranks(self, ops: Backend, meas: Measurement,
                           again: Optional[torch.Tensor], code: int, run: Commit) -> str:
        """Every rank saw the same failed collective: all go back to the line's origin (as a
        rank whose evaluations raised did). Returns the error to raise."""
        for flat in self.flats:
            run(ops.restore_origin, flat)
        publish(self.flats, run)
        run(self.dist.restore_rate, self.line)
        error = self.dist.explain(code)
        if self.dist.missed_here():  # this rank's closure did not repeat: say how to fix it
            values = read([meas.first_loss, again, meas.last_loss, meas.late])
            error += " On this rank: " + repeat_failure(*values, meas.late_names,
                                                        self.hyper.replay_tolerance)[0]
        return error

    def record(self, fit: Optional[Dict[str, Any]], reason: Optional[str], counters: Any,
               averaged: bool) -> Dict[str, Any]:
        """The record of a measurement that ends (`measurement.record_to_python` reads it);
        `counters`: the optimizer's, which say when it started."""
        record = dict(fit or {})
        record.update(call=counters.measure_start_call, update=counters.measure_start_update,
                      m=counters.m, reason=reason, averaged=averaged,
                      partials=self.line.partials.clone(), sums=self.line.sums.clone(),
                      counts=self.line.counts.clone())
        return record

    # ------------------------------------------------------------------ faults
    def abort(self, ops: Backend, meas: Measurement, run: Commit) -> None:
        """A fault after the origin was saved: θ back at the line's origin (as before the call),
        buffers and RNG as after call k·m."""
        for flat in self.flats:
            run(ops.restore_origin, flat)
        publish(self.flats, run)
        self.buffers.restore()
        restore_rng(meas.line_rng)

    def join_failed(self, meas: Measurement, start_call: int, start_update: int) -> None:
        """After `abort`: the other ranks are on their way to the measurement's collective; join
        it with the error flag up, so they end the measurement too instead of timing out."""
        if self.dist is None or meas.reduced:
            return
        try:
            self.dist.join_failed(self.line, start_call, start_update)
        except Exception:
            pass  # the original exception is the one to raise
