"""Repeated closure evaluations: same random numbers, untouched buffers, global RNG unchanged."""

import pytest
import torch

from labpal_fast import LABPAL

from helpers import batches

pytestmark = pytest.mark.usefixtures("backend")


class MaskLog(torch.nn.Module):
    """Dropout-like noise that logs every mask it draws."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def forward(self, x):
        mask = torch.rand_like(x) > 0.3
        self.masks.append(mask)
        return x * mask


def net_with(*middle):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), *middle, torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))


def test_repeats_draw_the_same_masks_as_the_first_call():
    log = MaskLog()
    net = net_with(log)
    K = 3
    opt = LABPAL(net.parameters(), approximation_batches=K, direction_norm_range=(0, 1e9))
    data = batches(K, 8, 6, seed=0)
    torch.manual_seed(5)
    for x, y in data:
        opt.step(lambda x=x, y=y: torch.nn.functional.cross_entropy(net(x), y))
    masks = log.masks
    # first calls, the first closure again at θ₀ (the repeat check), one repeat per position
    # and one at the proposed step (the step check)
    assert len(masks) == 4 * K + 1
    assert torch.equal(masks[0], masks[K])
    for i in range(K):
        assert torch.equal(masks[i], masks[K + 1 + i])
        assert torch.equal(masks[i], masks[2 * K + 1 + i])
        assert torch.equal(masks[i], masks[3 * K + 1 + i])
    assert not torch.equal(masks[0], masks[1])  # the closures did not share one random state


def test_global_rng_ends_as_without_the_repeats():
    net = net_with(torch.nn.Dropout(0.3))
    K = 4
    data = batches(K, 8, 6, seed=1)
    opt = LABPAL(net.parameters(), approximation_batches=K, direction_norm_range=(0, 1e9))
    torch.manual_seed(7)
    for x, y in data:
        opt.step(lambda x=x, y=y: torch.nn.functional.cross_entropy(net(x), y))
    after_optimizer = torch.get_rng_state()
    assert opt.updates == 1
    torch.manual_seed(7)
    with torch.no_grad():
        for x, _ in data:  # the first evaluations alone
            net(x)
    assert torch.equal(after_optimizer, torch.get_rng_state())


def test_batchnorm_statistics_see_only_the_first_evaluations():
    K = 3
    data = batches(K, 8, 6, seed=2)
    statistics = {}
    for use_model in (True, False):
        net = net_with(torch.nn.BatchNorm1d(16))
        opt = LABPAL(net.parameters(), model=net if use_model else None,
                     approximation_batches=K, direction_norm_range=(0, 1e9))
        for x, y in data:
            opt.step(lambda x=x, y=y: torch.nn.functional.cross_entropy(net(x), y))
        statistics[use_model] = {k: v.clone() for k, v in net[1].named_buffers()}
    ref = net_with(torch.nn.BatchNorm1d(16))
    with torch.no_grad():
        for x, _ in data:
            ref(x)
    for name, value in ref[1].named_buffers():
        assert torch.equal(statistics[True][name], value), name
    # without model= the repeats leak into the statistics: what model= is for
    assert int(statistics[False]["num_batches_tracked"]) == 4 * K + 1  # the step check's too
