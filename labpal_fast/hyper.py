"""LABPAL's public hyper-parameters: names, defaults, validation (docs/algorithm.md)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

MODES = ("SGD", "NSGD")


@dataclass(frozen=True)
class Hyper:
    mode: str = "NSGD"
    momentum: float = 0.0
    dataset_size: int = 40000
    batch_size: int = 128
    noise_factor: Optional[float] = None
    batch_size_schedule: Tuple[Tuple[int, float], ...] = ((0, 1), (75000, 2), (112500, 4))
    approximation_batches: int = 10
    reuse_updates: int = 1000
    warmup_updates: int = 400
    averaging_window: int = 25
    sample_positions: Tuple[float, ...] = (0.0, 1.77e-4, 0.01)
    update_step_adaptation: float = 3.6
    max_step_size: float = 0.5
    direction_norm_range: Tuple[float, float] = (1e-3, 100.0)
    epsilon: float = 1e-6

    def __post_init__(self):
        _validate(self)

    @property
    def nu(self) -> float:
        """The noise factor: explicit, or (128/b)·(N/40000)."""
        if self.noise_factor is not None:
            return float(self.noise_factor)
        return (128.0 / self.batch_size) * (self.dataset_size / 40000.0)

    @property
    def schedule(self) -> Tuple[Tuple[int, int], ...]:
        """(closure call, m) pairs sorted by call, m = max(floor(multiplier·ν), 1)."""
        return tuple(sorted((int(c), max(int(math.floor(mult * self.nu)), 1))
                            for c, mult in self.batch_size_schedule))

    def multiplier_at(self, call: int) -> int:
        """m in force from closure call `call` on (0-based): the last entry at or before it."""
        m = 1
        for start, mult in self.schedule:
            if start <= call:
                m = mult
        return m

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


def _number(name, value, *, integer=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if integer and int(value) != value:
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _validate(h: Hyper) -> None:
    set_ = object.__setattr__  # normalise sequences to tuples on the frozen instance
    if h.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {h.mode!r}")
    if not 0.0 <= _number("momentum", h.momentum) < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {h.momentum!r}")
    for name in ("dataset_size", "batch_size", "approximation_batches", "averaging_window"):
        if _number(name, getattr(h, name), integer=True) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(h, name)!r}")
    for name in ("reuse_updates", "warmup_updates"):
        if _number(name, getattr(h, name), integer=True) < 0:
            raise ValueError(f"{name} must be at least 0, got {getattr(h, name)!r}")
    if h.noise_factor is not None and _number("noise_factor", h.noise_factor) <= 0:
        raise ValueError(f"noise_factor must be positive or None, got {h.noise_factor!r}")
    for name in ("update_step_adaptation", "max_step_size", "epsilon"):
        if _number(name, getattr(h, name)) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(h, name)!r}")

    try:
        schedule = tuple((entry[0], entry[1]) for entry in h.batch_size_schedule
                         if len(entry) == 2)
        complete = len(schedule) == len(tuple(h.batch_size_schedule))
    except TypeError:
        complete = False
    if not complete or not schedule:
        raise ValueError("batch_size_schedule must be a non-empty sequence of (call, multiplier) "
                         f"pairs, got {h.batch_size_schedule!r}")
    for call, mult in schedule:
        if _number("batch_size_schedule call", call, integer=True) < 0:
            raise ValueError(f"batch_size_schedule calls must be >= 0, got {call!r}")
        if _number("batch_size_schedule multiplier", mult) <= 0:
            raise ValueError(f"batch_size_schedule multipliers must be positive, got {mult!r}")
    if len({int(c) for c, _ in schedule}) != len(schedule):
        raise ValueError(f"batch_size_schedule lists a call twice: {h.batch_size_schedule!r}")
    set_(h, "batch_size_schedule", tuple((int(c), m) for c, m in schedule))

    try:
        positions = tuple(float(_number("sample_positions", s)) for s in h.sample_positions)
    except TypeError:
        raise ValueError(f"sample_positions must be a sequence of numbers, "
                         f"got {h.sample_positions!r}") from None
    if 0.0 not in positions or any(s < 0 for s in positions) or len(set(positions)) < 3:
        raise ValueError("sample_positions must contain 0, at least 3 distinct values, all >= 0; "
                         f"got {h.sample_positions!r}")
    set_(h, "sample_positions", positions)

    pair = tuple(h.direction_norm_range) if isinstance(h.direction_norm_range, (tuple, list)) else ()
    if (len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in pair)
            or not (0.0 <= pair[0] < pair[1]) or not math.isfinite(pair[0])):
        raise ValueError("direction_norm_range must be a pair (low, high) with 0 <= low < high "
                         f"(high may be inf), got {h.direction_norm_range!r}")
    set_(h, "direction_norm_range", (float(pair[0]), float(pair[1])))
