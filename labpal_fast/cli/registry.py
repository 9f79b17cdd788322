"""The optimizers `labpal-fast` can train with, and how each is built.

Built in: LABPAL (NSGD and SGD mode, each also as the paper's algorithm), SGD with momentum 0.9 and a piecewise-constant
schedule (÷10 at 50% and 75% of the steps) at the task's usual rate, Adam at 1e-3 and AdamW at
its default rate (AdamW joins `compare` when asked for).
Others join `compare` automatically when their package is installed, each at the default
its documentation gives: schedule-free SGD / AdamW (`schedulefree`), Prodigy (`prodigyopt`),
D-Adaptation Adam (`dadaptation`) and DoG (`dog-optimizer`).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch


@dataclass
class Built:
    optimizer: torch.optim.Optimizer
    scheduler: Optional[Any] = None
    labpal: bool = False          # step(closure) drives forward and backward itself
    schedule_free: bool = False   # needs optimizer.train() / .eval() around evaluation
    settings: Optional[Dict[str, Any]] = None


@dataclass
class Spec:
    name: str
    label: str
    package: Optional[str]        # import name of the optional package, None when built in
    build: Callable[..., Built]
    note: str

    def available(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None


# the paper's algorithm (README "What differs from the paper"): its fit on literal positions
# and its SGD rate
PAPER = dict(line_fit="paper", sgd_rate="paper")


def _labpal(mode: str, preset: Optional[Dict[str, Any]] = None):
    def build(params, *, model, task_size, batch_size, steps, sgd_lr, weight_decay, labpal_hyper,
              backend="auto"):
        from ..optimizer import LABPAL
        hyper = dict(preset or {}, **labpal_hyper)
        hyper.setdefault("dataset_size", task_size)
        hyper.setdefault("batch_size", batch_size)
        hyper["mode"] = mode
        opt = LABPAL(params, backend=backend, model=model, weight_decay=weight_decay, **hyper)
        settings = dict(opt.hyper.as_dict(), weight_decay=weight_decay, backend=opt.backend)
        return Built(opt, labpal=True, settings=settings)
    return build


def _sgd(params, *, steps, sgd_lr, weight_decay, **_):
    opt = torch.optim.SGD(params, lr=sgd_lr, momentum=0.9, weight_decay=weight_decay)
    milestones = sorted({max(1, steps // 2), max(1, (3 * steps) // 4)})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    return Built(opt, sched, settings=dict(lr=sgd_lr, momentum=0.9, weight_decay=weight_decay,
                                           milestones=milestones, gamma=0.1))


def _adam(params, *, weight_decay, **_):
    opt = torch.optim.Adam(params, lr=1e-3, weight_decay=weight_decay)
    return Built(opt, settings=dict(lr=1e-3, weight_decay=weight_decay))


def _adamw(params, *, weight_decay, **_):
    opt = torch.optim.AdamW(params, weight_decay=weight_decay)
    return Built(opt, settings=dict(lr=opt.defaults["lr"], weight_decay=weight_decay))


def _schedulefree(cls_name: str):
    def build(params, *, weight_decay, **_):
        cls = getattr(importlib.import_module("schedulefree"), cls_name)
        opt = cls(params, weight_decay=weight_decay)
        return Built(opt, schedule_free=True,
                     settings=dict(lr=opt.defaults["lr"], weight_decay=weight_decay))
    return build


def _plain(module: str, cls_name: str):
    def build(params, *, weight_decay, **_):
        cls = getattr(importlib.import_module(module), cls_name)
        opt = cls(params, weight_decay=weight_decay)
        return Built(opt, settings=dict(lr=opt.defaults.get("lr"), weight_decay=weight_decay))
    return build


SPECS: Dict[str, Spec] = {s.name: s for s in [
    Spec("labpal", "LABPAL (NSGD)", None, _labpal("NSGD"), "LABPAL, mode NSGD, its defaults"),
    Spec("labpal-sgd", "LABPAL (SGD)", None, _labpal("SGD"), "LABPAL, mode SGD, its defaults"),
    Spec("labpal-paper", "LABPAL (NSGD, paper)", None, _labpal("NSGD", PAPER),
         "LABPAL, mode NSGD, the paper's algorithm: line_fit='paper' (literal positions)"),
    Spec("labpal-sgd-paper", "LABPAL (SGD, paper)", None, _labpal("SGD", PAPER),
         "LABPAL, mode SGD, the paper's algorithm: line_fit='paper', sgd_rate='paper'"),
    Spec("sgd", "SGD+momentum", None, _sgd,
         "momentum 0.9, the task's usual rate, ÷10 at 50% and 75% of the steps"),
    Spec("adam", "Adam", None, _adam, "lr 1e-3"),
    Spec("adamw", "AdamW", None, _adamw, "torch.optim.AdamW at its default lr (1e-3), the "
         "given weight decay (decoupled)"),
    Spec("sf-sgd", "Schedule-free SGD", "schedulefree", _schedulefree("SGDScheduleFree"),
         "schedulefree.SGDScheduleFree at its defaults (lr 1.0, momentum 0.9)"),
    Spec("sf-adamw", "Schedule-free AdamW", "schedulefree", _schedulefree("AdamWScheduleFree"),
         "schedulefree.AdamWScheduleFree at its defaults (lr 0.0025)"),
    Spec("prodigy", "Prodigy", "prodigyopt", _plain("prodigyopt", "Prodigy"),
         "prodigyopt.Prodigy at its defaults (lr 1.0)"),
    Spec("dadapt-adam", "D-Adapt Adam", "dadaptation", _plain("dadaptation", "DAdaptAdam"),
         "dadaptation.DAdaptAdam at its defaults (lr 1.0)"),
    Spec("dog", "DoG", "dog", _plain("dog", "DoG"), "dog.DoG at its defaults (reps_rel 1e-6)"),
]}

BUILTIN = ("labpal", "labpal-sgd", "sgd", "adam")


def default_compare_set() -> List[str]:
    """The built-ins, then every optional optimizer whose package is installed (the paper
    variants only when asked for)."""
    return list(BUILTIN) + [n for n, s in SPECS.items()
                            if s.package is not None and s.available()]


def parse_names(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {unknown}; known: {', '.join(SPECS)}")
    missing = [n for n in names if not SPECS[n].available()]
    if missing:
        raise ValueError("optimizer(s) " + ", ".join(
            f"{n} (needs the '{SPECS[n].package}' package)" for n in missing) + " not installed")
    if len(set(names)) != len(names):
        raise ValueError(f"an optimizer is listed twice: {names}")
    if not names:
        raise ValueError("no optimizer given")
    return names


def current_lr(built: Built) -> torch.Tensor | float:
    """The learning rate in force (for LABPAL the rate of the last update, a device tensor:
    `lr_tensor`; D-Adaptation and Prodigy report lr·d, their effective rate)."""
    if built.labpal:
        return built.optimizer.lr_tensor.detach().clone()
    group = built.optimizer.param_groups[0]
    lr = group["lr"]
    lr = float(lr)
    if "d" in group and isinstance(group["d"], (int, float)):
        lr *= float(group["d"])
    return lr


def current_step_size(built: Built) -> Optional[torch.Tensor]:
    """LABPAL's step size s_upd (a device tensor: the distance an update moves along
    −d/‖d‖), None for the other optimizers."""
    return built.optimizer.line.s_upd.detach().clone() if built.labpal else None


def lr_value(lr: torch.Tensor | float) -> float:
    return float(lr) if not torch.is_tensor(lr) else float(lr.item())
