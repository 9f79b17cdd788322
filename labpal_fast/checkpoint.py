"""LABPAL's checkpoint format: `LABPAL.state_dict` and `load_state_dict`, and the check of a state.

`state_dict` / `load_state_dict` are LABPAL's, with torch's state-dict hooks run as
`torch.optim.Optimizer` runs them; `save` writes the format, `load` writes a state back into
the optimizer once `check` has passed all of it.

`check` reads the whole state and returns it in the form it will be written in; the optimizer
writes only after that, so a damaged or foreign state changes nothing. Every error is a
ValueError that names the entry by its path (``state_dict['labpal']['line']['s_upd'] is nan``)
and says what was expected.

The format (version 4; versions 1 to 3 load too) is what `save` writes. Since version 4 LABPAL's
own entry rides in the first parameter group (`param_groups[0]['labpal']`, where
torch.distributed.checkpoint's get/set_optimizer_state_dict keep it; versions 1-3 saved it at the
top level, and either place loads), and its keys do not depend on the step it was saved at
(`_fixed_layout`: DCP loads into a template, a fresh optimizer's state_dict()).
Containers are read as mappings and sequences, scalars as Python numbers or 0-dim tensors, so that layouts which store numbers as
tensors load too; what could corrupt training (a wrong shape that would broadcast, a non-finite
rate, a counter that breaks the state machine) is refused.
"""
from __future__ import annotations

import math
import numbers
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from .hyper import MAX_LOSS_SCALE, MAX_MULTIPLIER
from .layout import NPART, RECORD_SCALARS
from .line import Line
from .shards import fixed_layout, is_dtensor

VERSION = 4
# version 1 lacked the line's s_base / eta_base (no lr_multiplier_schedule then: factor 1)
READS = (1, 2, 3, 4)
LINE_SINCE_2 = {"s_base": "s_upd", "eta_base": "eta"}
# versions 1-2 lacked n̄ of sgd_rate="robust" (the paper's rule needed none): it loads as 0,
# unknown, and the next TRAINING update's ‖d‖ starts it again (docs/algorithm.md "SGD mode");
# and the loss scale (no loss scaling then): it starts as this optimizer's loss_scale says
# (`Hyper.initial_loss_scale`), with no finite direction counted
LINE_SINCE_3 = ("norm_mean", "loss_scale", "scale_good")
TOP = ("state", "param_groups")
LABPAL_KEYS = ("version", "hyper", "shapes", "counters", "line", "records")
# since version 4: the failed measurements in a row (`LABPAL._failures`) and the factor that
# assignments to param_groups' 'lr' (ReduceLROnPlateau) put on the measured rate; older
# states load them as 0 and 1
SINCE_4 = {"failures": 0, "lr_factor": 1.0}
# the line's rates and counts: applied or compared on the next update, so finite and >= 0
LINE_CHECKED = ("s_upd", "eta", "lr", "hist_s", "hist_eta", "hist_n", "skipped_updates",
                "skipped_samples", "s_base", "eta_base", "norm_mean", "loss_scale", "scale_good")
# sums, counts and partials are scratch: reset (samples) or recomputed (partials, when the next
# direction is formed) before they are read again, so only their shape and dtype matter
RECORD_KEYS = ("call", "update", "m", "reason", "averaged", "partials", "sums", "counts")
# the step check's figures (records of versions <= 3 made without it lack them)
CHECK_SCALARS = ("s_check", "loss_check", "check_factor")
# the noise ratio the first measurement found (records made before it, or later, lack it)
NOISE_SCALARS = ("noise",)


@dataclass
class Checked:
    """A state that passed `check`, ready to be written."""
    failures: int
    lr_factor: float
    directions: List[List[torch.Tensor]]              # per flat, per parameter
    grad_sums: List[Optional[List[torch.Tensor]]]     # per flat; None: no sum pending (acc = 0)
    masters: List[List[Optional[torch.Tensor]]]       # per flat, per parameter (None: not saved)
    weight_decays: List[float]                        # per group
    counters: Dict[str, Any]
    line: Dict[str, torch.Tensor]
    records: List[Dict[str, Any]]


