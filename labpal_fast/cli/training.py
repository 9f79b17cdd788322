"""The training loop of `train` and `compare`: one `Run` per optimizer, each training its
own copy of the model, all taking turns on the same batch sequence (see `train_runs`)."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from . import registry
from .parallel import Ranks
from .tasks import BatchStream, Task


@dataclass
class Run:
    """One optimizer training its own copy of the model on the task."""
    name: str
    label: str
    task: Task
    model: torch.nn.Module
    built: registry.Built
    stream: BatchStream
    aug_gen: torch.Generator
    device: torch.device
    steps_done: int = 0
    train_time: float = 0.0
    eval_time: float = 0.0
    diverged: bool = False
    rows: List[Dict[str, Any]] = field(default_factory=list)
    _pending: List[tuple] = field(default_factory=list)
    last_loss: float = float("nan")
    last_lr: float = float("nan")
    last_acc: Optional[float] = None
    last_size: Optional[float] = None   # LABPAL's step size s_upd
    last_val_loss: Optional[float] = None
    forward: Optional[torch.nn.Module] = None   # what the closure calls (the DDP wrapper, if any)
    ranks: Ranks = field(default_factory=Ranks)

    def step(self) -> None:
        t0 = time.perf_counter()
        x, y = self.task.batch(self.ranks.share(self.stream.next()), self.aug_gen)
        model, task, opt = self.forward or self.model, self.task, self.built.optimizer

        def closure():
            return task.loss(model(x), y)
        if self.built.labpal:
            before = opt.phase
            loss = opt.step(closure)
            phase = "measuring" if "measuring" in (before, opt.phase) else "training"
            updates = opt.updates
        else:
            opt.zero_grad(set_to_none=True)
            loss = closure()
            loss.backward()
            opt.step()
            if self.built.scheduler is not None:
                self.built.scheduler.step()
            loss = loss.detach()
            phase, updates = "training", self.steps_done + 1
        lr = registry.current_lr(self.built)
        step_size = registry.current_step_size(self.built)
        self.train_time += time.perf_counter() - t0
        self.steps_done += 1
        self._pending.append((self.steps_done, loss, lr, phase, updates, self.train_time,
                              step_size))

    def flush(self) -> None:
        """Waits for the device, counts that wait as training time, records pending steps."""
        if self.device.type == "cuda":
            t0 = time.perf_counter()
            torch.cuda.synchronize(self.device)
            self.train_time += time.perf_counter() - t0
        if not self._pending:
            return
        # the global batch's loss: the mean of the ranks' shares (the same on every rank)
        losses = self.ranks.mean(
            torch.stack([p[1].float().reshape(()) for p in self._pending])).tolist()
        lrs = [registry.lr_value(p[2]) for p in self._pending]
        sizes = [None if p[6] is None else registry.lr_value(p[6]) for p in self._pending]
        for i, (step, _, _, phase, updates, wall, _) in enumerate(self._pending):
            wall = self.train_time if i == len(self._pending) - 1 else wall
            self.rows.append({"optimizer": self.name, "step": step, "kind": "train",
                              "loss": losses[i], "lr": lrs[i], "phase": phase,
                              "updates": updates, "wall_time": wall, "step_size": sizes[i]})
        self.last_loss, self.last_lr, self.last_size = losses[-1], lrs[-1], sizes[-1]
        if all(not math.isfinite(v) for v in losses[-min(len(losses), 20):]):
            self.diverged = True
        self._pending = []

    def evaluate(self) -> None:
        if not self.ranks.main:  # rank 0 evaluates and reports
            return
        t0 = time.perf_counter()
        opt = self.built.optimizer
        if self.built.schedule_free:
            opt.eval()
            _recompute_batchnorm(self.model, self.task)
        val_loss, val_acc = self.task.evaluate(self.model)
        if self.built.schedule_free:
            opt.train()
        self.rows.append({"optimizer": self.name, "step": self.steps_done, "kind": "eval",
                          "wall_time": self.train_time, "val_loss": val_loss,
                          "val_accuracy": val_acc})
        self.last_acc, self.last_val_loss = val_acc, val_loss
        self.eval_time += time.perf_counter() - t0

    def measurements(self) -> List[Dict[str, Any]]:
        return self.built.optimizer.measurements() if self.built.labpal else []


def _recompute_batchnorm(model: torch.nn.Module, task: Task, batches: int = 10) -> None:
    """Schedule-free evaluates at averaged weights: BatchNorm statistics are refreshed there
    (as schedulefree's documentation advises), from a fixed stream apart from the training one."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None        # cumulative average over the batches below
    stream = BatchStream(task.train_size, min(256, task.train_size), seed=12345)
    was = model.training
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(task.batch(stream.next())[0])
    for m in bns:
        m.momentum = 0.1
    model.train(was)


def _after_step(run: Run) -> None:
    """Called after every training step (outside the timed region). Tests patch it."""


def _progress(total: int, quiet: bool):
    if quiet:
        return None
    return tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)


