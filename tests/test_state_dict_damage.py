"""A damaged state dict is refused whole: ValueError naming the entry, nothing written, and the
optimizer trains on exactly as if the load had never been tried (docs: issue 11, part A)."""
import copy
import math
import re
from dataclasses import asdict, fields

import numpy as np
import pytest
import torch

from labpal_fast import LABPAL
from labpal_fast.line import Line
from labpal_fast.optimizer import Counters

from helpers import batches, closure_for, labpal_entry, small_net

pytestmark = pytest.mark.usefixtures("backend")

# m = 2 from the start, k = 1: a measurement is calls 0-1, then updates every 2 calls, and a
# state saved after an odd number of calls holds a running gradient sum (acc = 1)
HYPER = dict(momentum=0.9, approximation_batches=1, reuse_updates=2, warmup_updates=0,
             averaging_window=2, batch_size_schedule=((0, 2),), noise_factor=1.0,
             sample_positions=(0.0, 0.05, 0.1), direction_norm_range=(0.0, math.inf))
DATA = batches(12, 16, 6, seed=11)
BEFORE, AFTER = 3, 10  # the target has made BEFORE calls when the load fails, then goes on


def fresh(seed):
    net = small_net(seed)
    return net, LABPAL([{"params": net[0].parameters(), "weight_decay": 1e-3},
                        {"params": net[2].parameters()}], **HYPER)


def run(net, opt, start, stop):
    for i in range(start, stop):
        opt.step(closure_for(net, *DATA[i]))


_cache = {}


def saved_state(backend, with_params=False):
    """Another run's state (other initial values, 5 calls: acc = 1), to be damaged; and that
    run's parameters, which travel in the model's own state dict."""
    if backend not in _cache:
        net, opt = fresh(seed=1)
        run(net, opt, 0, 5)
        assert opt.counters.acc == 1 and opt.counters.has_rate and opt.updates == 2
        _cache[backend] = opt.state_dict(), net.state_dict()
    state, params = copy.deepcopy(_cache[backend])
    # in the layout of versions 1-3, which loads as well (LABPAL's entry at the top level, the
    # records a list): the paths below name it so
    state["labpal"] = state["param_groups"][0].pop("labpal")
    state["labpal"]["records"] = list(state["labpal"]["records"])
    return (state, params) if with_params else state


def reference(backend):
    """Parameters and measurements of a run that never saw a failed load."""
    key = (backend, "reference")
    if key not in _cache:
        net, opt = fresh(seed=0)
        run(net, opt, 0, AFTER)
        assert len(opt.measurements()) >= 2  # a measurement runs after the failed load
        _cache[key] = ([p.detach().clone() for p in net.parameters()], repr(opt.measurements()),
                       asdict(opt.counters))
    return _cache[key]


def bits(t):
    return None if t is None else bytes(t.detach().cpu().reshape(-1).view(torch.uint8).numpy())


def snapshot(opt):
    """Every bit the optimizer holds: flat buffers, line state, counters, phase, groups, records."""
    return {
        "flats": [{name: bits(getattr(f, name)) for name in
                   ("param", "grad", "direction", "grad_sum", "origin")} for f in opt.flats],
        "views": [(p.data_ptr(), p.grad.data_ptr()) for f in opt.flats for p in f.params],
        "line": {name: bits(getattr(opt.line, name)) for name in Line.STATE},
        "counters": asdict(opt.counters),
        "phase": (opt.phase, None if opt._measurement is None else
                  (opt._measurement.calls, opt._measurement.formed)),
        "groups": [(g["weight_decay"], g["lr"] is opt.line.lr, [id(p) for p in g["params"]],
                    sorted(g)) for g in opt.param_groups],
        "records": (len(opt._records), repr(opt.measurements())),
        "hyper": opt.hyper,
    }


# ------------------------------------------------------------------------------ the damage
def delete(*keys):
    def damage(sd):
        container = sd
        for key in keys[:-1]:
            container = container[key]
        del container[keys[-1]]
    return damage


