"""Steps are atomic: a fault at any point of a step leaves the state as before or after it.

Fault injection: every backend op, every `Line` method (on Triton: every kernel launch, and
the plain copies), every closure call and every backward is a numbered point. For each point
of a whole measurement and an update, a fresh run raises there (or sends a real SIGINT right
after it), and the state (parameters, directions, gradients, line, counters, phase) must then
be the fault-free run's state before that call (the call is then repeated) or after it; or,
for a fault among the line evaluations, the parameters must be as before it, with the
measurement ended as interrupted. Twenty more steps must then train, bit for bit as the
fault-free run where the state was before or after.
"""
import math
import signal
from dataclasses import asdict

import pytest
import torch

from labpal_fast import LABPAL
from labpal_fast.line import Line

from backend_cases import FAST, need
from helpers import batches, closure_for, small_net

OPS = ("accumulate", "form_direction", "train_update", "line_move", "save_origin",
       "restore_origin", "save_direction", "restore_direction", "clear_direction", "zero_grad",
       "grad_sqnorm", "ulp_sqnorm")
LINE_METHODS = ("reset_samples", "record", "set_partials", "abandon_code", "position_coef",
                "target_coef", "train_coef", "fit", "drop_unless_repeated", "clip_scale",
                "set_multiplier", "set_resolution", "fall_back", "scaled", "unscale",
                "update_loss_scale", "unscale_slope", "check_coef", "record_check", "check_step",
                "noise_ratio")
# what launches no kernel on Triton
COPIES = ("save_origin", "restore_origin", "save_direction", "restore_direction",
          "clear_direction", "zero_grad")
# (and the robust fit: Line's torch math on Triton as well, docs/algorithm.md)
LINE_COPIES = ("reset_samples", "set_partials", "drop_unless_repeated", "clip_scale",
               "set_multiplier", "set_resolution", "fit", "fall_back", "scaled", "unscale",
               "update_loss_scale", "unscale_slope", "check_coef", "record_check", "check_step",
                "noise_ratio")
K, M = 2, 2          # approximation_batches, micro-batches per update
WINDOW = K * M + M  # the calls faults are injected into: a measurement and an update
MORE = 20            # steps after the fault


class Faults:
    """Numbers the points; raises (or sends SIGINT) at point `at` of the current run."""

    def __init__(self):
        self.n, self.at, self.kind, self.where = 0, None, "raise", None

    def tick(self, where):
        self.n += 1
        if self.n == self.at:
            self.where = where
            if self.kind == "raise":
                raise KeyboardInterrupt(f"injected at {where}")
            signal.raise_signal(signal.SIGINT)


class _Tripwire(torch.autograd.Function):
    """The identity, whose backward is a fault point: it runs after the second layer's
    gradients reached the flat buffer and before the first layer's (a backward that fails
    halfway)."""

    @staticmethod
    def forward(ctx, x, faults):
        ctx.faults = faults
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.faults.tick("backward")
        return g, None


class Net(torch.nn.Module):
    """Two flats, an fp32 layer and an fp16 one (both on Triton's kernels: its fused update)."""

    def __init__(self, faults):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(6, 8)
        self.b = torch.nn.Linear(8, 3).half()
        self.faults = faults

    def forward(self, x):
        h = _Tripwire.apply(torch.tanh(self.a(x)), self.faults)
        return self.b(h.half()).float()


def _closure(net, x, y, faults):
    def closure():
        faults.tick("closure")
        return torch.nn.functional.cross_entropy(net(x), y)
    return closure


def _make(faults, monkeypatch, device="cpu"):
    net = Net(faults).to(device)
    opt = LABPAL([{"params": net.a.parameters(), "weight_decay": 1e-3},
                  {"params": net.b.parameters()}], model=net, momentum=0.5,
                 approximation_batches=K, batch_size_schedule=((0, M),), noise_factor=1.0,
                 direction_norm_range=(0.0, math.inf),
                 sample_positions=(0.0, 0.1, 0.3))  # apart enough for fp16 losses
    for name in LINE_METHODS if opt.backend != "triton" else LINE_COPIES:
        monkeypatch.setattr(opt.line, name, _wrap(getattr(opt.line, name), faults, name))
    return net, opt


def _wrap(fn, faults, name=None):
    """fn, a fault point; named `name`, or for a launch by its kernel."""
    def wrapped(*args, **kwargs):
        where = name or getattr(args[0], "fn", args[0]).__name__
        if faults.kind == "raise":  # an op that fails raises before it writes
            faults.tick(where)
        out = fn(*args, **kwargs)
        if faults.kind == "signal":  # Ctrl-C right after the op wrote
            faults.tick(where)
        return out
    return wrapped


