"""Faults lose nothing: exceptions in closures, NaN samples, non-finite directions, abandons."""
import math

import pytest
import torch

from labpal_fast import LABPAL

from helpers import Quadratic, batches, small_net, closure_for

pytestmark = pytest.mark.usefixtures("backend")

ALWAYS_VALID = dict(direction_norm_range=(0.0, math.inf))


class Flaky:
    """A closure over a model that raises, or returns NaN, on chosen evaluations."""

    def __init__(self, model, x, y, raise_on=(), nan_on=()):
        self.model, self.x, self.y = model, x, y
        self.raise_on, self.nan_on, self.calls = set(raise_on), set(nan_on), 0

    def __call__(self):
        self.calls += 1
        if self.calls in self.raise_on:
            raise RuntimeError("data loader broke")
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        return loss * float("nan") if self.calls in self.nan_on else loss


def test_exception_during_line_evaluations_restores_everything():
    net = small_net(0, batchnorm=True, dropout=0.2)
    opt = LABPAL(net.parameters(), model=net, approximation_batches=2, **ALWAYS_VALID)
    data = batches(12, 16, 6, seed=1)
    for x, y in data[:4]:  # a first measurement, then training: a rate exists
        opt.step(closure_for(net, x, y))
    assert opt.updates == 3 and opt.measurements()[0]["valid"]
    opt.counters.last_end = -10**6  # force the next boundary to measure (reuse_updates reached)
    opt.step(closure_for(net, *data[4]))
    assert opt.phase == "measuring"
    bad = Flaky(net, *data[5], raise_on={3})  # 1st call fine, 1st repeat fine, 2nd repeat raises
    # what must survive: parameters at the line's origin, buffers, the RNG after the call
    origin = [p.detach().clone() for p in net.parameters()]
    torch.manual_seed(99)
    with pytest.raises(RuntimeError, match="data loader broke"):
        opt.step(bad)
    rng_after = torch.get_rng_state()
    for p, q in zip(origin, net.parameters()):
        assert torch.equal(p, q)
    # (buffers: see the next test.) RNG: two first calls drew dropout masks; the repeats must leave no trace
    net_ref = small_net(0, batchnorm=True, dropout=0.2)
    torch.manual_seed(99)
    with torch.no_grad():
        net_ref(data[5][0])  # the failing step's first evaluation draws one mask
    assert torch.equal(rng_after, torch.get_rng_state())
    rec = opt.measurements()[-1]
    assert rec["reason"].startswith("interrupted") and not rec["valid"]
    assert opt.phase == "training"
    updates = opt.updates
    for x, y in data[6:]:
        opt.step(closure_for(net, x, y))
    assert opt.updates == updates + 6
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_running_stats_after_exception_match_the_first_evaluations_only():
    net = small_net(0, batchnorm=True)
    ref = small_net(0, batchnorm=True)
    opt = LABPAL(net.parameters(), model=net, approximation_batches=2, **ALWAYS_VALID)
    (x0, y0), (x1, y1) = batches(2, 16, 6, seed=2)
    opt.step(closure_for(net, x0, y0))
    with pytest.raises(RuntimeError):
        opt.step(Flaky(net, x1, y1, raise_on={2}))
    with torch.no_grad():
        ref(x0), ref(x1)
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(net.state_dict()[name], ref.state_dict()[name]), name
    # no rate yet: the next call measures again
    opt.step(closure_for(net, x0, y0))
    assert opt.phase == "measuring"


def test_nan_samples_are_skipped_and_counted():
    net = small_net(0)
    (x, y), = batches(1, 16, 6, seed=3)  # one batch: skipping a sample leaves every mean exact
    closures = [Flaky(net, x, y, nan_on={2}) if i == 1 else closure_for(net, x, y)
                for i in range(4)]
    opt = LABPAL(net.parameters(), approximation_batches=4, **ALWAYS_VALID)
    for c in closures:
        opt.step(c)
    rec = opt.measurements()[0]
    # closure 1 returned NaN on its first repeat (position 1.77e-4) only
    assert rec["counts"] == [4, 3, 4]
    assert rec["valid"]
    assert int(opt.line.skipped_samples) == 1


def test_a_position_without_finite_samples_invalidates_the_fit():
    net = small_net(0)
    (x, y), = batches(1, 16, 6, seed=4)
    before = [p.detach().clone() for p in net.parameters()]
    opt = LABPAL(net.parameters(), approximation_batches=1, **ALWAYS_VALID)
    opt.step(Flaky(net, x, y, nan_on={3}))  # the repeat at the last position
    rec = opt.measurements()[0]
    assert rec["counts"] == [1, 1, 0]
    assert not rec["valid"] and "no finite loss sample" in rec["reason"]
    # no rate yet: back at the origin, measuring again
    for p, q in zip(before, net.parameters()):
        assert torch.equal(p, q)
    assert opt.updates == 0


def test_non_finite_direction_is_never_written():
    quad = Quadratic([5], seed=0, offset=0.3)
    opt = LABPAL(quad.parameters(), approximation_batches=1, mode="SGD", momentum=0.5,
                 **ALWAYS_VALID)
    opt.step(quad)
    poison = {"on": False}

    def closure():
        loss = quad()
        return loss * torch.tensor(float("inf")) if poison["on"] else loss

    opt.step(closure)
    poison["on"] = True
    before = quad.flat().detach().clone()
    opt.step(closure)
    assert torch.equal(before, quad.flat().detach())
    assert int(opt.line.skipped_updates) == 1
    poison["on"] = False
    opt.step(closure)  # training goes on, from a cleared momentum
    assert not torch.equal(before, quad.flat().detach())
    assert torch.isfinite(quad.flat()).all()


def test_abandoned_measurement_leaves_parameters_and_direction():
    quad = Quadratic([5], seed=0, offset=0.3)
    opt = LABPAL(quad.parameters(), approximation_batches=2, momentum=0.9,
                 direction_norm_range=(1e-3, 1e6))
    scale = {"v": 1.0}

    def closure():
        return quad() * scale["v"]

    opt.step(closure), opt.step(closure)  # first measurement: a rate
    opt.step(closure)
    d_before = opt.state_dict()["state"][0]["direction"]
    theta = quad.flat().detach().clone()
    scale["v"] = 1e9  # now the direction's norm is far above the range
    opt.counters.last_end = -10**6
    opt.step(closure)
    rec = opt.measurements()[-1]
    assert rec["reason"].startswith("abandoned: direction norm")
    assert opt.phase == "training"
    assert torch.equal(theta, quad.flat().detach())
    assert torch.equal(d_before, opt.state_dict()["state"][0]["direction"])


def test_abandon_without_a_rate_measures_again():
    quad = Quadratic([5], seed=0, offset=0.3)
    # the paper's rule (the robust fits fall back after 3: tests/test_line_accuracy.py)
    opt = LABPAL(quad.parameters(), approximation_batches=2, direction_norm_range=(1e-3, 1e-2),
                 line_fit="paper")
    theta = quad.flat().detach().clone()
    for _ in range(4):
        opt.step(quad)
    assert [r["call"] for r in opt.measurements()] == [0, 1, 2, 3]
    assert opt.updates == 0
    assert torch.equal(theta, quad.flat().detach())
