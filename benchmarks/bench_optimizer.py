"""The eager optimizer against torch.optim.SGD on CPU (issue: LABPAL on eager PyTorch).

1. Optimizer-side time of one TRAINING update: momentum 0.9, 10M parameters in 100 tensors.
   SGD: `opt.step()` with gradients in place. LABPAL: the same work of its step (view checks,
   forming d, the update, clearing the gradient), without the closure's forward/backward.
2. End-to-end ms per step of a small CNN training loop (steady state, after the first
   measurement), LABPAL vs SGD with the same momentum.

Run: `make bench` (or `pytest benchmarks --benchmark-enable`). Ratios: compare the means in
one run's table (group by `group`); the machine is shared, so absolute times are noisy.
"""
import statistics
import time

import pytest
import torch

from labpal_fast import LABPAL

N_TENSORS, N_TOTAL = 100, 10_000_000


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [N_TOTAL // N_TENSORS] * N_TENSORS
    return [torch.nn.Parameter(torch.randn(n, generator=g)) for n in sizes]


def _with_grads(params):
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


@pytest.mark.benchmark(group="training update, 10M params in 100 tensors, momentum 0.9")
def test_sgd_foreach_update(benchmark):
    params = _with_grads(_params())
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    opt.step()
    benchmark(opt.step)


@pytest.mark.benchmark(group="training update, 10M params in 100 tensors, momentum 0.9")
@pytest.mark.parametrize("mode", ["SGD", "NSGD"])
def test_labpal_update(benchmark, mode, backend="eager"):
    params = _params()
    opt = LABPAL(params, mode=mode, momentum=0.9, backend=backend)
    opt.line.eta.fill_(1e-3)  # a rate, as after a measurement
    opt.line.s_upd.fill_(1e-3)
    opt._m = 1

    def update():
        for flat in opt.flats:
            flat.attach_params()
            flat.attach_grads()
        opt._update()

    update()
    benchmark(update)


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32),
            torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.head = torch.nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _cnn_data(n=64, batch=64):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def _interleaved(benchmark, steps, rounds=40):
    """Time the optimizers' steps alternately, so machine load hits each alike. pytest-benchmark
    times one round (a step of each); the per-optimizer medians and ratios go to extra_info."""
    times = {name: [] for name in steps}

    def one_round():
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=3)
    median = {name: statistics.median(t[3:]) * 1e3 for name, t in times.items()}
    base = next(iter(median.values()))
    for name, ms in median.items():
        benchmark.extra_info[f"{name} ms"] = round(ms, 3)
        benchmark.extra_info[f"{name} / first"] = round(ms / base, 3)
    print("\n" + benchmark.name + ": " + ", ".join(f"{n} {ms:.2f} ms ({ms / base:.2f}x)"
                                                   for n, ms in median.items()))


@pytest.mark.benchmark(group="training update, interleaved (ratios in extra_info)")
def test_update_interleaved(benchmark):
    sgd_params = _with_grads(_params())
    sgd = torch.optim.SGD(sgd_params, lr=1e-3, momentum=0.9, foreach=True)
    steps = {"SGD(foreach)": sgd.step}
    for mode in ("SGD", "NSGD"):
        opt = LABPAL(_params(), mode=mode, momentum=0.9, backend="eager")
        opt.line.eta.fill_(1e-3)
        opt.line.s_upd.fill_(1e-3)
        opt._m = 1
        steps[f"LABPAL eager {mode}"] = (lambda o: lambda: (
            [(f.attach_params(), f.attach_grads()) for f in o.flats], o._update()))(opt)
    _interleaved(benchmark, steps, rounds=30)


@pytest.mark.benchmark(group="small CNN training loop, interleaved (ratios in extra_info)")
def test_cnn_loop_interleaved(benchmark):
    data = _cnn_data()
    loss_fn = torch.nn.functional.cross_entropy
    torch.manual_seed(0)
    sgd_model, labpal_model = SmallCNN(), SmallCNN()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    labpal = LABPAL(labpal_model.parameters(), model=labpal_model, momentum=0.9, backend="eager",
                    approximation_batches=2, direction_norm_range=(0.0, float("inf")))
    batches = iter(data * 1000)

    def sgd_step():
        x, y = next(batches)
        sgd.zero_grad()
        loss_fn(sgd_model(x), y).backward()
        sgd.step()

    def labpal_step():
        x, y = next(batches)
        labpal.step(lambda: loss_fn(labpal_model(x), y))

    for _ in range(4):  # LABPAL's first measurement happens here
        labpal_step()
    assert labpal.phase == "training" and labpal.updates >= 1
    _interleaved(benchmark, {"SGD": sgd_step, "LABPAL eager": labpal_step}, rounds=60)
