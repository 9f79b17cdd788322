"""LABPAL as a torch.optim.Optimizer: the phases as a small host-side state machine.

The optimizer keeps integer counters only and decides with them; every value computed from
tensors stays on the device (`line.Line`) and every pass over parameter memory is a step of
the backend (`ops.base.Backend`). The host reads a device value exactly twice per
measurement: whether to abandon it (after the direction is formed) and whether the fit gave
a rate. The algorithm as implemented: docs/algorithm.md.

A step is atomic (docs/algorithm.md, "Faults"): the closure and backward run first and a fault
there drops the call; the optimizer's writes then run together (`commit.Commit`); the one long
stretch of user code after them, the line evaluations, ends the measurement on a fault.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from . import checkpoint
from . import ops as backends
from . import shards
from .commit import Commit
from .distributed import ERRORS, Collectives
from .flat import Flat, build_flats
from .hyper import NAMES, Hyper, number
from .layout import ABANDON_REASONS, Abandon, Partial
from .line import Line
from .resolution import AutocastProbe
from .replay import BufferSnapshot, capture_rng, cuda_indices, restore_rng

TRAINING, MEASURING = "training", "measuring"

# robust fits: after this many measurements in a row without a rate (none existing yet), train
# on with a safe step instead of measuring again forever (`LABPAL._fall_back`)
FAIL_LIMIT = 3
# what to do about the reason of the last failed measurement (a substring of it -> the fix)
_FALLBACK_FIXES = (
    ("direction norm", "‖d‖ is outside direction_norm_range: widen it (e.g. "
     "direction_norm_range=(0, float('inf'))), or return the unscaled loss from the closure (a "
     "loss multiplied by a scale, as fp16 loss scaling does, multiplies ‖d‖ too)"),
    ("directional derivative", "the loss does not decrease along its own gradient: the closure "
     "must return the loss of the parameters being trained (not detached, nor a constant)"),
    ("fit invalid", "the loss is not finite at the measured positions, or the fit has no finite "
     "solution: check the loss for NaN/inf, or use smaller sample_positions"),
)

# where a step is when an exception leaves it (what `_fault` makes of it)
_CLOSURE = "closure"    # the closure or backward: nothing written but this call's gradient
_COMMIT = "commit"      # the optimizer's writes (a Commit): finished, or the optimizer is broken
_LINE = "line"          # the line evaluations: the measurement ends, θ back at its origin
_DONE = "done"          # everything written: only a held Ctrl-C or a retried op error is left

_NOT_COPYABLE = (
    "LABPAL cannot be copied or pickled: the parameters are views into its flat buffers "
    "(p.data points into them), so a copy would either share the model's memory or train "
    "tensors no model uses. Save opt.state_dict() and load_state_dict() it into a LABPAL built "
    "over the (copied) model's parameters.")


@dataclass
class Counters:
    """The host-side state machine's whole state (saved in state_dict as it is)."""
    calls: int = 0                # closure calls made (0-based index of the next one)
    updates: int = 0              # updates made
    m: int = 0                    # micro-batches per update (0: not yet set)
    acc: int = 0                  # micro-batches accumulated toward the next update
    pending: bool = False         # a measurement starts at the next boundary
    warm_measured: bool = False   # a measurement has started with >= warmup_updates updates
    last_end: int = 0             # updates when the last measurement ended
    has_rate: bool = False        # some measurement has produced a rate
    measure_start_call: int = 0
    measure_start_update: int = 0


