"""SGD mode's learning rate: sgd_rate="robust" (the default) against hand-derived values, and
against the paper's rule where that one diverges (docs/algorithm.md, "SGD mode")."""
import math

import pytest
import torch

from labpal_fast import LABPAL, ops
from labpal_fast.hyper import Hyper
from labpal_fast.layout import Partial
from labpal_fast.line import NORM_MEAN_UPDATES, STEP_CAP

from helpers import Quadratic

pytestmark = pytest.mark.usefixtures("backend")


def test_the_rule_by_hand(backend):
    """‖d‖ = 2, 4, 1, NaN, 8 with s_upd = 0.3, worked out on paper:
    n̄ = 2                                  η = min(0.3/2, 0.6/2)           = 0.15
    n̄ = 2 + (4 − 2)/1000      = 2.002       η = min(0.3/2.002, 0.6/4)       = 0.3/2.002
    n̄ = 2.002 + (1 − 2.002)/1000 = 2.000998 η = min(0.3/2.000998, 0.6/1)   = 0.3/2.000998
    NaN: skipped, n̄ kept, coefficient 0, lr kept
    n̄ = 2.000998 + (8 − 2.000998)/1000 = 2.006997002   η = min(.., 0.6/8) = 0.075 (the cap)"""
    assert (NORM_MEAN_UPDATES, STEP_CAP) == (1000, 2.0)  # the numbers the hand values use
    line = ops.load(backend).make_line(Hyper(mode="SGD"), torch.device("cpu"))
    line.s_upd.fill_(0.3)
    expected = [(2.0, 2.0, 0.15), (4.0, 2.002, 0.3 / 2.002), (1.0, 2.000998, 0.3 / 2.000998),
                (math.nan, 2.000998, None), (8.0, 2.006997002, 0.075)]
    lr = None
    for norm, mean, eta in expected:
        partials = torch.zeros_like(line.partials)
        partials[Partial.DD] = norm * norm
        line.set_partials(partials)
        coef, ok = line.train_coef()
        assert float(line.norm_mean) == pytest.approx(mean, rel=1e-14)
        if eta is None:
            assert not bool(ok) and float(coef) == 0.0 and float(line.lr) == lr
        else:
            assert bool(ok)
            assert float(coef) == pytest.approx(-eta, rel=1e-14)
            assert float(line.lr) == pytest.approx(eta, rel=1e-14)  # lr: the rate used
            lr = float(line.lr)
    assert int(line.skipped_updates) == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_defaults_do_not_diverge_where_the_paper_rule_does(backend, seed):
    """A quadratic near its minimum, every hyper-parameter at its default: the paper's η =
    3.6·s*/‖d‖ is 3.6 over the curvature along d, beyond the 2/curvature that gradient descent
    stands, so every update makes the gradient larger than the one η was measured with and the
    loss overflows. The robust rule bounds each step by 2·s_upd: the loss stays bounded.
    (The step check is off: it shrinks the step to s* here, and then neither rule diverges;
    tests/test_step_check.py.)"""
    runs = {}
    for rate in ("paper", "robust"):
        q = Quadratic([30], seed=seed, offset=0.05)
        opt = LABPAL(q.parameters(), mode="SGD", sgd_rate=rate, backend=backend, step_check=False)
        with torch.no_grad():
            start = float(q())
        losses = [float(opt.step(q)) for _ in range(300)]
        assert opt.measurements()[0]["valid"] and opt.updates > 250
        runs[rate] = start, losses
    start, losses = runs["paper"]
    assert not max(losses) < 1e6 * start  # overflow or NaN
    start, losses = runs["robust"]
    assert all(math.isfinite(x) for x in losses) and max(losses) < 3 * start, max(losses)
