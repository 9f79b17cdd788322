"""LABPAL's TRAINING step against torch.optim.SGD(foreach=True, momentum 0.9) on CPU.

1. The whole TRAINING step, forward and backward included: a 50-layer MLP of 10M parameters
   in 100 tensors, batch 16. SGD: zero_grad (torch's default set_to_none=True, and False
   beside it), forward, backward, step. LABPAL: `step(closure)`
   in steady TRAINING (after its first measurement). Targets: eager <= 1.3x SGD, ext <= 1.05x.
2. The optimizer side alone on the same 10M parameters, through the backend contract
   (`Backend.update` over flat buffers and a line), beside SGD's `step()` on gradients in place;
   NSGD also with gradient clipping (`max_grad_norm`), for the ratio clip on / off.

All candidates are timed interleaved in one process (one round = one step of each); a ratio is
the median over the rounds of (its time / SGD's time in the same round), with the smallest and
largest beside it (the spread: wide when the machine is loaded, which the header then says).
Run: `make bench`, `pytest benchmarks/bench_optimizer.py -q`, or `python
benchmarks/bench_optimizer.py` for the tables alone.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import pytest
import torch

from labpal_fast import LABPAL
from labpal_fast.flat import build_flats
from labpal_fast.hyper import Hyper
from labpal_fast.ops import load, why_unavailable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summary import emit, ratio_table  # noqa: E402

WIDTH, DEPTH, BATCH = 447, 50, 16  # 50 x (447² + 447) = 10.0M parameters in 100 tensors
BACKENDS = [b for b in ("eager", "ext") if why_unavailable(b, [torch.device("cpu")]) is None]


def mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


def whole_steps() -> Dict[str, Callable[[], None]]:
    """name -> one whole TRAINING step (forward, backward, optimizer)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)
    steps = {}
    for to_none in (True, False):  # torch's default frees the gradients; keeping them is cheaper
        net = mlp()
        sgd = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, foreach=True)

        def sgd_step(net=net, sgd=sgd, to_none=to_none):
            sgd.zero_grad(set_to_none=to_none)
            torch.nn.functional.mse_loss(net(x), y).backward()
            sgd.step()
        steps["SGD(foreach)" + ("" if to_none else ", zero_grad(set_to_none=False)")] = sgd_step
    for backend in BACKENDS:
        for mode in ("SGD", "NSGD"):
            model = mlp()
            opt = LABPAL(model.parameters(), backend=backend, mode=mode, momentum=0.9,
                         approximation_batches=2, reuse_updates=10**9, warmup_updates=10**9,
                         direction_norm_range=(0.0, float("inf")))

            def closure(model=model):
                return torch.nn.functional.mse_loss(model(x), y)
            while opt.updates < 1:  # the first measurement, before timing
                opt.step(closure)
            steps[f"LABPAL {mode} ({backend})"] = (lambda o=opt, c=closure: o.step(c))
    return steps


def optimizer_sides() -> Dict[str, Callable[[], None]]:
    """name -> the optimizer side of one update on fixed gradients (no forward/backward)."""
    steps = {}
    params = list(mlp().parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    sgd = torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    steps["SGD(foreach).step"] = sgd.step
    for backend in BACKENDS:
        ops = load(backend)
        # clipping beside the same update without it: one more read of the gradient; SGD mode's
        # robust rate (the default: n̄ updated each update) beside the paper's
        for mode, clip, rate in (("SGD", None, "paper"), ("SGD", None, "robust"),
                                 ("NSGD", None, "robust"), ("NSGD", 1.0, "robust")):
            ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
            for p, q in zip(ps, params):
                p.grad = q.grad.clone()
            flats = build_flats([{"params": ps}])
            line = ops.make_line(Hyper(mode=mode, max_grad_norm=clip, sgd_rate=rate,
                                       momentum=0.9), torch.device("cpu"))
            line.eta.fill_(1e-3)  # a rate, as after a measurement
            line.s_upd.fill_(1e-3)
            decays = [[0.0] * len(f.segments) for f in flats]
            # the update also clears the gradient (its own work): later rounds see zeros, same cost
            name = f"update {mode}" + (f", sgd_rate={rate}" if mode == "SGD" else "") + \
                ("" if clip is None else f", max_grad_norm={clip:g}")
            steps[f"{name} ({backend})"] = (
                lambda o=ops, f=flats, d=decays, ln=line: o.update(f, d, ln, m=1))
    return steps


def interleaved(steps: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, List[float]]:
    """Seconds of each step in each of `rounds` rounds, one call of each per round (after one
    warm-up call each)."""
    for step in steps.values():
        step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


WHOLE = ("LABPAL's whole TRAINING step (forward, backward, update; after its first measurement) "
         "against torch.optim.SGD(foreach, momentum 0.9): time relative to SGD, lower is faster; "
         f"CPU, an MLP of 10M parameters in 100 tensors, batch {BATCH}, backends {BACKENDS}")
SIDE = ("The optimizer side alone (no forward/backward) on the same 10M parameters: LABPAL's "
        "update through each backend against SGD's step(), time relative to SGD")


def _record(benchmark, times):
    base = next(iter(times.values()))
    for name, t in times.items():
        benchmark.extra_info[f"{name} best ms"] = round(1e3 * min(t), 3)
        benchmark.extra_info[f"{name} / first (median)"] = round(
            statistics.median(a / b for a, b in zip(t, base)), 3)


@pytest.mark.benchmark(group="whole TRAINING step, 10M params in 100 tensors (ratios in extra_info)")
def test_whole_step_interleaved(benchmark):
    steps = whole_steps()
    result = {}
    benchmark.pedantic(lambda: result.update(interleaved(steps, rounds=8)), rounds=1, iterations=1)
    _record(benchmark, result)
    emit(WHOLE, ratio_table(result, "whole TRAINING step"))


@pytest.mark.benchmark(group="optimizer side, 10M params in 100 tensors (ratios in extra_info)")
def test_optimizer_side_interleaved(benchmark):
    steps = optimizer_sides()
    result = {}
    benchmark.pedantic(lambda: result.update(interleaved(steps, rounds=10)), rounds=1,
                       iterations=1)
    _record(benchmark, result)
    emit(SIDE, ratio_table(result, "optimizer side"))


if __name__ == "__main__":
    emit(WHOLE, ratio_table(interleaved(whole_steps(), rounds=10), "whole TRAINING step"))
    emit(SIDE, ratio_table(interleaved(optimizer_sides(), rounds=10), "optimizer side"))