def _patch_backend(opt, faults, monkeypatch):
    """The backend is one shared instance: patched once, undone after the test. Triton's ops
    and line methods are one kernel launch each, its fused update several: there the points
    are the launches, and the plain copies it inherits."""
    names = OPS
    if opt.backend == "triton":
        from labpal_fast.ops import triton as tri
        monkeypatch.setattr(tri, "_launch", _wrap(tri._launch, faults))
        names = COPIES
    for name in names:
        monkeypatch.setattr(opt.ops, name, _wrap(getattr(opt.ops, name), faults, name))


def _state(net, opt):
    """Everything a later step depends on, copied."""
    return {"params": [p.detach().clone() for p in net.parameters()],
            "directions": [f.direction.clone() for f in opt.flats],
            "grads": [f.grad.clone() for f in opt.flats],  # zero between calls
            "grad_sums": [None if f.grad_sum is None else f.grad_sum.clone() for f in opt.flats],
            "line": [getattr(opt.line, name).clone() for name in Line.STATE],
            "counters": asdict(opt.counters),
            "phase": (opt.phase, *_measurement_calls(opt))}


def _measurement_calls(opt):
    """The running measurement's calls and kept closures (0, 0 when none runs)."""
    meas = opt._measurement
    return (0, 0) if meas is None else (meas.calls, len(meas.closures))


def _diff(a, b, where="state"):
    """Where two states differ (bit for bit), or None."""
    if isinstance(a, torch.Tensor):
        return None if a.dtype == b.dtype and torch.equal(a, b) else where
    if isinstance(a, dict):
        a, b, keys = list(a.values()), list(b.values()), list(a)
    else:
        keys = range(len(a)) if isinstance(a, (list, tuple)) else None
    if keys is None or len(a) != len(b):
        return None if a == b else where
    return next((d for k, x, y in zip(keys, a, b) if (d := _diff(x, y, f"{where}.{k}"))), None)


def _full_loss(net, data):
    with torch.no_grad():
        return sum(float(torch.nn.functional.cross_entropy(net(x), y)) for x, y in data)


def _run(kind, monkeypatch, device="cpu"):
    faults = Faults()
    data = [(x.to(device), y.to(device)) for x, y in batches(6, 16, 6, seed=5)]
    n_calls = WINDOW + MORE + 1
    script = [data[i % len(data)] for i in range(n_calls)]

    # the fault-free run: the state before call 0 and after every call
    net, opt = _make(faults, monkeypatch, device)
    _patch_backend(opt, faults, monkeypatch)
    ref = [_state(net, opt)]
    points = None
    for i, (x, y) in enumerate(script):
        opt.step(_closure(net, x, y, faults))
        ref.append(_state(net, opt))
        if i == WINDOW - 1:
            points = faults.n
    assert opt.measurements()[0]["valid"] and opt.updates > 10
    start_loss = _full_loss(Net(Faults()).to(device), data)
    assert _full_loss(net, data) < start_loss

    outcomes = {}
    for at in range(1, points + 1):
        faults.n, faults.at, faults.kind = 0, at, kind
        net, opt = _make(faults, monkeypatch, device)
        call = 0
        while True:  # the calls before the fault
            x, y = script[call]
            try:
                opt.step(_closure(net, x, y, faults))
            except KeyboardInterrupt:
                break
            call += 1
            assert call < WINDOW, f"point {at}: no fault"
        where = faults.where
        outcome = _outcome(net, opt, ref, call)
        outcomes.setdefault(outcome, set()).add(where)
        assert opt._broken is None and not opt._stepping, (at, where)
        assert opt.phase in ("training", "measuring")
        if opt.phase == "measuring":
            meas = opt._measurement  # a closure (and its random state) kept per call made
            made = opt.counters.calls - opt.counters.measure_start_call
            assert 0 < meas.calls < K * M and meas.calls == made
            assert len(meas.rngs) == len(meas.own_backward) == made
        else:
            assert 0 <= opt.counters.acc < M and opt._measurement is None
        updates = opt.updates
        first = call if outcome == "before" else call + 1  # "before": the call is repeated
        for i in range(first, first + MORE):
            opt.step(_closure(net, *script[i], faults))
            if outcome != "interrupted":
                diff = _diff(_state(net, opt), ref[i + 1])
                assert diff is None, f"fault {at} ({where}, {outcome}): call {i} differs at {diff}"
        assert opt.updates > updates
        assert _full_loss(net, data) < start_loss
        assert all(torch.isfinite(p).all() for p in net.parameters())
    return outcomes


def _outcome(net, opt, ref, call):
    """before / after / interrupted, checked against the fault-free run's states."""
    state = _state(net, opt)
    if opt.counters.calls == call:
        diff = _diff(state, ref[call])
        assert diff is None, f"not as before the call: {diff}"
        return "before"
    records = opt.measurements()
    if records and (records[-1]["reason"] or "").startswith("interrupted"):
        assert _diff(state["params"], ref[call]["params"]) is None, "θ not at the line's origin"
        return "interrupted"
    diff = _diff(state, ref[call + 1])
    assert diff is None, f"not as after the call: {diff}"
    return "after"


