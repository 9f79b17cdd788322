"""No host sync in TRAINING, at most two per measurement; no allocation per step after the first."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from labpal_fast import LABPAL

from helpers import batches

pytestmark = pytest.mark.usefixtures("backend")

SYNCS = {"_local_scalar_dense", "item"}


class Watch(TorchDispatchMode):
    """Counts host syncs, and fresh allocations of at least `big` elements."""

    def __init__(self, big=2000):
        super().__init__()
        self.big, self.syncs, self.allocs = big, 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in SYNCS:
            self.syncs += 1
        inputs = {a.untyped_storage().data_ptr() for a in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.numel() >= self.big and t.untyped_storage().data_ptr() not in inputs:
                self.allocs[name] += 1
        return out


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            yield from _tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _tensors(x)


def make(mode, momentum, m=1, wd=0.0):
    torch.manual_seed(0)
    # small enough for Triton's interpreter (one tile of 4096 elements per flat)
    net = torch.nn.Sequential(torch.nn.Linear(20, 48), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                              torch.nn.Linear(48, 48), torch.nn.ReLU(), torch.nn.Linear(48, 3))
    opt = LABPAL([{"params": net[:4].parameters(), "weight_decay": wd},
                  {"params": net[5].parameters()}], model=net, mode=mode, momentum=momentum,
                 approximation_batches=3, reuse_updates=50, warmup_updates=10**6,
                 batch_size_schedule=((0, m),), noise_factor=1.0)
    return net, opt


def closure_of(net, x, y):
    return lambda: torch.nn.functional.cross_entropy(net(x), y)


def test_syncs_over_a_whole_cycle():
    for mode, momentum, m in (("NSGD", 0.0, 1), ("SGD", 0.9, 2)):
        net, opt = make(mode, momentum, m=m, wd=1e-4)
        n_calls = 3 * m + 50 * m + 3 * m + 5 * m
        data = batches(n_calls, 8, 20, seed=0)
        per_call = []
        for x, y in data:
            with Watch() as w:
                opt.step(closure_of(net, x, y))
            per_call.append((opt.phase, w.syncs))
        records = opt.measurements()
        assert len(records) == 2 and records[0]["valid"], records
        first, second = records[0]["call"], records[1]["call"]
        assert first == 0 and second == 3 * m + 50 * m
        # every sync happens inside a measurement's calls, at most two per measurement
        in_first = sum(s for _, s in per_call[first:first + 3 * m])
        in_second = sum(s for _, s in per_call[second:second + 3 * m])
        assert 1 <= in_first <= 2 and 1 <= in_second <= 2
        assert sum(s for _, s in per_call) == in_first + in_second, per_call


def test_training_steps_allocate_nothing_beyond_forward_and_backward():
    for mode, momentum, m, wd in (("NSGD", 0.0, 1, 0.0), ("SGD", 0.9, 1, 1e-3),
                                  ("NSGD", 0.5, 2, 1e-3)):
        net, opt = make(mode, momentum, m=m, wd=wd)
        data = batches(3 * m + 4 * m, 8, 20, seed=1)
        for x, y in data[:3 * m + 2 * m]:  # the measurement and two updates: buffers exist now
            opt.step(closure_of(net, x, y))
        assert opt.phase == "training"
        with Watch() as in_step:
            for x, y in data[3 * m + 2 * m:]:
                opt.step(closure_of(net, x, y))
        with Watch() as plain:  # what forward + backward alone allocate
            for x, y in data[3 * m + 2 * m:]:
                net.zero_grad(set_to_none=False)
                closure_of(net, x, y)().backward()
        assert in_step.allocs == plain.allocs, (mode, in_step.allocs, plain.allocs)
