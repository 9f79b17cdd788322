"""A measurement while it runs: what it keeps from call to call, and what its record says.

`LABPAL` holds a `Measurement` exactly while one runs (it is measuring iff it holds one): the
call that starts a measurement makes it, and whatever ends the measurement (a fit, an abandon,
a fault, `load_state_dict`) drops it, so nothing of one measurement reaches the next. What
outlives it is in the optimizer's `Counters` (saved in a state_dict) and in its record, which
`record_to_python` turns into what `LABPAL.measurements()` returns.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch

from .hyper import Hyper
from .layout import Partial
from .replay import RngState

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


class Measurement:
    """The kept closures and the facts a measurement's later calls need (module doc)."""

    def __init__(self, total: int, compute_eps: float):
        self.total = total                # k·m calls, one kept closure each
        self.compute_eps = compute_eps    # autocast's epsilon in the first call (resolve_positions)
        self.closures: List[Callable] = []
        self.rngs: List[RngState] = []    # the random state before each closure's call
        self.own_backward: List[bool] = []  # per kept closure: it runs backward() itself
        self.first_loss: Optional[torch.Tensor] = None  # the first call's loss sample
        self.formed = False               # the direction is formed (the old d kept in origin)
        # set by call k·m, when the line's origin is saved: the random state after that call,
        # to restore after the line evaluations (`Measuring.finish`, `Measuring.abort`)
        self.line_rng: Optional[RngState] = None
        self.reduced = False              # its collective was entered (torch.distributed)
        self.repeating = False            # the kept closures are being evaluated again

    @property
    def calls(self) -> int:
        """Calls made in this measurement (each keeps its closure)."""
        return len(self.closures)

    def keep(self, closure: Callable, rng: RngState, own_backward: bool,
             loss: torch.Tensor) -> None:
        """A call of this measurement: its closure, its random state and its loss at θ₀."""
        if not self.closures:
            self.first_loss = loss
        self.closures.append(closure)
        self.rngs.append(rng)
        self.own_backward.append(own_backward)


def not_repeated(first: float, again: float, tolerance: float) -> str:
    """The error of a measurement whose first closure gave another loss when evaluated again."""
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


def fallback_warning(reason: Optional[str]) -> str:
    """Why LABPAL falls back, and what to do about the last of the failed measurements."""
    fix = next((text for key, text in _FALLBACK_FIXES if key in (reason or "")),
               "see opt.measurements() for each measurement's reason")
    return (f"LABPAL: {FAIL_LIMIT} measurements in a row gave no learning rate (last: {reason}); "
            "training goes on with the safe step s_upd = min(largest measured position, "
            f"max_step_size) (docs/algorithm.md, 'Falling back'). To fix: {fix}.")


def read(values: List[torch.Tensor]) -> List[float]:
    """The values a measurement's end decides on, read to the host in one transfer."""
    if len(values) == 1:
        return [values[0].item()]
    device = values[0].device
    return torch.stack([v.double().to(device) for v in values]).tolist()


def record_to_python(r: Dict[str, Any], hyper: Hyper) -> Dict[str, Any]:
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
        # the step check (nan when off): the step proposed, its mean loss, the factor taken
        "s_check": num("s_check"), "loss_check": num("loss_check"),
        "check_factor": num("check_factor"),
        # ρ, the gradient's noise-to-signal ratio the first measurement saw (nan elsewhere)
        "noise_ratio": num("noise"),
        "direction_norm": math.sqrt(dd) if dd >= 0 else float("nan"),
        "directional_derivative": (-partials[Partial.GD] / max(math.sqrt(dd), hyper.epsilon)
                                   if dd >= 0 else float("nan")),
        "valid": reason is None,
        "reason": reason,
    }
