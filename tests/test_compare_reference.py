"""tools/compare_reference.py's own logic, without the authors' code: labpal_fast's paper
variant stands in for the reference, so two identical sides must not part, and a deliberate
difference must be found where it arises."""
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "compare_reference", os.path.join(ROOT, "tools", "compare_reference.py"))
cr = importlib.util.module_from_spec(_spec)
sys.modules["compare_reference"] = cr  # dataclasses look their module up there
_spec.loader.exec_module(cr)

# measurements often: at call 0, after update 6 (the warm-up; the first measurement's move is
# update 1), then 15 updates after each
QUICK = dict(warmup_updates=6, reuse_updates=15, approximation_batches=4)
STEPS, BATCH = 70, 32


@pytest.fixture(scope="module")
def task():
    return cr.load_task("spirals", 0, torch.device("cpu"))


def _side(task, **changes):
    hyper = dict(QUICK, dataset_size=task.train_size, batch_size=BATCH, **changes)
    return lambda params, model: cr.labpal_side(params, model, **hyper)


def _compare(task, a, b, seed=3):
    return cr.compare(a, b, task, steps=STEPS, batch_size=BATCH, seed=seed, rtol=1e-9)


def test_the_same_algorithm_on_both_sides_does_not_part(task):
    result = _compare(task, _side(task), _side(task))
    assert not result["parting"]["parted"], result["parting"]
    measured = result["a"]["measurements"]
    assert [m["call"] for m in measured][:3] == [0, 4 + 5, 4 + 5 + 4 + 15]
    assert all(m["valid"] for m in measured) and len(measured) >= 4
    assert result["a"]["losses"] == result["b"]["losses"]
    assert "no parting" in cr.report(result, 1e-9)


def test_a_different_step_rule_parts_at_the_first_measurement(task):
    result = _compare(task, _side(task), _side(task, update_step_adaptation=3.0))
    part = result["parting"]
    assert part["measurement"]["index"] == 0
    assert set(part["measurement"]["fields"]) == {"s_upd", "rate"}  # s_min is the same
    a, b = part["measurement"]["a"], part["measurement"]["b"]
    assert b["s_upd"] == pytest.approx(a["s_upd"] * 3.0 / 3.6, rel=1e-9)
    # the 4 closures of the measurement were evaluated at θ₀ alike; the call after its move
    # is the first whose loss differs
    assert part["loss_call"] == 4
    assert "first measurement that parts" in cr.report(result, 1e-9)


def test_a_different_schedule_parts_at_its_timing(task):
    result = _compare(task, _side(task), _side(task, warmup_updates=7))
    part = result["parting"]
    assert part["measurement"]["index"] == 1
    assert "call" in part["measurement"]["fields"]
    assert part["loss_call"] is not None and part["loss_call"] > 4


def test_without_the_reference_the_tool_exits_2_and_says_how_to_get_it(tmp_path, capsys):
    assert cr.main([]) == 2
    assert "git clone https://github.com/cogsys-tuebingen/LABPAL" in capsys.readouterr().err
    assert cr.main(["--reference", str(tmp_path)]) == 2
