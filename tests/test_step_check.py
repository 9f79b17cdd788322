"""The step check and the momentum correction (docs/algorithm.md "The step check"), on exact
quadratics, against steps derived by hand from the closed-form line."""
import numpy as np
import pytest
import torch

from labpal_fast import LABPAL
from labpal_fast.line import CHECK_DECREASE, CHECK_SHRINK

from helpers import Quadratic

pytestmark = pytest.mark.usefixtures("backend")

# (seed, curvature, offset): exact line minima s* on both sides of max_step_size (0.5) and of
# 0.9 (where 3.6·min(s*, 0.5) = 1.8 reaches 2·s*: beyond it the proposed step passes)
CASES = [(0, 1.0, 0.05), (1, 3.0, 0.1), (5, 1.0, 0.2), (3, 0.5, 1.0), (2, 2.0, 0.02)]


def _line(quad):
    """θ₀, u = d/‖d‖ (d = ∇L), s* = the exact line minimum, and ℓ(s) = L(θ₀ − s·u)."""
    theta = quad.flat().detach().clone()
    grad = quad.H @ (theta - quad.target)
    u = grad / grad.norm()
    s_star = float(grad @ u / (u @ (quad.H @ u)))
    return theta, u, s_star, lambda s: float(quad.loss_at(theta - s * u))


def _checked_step(s_star, ell, positions):
    """The step check by hand: s_c = 3.6·min(s*, 0.5); taken if ℓ(s_c) is below ℓ at every
    measured position (0, 1.77e-4·f, 0.01·f, f = resolve_positions' factor) and at least
    CHECK_DECREASE of the fit's decrease at min(s*, 0.5) (the fit is the exact line here) below
    ℓ(0), else the minimum
    of the parabola through ℓ(0) with slope ℓ'(0) = −s*·κ and ℓ(s_c) (on a quadratic: s*
    itself), at most s_c/2 and at least CHECK_SHRINK[0]·s_c."""
    s_c = 3.6 * min(s_star, 0.5)
    promised = ell(0.0) - ell(min(s_star, 0.5))
    if ell(s_c) < min(ell(s) for s in positions) and \
            ell(0.0) - ell(s_c) >= CHECK_DECREASE * promised:
        return s_c, s_c, 1.0
    r = min(max(s_star / s_c, CHECK_SHRINK[0]), CHECK_SHRINK[1])
    return s_c, r * s_c, r


def test_cases_cover_every_branch():
    stars = [_line(Quadratic([7, 13], seed=s, curvature=c, offset=o))[2] for s, c, o in CASES]
    assert min(stars) < 0.5 and any(0.5 < s < 0.9 for s in stars) and max(stars) > 0.9


@pytest.mark.parametrize("mode", ["NSGD", "SGD"])
@pytest.mark.parametrize("seed,curvature,offset", CASES)
def test_first_update_is_the_checked_step(seed, curvature, offset, mode):
    quad = Quadratic([7, 13], seed=seed, curvature=curvature, offset=offset)
    theta, u, s_star, ell = _line(quad)
    opt = LABPAL(quad.parameters(), mode=mode, approximation_batches=3)
    for _ in range(3):
        opt.step(quad)
    assert opt.updates == 1
    rec = opt.measurements()[0]
    s_c, step, r = _checked_step(s_star, ell, rec["positions"])
    np.testing.assert_allclose(quad.flat().detach().numpy(), (theta - step * u).numpy(),
                               rtol=1e-7, atol=1e-9)
    assert rec["s_check"] == pytest.approx(s_c, rel=1e-7)
    assert rec["loss_check"] == pytest.approx(ell(s_c), rel=1e-7)
    assert rec["check_factor"] == pytest.approx(r, rel=1e-6)
    assert rec["s_upd"] == pytest.approx(step, rel=1e-6)


@pytest.mark.parametrize("check", [False, True])
@pytest.mark.parametrize("seed,curvature,offset", CASES[:3])
def test_momentum_scales_the_step_by_one_minus_beta(seed, curvature, offset, check):
    # the first direction is the gradient itself (d starts at 0): the step along it is the
    # measured one × (1 − β)
    quad = Quadratic([7, 13], seed=seed, curvature=curvature, offset=offset)
    theta, u, s_star, ell = _line(quad)
    opt = LABPAL(quad.parameters(), momentum=0.75, approximation_batches=2, step_check=check)
    opt.step(quad)
    opt.step(quad)
    positions = opt.measurements()[0]["positions"]
    step = _checked_step(s_star, ell, positions)[1] if check else 3.6 * min(s_star, 0.5)
    np.testing.assert_allclose(quad.flat().detach().numpy(), (theta - 0.25 * step * u).numpy(),
                               rtol=1e-7, atol=1e-9)
    # off, the measured step is taken as the paper takes it
    quad2 = Quadratic([7, 13], seed=seed, curvature=curvature, offset=offset)
    opt2 = LABPAL(quad2.parameters(), momentum=0.75, approximation_batches=2, step_check=check,
                  momentum_correction=False)
    opt2.step(quad2)
    opt2.step(quad2)
    np.testing.assert_allclose(quad2.flat().detach().numpy(), (theta - step * u).numpy(),
                               rtol=1e-7, atol=1e-9)


