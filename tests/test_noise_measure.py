"""m from the measured gradient noise (docs/algorithm.md "m from the measured noise"): the first
measurement's noise ratio against one computed by hand from per-batch gradients, on linear
least squares (every batch's loss an exact parabola along any line, so the fit's slope is the
exact one), and the m it gives."""
import math

import pytest
import torch

from labpal_fast import LABPAL
from labpal_fast.hyper import MAX_MEASURED_RATIO, NOISE_PER_UPDATE, Hyper

from helpers import labpal_entry

pytestmark = pytest.mark.usefixtures("backend")

K = 6  # approximation_batches


def _problem(seed: int, label_noise: float, same_batch: bool = False):
    """A linear model and K + 60 batches of 4 (x, y = x·w* + noise); `same_batch`: every
    closure sees the same batch (no gradient noise at all)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 1, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(5, 1).double()
    with torch.no_grad():
        # near w*: a small signal beside the labels' noise
        model.weight.copy_(w.T + 0.2 * torch.randn(1, 5, generator=g, dtype=torch.float64))
        model.bias.zero_()
    data = []
    for _ in range(K + 60):
        x = torch.randn(4, 5, generator=g, dtype=torch.float64)
        data.append((x, x @ w + label_noise * torch.randn(4, 1, generator=g, dtype=torch.float64)))
    if same_batch:
        data = [data[0]] * len(data)
    return model, data


def _closure(model, x, y):
    return lambda: torch.nn.functional.mse_loss(model(x), y)


def _ratio_by_hand(model, data):
    """ρ of the first measurement from the per-batch gradients at θ₀: d = the first batch's
    gradient (m = 1), r = (mean over the other K − 1 batches of ⟨g_i, d⟩) / ⟨g_1, d⟩,
    ρ = (1 − r)/r."""
    grads = []
    for x, y in data[:K]:
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    model.zero_grad(set_to_none=True)
    d = grads[0]
    r = float(torch.stack([g @ d for g in grads[1:]]).mean() / (d @ d))
    return (1 - r) / r


def _train(opt, model, data, calls):
    for x, y in data[:calls]:
        opt.step(_closure(model, x, y))


def _m_by_hand(ratio: float, momentum: float = 0.0) -> int:
    """m = ⌊min(ρ, 12)·(1 − β)/(1 + β)/3⌋, at least 1 (docs/algorithm.md)."""
    return max(int(math.floor(min(ratio, 12.0) * (1 - momentum) / (1 + momentum) / 3.0)), 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_ratio_is_the_hand_computed_one_and_sets_m(seed):
    model, data = _problem(seed, label_noise=1.0)
    expected = _ratio_by_hand(model, data)
    assert expected > 2 * NOISE_PER_UPDATE   # noisy enough that m changes
    opt = LABPAL(model.parameters(), approximation_batches=K)
    _train(opt, model, data, K + 1)          # the first measurement, then the next call
    first = opt.measurements()[0]
    assert first["m"] == 1 and first["valid"]
    assert first["noise_ratio"] == pytest.approx(expected, rel=1e-6)
    m = _m_by_hand(expected)
    assert opt.multiplier == m > 1 and opt.phase == "measuring"   # m changed: measured again
    _train(opt, model, data[K + 1:], K * m)
    second = opt.measurements()[1]
    assert second["m"] == m and math.isnan(second["noise_ratio"])  # measured once


def test_no_noise_keeps_m_1():
    model, data = _problem(2, label_noise=1.0, same_batch=True)
    opt = LABPAL(model.parameters(), approximation_batches=K)
    _train(opt, model, data, K + 5)
    assert opt.measurements()[0]["noise_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert opt.multiplier == 1 and opt.updates == 6


@pytest.mark.parametrize("hyper,m", [
    (dict(noise_factor=2.0), 2),                                            # ν given
    (dict(line_fit="paper", dataset_size=40000, batch_size=40), 3),         # the paper's ν
    (dict(line_fit="gradient", dataset_size=40000, batch_size=40), 3),
])
def test_the_paper_rule_where_noise_is_not_measured(hyper, m):
    model, data = _problem(3, label_noise=1.0)
    opt = LABPAL(model.parameters(), approximation_batches=K, **hyper)
    _train(opt, model, data, K * m + 1)
    first = opt.measurements()[0]
    assert first["m"] == m and math.isnan(first["noise_ratio"]) and opt.multiplier == m


def test_measured_noise_is_saved_and_resumed():
    model, data = _problem(1, label_noise=1.0)
    opt = LABPAL(model.parameters(), approximation_batches=K)
    _train(opt, model, data, K)              # the first measurement ends: ν measured
    state = opt.state_dict()
    assert labpal_entry(state)["counters"]["noise"] > 2
    twin_model, _ = _problem(1, label_noise=1.0)
    twin_model.load_state_dict(model.state_dict())
    twin = LABPAL(twin_model.parameters(), approximation_batches=K)
    twin.load_state_dict(state)
    m = max(int(labpal_entry(state)["counters"]["noise"]), 1)
    _train(opt, model, data[K:], K * m)      # the second measurement, at the measured m
    _train(twin, twin_model, data[K:], K * m)
    assert opt.multiplier == twin.multiplier == m > 1 and len(twin.measurements()) == 2
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # a checkpoint from before the measured noise has no 'noise': it loads, and the next
    # measurement measures it
    del labpal_entry(state)["counters"]["noise"]
    fresh = LABPAL(_problem(1, 1.0)[0].parameters(), approximation_batches=K)
    fresh.load_state_dict(state)
    assert fresh.counters.noise is None


@pytest.mark.parametrize("ratio,momentum,m", [
    (7.0, 0.0, 2), (11.9, 0.0, 3), (12.5, 0.0, 4), (40.0, 0.0, 4), (float("nan"), 0.0, 4),
    (40.0, 0.5, 1), (40.0, 0.2, 2), (12.0, 0.9, 1), (float("nan"), 0.9, 1)])
def test_m_from_the_ratio_is_bounded_and_counts_momentums_averaging(ratio, momentum, m):
    """ρ beyond MAX_MEASURED_RATIO, or no signal (NaN), counts as the bound; a momentum
    direction keeps (1 − β)/(1 + β) of the ratio: the schedule's m at call 0."""
    assert MAX_MEASURED_RATIO == 12.0
    hyper = Hyper(momentum=momentum)
    nu = hyper.measured_noise(ratio)
    assert hyper.multiplier_at(0, measured=nu, measures=True) == m == _m_by_hand(
        MAX_MEASURED_RATIO if math.isnan(ratio) else ratio, momentum)


