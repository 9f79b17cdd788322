"""Gradient clipping by global norm (max_grad_norm), against an independent oracle.

The oracle: the averaged gradient of each update computed with torch.autograd at the
parameters the update starts from, clipped by torch.nn.utils.clip_grad_norm_ on copies, then
the plain math of docs/algorithm.md (ḡ + wd·θ, d = β·d + ḡ, SGD θ −= η·d, NSGD θ −= s·d/‖d‖).
Over an fp32 and an fp64 flat, two groups with different weight decay, m > 1, both modes,
momentum, clipping active and inactive; on every backend. Then: no host sync in TRAINING,
Triton's launch count, a non-finite gradient, checkpoints.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from labpal_fast import LABPAL
from labpal_fast.optimizer import MEASURING, TRAINING

from helpers import batches, labpal_entry
from test_sync_and_memory import Watch, closure_of

# every test but the launch count runs on every backend
on_every_backend = pytest.mark.usefixtures("backend")


class Mixed(torch.nn.Module):
    """An fp32 body and an fp64 output offset: two flats (one when `other` is fp32)."""

    def __init__(self, seed: int, other=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Linear(6, 12)
        self.b = torch.nn.Linear(12, 3)
        self.offset = torch.nn.Parameter(torch.randn(3, dtype=other))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).double() + self.offset.double()


def groups(net):
    """Two groups with different weight decay, each spanning both dtypes."""
    return [{"params": [net.a.weight, net.offset], "weight_decay": 3e-2},
            {"params": [net.a.bias, net.b.weight, net.b.bias], "weight_decay": 1e-3}]


def loss_fn(net, x, y):
    return torch.nn.functional.cross_entropy(net(x), y)


def decays(net):
    """Each parameter's weight decay, in net.parameters() order."""
    wd = {id(p): g["weight_decay"] for g in groups(net) for p in g["params"]}
    return [wd[id(p)] for p in net.parameters()]


def oracle_direction(net, data, d_prev, momentum, max_norm):
    """(d, ‖ḡ‖ before clipping) for the m batches in `data`, by torch alone."""
    params = list(net.parameters())
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for x, y in data:
        for acc, g in zip(grads, torch.autograd.grad(loss_fn(net, x, y), params)):
            acc += g.double()
    copies = [torch.nn.Parameter(p.detach().double().clone()) for p in params]
    for c, g in zip(copies, grads):
        c.grad = g / len(data)
    norm = torch.nn.utils.clip_grad_norm_(copies, max_norm)
    d = [momentum * dp + c.grad + wd * c.detach()
         for c, dp, wd in zip(copies, d_prev, decays(net))]
    return d, float(norm)


def run_against_oracle(mode, momentum, m, max_norm, other):
    net = Mixed(seed=1, other=other)
    order = list(net.parameters())
    k = 2
    opt = LABPAL(groups(net), mode=mode, sgd_rate="paper", momentum=momentum,
                 max_grad_norm=max_norm, approximation_batches=k, batch_size_schedule=((0, m),),
                 noise_factor=1.0,
                 reuse_updates=10**6, warmup_updates=10**6,
                 sample_positions=(0.0, 0.05, 0.2), direction_norm_range=(0.0, float("inf")))
    data = batches(k * m + 4 * m, 16, 6, seed=2)
    tol = dict(rtol=2e-5, atol=1e-6)  # fp32 arithmetic in the fp32 flat
    d = [torch.zeros_like(p, dtype=torch.float64) for p in order]
    norms = []
    # the measurement: its direction from the first m batches, clipped as training's
    d, norm = oracle_direction(net, data[:m], d, momentum, max_norm)
    norms.append(norm)
    theta0 = [p.detach().double().clone() for p in order]
    for x, y in data[:k * m]:
        opt.step(lambda x=x, y=y: loss_fn(net, x, y))
    record = opt.measurements()[0]
    assert record["valid"], record
    assert opt.phase == TRAINING
    torch.testing.assert_close(float(opt.grad_norm), norm, rtol=1e-5, atol=0)
    direction = torch.cat([t.flatten() for t in d])
    assert abs(record["direction_norm"] - float(direction.norm())) <= 1e-5 * float(direction.norm())
    step = record["s_upd"] / float(direction.norm())
    for p, t0, dp in zip(order, theta0, d):
        torch.testing.assert_close(p.detach().double(), t0 - step * dp, **tol)
    eta, s_upd = float(opt.line.eta), float(opt.line.s_upd)
    # the TRAINING updates
    for u in range(4):
        batch = data[k * m + u * m:k * m + (u + 1) * m]
        theta = [p.detach().double().clone() for p in order]
        d, norm = oracle_direction(net, batch, d, momentum, max_norm)
        norms.append(norm)
        for x, y in batch:
            opt.step(lambda x=x, y=y: loss_fn(net, x, y))
        torch.testing.assert_close(float(opt.grad_norm), norm, rtol=1e-5, atol=0)
        if mode == "SGD":
            want = [t - eta * dp for t, dp in zip(theta, d)]
        else:
            dnorm = float(torch.cat([t.flatten() for t in d]).norm())
            want = [t - s_upd / dnorm * dp for t, dp in zip(theta, d)]
        for p, w in zip(order, want):
            torch.testing.assert_close(p.detach().double(), w, **tol)
    assert opt.updates == 5
    return norms