def put(*keys_and_value):
    *keys, value = keys_and_value

    def damage(sd):
        container = sd
        for key in keys[:-1]:
            container = container[key]
        container[keys[-1]] = value(container[keys[-1]]) if callable(value) else value
    return damage


def path(*keys):
    return "state_dict" + "".join(f"[{k!r}]" for k in keys)


NAN, INF = math.nan, math.inf
f64 = dict(dtype=torch.float64)

# (id, damage, the path the message must name)
DAMAGE = [
    # top level and the "labpal" part
    *[(f"missing-{k}", delete(k), path(k)) for k in ("state", "param_groups", "labpal")],
    ("unknown-top-key", put("extra", 1), "state_dict has unknown key(s) ['extra']"),
    *[(f"missing-labpal-{k}", delete("labpal", k), path("labpal", k))
      for k in ("version", "hyper", "shapes", "counters", "line", "records")],
    ("unknown-labpal-key", put("labpal", "rng", 1), path("labpal") + " has unknown key"),
    ("labpal-not-a-dict", put("labpal", [1]), path("labpal") + " must be a dict"),
    ("version-true", put("labpal", "version", True), path("labpal", "version") + " is True"),
    ("version-str", put("labpal", "version", "1"), path("labpal", "version") + " is '1'"),
    # hyper-parameters that shape the line state
    ("hyper-window", put("labpal", "hyper", "averaging_window", 3),
     path("labpal", "hyper", "averaging_window")),
    ("hyper-positions", put("labpal", "hyper", "sample_positions", (0.0, 0.05, 0.2)),
     path("labpal", "hyper", "sample_positions")),
    ("hyper-missing-window", delete("labpal", "hyper", "averaging_window"),
     path("labpal", "hyper", "averaging_window")),
    # counters: every field is required but the measured ν, which states from before it lack
    # (tests/test_noise_measure.py loads one without it); a bad ν is refused
    *[(f"missing-counter-{f.name}", delete("labpal", "counters", f.name),
       path("labpal", "counters", f.name)) for f in fields(Counters) if f.name != "noise"],
    ("counter-noise-negative", put("labpal", "counters", "noise", -1.0),
     path("labpal", "counters", "noise")),
    ("counter-noise-nan", put("labpal", "counters", "noise", math.nan),
     path("labpal", "counters", "noise")),
    ("unknown-counter", put("labpal", "counters", "phase", "training"),
     path("labpal", "counters") + " has unknown key(s) ['phase']"),
    ("calls-bool", put("labpal", "counters", "calls", True), path("labpal", "counters", "calls")),
    ("calls-float", put("labpal", "counters", "calls", 5.0), path("labpal", "counters", "calls")),
    ("calls-tensor-vector", put("labpal", "counters", "calls", torch.tensor([5])),
     path("labpal", "counters", "calls")),
    ("updates-negative", put("labpal", "counters", "updates", -1),
     path("labpal", "counters", "updates")),
    ("m-negative", put("labpal", "counters", "m", -1), path("labpal", "counters", "m")),
    ("m-too-large", put("labpal", "counters", "m", 10_001), path("labpal", "counters", "m")),
    ("acc-equals-m", put("labpal", "counters", "acc", 2), path("labpal", "counters", "acc")),
    ("acc-without-m", lambda sd: sd["labpal"]["counters"].update(m=0),
     path("labpal", "counters", "acc")),
    ("pending-int", put("labpal", "counters", "pending", 1),
     path("labpal", "counters", "pending")),
    ("last-end-ahead", put("labpal", "counters", "last_end", 99),
     path("labpal", "counters", "last_end")),
    # line state: every tensor required, of this optimizer's shape and dtype; rates finite >= 0
    *[(f"missing-line-{name}", delete("labpal", "line", name), path("labpal", "line", name))
      for name in Line.STATE],
    ("unknown-line-key", put("labpal", "line", "scale", torch.tensor(1.0, **f64)),
     path("labpal", "line") + " has unknown key(s) ['scale']"),
    ("s_upd-nan", put("labpal", "line", "s_upd", torch.tensor(NAN, **f64)),
     path("labpal", "line", "s_upd") + " is nan"),
    ("s_upd-inf", put("labpal", "line", "s_upd", torch.tensor(INF, **f64)),
     path("labpal", "line", "s_upd") + " is inf"),
    ("s_upd-negative", put("labpal", "line", "s_upd", torch.tensor(-0.1, **f64)),
     path("labpal", "line", "s_upd") + " is -0.1"),
    ("s_upd-float32", put("labpal", "line", "s_upd", torch.tensor(0.1)),
     path("labpal", "line", "s_upd") + " has dtype torch.float32"),
    ("s_upd-python-number", put("labpal", "line", "s_upd", 0.1),
     path("labpal", "line", "s_upd") + " must be a tensor"),
    ("eta-nan", put("labpal", "line", "eta", torch.tensor(NAN, **f64)),
     path("labpal", "line", "eta")),
    ("eta-minus-inf", put("labpal", "line", "eta", torch.tensor(-INF, **f64)),
     path("labpal", "line", "eta")),
    ("lr-inf", put("labpal", "line", "lr", torch.tensor(INF, **f64)), path("labpal", "line", "lr")),
    ("norm_mean-nan", put("labpal", "line", "norm_mean", torch.tensor(NAN, **f64)),
     path("labpal", "line", "norm_mean") + " is nan"),
    ("norm_mean-negative", put("labpal", "line", "norm_mean", torch.tensor(-2.0, **f64)),
     path("labpal", "line", "norm_mean") + " is -2.0"),
    ("norm_mean-vector", put("labpal", "line", "norm_mean", torch.zeros(1, **f64)),
     path("labpal", "line", "norm_mean") + " has shape (1,)"),
    # the loss scale (version 3): a number in (0, 2**64], its counter an int64 >= 0
    ("loss_scale-zero", put("labpal", "line", "loss_scale", torch.tensor(0.0, **f64)),
     path("labpal", "line", "loss_scale") + " is 0.0, expected a number in (0, "),
    ("loss_scale-nan", put("labpal", "line", "loss_scale", torch.tensor(NAN, **f64)),
     path("labpal", "line", "loss_scale") + " is nan"),
    ("loss_scale-negative", put("labpal", "line", "loss_scale", torch.tensor(-2.0, **f64)),
     path("labpal", "line", "loss_scale") + " is -2.0"),
    ("loss_scale-huge", put("labpal", "line", "loss_scale", torch.tensor(2.0 ** 65, **f64)),
     path("labpal", "line", "loss_scale") + " is 3.6893488147419103e+19"),
    ("scale_good-negative", put("labpal", "line", "scale_good", torch.tensor(-1)),
     path("labpal", "line", "scale_good") + " is -1"),
    ("scale_good-float", put("labpal", "line", "scale_good", torch.tensor(1.0)),
     path("labpal", "line", "scale_good") + " has dtype torch.float32"),
    ("hist_s-nan", put("labpal", "line", "hist_s", torch.tensor([0.5, NAN], **f64)),
     path("labpal", "line", "hist_s") + "[1] is nan"),
    ("hist_eta-negative", put("labpal", "line", "hist_eta", torch.tensor([-1.0, 0.5], **f64)),
     path("labpal", "line", "hist_eta") + "[0] is -1.0"),
    ("hist_s-longer", put("labpal", "line", "hist_s", torch.zeros(3, **f64)),
     path("labpal", "line", "hist_s") + " has shape (3,)"),
    ("hist_n-negative", put("labpal", "line", "hist_n", torch.tensor(-1)),
     path("labpal", "line", "hist_n")),
    ("hist_n-float", put("labpal", "line", "hist_n", torch.tensor(1.0, **f64)),
     path("labpal", "line", "hist_n") + " has dtype torch.float64"),
    ("skipped-negative", put("labpal", "line", "skipped_samples", torch.tensor(-3)),
     path("labpal", "line", "skipped_samples")),
    ("sums-shape", put("labpal", "line", "sums", torch.zeros(4, **f64)),
     path("labpal", "line", "sums")),
    ("partials-meta", put("labpal", "line", "partials", torch.zeros(5, device="meta", **f64)),
     path("labpal", "line", "partials")),
    # per-parameter entries: parameter 0 is net[0].weight (16, 6)
    ("missing-entry", delete("state", 0), path("state", 0)),
    ("unknown-entry", put("state", 9, {"direction": torch.zeros(3)}),
     path("state") + " has unknown key(s) [9]"),
    ("missing-direction", delete("state", 0, "direction"), path("state", 0, "direction")),
    ("unknown-entry-key", put("state", 0, "momentum_buffer", torch.zeros(16, 6)),
     path("state", 0) + " has unknown key(s) ['momentum_buffer']"),
    ("direction-broadcasts", put("state", 0, "direction", lambda d: d[:1]),
     path("state", 0, "direction") + " has shape (1, 6), expected (16, 6)"),
    ("direction-transposed", put("state", 0, "direction", lambda d: d.T.contiguous()),
     path("state", 0, "direction")),
    ("direction-int", put("state", 0, "direction", lambda d: d.to(torch.int64)),
     path("state", 0, "direction") + " has dtype torch.int64"),
    ("direction-nan", put("state", 1, "direction", lambda d: d.index_fill(0, torch.tensor(3), NAN)),
     path("state", 1, "direction") + "[3] is nan"),
    ("direction-overflows-fp32", put("state", 0, "direction", lambda d: d.double() * 1e300),
     path("state", 0, "direction")),
    ("direction-a-list", put("state", 0, "direction", lambda d: d.tolist()),
     path("state", 0, "direction") + " must be a tensor"),
    ("grad_sum-missing", delete("state", 2, "grad_sum"),
     path("state", 2, "grad_sum") + " is missing"),
    ("grad_sum-shape", put("state", 3, "grad_sum", lambda s: s[:2]), path("state", 3, "grad_sum")),
    # groups and shapes
    ("weight_decay-nan", put("param_groups", 0, "weight_decay", NAN),
     path("param_groups", 0, "weight_decay") + " is nan"),
    ("weight_decay-negative", put("param_groups", 1, "weight_decay", -1e-3),
     path("param_groups", 1, "weight_decay")),
    ("group-unknown-key", put("param_groups", 0, "lr", 0.1),
     path("param_groups", 0) + " has unknown key(s) ['lr']"),
    ("group-index-twice", put("param_groups", 1, "params", [1, 3]),
     path("param_groups", 1, "params", 0) + " is 1, an index listed before"),
    ("group-index-str", put("param_groups", 1, "params", ["2", "3"]),
     path("param_groups", 1, "params", 0)),
    ("groups-a-dict", put("param_groups", {}), path("param_groups") + " must be a list"),
    ("shape-other", put("labpal", "shapes", 0, ((6, 16), "torch.float32")),
     path("labpal", "shapes", 0)),
    # records
    ("records-a-dict", put("labpal", "records", {}), path("labpal", "records") + " must be a list"),
    ("record-a-list", put("labpal", "records", 0, [1, 2]), path("labpal", "records", 0)),
    ("record-missing-counts", delete("labpal", "records", 0, "counts"),
     path("labpal", "records", 0, "counts")),
    ("record-counts-shape", put("labpal", "records", 0, "counts", torch.zeros(2, **f64)),
     path("labpal", "records", 0, "counts")),
    ("record-call-negative", put("labpal", "records", 0, "call", -1),
     path("labpal", "records", 0, "call")),
    ("record-reason-number", put("labpal", "records", 0, "reason", 3),
     path("labpal", "records", 0, "reason")),
    ("record-unknown-key", put("labpal", "records", 0, "closure", "not saved"),
     path("labpal", "records", 0) + " has unknown key(s) ['closure']"),
]


