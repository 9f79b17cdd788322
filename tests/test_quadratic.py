"""The first update on an exact quadratic must be 3.6·min(s*, 0.5) along −d/‖d‖ (docs/algorithm.md)."""
import numpy as np
import pytest
import torch

from labpal_fast import LABPAL
from labpal_fast.line import Line
from labpal_fast.hyper import Hyper

from helpers import Quadratic

pytestmark = pytest.mark.usefixtures("backend")


def _exact_first_update(quad, decays):
    """θ₁ from the closed form: s* = ∇F·u / uᵀ(H+W)u with F = L + Σ wd/2 ‖θ‖²."""
    theta = quad.flat().detach().clone()
    w = torch.cat([torch.full((p.numel(),), wd, dtype=torch.float64)
                   for p, wd in zip(quad.params, decays)])
    grad = quad.H @ (theta - quad.target) + w * theta
    u = grad / grad.norm()
    s_star = float(grad @ u / (u @ (quad.H @ u) + u @ (w * u)))
    return theta - 3.6 * min(s_star, 0.5) * u, s_star


CASES = [(0, 1.0, 0.05, "NSGD"), (1, 3.0, 0.1, "SGD"), (2, 2.0, 0.02, "NSGD"),
         (3, 0.5, 1.0, "NSGD"), (4, 0.5, 1.0, "SGD")]


@pytest.mark.parametrize("line_fit", ["paper", "robust"])
@pytest.mark.parametrize("seed,curvature,offset,mode", CASES)
def test_first_update_is_3_6_times_the_clamped_line_minimum(seed, curvature, offset, mode,
                                                              line_fit):
    # the reference's calibration; the robust fit (scaled positions) finds the same exact line
    # (the step check, which then shrinks the step, is tested in test_step_check.py)
    quad = Quadratic([7, 13], seed=seed, curvature=curvature, offset=offset)
    expected, s_star = _exact_first_update(quad, [0.0, 0.0])
    opt = LABPAL(quad.parameters(), mode=mode, approximation_batches=3, line_fit=line_fit,
                 step_check=False)
    for _ in range(3):
        opt.step(quad)
    assert opt.updates == 1
    np.testing.assert_allclose(quad.flat().detach().numpy(), expected.numpy(), rtol=1e-7, atol=1e-9)
    rec = opt.measurements()[0]
    assert rec["valid"] and rec["reason"] is None
    assert rec["s_min"] == pytest.approx(s_star, rel=1e-6)
    assert rec["s_upd"] == pytest.approx(3.6 * min(s_star, 0.5), rel=1e-7)
    assert rec["eta"] == pytest.approx(3.6 * min(s_star, 0.5) / rec["direction_norm"], rel=1e-7)


def test_clamp_cases_are_both_exercised():
    """The parametrisation above covers s* below and above max_step_size."""
    stars = [_exact_first_update(Quadratic([7, 13], seed=s, curvature=c, offset=o), [0, 0])[1]
             for s, c, o, _ in CASES]
    assert min(stars) < 0.5 < max(stars)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_weight_decay_line_term_is_exact_across_groups(seed):
    quad = Quadratic([5, 9, 4], seed=seed, curvature=0.7)
    decays = [0.3, 0.0, 1.7]
    expected, _ = _exact_first_update(quad, decays)
    groups = [{"params": [p], "weight_decay": wd} for p, wd in zip(quad.params, decays)]
    opt = LABPAL(groups, approximation_batches=2)
    opt.step(quad)
    opt.step(quad)
    np.testing.assert_allclose(quad.flat().detach().numpy(), expected.numpy(), rtol=1e-7, atol=1e-9)


def test_weight_decay_parabola_matches_the_numerically_measured_line():
    """a, b, c of the record (loss fit + decay term) against the line of L + Σ wd/2‖θ‖² measured
    at many points and fitted by numpy."""
    quad = Quadratic([6, 6], seed=11, curvature=0.4)
    decays = [0.5, 2.0]
    theta0 = quad.flat().detach().clone()
    groups = [{"params": [p], "weight_decay": wd} for p, wd in zip(quad.params, decays)]
    opt = LABPAL(groups, approximation_batches=1)
    w = torch.cat([torch.full((p.numel(),), wd, dtype=torch.float64)
                   for p, wd in zip(quad.params, decays)])
    d = quad.H @ (theta0 - quad.target) + w * theta0
    opt.step(quad)
    rec = opt.measurements()[0]
    s = np.linspace(0, 0.3, 31)
    u = d / d.norm()
    line = [float(quad.loss_at(theta0 - si * u) + 0.5 * (w * (theta0 - si * u) ** 2).sum()) for si in s]
    a, b, c = np.polyfit(s, line, 2)
    assert rec["a"] == pytest.approx(a, rel=1e-6)
    assert rec["b"] == pytest.approx(b, rel=1e-6)
    assert rec["c"] == pytest.approx(c, rel=1e-9)


@pytest.mark.parametrize("line_fit", ["paper", "robust"])
def test_fit_matches_numpy_polyfit_on_random_samples(line_fit):
    rng = np.random.default_rng(1234)
    for trial in range(20):
        positions = tuple(sorted({0.0, *rng.uniform(1e-4, 0.05, size=rng.integers(2, 6)).round(6)}))
        hyper = Hyper(sample_positions=positions, line_fit=line_fit)
        line = Line(hyper, torch.device("cpu"))
        xs, ys = [], []
        for j, s in enumerate(hyper.line_positions):
            for _ in range(int(rng.integers(1, 6))):
                y = 2.0 - 3.0 * s + 40.0 * s * s + rng.normal(scale=0.01)
                if rng.random() < 0.15:
                    line.record(j, torch.tensor(float("nan")))  # skipped, not fitted
                line.record(j, torch.tensor(y, dtype=torch.float32))
                xs.append(s)
                ys.append(float(np.float32(y)))
        line.set_partials(torch.tensor([4.0, 4.0, 0.0, 0.0, 0.0], dtype=torch.float64))
        rec = line.fit(averaged=False)
        a, b, c = np.polyfit(xs, ys, 2)
        np.testing.assert_allclose([float(rec["a"]), float(rec["b"]), float(rec["c"])], [a, b, c],
                                   rtol=1e-6, atol=1e-8, err_msg=f"trial {trial}")
        if line_fit == "paper":
            assert bool(rec["valid"]) == (a > 0 and b < 0)
        else:  # refused only when not descending; no curvature seen: max_step_size
            assert bool(rec["valid"]) == (b < 0)
            if b < 0:
                s_min = -b / (2 * a) if a > 0 else hyper.max_step_size
                assert float(rec["s_min"]) == pytest.approx(s_min, rel=1e-6)
