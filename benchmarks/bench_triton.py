"""Triton backend benchmarks (pytest-benchmark; need an NVIDIA GPU, skipped otherwise).

Each fused op against its eager counterpart, the TRAINING update against
``torch.optim.SGD(fused=True)``, at 1M, 25M and 350M parameters (``LABPAL_BENCH_SIZES`` to
choose, e.g. ``1e6,25e6``), and the optimizer side of a whole measurement at 25M parameters in
160 tensors against the eager backend. Every timed call runs the op ``INNER`` times and then
synchronizes; ``extra_info`` carries GB/s (bytes the op must move / time) and the byte count.

Run: ``pytest benchmarks/bench_triton.py --benchmark-enable`` (benchmarks/gpu_check.py
runs these and its own CUDA-event timings, and prints the summary table).
The case definitions are plain functions, shared with gpu_check.py.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Tuple

import pytest
import torch

CUDA = torch.cuda.is_available()
SIZES = tuple(int(float(s)) for s in
              os.environ.get("LABPAL_BENCH_SIZES", "1e6,25e6,350e6").split(",") if s)
INNER = 10


def make_flat(n: int, dtype=torch.float32, n_tensors: int = 1, device="cuda"):
    """A Flat of n elements in n_tensors parameters, random contents, every buffer made."""
    from labpal_fast.flat import Flat
    sizes = [n // n_tensors] * n_tensors
    sizes[-1] += n - sum(sizes)
    params = [torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    flat = Flat(params, [0] * n_tensors)
    flat.direction.normal_()
    flat.need_grad_sum().normal_()
    flat.need_origin().normal_()
    del params
    return flat


def op_cases(flat, backend: str) -> Dict[str, Tuple[Callable[[], None], int]]:
    """name -> (one call of the op, bytes it must move) for one backend on one flat."""
    from labpal_fast.ops import load
    ops = load(backend)
    n = flat.numel
    p, a = flat.param.element_size(), flat.direction.element_size()  # param / accumulation bytes
    dev = flat.device
    coef = torch.tensor(-1e-4, dtype=torch.float64, device=dev)
    ok = torch.tensor(True, device=dev)
    return {
        "accumulate": (lambda: ops.accumulate(flat, first=False), n * (2 * p + 2 * a)),
        "form_direction[train,β]": (
            lambda: ops.form_direction(flat, summed=False, inv_m=1.0, momentum=0.9, decays=[0.0],
                                       line_terms=False), n * (2 * p + 2 * a)),
        "form_direction[line,β,wd]": (
            lambda: ops.form_direction(flat, summed=True, inv_m=0.5, momentum=0.9, decays=[1e-4],
                                       line_terms=True), n * (3 * p + 3 * a)),
        "train_update": (lambda: ops.train_update(flat, coef, ok), n * (2 * p + a)),
        "line_move": (lambda: ops.line_move(flat, coef), n * (p + 2 * a)),
        "save_origin": (lambda: ops.save_origin(flat), n * (p + a)),
    }


def training_update_cases(flat, backend: str) -> Dict[str, Tuple[Callable[[], None], int]]:
    """One whole TRAINING update (m = 1, momentum 0.9) through the backend contract, as the
    optimizer runs it: the direction pass, the step's coefficient, the update pass."""
    from labpal_fast.hyper import Hyper
    from labpal_fast.ops import load
    ops = load(backend)
    n, p, a = flat.numel, flat.param.element_size(), flat.direction.element_size()
    out = {}
    for mode in ("SGD", "NSGD"):
        line = ops.make_line(Hyper(mode=mode, momentum=0.9), flat.device)
        line.eta.fill_(1e-6)
        line.s_upd.fill_(1e-6)

        def update(line=line):
            ops.update([flat], [[0.0]], line, m=1)
        # direction: grad read + zeroed, d read + written; update: θ read + written, d read
        out[f"train[{mode}]"] = (update, n * (4 * p + 3 * a))
    return out