def check(opt, state_dict: Any) -> Checked:
    """Everything `opt.load_state_dict` will write, checked against `opt` (a LABPAL)."""
    try:
        _keys(state_dict, "state_dict", TOP, optional=("labpal",))
    except ValueError as e:
        raise ValueError(f"{e}: it was not saved by LABPAL.state_dict()") from None
    extra, path = _labpal_entry(state_dict)
    state_dict = _by_position(state_dict)
    if isinstance(extra, Mapping) and "version" in extra:  # first: other versions, other keys
        version = _item(extra["version"], f"{path}['version']")
        if isinstance(version, bool) or version not in READS:
            raise ValueError(f"{path}['version'] is {version!r}: this LABPAL reads state "
                             f"versions {', '.join(map(str, READS))}")
    else:
        version = VERSION
    _keys(extra, path, LABPAL_KEYS, optional=tuple(SINCE_4))
    failures = _int(extra.get("failures", 0), f"{path}['failures']")
    lr_factor = _real(extra.get("lr_factor", 1.0), f"{path}['lr_factor']")
    if not (math.isfinite(lr_factor) and lr_factor > 0):
        raise ValueError(f"{path}['lr_factor'] is {lr_factor}, expected a finite number > 0")
    # other parameters first: the most likely mistake, and what the rest is indexed by
    index, weight_decays = _check_groups(opt, state_dict["param_groups"])
    _check_shapes(opt, index, extra["shapes"], f"{path}['shapes']")
    dynamic = _check_hyper(opt, extra["hyper"], f"{path}['hyper']")
    counters = _check_counters(opt, extra["counters"], f"{path}['counters']")
    directions, grad_sums, masters = _check_entries(opt, index, state_dict["state"],
                                                    counters["acc"])
    line = _check_line(opt, extra["line"], f"{path}['line']", version, dynamic)
    records = _check_records(opt, extra["records"], f"{path}['records']")
    return Checked(failures, lr_factor, directions, grad_sums, masters, weight_decays, counters,
                   line, records)


def _labpal_entry(state_dict: Mapping):
    """LABPAL's own entry and its path: in the first parameter group (version 4), or at the
    top level (versions 1-3)."""
    if "labpal" in state_dict:
        return state_dict["labpal"], "state_dict['labpal']"
    path = "state_dict['param_groups'][0]['labpal']"
    groups = state_dict["param_groups"]
    first = groups[0] if isinstance(groups, Sequence) and groups else None
    if not isinstance(first, Mapping) or "labpal" not in first:
        raise ValueError(f"{path} is missing (versions 1-3: state_dict['labpal']): the state "
                         "was not saved by LABPAL.state_dict()")
    return first["labpal"], path


def _by_position(state_dict: Mapping) -> Mapping:
    """The state with parameters named by their position in param_groups, as saved.
    torch.distributed.checkpoint's set_optimizer_state_dict names them by their fully
    qualified names instead (in the state's keys and the groups' 'params'), in the order
    of this optimizer's groups."""
    groups = state_dict["param_groups"]
    if not isinstance(groups, Sequence) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), Sequence) for g in groups):
        return state_dict  # refused by _check_groups, with the path
    names = [n for g in groups for n in g["params"]]
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) < len(names):
        return state_dict
    position = {n: i for i, n in enumerate(names)}
    out = dict(state_dict)
    out["param_groups"] = [dict(g, params=[position[n] for n in g["params"]]) for g in groups]
    if isinstance(state_dict["state"], Mapping):
        out["state"] = {position.get(k, k): v for k, v in state_dict["state"].items()}
    return out

# ---------------------------------------------------------------------------- save and load
def state_dict(opt) -> Dict[str, Any]:
    """`LABPAL.state_dict`: torch's state-dict pre-hooks, the state (`save`), then the post-hooks,
    each of which may return a state_dict that replaces it (as `torch.optim.Optimizer` does)."""
    for hook in opt._optimizer_state_dict_pre_hooks.values():
        hook(opt)
    saved = save(opt)
    for hook in opt._optimizer_state_dict_post_hooks.values():
        result = hook(opt, saved)
        if result is not None:
            saved = result
    return saved


