"""The eager optimizer against torch.optim.SGD on CPU (issue: LABPAL on eager PyTorch).

1. Optimizer-side time of one TRAINING update: momentum 0.9, 10M parameters in 100 tensors.
   SGD: `opt.step()` with gradients in place. LABPAL: the same work of its step (view checks,
   forming d, the update, clearing the gradient), without the closure's forward/backward.
2. End-to-end ms per step of a small CNN training loop (steady state, after the first
   measurement), LABPAL vs SGD with the same momentum.

Run: `make bench` (or `pytest benchmarks --benchmark-enable`). Ratios: compare the means in
one run's table (group by `group`); the machine is shared, so absolute times are noisy.
"""
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


@pytest.mark.benchmark(group="small CNN training loop, ms per step")
@pytest.mark.parametrize("name", ["sgd", "labpal"])
def test_cnn_step(benchmark, name):
    torch.manual_seed(0)
    model = SmallCNN()
    data = _cnn_data()
    loss_fn = torch.nn.functional.cross_entropy
    if name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)

        def step(x, y):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
    else:
        opt = LABPAL(model.parameters(), model=model, momentum=0.9, backend="eager",
                     approximation_batches=2, direction_norm_range=(0.0, float("inf")))

        def step(x, y):
            opt.step(lambda: loss_fn(model(x), y))
    for x, y in data[:4]:  # LABPAL's first measurement happens here
        step(x, y)
    if name == "labpal":
        assert opt.phase == "training" and opt.updates >= 1
    it = iter(data * 1000)

    def one_step():
        step(*next(it))

    benchmark.pedantic(one_step, rounds=60, iterations=1, warmup_rounds=5)
