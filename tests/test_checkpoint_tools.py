"""Tools that read optimizer state: torch.distributed.checkpoint (dcp.save / dcp.load, and
get / set_optimizer_state_dict) in one process, `opt.state`'s live views, and gradients
accumulated outside step() (issue 20, items 5, 6 and 7; under DDP: test_distributed.py, under
Lightning: test_integration_lightning.py)."""
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.state_dict import (_init_optim_state, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from labpal_fast import LABPAL

from helpers import batches, closure_for, labpal_entry, small_net

pytestmark = [pytest.mark.usefixtures("backend"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

# m = 2 from call 6 on: a state saved there is mid-accumulation (a gradient sum pending)
HYPER = dict(approximation_batches=2, reuse_updates=3, warmup_updates=0, noise_factor=1.0,
             averaging_window=2, momentum=0.5, batch_size_schedule=((0, 1), (6, 2)))
DATA = batches(22, 8, 6, seed=11)
CUT = 14


def fresh(seed):
    """Two groups (weight decay in the first): their state entries are named and flattened."""
    net = small_net(seed)
    first, second = list(net[0].parameters()), list(net[2].parameters())
    opt = LABPAL([{"params": first, "weight_decay": 1e-3}, {"params": second}], **HYPER)
    return net, opt


def run(net, opt, start, stop):
    for x, y in DATA[start:stop]:
        opt.step(closure_for(net, x, y))


def finished(net, opt, start=CUT):
    run(net, opt, start, len(DATA))
    return [p.detach().clone() for p in net.parameters()], repr(opt.measurements())


def same(a, b):
    return a[1] == b[1] and all(torch.equal(p, q) for p, q in zip(a[0], b[0]))


def _trained():
    net, opt = fresh(seed=0)
    run(net, opt, 0, CUT)
    assert opt.counters.acc == 1 and len(opt.measurements()) >= 3
    return net, opt


def _resumer(net):
    """A fresh optimizer (other initial values) over a copy of `net`'s parameters."""
    net2, opt2 = fresh(seed=5)
    net2.load_state_dict(net.state_dict())
    return net2, opt2


def test_dcp_flattened_keys_of_a_fresh_and_a_trained_optimizer_are_the_same():
    _, trained = _trained()
    _, new = fresh(seed=1)
    keys = [set(flatten_state_dict({"optim": o.state_dict()})[0]) for o in (trained, new)]
    assert keys[0] == keys[1]
    assert "optim.param_groups.0.labpal.records" in keys[0]  # one leaf, however many


def test_dcp_save_and_load_resume_bit_for_bit(tmp_path, backend):
    net, opt = _trained()
    dcp.save({"optim": opt.state_dict()}, checkpoint_id=str(tmp_path))
    net2, opt2 = _resumer(net)
    state = {"optim": opt2.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path))
    opt2.load_state_dict(state["optim"])
    assert same(finished(net2, opt2), _expected(backend))


def test_get_and_set_optimizer_state_dict_keep_labpals_state(tmp_path, backend):
    net, opt = _trained()
    osd = get_optimizer_state_dict(net, opt)
    assert labpal_entry(osd)["counters"]["calls"] == CUT
    assert set(osd["state"]) == {n for n, _ in net.named_parameters()}
    net2, opt2 = _resumer(net)
    set_optimizer_state_dict(net2, opt2, osd)
    # and through a DCP checkpoint, loaded into the resuming optimizer's own
    dcp.save({"optim": osd}, checkpoint_id=str(tmp_path))
    net3, opt3 = _resumer(net)
    state = {"optim": get_optimizer_state_dict(net3, opt3)}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(net3, opt3, state["optim"])
    expected = _expected(backend)
    assert same(finished(net2, opt2), expected) and same(finished(net3, opt3), expected)


def test_state_holds_live_views_of_the_buffers():
    net, opt = _trained()
    flat = opt.flats[0]
    assert set(opt.state) == set(net.parameters())
    w = net[0].weight
    entry = opt.state[w]
    assert set(entry) == {"momentum_buffer", "grad_sum"}  # m = 2: a sum is kept
    d, s = entry["momentum_buffer"], entry["grad_sum"]
    assert d.shape == w.shape and d.data_ptr() == flat.direction.data_ptr()
    assert s.data_ptr() == flat.grad_sum.data_ptr()
    before = d.clone()
    run(net, opt, CUT, CUT + 1)  # the update: a new direction, in the same memory
    assert not torch.equal(d, before) and torch.equal(d, flat.slices(flat.direction)[0])
    # torch.distributed.checkpoint sees a state: it does not call step() to make one
    calls = opt.counters.calls
    _init_optim_state(opt)
    assert opt.counters.calls == calls
    # without momentum the buffer is the direction; fp16 parameters have fp32 master weights
    net = small_net(0).half()
    opt = LABPAL(net.parameters(), approximation_batches=2)
    assert set(opt.state[net[0].weight]) == {"direction", "master_weights"}
    master = opt.state[net[0].weight]["master_weights"]
    assert master.dtype == torch.float32 and torch.equal(master.half(), net[0].weight)


# ---------------------------------------------------------------------------- outside step()
def test_a_gradient_accumulated_outside_step_is_refused_until_cleared():
    net, opt = fresh(seed=0)
    run(net, opt, 0, 4)
    x, y = DATA[4]
    params = [p.detach().clone() for p in net.parameters()]
    F.cross_entropy(net(x), y).backward()  # as Lightning's accumulating batches do
    for _ in range(2):
        with pytest.raises(RuntimeError, match="outside LABPAL.step.*LABPALCallback"):
            opt.step(closure_for(net, x, y))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params))
    net[0].weight.grad = None  # the other parameters' gradients are still there
    with pytest.raises(RuntimeError, match="outside LABPAL.step"):
        opt.step(closure_for(net, x, y))


def test_a_backward_for_analysis_then_cleared_is_not_refused(backend):
    """Each way of clearing, before another step: the run is the one without the backwards."""
    net, opt = fresh(seed=0)
    run(net, opt, 0, CUT)
    clears = [opt.zero_grad, net.zero_grad, lambda: net.zero_grad(set_to_none=False),
              lambda: [setattr(p, "grad", None) for p in net.parameters()]]
    for i, clear in zip(range(CUT, len(DATA)), clears):
        F.cross_entropy(net(DATA[0][0]), DATA[0][1]).backward()
        clear()
        run(net, opt, i, i + 1)
    assert same(finished(net, opt, start=CUT + len(clears)), _expected(backend))


_cache = {}


def _expected(backend):
    if backend not in _cache:
        _cache[backend] = finished(*_trained())
    return _cache[backend]
