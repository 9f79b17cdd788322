"""What LABPAL refuses, and the errors that say why and what to do instead.

Other libraries' ways that cannot work with a line search that calls the closure again and
owns its learning rate: torch.amp.GradScaler (and Accelerate's fp16 wrapper), torch.compile
of step(), LR schedulers that set 'lr' from an initial one, copies of the optimizer. And
parameters it cannot hold: groups that set hyper-parameters, mixed devices, non-float or
memory-sharing parameters, a requires_grad changed after construction. `LABPAL` calls these
at the points named in each; they hold no state. `Rate` is the one exception: what
param_groups' 'lr' shows, and the factor that assigning it (ReduceLROnPlateau) puts on the
measured rate.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import shards
from .hyper import number

NOT_COPYABLE = (
    "LABPAL cannot be copied or pickled: the parameters are views into its flat buffers "
    "(p.data points into them), so a copy would either share the model's memory or train "
    "tensors no model uses. Save opt.state_dict() and load_state_dict() it into a LABPAL built "
    "over the (copied) model's parameters.")

_NO_SCHEDULER = (
    "LABPAL measures its learning rate: param_groups[i]['lr'] shows the rate in use and cannot "
    "be set from an initial lr, so torch LR schedulers other than ReduceLROnPlateau (StepLR, "
    "LambdaLR, ...) cannot drive it. To scale the measured rate over training, pass "
    "lr_multiplier_schedule=((update, factor), ...) to LABPAL: the factor runs linearly between "
    "the points, e.g. ((0, 1.0), (10000, 0.1)) decays it to a tenth over 10000 updates (README, "
    "'Learning-rate schedules'). ReduceLROnPlateau works: it scales the measured rate.")


class Group(dict):
    """A parameter group whose 'lr' is LABPAL's rate (`Rate`): a torch LR scheduler that
    records 'initial_lr' is refused; an assignment to 'lr' (ReduceLROnPlateau's) is checked by
    the optimizer's `Rate` and becomes a factor on the measured rate at the next step."""

    rate: Optional["Rate"] = None  # the optimizer's, once it is built

    def __setitem__(self, key, value):
        if key == "initial_lr":
            raise RuntimeError(_NO_SCHEDULER)
        if key == "lr" and self.rate is not None:
            value = self.rate.checked(value)
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


class Rate:
    """param_groups[i]['lr'], a Python float: the measured rate as a measurement's host read
    gave it (`measured`: s_base; paper SGD: η_base), times the multiplier in force:
    lr_multiplier_schedule's factor × `factor`, the product of the assignments to 'lr' (as
    ReduceLROnPlateau makes them; saved in the state). The line multiplies its device rate by
    the same multiplier in the same fp64 arithmetic, so the lr shown is the lr used."""

    def __init__(self, groups: List["Group"], hyper: Any):
        self.groups, self.hyper = groups, hyper
        self.measured = 0.0  # 0 until a measurement gives a rate
        self.fallback = 0.0  # the measured rate a fall-back would take (read with the rest)
        self.factor = 1.0
        self.shown = 0.0
        self.show(1.0)
        for group in groups:
            group.rate = self

    def multiplier(self, update: int) -> float:
        """What the line multiplies the measured rate by at update `update`."""
        return self.hyper.lr_multiplier_at(update) * self.factor

    def show(self, multiplier: float) -> None:
        """Every group's 'lr' = the measured rate × `multiplier` (host arithmetic, no read)."""
        self.shown = self.measured * multiplier
        for group in self.groups:
            dict.__setitem__(group, "lr", self.shown)

    def checked(self, value: Any) -> float:
        """An assignment to 'lr': a finite number > 0, once a rate exists."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
                not (math.isfinite(value) and value > 0):
            raise ValueError(f"param_groups[i]['lr'] = {value!r}: LABPAL takes a finite Python "
                             "number > 0 there, as a factor on its measured rate (new lr / lr)")
        if self.shown <= 0:
            raise RuntimeError("param_groups[i]['lr'] cannot be scaled before LABPAL has "
                               "measured a rate (it shows 0 until the first measurement ends)")
        return float(value)

    def take_assigned(self) -> None:
        """At a step: an 'lr' assigned since the last one (every group alike: LABPAL has one
        rate) becomes part of `factor`, used from this step on."""
        values = [dict.__getitem__(group, "lr") for group in self.groups]
        if all(v == self.shown for v in values):
            return
        if any(v != values[0] for v in values):
            raise RuntimeError(f"param_groups' 'lr' differ ({values}): LABPAL measures one rate "
                               "for all groups, so scale it alike in every group")
        self.factor *= values[0] / self.shown
        self.shown = values[0]

    def load(self, line: Any, factor: float, update: int) -> None:
        """After load_state_dict: the saved rate (one read, as loading reads anyway)."""
        self.factor = factor
        sgd = self.hyper.mode == "SGD" and self.hyper.sgd_rate == "paper"
        self.measured = (line.eta_base if sgd else line.s_base).item()
        self.show(self.multiplier(update))


def check_groups(param_groups: List[dict], hyper_names: Sequence[str]) -> None:
    """Per group: no hyper-parameter but weight_decay (checked and made a float in place), one
    device, floating-point parameters; across groups, no shared memory."""
    names = set(hyper_names) | {"lr", "backend", "model", "process_group"}
    for i, group in enumerate(param_groups):
        bad = sorted(set(group) & names)
        if bad:
            raise ValueError(f"param_groups[{i}] sets {bad}: LABPAL measures one line across "
                             "all groups, so only 'weight_decay' may differ per group")
        group["weight_decay"] = weight_decay(group["weight_decay"],
                                             f"param_groups[{i}]['weight_decay']")
        devices = {p.device for p in group["params"] if p.requires_grad}
        if len(devices) > 1:
            raise ValueError(f"param_groups[{i}] has parameters on several devices "
                             f"{sorted(map(str, devices))}; put each group on one device")
        for p in group["params"]:
            if p.requires_grad and not p.is_floating_point():
                raise ValueError(f"param_groups[{i}] has a parameter of dtype {p.dtype}; "
                                 "LABPAL needs floating-point parameters")
    check_no_shared_storage(param_groups)


def refuse_requires_grad_change(params: Sequence[torch.Tensor],
                                built: Tuple[bool, ...]) -> None:
    """At a step: the parameters do not require grad as they did when LABPAL was built
    (`built`)."""
    changed = [i for i, (p, was) in enumerate(zip(params, built)) if p.requires_grad != was]
    raise RuntimeError(
        f"requires_grad of parameter(s) {changed} (in param_groups order) changed after "
        "LABPAL was built: its flat buffers, direction and line hold exactly the "
        "parameters that required grad then (a frozen one would keep moving with "
        "momentum and weight decay, an unfrozen one would never train). Build a new "
        "LABPAL over the parameters to train.")


def refuse_grad_scaled(opt) -> None:
    """At a step called by torch.amp.GradScaler.step, which set `found_inf` (or `grad_scale`)
    on the optimizer (LABPAL declares `_step_supports_amp_scaling` for that). GradScaler deletes
    them after step() returns: a refused call must, so that a fixed loop steps again."""
    vars(opt).pop("found_inf", None)
    vars(opt).pop("grad_scale", None)
    refuse_grad_scaler()


def refuse_compile() -> None:
    """At a step that torch.compile is tracing."""
    # a plain raise would be a graph break, after which dynamo runs step() eagerly; a
    # disabled function runs eagerly, so its error reaches the caller (fullgraph=True
    # reports this line instead, hence the comment on it)
    torch.compiler.disable(_refuse_compile)()  # compile the model, not LABPAL.step()


def check_no_shared_storage(param_groups) -> None:
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


def refuse_grad_scaler() -> None:
    """A GradScaler drives step(): scaler.step(opt, closure) (`refuse_grad_scaled`), or
    Accelerate's fp16 wrapper replacing step() right before it (`LABPAL.__setattr__`), which
    would fail on a GradScaler that never scaled a loss."""
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


def weight_decay(value: Any, name: str) -> float:
    """L2 weight decay as a Python float in [0, 10] (Python or numpy numbers): far above any
    useful value, low enough that wd·θ cannot overflow fp16 for |θ| < 6000."""
    return number(name, value, 0.0, 10.0)
