"""Ctrl-C anywhere in a step (issue 20, item 4): a trace hook raises a real SIGINT at the k-th
"call" event, and separately at the k-th "line" event, inside one step(), for every k, in four
kinds of call: a TRAINING call, an accumulating call (m > 1), a measurement's first call and its
line-evaluating call. After each, the parameters are bit for bit as before the call or as after
it, and the next steps train. Where CPython delivers the signal does not matter: one delivered
as step() returns (its flag not yet cleared) once refused every later step for good.

The events counted are the optimizer's own (its lines; its calls, and its calls out into torch's
functions and context managers): a fault inside the closure or backward is one of
test_atomic's points. The model is two bare parameters, line evaluations without the step
check, so that a step has few events.
"""
import math
import os
import signal
import sys
import threading

import pytest
import torch

import labpal_fast
from labpal_fast import LABPAL

from helpers import batches

K = 2  # approximation_batches
# name: (m, calls before the interrupted one); with m = 1 a measurement is calls 0, 1 and call
# 2 trains; with m = 2 a measurement is calls 0-3 and call 4 accumulates
CALLS = {"training": (1, 2), "accumulating": (2, 4), "measurement's first": (1, 0),
         "line-evaluating": (1, 1)}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


OWN = os.path.dirname(labpal_fast.__file__)  # the optimizer's own code


class Events:
    """A trace hook that counts the events of one kind in the optimizer's own code (a call
    event also where its code calls out: torch's functions, context managers) and raises
    SIGINT at the k-th."""

    def __init__(self, kind, at=None):
        self.kind, self.at, self.n = kind, at, 0

    def __call__(self, frame, event, arg):
        own = frame.f_code.co_filename.startswith(OWN)
        if event == self.kind and (own or event == "call" and frame.f_back is not None and
                                   frame.f_back.f_code.co_filename.startswith(OWN)):
            self.n += 1
            if self.n == self.at:
                sys.settrace(None)  # the rest of the call untraced (faster)
                signal.raise_signal(signal.SIGINT)
        return self if own and self.kind == "line" else None


def make(m):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = LABPAL(params, approximation_batches=K, batch_size_schedule=((0, m),),
                 noise_factor=1.0, reuse_updates=3, warmup_updates=0,
                 direction_norm_range=(0.0, math.inf), resolve_positions=False,
                 step_check=False)  # fewer evaluations: fewer events
    return params, opt


def closure(params, x, y):
    w, b = params
    return ((torch.tanh(x[:, :4]) @ w + b - y[:, None]) ** 2).mean()


DATA = [(x, y.float()) for x, y in batches(16, 8, 6, seed=0)]


def step(opt, params, i, hook=None):
    """Call i of the script, traced by `hook`."""
    x, y = DATA[i]
    sys.settrace(hook)
    try:
        opt.step(lambda: closure(params, x, y))
    finally:
        sys.settrace(None)


def snapshot(params):
    return [p.detach().clone() for p in params]


def interrupted_at(name, kind, at):
    """A fresh run up to the call `name`, that call interrupted at event `at` of `kind`;
    returns the parameters before the call, after it, the optimizer and its parameters."""
    m, before = CALLS[name]
    params, opt = make(m)
    for i in range(before):
        step(opt, params, i)
    start = snapshot(params)
    try:
        step(opt, params, before, Events(kind, at))
    except BaseException:  # KeyboardInterrupt, or what torch made of it
        pass
    finally:
        # a Ctrl-C inside torch.no_grad's __exit__ leaves grad mode off for the process
        # (torch's, not LABPAL's: its steps set the mode they need); not for the later tests
        torch.set_grad_enabled(True)
    return start, params, opt


# every call kind on eager, whose ops are Python too (the most events); call events on ext.
# Triton's interpreter runs a step ~20 times slower than these: a sweep there would take
# minutes, and the optimizer's Python it would trace is theirs (its launches are one event).
SWEEPS = [("eager", name, kind) for name in CALLS for kind in ("call", "line")] + \
    [("ext", name, "call") for name in CALLS]


@pytest.mark.slow
@pytest.mark.parametrize("backend, name, kind", SWEEPS)
def test_ctrl_c_at_every_event_of_a_step_leaves_it_trainable(monkeypatch, backend, name, kind):
    from labpal_fast import ops

    reason = ops.why_unavailable(backend, [torch.device("cpu")])
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot run here: {reason}")
    monkeypatch.setenv("LABPAL_FAST_BACKEND", backend)
    m, before = CALLS[name]
    interrupted_at(name, kind, None)  # once, so that caches the later runs find are filled
    params, opt = make(m)  # the call uninterrupted: its events counted, the parameters after
    for i in range(before):
        step(opt, params, i)
    count = Events(kind)
    step(opt, params, before, count)
    after = snapshot(params)
    assert count.n > 40
    for at in range(1, count.n + 1):
        start, params, opt = interrupted_at(name, kind, at)
        now = snapshot(params)
        assert all(map(torch.equal, now, start)) or all(map(torch.equal, now, after)), at
        calls = opt.counters.calls
        step(opt, params, before + 1)  # raised "step() was called while a step was running"
        assert opt.counters.calls == calls + 1 and opt._broken is None, at
        assert all(torch.isfinite(p).all() for p in params)


def test_a_stale_flag_is_cleared_and_another_threads_step_refused(backend):
    params, opt = make(1)
    x, y = DATA[0]
    opt._stepping = threading.get_ident()  # left set (as by a Ctrl-C delivered at its clearing)
    opt.step(lambda: closure(params, x, y))
    assert opt._stepping is None and opt.counters.calls == 1

    inside, release = threading.Event(), threading.Event()

    def slow():
        inside.set()
        release.wait(10)
        return closure(params, x, y)

    worker = threading.Thread(target=lambda: opt.step(slow))
    worker.start()
    inside.wait(10)
    try:
        with pytest.raises(RuntimeError, match=r"on thread \d+ while thread \d+ runs a step"):
            opt.step(lambda: closure(params, *DATA[1]))
    finally:
        release.set()
        worker.join()
    assert opt.counters.calls == 2  # the worker's step, and not the refused one