def load_state_dict(opt, state_dict: Any) -> None:
    """`LABPAL.load_state_dict`: torch's load-state-dict pre-hooks on a shallow copy (one that
    returns a state_dict replaces it), the state (`load`), then the post-hooks, as
    `torch.optim.Optimizer` does."""
    if isinstance(state_dict, dict):
        state_dict = state_dict.copy()
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    load(opt, state_dict)
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)


def save(opt) -> Dict[str, Any]:
    """The state of `opt` (a LABPAL) in this format. A measurement that is collecting its
    batches is saved as not yet started: its closures cannot be saved."""
    index: Dict[int, int] = {}
    groups = []
    for group in opt.param_groups:
        ids = []
        for p in group["params"]:
            index.setdefault(id(p), len(index))
            ids.append(index[id(p)])
        # the learning rate is part of the line state below, not of the groups
        groups.append({"params": ids, "weight_decay": group["weight_decay"]})
    accumulating = _accumulates(opt)
    meas = opt._measurement
    # an unfinished update's gradient sum is this rank's own until its last call averages it
    # (DDP model= with m > 1): not saved; the update starts over at load, on every rank alike
    local_sum = opt._dist is not None and opt._dist.ddp is not None and opt.counters.m > 1
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for flat in opt.flats:
            direction = flat.origin if meas is not None and meas.formed else flat.direction
            sums = flat.slices(flat.grad_sum) if flat.grad_sum is not None and meas is None \
                and opt.counters.acc > 0 and not local_sum else [None] * len(flat.params)
            masters = flat.slices(flat.param) if flat.master else [None] * len(flat.params)
            for i, (p, d, s, w) in enumerate(zip(flat.params, flat.slices(direction), sums,
                                                 masters)):
                entry = {"direction": flat.saved(i, d)}
                if w is not None:  # fp32 master weights: the model holds them rounded
                    entry["master"] = flat.saved(i, w)
                if s is not None:
                    entry["grad_sum"] = flat.saved(i, s)
                elif accumulating:  # a fixed layout: zero, ignored at load while acc is 0
                    entry["grad_sum"] = torch.zeros_like(entry["direction"])
                state[index[id(p)]] = entry
    counters = asdict(opt.counters)
    if meas is not None:  # resume by starting this measurement over, parameters untouched
        counters.update(acc=0, pending=True)
    elif local_sum:
        counters.update(acc=0)
    groups[0]["labpal"] = {
        "version": VERSION,
        "hyper": opt.hyper.as_dict(),
        "shapes": {index[id(p)]: (tuple(p.shape), str(p.dtype))
                   for f in opt.flats for p in f.params},
        "counters": counters,
        "line": {name: getattr(opt.line, name).clone() for name in Line.STATE},
        # one leaf (a tuple), however many there are: DCP saves and loads it whole
        "records": tuple({k: (v.clone() if torch.is_tensor(v) else v) for k, v in r.items()}
                         for r in opt._records),
        "failures": opt._failures,
        "lr_factor": opt.rate.factor,
    }
    return fixed_layout(opt, {"state": state, "param_groups": groups})


def _accumulates(opt) -> bool:
    """Whether a gradient sum can ever be pending: m > 1 somewhere in batch_size_schedule (then
    every entry holds one, so the keys do not depend on the step; FSDP2: `fixed_layout`)."""
    return any(mult > 1 for _, mult in opt.hyper.schedule_for(opt._calls.ranks))


def live_state(opt) -> Dict[torch.Tensor, Dict[str, torch.Tensor]]:
    """`LABPAL.state`: per trained parameter, views into the flat buffers (module doc there)."""
    state: Dict[torch.Tensor, Dict[str, torch.Tensor]] = defaultdict(dict)
    name = "momentum_buffer" if opt.hyper.momentum > 0 else "direction"
    for flat in opt.flats:
        for key, buf in ((name, flat.direction),
                         ("master_weights", flat.param if flat.master else None),
                         ("grad_sum", flat.grad_sum)):
            if buf is not None:
                for p, view in zip(flat.params, flat.slices(buf)):
                    state[p][key] = view
    return state


