"""Every hyper-parameter's bounds, at the edge and just beyond; numpy scalars become Python numbers.

Validation is backend-independent (labpal_fast/hyper.py), so the eager backend suffices.
"""
import math

import numpy as np
import pytest
import torch

from labpal_fast import LABPAL
from labpal_fast.hyper import NAMES

from helpers import batches, closure_for, small_net

TINY = 5e-324  # the smallest positive float: "just beyond" an open bound at 0


def up(x):
    return math.nextafter(x, math.inf)


def down(x):
    return math.nextafter(x, -math.inf)


def make(**hyper):
    return LABPAL(small_net(0).parameters(), backend="eager", **hyper)


NU1 = dict(noise_factor=1.0)  # ν = 1: m is the schedule's multiplier itself
POS = (0.0, 0.5, 1.0)

# (name, accepted at the edge, refused just beyond, other arguments for both)
EDGES = [
    ("momentum", 0.0, down(0.0), {}),
    ("momentum", down(1.0), 1.0, {}),
    ("dataset_size", 1, 0, {}),
    ("dataset_size", 10**12, 10**12 + 1, NU1),
    ("batch_size", 1, 0, NU1),
    ("batch_size", 10**12, 10**12 + 1, {}),
    ("noise_factor", TINY, 0.0, {}),
    ("noise_factor", 1e12, up(1e12), dict(batch_size_schedule=((0, 1e-12),))),
    ("approximation_batches", 1, 0, {}),
    ("approximation_batches", 10_000, 10_001, {}),
    ("reuse_updates", 0, -1, {}),
    ("reuse_updates", 10**12, 10**12 + 1, {}),
    ("warmup_updates", 0, -1, {}),
    ("warmup_updates", 10**12, 10**12 + 1, {}),
    ("averaging_window", 1, 0, {}),
    ("averaging_window", 10_000, 10_001, {}),
    ("update_step_adaptation", TINY, 0.0, {}),
    ("update_step_adaptation", 100.0, up(100.0), {}),
    ("max_step_size", TINY, 0.0, {}),
    ("max_step_size", 100.0, up(100.0), {}),
    ("epsilon", TINY, 0.0, {}),
    ("epsilon", 1e-2, up(1e-2), {}),
    # the schedule: calls, multipliers, the m they give (ν = 1), its length
    ("batch_size_schedule", ((0, 1),), ((-1, 1),), NU1),
    ("batch_size_schedule", ((0, 1), (10**12, 1)), ((0, 1), (10**12 + 1, 1)), NU1),
    ("batch_size_schedule", ((0, TINY),), ((0, 0.0),), NU1),
    ("batch_size_schedule", ((0, 1e12),), ((0, up(1e12)),), dict(noise_factor=1e-12)),
    ("batch_size_schedule", ((0, 10_000.5),), ((0, 10_001),), NU1),
    ("batch_size_schedule", tuple((i, 1) for i in range(1000)),
     tuple((i, 1) for i in range(1001)), NU1),
    ("batch_size_schedule", ((0, 1),), (), NU1),
    # the m bound holds for a ν derived from dataset_size / batch_size too: ν = 10 000
    ("dataset_size", 40_000 * 10_000, 40_000 * 10_001, dict(batch_size_schedule=((0, 1),))),
    # positions: values in [0, 1000], 0 among them, >= 3 distinct, at most 64 in all
    ("sample_positions", (0.0, 0.5, 1e3), (0.0, 0.5, up(1e3)), {}),
    ("sample_positions", (0.0, 0.5, 1.0), (down(0.0), 0.0, 0.5, 1.0), {}),
    ("sample_positions", (0.0, 0.5, 1.0, 1.0), (0.0, 1.0, 1.0), {}),
    ("sample_positions", tuple(i / 64 for i in range(64)), tuple(i / 65 for i in range(65)), {}),
    ("sample_positions", (0.0, 0.5, 1.0), (0.25, 0.5, 1.0), {}),
    # the norm range: 0 <= low < high, low finite, high may be inf
    ("direction_norm_range", (0.0, TINY), (down(0.0), 1.0), {}),
    ("direction_norm_range", (1.0, up(1.0)), (1.0, 1.0), {}),
    ("direction_norm_range", (1e300, math.inf), (math.inf, math.inf), {}),
    ("direction_norm_range", (0.0, math.inf), (0.0, math.nan), {}),
    # clipping: any positive norm up to 1e12 (None: off)
    ("max_grad_norm", TINY, 0.0, {}),
    ("max_grad_norm", 1e12, up(1e12), {}),
    ("max_grad_norm", 1.0, -1.0, {}),
    ("max_grad_norm", 1.0, math.inf, {}),
    ("max_grad_norm", 1.0, math.nan, {}),
    # loss scaling: any positive scale up to 2**64 ("dynamic" and None are the others)
    ("loss_scale", TINY, 0.0, {}),
    ("loss_scale", 2.0 ** 64, up(2.0 ** 64), {}),
    ("loss_scale", 1.0, math.nan, {}),
    ("loss_scale", "dynamic", "Dynamic", {}),
    ("master_weights", True, 1, {}),
    ("master_weights", False, "no", {}),
]


@pytest.mark.parametrize("name,edge,beyond,other", EDGES,
                         ids=[f"{e[0]}-{i}" for i, e in enumerate(EDGES)])
def test_each_bound_is_accepted_at_the_edge_and_refused_beyond(name, edge, beyond, other):
    opt = make(**other, **{name: edge})
    assert getattr(opt.hyper, name) == edge
    with pytest.raises(ValueError, match=name) as error:
        make(**other, **{name: beyond})
    assert "must" in str(error.value)  # says what is expected, not just what is wrong


