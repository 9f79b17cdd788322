"""Learning-rate schedules: torch's schedulers are refused with the fix; LABPAL's own
lr_multiplier_schedule scales the measured rate, and param_groups' lr is the rate used."""
import json
import re

import pytest
import torch

from labpal_fast import LABPAL

from helpers import Quadratic, labpal_entry

pytestmark = pytest.mark.usefixtures("backend")

# a measurement every 5 updates, each over 2 calls (no micro-batching); every direction taken
SETTINGS = dict(approximation_batches=2, reuse_updates=5, warmup_updates=0, noise_factor=1.0,
                averaging_window=1,
                direction_norm_range=(0.0, float("inf")))
SCHEDULE = ((0, 1.0), (4, 0.5), (12, 0.0), (14, 2.0))


def factor(update):
    """SCHEDULE by hand: points joined by straight lines, flat after the last."""
    points = [(0, 1.0), (4, 0.5), (12, 0.0), (14, 2.0)]
    for (u0, f0), (u1, f1) in zip(points, points[1:]):
        if update < u1:
            return f0 + (f1 - f0) * (update - u0) / (u1 - u0)
    return points[-1][1]


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1),
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.9 ** epoch),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100),
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10, last_epoch=5),
], ids=["StepLR", "LambdaLR", "CosineAnnealingLR", "resuming"])
def test_torch_schedulers_are_refused_with_the_fix(make):
    q = Quadratic([7], seed=0)
    opt = LABPAL(q.parameters(), **SETTINGS)
    for _ in range(3):
        opt.step(q)
    shown = opt.param_groups[0]["lr"]
    with pytest.raises(RuntimeError, match=r"cannot be set.*lr_multiplier_schedule"):
        make(opt)
    # nothing was changed, and training goes on
    assert opt.param_groups[0]["lr"] == shown
    assert "initial_lr" not in dict(opt.param_groups[0])
    opt.step(q)


def test_assigning_lr_before_a_rate_or_not_a_positive_number_is_refused():
    q = Quadratic([7], seed=0)
    opt = LABPAL(q.parameters(), **SETTINGS)
    with pytest.raises(RuntimeError, match=re.escape("before LABPAL has measured a rate")):
        opt.param_groups[0]["lr"] = 0.1
    with pytest.raises(RuntimeError, match="before LABPAL has measured a rate"):
        opt.param_groups[0].update(lr=0.1)
    while opt.param_groups[0]["lr"] == 0:
        opt.step(q)
    shown = opt.param_groups[0]["lr"]
    for bad in (0.0, -1.0, float("nan"), True, "0.1", torch.tensor(0.1)):
        with pytest.raises(ValueError, match=re.escape("param_groups[i]['lr'] = ")):
            opt.param_groups[0]["lr"] = bad
    assert opt.param_groups[0]["lr"] == shown
    opt.param_groups[0]["weight_decay"] = 1e-4  # other keys as before


@pytest.mark.parametrize("mode,rate", [("SGD", "paper"), ("SGD", "robust"), ("NSGD", "robust")])
def test_every_update_uses_the_measured_rate_times_the_factor(mode, rate):
    """Plain (S)GD on a quadratic, m = 1, no momentum: each update is checked against the
    gradient computed by autograd, the measured rate (`s_base` / `eta_base`) and the factor
    (robust SGD: s_upd = s_base·factor over n̄, the running mean of ‖d‖ kept by hand)."""
    q = Quadratic([5, 4], seed=1, offset=3.0)
    opt = LABPAL(q.parameters(), mode=mode, sgd_rate=rate, lr_multiplier_schedule=SCHEDULE,
                 **SETTINGS)
    checked = set()
    mean = None
    while opt.updates < 22:
        before = q.flat().detach().clone()
        grad = torch.autograd.grad(q.loss_at(before.requires_grad_()), before)[0]
        updates, phase = opt.updates, opt.phase
        opt.step(q)
        if phase != "training" or opt.updates == updates:
            continue  # a measurement: its own move is checked below
        f = factor(updates)
        step = q.flat().detach() - before
        lr = opt.lr_tensor.item()
        if mode == "SGD" and rate == "robust":
            norm = grad.norm().item()
            mean = norm if mean is None else mean + (norm - mean) / 1000
            s_upd = opt.line.s_base.item() * f
            assert lr == pytest.approx(min(s_upd / mean, 2 * s_upd / norm), rel=1e-12)
            torch.testing.assert_close(step, -lr * grad, rtol=1e-9, atol=1e-12)
        elif mode == "SGD":
            assert lr == pytest.approx(opt.line.eta_base.item() * f, rel=1e-12, abs=1e-300)
            torch.testing.assert_close(step, -lr * grad, rtol=1e-9, atol=1e-12)
        else:
            assert step.norm().item() == pytest.approx(opt.line.s_base.item() * f, rel=1e-9,
                                                        abs=1e-12)
            torch.testing.assert_close(step, -lr * grad, rtol=1e-9, atol=1e-12)
        checked.add(f)
    assert {1.0, 2.0} <= checked and len(checked) >= 6
    # each measurement's own move went to s_upd = s_base·factor at its update
    records = opt.measurements()
    assert len(records) >= 3
    for r in records:
        if not r["valid"]:
            continue
        assert r["s_upd"] == pytest.approx(r["s_new"] * factor(r["update"]), rel=1e-12)


