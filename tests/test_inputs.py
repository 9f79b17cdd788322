"""Bad input gets a clear error naming the argument, before anything is changed."""
import math

import pytest
import torch

from labpal_fast import LABPAL

from helpers import batches, small_net, closure_for

pytestmark = pytest.mark.usefixtures("backend")

BAD = [
    ("mode", "Adam"), ("momentum", -0.1), ("momentum", 1.0), ("momentum", "0.9"),
    ("dataset_size", 0), ("dataset_size", 1.5), ("batch_size", -3), ("noise_factor", 0.0),
    ("noise_factor", math.nan), ("batch_size_schedule", ()), ("batch_size_schedule", ((0,),)),
    ("batch_size_schedule", ((0, 1), (0, 2))), ("batch_size_schedule", ((-1, 1),)),
    ("batch_size_schedule", ((0, 0),)), ("approximation_batches", 0), ("reuse_updates", -1),
    ("warmup_updates", -5), ("averaging_window", 0), ("sample_positions", (0.0, 0.01)),
    ("sample_positions", (1e-4, 0.01, 0.02)), ("sample_positions", (0.0, -0.01, 0.02)),
    ("sample_positions", (0.0, 0.01, 0.01)), ("sample_positions", 0.01),
    ("update_step_adaptation", 0.0), ("max_step_size", -1.0), ("max_step_size", math.inf),
    ("direction_norm_range", (1.0, 0.5)), ("direction_norm_range", (1.0,)),
    ("direction_norm_range", (-1.0, 2.0)), ("epsilon", 0.0), ("epsilon", True),
    ("sgd_rate", "Robust"), ("sgd_rate", None), ("sgd_rate", 1),
]


@pytest.mark.parametrize("name,value", BAD)
def test_invalid_hyper_parameter_names_itself(name, value):
    net = small_net(0)
    with pytest.raises(ValueError, match=name):
        LABPAL(net.parameters(), **{name: value})


def test_valid_edge_values_are_accepted():
    net = small_net(0)
    LABPAL(net.parameters(), sample_positions=(0.01, 0.0, 0.005, 0.005), reuse_updates=0,
           warmup_updates=0, direction_norm_range=(0.0, math.inf), noise_factor=0.2,
           batch_size_schedule=[[0, 1], [100, 0.5]])


def test_other_bad_arguments():
    net = small_net(0)
    with pytest.raises(TypeError, match="unknown hyper-parameter.*'lr'"):
        LABPAL(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="backend"):
        LABPAL(net.parameters(), backend="cuda")
    with pytest.raises(ValueError, match="weight_decay"):
        LABPAL(net.parameters(), weight_decay=-1.0)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['weight_decay'\]"):
        LABPAL([{"params": net[0].parameters()},
                {"params": net[2].parameters(), "weight_decay": math.nan}])
    with pytest.raises(ValueError, match=r"param_groups\[0\] sets \['momentum'\]"):
        LABPAL([{"params": net.parameters(), "momentum": 0.9}])
    with pytest.raises(ValueError, match=r"param_groups\[0\] sets \['lr'\]"):
        LABPAL([{"params": net.parameters(), "lr": 0.1}])
    with pytest.raises(TypeError, match="model"):
        LABPAL(net.parameters(), model=net.parameters())
    with pytest.raises(ValueError, match="empty"):
        LABPAL([])
    frozen = torch.nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        LABPAL(frozen.parameters())


def test_parameters_on_several_devices_in_one_group_are_rejected():
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(3, device="meta"))
    with pytest.raises(ValueError, match=r"param_groups\[0\] has parameters on several devices"):
        LABPAL([a, b])


def test_bad_closures_leave_parameters_untouched():
    net = small_net(0)
    opt = LABPAL(net.parameters(), approximation_batches=1)
    x, y = batches(1, 8, 6, seed=0)[0]
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    with pytest.raises(TypeError, match="as a tensor"):
        opt.step(lambda: float(closure_for(net, x, y)().detach()))
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(lambda: torch.nn.functional.cross_entropy(net(x), y, reduction="none"))
    with pytest.raises(RuntimeError, match="does not require grad"):
        opt.step(lambda: closure_for(net, x, y)().detach())
    for p, q in zip(before, net.parameters()):
        assert torch.equal(p, q)
    assert opt.updates == 0 and opt.measurements() == []
    opt.step(closure_for(net, x, y))  # still works
    assert opt.updates == 1


def test_frozen_parameters_are_left_untouched():
    net = small_net(0)
    net[0].weight.requires_grad_(False)
    frozen = net[0].weight.detach().clone()
    opt = LABPAL(net.parameters(), approximation_batches=1)
    for x, y in batches(4, 8, 6, seed=1):
        opt.step(closure_for(net, x, y))
    assert opt.updates == 4
    assert torch.equal(frozen, net[0].weight)
    assert net[0].weight.grad is None


def test_groups_cannot_be_added_later():
    net = small_net(0)
    opt = LABPAL(net[0].parameters())
    with pytest.raises(RuntimeError, match="cannot add parameter groups"):
        opt.add_param_group({"params": net[2].parameters()})


def test_public_names_and_defaults_are_those_of_the_specification(backend):
    from labpal_fast.hyper import Hyper
    assert Hyper().as_dict() == {
        "mode": "NSGD", "momentum": 0.0, "dataset_size": 40000, "batch_size": 128,
        "noise_factor": None, "batch_size_schedule": ((0, 1), (75000, 2), (112500, 4)),
        "approximation_batches": 10, "reuse_updates": None, "warmup_updates": 400,
        "averaging_window": 25, "sample_positions": (0.0, 1.77e-4, 0.01),
        "update_step_adaptation": 3.6, "max_step_size": 0.5, "direction_norm_range": (1e-3, 100.0),
        "epsilon": 1e-6, "replay_tolerance": 1e-3, "lr_multiplier_schedule": ((0, 1.0),),
        "max_grad_norm": None, "line_fit": "robust", "resolve_positions": None,
        "sgd_rate": "robust", "step_check": None, "momentum_correction": None,
        "max_step_shrink": None, "loss_scale": None, "master_weights": None}
    net = small_net(0)
    opt = LABPAL(net.parameters())
    assert opt.hyper == Hyper() and opt.backend == backend
    assert opt.param_groups[0]["weight_decay"] == 0.0
