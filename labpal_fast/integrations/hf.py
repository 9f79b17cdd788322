"""LABPAL with Hugging Face Accelerate and the transformers `Trainer`.

Accelerate: `prepare` (this module's) checks the accelerator, then calls `accelerator.prepare`;
step with a closure that calls `accelerator.backward(loss)` and returns the loss:

    model, opt, loader = prepare(accelerator, model, LABPAL(model.parameters(), model=model), loader)
    for x, y in loader:
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            accelerator.backward(loss)
            return loss
        opt.step(closure)        # Accelerate's wrapper returns None: keep the loss from the closure

Trainer: `LABPALTrainer` is a `transformers.Trainer` that trains with LABPAL (README, "Training
loops and frameworks"): its `training_step` runs the Trainer's own forward and backward as the
closure of one `LABPAL.step`.

    trainer = LABPALTrainer(model=model, args=TrainingArguments(...), train_dataset=...,
                            labpal={"approximation_batches": 10})   # LABPAL's hyper-parameters
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ..optimizer import LABPAL
from . import require, unwrap

require("accelerate", "accelerate", "hf")
transformers = require("transformers", "transformers", "hf")

__all__ = ["LABPALTrainer", "MeasuredRate", "check_accelerator", "prepare"]


def check_accelerator(accelerator: Any) -> None:
    """Raises ValueError for an Accelerator LABPAL cannot train under."""
    if getattr(accelerator, "scaler", None) is not None:
        raise ValueError(
            "fp16 mixed precision (Accelerate's GradScaler) with LABPAL: the scaler multiplies the "
            "loss before backward and steps without LABPAL's closure, so LABPAL would measure and "
            "average scaled gradients. Use mixed_precision='bf16' or 'no'; for fp16, "
            "mixed_precision='no' with LABPAL(..., loss_scale='dynamic') and a closure that runs "
            "accelerator.backward(opt.scale_loss(loss)) (or returns the loss without calling "
            "backward); LABPALTrainer: fp16=False, model.half() and "
            "labpal={'loss_scale': 'dynamic'} (README, 'Mixed precision').")
    steps = getattr(accelerator, "gradient_accumulation_steps", 1)
    if steps != 1:
        raise ValueError(
            f"gradient_accumulation_steps={steps} with LABPAL: Accelerate would skip "
            "optimizer.step() (and with it the closure) on the accumulating steps. LABPAL "
            "averages micro-batches itself: give every batch to step(closure) and use "
            "gradient_accumulation_steps=1.")


def prepare(accelerator: Any, *objects: Any) -> Any:
    """`accelerator.prepare(*objects)` after `check_accelerator(accelerator)`."""
    check_accelerator(accelerator)
    return accelerator.prepare(*objects)


class MeasuredRate:
    """Stands where the Trainer expects its learning-rate scheduler: `get_last_lr()` is LABPAL's
    measured rate (`param_groups[0]["lr"]`), `step()` changes nothing (LABPAL sets the rate)."""

    def __init__(self, optimizer: LABPAL):
        self.optimizer = optimizer

    def get_last_lr(self) -> List[float]:
        lr = float(self.optimizer.param_groups[0]["lr"])  # one rate shared by every group
        return [lr] * len(self.optimizer.param_groups)

    def step(self, *args: Any, **kwargs: Any) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}  # the rate is in the optimizer's state_dict

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        pass


class _TrainerLABPAL(LABPAL):
    """LABPAL as LABPALTrainer builds it. `training_step` steps it with a closure; the Trainer's
    own `optimizer.step()` that follows must find exactly that step done, else it raises (a
    step that silently did nothing would leave the model untrained)."""

    _stepped = False

    def step(self, closure=None):
        if closure is not None:
            loss = super().step(closure)
            self._stepped = True
            return loss
        if not self._stepped:
            raise RuntimeError(
                "The Trainer called optimizer.step() but LABPAL has not stepped since the last "
                "one: LABPALTrainer.training_step steps LABPAL with the forward/backward as its "
                "closure. A subclass that overrides training_step must call "
                "LABPALTrainer.training_step (super()) for each batch.")
        self._stepped = False
        return None


class LABPALTrainer(transformers.Trainer):
    """A `transformers.Trainer` that trains with LABPAL.

    `labpal`: LABPAL's hyper-parameters (keyword arguments); `dataset_size` and `batch_size`
    default to the training set's length and `per_device_train_batch_size`. From the
    TrainingArguments: `max_grad_norm` becomes LABPAL's `max_grad_norm` (the averaged gradient
    is clipped inside LABPAL; the Trainer's own clipping is off, it would run on gradients LABPAL
    has already consumed); `weight_decay` is LABPAL's, per group as the Trainer forms them.
    `learning_rate` is not used (LABPAL measures the rate); the logged `learning_rate` is the
    measured one, and `grad_norm` LABPAL's pre-clip norm. Refused with a ValueError: a
    scheduler other than the default (`lr_scheduler_type` other than "linear"/"constant",
    warm-up, `optimizers=(..., scheduler)`; LABPAL's schedule is `lr_multiplier_schedule`),
    `gradient_accumulation_steps > 1` (LABPAL averages its own micro-batches: see
    `batch_size_schedule`), an optimizer passed in `optimizers=`, and fp16 with a GradScaler.
    fp16 parameters (`model.half()`, `fp16=False`) train with `labpal={"loss_scale": "dynamic"}`:
    the Trainer's backward then runs on the scaled loss, LABPAL keeps fp32 master weights.
    """

    def __init__(self, *args: Any, labpal: Optional[Dict[str, Any]] = None, **kwargs: Any):
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers[0] is not None or optimizers[1] is not None:
            raise ValueError(
                "LABPALTrainer builds LABPAL itself: pass its hyper-parameters as labpal={...} "
                "instead of optimizers=(optimizer, scheduler); a scheduler would overwrite the "
                "measured rate (LABPAL's own schedule: lr_multiplier_schedule)")
        super().__init__(*args, **kwargs)
        self.labpal_hyper = dict(labpal or {})
        for name in ("max_grad_norm", "model", "params"):
            if name in self.labpal_hyper:
                raise ValueError(f"labpal={{'{name}': ...}}: LABPALTrainer sets {name} itself"
                                 + (" from TrainingArguments.max_grad_norm"
                                    if name == "max_grad_norm" else ""))
        for name in ("_clip_grad_norm", "_get_grad_norm"):  # overridden below
            if not callable(getattr(transformers.Trainer, name, None)):
                raise RuntimeError(
                    f"transformers {transformers.__version__} has no Trainer.{name}: "
                    "LABPALTrainer needs the transformers the [integrations] extra pins")
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps} with "
                "LABPALTrainer: LABPAL averages micro-batches itself (each training step is one; "
                "batch_size_schedule and the noise factor set how many per update). Use "
                "gradient_accumulation_steps=1.")
        check_accelerator(self.accelerator)

    # -- the optimizer and the "scheduler"
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            hyper = dict(self.labpal_hyper)
            if "noise_factor" not in hyper:
                if "dataset_size" not in hyper and hasattr(self.train_dataset, "__len__"):
                    hyper["dataset_size"] = len(self.train_dataset)
                hyper.setdefault("batch_size", self.args.per_device_train_batch_size)
            clip = self.args.max_grad_norm
            hyper["max_grad_norm"] = clip if clip is not None and clip > 0 else None
            self.optimizer = _TrainerLABPAL(self._parameter_groups(model), model=model, **hyper)
        return self.optimizer

    def _parameter_groups(self, model) -> List[Dict[str, Any]]:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.args.weight_decay:
            return [{"params": [p for _, p in params]}]
        decay = set(self.get_decay_parameter_names(model))
        groups = [{"params": [p for n, p in params if n in decay],
                   "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            kind = str(getattr(self.args.lr_scheduler_type, "value",
                               self.args.lr_scheduler_type))
            warmup = self.args.get_warmup_steps(num_training_steps)
            if kind not in ("linear", "constant") or warmup > 0:
                raise ValueError(
                    f"lr_scheduler_type={kind!r}, warm-up steps {warmup}: LABPALTrainer takes no "
                    "learning-rate schedule from TrainingArguments (LABPAL measures the rate). "
                    "Leave lr_scheduler_type at its default and warm-up at 0; scale the measured "
                    "rate with labpal={'lr_multiplier_schedule': ((update, multiplier), ...)}.")
            self.lr_scheduler = MeasuredRate(self.optimizer)
        return self.lr_scheduler

    # -- one LABPAL step per training step
    def training_step(self, model, inputs, num_items_in_batch=None):
        parent = super().training_step
        labpal = unwrap(self.optimizer)
        if not isinstance(labpal, _TrainerLABPAL):
            raise TypeError(f"LABPALTrainer's optimizer is {type(labpal).__name__}, not the "
                            "LABPAL it builds in create_optimizer")

        def closure():  # forward and accelerator.backward, as the Trainer does them
            if labpal.hyper.loss_scale is None:
                return parent(model, inputs, num_items_in_batch)
            # under LABPAL's loss scale the Trainer's backward runs on opt.scale_loss(loss):
            # an instance attribute shadows accelerator.backward for this call only, and
            # whatever stood there before is put back
            accelerator = self.accelerator
            before = vars(accelerator).get("backward")
            backward = accelerator.backward
            accelerator.backward = (
                lambda loss, **kwargs: backward(labpal.scale_loss(loss), **kwargs))
            try:
                return parent(model, inputs, num_items_in_batch)
            finally:
                if before is None:
                    del accelerator.backward
                else:
                    accelerator.backward = before

        # the LABPAL itself: Accelerate's wrapper returns no loss
        return labpal.step(closure)

    # -- what the Trainer logs
    def _clip_grad_norm(self, model):
        return self._labpal_grad_norm()  # LABPAL clipped the averaged gradient (max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        return self._labpal_grad_norm() if grad_norm is None else grad_norm

    def _labpal_grad_norm(self):
        """LABPAL's pre-clip norm of the last update's averaged gradient (a device tensor, read
        when logged; NaN before the first update); the model's .grad holds nothing by now."""
        return getattr(unwrap(self.optimizer), "grad_norm", None)