def test_the_fault_points_are_every_op_and_line_method():
    from labpal_fast.ops.base import Backend

    def public(cls):
        return {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}

    composites = {"direction", "update", "move", "finish", "resolution"}  # made of the ops
    assert public(Backend) - composites - {"unavailable_reason", "make_line"} == set(OPS)
    assert public(Line) == set(LINE_METHODS)


def test_every_fault_point_leaves_a_state_before_or_after_the_call(backend, monkeypatch):
    outcomes = _run("raise", monkeypatch)
    # closure and backward faults drop the call; op faults finish it; faults during the line
    # evaluations (and the ops of the final call before them: resolve_positions and the saved
    # origin, call k·m) end the measurement
    assert outcomes["before"] == {"closure", "backward"}, outcomes
    if backend == "triton":  # the fused update's launches
        assert {"_accumulate_kernel", "_direction_kernel", "_reduce_kernel",
                "_train_update_kernel", "_abandon_kernel", "fit"} <= outcomes["after"]
        assert {"_move_kernel", "_record_kernel", "closure", "set_resolution"} \
            <= outcomes["interrupted"]
    else:
        assert {"accumulate", "form_direction", "train_update", "train_coef", "abandon_code",
                "fit"} <= outcomes["after"]
        assert {"line_move", "record", "closure", "ulp_sqnorm", "set_resolution",
                "save_origin"} <= outcomes["interrupted"]
    # the step check's evaluation is part of the line evaluations
    assert {"check_coef", "record_check"} <= outcomes["interrupted"]


@pytest.mark.cuda
@pytest.mark.parametrize("name", FAST)
def test_every_fault_point_on_cuda(name, monkeypatch):
    need(name, "cuda")
    monkeypatch.setenv("LABPAL_FAST_BACKEND", name)
    outcomes = _run("raise", monkeypatch, "cuda")
    assert outcomes["before"] == {"closure", "backward"}, outcomes


def test_ctrl_c_is_held_back_during_the_writes(monkeypatch):
    """A real SIGINT at each point: during the closure or the line evaluations it interrupts
    at once; during the optimizer's writes it arrives when they are done. (Holding it back
    does not depend on the backend: one suffices.)"""
    monkeypatch.setenv("LABPAL_FAST_BACKEND", "eager")
    outcomes = _run("signal", monkeypatch)
    assert outcomes["before"] == {"closure", "backward"}, outcomes
    assert "train_update" in outcomes["after"] and "line_move" in outcomes["interrupted"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_an_op_that_raises_twice_breaks_the_optimizer_loudly(backend, monkeypatch):
    net = small_net(0)
    opt = LABPAL(net.parameters(), approximation_batches=1, direction_norm_range=(0.0, math.inf))
    data = batches(2, 8, 6, seed=0)
    real = opt.ops.save_direction

    def broken_device(*args, **kwargs):
        raise RuntimeError("device lost")

    # the first call measures: its writes record the loss, then keep d (and fail, twice)
    monkeypatch.setattr(opt.ops, "save_direction", broken_device)
    with pytest.raises(RuntimeError, match="device lost"):
        opt.step(closure_for(net, *data[0]))
    monkeypatch.setattr(opt.ops, "save_direction", real)
    # the call was half made: refused from now on, even once the op works again
    with pytest.raises(RuntimeError, match="broken: RuntimeError: device lost left a step's"):
        opt.step(closure_for(net, *data[1]))


def test_a_failed_construction_leaves_the_model_as_it_was(backend, monkeypatch):
    from labpal_fast import ops

    net = small_net(0)
    net[0].weight.grad = torch.ones_like(net[0].weight)
    before = [(p.data_ptr(), p.grad, p.detach().clone()) for p in net.parameters()]

    def unchanged():
        for p, (ptr, grad, value) in zip(net.parameters(), before):
            assert p.data_ptr() == ptr and p.grad is grad and torch.equal(p, value)

    with pytest.raises(ValueError, match="backend must be one of"):
        LABPAL(net.parameters(), backend="nope")
    unchanged()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ops.load(backend), "make_line", interrupted)  # after the flats exist
    with pytest.raises(KeyboardInterrupt):
        LABPAL(net.parameters())
    unchanged()


def test_step_is_not_reentrant(backend):
    net = small_net(0)
    opt = LABPAL(net.parameters(), approximation_batches=1, direction_norm_range=(0.0, math.inf))
    x, y = batches(1, 8, 6, seed=0)[0]

    def nested():
        opt.step(closure_for(net, x, y))
        return closure_for(net, x, y)()

    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match="called while a step was running"):
        opt.step(nested)
    assert all(torch.equal(p, q) for p, q in zip(before, net.parameters()))
    assert opt.counters.calls == 0 and opt.measurements() == []
    opt.step(closure_for(net, x, y))
    assert opt.updates == 1
