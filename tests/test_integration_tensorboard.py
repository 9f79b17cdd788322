"""LABPAL's measurements written with the real torch SummaryWriter, read back from the event
file with TensorBoard's EventAccumulator, against opt.measurements()."""
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter  # the [integrations] extra brings tensorboard

from labpal_fast import LABPAL
from labpal_fast.integrations.tensorboard import FIGURES, hparams, log_measurements
from tests.helpers import batches, closure_for, small_net


def scalars(log_dir):
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("mode", ["NSGD", "SGD"])
def test_measurements_written_once_each_at_their_step(tmp_path, mode):
    model = small_net(seed=2)
    # the paper's SGD rate: η of the measurement is the rate in use (robust: s_upd/n̄ per update)
    opt = LABPAL(model.parameters(), model=model, mode=mode, sgd_rate="paper", noise_factor=1.0,
                 approximation_batches=2, reuse_updates=3, warmup_updates=2, averaging_window=2,
                 sample_positions=(0.0, 0.05, 0.2), weight_decay=1e-3)
    writer = SummaryWriter(tmp_path)
    ended_at = []  # the steps at which a measurement ended
    for step, (x, y) in enumerate(batches(20, 16, 6, seed=4)):
        opt.step(closure_for(model, x, y))
        if log_measurements(writer, opt, step):
            ended_at.append(step)
        assert log_measurements(writer, opt, step) == 0  # nothing new: nothing written twice
    writer.close()

    records = opt.measurements()
    assert len(records) >= 4 and len(ended_at) == len(records)
    assert any(r["valid"] for r in records)
    logged = scalars(tmp_path)
    assert sorted(logged) == sorted("labpal/" + name for name in FIGURES)
    for name in ("s_min", "s_upd", "eta", "a", "b", "direction_norm"):
        assert [s for s, _ in logged["labpal/" + name]] == ended_at
        assert [v for _, v in logged["labpal/" + name]] == pytest.approx(
            [r[name] for r in records], rel=1e-6, nan_ok=True)
    assert [v for _, v in logged["labpal/valid"]] == [float(r["valid"]) for r in records]
    # lr: the rate the measurement set, η in SGD mode, s_upd/‖d‖ in NSGD mode
    expected = [r["eta"] if mode == "SGD" else r["s_upd"] / r["direction_norm"]
                for r in records]
    assert [v for _, v in logged["labpal/lr"]] == pytest.approx(expected, rel=1e-6)
    if mode == "SGD":  # the last measurement's rate is the one in use (no update since in SGD)
        assert logged["labpal/lr"][-1][1] == pytest.approx(float(opt.param_groups[0]["lr"]))


def test_hparams_go_into_add_hparams(tmp_path):
    model = small_net(seed=2)
    opt = LABPAL(model.parameters(), model=model, noise_factor=1.0, approximation_batches=2,
                 sample_positions=(0.0, 0.05, 0.2))
    for x, y in batches(3, 16, 6, seed=4):
        opt.step(closure_for(model, x, y))
    values = hparams(opt)
    assert all(isinstance(v, (int, float, str, bool)) for v in values.values())
    assert values["lr"] == float(opt.param_groups[0]["lr"]) and values["lr"] > 0
    assert values["sample_positions"] == "(0.0, 0.05, 0.2)" and values["noise_factor"] == 1.0
    with SummaryWriter(tmp_path) as writer:
        writer.add_hparams(values, {"hparam/loss": 0.5}, run_name="run")
    logged = scalars(tmp_path / "run")
    assert logged["hparam/loss"][0][1] == pytest.approx(0.5)


def test_not_a_labpal_raises(tmp_path):
    model = small_net(seed=2)
    with SummaryWriter(tmp_path) as writer, pytest.raises(TypeError, match="LABPAL"):
        log_measurements(writer, torch.optim.SGD(model.parameters(), lr=0.1), 0)