def load(opt, state_dict: Any) -> None:
    """Writes a state into `opt` after checking all of it (`check`); a running measurement is
    dropped (the saved state says whether one starts at the next call)."""
    new = check(opt, state_dict)
    with torch.no_grad():
        for flat, directions, sums, masters in zip(opt.flats, new.directions,
                                                    new.grad_sums, new.masters):
            for d, saved in zip(flat.slices(flat.direction), directions):
                d.copy_(saved)
            if flat.master:  # where the model's parameters are their rounding (README)
                for i, (w, saved) in enumerate(zip(flat.slices(flat.param), masters)):
                    flat.take_master(w if saved is None else saved, i)
            if sums is not None:
                for s, saved in zip(flat.slices(flat.need_grad_sum()), sums):
                    s.copy_(saved)
            opt.ops.zero_grad(flat)
        for name, value in new.line.items():
            getattr(opt.line, name).copy_(value)
    opt.line.multiplier = None  # s_upd = s_base·factor is made again at the next update
    for group, weight_decay in zip(opt.param_groups, new.weight_decays):
        group["weight_decay"] = weight_decay
    opt.counters = type(opt.counters)(**new.counters)
    opt._measurement = None
    opt._records = new.records
    opt._failures = new.failures
    opt.rate.load(opt.line, new.lr_factor, opt.counters.updates)


# ---------------------------------------------------------------------------- the parts
def _check_hyper(opt, hyper: Any, path: str) -> bool:
    """This optimizer's hyper-parameters are used; those that shape the line state must agree.
    Returns whether the saved loss scale is to be used: both scale dynamically."""
    _keys(hyper, path, ("averaging_window", "sample_positions"), others=True)
    window = _item(hyper["averaging_window"], f"{path}['averaging_window']")
    if window != opt.hyper.averaging_window:
        raise ValueError(f"{path}['averaging_window'] is {window!r}, this optimizer's is "
                         f"{opt.hyper.averaging_window}: the saved histories do not fit")
    try:
        positions = tuple(float(s) for s in hyper["sample_positions"])
    except (TypeError, ValueError):
        positions = None
    if positions != opt.hyper.sample_positions:
        raise ValueError(f"{path}['sample_positions'] is {hyper['sample_positions']!r}, this "
                         f"optimizer's is {opt.hyper.sample_positions}: the saved line state "
                         "does not fit")
    return opt.hyper.loss_scale == "dynamic" and hyper.get("loss_scale") == "dynamic"


def _check_groups(opt, groups: Any, path: str = "state_dict['param_groups']"):
    """The saved index of each of this optimizer's parameters (by id), and the weight decays."""
    groups = _sequence(groups, path, "a list of parameter groups")
    for i, g in enumerate(groups):
        _keys(g, f"{path}[{i}]", ("params", "weight_decay"), optional=("labpal",) if i == 0 else ())
        _sequence(g["params"], f"{path}[{i}]['params']", "a list of parameter indices")
    saved = [len(g["params"]) for g in groups]
    mine = [len(g["params"]) for g in opt.param_groups]
    if saved != mine:
        raise ValueError(f"{path} holds parameter groups of other sizes ({saved}) than this "
                         f"optimizer's ({mine})")
    index: Dict[int, int] = {}
    seen = set()
    for gi, (g, group) in enumerate(zip(groups, opt.param_groups)):
        for j, (i, p) in enumerate(zip(g["params"], group["params"])):
            i = _int(i, f"{path}[{gi}]['params'][{j}]")
            if i in seen:
                raise ValueError(f"{path}[{gi}]['params'][{j}] is {i}, an index listed before: "
                                 "each parameter has its own")
            seen.add(i)
            index[id(p)] = i
    decays = []
    for gi, g in enumerate(groups):
        wd = _real(g["weight_decay"], f"{path}[{gi}]['weight_decay']")
        if not (math.isfinite(wd) and wd >= 0):
            raise ValueError(f"{path}[{gi}]['weight_decay'] is {wd}, expected a finite number >= 0")
        decays.append(wd)
    return index, decays


