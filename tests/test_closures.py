"""The closure contract: closures that do not repeat their loss are stopped with the fix;
torch-convention closures (that run backward themselves) train as plain ones do."""
import random

import numpy as np
import pytest
import torch

from labpal_fast import LABPAL

from helpers import batches, small_net

pytestmark = pytest.mark.usefixtures("backend")

K = 3
# measurements every 4 updates, each over K batches; every direction accepted
SETTINGS = dict(approximation_batches=K, reuse_updates=4, warmup_updates=0,
                direction_norm_range=(0.0, float("inf")))


def ce(net, x, y):
    return torch.nn.functional.cross_entropy(net(x), y)


def test_a_late_binding_closure_is_stopped_with_the_fix():
    """The classic loop: the closure reads the loop's x, y when it runs, so its repeats
    evaluate the latest batch. The measurement's fit is discarded and the error says why."""
    net = small_net(0)
    opt = LABPAL(net.parameters(), **SETTINGS)
    data = batches(K, 16, 6, seed=1)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"did not repeat its loss.*bind the batch"):
        for x, y in data:
            def closure():
                return ce(net, x, y)
            opt.step(closure)
    record = opt.measurements()[-1]
    assert not record["valid"] and record["reason"].startswith("closure not repeatable")
    # no rate came from it: the parameters are where the measurement started
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert opt.phase == "training" and opt.updates == 0
    # fixed (the batch bound), training goes on from there
    for x, y in batches(2 * K, 16, 6, seed=2):
        opt.step(lambda x=x, y=y: ce(net, x, y))
    assert opt.measurements()[-1]["valid"] and opt.updates >= 1


def test_unreplayed_randomness_is_stopped_and_replayed_generators_are_fine():
    net = small_net(0)
    data = batches(K, 16, 6, seed=3)
    private = torch.Generator().manual_seed(0)  # not a global generator: not replayed

    def noisy(x, y):
        return ce(net, x + 0.5 * torch.randn(x.shape, generator=private), y)

    opt = LABPAL(net.parameters(), **SETTINGS)
    with pytest.raises(RuntimeError, match="did not repeat its loss"):
        for x, y in data:
            opt.step(lambda x=x, y=y: noisy(x, y))

    # Python's random and numpy's global generator are replayed like torch's
    def augmented(x, y):
        shift = random.gauss(0, 0.5) + float(np.random.normal(0, 0.5))
        return ce(net, x + shift, y)

    net = small_net(0)
    opt = LABPAL(net.parameters(), **SETTINGS)
    random.seed(0)
    np.random.seed(0)
    for x, y in data:
        opt.step(lambda x=x, y=y: augmented(x, y))
    assert opt.measurements()[-1]["valid"]
    draws = (random.random(), np.random.rand())
    # the global generators end as if the repeats had not run
    random.seed(0)
    np.random.seed(0)
    for _ in data:
        random.gauss(0, 0.5), np.random.normal(0, 0.5)
    assert draws == (random.random(), np.random.rand())


def test_the_check_can_be_turned_off_and_costs_one_forward_per_measurement():
    calls = {}
    for tolerance in (1e-3, None):
        net = small_net(0)
        opt = LABPAL(net.parameters(), replay_tolerance=tolerance, **SETTINGS)
        n = 0
        for x, y in batches(K, 16, 6, seed=4):
            def closure(x=x, y=y):
                nonlocal n
                n += 1
                return ce(net, x, y)
            opt.step(closure)
        calls[tolerance] = n
    positions = 3 + 1  # and the step check's evaluation at the proposed step
    assert calls[None] == K * positions and calls[1e-3] == K * positions + 1


def torch_convention(opt, net, style):
    """Closures in torch's convention (LBFGS's, Lightning's): they zero the gradients and run
    backward themselves."""
    def make(x, y):
        def closure():
            if style == "model.zero_grad":
                net.zero_grad()  # set_to_none: LABPAL re-attaches its views
            else:
                opt.zero_grad()
            loss = ce(net, x, y)
            loss.backward(retain_graph=style == "retain_graph")
            return loss.detach() if style == "detached" else loss
        return closure
    return make


@pytest.mark.parametrize("style", ["detached", "with graph", "retain_graph", "model.zero_grad"])
@pytest.mark.parametrize("mode", ["NSGD", "SGD"])
def test_torch_convention_closures_train_exactly_as_plain_ones(style, mode):
    data = batches(36, 16, 6, seed=5)  # 3 measurements of K·m calls, 4 updates between
    runs = {}
    for kind in ("plain", "torch"):
        net = small_net(1)
        opt = LABPAL(net.parameters(), mode=mode, momentum=0.5, noise_factor=2.0,
                     **SETTINGS)  # m = 2 micro-batches per update
        make = torch_convention(opt, net, style) if kind == "torch" else \
            (lambda x, y: (lambda: ce(net, x, y)))
        for x, y in data:
            opt.step(make(x, y))
        runs[kind] = ([p.detach().clone() for p in net.parameters()], opt.measurements())
    assert opt.multiplier == 2 and len(runs["torch"][1]) >= 3
    assert all(r["valid"] for r in runs["torch"][1])
    for a, b in zip(runs["plain"][0], runs["torch"][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(runs["plain"][1], runs["torch"][1]):
        assert a["s_upd"] == pytest.approx(b["s_upd"], rel=1e-5)


def test_repeating_is_true_exactly_during_the_repeats():
    net = small_net(0)
    opt = LABPAL(net.parameters(), **SETTINGS)
    seen = []
    for x, y in batches(K + 2, 16, 6, seed=6):
        def closure(x=x, y=y):
            seen.append(opt.repeating)
            return ce(net, x, y)
        opt.step(closure)
    # K first calls, the check, K per other position and K at the proposed step (the step
    # check), then 2 training calls
    assert seen == [False] * K + [True] * (1 + 3 * K) + [False] * 2
    assert not opt.repeating


def test_a_closure_that_gives_no_gradient_at_all_is_refused():
    net = small_net(0)
    opt = LABPAL(net.parameters(), **SETTINGS)
    x, y = batches(1, 8, 6, seed=7)[0]
    with pytest.raises(RuntimeError, match="does not require grad and the closure did not run"):
        opt.step(lambda: ce(net, x, y).detach())


def test_parameters_over_the_same_memory_are_refused():
    base = torch.nn.Parameter(torch.randn(10))
    a = torch.nn.Parameter(base.data[:6])
    b = torch.nn.Parameter(base.data[4:].view(2, 3))  # overlaps a in elements 4 and 5
    before = base.detach().clone()
    with pytest.raises(ValueError, match="shares memory"):
        LABPAL([a, b])
    assert torch.equal(base.detach(), before) and a.data.data_ptr() == base.data_ptr()
    # disjoint views of one tensor (a previous LABPAL's flat buffer holds parameters so) are fine
    net = torch.nn.Linear(3, 2)
    LABPAL(net.parameters())
    LABPAL(net.parameters())