def sgd_fused_cases(n: int, dtype=torch.float32, n_tensors: int = 1, device="cuda"):
    """torch.optim.SGD(fused=True, momentum=0.9) on the same number of parameters."""
    sizes = [n // n_tensors] * n_tensors
    sizes[-1] += n - sum(sizes)
    params = [torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in sizes]
    for q in params:
        q.grad = torch.randn_like(q)
    opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9, fused=device != "cpu" or None)
    opt.step()  # makes the momentum buffers
    e = params[0].element_size()

    def step_and_zero():
        opt.step()
        opt.zero_grad(set_to_none=False)
    return {"sgd_fused": (opt.step, n * 5 * e),
            "sgd_fused+zero_grad": (step_and_zero, n * 6 * e)}, params


def measurement_case(backend: str, n: int = 25_000_000, n_tensors: int = 160, k: int = 10,
                     device="cuda"):
    """The optimizer side of one whole measurement (k closures, 2 more positions, the fit and
    the move), closures as cheap as possible: returns a callable that runs one measurement."""
    from labpal_fast import LABPAL
    sizes = [n // n_tensors] * n_tensors
    sizes[-1] += n - sum(sizes)
    params = [torch.nn.Parameter(1e-3 * torch.randn(s, device=device)) for s in sizes]
    opt = LABPAL(params, backend=backend, approximation_batches=k, reuse_updates=0,
                 warmup_updates=0, noise_factor=1.0, batch_size_schedule=((0, 1),),
                 direction_norm_range=(0.0, float("inf")))
    target = params[0]

    def closure():
        x = target[:8]
        return (x * x).sum() - x.sum()  # a parabola along any line: the fit is valid

    def one_measurement():
        # reuse_updates=0: every boundary starts a measurement of k closure calls
        for _ in range(k):
            opt.step(closure)
    return one_measurement, opt


def _timed(benchmark, fn, nbytes):
    def run():
        for _ in range(INNER):
            fn()
        torch.cuda.synchronize()
    fn()
    torch.cuda.synchronize()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    sec = benchmark.stats.stats.median / INNER
    benchmark.extra_info.update(bytes=nbytes, seconds_per_op=sec, gb_per_s=nbytes / sec / 1e9)


needs_cuda = pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU (run benchmarks/gpu_check.py)")


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n / 1e6:g}M")
def flat(request):
    if not CUDA:
        pytest.skip("needs an NVIDIA GPU")
    f = make_flat(request.param)
    yield f
    del f
    torch.cuda.empty_cache()


OPS = ("accumulate", "form_direction[train,β]", "form_direction[line,β,wd]", "train_update",
       "line_move", "save_origin")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["eager", "triton", "ext"])
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, flat, op, backend):
    from labpal_fast.ops import why_unavailable
    reason = why_unavailable(backend, [flat.device])
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    benchmark.group = f"{op} {flat.numel / 1e6:g}M"
    fn, nbytes = op_cases(flat, backend)[op]
    _timed(benchmark, fn, nbytes)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("impl", ["eager", "triton", "sgd_fused", "sgd_fused+zero_grad"])
@pytest.mark.parametrize("mode", ["SGD", "NSGD"])
def test_training_update(benchmark, flat, impl, mode):
    benchmark.group = f"training update {mode} {flat.numel / 1e6:g}M"
    if impl.startswith("sgd_fused"):
        if mode == "NSGD":
            pytest.skip("SGD(fused=True) is the baseline of both modes; timed once")
        cases, keep = sgd_fused_cases(flat.numel)
        fn, nbytes = cases[impl]
    else:
        fn, nbytes = training_update_cases(flat, impl)[f"train[{mode}]"]
    _timed(benchmark, fn, nbytes)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_measurement_phase(benchmark, backend):
    benchmark.group = "measurement, 25M params in 160 tensors"
    fn, opt = measurement_case(backend)
    fn()  # compile, first measurement
    torch.cuda.synchronize()

    def run():
        fn()
        torch.cuda.synchronize()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(seconds_per_measurement=benchmark.stats.stats.median)
