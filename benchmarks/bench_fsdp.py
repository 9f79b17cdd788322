"""How LABPAL holds FSDP2's local shards: the three designs of docs/algorithm.md ("FSDP2"),
one TRAINING update each (momentum, weight decay, NSGD), on the CPU, side by side.

  storage  (what labpal_fast does) the flat buffers are FSDP2's sharded storage: the
           backend's update on one flat, nothing else
  copies   the flat holds copies: the shards' gradients and values copied in before the
           update, the values copied out after it (torch._foreach_copy_, one launch per copy)
  foreach  no flat: the update as multi-tensor ops over the shard tensors themselves
           (torch._foreach_*, as torch.optim.SGD(foreach=True)); ‖d‖² via _foreach_norm

The shards are P separate tensors (P = 64, as FSDP2 allocates each parameter's padded shard
on its own). The variants run interleaved, round after round (the machine may be shared);
what counts is the ratio to `storage`: the median over rounds, with its spread. Run: `python benchmarks/bench_fsdp.py`, or under
pytest-benchmark: `pytest benchmarks/bench_fsdp.py --benchmark-enable`.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Dict, List

import pytest
import torch

from labpal_fast import ops as backends
from labpal_fast.flat import Flat
from labpal_fast.hyper import Hyper
from labpal_fast.line import Line

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summary import emit, ratio_table  # noqa: E402

SIZES = [int(float(s)) for s in os.environ.get("LABPAL_BENCH_FSDP_SIZES", "1e6,8e6").split(",")]
PIECES = 64
MOMENTUM, WD = 0.9, 1e-4


class Setup:
    """P shard tensors with gradients, and a flat (its own copy of them) with its line."""

    def __init__(self, n: int, backend: str = "auto"):
        g = torch.Generator().manual_seed(0)
        sizes = [n // PIECES] * (PIECES - 1) + [n - (n // PIECES) * (PIECES - 1)]
        self.shards = [torch.randn(s, generator=g) for s in sizes]
        self.grads = [torch.randn(s, generator=g) for s in sizes]
        self.dirs = [torch.zeros(s) for s in sizes]
        self.ops = backends.resolve(backend, {torch.device("cpu")})
        params = [torch.nn.Parameter(t.clone()) for t in self.shards]
        self.flat = Flat(params, [0] * PIECES)
        self.flat.grad.normal_(generator=g)
        self.line = Line(Hyper(mode="NSGD", momentum=MOMENTUM), torch.device("cpu"))
        self.line.s_upd.fill_(1e-3)
        self.param_views = self.flat.slices(self.flat.param)
        self.grad_views = self.flat.slices(self.flat.grad)
        self.coef = torch.zeros((), dtype=torch.float32)
        self.neg_coefs = [self.coef] * PIECES  # broadcast in addcmul (sign folded below)

    def storage(self) -> None:
        self.ops.update([self.flat], [[WD]], self.line, m=1)

    def copies(self) -> None:
        torch._foreach_copy_(self.grad_views, self.grads)
        torch._foreach_copy_(self.param_views, self.shards)
        self.storage()
        torch._foreach_copy_(self.shards, self.param_views)

    def foreach(self) -> None:
        # d = β·d + g + wd·θ;  ‖d‖²;  θ -= s·d/‖d‖ (the factor a device scalar: no host read);
        # g = 0. In place, as few temporaries as the foreach ops allow.
        torch._foreach_mul_(self.dirs, MOMENTUM)
        torch._foreach_add_(self.dirs, self.grads)
        torch._foreach_add_(self.dirs, self.shards, alpha=WD)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.dirs)))
        torch.div(self.line.s_upd.float().neg(), norm.clamp(min=1e-6), out=self.coef)
        torch._foreach_addcmul_(self.shards, self.dirs, self.neg_coefs)
        torch._foreach_zero_(self.grads)


VARIANTS = ("storage", "copies", "foreach")


def best_time(fn: Callable[[], object], repeats: int, inner: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def side_by_side(n: int, repeats: int = 15) -> Dict[str, List[float]]:
    """Seconds of each variant in each of `repeats` interleaved rounds (a busy moment hits
    every variant alike)."""
    s = Setup(n)
    for v in VARIANTS:  # warm up
        getattr(s, v)()
    times: Dict[str, List[float]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for v in VARIANTS:
            times[v].append(best_time(getattr(s, v), 1))
    return times


def title(n: int) -> str:
    return (f"How LABPAL holds FSDP2's shards: one NSGD update (momentum, weight decay) over "
            f"{PIECES} shards of {n:,} elements in all, CPU, backend "
            f"{Setup(PIECES).ops.name!r}: the flat buffers as the shards' storage (what "
            "labpal_fast does) against copies in and out, and foreach ops on the shards; "
            "time relative to storage, lower is faster")


def test_side_by_side_table():
    n = SIZES[0]
    emit(title(n), ratio_table(side_by_side(n, repeats=5), "variant", base="storage"))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_update(benchmark, n, variant):
    benchmark.group = f"FSDP2 shards, one TRAINING update, {n} elements"
    s = Setup(n)
    benchmark(getattr(s, variant))


def main() -> None:
    torch.set_num_threads(int(os.environ.get("LABPAL_BENCH_THREADS", "1")))
    for n in SIZES:
        emit(title(n), ratio_table(side_by_side(n), "variant", base="storage"))


if __name__ == "__main__":
    main()
