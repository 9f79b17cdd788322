"""LABPAL under torch.distributed on the CPU (gloo): what a measurement costs at 1 and 2 ranks.

    python benchmarks/bench_distributed.py [--repeats 7]

Per run, every rank trains an MLP (784-512-512-10, 670k fp32 parameters) on its own batches of
64 with DDP as model= and reports: the collectives of one update and of one measurement (counted
with a TorchDispatchMode, bytes each rank sends), the wall time of whole measurements (k·m = 5
closure calls plus the line's 2·5 forward evaluations), and the time of the line's all-gather
and of one gradient all-reduce alone. Each time is the median over repeats. 4 ranks on a
2-core machine would measure oversubscription, not scaling: run them on a machine with the cores.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from dist_cases import run_ranks  # noqa: E402
from summary import header  # noqa: E402


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 10))


def _worker(rank, world, repeats, m):
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils._python_dispatch import TorchDispatchMode

    from labpal_fast import LABPAL

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "c10d" and not func.__name__.startswith("broadcast"):
                t = args[1] if func.__name__.startswith("allgather") else args[0]
                t = t if isinstance(t, (list, tuple)) else [t]
                self.ops.append((func.__name__.split(".")[0],
                                 sum(x.numel() * x.element_size() for x in t)))
            return func(*args, **(kwargs or {}))

    net = _mlp()
    model = DDP(net) if world > 1 else net
    k = 5
    opt = LABPAL(model.parameters(), model=model, approximation_batches=k, reuse_updates=2,
                 warmup_updates=10**6, batch_size_schedule=((0, m),), noise_factor=1.0,
                 sample_positions=(0.0, 0.01, 0.05))
    g = torch.Generator().manual_seed(rank)
    data = [(torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g))
            for _ in range(8)]
    times, update_ops, measure_ops = [], None, None
    i = 0

    def step(watch=None):
        nonlocal i
        x, y = data[i % len(data)]
        i += 1
        return opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))

    while len(times) < repeats + 1:
        if opt.phase == "training" and opt.counters.acc == 0 and opt._boundary()[1]:
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            with Count() as c:
                step()
                while opt.phase == "measuring":
                    step()
            times.append(time.perf_counter() - t0)
            measure_ops = c.ops
        else:
            with Count() as c:
                for _ in range(m):
                    step()
            update_ops = c.ops
    out = {"measurement_s": statistics.median(times[1:]), "update_ops": update_ops,
           "measurement_ops": measure_ops, "params": sum(p.numel() for p in net.parameters())}
    if world > 1:
        row = torch.zeros(2 * 3 + 5, dtype=torch.float64)
        table = torch.zeros(world * row.numel(), dtype=torch.float64)
        grad = torch.zeros(out["params"])
        for name, fn in (("gather_s", lambda: dist.all_gather_single(table, row)),
                         ("allreduce_s", lambda: dist.all_reduce(grad))):
            ts = []
            for _ in range(repeats * 5):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            out[name] = statistics.median(ts)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--m", type=int, default=2)
    args = ap.parse_args()
    print(header("LABPAL under torch.distributed (gloo, CPU): the collectives and wall time of "
                 "one line measurement at 1 and 2 ranks (times: medians over repeats)"))
    for world in (1, 2):
        r = run_ranks(_worker, world, args.repeats, args.m, deadline=600, timeout=60)[0]
        print(f"ranks={world} m={args.m} params={r['params']}: measurement "
              f"{1e3 * r['measurement_s']:.1f} ms (median of {args.repeats})")
        print(f"  collectives per update of m calls: {r['update_ops']}")
        print(f"  collectives per measurement: {r['measurement_ops']}")
        if world > 1:
            print(f"  line all-gather alone {1e6 * r['gather_s']:.0f} µs; gradient all-reduce "
                  f"alone {1e3 * r['allreduce_s']:.2f} ms")


if __name__ == "__main__":
    main()