def test_with_momentum_the_measured_ratio_gives_its_share():
    """With momentum β the first measurement (d = the first batches' gradient) measures the
    same ρ as without, and m counts only (1 − β)/(1 + β) of it."""
    model, data = _problem(1, label_noise=1.0)
    expected = _ratio_by_hand(model, data)   # 9.5: m = 3 without momentum, 2 with β = 0.2
    momentum = 0.2
    assert 1 < _m_by_hand(expected, momentum) < _m_by_hand(expected)
    opt = LABPAL(model.parameters(), approximation_batches=K, momentum=momentum)
    _train(opt, model, data, K + 1)
    assert opt.measurements()[0]["noise_ratio"] == pytest.approx(expected, rel=1e-6)
    assert opt.multiplier == _m_by_hand(expected, momentum)


def test_after_the_warm_up_each_measurement_measures_again_and_m_only_grows():
    """The first measurement sets m (ρ = 9.5: m = 3); each one after the warm-up reads ρ again
    (its record shows it) and m becomes the larger of the two; warm-up measurements read
    nothing, and a later low reading does not lower m."""
    model, data = _problem(1, label_noise=1.0)
    data = data * 12                          # enough batches for the warm-up and many lines
    opt = LABPAL(model.parameters(), approximation_batches=K, warmup_updates=3, reuse_updates=4)
    m_seen = []
    for x, y in data:
        opt.step(_closure(model, x, y))
        m_seen.append(opt.multiplier)
    records = opt.measurements()
    first, warm, after = records[0], [r for r in records[1:] if not r["averaged"]], \
        [r for r in records if r["averaged"]]
    assert _m_by_hand(first["noise_ratio"]) == 3 and warm
    assert all(math.isnan(r["noise_ratio"]) for r in warm)
    read = [r["noise_ratio"] for r in after if math.isfinite(r["noise_ratio"])]
    assert len(read) >= 5 and max(read) > MAX_MEASURED_RATIO and min(read) < 2 * NOISE_PER_UPDATE
    expected = max([3] + [_m_by_hand(x) for x in read])
    assert opt.multiplier == expected == 4 and m_seen == sorted(m_seen)   # never shrinks
    assert [r["m"] for r in after][-1] == 4


def test_measured_noise_never_falls_below_the_last():
    hyper = Hyper()
    assert hyper.measured_noise(3.0, before=2.5) == 2.5 and hyper.measured_noise(9.0, 2.5) == 3.0
    assert hyper.measured_noise(float("nan"), 1.0) == MAX_MEASURED_RATIO / NOISE_PER_UPDATE
