"""Whole runs of the authors' LABPAL against labpal_fast's paper variant (docs/algorithm.md,
"The authors' code over whole runs").

Both sides train the same model from the same initialization on the same batch sequence (a
built-in task of `labpal-fast`, its seeded `BatchStream`); every closure call seeds the global
RNG from (seed, call index), so random layers draw alike on both sides. Compared per
measurement: when it began (closure call, update), s_min, s_upd, the rate, and the training
loss of every closure call; the first place where they part (beyond `--rtol`) is named.

The authors' code (github.com/cogsys-tuebingen/LABPAL, `source/optimizers/lab_pal.py`; it
carries no licence, so nothing of it is in this repository) is loaded from `--reference DIR`
and patched at run time, never edited (the patches are listed in the output):
- `zero_grad` zeroes gradients in place: under PyTorch >= 2 it sets them to None and the
  authors' moves skip every parameter whose gradient is None (they would measure nothing);
- `random_seed_torch` saves and restores the CUDA RNG only where CUDA is available;
- the per-call seed `time.time()` becomes the closure call's index (reproducible runs);
- `numpy.gradient` as the module sees it is watched (not changed), to record the three losses
  and the slope and curvature it computes from them, and the instance's `print_` messages are
  recorded (when a measurement starts, when it is abandoned).

    git clone https://github.com/cogsys-tuebingen/LABPAL /tmp/LABPAL
    PYTHONPATH=$PWD python tools/compare_reference.py --reference /tmp/LABPAL --steps 3000
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from labpal_fast import LABPAL  # noqa: E402
from labpal_fast.cli.registry import PAPER  # noqa: E402
from labpal_fast.cli.tasks import BatchStream, Task, load_task  # noqa: E402

REFERENCE_FILE = os.path.join("source", "optimizers", "lab_pal.py")
HOW_TO_GET = (
    "--reference DIR: the authors' LABPAL checkout is needed (DIR/{}); get it with\n"
    "    git clone https://github.com/cogsys-tuebingen/LABPAL DIR\n"
    "(this tool was checked against commit f577cf976d5b88ea2dc901c2f71d30a643424a98). It is not\n"
    "part of this repository (no licence), and no test needs it.").format(REFERENCE_FILE)
FIELDS = ("s_min", "s_upd", "rate")  # compared per measurement, relative to --rtol


# ---------------------------------------------------------------------------- one side
@dataclass
class Side:
    """One optimizer driven by closures. `step(closure, call)` makes closure call `call`;
    `measurements()` gives one dict per measurement: call, update (updates made before it),
    s_min, s_upd (the step in use after it), rate (η in use after it), valid."""
    label: str
    step: Callable[[Callable[[], torch.Tensor], int], None]
    measurements: Callable[[], List[Dict[str, Any]]]
    patches: List[str] = field(default_factory=list)


def labpal_side(params, model, *, label: str = "labpal_fast paper", backend: str = "eager",
                **hyper) -> Side:
    """labpal_fast's paper variant (`line_fit="paper"`, `sgd_rate="paper"`) plus `hyper`."""
    opt = LABPAL(params, model=model, backend=backend, **dict(PAPER, **hyper))

    def measurements():
        return [dict(call=r["call"], update=r["update"], s_min=r["s_min"], s_upd=r["s_upd"],
                     rate=r["eta"], valid=r["valid"], losses=r["mean_losses"],
                     positions=r["positions"], reason=r["reason"]) for r in opt.measurements()]
    return Side(label, lambda closure, call: opt.step(closure), measurements)


class _WatchedNumpy(types.ModuleType):
    """numpy as the authors' module sees it: every call of `gradient` is recorded (arguments
    and result), everything else is numpy's own."""

    def __init__(self):
        super().__init__("numpy")
        self.calls: List[tuple] = []

    def __getattr__(self, name):
        return getattr(np, name)

    def gradient(self, *args, **kwargs):
        out = np.gradient(*args, **kwargs)
        self.calls.append((args, out))
        return out


