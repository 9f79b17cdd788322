"""LABPAL's measurements as TensorBoard scalars, and its settings for `add_hparams`.

    from torch.utils.tensorboard import SummaryWriter
    from labpal_fast.integrations.tensorboard import hparams, log_measurements

    writer = SummaryWriter(log_dir)
    for step, (x, y) in enumerate(loader):
        opt.step(closure)
        log_measurements(writer, opt, step)   # reads the device only when a measurement ended
    writer.add_hparams(hparams(opt), {"loss/final": final_loss})
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Dict, Union

from . import require, unwrap

require("tensorboard", "tensorboard", "tensorboard")  # SummaryWriter needs it

# per optimizer, per writer: how many measurements that writer has received
_written: "weakref.WeakKeyDictionary[Any, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()

FIGURES = ("s_min", "s_upd", "lr", "eta", "a", "b", "direction_norm", "valid")


def log_measurements(writer, opt, global_step: int, prefix: str = "labpal/") -> int:
    """Writes each measurement that `writer` has not received yet as scalars `prefix + name`
    (FIGURES) at `global_step`; returns how many. `lr` is the rate the measurement set (η in
    SGD mode, s_upd/‖d‖ in NSGD mode; with sgd_rate="robust" each SGD update then takes
    s_upd/n̄ instead, as param_groups' lr shows); `valid` is 1.0 or 0.0. Cheap to call every
    step: it reads device values only when a measurement has ended since the last call."""
    opt = unwrap(opt)
    seen = _written.setdefault(opt, weakref.WeakKeyDictionary())
    done = seen.get(writer, 0)
    # opt._records: the count without reading any device value (measurements() reads them all)
    if len(opt._records) == done:
        return 0
    new = opt.measurements()[done:]
    for record in new:
        for name, value in measurement_figures(record, opt.hyper.mode).items():
            writer.add_scalar(prefix + name, value, global_step)
    seen[writer] = done + len(new)
    return len(new)


def measurement_figures(record: Dict[str, Any], mode: str) -> Dict[str, float]:
    """FIGURES of one `opt.measurements()` record, as Python floats."""
    norm = record["direction_norm"]
    lr = record["eta"] if mode == "SGD" else (
        record["s_upd"] / norm if norm > 0 else math.nan)
    return {"s_min": record["s_min"], "s_upd": record["s_upd"], "lr": lr, "eta": record["eta"],
            "a": record["a"], "b": record["b"], "direction_norm": norm,
            "valid": 1.0 if record["valid"] else 0.0}


def hparams(opt) -> Dict[str, Union[int, float, str, bool]]:
    """LABPAL's settings as Python scalars for `writer.add_hparams(hparams(opt), metrics)`:
    every hyper-parameter (tuples as strings), the backend, each group's weight decay, and `lr`,
    the measured rate now (`param_groups[0]["lr"]`, a Python float)."""
    opt = unwrap(opt)
    out: Dict[str, Union[int, float, str, bool]] = {}
    for name, value in opt.hyper.as_dict().items():
        out[name] = "None" if value is None else (str(value) if isinstance(value, tuple) else value)
    out["backend"] = opt.backend
    decays = [group["weight_decay"] for group in opt.param_groups]
    if len(set(decays)) == 1:
        out["weight_decay"] = decays[0]
    else:
        out.update({f"weight_decay/{i}": wd for i, wd in enumerate(decays)})
    out["lr"] = float(opt.param_groups[0]["lr"])
    return out