class LABPAL(torch.optim.Optimizer):
    """Large-batch parabolic approximation line search (Mutschler, Laube & Zell, 2021).

    ``loss = opt.step(closure)``: the closure runs the forward pass on its own batch and returns
    the mean loss as a scalar tensor, and must give that loss again when called again at the
    same parameters (measurements evaluate it at other points of the line; a closure that does
    not, e.g. one reading a loop variable that has moved on, is detected and stopped with an
    error). LABPAL runs ``backward()`` itself, unless the closure does (torch's convention:
    ``zero_grad(); loss.backward(); return loss``), which is accepted as well.

    Hyper-parameters are keyword-only, named as in docs/algorithm.md. Per parameter group only
    ``weight_decay`` (L2, part of the objective the line measures) may be set. ``model=``
    lets repeated evaluations leave the model's buffers (BatchNorm statistics) untouched.

    Under torch.distributed (README, "Distributed training") the line's samples are global:
    ``process_group=`` (default: the DDP ``model=``'s group, else the default group when one is
    initialized; a group of one rank opts out) is the set of ranks that measure together.
    """

    def __init__(self, params, *, backend: str = "auto", model: Optional[torch.nn.Module] = None,
                 process_group: Any = None, weight_decay: float = 0.0, **hyper: Any):
        unknown = sorted(set(hyper) - set(NAMES))
        if unknown:
            raise TypeError(f"LABPAL got unknown hyper-parameter(s) {unknown}; "
                            f"known: {', '.join(NAMES)}")
        self.hyper = Hyper(**hyper)
        weight_decay = _weight_decay(weight_decay, "weight_decay")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        super().__init__(params, {"weight_decay": weight_decay})
        self.param_groups = [_Group(group) for group in self.param_groups]
        self._check_groups()
        self._params = [p for group in self.param_groups for p in group["params"]]
        trained = [p for p in self._params if p.requires_grad]
        if not trained:
            raise ValueError("params: LABPAL got no parameter that requires grad")
        shards.refuse_fsdp1(trained, model)
        placed = shards.fsdp_params(model)  # FSDP2: the flats become its sharded storage
        shards.check_placed(trained, placed, model is not None)
        self.ops = backends.resolve(backend, {p.device for p in trained})
        self.backend = self.ops.name
        self.ops = shards.sharded_ops(self.ops, model, placed, trained, trained[0].device)
        # the flats point p.data and p.grad into their buffers: put them back if anything fails
        # here, so a failed construction leaves the model as it was
        saved = shards.bindings(trained, placed)
        try:
            self.flats: List[Flat] = build_flats(self.param_groups, placed,
                                                 self.hyper.master_weights)
            self._device = self.flats[0].device
            self._cuda = cuda_indices(f.device for f in self.flats)
            self.line: Line = self.ops.make_line(self.hyper, self._device)
            self._buffers = BufferSnapshot(model)
            self._compute_eps = 0.0  # autocast's epsilon seen in a measurement's first call
            self._failures = 0  # measurements in a row that gave no rate while none exists
            self._warned_fallback = False
            self._dist = Collectives.of(process_group, model, self._device,
                                        len(self.hyper.line_positions))
        except BaseException:
            shards.restore_bindings(saved)
            raise
        for group in self.param_groups:
            group["lr"] = self.line.lr
        # which parameters the flats hold: a change of requires_grad is refused at the next step
        self._requires_grad = tuple(p.requires_grad for p in self._params)
        # set when gradients reach a parameter: tells whether a closure ran backward itself
        self._backward_seen = _Flag()
        self._hooks = [p.register_post_accumulate_grad_hook(self._backward_seen.hook)
                       for p in trained]
        self.counters = Counters()
        self._phase = TRAINING
        self._mcall = 0            # calls made in the current measurement
        self._formed = False       # the measurement's direction is formed (old d in origin)
        self._closures: List[Callable] = []
        self._rngs: list = []
        self._own_backward: List[bool] = []  # per kept closure: it runs backward() itself
        self._first_loss: Optional[torch.Tensor] = None  # the measurement's first loss sample
        self._records: List[Dict[str, Any]] = []
        self._stepping = False     # step() is running (it is not re-entrant)
        self._repeating = False    # kept closures are being evaluated again
        self._broken: Optional[str] = None  # why steps are refused (a step left half-made)
        self._ranks = 1 if self._dist is None else self._dist.world
        self._grads_reduced = False  # this call's gradients were averaged by LABPAL (DDP model=)
        self._line_reduced = False   # the measurement's collective was entered
        self._again: Optional[torch.Tensor] = None  # the first closure's repeated loss
        self._closure_scaled = False  # this call's closure ran backward on scale_loss(loss)

    # ------------------------------------------------------------------ public
    @property
    def phase(self) -> str:
        """"training" or "measuring" (a measurement is collecting its batches)."""
        return self._phase

    @property
    def updates(self) -> int:
        return self.counters.updates

    @property
    def repeating(self) -> bool:
        """True while a measurement evaluates its kept closures again (at other line positions,
        or at the origin to check they repeat): code in a closure can skip logging then."""
        return self._repeating

    @property
    def multiplier(self) -> int:
        """m, the number of closure calls averaged into one update (0 before the first call)."""
        return self.counters.m

    @property
    def grad_norm(self) -> torch.Tensor:
        """‖ḡ‖, the global L2 norm of the averaged loss gradient of the last direction formed,
        before clipping: a 0-dim fp64 device tensor that the next direction overwrites (clone it
        to keep it; reading it syncs). NaN when max_grad_norm is None (not computed) and before
        the first direction."""
        return self.line.grad_norm

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to run backward on in a closure that runs backward itself, under
        `loss_scale`: S·loss with the current loss scale S (a device multiply, no read), which
        LABPAL unscales in its update; `loss` as it is without `loss_scale`. Return the unscaled
        loss from the closure: `opt.scale_loss(loss).backward(); return loss`.
        (`LABPALCallback` does this in Lightning's backward.)"""
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"scale_loss(loss): loss must be a tensor, got {type(loss).__name__}")
        if self.hyper.loss_scale is None:
            return loss
        self._closure_scaled = True
        return self.line.scaled(loss)

    # torch.amp.GradScaler.step then leaves the loss scaling to the optimizer: it sets
    # `found_inf` on it and calls step() directly, which refuses (`_refuse_grad_scaler`)
    _step_supports_amp_scaling = True

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """One closure call: returns its loss (detached). Updates when m calls are averaged.

        If it raises (in the closure, backward, an op, or on Ctrl-C), the parameters are bit
        for bit as before the call or as after it, and stepping can go on (docs/algorithm.md)."""
        if "found_inf" in vars(self) or "grad_scale" in vars(self):
            # GradScaler deletes them after step() returns: a refused call must, so that a
            # fixed loop steps again
            vars(self).pop("found_inf", None)
            vars(self).pop("grad_scale", None)
            _refuse_grad_scaler()
        if closure is None or not callable(closure):
            raise TypeError("LABPAL.step() needs a closure: a function that runs the forward "
                            "pass on its batch and returns the mean loss (LABPAL calls backward "
                            "itself, unless the closure does); it is called again during "
                            "measurements, so a loop of `loss.backward(); opt.step()` cannot "
                            "work: wrap the forward pass in a closure")
        if torch.compiler.is_compiling():
            # a plain raise would be a graph break, after which dynamo runs step() eagerly; a
            # disabled function runs eagerly, so its error reaches the caller (fullgraph=True
            # reports this line instead, hence the comment on it)
            torch.compiler.disable(_refuse_compile)()  # compile the model, not LABPAL.step()
        self._check_can_step()
        self._stepping = True
        try:
            for flat in self.flats:
                flat.attach_params()
            c = self.counters
            if self._phase == MEASURING:
                return self._measure_call(closure, c.m, start=False)
            m, start = self._boundary() if c.acc == 0 else (c.m, False)
            if start:
                return self._measure_call(closure, m, start=True)
            return self._train_call(closure, m)
        finally:
            self._stepping = False

    def __setattr__(self, name: str, value: Any) -> None:
        # Accelerate's fp16 wrapper (AcceleratedOptimizer with a GradScaler) replaces step()
        # right before scaler.step(opt, closure), which would fail on a GradScaler that never
        # scaled a loss: say what is wrong and the fix instead
        if name == "step" and getattr(value, "__module__", "").startswith("accelerate"):
            _refuse_grad_scaler()
        super().__setattr__(name, value)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the flat gradient buffer (gradients stay views into it, never None)."""
        with torch.no_grad():
            for flat in self.flats:
                flat.attach_grads()
                flat.clear_model_grads()
                self.ops.zero_grad(flat)

    def measurements(self) -> List[Dict[str, Any]]:
        """One record per measurement, as Python numbers (this reads device values)."""
        return [_record_to_python(r, self.hyper) for r in self._records]

    def __getstate__(self):  # what pickle, copy.copy and copy.deepcopy ask for
        raise TypeError(_NOT_COPYABLE)

    def __del__(self):
        # vars(), not getattr: a wrapper that imitates LABPAL's class (Lightning's
        # LightningOptimizer) inherits __del__ and forwards getattr to the LABPAL it wraps
        for hook in vars(self).get("_hooks", ()):
            hook.remove()

    # ------------------------------------------------------------------ phases
    def _check_can_step(self) -> None:
        if self._stepping:
            raise RuntimeError("LABPAL.step() was called while a step was running (from its "
                               "closure?): a closure only runs the forward pass and returns the "
                               "loss; call step() once per batch, outside the closure")
        if self._broken is not None:
            raise RuntimeError(self._broken)
        if tuple(p.requires_grad for p in self._params) != self._requires_grad:
            changed = [i for i, (p, was) in enumerate(zip(self._params, self._requires_grad))
                       if p.requires_grad != was]
            raise RuntimeError(
                f"requires_grad of parameter(s) {changed} (in param_groups order) changed after "
                "LABPAL was built: its flat buffers, direction and line hold exactly the "
                "parameters that required grad then (a frozen one would keep moving with "
                "momentum and weight decay, an unfrozen one would never train). Build a new "
                "LABPAL over the parameters to train.")

    def _boundary(self) -> Tuple[int, bool]:
        """Start of an update's accumulation: m as the schedule says now, and whether a
        measurement starts (both applied by the call's commit, so a failed call changes none)."""
        h, c = self.hyper, self.counters
        m = h.multiplier_at(c.calls, self._ranks)
        trigger = (c.pending or c.calls == 0 or m != c.m
                   or (not c.warm_measured and c.updates >= h.warmup_updates)
                   or c.updates - c.last_end >= h.reuse_updates)
        return m, trigger

    def _start_measurement(self, m: int, run: Commit) -> None:
        c = self.counters
        self._phase = MEASURING
        c.m = m
        c.pending = False
        self._mcall = 0
        self._formed = False
        c.measure_start_call = c.calls
        c.measure_start_update = c.updates
        if c.updates >= self.hyper.warmup_updates and self.hyper.line_fit != "paper":
            c.warm_measured = True
        run(self.line.reset_samples)
        self._closures, self._rngs, self._own_backward = [], [], []

    def _decays(self) -> List[List[float]]:
        """Per flat, the weight decay of each of its segments (as the groups say now)."""
        return [[self.param_groups[g]["weight_decay"] for g, _, _ in flat.segments]
                for flat in self.flats]

    def _train_call(self, closure: Callable, m: int) -> torch.Tensor:
        c = self.counters
        stage = _CLOSURE
        try:
            with self._grad_sync(m, last=c.acc + 1 == m):
                loss, _ = self._forward_backward(closure)
            with self._commit() as run:
                stage = _COMMIT
                self._take_reduced_grads(run)
                c.m = m
                c.calls += 1
                c.acc += 1
                if c.acc < m:
                    for flat in self.flats:
                        run(self.ops.accumulate, flat, first=c.acc == 1)
                else:  # the m-th call: form d, move θ along it
                    run(self.line.set_multiplier, self.hyper.lr_multiplier_at(c.updates))
                    self.ops.update(self.flats, self._decays(), self.line, m=m,
                                    momentum=self.hyper.momentum, run=run)
                    self._publish(run)
                    c.acc = 0
                    c.updates += 1
                stage = _DONE
        except BaseException as exc:
            self._fault(stage, exc)
            raise
        return loss

    def _measure_call(self, closure: Callable, m: int, start: bool) -> torch.Tensor:
        c = self.counters
        j = 1 if start else self._mcall + 1
        total = self.hyper.approximation_batches * m
        rng = capture_rng(self._cuda)
        rng_after = None
        stage = _CLOSURE
        try:
            if j <= m:
                # the first call tells the dtype the closure computes in (resolve_positions)
                probe = AutocastProbe() if j == 1 and self.hyper.resolving else None
                with self._grad_sync(m, last=j == m), probe or contextlib.nullcontext():
                    loss, own = self._forward_backward(closure)
                if probe is not None:
                    self._compute_eps = probe.eps
            else:  # the measurement's first closure tells the convention
                own = self._own_backward[0]
                loss = self._sample(closure, own)
            with self._commit() as run:
                stage = _COMMIT
                self._take_reduced_grads(run)
                if start:
                    self._start_measurement(m, run)
                c.calls += 1
                self._mcall = j
                self._closures.append(closure)
                self._rngs.append(rng)
                self._own_backward.append(own)
                if j == 1:
                    self._first_loss = loss
                run(self.line.record, 0, loss)
                if j < m:
                    for flat in self.flats:
                        run(self.ops.accumulate, flat, first=j == 1)
                elif j == m:
                    self._form_direction(m, run)
                if self._phase == MEASURING and j == total:
                    self._resolve_positions(run)
                    # the line's origin, the buffers and the RNG, to come back to
                    for flat in self.flats:
                        run(self.ops.save_origin, flat)
                    self._buffers.save()
                    rng_after = capture_rng(self._cuda)
                    self._line_reduced = False
                    stage = _LINE  # from here (a held Ctrl-C included) a fault ends the measurement
                else:
                    stage = _DONE
            if stage == _LINE:
                try:
                    self._repeating = True
                    with torch.no_grad():
                        again = self._evaluate_line()
                finally:
                    self._repeating = False
                again = self._reduce_line(again)
                with self._commit() as run:
                    stage = _COMMIT
                    self._buffers.restore()
                    restore_rng(rng_after)
                    failed = self._finish_line(again, run)
                    stage = _DONE
                if failed:
                    raise RuntimeError(failed)
        except BaseException as exc:
            self._fault(stage, exc, rng_after)
            raise
        return loss

    def _form_direction(self, m: int, run: Commit) -> None:
        """Call m of a measurement: form d (the old one kept to restore); abandon or go on."""
        for flat in self.flats:
            run(self.ops.save_direction, flat)
        self.ops.direction(self.flats, self._decays(), self.line, m=m,
                           momentum=self.hyper.momentum, line_terms=True, run=run)
        self._formed = True
        code = int(run(self.line.abandon_code).item())  # host sync 1 of 2
        if code:
            for flat in self.flats:
                run(self.ops.restore_direction, flat)
            self._end_measurement(ABANDON_REASONS[code], run)

    def _resolve_positions(self, run: Commit) -> None:
        """Call k·m, before the line evaluations: the positions' factor, on the device
        (Line.set_resolution). Under torch.distributed the loss floor reads every rank's samples
        at s = 0 (one all-reduce), so all move alike; here, where no measurement is abandoned,
        the ranks' collectives stay paired even when one rank abandons alone."""
        if not self.hyper.resolving:
            return
        dtype = self._first_loss.dtype
        loss_eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
        if self._dist is not None:
            self.line.origin_global = self._dist.origin_loss(self.line)
        self.ops.resolution(self.flats, self.line, self._compute_eps, loss_eps, run=run)

    def _evaluate_line(self) -> Optional[torch.Tensor]:
        """Call k·m: evaluate every kept closure at the other positions (user code: Ctrl-C is
        not held back here; a fault ends the measurement, `_fault`). First, at θ₀ still, the
        first closure runs again: its loss (returned) must be its first one (`_finish_line`)."""
        kept = list(zip(self._closures, self._rngs, self._own_backward))
        again = None
        if self.hyper.replay_tolerance is not None and len(kept) > 1:
            again = self._repeat(*kept[0])
        for j, s in enumerate(self.hyper.line_positions[1:], start=1):
            self.ops.move(self.flats, self.line.position_coef(s))
            self._publish()
            for closure, rng, own in kept:
                self.line.record(j, self._repeat(closure, rng, own))
        return again

    def _repeat(self, closure: Callable, rng, own_backward: bool) -> torch.Tensor:
        """A kept closure evaluated again, with the random state of its first call."""
        restore_rng(rng)
        return self._sample(closure, own_backward)

    def _finish_line(self, again: Optional[torch.Tensor], run: Commit) -> Optional[str]:
        """Fit, step rule and the move to s_upd, on the device; without any rate yet s_upd is 0
        and the move lands on θ₀ itself. A first closure that did not repeat its loss makes the
        fit invalid (its samples are not of one line); then the error to raise is returned."""
        h = self.hyper
        averaged = self.counters.measure_start_update >= h.warmup_updates
        first = self._first_loss
        if again is not None:
            mismatch = run(self.line.drop_unless_repeated, first, again, h.replay_tolerance)
        run(self.line.set_multiplier, h.lr_multiplier_at(self.counters.updates))
        record = self.ops.finish(self.flats, self.line, averaged, run=run)
        self._publish(run)
        if self._dist is not None:  # the repeat check went into the collective (_reduce_line)
            code = int(run(self._dist.code, record["valid"]).item())  # host sync 2 of 2
            if code & ERRORS:
                return self._fail_across_ranks(code, run)
            valid, failed = bool(code & 1), None
        elif again is None:
            valid, failed = bool(record["valid"].item()), None  # host sync 2 of 2
        else:
            flags = torch.stack([record["valid"].double(), mismatch.double(),
                                 first.double().to(mismatch.device),
                                 again.double().to(mismatch.device)]).tolist()  # sync 2 of 2
            valid = bool(flags[0])
            failed = _not_repeated(flags[2], flags[3], h.replay_tolerance) if flags[1] else None
        self.counters.has_rate |= valid
        if self.counters.has_rate:
            self.counters.updates += 1
        reason = None if valid else "fit invalid"
        if failed:
            reason = (f"closure not repeatable: loss {flags[2]:.6g} at its first call, "
                      f"{flags[3]:.6g} again")
        self._end_measurement(reason, run, record)
        return failed

    def _end_measurement(self, reason: Optional[str], run: Commit,
                         record: Optional[dict] = None) -> None:
        c = self.counters
        record = dict(record or {})
        record.update(call=c.measure_start_call, update=c.measure_start_update,
                      m=c.m, reason=reason,
                      averaged=c.measure_start_update >= self.hyper.warmup_updates,
                      partials=self.line.partials.clone(), sums=self.line.sums.clone(),
                      counts=self.line.counts.clone())
        self._records.append(record)
        self._closures, self._rngs, self._own_backward = [], [], []
        self._first_loss = None
        self._phase = TRAINING
        c.acc = 0
        self._formed = False
        if self.hyper.line_fit == "paper" and (reason or "").startswith("abandoned"):
            # the paper's (the reference's) trigger still holds, warm-up or reuse: measure
            # again at the next call (docs/algorithm.md, "The authors' code over whole runs")
            pass
        else:
            c.last_end = c.updates
            c.warm_measured |= c.measure_start_update >= self.hyper.warmup_updates
        if not c.has_rate:
            # an interruption (an exception, raised to the caller) is not the line's failure,
            # nor an overflow while a dynamic loss scale is still finding its level (halved)
            self._failures += not (reason or "").startswith("interrupted") and not (
                reason == ABANDON_REASONS[int(Abandon.OVERFLOW)]
                and self.hyper.loss_scale == "dynamic")
            if self._failures >= FAIL_LIMIT and self.hyper.line_fit != "paper":
                self._fall_back(reason, run)
                return
            # no update has been made yet: measure again, from a direction of zero
            for flat in self.flats:
                run(self.ops.clear_direction, flat)
            c.pending = True

    def _fall_back(self, reason: Optional[str], run: Commit) -> None:
        """FAIL_LIMIT measurements in a row gave no rate and none exists (robust fits only; the
        paper's measures again forever): train on with the safe step (`Line.fall_back`), say
        why once. Later measurements replace it as usual."""
        run(self.line.fall_back)
        self.counters.has_rate = True
        self._failures = 0
        if self._warned_fallback:
            return
        self._warned_fallback = True
        fix = next((text for key, text in _FALLBACK_FIXES if key in (reason or "")),
                   "see opt.measurements() for each measurement's reason")
        warnings.warn(
            f"LABPAL: {FAIL_LIMIT} measurements in a row gave no learning rate (last: {reason}); "
            "training goes on with the safe step s_upd = min(largest measured position, "
            f"max_step_size) (docs/algorithm.md, 'Falling back'). To fix: {fix}.",
            RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ distributed
    @contextmanager
    def _grad_sync(self, m: int, last: bool) -> Iterator[None]:
        """A backward of an update's m calls. With a DistributedDataParallel model= and m > 1,
        every backward runs under no_sync and the last call averages the summed gradient once
        (one all-reduce per flat, not m); with m = 1 DDP's own reduce (overlapping backward) is
        the one. Without model=, a DDP model reduces in every backward (m all-reduces)."""
        ddp = None if self._dist is None else self._dist.ddp
        if ddp is None or m == 1:
            yield
            return
        with ddp.no_sync():
            yield
        if last:
            self._reduce_grads()

    def _reduce_grads(self) -> None:
        """The last call's backward is done: average Σ(earlier calls) + this call's gradient
        across ranks into each flat's spare buffer, leaving grad_sum and grad untouched, so that
        a failed collective drops the call like a failed backward (`_fault`)."""
        with torch.no_grad():
            for flat in self.flats:
                flat.attach_grads()
                scratch = flat.need_origin()
                torch.add(flat.need_grad_sum(), flat.grad, out=scratch)
                self._dist.sum_(scratch)
        self._grads_reduced = True

    def _take_reduced_grads(self, run: Commit) -> None:
        """In the call's commit: the averaged sum becomes grad_sum (grad zero), which the
        direction divides by m."""
        if not self._grads_reduced:
            return
        self._grads_reduced = False
        for flat in self.flats:
            run(torch.div, flat.origin, self._ranks, out=flat.grad_sum)
            run(self.ops.zero_grad, flat)

    def _reduce_line(self, again: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """After the line evaluations: the measurement's one collective (global samples). The
        first closure's repeat is checked here, on this rank's samples, and its verdict travels
        with them (a closure that does not repeat on one rank fails the measurement on all);
        returns what `_finish_line` still has to check (nothing, under torch.distributed)."""
        if self._dist is None:
            return again
        missed = None
        if again is not None:
            missed = self.line.drop_unless_repeated(self._first_loss, again,
                                                    self.hyper.replay_tolerance)
            self._again = again
        self._line_reduced = True
        self._dist.reduce_line(self.line, self.counters.measure_start_call,
                               self.counters.measure_start_update, missed=missed)
        return None

    def _fail_across_ranks(self, code: int, run: Commit) -> str:
        """Every rank saw the same failed collective: all end the measurement at the line's
        origin (as a rank whose evaluations raised did). Returns the error to raise."""
        for flat in self.flats:
            run(self.ops.restore_origin, flat)
        self._publish(run)
        run(self._dist.restore_rate, self.line)
        error = self._dist.explain(code)
        if self._dist.missed_here():  # this rank's closure did not repeat: say how to fix it
            first, again = torch.stack([self._first_loss.double().reshape(()),
                                        self._again.double().reshape(())]).tolist()
            error += " On this rank: " + _not_repeated(first, again, self.hyper.replay_tolerance)
        self._end_measurement("interrupted: failed across ranks", run)
        return error

    def _publish(self, run: Callable = backends.base.call) -> None:
        """After a write of θ: fp16 / bf16 parameters ← their fp32 master copy, rounded."""
        for flat in self.flats:
            if flat.master:
                run(flat.publish)

    # ------------------------------------------------------------------ faults
    @contextmanager
    def _commit(self) -> Iterator[Commit]:
        """A step's writes, made together (`commit.Commit`); if they cannot be finished, the
        state is half made and every later step is refused."""
        with Commit() as run, torch.no_grad():
            try:
                yield run
            except BaseException as exc:
                self._broken = (
                    f"LABPAL is broken: {type(exc).__name__}: {exc} left a step's writes half "
                    "made (an op that raised again, or an error between two ops), so its state "
                    "is undefined. Build a new LABPAL (and load a state_dict saved before).")
                raise

    def _fault(self, stage: str, exc: BaseException, rng_after=None) -> None:
        """An exception is leaving the step at `stage`: leave a state the next step goes on from."""
        if stage == _CLOSURE:
            # the call did not happen: drop the gradient its backward may have added (the
            # earlier micro-batches' sum is in grad_sum, untouched)
            with self._commit() as run:
                for flat in self.flats:
                    flat.attach_grads()
                    run(flat.clear_model_grads)
                    run(self.ops.zero_grad, flat)
        elif stage == _LINE:
            # θ back at the line's origin (as before the call), buffers and RNG as after it
            with self._commit() as run:
                for flat in self.flats:
                    run(self.ops.restore_origin, flat)
                self._publish(run)
                self._buffers.restore()
                restore_rng(rng_after)
                self._end_measurement(
                    f"interrupted: {type(exc).__name__} during the line evaluations", run)
            if self._dist is not None and not self._line_reduced:
                # the other ranks are on their way to the measurement's collective: join it with
                # the error flag up, so they end the measurement too instead of timing out
                self._line_reduced = True
                try:
                    self._dist.join_failed(self.line, self.counters.measure_start_call,
                                           self.counters.measure_start_update)
                except Exception:
                    pass  # the original exception is the one to raise
        # _COMMIT: the writes were finished or the optimizer is broken (_commit); _DONE: nothing

    # ------------------------------------------------------------------ closures
    def _forward_backward(self, closure: Callable) -> Tuple[torch.Tensor, bool]:
        """(loss, whether the closure ran backward itself). Gradients that reached a parameter
        while the closure ran mean it did (torch's convention): backward is not run again."""
        self._backward_seen.value = False
        self._closure_scaled = False
        with torch.enable_grad():
            loss = _checked_loss(closure())
            own = self._backward_seen.value
            scaling = self.hyper.loss_scale is not None
            if own and scaling and not self._closure_scaled:
                raise RuntimeError(
                    "loss_scale is set and the closure ran backward() on a loss LABPAL did not "
                    "scale: LABPAL unscales the gradient in its update, so either return the "
                    "loss without calling backward() (LABPAL runs it), or run backward on "
                    "opt.scale_loss(loss) (Accelerate: accelerator.backward(opt.scale_loss(loss)); "
                    "never GradScaler.scale). Lightning's LABPALCallback and LABPALTrainer do "
                    "that themselves")
            if not own:
                if not loss.requires_grad:
                    raise RuntimeError(
                        "the closure's loss does not require grad and the closure did not run "
                        "backward(): LABPAL needs a loss computed from the parameters with "
                        "autograd enabled (it runs backward itself), or a closure that runs "
                        "loss.backward() itself")
                (self.line.scaled(loss) if scaling else loss).backward()
        for flat in self.flats:
            flat.attach_grads()
            flat.pull_grads()  # fp32 master weights: the model's gradients into the flat's
        return loss.detach(), own

    def _sample(self, closure: Callable, own_backward: bool) -> torch.Tensor:
        """A call that only gives a loss sample: forward only, without autograd, unless the
        closure runs backward itself (torch's convention needs autograd); its gradient is
        dropped then."""
        if not own_backward:
            with torch.no_grad():
                return _checked_loss(closure()).detach()
        with torch.enable_grad():
            loss = _checked_loss(closure()).detach()
        for flat in self.flats:
            flat.attach_grads()
            flat.clear_model_grads()
            self.ops.zero_grad(flat)
        return loss

    # ------------------------------------------------------------------ groups and state
    def _check_groups(self) -> None:
        hyper_names = set(NAMES) | {"lr", "backend", "model", "process_group"}
        for i, group in enumerate(self.param_groups):
            bad = sorted(set(group) & hyper_names)
            if bad:
                raise ValueError(f"param_groups[{i}] sets {bad}: LABPAL measures one line across "
                                 "all groups, so only 'weight_decay' may differ per group")
            group["weight_decay"] = _weight_decay(group["weight_decay"],
                                                  f"param_groups[{i}]['weight_decay']")
            devices = {p.device for p in group["params"] if p.requires_grad}
            if len(devices) > 1:
                raise ValueError(f"param_groups[{i}] has parameters on several devices "
                                 f"{sorted(map(str, devices))}; put each group on one device")
            for p in group["params"]:
                if p.requires_grad and not p.is_floating_point():
                    raise ValueError(f"param_groups[{i}] has a parameter of dtype {p.dtype}; "
                                     "LABPAL needs floating-point parameters")
        _check_no_shared_storage(self.param_groups)

    def add_param_group(self, param_group: dict) -> None:
        """Only while constructing (`Optimizer.__init__` adds the groups)."""
        if getattr(self, "flats", None) is not None:
            raise RuntimeError("LABPAL cannot add parameter groups after construction: its flat "
                               "buffers and the line span all groups; pass every group up front")
        super().add_param_group(param_group)

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue bit for bit. Saved while a measurement collects its
        batches (closures cannot be saved), the state resumes by starting that measurement over."""
        index = {}
        groups = []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            # the learning rate is part of the line state below, not of the groups
            groups.append({"params": ids, "weight_decay": group["weight_decay"]})
        measuring = self._phase == MEASURING
        # an unfinished update's gradient sum is this rank's own until its last call averages it
        # (DDP model= with m > 1): not saved; the update starts over at load, on every rank alike
        local_sum = self._dist is not None and self._dist.ddp is not None and self.counters.m > 1
        state: Dict[int, Dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for flat in self.flats:
                direction = flat.origin if measuring and self._formed else flat.direction
                sums = flat.slices(flat.grad_sum) if flat.grad_sum is not None and not measuring \
                    and self.counters.acc > 0 and not local_sum else [None] * len(flat.params)
                masters = flat.slices(flat.param) if flat.master else [None] * len(flat.params)
                for i, (p, d, s, w) in enumerate(zip(flat.params, flat.slices(direction), sums,
                                                     masters)):
                    entry = {"direction": flat.saved(i, d)}
                    if w is not None:  # fp32 master weights: the model holds them rounded
                        entry["master"] = flat.saved(i, w)
                    if s is not None:
                        entry["grad_sum"] = flat.saved(i, s)
                    state[index[id(p)]] = entry
        counters = asdict(self.counters)
        if measuring:  # resume by starting this measurement over, parameters untouched
            counters.update(acc=0, pending=True)
        elif local_sum:
            counters.update(acc=0)
        return shards.fixed_layout(self, {
            "state": state,
            "param_groups": groups,
            "labpal": {
                "version": checkpoint.VERSION,
                "hyper": self.hyper.as_dict(),
                "shapes": {index[id(p)]: (tuple(p.shape), str(p.dtype))
                           for f in self.flats for p in f.params},
                "counters": counters,
                "line": {name: getattr(self.line, name).clone() for name in Line.STATE},
                "records": [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in r.items()}
                            for r in self._records],
            },
        })

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores a state saved by `state_dict` from an optimizer over the same parameters.

        The whole state is checked first (`checkpoint.check`): a damaged or foreign one raises
        ValueError naming the entry and leaves the optimizer and the parameters as they were."""
        new = checkpoint.check(self, state_dict)
        with torch.no_grad():
            for flat, directions, sums, masters in zip(self.flats, new.directions,
                                                        new.grad_sums, new.masters):
                for d, saved in zip(flat.slices(flat.direction), directions):
                    d.copy_(saved)
                if flat.master:  # where the model's parameters are their rounding (README)
                    for i, (w, saved) in enumerate(zip(flat.slices(flat.param), masters)):
                        flat.take_master(w if saved is None else saved, i)
                if sums is not None:
                    for s, saved in zip(flat.slices(flat.need_grad_sum()), sums):
                        s.copy_(saved)
                self.ops.zero_grad(flat)
            for name, value in new.line.items():
                getattr(self.line, name).copy_(value)
        self.line.multiplier = None  # s_upd = s_base·factor is made again at the next update
        for group, weight_decay in zip(self.param_groups, new.weight_decays):
            group["weight_decay"] = weight_decay
            group["lr"] = self.line.lr
        self.counters = Counters(**new.counters)
        self._phase, self._mcall, self._formed = TRAINING, 0, False
        self._closures, self._rngs = [], []
        self._records = new.records


_NO_SCHEDULER = (
    "LABPAL measures its learning rate: param_groups[i]['lr'] shows the rate in use and cannot "
    "be set, so torch LR schedulers (and assigning 'lr') cannot drive it. To scale the measured "
    "rate over training, pass lr_multiplier_schedule=((update, factor), ...) to LABPAL: the "
    "factor runs linearly between the points, e.g. ((0, 1.0), (10000, 0.1)) decays it to a "
    "tenth over 10000 updates (README, 'Learning-rate schedules').")


class _Group(dict):
    """A parameter group whose 'lr' is LABPAL's measured rate (a device tensor, updated in
    place): a torch LR scheduler (it records 'initial_lr') or an assignment to 'lr' is refused,
    rather than change what is shown but not what is used."""

    def __setitem__(self, key, value):
        if key == "initial_lr" or (key == "lr" and "lr" in self and value is not self["lr"]):
            raise RuntimeError(_NO_SCHEDULER)
        super().__setitem__(key, value)

    def setdefault(self, key, default=None):
        if key == "initial_lr":
            raise RuntimeError(_NO_SCHEDULER)
        return super().setdefault(key, default)

    def __contains__(self, key):  # a scheduler resuming (last_epoch >= 0) asks first
        if key == "initial_lr":
            raise RuntimeError(_NO_SCHEDULER)
        return super().__contains__(key)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


class _Flag:
    """A bool the parameters' post-accumulate-grad hooks set (held by them, not the optimizer)."""
    __slots__ = ("value",)

    def __init__(self):
        self.value = False

    def hook(self, param: torch.Tensor) -> None:
        self.value = True


def _not_repeated(first: float, again: float, tolerance: float) -> str:
    return (
        f"the closure did not repeat its loss: evaluated again at the same parameters and with "
        f"the same random state, the first closure of this measurement gave {again:.6g}, not "
        f"{first:.6g} (relative tolerance replay_tolerance={tolerance:g}). A measurement "
        "evaluates each closure again, so each must compute the loss of its own batch: bind the "
        "batch when the closure is made (`def closure(x=x, y=y): ...` or functools.partial; a "
        "closure reading the loop's x, y sees the latest batch), and draw random numbers only "
        "from torch, Python's random or numpy's global generator (they are replayed). The fit "
        "of this measurement was discarded; stepping may go on once the closure is fixed (or "
        "replay_tolerance raised, for kernels that are not deterministic).")


def _check_no_shared_storage(param_groups) -> None:
    """Distinct parameters over the same memory (one a view of another) would be untied: each
    gets its own place in a flat buffer. (One Parameter object listed twice is held once; views
    of disjoint parts of one tensor, as a previous LABPAL's flat buffer holds them, are fine.)"""
    spans: Dict[Tuple[Any, int], List[Tuple[int, int, int]]] = {}
    position = 0
    for group in param_groups:
        for p in group["params"]:
            position += 1
            # FSDP1's parameters are views of its flat storage: refused for what they are
            shards.refuse_fsdp1([p], None)
            local = shards.local_tensor(p)  # an FSDP2 parameter: its shard's own storage
            if not p.requires_grad or local.numel() == 0:
                continue
            last = sum((n - 1) * st for n, st in zip(local.shape, local.stride()))
            start = local.storage_offset()
            key = (p.device, local.untyped_storage().data_ptr())
            for other_start, other_last, other_id in spans.get(key, ()):
                if other_id != id(p) and start <= other_last and other_start <= start + last:
                    raise ValueError(
                        f"params: parameter {position - 1} (in param_groups order) shares "
                        "memory with an earlier one (one is a view of the other): LABPAL gives "
                        "each parameter its own place in a flat buffer, which would untie "
                        "them. Tie weights by using one Parameter object in both places "
                        "(b.weight = a.weight), or .clone() one if they should not be tied")
            spans.setdefault(key, []).append((start, start + last, id(p)))


def _refuse_grad_scaler() -> None:
    raise RuntimeError(
        "LABPAL.step() was called by a torch.amp.GradScaler (scaler.step(opt, closure), or "
        "Accelerate's fp16 mixed precision): GradScaler cannot work with LABPAL, which calls the "
        "closure again at other parameters and needs the loss and gradients of each call "
        "unscaled. LABPAL scales the loss itself: build it with loss_scale='dynamic' (or a fixed "
        "number), return the plain loss from the closure (no scaler.scale, no backward) and call "
        "opt.step(closure) without a scaler (README, 'Mixed precision'). With Accelerate use "
        "mixed_precision='no' or 'bf16'.")


def _refuse_compile() -> None:
    raise RuntimeError(
        "LABPAL.step() cannot be compiled (torch.compile is tracing it): its phases are host-side "
        "counters that a compiled graph would freeze. Compile the model instead and call it in "
        "the closure: cmodel = torch.compile(model); opt.step(lambda: loss_fn(cmodel(x), y)).")


def _weight_decay(value: Any, name: str) -> float:
    """L2 weight decay as a Python float in [0, 10] (Python or numpy numbers): far above any
    useful value, low enough that wd·θ cannot overflow fp16 for |θ| < 6000."""
    return number(name, value, 0.0, 10.0)


def _checked_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the closure must return the loss as a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"the closure must return a scalar loss, got shape {tuple(loss.shape)}")
    return loss


def _record_to_python(r: Dict[str, Any], hyper: Hyper) -> Dict[str, Any]:
    """A measurement record with device tensors turned into Python numbers."""
    def num(name):
        return float(r[name]) if name in r else float("nan")

    counts = r["counts"].tolist()
    sums = r["sums"].tolist()
    partials = r["partials"].tolist()
    dd = partials[Partial.DD]
    reason = r["reason"]
    if reason == "fit invalid":
        if min(counts) == 0:
            reason = "fit invalid: a position has no finite loss sample"
        elif not (math.isfinite(num("a")) and math.isfinite(num("b"))):
            reason = "fit invalid: the normal equations have no finite solution"
        elif num("a") <= 0 and hyper.line_fit == "paper":  # robust fits take max_step_size
            reason = "fit invalid: curvature a <= 0"
        else:
            reason = "fit invalid: slope b >= 0"
    return {
        "call": r["call"], "update": r["update"], "m": r["m"], "averaged": r["averaged"],
        # as moved to (resolve_positions), else as given
        "positions": (r["positions"].tolist() if "positions" in r
                      else list(hyper.line_positions)),
        "mean_losses": [s / c if c else float("nan") for s, c in zip(sums, counts)],
        "counts": [int(c) for c in counts],
        "a": num("a"), "b": num("b"), "c": num("c"), "s_min": num("s_min"),
        "s_upd": num("s_upd"), "eta": num("eta"),
        "s_new": num("s_new"), "eta_new": num("eta_new"),
        "direction_norm": math.sqrt(dd) if dd >= 0 else float("nan"),
        "directional_derivative": (-partials[Partial.GD] / max(math.sqrt(dd), hyper.epsilon)
                                   if dd >= 0 else float("nan")),
        "valid": reason is None,
        "reason": reason,
    }
