"""What one `LABPAL.step` call does once the state machine has chosen its phase.

`LABPAL` (optimizer.py) decides which call this is from its counters; the functions here carry
the call out: a training call (`train_call`: the gradient accumulated, or the update made), a
measurement's call (`measure_call`: its gradient calls, its sample-only calls, and after call
k·m the line closed), the end of a measurement and the fall-back, and what a fault does to the
state (`_commit`, `_drop_call`, the line's abort). Each takes the optimizer and works on its state
(`counters`, the running `Measurement`, the records), which stays on the optimizer; nothing is
kept here. The device work of a measurement is `measuring.Measuring`'s.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional

import torch

from . import binding
from .commit import Commit
from .flat import publish
from .layout import ABANDON_REASONS, Abandon
from .measurement import FAIL_LIMIT, Measurement, fallback_warning
from .replay import capture_rng
from .resolution import AutocastProbe

# `opt` below: the `optimizer.LABPAL` whose call this is (not imported: it imports this module)


def _decays(opt: Any) -> List[List[float]]:
    """Per flat, the weight decay of each of its segments (as the groups say now)."""
    return [[opt.param_groups[g]["weight_decay"] for g, _, _ in flat.segments]
            for flat in opt.flats]


# ------------------------------------------------------------------ training
def train_call(opt: Any, closure: Callable, m: int) -> torch.Tensor:
    """A TRAINING call: its gradient accumulated, or at the m-th call d formed and θ moved."""
    c = opt.counters
    try:
        loss, _ = opt._calls.gradient(closure, m, last=c.acc + 1 == m)
    except BaseException:
        _drop_call(opt)
        raise
    with _commit(opt) as run:
        opt._calls.take_reduced(run)
        c.m = m
        c.calls += 1
        c.acc += 1
        if c.acc < m:
            for flat in opt.flats:
                run(opt.ops.accumulate, flat, first=c.acc == 1)
        else:  # the m-th call: form d, move θ along it
            factor = opt.rate.multiplier(c.updates)
            run(opt.line.set_multiplier, factor)
            opt.ops.update(opt.flats, _decays(opt), opt.line, m=m, run=run)
            publish(opt.flats, run)
            c.acc = 0
            c.updates += 1
            opt.rate.show(factor)
    return loss


# ------------------------------------------------------------------ measurements
def measure_call(opt: Any, closure: Callable, m: int) -> torch.Tensor:
    """A call of a measurement (the first starts it): calls 1..m give gradients, the others
    loss samples only; call k·m saves the line's origin, and the line is closed."""
    meas = opt._measurement
    j = 1 if meas is None else meas.calls + 1
    rng = capture_rng(opt._measuring.cuda)
    with _line_faults(opt):
        if j <= m:
            loss = _gradient_call(opt, closure, m, j, rng)
        else:
            loss = _sample_call(opt, closure, meas, rng)
        meas = opt._measurement
        if meas is not None and meas.line_rng is not None:
            _close_line(opt, meas)
    return loss


def _gradient_call(opt: Any, closure: Callable, m: int, j: int, rng) -> torch.Tensor:
    """Calls 1..m: forward and backward; the gradient is summed, call m forms d from it."""
    # the first call tells the dtype the closure computes in (resolve_positions)
    probe = AutocastProbe() if j == 1 and opt.hyper.resolving else None
    try:
        loss, own = opt._calls.gradient(closure, m, last=j == m, watch=probe)
    except BaseException:
        _drop_call(opt)
        raise
    with _commit(opt) as run:
        opt._calls.take_reduced(run)
        meas = opt._measurement or _start_measurement(
            opt, m, 0.0 if probe is None else probe.eps, run)
        _keep_call(opt, meas, closure, rng, own, loss, run)
        if j < m:
            for flat in opt.flats:
                run(opt.ops.accumulate, flat, first=j == 1)
        else:
            abandoned = opt._measuring.form_direction(
                opt.ops, meas, _decays(opt), m, run,
                fallback=opt.rate if _may_fall_back(opt) else None)
            if abandoned is not None:
                _end_measurement(opt, abandoned, run)
        if opt._measurement is meas and meas.calls == meas.total:
            opt._measuring.save_origin(opt.ops, meas, run)
    return loss


def _sample_call(opt: Any, closure: Callable, meas: Measurement, rng) -> torch.Tensor:
    """Calls m+1..k·m: a loss sample at the line's origin (no gradient is needed)."""
    own = meas.own_backward[0]  # the measurement's first closure tells the convention
    try:
        loss = opt._calls.sample(closure, own)
    except BaseException:
        _drop_call(opt)
        raise
    with _commit(opt) as run:
        _keep_call(opt, meas, closure, rng, own, loss, run)
        if meas.calls == meas.total:
            opt._measuring.save_origin(opt.ops, meas, run)
    return loss


def _start_measurement(opt: Any, m: int, compute_eps: float, run: Commit) -> Measurement:
    opt.counters.start_measurement(m, opt.hyper)
    run(opt.line.reset_samples)
    opt._measurement = Measurement(opt.hyper.approximation_batches * m, compute_eps)
    return opt._measurement


def _keep_call(opt: Any, meas: Measurement, closure: Callable, rng, own: bool,
               loss: torch.Tensor, run: Commit) -> None:
    opt.counters.calls += 1
    checked = opt.hyper.replay_tolerance is not None
    meas.keep(closure, rng, own, loss,
              binding.record(closure, opt._param_ids) if checked else ())
    run(opt.line.record, 0, loss)