def _check_shapes(opt, index: Dict[int, int], shapes: Any, path: str) -> None:
    shapes = _loaded_int_keys(shapes)
    _keys(shapes, path, [index[id(p)] for flat in opt.flats for p in flat.params])
    for flat in opt.flats:
        for p in flat.params:
            i = index[id(p)]
            saved = shapes[i]
            try:
                fits = len(saved) == 2 and tuple(saved[0]) == tuple(p.shape) and \
                    saved[1] == str(p.dtype)
            except (TypeError, IndexError, KeyError):
                fits = False
            if not fits:
                raise ValueError(f"{path}[{i}] is {saved!r} but this optimizer's parameter {i} is "
                                 f"{(tuple(p.shape), str(p.dtype))}: the state belongs to other "
                                 "parameters")


def _check_counters(opt, counters: Any, path: str) -> Dict[str, Any]:
    """The state machine's counters (the `Counters` fields), with their invariants."""
    spec = [f for f in fields(opt.counters) if f.name != "noise"]
    _keys(counters, path, [f.name for f in spec], optional=("noise",))
    # ν measured; None: not yet (and in checkpoints from before it, the next measurement's)
    noise = counters.get("noise")
    c = {"noise": None if noise is None else _real(noise, f"{path}['noise']")}
    if c["noise"] is not None and not 0 <= c["noise"] < math.inf:
        raise ValueError(f"{path}['noise'] is {c['noise']}, expected a finite ν >= 0 or None")
    for f in spec:
        at = f"{path}[{f.name!r}]"
        c[f.name] = _bool(counters[f.name], at) if isinstance(f.default, bool) else \
            _int(counters[f.name], at, high=MAX_MULTIPLIER if f.name == "m" else None)
    m, acc = c["m"], c["acc"]
    if acc >= max(m, 1):  # m = 0 before the first call: nothing accumulated yet
        raise ValueError(f"{path}['acc'] is {acc}, expected 0 <= acc < m (m = {m}; 0 while m "
                         "is 0)")
    for name, limit in (("last_end", "updates"), ("measure_start_update", "updates"),
                        ("measure_start_call", "calls")):
        if c[name] > c[limit]:
            raise ValueError(f"{path}[{name!r}] is {c[name]}, expected at most "
                             f"{path}[{limit!r}] = {c[limit]}")
    return c


def _check_entries(opt, index: Dict[int, int], state: Any, acc: int):
    """Per parameter: the direction, the running gradient sum while acc > 0, and the fp32
    master weights when saved (an optimizer without master weights ignores them; one with
    them takes the model's parameters where none are saved)."""
    path = "state_dict['state']"
    state = _loaded_int_keys(state)
    _keys(state, path, [index[id(p)] for flat in opt.flats for p in flat.params])
    directions, grad_sums, masters = [], [], []
    for flat in opt.flats:
        ds, ss, ws = [], [], []
        for p in flat.params:
            i = index[id(p)]
            at = f"{path}[{i}]"
            entry = _keys(state[i], at, ("direction",), optional=("grad_sum", "master"))
            ws.append(None)
            if "master" in entry:
                ws[-1] = _local(_tensor(entry["master"], f"{at}['master']", p.shape,
                                        dtype=torch.float32), p, f"{at}['master']")
            d = _local(_tensor(entry["direction"], f"{at}['direction']", p.shape, floating=True),
                       p, f"{at}['direction']")
            # a kept direction is finite (a non-finite one is cleared when it appears); checked
            # in the dtype it is stored in, so an fp64 value cannot overflow in the copy
            _finite(d.to(flat.acc_dtype), f"{at}['direction']", nonnegative=False)
            ds.append(d)
            if "grad_sum" in entry:
                # may hold NaN/inf: a non-finite gradient is summed, then the update is skipped
                # and counted (docs/algorithm.md), as without the checkpoint
                ss.append(_local(_tensor(entry["grad_sum"], f"{at}['grad_sum']", p.shape,
                                         floating=True), p, f"{at}['grad_sum']"))
            elif acc > 0:
                raise ValueError(f"{at}['grad_sum'] is missing: counters['acc'] is {acc}, so "
                                 "the gradients summed toward the next update are needed")
        directions.append(ds)
        masters.append(ws)
        # with acc = 0 a saved sum is not needed: the next accumulation starts afresh
        grad_sums.append(ss if acc > 0 else None)
    return directions, grad_sums, masters