@on_every_backend
@pytest.mark.parametrize("mode", ["SGD", "NSGD"])
@pytest.mark.parametrize("momentum,m", [(0.0, 1), (0.9, 2)])
@pytest.mark.parametrize("other", [torch.float64, torch.float32], ids=["two_flats", "one_flat"])
def test_a_run_follows_the_oracle_when_clipping_is_active(mode, momentum, m, other):
    norms = run_against_oracle(mode, momentum, m, max_norm=0.05, other=other)
    assert min(norms) > 0.05, norms  # every direction was clipped


@on_every_backend
@pytest.mark.parametrize("mode", ["SGD", "NSGD"])
@pytest.mark.parametrize("momentum,m", [(0.5, 3)])
def test_a_run_follows_the_oracle_when_clipping_is_inactive(mode, momentum, m):
    norms = run_against_oracle(mode, momentum, m, max_norm=50.0, other=torch.float64)
    assert max(norms) < 50.0, norms  # no direction was clipped


@on_every_backend
def test_inactive_clipping_trains_as_no_clipping():
    """A max_grad_norm above every gradient norm changes nothing but the rounding of ⟨ḡ, d⟩.
    (Without the step check: its shrink factor follows the measured positions, which that
    rounding moves, and 30 calls later the parameters differ by 1e-3 relative, not 2e-5.)"""
    runs = []
    for max_norm in (None, 1e6):
        net = Mixed(seed=3)
        opt = LABPAL(groups(net), mode="SGD", momentum=0.9, max_grad_norm=max_norm,
                     step_check=False, approximation_batches=2, batch_size_schedule=((0, 2),), noise_factor=1.0,
                     reuse_updates=4, warmup_updates=10**6)
        for x, y in batches(30, 16, 6, seed=4):
            opt.step(lambda x=x, y=y: loss_fn(net, x, y))
        runs.append((torch.cat([p.detach().double().flatten() for p in net.parameters()]),
                     opt.grad_norm.item()))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=2e-5, atol=1e-6)
    assert runs[0][1] != runs[0][1]  # NaN: not computed without clipping
    assert 0 < runs[1][1] < 1e6


@on_every_backend
def test_a_non_finite_gradient_skips_the_update_and_never_reaches_the_parameters():
    net = Mixed(seed=5)
    opt = LABPAL(groups(net), mode="NSGD", momentum=0.9, max_grad_norm=1.0,
                 approximation_batches=2, batch_size_schedule=((0, 1),), noise_factor=1.0,
                 reuse_updates=10**6, warmup_updates=10**6)
    data = batches(6, 16, 6, seed=6)
    for x, y in data[:3]:
        opt.step(lambda x=x, y=y: loss_fn(net, x, y))
    assert opt.phase == TRAINING and opt.updates == 2
    before = [p.detach().clone() for p in net.parameters()]
    x, y = data[3]
    # a gradient that is NaN everywhere in a (0·inf), finite elsewhere
    opt.step(lambda: loss_fn(net, x, y) + net.a.weight.sum() * 0.0 * float("inf"))
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert int(opt.line.skipped_updates) == 1 and opt.grad_norm.isnan()
    for x, y in data[4:]:  # and training goes on, clipped
        opt.step(lambda x=x, y=y: loss_fn(net, x, y))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert opt.updates == 5 and torch.isfinite(opt.grad_norm)


