"""The compiled extension (labpal_fast._C) on CPU: each C++ op against its eager counterpart
(the whole TRAINING step against SGD is in bench_optimizer.py).

GB/s = bytes the op must move (each buffer read or written once) / time; the reference is a
plain `torch.Tensor.copy_` of fp32 (8 bytes per element) at the same size; the target is
>= 80% of it. Sizes: 1M and 16M elements (LABPAL_BENCH_EXT_SIZES to choose, e.g. "1e6,16e6").

Run: `pytest benchmarks/bench_ext.py --benchmark-enable` (pytest-benchmark table), or
`python benchmarks/bench_ext.py` for the side-by-side table with GB/s and ratios (what
benchmarks/RESULTS.md records). The machine may be shared: absolute numbers are noisy; each
figure is the best of several repeats, and ext and eager are measured interleaved.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import pytest
import torch

from labpal_fast.flat import Flat
from labpal_fast.ops import eager, ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summary import emit  # noqa: E402

ROUNDS = 3
SIZES = [int(float(s)) for s in os.environ.get("LABPAL_BENCH_EXT_SIZES", "1e6,16e6").split(",")]
needs_ext = pytest.mark.skipif(not ext.available, reason=f"extension not built: {ext.why}")


def make_flat(n: int, seed: int = 0) -> Flat:
    g = torch.Generator().manual_seed(seed)
    half = n // 2
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in (half, n - half)]
    flat = Flat(params, [0, 1])
    flat.grad.normal_(generator=g)
    flat.direction.normal_(generator=g)
    flat.need_grad_sum().normal_(generator=g)
    flat.need_origin().copy_(flat.param)
    return flat


def cases(flat: Flat) -> Dict[str, Tuple[Callable[[object], None], int]]:
    """name -> (call(backend), bytes moved). Gradients are refreshed by nothing: the ops
    are timed on whatever values the buffers hold (zeros after the first call; same cost)."""
    n, f = flat.numel, 4
    coef = torch.tensor(-1e-4, dtype=torch.float64)
    ok = torch.tensor(True)
    direction = dict(summed=False, inv_m=1.0, momentum=0.9, decays=[0.0, 0.0], line_terms=False)
    direction_m2 = dict(summed=True, inv_m=0.5, momentum=0.9, decays=[1e-4, 0.0], line_terms=True)
    return {
        # grad_sum += grad; grad = 0: read 2, write 2
        "accumulate": (lambda ops: ops.accumulate(flat, False), 4 * f * n),
        # d = 0.9 d + g, ‖d‖², grad = 0: read g, d; write d, g
        "form_direction (m=1, momentum)": (lambda ops: ops.form_direction(flat, **direction),
                                           4 * f * n),
        # + grad_sum read, weight decay on half (θ read there), all five partial sums
        "form_direction (m=2, wd, line terms)": (
            lambda ops: ops.form_direction(flat, **direction_m2), (5 * n + n // 2) * f),
        # θ += coef·d: read θ, d; write θ
        "train_update": (lambda ops: ops.train_update(flat, coef, ok), 3 * f * n),
        # θ = θ₀ + coef·d: read θ₀, d; write θ
        "line_move": (lambda ops: ops.line_move(flat, coef), 3 * f * n),
    }


def best_time(fn: Callable[[], object], repeats: int, inner: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def side_by_side(sizes: List[int], repeats: int = 15) -> List[dict]:
    rows = []
    for n in sizes:
        inner = max(1, int(4e6 // n))
        src, dst = torch.randn(n), torch.empty(n)
        t_copy = best_time(lambda: dst.copy_(src), repeats, inner)
        copy_gbs = 8 * n / t_copy / 1e9
        rows.append(dict(n=n, op="copy_ (reference)", ext_gbs=copy_gbs, eager_gbs=copy_gbs,
                         ratio=1.0, of_copy=1.0))
        flat = make_flat(n)
        for name, (call, nbytes) in cases(flat).items():
            xs, es = [], []
            for _ in range(ROUNDS):  # interleaved, so that noise hits both alike
                xs.append(best_time(lambda: call(ext.BACKEND), repeats // ROUNDS + 1, inner))
                es.append(best_time(lambda: call(eager.BACKEND), repeats // ROUNDS + 1, inner))
            ratios = [e / x for e, x in zip(es, xs)]
            t_x, t_e = min(xs), min(es)
            rows.append(dict(n=n, op=name, ext_gbs=nbytes / t_x / 1e9, eager_gbs=nbytes / t_e / 1e9,
                             ratio=statistics.median(ratios), low=min(ratios), high=max(ratios),
                             of_copy=nbytes / t_x / 1e9 / copy_gbs))
    return rows


# ------------------------------------------------------------------------------ pytest-benchmark
@needs_ext
@pytest.mark.parametrize("backend", ["ext", "eager"])
@pytest.mark.parametrize("op", list(cases(make_flat(8)).keys()))
@pytest.mark.parametrize("n", SIZES)
def test_op(benchmark, n, op, backend):
    benchmark.group = f"{op}, {n} elements"
    flat = make_flat(n)
    call, nbytes = cases(flat)[op]
    module = (ext if backend == "ext" else eager).BACKEND
    benchmark.extra_info["bytes"] = nbytes
    benchmark(call, module)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.min / 1e9


TITLE = ("The compiled extension's C++ ops against the same ops in eager PyTorch, CPU: bytes "
         "moved per second, and the speed-up (eager time / ext time: the median over interleaved "
         "rounds, with its spread); the reference is a plain fp32 copy_")


def main() -> None:
    threads = int(os.environ.get("LABPAL_BENCH_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    if not ext.available:
        raise SystemExit(f"the extension is not available: {ext.why}")
    rows = ["| elements | op | ext GB/s | eager GB/s | ext speed-up (median) | spread | "
            "ext / copy_ |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in side_by_side(SIZES):
        rows.append(f"| {r['n']:,} | {r['op']} | {r['ext_gbs']:.1f} | {r['eager_gbs']:.1f} | "
                    f"{r['ratio']:.2f}× | {r.get('low', 1.0):.2f}–{r.get('high', 1.0):.2f} | "
                    f"{100 * r['of_copy']:.0f}% |")
    emit(TITLE, "\n".join(rows))


if __name__ == "__main__":
    main()