def _check_line(opt, line: Any, path: str, version: int,
                dynamic: bool) -> Dict[str, torch.Tensor]:
    """The line tensors, each of this optimizer's shape and dtype; rates and counts >= 0. The
    saved loss scale (> 0) is used when `dynamic`; else this optimizer's own starts."""
    missing = (LINE_SINCE_3 if version < 3 else ()) + \
        (tuple(LINE_SINCE_2) if version < 2 else ())
    names = tuple(n for n in Line.STATE if n not in missing)
    _keys(line, path, names)
    out = {}
    for name in names:
        mine = getattr(opt.line, name)
        value = _tensor(line[name], f"{path}[{name!r}]", mine.shape, dtype=mine.dtype)
        if name in LINE_CHECKED:
            _finite(value, f"{path}[{name!r}]")
        out[name] = value
    scale = out.get("loss_scale")
    if scale is not None and not (0 < scale <= MAX_LOSS_SCALE):
        raise ValueError(f"{path}['loss_scale'] is {out['loss_scale'].item()}, expected a number "
                         f"in (0, {MAX_LOSS_SCALE:g}]")
    for name, source in LINE_SINCE_2.items():
        out.setdefault(name, out[source])
    out.setdefault("norm_mean", torch.zeros_like(opt.line.norm_mean))
    if version < 3 or not dynamic:
        out["loss_scale"] = torch.tensor(opt.hyper.initial_loss_scale, dtype=torch.float64)
        out["scale_good"] = torch.zeros((), dtype=torch.int64)
    return out


def _check_records(opt, records: Any, path: str) -> List[Dict[str, Any]]:
    """Measurement records (what `measurements()` reads), copied to the optimizer's device."""
    records = _sequence(records, path, "a list of measurement records (dicts)")
    npos = len(opt.hyper.line_positions)
    shapes = {"partials": (NPART,), "sums": (npos,), "counts": (npos,), "positions": (npos,)}
    out = []
    for j, r in enumerate(records):
        at = f"{path}[{j}]"
        _keys(r, at, RECORD_KEYS, optional=RECORD_SCALARS + CHECK_SCALARS + NOISE_SCALARS
              + ("valid", "positions"))
        rec = {}
        for key, value in r.items():  # values of fits may be NaN: invalid fits are kept as such
            where = f"{at}[{key!r}]"
            if key in ("call", "update", "m"):
                value = _int(value, where, low=1 if key == "m" else 0)
            elif key == "averaged" or (key == "valid" and not torch.is_tensor(value)):
                value = _bool(value, where)
            elif key == "reason":
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{where} must be a string or None, got {value!r}")
            elif key in shapes or torch.is_tensor(value):
                value = _tensor(value, where, shapes.get(key, ()),
                                dtype=torch.bool if key == "valid" else None,
                                floating=key != "valid")
                value = value.detach().to(opt._device, copy=True)
            else:
                value = _real(value, where)
            rec[key] = value
        out.append(rec)
    return out


def _loaded_int_keys(value: Any) -> Any:
    """A mapping keyed by parameter index as torch.distributed.checkpoint leaves it: it loads
    into a template (the resuming optimizer's own state_dict()) and stores each value it
    cannot load in place (a tuple, a number) under the key's string ('0' beside the template's
    0). The loaded value is the saved one, so it replaces the template's."""
    if not isinstance(value, Mapping) or not any(isinstance(k, str) for k in value):
        return value
    out = dict(value)
    for key in value:
        if isinstance(key, str) and key.isdigit() and int(key) in value:
            out[int(key)] = out.pop(key)
    return out