def test_a_check_that_is_not_finite_takes_the_smallest_factor():
    quad = Quadratic([7, 13], seed=1, curvature=3.0, offset=0.1)
    theta, u, s_star, ell = _line(quad)
    s_c = 3.6 * min(s_star, 0.5)

    def closure():  # the loss is infinite beyond half the proposed step
        far = (quad.flat() - theta).norm() > 0.5 * s_c
        return torch.where(far, torch.tensor(float("inf"), dtype=torch.float64), quad())
    opt = LABPAL(quad.parameters(), approximation_batches=1)
    opt.step(closure)
    rec = opt.measurements()[0]
    assert rec["check_factor"] == CHECK_SHRINK[0]
    assert rec["s_upd"] == pytest.approx(CHECK_SHRINK[0] * s_c, rel=1e-7)


@pytest.mark.parametrize("mode", ["NSGD", "SGD"])
def test_paper_variant_is_unchanged(mode):
    """line_fit="paper" turns both off: the same bits as with both off explicitly, no check."""
    runs = []
    for extra in ({}, {"step_check": False, "momentum_correction": False}):
        quad = Quadratic([7, 13], seed=3, curvature=0.5, offset=1.0)
        opt = LABPAL(quad.parameters(), mode=mode, momentum=0.9, approximation_batches=2,
                     reuse_updates=3, line_fit="paper", sgd_rate="paper", **extra)
        for _ in range(12):
            opt.step(quad)
        runs.append((quad.flat().detach().clone(), opt.measurements()))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(np.isnan(r["check_factor"]) for r in runs[0][1])


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("limit", [1.0, 2.0])
@pytest.mark.parametrize("seed,curvature,offset", [(3, 0.5, 1.0), (5, 1.0, 0.2)])
def test_max_step_shrink_limits_how_far_a_measurement_shrinks_the_step(seed, curvature, offset,
                                                                        limit, check):
    """With momentum β = 0.9 the step of a measurement is (1 − β)·s_prop, s_prop = α·r·min(s_min,
    0.5) the step without the correction (r = 1 without the step check, as under
    torch.distributed); after the warm-up, with max_step_shrink = L, it is at least
    min(s_prop, s_in_use/L), s_in_use the step the previous measurement left in use."""
    quad = Quadratic([7, 13], seed=seed, curvature=curvature, offset=offset)
    opt = LABPAL(quad.parameters(), momentum=0.9, approximation_batches=2, warmup_updates=2,
                 reuse_updates=3, max_step_shrink=limit, step_check=check)
    for _ in range(60):
        opt.step(quad)
    in_use, binds = 0.0, set()
    for rec in opt.measurements():
        if not rec["valid"]:
            continue
        s_prop = 3.6 * (rec["check_factor"] if check else 1.0) * min(rec["s_min"], 0.5)
        want = 0.1 * s_prop
        if rec["averaged"] and min(s_prop, in_use / limit) > want:
            binds.add("limit" if in_use / limit < s_prop else "s_prop")
            want = min(s_prop, in_use / limit)
        assert rec["s_new"] == pytest.approx(want, rel=1e-9)
        in_use = rec["s_upd"]
    # the floor binds; with the check (steps of about s_min) also on its other side, the step
    # without the correction
    assert "limit" in binds and (not check or "s_prop" in binds)


def test_max_step_shrink_needs_the_momentum_correction():
    quad = Quadratic([3], seed=0)
    for extra in ({}, {"momentum": 0.9, "momentum_correction": False},
                  {"momentum": 0.9, "line_fit": "paper"}):
        with pytest.raises(ValueError, match="max_step_shrink .*momentum_correction"):
            LABPAL(quad.parameters(), max_step_shrink=2.0, **extra)
    for bad in (0.5, float("nan"), "2"):
        with pytest.raises(ValueError, match="max_step_shrink"):
            LABPAL(quad.parameters(), momentum=0.9, max_step_shrink=bad)


@pytest.mark.parametrize("name", ["step_check", "momentum_correction"])
def test_switches_are_validated(name):
    quad = Quadratic([3], seed=0)
    with pytest.raises(ValueError, match=name):
        LABPAL(quad.parameters(), **{name: "yes"})