def test_a_state_saved_mid_schedule_resumes_bit_for_bit():
    def run(opt, q, n):
        for _ in range(n):
            opt.step(q)

    q = Quadratic([6], seed=2, offset=2.0)
    opt = LABPAL(q.parameters(), mode="SGD", lr_multiplier_schedule=SCHEDULE, **SETTINGS)
    run(opt, q, 13)
    sd, theta = opt.state_dict(), q.flat().detach().clone()
    run(opt, q, 15)
    expected = q.flat().detach().clone(), opt.param_groups[0]["lr"]

    q2 = Quadratic([6], seed=2, offset=2.0)
    with torch.no_grad():
        q2.params[0].copy_(theta)
    opt2 = LABPAL(q2.parameters(), mode="SGD", lr_multiplier_schedule=SCHEDULE, **SETTINGS)
    opt2.load_state_dict(sd)
    run(opt2, q2, 15)
    assert torch.equal(q2.flat(), expected[0])
    assert opt2.param_groups[0]["lr"] == expected[1]


@pytest.mark.parametrize("schedule, message", [
    (((0, 1.0), (0, 0.5)), "updates must increase strictly"),
    (((5, 1.0), (3, 0.5)), "updates must increase strictly"),
    (((0, -0.1),), r"lr_multiplier_schedule multiplier must be a number in \[0.0, 1000.0\]"),
    (((0, 1001),), r"lr_multiplier_schedule multiplier must be a number in \[0.0, 1000.0\]"),
    (((0.5, 1.0),), "lr_multiplier_schedule update must be a whole number"),
    ((), "must be 1 to 1000"),
    ((1.0,), "lr_multiplier_schedule entry must be a sequence"),
])
def test_bad_schedules_are_refused_by_name(schedule, message):
    q = Quadratic([3], seed=0)
    with pytest.raises(ValueError, match=message):
        LABPAL(q.parameters(), lr_multiplier_schedule=schedule)


# ---------------------------------------------------------------------------- ReduceLROnPlateau
def _plateau_run(with_scheduler, schedule=((0, 1.0),), calls=30):
    """NSGD on a quadratic; with a real ReduceLROnPlateau that halves the rate after call 10
    (a worse metric than at call 9). Returns parameters after each call, the shown lrs, the
    optimizer and the update count when the reduction was made."""
    q = Quadratic([6, 3], seed=4, offset=2.0)
    opt = LABPAL(q.parameters(), lr_multiplier_schedule=schedule, **SETTINGS)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0,
                                                       threshold=0.0)
    thetas, lrs, reduced_at = [], [], None
    for i in range(calls):
        before = q.flat().detach().clone()
        phase = opt.phase
        opt.step(q)
        step = (q.flat().detach() - before).norm().item()
        if phase == "training" and opt.phase == "training" and step > 0:
            # the shown lr is the lr used: NSGD (no momentum, no decay) moves θ by s_upd
            assert step == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        if with_scheduler and i in (9, 10):
            sched.step(1.0 if i == 9 else 2.0)
            reduced_at = opt.updates
        thetas.append(q.flat().detach().clone())
        lrs.append(opt.param_groups[0]["lr"])
    return thetas, lrs, opt, reduced_at


def test_reduce_lr_on_plateau_scales_the_measured_rate_as_a_schedule_would():
    thetas, lrs, opt, u = _plateau_run(True)
    plain, plain_lrs, _, _ = _plateau_run(False)
    # by hand: the same factor 0.5 from update u on, through lr_multiplier_schedule
    oracle, oracle_lrs, _, _ = _plateau_run(False, schedule=((0, 1.0), (u - 1, 1.0), (u, 0.5)))
    assert u >= 2 and lrs[10] == pytest.approx(lrs[9] / 2, rel=1e-15)
    assert all(torch.equal(a, b) for a, b in zip(thetas[:11], plain[:11]))
    assert not torch.equal(thetas[-1], plain[-1])  # the reduction changed the training
    assert all(torch.equal(a, b) for a, b in zip(thetas, oracle))
    assert lrs[11:] == oracle_lrs[11:]
    # a history of lr: Python floats, which json takes and which are not one object
    assert json.loads(json.dumps(lrs)) == lrs and len(set(lrs)) >= 4
    assert labpal_entry(opt.state_dict())["lr_factor"] == 0.5


def test_reduce_lr_on_plateau_factor_is_saved_and_resumed():
    q = Quadratic([6, 3], seed=4, offset=2.0)
    opt = LABPAL(q.parameters(), **SETTINGS)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.25, patience=0)
    for i in range(12):
        opt.step(q)
        if i in (6, 7):
            sched.step(1.0 if i == 6 else 2.0)
    sd, theta = opt.state_dict(), q.flat().detach().clone()
    for _ in range(15):
        opt.step(q)
    q2 = Quadratic([6, 3], seed=4, offset=2.0)
    with torch.no_grad():
        q2.params[0].copy_(theta[:6].view(6))
        q2.params[1].copy_(theta[6:].view(3))
    opt2 = LABPAL(q2.parameters(), **SETTINGS)
    opt2.load_state_dict(sd)
    assert opt2.rate.factor == 0.25 and opt2.param_groups[0]["lr"] > 0
    for _ in range(15):
        opt2.step(q2)
    assert torch.equal(q2.flat(), q.flat()) and opt2.param_groups[0]["lr"] == \
        opt.param_groups[0]["lr"]


def test_groups_scaled_unalike_are_refused_at_the_next_step():
    q = Quadratic([6, 3], seed=4, offset=2.0)
    opt = LABPAL([{"params": [q.params[0]]}, {"params": [q.params[1]]}], **SETTINGS)
    while opt.param_groups[0]["lr"] == 0:
        opt.step(q)
    opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"] / 2
    theta = q.flat().detach().clone()
    with pytest.raises(RuntimeError, match="scale it alike in every group"):
        opt.step(q)
    assert torch.equal(q.flat(), theta)
    opt.param_groups[1]["lr"] = opt.param_groups[0]["lr"]
    opt.step(q)
    assert opt.rate.factor == 0.5