# ---------------------------------------------------------------------------- checks of one value
def _keys(value: Any, path: str, keys: Sequence, optional: Sequence = (), others=False):
    """A mapping with every key of `keys`, and no others but `optional` (unless `others`)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{path} must be a dict, got {type(value).__name__}")
    expected = list(keys) + list(optional)
    shown = ", ".join(map(repr, expected[:12])) + (", ..." if len(expected) > 12 else "")
    for key in keys:
        if key not in value:
            raise ValueError(f"{path}[{key!r}] is missing (expected keys: {shown})")
    unknown = [k for k in value if k not in expected]
    if unknown and not others:
        raise ValueError(f"{path} has unknown key(s) {unknown[:12]} (expected keys: {shown})")
    return value


def _sequence(value: Any, path: str, what: str) -> Sequence:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ValueError(f"{path} must be {what}, got {type(value).__name__}")
    return value


def _item(value: Any, path: str) -> Any:
    """A 0-dim tensor as a Python number: other layouts than torch.save's may store them so."""
    if torch.is_tensor(value):
        if value.dim() != 0 or value.is_meta:
            raise ValueError(f"{path} must be a number, got a tensor of shape "
                             f"{tuple(value.shape)} on {value.device}")
        return value.item()
    return value


def _int(value: Any, path: str, low: int = 0, high: Optional[int] = None) -> int:
    v = _item(value, path)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{path} must be an integer, got {value!r}")
    v = int(v)
    if v < low or (high is not None and v > high):
        raise ValueError(f"{path} is {v}, expected {low} <= value" +
                         (f" <= {high}" if high is not None else ""))
    return v


def _bool(value: Any, path: str) -> bool:
    v = _item(value, path)
    if not isinstance(v, bool):
        raise ValueError(f"{path} must be True or False, got {value!r}")
    return v


def _real(value: Any, path: str) -> float:
    v = _item(value, path)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{path} must be a number, got {value!r}")
    return float(v)


def _tensor(value: Any, path: str, shape, dtype: Optional[torch.dtype] = None,
            floating: bool = False) -> torch.Tensor:
    """A dense tensor with data, of exactly this shape (a wrong one would broadcast)."""
    if not torch.is_tensor(value):
        raise ValueError(f"{path} must be a tensor, got {type(value).__name__}")
    if value.is_meta or value.layout != torch.strided:
        raise ValueError(f"{path} must be a dense tensor with data, got a {value.layout} tensor "
                         f"on {value.device}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{path} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"{path} has dtype {value.dtype}, expected {dtype}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{path} has dtype {value.dtype}, expected a floating-point dtype")
    return value


def _local(value: torch.Tensor, p: torch.Tensor, path: str) -> torch.Tensor:
    """A state entry of an FSDP2 parameter (a DTensor like it): this rank's shard, to copy
    into the flat. Plain parameters take plain tensors as they are."""
    value_sharded, param_sharded = is_dtensor(value), is_dtensor(p)
    if not (value_sharded or param_sharded):
        return value
    if not (value_sharded and param_sharded):
        raise ValueError(f"{path} is {'a DTensor' if value_sharded else 'a plain tensor'} but "
                         f"parameter {tuple(p.shape)} is {'a DTensor' if param_sharded else 'not'}"
                         ": load a state saved with the same FSDP2 wrapping (with "
                         "torch.distributed.checkpoint, into this optimizer's state_dict())")
    if value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
        raise ValueError(f"{path} is sharded as {tuple(value.placements)} on "
                         f"{value.device_mesh}, parameter as {tuple(p.placements)} on "
                         f"{p.device_mesh}: load it through torch.distributed.checkpoint into "
                         "this optimizer's state_dict(), which reshards it")
    return value.to_local()


def _finite(value: torch.Tensor, path: str, nonnegative: bool = True) -> None:
    """Every element finite (and >= 0), else a ValueError naming the first bad one."""
    bad = ~torch.isfinite(value)
    if nonnegative:
        bad |= value < 0
    if not bool(bad.any()):
        return
    i = int(bad.reshape(-1).nonzero()[0, 0])
    v = value.reshape(-1)[i].item()
    where = {0: path, 1: f"{path}[{i}]"}.get(value.dim(), f"{path} (flat element {i})")
    raise ValueError(f"{where} is {v}, expected a finite number" + (" >= 0" if nonnegative else ""))
