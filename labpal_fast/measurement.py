"""A measurement while it runs: what it keeps from call to call, and what its record says.

`LABPAL` holds a `Measurement` exactly while one runs (it is measuring iff it holds one): the
call that starts a measurement makes it, and whatever ends the measurement (a fit, an abandon,
a fault, `load_state_dict`) drops it, so nothing of one measurement reaches the next. What
outlives it is in the optimizer's `Counters` (saved in a state_dict) and in its record, which
`record_to_python` turns into what `LABPAL.measurements()` returns.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .binding import Read
from .hyper import Hyper
from .layout import Partial
from .replay import RngState

# robust fits: after this many measurements in a row without a rate (none existing yet), train
# on with a safe step instead of measuring again forever (`steps._fall_back`)
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
        # copies (a CUDA graph's replay overwrites the loss it returned): the first call's loss
        # sample, and the last call's, which a late-bound first closure gives again
        self.first_loss: Optional[torch.Tensor] = None
        self.last_loss: Optional[torch.Tensor] = None
        self.reads: List[Tuple[Read, ...]] = []  # per kept closure: what its code read
        # set before the repeats (`binding.check`): the variables compared, and a device code,
        # i + 1 for the first of them that changed since its closure's first call, 0 for none
        self.late_names: List[str] = []
        self.late: Optional[torch.Tensor] = None
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
             loss: torch.Tensor, reads: Tuple[Read, ...] = ()) -> None:
        """A call of this measurement: its closure, its random state, its loss at θ₀ and what
        its code read (`binding.record`)."""
        if not self.closures:
            self.first_loss = loss.clone()
        self.closures.append(closure)
        self.rngs.append(rng)
        self.own_backward.append(own_backward)
        self.reads.append(reads)
        if self.calls == self.total:
            self.last_loss = loss.clone()


_BIND = ("A measurement evaluates each closure again, so each must compute the loss of its own "
         "batch: bind the batch when the closure is made (`def closure(x=x, y=y): ...` or "
         "functools.partial; a closure reading the loop's x, y sees the latest batch)")
_DISCARDED = ("The fit of this measurement was discarded; stepping may go on once the closure is "
              "fixed")


def _gave(again: float) -> str:
    return ("the closure did not repeat its loss: evaluated again at the same parameters and with "
            "the same random state, the first closure of this measurement gave " + f"{again:.6g}")


def not_repeated(first: float, again: float, tolerance: float) -> str:
    """The error of a measurement whose first closure gave another loss when evaluated again."""
    return (
        f"{_gave(again)}, not {first:.6g} (relative tolerance replay_tolerance={tolerance:g}). "
        f"{_BIND}, and draw random numbers only from torch, Python's random or numpy's global "
        f"generator (they are replayed). {_DISCARDED} (or replay_tolerance raised, for kernels "
        "that are not deterministic).")


def late_bound(name: str) -> str:
    """The error of a measurement whose closure reads a variable that changed since its call."""
    return (
        f"the closure did not repeat its loss: it reads `{name}` when it runs, and `{name}` holds "
        "another tensor (or was written in place) since the closure's first call, so evaluated "
        f"again it computes the loss of another batch (late binding). {_BIND}; a tensor refilled "
        "in place (x_static.copy_(batch)) cannot be bound: give each closure a batch of its "
        f"own. {_DISCARDED} (replay_tolerance=None turns this check off).")


def nearer_last(first: float, again: float, last: float) -> str:
    """The error of a measurement whose first closure gave again the last closure's loss."""
    return (
        f"{_gave(again)}, nearer to the last closure's first loss {last:.6g} than to its own "
        f"{first:.6g}: it computes the latest batch's loss (late binding, e.g. a batch read from "
        f"an attribute such as self.x). {_BIND}. {_DISCARDED} (replay_tolerance=None turns this "
        "check off).")


def repeat_failure(first: float, again: float, last: float, late: float, names: List[str],
                   tolerance: float) -> Tuple[str, str]:
    """The error and the record's reason of a measurement whose first closure did not repeat
    its loss (`Line.drop_unless_repeated`), from the values its host read gave."""
    if late:
        name = names[int(late) - 1]
        return late_bound(name), (f"closure not repeatable: it reads `{name}`, changed since "
                                  "its first call (late binding)")
    reason = f"closure not repeatable: loss {first:.6g} at its first call, {again:.6g} again"
    if abs(again - last) < abs(again - first):
        return (nearer_last(first, again, last),
                f"{reason}, nearer the last closure's {last:.6g} (late binding)")
    return not_repeated(first, again, tolerance), reason


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
    if len(values) == 2:  # one complex scalar: one item(), as a single value is read
        z = torch.complex(values[0].double(), values[1].double().to(device)).item()
        return [z.real, z.imag]
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
