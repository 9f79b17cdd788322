"""LABPAL under Lightning's automatic optimization.

`configure_optimizers` returns a LABPAL; add `LABPALCallback()` to the Trainer's callbacks:

    class Net(L.LightningModule):
        def training_step(self, batch, batch_idx):
            loss = ...
            self.log("train_loss", loss)   # logged once per batch, not on line repeats
            return loss

        def configure_optimizers(self):
            return LABPAL(self.parameters(), model=self, dataset_size=..., batch_size=...)

    trainer = L.Trainer(callbacks=[LABPALCallback(), LearningRateMonitor("step")], ...)

Lightning passes LABPAL a closure that runs `training_step`, `zero_grad` and `backward` and
returns the detached loss (torch's `step(closure)` convention). LABPAL runs that closure again
at other points of the line during a measurement (`opt.repeating` is True then). The callback
keeps those repeats from being seen twice: `self.log` / `self.log_dict` do nothing while
repeating, and the batch's outputs (`on_train_batch_end`) are those of its first evaluation.
Other hooks inside the closure (`on_before_backward`, `on_after_backward`,
`on_before_optimizer_step`) do run on repeats; test `opt.repeating` there.

It refuses, at `on_fit_start`, what cannot work with LABPAL: learning-rate schedulers but
ReduceLROnPlateau (LABPAL measures the rate; its own schedule is `lr_multiplier_schedule`), `accumulate_grad_batches > 1`
(LABPAL averages its own micro-batches), `gradient_clip_val` (use LABPAL's `max_grad_norm`)
and fp16 mixed precision with a GradScaler (it steps without a closure). fp16 works as
`precision="16-true"` with `LABPAL(loss_scale="dynamic")`: the callback runs Lightning's backward
on `opt.scale_loss(loss)`, and LABPAL keeps fp32 master weights.
`param_groups[i]["lr"]` is the measured rate (a Python float), so `LearningRateMonitor` logs it
as it is.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, List

from torch.optim.lr_scheduler import ReduceLROnPlateau

from ..optimizer import LABPAL
from . import require

pl = require("lightning.pytorch", "lightning", "lightning")

__all__ = ["LABPALCallback"]

# the module methods the callback wraps for the fit (instance attributes shadow the class's)
_WRAPPED = ("log", "optimizer_step", "backward")


class LABPALCallback(pl.Callback):
    """Checks the configuration at `on_fit_start` and keeps LABPAL's line repeats from logging
    or replacing the batch's outputs; see the module docstring."""

    def __init__(self) -> None:
        self._optimizers: List[LABPAL] = []

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._optimizers = [o for o in trainer.optimizers if isinstance(o, LABPAL)]
        if not self._optimizers:
            raise ValueError("LABPALCallback: configure_optimizers returned no LABPAL optimizer "
                             f"(got {[type(o).__name__ for o in trainer.optimizers]})")
        _check_trainer(trainer, self._optimizers)
        for name in _WRAPPED:
            if name in vars(pl_module):
                raise RuntimeError(f"LABPALCallback: {type(pl_module).__name__}.{name} is already "
                                   "replaced on the instance (is a second LABPALCallback active?)")
        pl_module.log = _skip_when_repeating(pl_module.log, self._repeating)
        pl_module.optimizer_step = _first_evaluation_outputs(pl_module.optimizer_step,
                                                             self._repeating)
        # automatic optimization has one optimizer: under its loss_scale, backward runs on the
        # scaled loss (the closure returns the unscaled one)
        pl_module.backward = _scaled_backward(pl_module.backward, self._optimizers[0])

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                 stage: str) -> None:
        for name in _WRAPPED:
            vars(pl_module).pop(name, None)

    def _repeating(self) -> bool:
        return any(opt.repeating for opt in self._optimizers)


def _check_trainer(trainer: "pl.Trainer", optimizers: List[LABPAL]) -> None:
    for config in trainer.lr_scheduler_configs:
        if isinstance(config.scheduler, ReduceLROnPlateau):
            continue  # it scales the measured rate (README, "Learning-rate schedules")
        if any(config.scheduler.optimizer is opt for opt in optimizers):
            raise ValueError(
                f"configure_optimizers returned a learning-rate scheduler "
                f"({type(config.scheduler).__name__}) for LABPAL: LABPAL measures its learning "
                "rate, a scheduler would overwrite it. Return the optimizer alone; to scale the "
                "measured rate over training use LABPAL(lr_multiplier_schedule=((update, "
                "multiplier), ...)).")
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) with LABPAL: "
            "LABPAL averages micro-batches itself (each step() is one; batch_size_schedule and "
            "the noise factor set how many per update). Use accumulate_grad_batches=1.")
    if trainer.gradient_clip_val:
        raise ValueError(
            f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) with LABPAL: Lightning "
            "would clip each closure's gradient (and again on every line repeat). Clip the "
            "averaged gradient inside LABPAL instead: LABPAL(max_grad_norm=...).")
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ValueError(
            "fp16 mixed precision (a GradScaler) with LABPAL: the scaler calls optimizer.step() "
            "without a closure, and LABPAL's line measurements need one. Use "
            "precision='bf16-mixed', or for fp16 precision='16-true' with "
            "LABPAL(loss_scale='dynamic') (LABPAL scales the loss itself and keeps fp32 master "
            "weights).")


def _skip_when_repeating(log: Callable, repeating: Callable[[], bool]) -> Callable:
    @functools.wraps(log)
    def guarded(*args: Any, **kwargs: Any) -> None:
        if not repeating():  # a line repeat's loss is at another point of the line
            log(*args, **kwargs)
    return guarded


def _scaled_backward(backward: Callable, optimizer: LABPAL) -> Callable:
    @functools.wraps(backward)
    def scaled(loss: Any, *args: Any, **kwargs: Any) -> None:
        backward(optimizer.scale_loss(loss), *args, **kwargs)
    return scaled


def _first_evaluation_outputs(optimizer_step: Callable, repeating: Callable[[], bool]) -> Callable:
    """Lightning reads the batch's outputs from its closure's last call; after a measurement's
    repeats that would be the loss at another line position. Put the first evaluation's back."""
    @functools.wraps(optimizer_step)
    def step(epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None,
             **kwargs: Any) -> Any:
        if optimizer_closure is None or not hasattr(optimizer_closure, "_result"):
            return optimizer_step(epoch, batch_idx, optimizer, optimizer_closure, **kwargs)
        first: List[Any] = []

        def closure() -> Any:
            loss = optimizer_closure()
            if not repeating():
                first[:] = [optimizer_closure._result]
            return loss

        out = optimizer_step(epoch, batch_idx, optimizer, closure, **kwargs)
        if first:
            optimizer_closure._result = first[0]
        return out
    return step