def progress_text(runs: List[Run]) -> str:
    """The progress bar's figures per run: training loss; the learning rate, or LABPAL's step
    size s (NSGD's rate s/‖d‖ means nothing by itself); validation accuracy, or bits per
    character for a language model."""
    bits = runs[0].task.bits_per if runs else None
    parts = []
    for r in runs:
        scale = 1 / math.log(2) if bits else 1.0
        rate = f"s={r.last_size:.2g}" if r.built.labpal and r.last_size is not None \
            else f"lr={r.last_lr:.2g}"
        if bits:
            val = "—" if r.last_val_loss is None else f"{r.last_val_loss * scale:.3f}"
        else:
            val = "—" if r.last_acc is None else f"{100 * r.last_acc:.1f}%"
        parts.append(f"{r.name} {r.last_loss * scale:.3g} {rate} {val}")
    unit = f"bits/{'char' if bits == 'character' else bits}" if bits else "loss"
    return "  ".join(parts) + (f"  (train {unit}, rate or LABPAL step size s, val "
                               f"{unit if bits else 'acc'})")


def train_runs(runs: List[Run], steps: int, eval_every: int, quiet: bool) -> bool:
    """Trains every run for `steps` steps and evaluates each every `eval_every` steps.
    Returns True when interrupted (Ctrl-C); what was done until then is recorded either way.

    On the CPU the runs take turns step by step, so that a change of the machine's load
    falls on all of them alike. On a GPU each run trains `eval_every` steps in a row between
    two synchronizations, so that its time is its own (kernels run asynchronously)."""
    bar = _progress(steps * len(runs), quiet)
    interrupted = False
    try:
        for run in runs:
            run.evaluate()
        done = 0
        while done < steps:
            chunk = min(eval_every, steps - done)
            live = [r for r in runs if not r.diverged]
            cuda = any(r.device.type == "cuda" for r in live)
            turn = chunk if cuda else 1
            for start in range(0, chunk, turn):
                for run in live:
                    if cuda:
                        torch.cuda.synchronize(run.device)
                    for _ in range(min(turn, chunk - start)):
                        run.step()
                        _after_step(run)
                        if bar is not None:
                            bar.update(1)
                    if cuda:
                        run.flush()
            for run in runs:
                if run in live:
                    run.flush()
                    run.evaluate()
                elif bar is not None:
                    bar.update(chunk)
            done += chunk
            if bar is not None:
                bar.set_postfix_str(progress_text(runs), refresh=False)
    except KeyboardInterrupt:
        interrupted = True
        for run in runs:
            run.flush()
            last_eval = max((r["step"] for r in run.rows if r["kind"] == "eval"), default=-1)
            if run.steps_done != last_eval:
                run.evaluate()
    finally:
        if bar is not None:
            bar.close()
    return interrupted
