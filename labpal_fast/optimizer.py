"""LABPAL as a torch.optim.Optimizer: the phases as a small host-side state machine.

The optimizer keeps integer counters only (`Counters`, and a `measurement.Measurement` while
one runs) and decides with them which call each step is; `steps` carries the call out (a
training call, a measurement's call, its end, a fault). Every value computed from tensors stays
on the device (`line.Line`) and every pass over parameter memory is a step of the backend
(`ops.base.Backend`). Calling the closure is `closures.Closures`', a measurement's device
work (the direction, the line's origin, its evaluations, collective and fit)
`measuring.Measuring`'s, the checkpoint format `checkpoint`'s, what is refused and why
`guards`'. The host reads a device value exactly twice per measurement: whether to abandon it
(after the direction is formed) and whether the fit gave a rate. The algorithm as implemented:
docs/algorithm.md.

A step is atomic (docs/algorithm.md, "Faults"): the closure and backward run first and a fault
there drops the call; the optimizer's writes then run together (`commit.Commit`); the one long
stretch of user code after them, the line evaluations, ends the measurement on a fault.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from . import checkpoint, guards, steps
from . import ops as backends
from . import shards
from .flat import Flat, build_flats
from .hyper import NAMES, Hyper
from .line import Line
from .measurement import Measurement, record_to_python
from .measuring import Measuring

TRAINING, MEASURING = "training", "measuring"

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
    noise: Optional[float] = None  # ν as the first measurement found it (Hyper.measures_noise)

    def measure_now(self, m: int, hyper: Hyper) -> bool:
        """At an update's first call, with m as the schedule says now: whether a measurement
        starts (the trigger of docs/algorithm.md)."""
        return (self.pending or self.calls == 0 or m != self.m
                or (not self.warm_measured and self.updates >= hyper.warmup_updates)
                or self.updates - self.last_end >= hyper.reuse)

    def averaged(self, hyper: Hyper) -> bool:
        """The measurement (running or ending) started after the warm-up: its rate is averaged."""
        return self.measure_start_update >= hyper.warmup_updates

    def start_measurement(self, m: int, hyper: Hyper) -> None:
        self.m = m
        self.pending = False
        self.measure_start_call = self.calls
        self.measure_start_update = self.updates
        if self.updates >= hyper.warmup_updates and hyper.line_fit != "paper":
            self.warm_measured = True

    def end_measurement(self, reason: Optional[str], hyper: Hyper) -> None:
        self.acc = 0
        if hyper.line_fit == "paper" and (reason or "").startswith("abandoned"):
            # the paper's (the reference's) trigger still holds, warm-up or reuse: measure
            # again at the next call (docs/algorithm.md, "The authors' code over whole runs")
            return
        self.last_end = self.updates
        self.warm_measured |= self.averaged(hyper)


class LABPAL(torch.optim.Optimizer):
    """Large-batch parabolic approximation line search (Mutschler, Laube & Zell, 2021).

    ``loss = opt.step(closure)``: the closure runs the forward pass on its own batch and returns
    the mean loss as a scalar tensor, and must give that loss again when called again at the
    same parameters (measurements evaluate it at other points of the line; a closure that does
    not, e.g. one reading a loop variable that has moved on, is detected and stopped with an
    error). LABPAL runs ``backward()`` itself, unless the closure does (torch's convention:
    ``zero_grad(); loss.backward(); return loss``), which is accepted as well.

    Every argument but ``params`` is keyword-only; README "Hyper-parameters" gives the bounds.

    Args:
        params: the parameters, or parameter groups (dicts); per group only ``weight_decay``
            may be set.
        backend: "auto", "eager", "ext" or "triton" (README "Backends").
        model: the module trained: repeated evaluations leave its buffers (BatchNorm
            statistics) untouched; a DistributedDataParallel model's gradients are averaged
            once per update.
        process_group: the ranks that measure together under torch.distributed (default: the
            DDP ``model``'s group, else the default group when one is initialized; a group of
            one rank opts out).
        weight_decay: L2 weight decay, part of the objective the line measures.
        mode: "NSGD" (θ ← θ − s_upd·d/‖d‖) or "SGD" (θ ← θ − η·d, η from ``sgd_rate``).
        momentum: β in d ← β·d + ḡ.
        dataset_size: N, for the paper's noise factor ν = (128/batch_size)·(N/40000)
            (used by line_fit "paper" and "gradient"; the robust fit measures ν).
        batch_size: b, the batch of one closure call, for the paper's ν.
        noise_factor: ν set directly (None: measured by the first measurement with the
            robust fit, else the paper's; docs/algorithm.md "m from the measured noise").
        batch_size_schedule: (closure call, multiplier) pairs: from that call on,
            m = max(⌊multiplier·ν⌋, 1) closure calls are averaged per update.
        approximation_batches: k: a measurement takes k·m closure calls.
        reuse_updates: updates between two measurements (None: 200 in NSGD without momentum,
            else the paper's 1000; docs/algorithm.md "How often to measure").
        warmup_updates: measurements before this many updates are not averaged.
        averaging_window: after the warm-up, s_upd and η are the mean of this many
            measurements.
        sample_positions: the line positions measured (0 and at least two more).
        update_step_adaptation: α in s_upd = α·min(s_min, max_step_size).
        max_step_size: the clamp on the parabola's minimum.
        direction_norm_range: (low, high): a measurement is abandoned when ‖d‖ is outside.
        epsilon: the floor of s_upd, η and of ‖d‖ in divisions.
        replay_tolerance: the relative difference allowed when a measurement's first closure
            is evaluated again (None: no check, nor the late-binding checks, `binding`).
        lr_multiplier_schedule: (update, factor) points of a factor on the measured rate,
            linear between them.
        max_grad_norm: clips ḡ by its global L2 norm before it enters d (None: no clipping).
        line_fit: "robust", "gradient" or "paper": how the line is fitted, and when a fit is
            refused.
        resolve_positions: scale the positions to what the parameters' dtype and the loss
            resolve (None: on unless line_fit="paper").
        sgd_rate: SGD mode's η: "robust" (a running mean of ‖d‖) or "paper".
        step_check: measure the loss at the proposed step too and shrink the step where it is
            not below the measured samples (None: on unless line_fit="paper"; off under
            torch.distributed).
        momentum_correction: with momentum β, the measured step (and η) × (1 − β) (None: on
            unless line_fit="paper").
        max_step_shrink: with momentum_correction, after the warm-up a measurement divides the
            step in use by at most this factor (never proposing more than the line's step
            without the correction); None: no limit. An option for language models with
            momentum (docs/algorithm.md "The step's collapse with momentum").
        loss_scale: None, "dynamic" or a fixed scale S: the loss is multiplied by S before
            backward and the gradient divided by it (fp16).
        master_weights: fp32 master copies of fp16 / bf16 parameters (None: on for them, off
            for FSDP2 shards).
    """

    def __init__(self, params, *, backend: str = "auto", model: Optional[torch.nn.Module] = None,
                 process_group: Any = None, weight_decay: float = 0.0,
                 mode: str = "NSGD", momentum: float = 0.0,
                 dataset_size: int = 40000, batch_size: int = 128,
                 noise_factor: Optional[float] = None,
                 batch_size_schedule: Tuple[Tuple[int, float], ...] = (
                     (0, 1), (75000, 2), (112500, 4)),
                 approximation_batches: int = 10, reuse_updates: Optional[int] = None,
                 warmup_updates: int = 400, averaging_window: int = 25,
                 sample_positions: Tuple[float, ...] = (0.0, 1.77e-4, 0.01),
                 update_step_adaptation: float = 3.6, max_step_size: float = 0.5,
                 direction_norm_range: Tuple[float, float] = (1e-3, 100.0),
                 epsilon: float = 1e-6, replay_tolerance: Optional[float] = 1e-3,
                 lr_multiplier_schedule: Tuple[Tuple[int, float], ...] = ((0, 1.0),),
                 max_grad_norm: Optional[float] = None, line_fit: str = "robust",
                 resolve_positions: Optional[bool] = None, sgd_rate: str = "robust",
                 step_check: Optional[bool] = None,
                 momentum_correction: Optional[bool] = None,
                 max_step_shrink: Optional[float] = None,
                 loss_scale: Union[None, str, float] = None,
                 master_weights: Optional[bool] = None,
                 **unknown: Any):
        arguments = locals()  # the hyper-parameters: `Hyper` checks them (tests/test_signature.py)
        if unknown:
            raise TypeError(f"LABPAL got unknown hyper-parameter(s) {sorted(unknown)}; "
                            f"known: {', '.join(NAMES)}")
        self.hyper = Hyper(**{name: arguments[name] for name in NAMES})
        weight_decay = guards.weight_decay(weight_decay, "weight_decay")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        super().__init__(params, {"weight_decay": weight_decay})
        trained = self._checked_groups()
        place = shards.Placement(trained, model)  # FSDP2: the flats become its sharded storage
        self.ops = place.ops(backends.resolve(backend, {p.device for p in trained}))
        self.backend = self.ops.name
        # the flats point p.data and p.grad into their buffers: put them back if anything fails
        # here, so a failed construction leaves the model as it was
        try:
            self.flats: List[Flat] = build_flats(self.param_groups, place.slot_of,
                                                 self.hyper.master_weights)
            self._device = self.flats[0].device
            self._measuring = Measuring(self.hyper, self.flats, self.ops, model, process_group,
                                        trained)
        except BaseException:
            place.undo()
            raise
        self.line: Line = self._measuring.line
        self._dist, self._calls = self._measuring.dist, self._measuring.calls
        # ν from the first measurement (docs/algorithm.md "m from the measured noise"); under
        # torch.distributed the paper's ν (not yet checked to agree with one process)
        self._measures_noise = self.hyper.measures_noise and self._dist is None
        self.rate = guards.Rate(self.param_groups, self.hyper)  # param_groups' 'lr'
        # which parameters the flats hold: a change of requires_grad is refused at the next step
        self._requires_grad = tuple(p.requires_grad for p in self._params)
        self.counters = Counters()
        self._measurement: Optional[Measurement] = None  # held exactly while one runs
        self._records: List[Dict[str, Any]] = []
        self._stepping: Optional[int] = None  # the thread running step() (not re-entrant)
        self._broken: Optional[str] = None  # why steps are refused (a step left half-made)
        self._failures = 0  # measurements in a row that gave no rate while none exists
        self._warned_fallback = False

    def _checked_groups(self) -> List[torch.Tensor]:
        """The groups torch made, checked, their 'lr' kept from schedulers (`guards.Group`);
        returns the parameters to train (those that require grad)."""
        self.param_groups = [guards.Group(group) for group in self.param_groups]
        guards.check_groups(self.param_groups, NAMES)
        self._params = [p for group in self.param_groups for p in group["params"]]
        self._param_ids = frozenset(map(id, self._params))  # not batches (`binding.record`)
        trained = [p for p in self._params if p.requires_grad]
        if not trained:
            raise ValueError("params: LABPAL got no parameter that requires grad")
        return trained

    # ------------------------------------------------------------------ public
    @property
    def phase(self) -> str:
        """"training" or "measuring" (a measurement is collecting its batches)."""
        return TRAINING if self._measurement is None else MEASURING

    @property
    def updates(self) -> int:
        return self.counters.updates

    @property
    def repeating(self) -> bool:
        """True while a measurement evaluates its kept closures again (at other line positions,
        or at the origin to check they repeat): code in a closure can skip logging then."""
        return self._measurement is not None and self._measurement.repeating

    @property
    def multiplier(self) -> int:
        """m, the number of closure calls averaged into one update (0 before the first call)."""
        return self.counters.m

    @property
    def lr_tensor(self) -> torch.Tensor:
        """The rate of the last update as applied to d, live: a 0-dim fp64 device tensor that
        every update overwrites in place (reading it syncs). NSGD: s_upd/‖d‖; SGD: η (robust:
        that update's s_upd/n̄ capped). param_groups[i]['lr'] is the measured rate as a Python
        float (README, "Learning-rate schedules")."""
        return self.line.lr

    @property
    def grad_norm(self) -> torch.Tensor:
        """‖ḡ‖, the global L2 norm of the averaged loss gradient of the last direction formed,
        before clipping: a 0-dim fp64 device tensor that the next direction overwrites (clone it
        to keep it; reading it syncs). NaN when max_grad_norm is None (not computed) and before
        the first direction."""
        return self.line.grad_norm

    @property
    def state(self) -> Dict[torch.Tensor, Dict[str, torch.Tensor]]:
        """Per trained parameter, live views of LABPAL's buffers (read them; writes to the
        mapping are not kept): `momentum_buffer` (the direction d, momentum > 0; else
        `direction`), `master_weights` (fp32, for fp16 / bf16 parameters), `grad_sum` (the
        gradients summed toward an update, once m > 1 made it). `state_dict()` is the
        checkpoint (`checkpoint.live_state`)."""
        return checkpoint.live_state(self) if "flats" in vars(self) else {}

    @state.setter
    def state(self, value: Any) -> None:
        pass  # torch.optim.Optimizer.__init__ sets an empty one: LABPAL's is its buffers

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
        self._calls.scaled = True
        return self.line.scaled(loss)

    # torch.amp.GradScaler.step then leaves the loss scaling to the optimizer: it sets
    # `found_inf` on it and calls step() directly, which refuses (`guards.refuse_grad_scaled`)
    _step_supports_amp_scaling = True

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """One closure call: returns its loss (detached). Updates when m calls are averaged.

        If it raises (in the closure, backward, an op, or on Ctrl-C), the parameters are bit
        for bit as before the call or as after it, and stepping can go on (docs/algorithm.md)."""
        if "found_inf" in vars(self) or "grad_scale" in vars(self):
            guards.refuse_grad_scaled(self)
        if closure is None or not callable(closure):
            raise TypeError("LABPAL.step() needs a closure: a function that runs the forward "
                            "pass on its batch and returns the mean loss (LABPAL calls backward "
                            "itself, unless the closure does); it is called again during "
                            "measurements, so a loop of `loss.backward(); opt.step()` cannot "
                            "work: wrap the forward pass in a closure")
        if torch.compiler.is_compiling():
            guards.refuse_compile()
        self._check_can_step()
        self._calls.refuse_outside_gradients()  # Lightning accumulating without the callback
        self.rate.take_assigned()  # ReduceLROnPlateau's lr, as a factor on the measured rate
        self._stepping = threading.get_ident()
        try:
            for flat in self.flats:
                flat.attach_params()
            c = self.counters
            if self._measurement is not None:
                return steps.measure_call(self, closure, c.m)
            m, start = self._boundary() if c.acc == 0 else (c.m, False)
            if start:
                return steps.measure_call(self, closure, m)
            return steps.train_call(self, closure, m)
        finally:
            self._stepping = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Accelerate's fp16 wrapper (AcceleratedOptimizer with a GradScaler) replaces step()
        # right before scaler.step(opt, closure): refused here with the fix
        if name == "step" and getattr(value, "__module__", "").startswith("accelerate"):
            guards.refuse_grad_scaler()
        super().__setattr__(name, value)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the flat gradient buffer (gradients stay views into it, never None)."""
        self._calls.forget_outside_gradients()
        with torch.no_grad():
            for flat in self.flats:
                flat.attach_grads()
                flat.clear_model_grads()
                self.ops.zero_grad(flat)

    def measurements(self) -> List[Dict[str, Any]]:
        """One record per measurement, as Python numbers (this reads device values)."""
        return [record_to_python(r, self.hyper) for r in self._records]

    def __getstate__(self):  # what pickle, copy.copy and copy.deepcopy ask for
        raise TypeError(guards.NOT_COPYABLE)

    def __del__(self):
        # vars(), not getattr: a wrapper that imitates LABPAL's class (Lightning's
        # LightningOptimizer) inherits __del__ and forwards getattr to the LABPAL it wraps
        calls = vars(self).get("_calls")
        if calls is not None:
            calls.remove_hooks()

    # ------------------------------------------------------------------ phases
    def _check_can_step(self) -> None:
        if self._stepping is not None:
            self._refuse_if_stepping()
        if self._broken is not None:
            raise RuntimeError(self._broken)
        if tuple(p.requires_grad for p in self._params) != self._requires_grad:
            guards.refuse_requires_grad_change(self._params, self._requires_grad)

    def _refuse_if_stepping(self) -> None:
        """The flag says a step() runs: refused if one of this optimizer's does, on this thread
        (called from its closure) or on another. Else the flag is stale (a Ctrl-C delivered as
        step() cleared it: CPython runs the handler between any two bytecodes) and is cleared.
        Only on this rare path are stacks read."""
        holder, here = self._stepping, threading.get_ident()
        frame = sys._getframe() if holder == here else sys._current_frames().get(holder)
        running = 0
        while frame is not None:
            running += frame.f_code is _STEP_CODE and frame.f_locals.get("self") is self
            frame = frame.f_back
        if holder == here and running > 1:  # this call's own step() frame is one
            raise RuntimeError("LABPAL.step() was called while a step was running (from its "
                               "closure?): a closure only runs the forward pass and returns the "
                               "loss; call step() once per batch, outside the closure")
        if holder != here and running:
            raise RuntimeError(f"LABPAL.step() was called on thread {here} while thread {holder} "
                               "runs a step of this optimizer: step() is not thread-safe; call "
                               "it from one thread at a time")
        self._stepping = None

    def _boundary(self) -> Tuple[int, bool]:
        """Start of an update's accumulation: m as the schedule says now, and whether a
        measurement starts (both applied by the call's commit, so a failed call changes none)."""
        c = self.counters
        m = self.hyper.multiplier_at(c.calls, self._calls.ranks, c.noise, self._measures_noise)
        return m, self.counters.measure_now(m, self.hyper)

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict) -> None:
        """Only while constructing (`Optimizer.__init__` adds the groups)."""
        if getattr(self, "flats", None) is not None:
            raise RuntimeError("LABPAL cannot add parameter groups after construction: its flat "
                               "buffers and the line span all groups; pass every group up front")
        super().add_param_group(param_group)

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue bit for bit (`checkpoint.state_dict`). Saved while a
        measurement collects its batches (closures cannot be saved), the state resumes by
        starting that measurement over. torch's state-dict hooks run as on any optimizer."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores a state saved by `state_dict` from an optimizer over the same parameters.

        The whole state is checked first (`checkpoint.check`): a damaged or foreign one raises
        ValueError naming the entry and leaves the optimizer and the parameters as they were.
        torch's load-state-dict hooks run as on any optimizer."""
        checkpoint.load_state_dict(self, state_dict)


# the code of LABPAL.step itself, as torch's Optimizer wraps `step` in the class once an
# instance exists (`LABPAL._refuse_if_stepping` looks for frames running it)
_STEP_CODE = vars(LABPAL)["step"].__code__