def load_reference(directory: str):
    """The authors' module from DIR, patched (module, list of patches applied). Their file is
    imported as it is; the patches replace attributes of the imported module only."""
    path = os.path.join(directory, REFERENCE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    spec = importlib.util.spec_from_file_location("labpal_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = module.LabPal
    patches = []

    def zero_grad(self, set_to_none: bool = False):
        torch.optim.Optimizer.zero_grad(self, set_to_none=False)
    cls.zero_grad = zero_grad
    patches.append("LabPal.zero_grad: zeroes gradients in place (set_to_none=False): under "
                   "PyTorch >= 2 they would become None and every move of a measurement would "
                   "skip every parameter")

    @contextlib.contextmanager
    def random_seed_torch(self, seed):
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
    cls.random_seed_torch = random_seed_torch
    patches.append("LabPal.random_seed_torch: the CUDA RNG is saved and restored only where "
                   "CUDA is available (torch.cuda.get_rng_state() fails without a GPU)")

    clock = types.SimpleNamespace(call=0)
    module.time = types.SimpleNamespace(time=lambda: clock.call)
    patches.append("time.time() in the module: returns the closure call's index, the per-call "
                   "seed (it was the wall clock, so repeated runs drew differently)")
    watched = _WatchedNumpy()
    module.np = watched
    patches.append("numpy in the module: numpy.gradient is recorded, not changed (the three "
                   "losses, slope and curvature of each measurement)")
    return module, patches, clock, watched


def reference_side(directory: str, params, *, dataset_size: int, batch_size: int,
                   **hyper) -> Side:
    """The authors' LabPal (NSGD unless `mode` says otherwise, their defaults otherwise)."""
    module, patches, clock, watched = load_reference(directory)
    opt = module.LabPal(params, training_set_size=dataset_size, batch_size=batch_size,
                        is_print=False, **hyper)
    approximating = module.LabPal.State.APPROXIMATING_FULL_BATCH_LOSS
    records: List[Dict[str, Any]] = []
    current: Dict[str, Any] = {}
    messages: List[str] = []  # what it would print: when a measurement starts or is abandoned
    opt.print_ = lambda *args: messages.append(" ".join(str(a) for a in args))
    patches = patches + ["LabPal.print_ (on the instance): its messages are recorded, not "
                         "printed (when a measurement starts, when it is abandoned)"]

    def step(closure, call):
        clock.call = call
        seen, said = len(watched.calls), len(messages)
        updates = opt._amount_weight_updates_performed + 1  # it counts from -1
        opt.step(closure)
        new = messages[said:]
        if any(m.startswith("Approximating") for m in new):
            current.clear()
            current.update(call=call, update=updates)
        if not current:
            return
        if len(watched.calls) > seen:  # the fit ran: its losses, slope and curvature
            (losses, positions), derivatives = watched.calls[seen]
            curvature = watched.calls[seen + 1][1]
            b, a = float(derivatives[0]), float(curvature[0]) / 2
            A, B, _ = np.polyfit(positions, losses, 2)  # the parabola through the 3 points
            current.update(valid=bool(a > 0 > b), losses=[float(v) for v in losses],
                           positions=[float(p) for p in positions], raw_step=-b / (2 * a),
                           s_min=float(-B / (2 * A)))
            current["reason"] = None if current["valid"] else "fit invalid"
        elif any("first directional derivative" in m for m in new):
            current.update(valid=False, reason="abandoned", s_min=float("nan"))
        else:
            return  # still measuring
        last_step, last_lr = opt._last_update_step, opt._last_lr
        current.update(s_upd=float("nan") if last_step is None else float(last_step),
                       rate=float("nan") if last_lr is None else float(last_lr))
        records.append(dict(current))
        current.clear()
        if opt._internal_state is approximating:  # no rate yet: it measures again next call
            current.update(call=call + 1, update=opt._amount_weight_updates_performed + 1)

    return Side("authors' lab_pal.py", step, lambda: list(records), patches)


# ---------------------------------------------------------------------------- a whole run
def run(side: Side, model: torch.nn.Module, task: Task, *, steps: int, batch_size: int,
        seed: int) -> Dict[str, Any]:
    """`steps` closure calls of `side` on `task`; the training loss of each call (its first
    evaluation), the measurements and the final validation loss and accuracy."""
    stream = BatchStream(task.train_size, batch_size, seed)
    losses: List[float] = []
    for call in range(steps):
        x, y = task.batch(stream.next())
        first: List[torch.Tensor] = []

        def closure(x=x, y=y, call=call, first=first):
            torch.manual_seed(seed * 1_000_003 + call)  # random layers draw alike on both sides
            loss = task.loss(model(x), y)
            if not first:
                first.append(loss.detach())
            return loss
        side.step(closure, call)
        losses.append(float(first[0]))
    val_loss, val_acc = task.evaluate(model)
    return dict(label=side.label, losses=losses, measurements=side.measurements(),
                val_loss=val_loss, val_accuracy=val_acc, patches=side.patches)


def _differs(a: float, b: float, rtol: float) -> bool:
    if math.isnan(a) and math.isnan(b):
        return False
    return not abs(a - b) <= rtol * max(abs(a), abs(b))


def parting(a: Dict[str, Any], b: Dict[str, Any], rtol: float) -> Dict[str, Any]:
    """Where runs `a` and `b` part: the first measurement whose timing, validity or a field of
    FIELDS differs (beyond rtol), and the first closure call whose training loss does."""
    first_measurement = None
    for i, (ma, mb) in enumerate(zip(a["measurements"], b["measurements"])):
        what = [k for k in ("call", "update", "valid") if ma[k] != mb[k]]
        if ma["valid"] and mb["valid"]:
            what += [k for k in FIELDS if _differs(ma[k], mb[k], rtol)]
        if what:
            first_measurement = dict(index=i, fields=what, a=ma, b=mb)
            break
    if first_measurement is None and len(a["measurements"]) != len(b["measurements"]):
        n = min(len(a["measurements"]), len(b["measurements"]))
        first_measurement = dict(index=n, fields=["count"], a=None, b=None)
    first_loss = next((i for i, (la, lb) in enumerate(zip(a["losses"], b["losses"]))
                       if _differs(la, lb, rtol)), None)
    return dict(measurement=first_measurement, loss_call=first_loss,
                parted=first_measurement is not None or first_loss is not None)


def compare(make_a: Callable, make_b: Callable, task: Task, *, steps: int, batch_size: int,
            seed: int, rtol: float) -> Dict[str, Any]:
    """Both sides from one initialization (`make_x(params, model) -> Side`), then `parting`."""
    torch.manual_seed(seed)
    model_a = task.make_model()
    model_b = copy.deepcopy(model_a)
    result_a = run(make_a(list(model_a.parameters()), model_a), model_a, task, steps=steps,
                   batch_size=batch_size, seed=seed)
    result_b = run(make_b(list(model_b.parameters()), model_b), model_b, task, steps=steps,
                   batch_size=batch_size, seed=seed)
    return dict(a=result_a, b=result_b, parting=parting(result_a, result_b, rtol))


# ---------------------------------------------------------------------------- the report
def _mean(values: List[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _valid_rows(measurements: List[Dict[str, Any]]) -> List[tuple]:
    """(measurement, how many measurements without a valid fit came before it since the last
    valid one) for each valid measurement."""
    rows, skipped = [], 0
    for m in measurements:
        if m["valid"]:
            rows.append((m, skipped))
            skipped = 0
        else:
            skipped += 1
    return rows


def report(result: Dict[str, Any], rtol: float, window: int = 100) -> str:
    a, b, part = result["a"], result["b"], result["parting"]
    lines = []
    for side in (a, b):
        for patch in side["patches"]:
            lines.append(f"patch ({side['label']}): {patch}")
    lines.append(f"\nmeasurements with a valid fit (abandoned or invalid ones between them are "
                 f"counted in 'skipped'): A = {a['label']}, B = {b['label']}")
    lines.append("  #   call (A/B)   update (A/B)  skipped | A s_min    B s_min   | A s_upd    "
                 "B s_upd   | A rate     B rate")
    rows_a, rows_b = _valid_rows(a["measurements"]), _valid_rows(b["measurements"])
    for i, ((ma, ska), (mb, skb)) in enumerate(zip(rows_a, rows_b)):
        lines.append(f"{i:3d} {ma['call']:>6}/{mb['call']:<6} {ma['update']:>6}/{mb['update']:<6} "
                     f"{ska:>4}/{skb:<4} | {ma['s_min']:<10.4g} {mb['s_min']:<10.4g}| "
                     f"{ma['s_upd']:<10.4g} {mb['s_upd']:<10.4g}| {ma['rate']:<10.4g} "
                     f"{mb['rate']:<10.4g}")
    for side, rows in ((a, rows_a), (b, rows_b)):
        skipped = len(side["measurements"]) - len(rows)
        lines.append(f"{side['label']}: {len(rows)} valid measurements, {skipped} abandoned or "
                     "invalid")
    n = min(len(a["losses"]), len(b["losses"]))
    window = max(1, min(window, n))
    lines.append(f"\ntraining loss, mean over {window} calls:")
    for end in sorted({max(window, n * q // 10) for q in range(1, 11)}):
        lines.append(f"  calls {end - window:6d}-{end:6d}: A {_mean(a['losses'][end - window:end]):.4f}"
                     f"  B {_mean(b['losses'][end - window:end]):.4f}")
    for side in (a, b):
        lines.append(f"final validation ({side['label']}): loss {side['val_loss']:.4f}, "
                     f"accuracy {100 * side['val_accuracy']:.2f}%")
    m, call = part["measurement"], part["loss_call"]
    if not part["parted"]:
        lines.append(f"\nno parting (rtol {rtol:g}): every measurement and every loss agree")
    else:
        if m is not None:
            lines.append(f"\nfirst measurement that parts (rtol {rtol:g}): #{m['index']} "
                         f"({', '.join(m['fields'])})")
        if call is not None:
            lines.append(f"first training loss that parts (rtol {rtol:g}): closure call {call}: "
                         f"A {a['losses'][call]:.7g}  B {b['losses'][call]:.7g}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", metavar="DIR", help="the authors' LABPAL checkout")
    ap.add_argument("--task", default="digits", choices=("digits", "spirals", "charlm"))
    ap.add_argument("--steps", type=int, default=3000, help="closure calls per side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the task's")
    ap.add_argument("--dataset-size", type=int, default=None,
                    help="N for the noise factor on both sides (default: the training split)")
    ap.add_argument("--mode", default="NSGD", choices=("NSGD", "SGD"))
    ap.add_argument("--backend", default="eager", help="labpal_fast's backend")
    ap.add_argument("--control-backend", default=None,
                    help="also run labpal_fast's paper variant on this backend against the first: "
                         "how far rounding alone separates two runs")
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--out", default=None, help="write every figure as JSON here")
    args = ap.parse_args(argv)
    if not args.reference or not os.path.isfile(os.path.join(args.reference, REFERENCE_FILE)):
        print(HOW_TO_GET, file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    task = load_task(args.task, args.seed, torch.device("cpu"))
    batch = args.batch_size or task.defaults.batch_size
    size = args.dataset_size or task.train_size

    def authors(params, model):
        return reference_side(args.reference, params, dataset_size=size, batch_size=batch,
                              mode=args.mode)

    def ours(backend):
        return lambda params, model: labpal_side(
            params, model, backend=backend, label=f"labpal_fast paper ({backend})",
            mode=args.mode, dataset_size=size, batch_size=batch)

    result = compare(authors, ours(args.backend), task, steps=args.steps, batch_size=batch,
                     seed=args.seed, rtol=args.rtol)
    print(report(result, args.rtol))
    out = dict(authors=result, commit_note=HOW_TO_GET.splitlines()[2])
    if args.control_backend:
        control = compare(ours(args.backend), ours(args.control_backend), task,
                          steps=args.steps, batch_size=batch, seed=args.seed, rtol=args.rtol)
        print("\ncontrol: labpal_fast against itself on another backend\n" +
              report(control, args.rtol))
        out["control"] = control
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