@on_every_backend
def test_a_measurement_with_a_non_finite_gradient_is_abandoned():
    net = Mixed(seed=7)
    opt = LABPAL(groups(net), max_grad_norm=1.0, approximation_batches=2, noise_factor=1.0,
                 batch_size_schedule=((0, 1),), reuse_updates=10**6, warmup_updates=10**6)
    before = [p.detach().clone() for p in net.parameters()]
    x, y = batches(1, 16, 6, seed=8)[0]
    opt.step(lambda: loss_fn(net, x, y) + net.b.bias.sum() * 0.0 * float("inf"))
    record = opt.measurements()[0]
    assert record["reason"].startswith("abandoned") and "norm" in record["reason"], record
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p.detach(), b)


# -- host syncs and launches --------------------------------------------------------------
def sync_net():
    """test_sync_and_memory's network (one tile per flat, for Triton's interpreter)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 48), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(48, 48), torch.nn.ReLU(), torch.nn.Linear(48, 3))


@on_every_backend
def test_clipping_adds_no_host_sync_and_no_allocation():
    """As test_sync_and_memory, with clipping on (and active): 0 syncs in TRAINING, at most 2
    per measurement; TRAINING steps allocate nothing beyond forward and backward."""
    for mode, rate, momentum, m in (("NSGD", "robust", 0.0, 1), ("SGD", "paper", 0.9, 2),
                                    ("SGD", "robust", 0.9, 2)):
        net = sync_net()
        opt = LABPAL([{"params": net[:4].parameters(), "weight_decay": 1e-4},
                      {"params": net[5].parameters()}], model=net, mode=mode, sgd_rate=rate,
                     momentum=momentum,
                     approximation_batches=3, reuse_updates=20, warmup_updates=10**6,
                     batch_size_schedule=((0, m),), noise_factor=1.0, max_grad_norm=0.1)
        n_calls = 3 * m + 20 * m + 3 * m + 2 * m
        syncs, allocs, plain = [], Counter(), Counter()
        for i, (x, y) in enumerate(batches(n_calls, 8, 20, seed=0)):
            with Watch() as w:
                opt.step(closure_of(net, x, y))
            syncs.append(w.syncs)
            if 3 * m + 2 * m <= i < 3 * m + 20 * m:  # TRAINING calls, buffers made
                allocs.update(w.allocs)
                with Watch() as p:  # what forward + backward alone allocate
                    net.zero_grad(set_to_none=False)
                    closure_of(net, x, y)().backward()
                plain.update(p.allocs)
                net.zero_grad(set_to_none=False)  # not for the next step (it would refuse)
        records = opt.measurements()
        # (robust SGD's other steps lead to a second line that is no descending parabola)
        assert len(records) == 2 and records[0]["valid"], records
        assert records[1]["valid"] or (mode, rate) == ("SGD", "robust"), records
        first, second = records[0]["call"], records[1]["call"]
        assert (first, second) == (0, 3 * m + 20 * m)
        in_first, in_second = sum(syncs[:3 * m]), sum(syncs[second:second + 3 * m])
        assert 1 <= in_first <= 2 and 1 <= in_second <= 2
        assert sum(syncs) == in_first + in_second, syncs
        assert allocs == plain, (allocs, plain)
        assert float(opt.line.clip_factor) < 1.0  # clipping was active


@on_every_backend
def test_no_sync_in_any_training_step_with_clipping():
    net = sync_net()
    opt = LABPAL(net.parameters(), model=net, momentum=0.5, approximation_batches=2,
                 reuse_updates=10**6, warmup_updates=10**6, batch_size_schedule=((0, 2),),
                 noise_factor=1.0, max_grad_norm=0.05)
    data = batches(4 + 12, 8, 20, seed=9)
    for x, y in data[:4]:
        opt.step(closure_of(net, x, y))
    assert opt.phase == TRAINING
    with Watch() as w:
        for x, y in data[4:]:
            opt.step(closure_of(net, x, y))
    assert w.syncs == 0 and opt.updates == 1 + 6


@pytest.mark.parametrize("m", [1, 2])
def test_triton_clipping_adds_one_launch_per_flat(m):
    """Per update (and per measurement's direction) one ‖ḡ‖² pass per flat, nothing else;
    without clipping not even that (test_triton counts the rest exactly)."""
    pytest.importorskip("triton")
    from labpal_fast.ops import triton as tri

    def launches(max_norm):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        net[2].half()
        model = lambda x: net[2](net[1](net[0](x)).half()).float()  # noqa: E731
        opt = LABPAL([{"params": net[0].parameters(), "weight_decay": 1e-3},
                      {"params": net[2].parameters()}], backend="triton", momentum=0.9,
                     approximation_batches=2, batch_size_schedule=((0, m),), noise_factor=1.0,
                     reuse_updates=10**6, warmup_updates=100, max_grad_norm=max_norm,
                     sample_positions=(0.0, 0.01, 0.05), direction_norm_range=(0.0, float("inf")))
        assert len(opt.flats) == 2
        counts = []
        for x, y in batches(2 * m + 3 * m, 8, 6, seed=1):
            before = Counter(tri.LAUNCHES)
            opt.step(lambda x=x, y=y: torch.nn.functional.cross_entropy(model(x), y))
            counts.append(Counter(tri.LAUNCHES) - before)
        assert opt.measurements()[0]["valid"]
        return counts

    off, on = launches(None), launches(1e-3)
    measurement_off = sum(off[:2 * m], Counter())
    measurement_on = sum(on[:2 * m], Counter())
    assert measurement_on - measurement_off == Counter({"_grad_sqnorm_kernel": 2})
    assert measurement_off - measurement_on == Counter()
    for i, (a, b) in enumerate(zip(off[2 * m:], on[2 * m:])):
        extra = Counter({"_grad_sqnorm_kernel": 2}) if (i + 1) % m == 0 else Counter()
        assert b - a == extra and a - b == Counter(), (i, a, b)
    assert all("_grad_sqnorm_kernel" not in c for c in off)


# -- checkpoints ----------------------------------------------------------------------------
def _opt(net, **hyper):
    return LABPAL(groups(net), momentum=0.9, approximation_batches=2, noise_factor=1.0,
                  batch_size_schedule=((0, 2),), reuse_updates=5, warmup_updates=10**6, **hyper)


@on_every_backend
def test_a_checkpoint_continues_bit_for_bit_with_clipping():
    data = batches(30, 16, 6, seed=10)
    net_a = Mixed(seed=11)
    a = _opt(net_a, max_grad_norm=0.2)
    for x, y in data[:13]:
        a.step(lambda x=x, y=y: loss_fn(net_a, x, y))
    state = a.state_dict()
    assert labpal_entry(state)["hyper"]["max_grad_norm"] == 0.2
    net_b = Mixed(seed=12)
    net_b.load_state_dict(net_a.state_dict())
    b = _opt(net_b, max_grad_norm=0.2)
    b.load_state_dict(state)
    for x, y in data[13:]:
        a.step(lambda x=x, y=y: loss_fn(net_a, x, y))
        b.step(lambda x=x, y=y: loss_fn(net_b, x, y))
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(a.grad_norm, b.grad_norm)


@on_every_backend
def test_a_version_1_checkpoint_without_max_grad_norm_loads():
    """Checkpoints saved before max_grad_norm existed have no such key: they load, and the
    loading optimizer's own max_grad_norm is used (clipping is not part of the saved state)."""
    data = batches(20, 16, 6, seed=13)
    net = Mixed(seed=14)
    old = _opt(net)
    for x, y in data[:7]:
        old.step(lambda x=x, y=y: loss_fn(net, x, y))
    state = old.state_dict()
    del labpal_entry(state)["hyper"]["max_grad_norm"]
    # version 1, as saved then: no lr_multiplier_schedule state either, nor robust SGD's n̄ or
    # the loss scaling state
    labpal_entry(state)["version"] = 1
    for name in ("s_base", "eta_base", "multiplier", "norm_mean", "loss_scale", "scale_good"):
        labpal_entry(state)["line"].pop(name, None)
    net_b = Mixed(seed=15)
    net_b.load_state_dict(net.state_dict())
    new = _opt(net_b, max_grad_norm=0.01)
    new.load_state_dict(state)
    assert new.hyper.max_grad_norm == 0.01 and new.updates == old.updates
    for x, y in data[7:]:
        new.step(lambda x=x, y=y: loss_fn(net_b, x, y))
    assert float(new.grad_norm) > 0.01 and float(new.line.clip_factor) < 1.0
    assert all(torch.isfinite(p).all() for p in net_b.parameters())
