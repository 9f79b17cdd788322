"""state_dict / load_state_dict: resuming continues bit for bit; mid-measurement restarts it."""
import io

import pytest
import torch

from labpal_fast import LABPAL

from helpers import batches, small_net, closure_for

pytestmark = pytest.mark.usefixtures("backend")

HYPER = dict(mode="NSGD", momentum=0.9, approximation_batches=2, reuse_updates=5,
             warmup_updates=8, averaging_window=3, batch_size_schedule=((0, 1), (12, 2)),
             noise_factor=1.0, direction_norm_range=(0.0, float("inf")))
DATA = batches(48, 16, 6, seed=7)


def fresh(seed=0, mode="NSGD"):
    net = small_net(seed, batchnorm=True)
    groups = [{"params": net[0].parameters(), "weight_decay": 1e-3},
              {"params": list(net[1].parameters()) + list(net[3].parameters())}]
    return net, LABPAL(groups, model=net, **{**HYPER, "mode": mode})


def run(net, opt, start, stop):
    for i in range(start, stop):
        opt.step(closure_for(net, *DATA[i]))


def save_and_reload(net, opt, mode):
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    net2, opt2 = fresh(seed=123, mode=mode)  # other initial values: everything must come from the file
    net2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    return net2, opt2


@pytest.mark.parametrize("mode", ["NSGD", "SGD"])
def test_resume_in_training_continues_bit_for_bit(mode):
    net, opt = fresh(mode=mode)
    run(net, opt, 0, len(DATA))
    assert len(opt.measurements()) >= 4
    resumed_at = []
    for cut in (5, 9, 13, 18, 21, 26, 29, 35, 40):
        net_b, opt_b = fresh(mode=mode)
        run(net_b, opt_b, 0, cut)
        if opt_b.phase != "training":
            continue
        resumed_at.append((cut, opt_b.counters.acc))
        net_c, opt_c = save_and_reload(net_b, opt_b, mode)
        run(net_c, opt_c, cut, len(DATA))
        for p, q in zip(net.state_dict().values(), net_c.state_dict().values()):
            assert torch.equal(p, q), f"resumed at call {cut}"
        assert repr(opt_c.measurements()) == repr(opt.measurements())  # repr: NaN == NaN
        assert opt_c.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        assert torch.equal(opt_c.lr_tensor, opt.lr_tensor)
    # the cuts covered both update boundaries and the middle of an accumulation (m = 2)
    assert {acc for _, acc in resumed_at} == {0, 1}


def test_resume_during_a_measurement_starts_it_over_with_parameters_untouched():
    net, opt = fresh()
    run(net, opt, 0, 13)  # call 12: m changes to 2, a measurement starts
    assert opt.phase == "measuring"
    before = opt.state_dict()["state"]  # entries are copies
    params_before = [p.detach().clone() for p in net.parameters()]
    run(net, opt, 13, 15)  # 3 of its 4 calls: the direction has been formed (call 13)
    assert opt.phase == "measuring"
    net2, opt2 = save_and_reload(net, opt, "NSGD")
    for p, q in zip(params_before, net2.parameters()):
        assert torch.equal(p, q)
    # the direction is the one from before the measurement: it starts over cleanly
    for i, entry in opt2.state_dict()["state"].items():
        assert torch.equal(entry["direction"], before[i]["direction"])
    assert opt2.phase == "training" and opt2.updates == opt.updates
    n_records = len(opt2.measurements())
    run(net2, opt2, 15, 19)  # the measurement runs again, from call 15
    assert opt2.phase == "training"
    assert [r["call"] for r in opt2.measurements()[n_records:]] == [15]


def test_loading_the_state_of_other_parameters_fails_clearly():
    net, opt = fresh()
    run(net, opt, 0, 3)
    state = opt.state_dict()
    other = torch.nn.Linear(6, 2)
    with pytest.raises(ValueError, match="groups of other sizes"):
        LABPAL(other.parameters()).load_state_dict(state)
    net2 = torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.BatchNorm1d(17), torch.nn.Tanh(),
                               torch.nn.Linear(17, 3))
    opt2 = LABPAL([{"params": net2[0].parameters(), "weight_decay": 1e-3},
                   {"params": list(net2[1].parameters()) + list(net2[3].parameters())}], **HYPER)
    with pytest.raises(ValueError, match="belongs to other parameters"):
        opt2.load_state_dict(state)
    with pytest.raises(ValueError, match="not saved by LABPAL"):
        opt2.load_state_dict({"state": {}, "param_groups": []})
