"""SGD / NSGD / momentum / gradient averaging against a hand-written loop (float64)."""
import pytest
import torch

from labpal_fast import LABPAL

from helpers import batches, small_net, closure_for

pytestmark = pytest.mark.usefixtures("backend")


def hand_loop(model, data, *, mode, momentum, m, k, decays, s_upd, eta, n_updates,
              rate="paper"):
    """Plain PyTorch: the first measurement's move to s_upd, then n_updates training updates.
    SGD with rate="robust": η = min(s_upd/n̄, 2·s_upd/‖d‖), n̄ ← n̄ + (‖d‖ − n̄)/1000 from
    n̄ = the first update's ‖d‖ (docs/algorithm.md, "SGD mode")."""
    params = [p for p in model.parameters()]
    wd = [decays[0]] * 2 + [decays[1]] * 2  # group 0: first Linear, group 1: last Linear
    d = [torch.zeros_like(p) for p in params]

    def mean_grad(batch_list):
        g = [torch.zeros_like(p) for p in params]
        for x, y in batch_list:
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            for gi, p in zip(g, params):
                gi += p.grad / len(batch_list)
        return [gi + w * p.detach() for gi, p, w in zip(g, params, wd)]

    def direction(batch_list):
        for di, gi in zip(d, mean_grad(batch_list)):
            di.mul_(momentum).add_(gi)
        return torch.sqrt(sum((di * di).sum() for di in d))

    norm = direction(data[:m])
    with torch.no_grad():
        for p, di in zip(params, d):
            p -= s_upd * di / norm
    call = k * m
    lrs = []
    mean = None
    for _ in range(n_updates):
        norm = direction(data[call:call + m])
        call += m
        if mode == "SGD" and rate == "robust":
            mean = float(norm) if mean is None else mean + (float(norm) - mean) / 1000
            eta = min(s_upd / mean, 2 * s_upd / float(norm))
        with torch.no_grad():
            for p, di in zip(params, d):
                p -= (eta * di) if mode == "SGD" else (s_upd * di / norm)
        lrs.append(eta if mode == "SGD" else s_upd / float(norm))
    return lrs


@pytest.mark.parametrize("mode,rate,momentum,mult,decays", [
    ("SGD", "paper", 0.0, 1, (0.0, 0.0)), ("SGD", "robust", 0.0, 1, (0.0, 0.0)),
    ("NSGD", "robust", 0.0, 1, (0.0, 0.0)), ("SGD", "paper", 0.9, 2, (0.01, 0.0)),
    ("SGD", "robust", 0.9, 2, (0.01, 0.0)), ("NSGD", "robust", 0.5, 3, (0.0, 0.05))])
def test_training_updates_match_a_hand_written_loop(mode, rate, momentum, mult, decays):
    k, n_updates = 2, 7
    data = batches(k * mult + n_updates * mult, 16, 6, seed=3, dtype=torch.float64)
    net = small_net(0, dtype=torch.float64)
    ref = small_net(0, dtype=torch.float64)
    groups = [{"params": list(net[0].parameters()), "weight_decay": decays[0]},
              {"params": list(net[2].parameters()), "weight_decay": decays[1]}]
    opt = LABPAL(groups, mode=mode, sgd_rate=rate, momentum=momentum, approximation_batches=k,
                 batch_size_schedule=((0, mult),), noise_factor=1.0, reuse_updates=1000,
                 direction_norm_range=(0.0, float("inf")))
    lrs = []
    for i, (x, y) in enumerate(data):
        opt.step(closure_for(net, x, y))
        if i >= k * mult and (i + 1 - k * mult) % mult == 0:
            lrs.append(float(opt.lr_tensor))
    rec = opt.measurements()[0]
    assert rec["valid"] and opt.updates == 1 + n_updates
    ref_lrs = hand_loop(ref, data, mode=mode, momentum=momentum, m=mult, k=k, decays=decays,
                        s_upd=rec["s_upd"], eta=rec["eta"], n_updates=n_updates, rate=rate)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert lrs == pytest.approx(ref_lrs, rel=1e-10)


def test_lr_is_a_float_shared_by_all_groups_and_lr_tensor_the_device_value():
    net = small_net(0)
    opt = LABPAL([{"params": net[0].parameters()}, {"params": net[2].parameters()}],
                 approximation_batches=1)
    x, y = batches(1, 8, 6, seed=0)[0]
    opt.step(closure_for(net, x, y))
    lr0, lr1 = opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]
    assert type(lr0) is float and lr0 == lr1 == opt.line.s_upd.item() > 0  # NSGD: s_upd
    live = opt.lr_tensor
    assert torch.is_tensor(live) and live.dim() == 0 and live is opt.lr_tensor
    assert float(live) > 0