def _close_line(opt: Any, meas: Measurement) -> None:
    """After call k·m: every kept closure evaluated at the other positions (user code), the
    measurement's collective, then fit, step rule and the move to s_upd in one commit."""
    c = opt.counters
    again = opt._measuring.evaluate(opt.ops, meas)
    opt._measuring.reduce(meas, again, c.measure_start_call, c.measure_start_update)
    with _commit(opt) as run:
        factor = opt.rate.multiplier(c.updates)
        averaged = c.averaged(opt.hyper)
        # ν from the first measurement's noise, then from every one after the warm-up, where it
        # only grows (docs/algorithm.md "m from the measured noise")
        end = opt._measuring.finish(opt.ops, meas, again, factor, averaged,
                                    run, opt.rate, _may_fall_back(opt),
                                    noise=opt._measures_noise and (c.noise is None or averaged))
        if end.noise is not None:  # m follows from the next call on (a new measurement)
            c.noise = opt.hyper.measured_noise(end.noise, c.noise)
        if end.fit is not None:
            c.has_rate |= end.valid
            if c.has_rate:
                c.updates += 1
        _end_measurement(opt, end.reason, run, end.fit)
    if end.error is not None:
        raise RuntimeError(end.error)


def _end_measurement(opt: Any, reason: Optional[str], run: Commit,
                     fit: Optional[dict] = None) -> None:
    c = opt.counters
    opt._records.append(opt._measuring.record(fit, reason, c, c.averaged(opt.hyper)))
    opt._measurement = None
    c.end_measurement(reason, opt.hyper)
    if not c.has_rate:
        # an interruption (an exception, raised to the caller) is not the line's failure,
        # nor an overflow while a dynamic loss scale is still finding its level (halved)
        opt._failures += not (reason or "").startswith("interrupted") and not (
            reason == ABANDON_REASONS[int(Abandon.OVERFLOW)]
            and opt.hyper.loss_scale == "dynamic")
        if opt._failures >= FAIL_LIMIT and opt.hyper.line_fit != "paper":
            _fall_back(opt, reason, run)
            return
        # no update has been made yet: measure again, from a direction of zero
        for flat in opt.flats:
            run(opt.ops.clear_direction, flat)
        c.pending = True


def _may_fall_back(opt: Any) -> bool:
    """Whether a measurement ending now without a rate might fall back (`_fall_back`)."""
    return not opt.counters.has_rate and opt._failures + 1 >= FAIL_LIMIT and \
        opt.hyper.line_fit != "paper"


def _fall_back(opt: Any, reason: Optional[str], run: Commit) -> None:
    """FAIL_LIMIT measurements in a row gave no rate and none exists (robust fits only; the
    paper's measures again forever): train on with the safe step (`Line.fall_back`), say
    why once. Later measurements replace it as usual."""
    run(opt.line.fall_back)
    opt.rate.measured = opt.rate.fallback  # as the last read saw it
    opt.rate.show(1.0 if opt.line.multiplier is None else opt.line.multiplier)
    opt.counters.has_rate = True
    opt._failures = 0
    if not opt._warned_fallback:
        opt._warned_fallback = True
        warnings.warn(fallback_warning(reason), RuntimeWarning, stacklevel=4)


# ------------------------------------------------------------------ faults
@contextmanager
def _commit(opt: Any) -> Iterator[Commit]:
    """A step's writes, made together (`commit.Commit`); if they cannot be finished, the
    state is half made and every later step is refused."""
    with Commit() as run, torch.no_grad():
        try:
            yield run
        except BaseException as exc:
            opt._broken = (
                f"LABPAL is broken: {type(exc).__name__}: {exc} left a step's writes half "
                "made (an op that raised again, or an error between two ops), so its state "
                "is undefined. Build a new LABPAL (and load a state_dict saved before).")
            raise


def _drop_call(opt: Any) -> None:
    """A fault in a call's closure or backward drops the call: the gradient its backward
    may have added goes (the earlier micro-batches' sum is in grad_sum, untouched)."""
    with _commit(opt) as run:
        for flat in opt.flats:
            flat.attach_grads()
            run(flat.clear_model_grads)
            run(opt.ops.zero_grad, flat)


@contextmanager
def _line_faults(opt: Any) -> Iterator[None]:
    """A measurement's call: a fault after its line's origin was saved (call k·m's commit
    done, the fit's not yet begun) ends the measurement with θ back at the origin. A commit
    that raised in its writes has broken the optimizer instead (`_commit`)."""
    try:
        yield
    except BaseException as exc:
        meas = opt._measurement
        if meas is not None and meas.line_rng is not None and opt._broken is None:
            _abort_line(opt, meas, exc)
        raise


def _abort_line(opt: Any, meas: Measurement, exc: BaseException) -> None:
    """θ back at the line's origin (as before the call), buffers and RNG as after it."""
    with _commit(opt) as run:
        opt._measuring.abort(opt.ops, meas, run)
        _end_measurement(
            opt, f"interrupted: {type(exc).__name__} during the line evaluations", run)
    opt._measuring.join_failed(meas, opt.counters.measure_start_call,
                               opt.counters.measure_start_update)