def test_the_issues_examples_are_refused_before_anything_is_allocated():
    for name, value, bound in (("dataset_size", math.inf, r"\[1, 1000000000000\]"),
                               ("update_step_adaptation", 1e308, r"\(0.0, 100.0\]"),
                               ("averaging_window", 10**12, r"\[1, 10000\]")):
        with pytest.raises(ValueError, match=rf"{name} must be .* in {bound}, got"):
            make(**{name: value})


@pytest.mark.parametrize("value", [False, np.bool_(False), np.array(0.5), torch.tensor(0.5), "0.5",
                                   None, [0.5]])
def test_what_is_not_a_number_is_refused(value):
    with pytest.raises(ValueError, match="momentum must be a number"):
        make(momentum=value)


def test_bool_is_not_a_count():
    for name in ("averaging_window", "approximation_batches", "reuse_updates"):
        with pytest.raises(ValueError, match=f"{name} must be a whole number"):
            make(**{name: True})


def test_whole_numbers_may_be_floats_but_not_fractions():
    assert make(dataset_size=np.float64(1000.0)).hyper.dataset_size == 1000
    with pytest.raises(ValueError, match="dataset_size must be a whole number"):
        make(dataset_size=np.float64(1000.5))
    with pytest.raises(ValueError, match="averaging_window must be a whole number"):
        make(averaging_window=2.5)


NUMPY = dict(mode=np.str_("SGD"), momentum=np.float32(0.5), dataset_size=np.int64(1000),
             batch_size=np.float64(64.0), batch_size_schedule=np.array([[0, 1], [6, 2]]),
             approximation_batches=np.int32(2), reuse_updates=np.uint16(4),
             warmup_updates=np.int8(3), averaging_window=np.int64(2),
             sample_positions=np.array([0.0, 0.25, 0.5], dtype=np.float32),
             update_step_adaptation=np.float16(2.0), max_step_size=np.float32(0.25),
             direction_norm_range=(np.float64(0.0), np.float32(np.inf)),
             epsilon=np.float64(2.0 ** -20), replay_tolerance=np.float32(0.25),
             lr_multiplier_schedule=np.array([[0, 1.0], [5, 0.5]]), max_grad_norm=np.float32(0.75),
             line_fit=np.str_("paper"), resolve_positions=np.bool_(True),
             sgd_rate=np.str_("paper"), loss_scale=np.float32(1024.0),
             master_weights=np.bool_(False), step_check=np.bool_(True),
             momentum_correction=np.bool_(True), max_step_shrink=np.float32(2.0))
PYTHON = dict(mode="SGD", momentum=0.5, dataset_size=1000, batch_size=64,
              batch_size_schedule=((0, 1.0), (6, 2.0)), approximation_batches=2, reuse_updates=4,
              warmup_updates=3, averaging_window=2, sample_positions=(0.0, 0.25, 0.5),
              update_step_adaptation=2.0, max_step_size=0.25, direction_norm_range=(0.0, math.inf),
              epsilon=2.0 ** -20, replay_tolerance=0.25,
              lr_multiplier_schedule=((0, 1.0), (5, 0.5)), max_grad_norm=0.75,
              line_fit="paper", resolve_positions=True, sgd_rate="paper", loss_scale=1024.0,
              master_weights=False, step_check=True, momentum_correction=True,
              max_step_shrink=2.0)


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    assert set(NUMPY) == set(PYTHON) == set(NAMES) - {"noise_factor"}  # all of them
    net_a, net_b = small_net(0), small_net(0)
    a = LABPAL(net_a.parameters(), backend="eager", noise_factor=np.float64(1.0), **NUMPY)
    b = LABPAL(net_b.parameters(), backend="eager", noise_factor=1.0, **PYTHON)
    assert a.hyper == b.hyper

    def leaves(value):
        return [x for v in value for x in leaves(v)] if isinstance(value, tuple) else [value]

    for name, value in a.hyper.as_dict().items():
        assert all(type(x) in (str, int, float, bool) for x in leaves(value)), (name, value)
        assert repr(value) == repr(getattr(b.hyper, name)), name
    # and they train alike, bit for bit
    for x, y in batches(14, 8, 6, seed=3):
        a.step(closure_for(net_a, x, y))
        b.step(closure_for(net_b, x, y))
    assert a.updates == b.updates > 0 and a.multiplier == 2
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(p, q)


def test_weight_decay_takes_numpy_numbers_and_has_bounds():
    np = pytest.importorskip("numpy")
    net = torch.nn.Linear(3, 2)
    opt = LABPAL([{"params": [net.weight], "weight_decay": np.float32(0.5)},
                  {"params": [net.bias]}], weight_decay=np.float64(1e-3))
    assert [type(g["weight_decay"]) for g in opt.param_groups] == [float, float]
    assert opt.param_groups[1]["weight_decay"] == 1e-3
    for bad in (-1e-9, 10.5, float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match=r"weight_decay must be a number in \[0.0, 10.0\]"):
            LABPAL(net.parameters(), weight_decay=bad)
    assert LABPAL(net.parameters(), weight_decay=10).param_groups[0]["weight_decay"] == 10.0


def test_max_grad_norm_is_off_by_default_and_refuses_what_is_not_a_number():
    assert make().hyper.max_grad_norm is None and make(max_grad_norm=None).hyper.max_grad_norm is None
    assert make(max_grad_norm=np.int64(2)).hyper.max_grad_norm == 2.0
    assert type(make(max_grad_norm=np.int64(2)).hyper.max_grad_norm) is float
    for bad in (True, "1.0", torch.tensor(1.0), [1.0]):
        with pytest.raises(ValueError, match=r"max_grad_norm must be a number in \(0.0, 1000000000000.0\]"):
            make(max_grad_norm=bad)
