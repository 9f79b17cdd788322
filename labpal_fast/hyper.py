"""LABPAL's public hyper-parameters: names, defaults, bounds, validation (docs/algorithm.md).

Every value is checked against the bounds below when a `Hyper` is made, and stored as a Python
int / float / tuple (numpy scalars are accepted and converted), so nothing out of range reaches
the device or a kernel's arguments.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Tuple, Union

MODES = ("SGD", "NSGD")
# line_fit (docs/algorithm.md "The robust fit"): "robust" (least squares over every sample,
# refused only when the line is not a descending parabola), "gradient" (the same, with the slope
# at 0 taken from the averaged gradient) or "paper" (the paper's fit and refusals)
LINE_FITS = ("robust", "gradient", "paper")
# SGD mode's η: "robust" = s_upd / (running mean of ‖d‖ over training updates); "paper" =
# s_upd / ‖d‖ of the measurement's direction (docs/algorithm.md, "SGD mode")
SGD_RATES = ("robust", "paper")

# Bounds (README "Hyper-parameters" lists them). They refuse typos and values that overflow or
# allocate without limit, not unusual settings; each says why it is where it is.
# Counts of samples, calls and updates: beyond any run, and exact in float64 (< 2**53), so the
# noise factor and the schedule's comparisons stay exact.
MAX_COUNT = 10**12
# m, closure calls averaged into one update: a measurement keeps its k·m closures (and their
# batches) alive, and m is the host's accumulation counter.
MAX_MULTIPLIER = 10_000
# k, likewise: k·m closures kept per measurement.
MAX_APPROXIMATION_BATCHES = 10_000
# two fp64 histories of this length on the device; Triton's fit reduces them in one program.
MAX_AVERAGING_WINDOW = 10_000
# entries of batch_size_schedule: scanned at every update boundary.
MAX_SCHEDULE_ENTRIES = 1_000
# each position costs k·m closure evaluations per measurement; Triton fits them in one block.
MAX_POSITIONS = 64
# positions are distances along d/‖d‖ in parameter space (the defaults reach 0.01); 1e3 is far
# beyond any line worth measuring.
MAX_POSITION = 1e3
# s_upd = α·min(s_min, max_step_size) (3.6 and 0.5 reproduce the reference): with these two
# bounds s_upd <= 1e4, a finite move even in fp16 (largest value 65504).
MAX_ADAPTATION = 100.0
MAX_STEP_SIZE = 100.0
# max_step_shrink: a factor of 1 keeps the step in use (up to the line's own step); 1e6 is
# no limit in practice (the correction alone divides by 1/(1 − β) at most ~1e6 for β < 1 − 1e-6)
MAX_STEP_SHRINK = 1e6
# the floor of s_upd, η and of ‖d‖ in divisions: any larger, it would override measured steps.
MAX_EPSILON = 1e-2
# lr_multiplier_schedule: factors on the measured rate; 1000× is beyond any sensible boost and
# keeps s_upd·factor <= 1e7, finite in fp32 moves.
MAX_LR_MULTIPLIER = 1000.0
# ν is (128/b)·(N/40000) <= 3.2e9 within the bounds above when derived; set directly, the same
# order; the schedule's bound on m is what limits it in practice.
MAX_NOISE_FACTOR = 1e12
# max_grad_norm (clipping of ḡ by its global L2 norm): any positive size; 1e12 is far above any
# gradient norm worth clipping to, and keeps max_grad_norm / (‖ḡ‖ + 1e-6) finite in fp64.
MAX_GRAD_NORM = 1e12
# loss_scale: a fixed scale up to 2**64 (the dynamic one grows no further): 1/S is still a normal
# fp32 number, and any loss below 1e270 times it is finite in fp64.
MAX_LOSS_SCALE = 2.0 ** 64
# the dynamic loss scale: its start (GradScaler's init_scale) and the finite updates in a row
# after which it doubles (GradScaler's growth_interval); an overflow halves it
# m from the measured gradient noise (noise_factor=None with the robust fit, docs/algorithm.md
# "m from the measured noise"): ν = ρ·(1 − β)/(1 + β)/NOISE_PER_UPDATE, ρ the noise-to-signal
# ratio of one batch's gradient along d, estimated by the first measurement and again by each
# one after the warm-up (ν only grows), (1 − β)/(1 + β) what is left of it in a momentum
# direction; so m = ⌊ν⌋ calls keep an update's direction at most about NOISE_PER_UPDATE times
# as noisy as it is informative.
NOISE_PER_UPDATE = 3.0
# reuse_updates=None: updates between two measurements. In NSGD without momentum a measured step
# is followed every 200 updates; with momentum, in SGD mode and with line_fit="paper" the paper's
# 1000: measured on the quality suite and the built-in charlm, docs/algorithm.md "How often to
# measure"
PAPER_REUSE_UPDATES = 1000
REUSE_UPDATES = 200
# ρ beyond this counts as this, and so does no signal seen at all (the slope of the line all
# noise): one early estimate may not take more than m = 4 of a run's calls per update (at 16
# on unseen CNN, LSTM and regression tasks, seeds ended at chance: docs/algorithm.md)
MAX_MEASURED_RATIO = 12.0
LOSS_SCALE_INIT = 2.0 ** 16
LOSS_SCALE_GROWTH_INTERVAL = 2000


@dataclass(frozen=True)
class Hyper:
    mode: str = "NSGD"
    momentum: float = 0.0
    dataset_size: int = 40000
    batch_size: int = 128
    noise_factor: Optional[float] = None
    batch_size_schedule: Tuple[Tuple[int, float], ...] = ((0, 1), (75000, 2), (112500, 4))
    approximation_batches: int = 10
    # None: REUSE_UPDATES in NSGD without momentum, else the paper's PAPER_REUSE_UPDATES
    # (docs/algorithm.md "How often to measure")
    reuse_updates: Optional[int] = None
    warmup_updates: int = 400
    averaging_window: int = 25
    sample_positions: Tuple[float, ...] = (0.0, 1.77e-4, 0.01)
    update_step_adaptation: float = 3.6
    max_step_size: float = 0.5
    direction_norm_range: Tuple[float, float] = (1e-3, 100.0)
    epsilon: float = 1e-6
    replay_tolerance: Optional[float] = 1e-3
    lr_multiplier_schedule: Tuple[Tuple[int, float], ...] = ((0, 1.0),)
    max_grad_norm: Optional[float] = None  # None: no clipping
    line_fit: str = "robust"
    # positions × a device factor so the smallest moves coordinates by many ulps of their dtype;
    # None: on unless line_fit="paper" (sample_positions taken literally)
    resolve_positions: Optional[bool] = None
    sgd_rate: str = "robust"
    # the loss measured at the proposed step itself, which shrinks it where it is not below
    # ℓ(0) (docs/algorithm.md "The step check"); None: on unless line_fit="paper"
    step_check: Optional[bool] = None
    # with momentum β, s_upd (and η) × (1 − β): the updates along a direction that momentum
    # keeps add up to the measured step (docs/algorithm.md); None: on unless line_fit="paper"
    momentum_correction: Optional[bool] = None
    # with momentum_correction after the warm-up: a measurement divides the step in use by at
    # most this factor, and never proposes more than the line's own step without the correction
    # (docs/algorithm.md "The step's collapse with momentum"); None: no limit (the measured
    # step × (1 − β))
    max_step_shrink: Optional[float] = None
    # None: no loss scaling; "dynamic": GradScaler's rule on the device; a number: that scale
    loss_scale: Union[None, str, float] = None
    # fp32 master weights for fp16 / bf16 parameters; None: on for them (off for FSDP2 shards)
    master_weights: Optional[bool] = None

    def __post_init__(self):
        _validate(self)

    @property
    def initial_loss_scale(self) -> float:
        """The loss scale S at the start: 1 (no scaling), GradScaler's 2**16 (dynamic), or the
        fixed one."""
        if self.loss_scale is None:
            return 1.0
        return LOSS_SCALE_INIT if self.loss_scale == "dynamic" else float(self.loss_scale)

    @property
    def nu(self) -> float:
        """The noise factor: explicit, or (128/b)·(N/40000)."""
        return self.noise_for(1)

    @property
    def measures_noise(self) -> bool:
        """Whether ν comes from the first measurement (`noise_factor` None, the robust fit over
        at least 2 batches) rather than from dataset_size and batch_size (the paper's rule)."""
        return (self.noise_factor is None and self.line_fit == "robust"
                and self.approximation_batches >= 2)

    def noise_for(self, ranks: int) -> float:
        """ν by the paper's rule when `ranks` data-parallel processes each evaluate a batch of
        batch_size per closure call: explicit, or (128/(ranks·b))·(N/40000), the global batch
        being ranks·b."""
        if self.noise_factor is not None:
            return float(self.noise_factor)
        return (128.0 / (ranks * self.batch_size)) * (self.dataset_size / 40000.0)

    @property
    def schedule(self) -> Tuple[Tuple[int, int], ...]:
        """(closure call, m) pairs sorted by call, m = max(floor(multiplier·ν), 1)."""
        return self.schedule_for(1)

    def schedule_for(self, ranks: int, measured: Optional[float] = None,
                     measures: Optional[bool] = None) -> Tuple[Tuple[int, int], ...]:
        """The schedule with ν measured (`measures`, default `measures_noise`; `measured` None:
        not yet, m = 1) or the paper's."""
        on = self.measures_noise if measures is None else measures
        nu = (measured or 0.0) if on else self.noise_for(ranks)
        return tuple(sorted((int(c), max(int(math.floor(mult * nu)), 1))
                            for c, mult in self.batch_size_schedule))

    def multiplier_at(self, call: int, ranks: int = 1, measured: Optional[float] = None,
                      measures: Optional[bool] = None) -> int:
        """m in force from closure call `call` on (0-based): the last entry at or before it
        (`ranks`: data-parallel processes, see `noise_for`; `measured`, `measures`: ν measured,
        see `schedule_for`)."""
        m = 1
        for start, mult in self.schedule_for(ranks, measured, measures):
            if start <= call:
                m = mult
        return m

    def lr_multiplier_at(self, update: int) -> float:
        """The factor on the measured rate at update `update` (0-based): the schedule's points
        joined by straight lines, flat before the first and after the last."""
        points = self.lr_multiplier_schedule
        if update <= points[0][0]:
            return points[0][1]
        for (u0, f0), (u1, f1) in zip(points, points[1:]):
            if update < u1:
                return f0 + (f1 - f0) * (update - u0) / (u1 - u0)
        return points[-1][1]

    def measured_noise(self, ratio: float, before: Optional[float] = None) -> float:
        """ν from ρ, the noise-to-signal ratio of one update's gradient a measurement saw
        (`Line.noise_ratio`, NaN where it saw no signal; at most MAX_MEASURED_RATIO):
        ρ·(1 − β)/(1 + β)/NOISE_PER_UPDATE, bounded so that every schedule entry keeps m within
        MAX_MULTIPLIER, and never below ν `before` (the noise grows as the loss falls; one low
        reading does not undo the averaging). A momentum direction averages the gradients of
        about (1 + β)/(1 − β) updates, which leaves (1 − β)/(1 + β) of one batch's ratio in it."""
        ratio = MAX_MEASURED_RATIO if not math.isfinite(ratio) else min(max(ratio, 0.0),
                                                                          MAX_MEASURED_RATIO)
        left = (1.0 - self.momentum) / (1.0 + self.momentum)
        largest = max(mult for _, mult in self.batch_size_schedule)
        nu = min(ratio * left / NOISE_PER_UPDATE, MAX_MULTIPLIER / largest)
        return nu if before is None else max(nu, before)

    @property
    def resolving(self) -> bool:
        """Whether positions are scaled to what the parameters' dtype resolves."""
        if self.resolve_positions is None:
            return self.line_fit != "paper"
        return self.resolve_positions

    @property
    def reuse(self) -> int:
        """Updates between two measurements: `reuse_updates`, or its default by mode and
        momentum."""
        if self.reuse_updates is not None:
            return self.reuse_updates
        plain = self.line_fit != "paper" and self.mode == "NSGD" and self.momentum == 0
        return REUSE_UPDATES if plain else PAPER_REUSE_UPDATES

    @property
    def checking(self) -> bool:
        """Whether the proposed step is measured before it is taken (`step_check`)."""
        if self.step_check is None:
            return self.line_fit != "paper"
        return self.step_check

    @property
    def step_factor(self) -> float:
        """The factor of every measured step for momentum (`momentum_correction`): 1 − β, or 1."""
        on = self.line_fit != "paper" if self.momentum_correction is None else \
            self.momentum_correction
        return 1.0 - self.momentum if on else 1.0

    @property
    def line_positions(self) -> Tuple[float, ...]:
        """Distinct sample positions, 0 first, then the others in the order given."""
        out = [0.0]
        for s in self.sample_positions:
            if float(s) not in out:
                out.append(float(s))
        return tuple(out)

    def as_dict(self) -> dict:
        return asdict(self)


NAMES = tuple(f.name for f in fields(Hyper))


def _interval(low, high, low_open, high_open) -> str:
    return f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def number(name: str, value: Any, low, high, *, integer: bool = False, low_open: bool = False,
            high_open: bool = False):
    """`value` as a Python int (integer) or float within the bounds, else a ValueError naming
    `name` and them. Python and numpy numbers are accepted; bool, strings, arrays are not."""
    kind = "a whole number" if integer else "a number"
    expected = f"{name} must be {kind} in {_interval(low, high, low_open, high_open)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{expected}, got {value!r} ({type(value).__name__})")
    try:  # ints compare exactly, whatever their size; huge Fractions overflow float
        v = int(value) if isinstance(value, numbers.Integral) else float(value)
    except OverflowError:
        v = math.inf
    inside = (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
    if not inside or (integer and v != int(v)):  # NaN fails every comparison
        raise ValueError(f"{expected}, got {value!r}")
    return int(v) if integer else float(v)


def _items(name: str, value: Any, what: str) -> tuple:
    """A sequence as a tuple (a string or a scalar is not one)."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of {what}, got {value!r}")
    try:
        return tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of {what}, got {value!r}") from None


def _pairs(name: str, value: Any, point: str) -> list:
    """A schedule's (point, multiplier) pairs as tuples, 1 to MAX_SCHEDULE_ENTRIES of them (the
    numbers are checked by the caller)."""
    entries = _items(name, value, f"({point}, multiplier) pairs")
    pairs = [_items(f"{name} entry", e, "2 numbers") for e in entries]
    if not 1 <= len(pairs) <= MAX_SCHEDULE_ENTRIES or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{name} must be 1 to {MAX_SCHEDULE_ENTRIES} ({point}, multiplier) "
                         f"pairs, got {value!r}")
    return pairs


def _choice(name: str, value: Any, options: Tuple[str, ...]) -> str:
    """One of `options` as a Python str (numpy's str too), else a ValueError naming `name`."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return str(value)


def _switch(name: str, value: Any, auto: str) -> Optional[bool]:
    """None, True or False (numpy's bool too) as a Python value, else a ValueError naming `name`
    (`auto` says what None means)."""
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"):
        return bool(value)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be True, False or None (None: {auto}), got {value!r}")
    return value


def _validate(h: Hyper) -> None:
    def set_(name, value):  # normalised values on the frozen instance
        object.__setattr__(h, name, value)

    set_("mode", _choice("mode", h.mode, MODES))
    set_("line_fit", _choice("line_fit", h.line_fit, LINE_FITS))
    set_("resolve_positions", _switch("resolve_positions", h.resolve_positions,
                                      "on unless line_fit='paper'"))
    set_("sgd_rate", _choice("sgd_rate", h.sgd_rate, SGD_RATES))
    set_("step_check", _switch("step_check", h.step_check, "on unless line_fit='paper'"))
    set_("momentum_correction", _switch("momentum_correction", h.momentum_correction,
                                        "on unless line_fit='paper'"))
    # β < 1: d = β·d + ḡ stays bounded
    set_("momentum", number("momentum", h.momentum, 0.0, 1.0, high_open=True))
    if h.max_step_shrink is not None:
        set_("max_step_shrink", number("max_step_shrink", h.max_step_shrink, 1.0,
                                        MAX_STEP_SHRINK))
        if h.step_factor == 1.0:  # it would change nothing: say so instead of ignoring it
            raise ValueError(
                "max_step_shrink limits how far a measurement shrinks the step of momentum's "
                f"correction, which is off here (momentum={h.momentum}, momentum_correction="
                f"{h.momentum_correction}, line_fit={h.line_fit!r}); set momentum > 0 with "
                "momentum_correction on (None, not with line_fit='paper'), or leave "
                "max_step_shrink None")
    for name in ("dataset_size", "batch_size"):
        set_(name, number(name, getattr(h, name), 1, MAX_COUNT, integer=True))
    if h.reuse_updates is not None:
        set_("reuse_updates", number("reuse_updates", h.reuse_updates, 0, MAX_COUNT, integer=True))
    set_("warmup_updates", number("warmup_updates", h.warmup_updates, 0, MAX_COUNT, integer=True))
    if h.noise_factor is not None:
        set_("noise_factor", number("noise_factor", h.noise_factor, 0.0, MAX_NOISE_FACTOR,
                                     low_open=True))
    set_("approximation_batches", number("approximation_batches", h.approximation_batches,
                                          1, MAX_APPROXIMATION_BATCHES, integer=True))
    set_("averaging_window", number("averaging_window", h.averaging_window,
                                     1, MAX_AVERAGING_WINDOW, integer=True))
    set_("update_step_adaptation", number("update_step_adaptation", h.update_step_adaptation,
                                           0.0, MAX_ADAPTATION, low_open=True))
    set_("max_step_size", number("max_step_size", h.max_step_size, 0.0, MAX_STEP_SIZE,
                                  low_open=True))
    set_("epsilon", number("epsilon", h.epsilon, 0.0, MAX_EPSILON, low_open=True))
    if h.replay_tolerance is not None:  # None: the check (one forward per measurement) is off
        set_("replay_tolerance", number("replay_tolerance", h.replay_tolerance, 0.0, 1.0))
    if h.max_grad_norm is not None:
        set_("max_grad_norm", number("max_grad_norm", h.max_grad_norm, 0.0, MAX_GRAD_NORM,
                                      low_open=True))

    if isinstance(h.loss_scale, str) and h.loss_scale == "dynamic":
        set_("loss_scale", "dynamic")
    elif h.loss_scale is not None:
        if isinstance(h.loss_scale, str):
            raise ValueError(f"loss_scale must be None, 'dynamic' or a number in (0, "
                             f"{MAX_LOSS_SCALE:g}], got {h.loss_scale!r}")
        set_("loss_scale", number("loss_scale", h.loss_scale, 0.0, MAX_LOSS_SCALE,
                                   low_open=True))
    set_("master_weights", _switch("master_weights", h.master_weights,
                                   "on for fp16 / bf16 parameters"))

    pairs = _pairs("batch_size_schedule", h.batch_size_schedule, "call")
    schedule = tuple(
        (number("batch_size_schedule call", c, 0, MAX_COUNT, integer=True),
         number("batch_size_schedule multiplier", mult, 0.0, MAX_COUNT, low_open=True))
        for c, mult in pairs)
    if len({c for c, _ in schedule}) != len(schedule):
        raise ValueError(f"batch_size_schedule lists a call twice: {h.batch_size_schedule!r}")
    set_("batch_size_schedule", schedule)
    for call, mult in schedule:  # m = max(⌊mult·ν⌋, 1), compared before it becomes an int
        if not mult * h.nu < MAX_MULTIPLIER + 1:
            raise ValueError(
                f"batch_size_schedule entry ({call}, {mult}) gives m = ⌊{mult}·ν⌋ = "
                f"{mult * h.nu:.0f} with ν = {h.nu:g} (noise_factor, or "
                f"(128/batch_size)·(dataset_size/40000)); m must be at most {MAX_MULTIPLIER} "
                "closure calls per update")

    pairs = _pairs("lr_multiplier_schedule", h.lr_multiplier_schedule, "update")
    points = tuple(
        (number("lr_multiplier_schedule update", u, 0, MAX_COUNT, integer=True),
         number("lr_multiplier_schedule multiplier", f, 0.0, MAX_LR_MULTIPLIER))
        for u, f in pairs)
    if any(b[0] <= a[0] for a, b in zip(points, points[1:])):
        raise ValueError("lr_multiplier_schedule updates must increase strictly, got "
                         f"{h.lr_multiplier_schedule!r}")
    set_("lr_multiplier_schedule", points)

    positions = tuple(number("sample_positions", s, 0.0, MAX_POSITION)
                      for s in _items("sample_positions", h.sample_positions, "numbers"))
    if 0.0 not in positions or len(set(positions)) < 3 or len(positions) > MAX_POSITIONS:
        raise ValueError(f"sample_positions must hold 0 and at least 3 distinct values, at most "
                         f"{MAX_POSITIONS} in all, got {h.sample_positions!r}")
    set_("sample_positions", positions)

    pair = _items("direction_norm_range", h.direction_norm_range, "2 numbers")
    if len(pair) != 2:
        raise ValueError("direction_norm_range must be a pair (low, high) with 0 <= low < high "
                         f"(high may be inf), got {h.direction_norm_range!r}")
    low = number("direction_norm_range low", pair[0], 0.0, math.inf, high_open=True)
    high = number("direction_norm_range high", pair[1], low, math.inf, low_open=True)
    set_("direction_norm_range", (low, high))