@pytest.mark.parametrize("damage,where", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_state_is_refused_whole_and_training_goes_on(backend, damage, where):
    sd = saved_state(backend)
    replaced = damage(sd)
    net, opt = fresh(seed=0)
    run(net, opt, 0, BEFORE)
    assert opt.counters.acc == 1  # a running sum, a direction, a rate: all could be overwritten
    before = snapshot(opt)
    with pytest.raises(ValueError) as error:
        opt.load_state_dict(sd if replaced is None else replaced)
    assert where in str(error.value)
    assert snapshot(opt) == before
    # it trains on exactly as a twin that never saw the failed load
    run(net, opt, BEFORE, AFTER)
    params, records, counters = reference(backend)
    for p, q in zip(net.parameters(), params):
        assert torch.equal(p, q)
    assert repr(opt.measurements()) == records and asdict(opt.counters) == counters


def test_state_dict_that_is_not_a_dict_is_refused():
    net, opt = fresh(seed=0)
    with pytest.raises(ValueError, match="state_dict must be a dict.*not saved by LABPAL"):
        opt.load_state_dict([opt.state_dict()])


def test_an_unknown_version_names_both(backend):
    sd = saved_state(backend)
    sd["labpal"]["version"] = 5
    sd["labpal"]["format_of_the_future"] = {}  # other keys are not what the error is about
    net, opt = fresh(seed=0)
    with pytest.raises(ValueError, match=re.escape(
            "state_dict['labpal']['version'] is 5: this LABPAL reads state versions 1, 2, 3, 4")):
        opt.load_state_dict(sd)


# ------------------------------------------------------------------------------ what loads
def resumed_from(sd, backend):
    """A fresh optimizer (other initial values) loads `sd` and runs calls 5..AFTER."""
    net, opt = fresh(seed=2)
    net.load_state_dict(saved_state(backend, with_params=True)[1])
    opt.load_state_dict(sd)
    run(net, opt, 5, AFTER)
    return [p.detach().clone() for p in net.parameters()], repr(opt.measurements())


def test_numbers_may_come_as_tensors_or_numpy_and_sequences_as_lists(backend):
    """Other checkpoint layouts store numbers as 0-dim tensors or numpy scalars: same result."""
    expected = resumed_from(saved_state(backend), backend)
    sd = saved_state(backend)
    lab = sd["labpal"]
    lab["version"] = torch.tensor(3)
    lab["counters"] = {k: v if v is None else torch.tensor(v) if i % 2 else v
                       if isinstance(v, bool) else np.int64(v)
                       for i, (k, v) in enumerate(lab["counters"].items())}
    lab["hyper"] = {k: list(v) if isinstance(v, tuple) else v for k, v in lab["hyper"].items()}
    lab["shapes"] = {k: [list(shape), dtype] for k, (shape, dtype) in lab["shapes"].items()}
    sd["param_groups"] = tuple({"params": tuple(g["params"]),
                                "weight_decay": torch.tensor(g["weight_decay"], **f64)}
                               for g in sd["param_groups"])
    lab["records"][0]["call"] = np.int32(lab["records"][0]["call"])
    lab["records"][0]["averaged"] = torch.tensor(lab["records"][0]["averaged"])
    got = resumed_from(sd, backend)
    assert got[1] == expected[1]
    for p, q in zip(got[0], expected[0]):
        assert torch.equal(p, q)


def test_a_version_1_state_resumes_exactly(backend):
    """Version 1 (before lr_multiplier_schedule) had no s_base / eta_base: the measured rate
    was the rate in use."""
    expected = resumed_from(saved_state(backend), backend)
    sd = saved_state(backend)
    sd["labpal"]["version"] = 1
    del sd["labpal"]["line"]["s_base"], sd["labpal"]["line"]["eta_base"]
    del sd["labpal"]["line"]["norm_mean"]  # 0 in NSGD mode: what a missing one loads as
    del sd["labpal"]["line"]["loss_scale"], sd["labpal"]["line"]["scale_good"]
    got = resumed_from(sd, backend)
    assert got[1] == expected[1]
    for p, q in zip(got[0], expected[0]):
        assert torch.equal(p, q)
    # and a version-2 state without them is damaged
    sd["labpal"]["version"] = 2
    with pytest.raises(ValueError, match=re.escape("['line']['s_base'] is missing")):
        fresh(seed=0)[1].load_state_dict(sd)


def test_a_version_2_state_resumes_with_the_running_mean_of_the_norm_unknown(backend):
    """Robust SGD keeps n̄ (`norm_mean`) since version 3. A version-2 state has none: it loads
    as 0 (unknown), so the next TRAINING update's ‖d‖ starts it again, exactly as a version-3
    state whose n̄ is 0; the version-3 state itself resumes exactly (n̄ and all)."""
    def sgd(seed):
        net = small_net(seed)
        return net, LABPAL(net.parameters(), mode="SGD", sgd_rate="robust", **HYPER)

    net, opt = sgd(seed=1)
    run(net, opt, 0, 5)
    saved, params = opt.state_dict(), copy.deepcopy(net.state_dict())
    lab = labpal_entry(saved)
    assert lab["version"] == 4 and float(lab["line"]["norm_mean"]) > 0
    run(net, opt, 5, AFTER)
    straight = [p.detach().clone() for p in net.parameters()], opt.line.norm_mean.clone()

    def resumed(sd):
        net2, opt2 = sgd(seed=2)
        net2.load_state_dict(params)
        opt2.load_state_dict(sd)
        run(net2, opt2, 5, AFTER)
        return [p.detach().clone() for p in net2.parameters()], opt2.line.norm_mean.clone()

    got = resumed(copy.deepcopy(saved))
    assert all(torch.equal(p, q) for p, q in zip(got[0], straight[0]))
    assert torch.equal(got[1], straight[1])
    unknown = copy.deepcopy(saved)
    labpal_entry(unknown)["line"]["norm_mean"].zero_()
    v2 = copy.deepcopy(saved)
    labpal_entry(v2)["version"] = 2  # as saved then: no n̄, no loss scaling state
    for name in ("norm_mean", "loss_scale", "scale_good"):
        del labpal_entry(v2)["line"][name]
    expected, got = resumed(unknown), resumed(v2)
    assert all(torch.equal(p, q) for p, q in zip(got[0], expected[0]))
    assert torch.equal(got[1], expected[1]) and float(got[1]) > 0
    assert not torch.equal(got[1], straight[1])  # n̄ was started again
    # a version-3 state without it is damaged
    labpal_entry(v2)["version"] = 3
    with pytest.raises(ValueError, match=re.escape("['line']['norm_mean'] is missing")):
        sgd(seed=0)[1].load_state_dict(v2)


def test_a_grad_sum_is_needed_only_while_gradients_are_being_summed(backend):
    net, opt = fresh(seed=1)
    run(net, opt, 0, 4)
    sd = opt.state_dict()  # acc = 0: the running sum is saved as zero (a fixed layout)
    assert opt.counters.acc == 0 and all(not e["grad_sum"].any() for e in sd["state"].values())
    for e in sd["state"].values():
        del e["grad_sum"]
    net2, opt2 = fresh(seed=3)
    opt2.load_state_dict(sd)
    # and a sum saved with acc = 0 is checked but not needed
    sd["state"][0]["grad_sum"] = torch.zeros(16, 6)
    opt2.load_state_dict(sd)
    sd["state"][0]["grad_sum"] = torch.zeros(6, 16)
    with pytest.raises(ValueError, match=re.escape("state_dict['state'][0]['grad_sum'] has shape")):
        opt2.load_state_dict(sd)
