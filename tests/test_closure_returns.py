"""What a closure returns: any one-element loss is taken as backward() takes it, and no return
value leaves the optimizer unable to step (issue 20, item 2)."""
import pytest
import torch
import torch.nn.functional as F

from labpal_fast import LABPAL

from helpers import batches, small_net

pytestmark = pytest.mark.usefixtures("backend")

HYPER = dict(approximation_batches=3, reuse_updates=4, warmup_updates=0, noise_factor=1.0,
             averaging_window=2)
DATA = batches(16, 16, 6, seed=7)


def _train(shape_of_call):
    """Trains over DATA; `shape_of_call(i)` is the shape call i's closure returns its loss in
    (None: as computed, 0-dim)."""
    net = small_net(0)
    opt = LABPAL(net.parameters(), **HYPER)
    for i, (x, y) in enumerate(DATA):
        shape = shape_of_call(i)

        def closure(x=x, y=y, shape=shape):
            loss = F.cross_entropy(net(x), y)
            return loss if shape is None or opt.repeating else loss.reshape(shape)
        assert opt.step(closure).numel() == 1
    return [p.detach().clone() for p in net.parameters()], repr(opt.measurements())


def test_a_one_element_loss_trains_as_a_scalar_one():
    expected = _train(lambda i: None)
    got = _train(lambda i: (1,))
    assert got[1] == expected[1] and "'valid': True" in got[1]
    assert all(torch.equal(p, q) for p, q in zip(got[0], expected[0]))
    # mixed: one-element losses at some calls only (a measurement's samples among them)
    got = _train(lambda i: (1, 1) if i % 3 == 1 else None)
    assert all(torch.equal(p, q) for p, q in zip(got[0], expected[0]))


def test_after_bad_returns_a_good_closure_trains():
    net = small_net(1)
    opt = LABPAL(net.parameters(), **HYPER)
    x, y = DATA[0]
    good = lambda: F.cross_entropy(net(x), y)  # noqa: E731
    bad_values = [lambda: good().reshape(1), lambda: None,
                  lambda: torch.ones(2, requires_grad=True)]
    for bad in bad_values:  # for more calls than a measurement has: every kind of call
        for _ in range(4):
            try:
                opt.step(bad)
            except (TypeError, ValueError):
                pass
        opt.step(good)
    updates = opt.updates
    for _ in range(6):
        opt.step(good)
    assert opt.updates > updates and any(r["valid"] for r in opt.measurements())


# ---------------------------------------------------------------------------- issue 20, item 8
def _failing(seed=2):
    """Every measurement is abandoned (‖d‖ > 100: the loss × 1e6) until the safe step."""
    net = small_net(seed)
    opt = LABPAL(net.parameters(), **HYPER)
    x, y = DATA[0]
    return net, opt, lambda: F.cross_entropy(net(x), y) * 1e6


def test_a_run_resumed_in_a_failure_streak_falls_back_as_the_uninterrupted_one():
    net, opt, closure = _failing()
    with pytest.warns(RuntimeWarning, match="measurements in a row gave no learning rate"):
        for _ in range(6):
            opt.step(closure)
    straight = [p.detach().clone() for p in net.parameters()], repr(opt.measurements())

    net, opt, closure = _failing()
    for _ in range(2):
        opt.step(closure)
    assert opt._failures == 2 and not opt.counters.has_rate
    sd, params = opt.state_dict(), [p.detach().clone() for p in net.parameters()]
    net2, opt2, closure2 = _failing(seed=3)
    with torch.no_grad():
        for p, q in zip(net2.parameters(), params):
            p.copy_(q)
    opt2.load_state_dict(sd)
    assert opt2._failures == 2
    # the warning is not state: the resumed optimizer warns again, when it falls back
    with pytest.warns(RuntimeWarning, match="measurements in a row gave no learning rate"):
        for _ in range(4):
            opt2.step(closure2)
    assert repr(opt2.measurements()) == straight[1] and opt2.counters.has_rate
    assert opt2.param_groups[0]["lr"] == opt2.line.s_upd.item() > 0  # the safe step, shown
    assert all(torch.equal(p, q) for p, q in zip(net2.parameters(), straight[0]))
