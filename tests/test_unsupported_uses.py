"""What LABPAL cannot support fails at once, saying what to do instead: copying or pickling
the optimizer, compiling step(), changing requires_grad after construction. The supported way
to compile, the model inside the closure, trains as eager does."""
import copy
import io
import math
import pickle

import pytest
import torch

from labpal_fast import LABPAL

from helpers import batches, closure_for, small_net

ALWAYS_VALID = dict(direction_norm_range=(0.0, math.inf))
# torch's own modules call it when dynamo loads
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy, pickle.dumps,
                                    lambda opt: torch.save(opt, io.BytesIO())],
                         ids=["copy", "deepcopy", "pickle", "torch.save"])
def test_copies_are_refused_with_the_fix(backend, copier):
    net = small_net(0)
    opt = LABPAL(net.parameters())
    with pytest.raises(TypeError, match=r"cannot be copied or pickled.*state_dict\(\).*"
                                        r"load_state_dict"):
        copier(opt)


def test_compiling_step_is_refused_with_the_fix(backend):
    net = small_net(0)
    opt = LABPAL(net.parameters(), approximation_batches=1, **ALWAYS_VALID)
    x, y = batches(1, 8, 6, seed=0)[0]
    before = [p.detach().clone() for p in net.parameters()]
    torch._dynamo.reset()
    for compiled in (torch.compile(opt.step), torch.compile(opt.step, backend="eager")):
        with pytest.raises(RuntimeError, match=r"cannot be compiled.*torch.compile\(model\)"):
            compiled(closure_for(net, x, y))
    # fullgraph=True reports the graph break instead, showing the line that says what to do
    # (in a fresh dynamo: after the compiles above, dynamo reuses their frames and runs step)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"compile the model, not LABPAL\.step\(\)"):
        torch.compile(opt.step, fullgraph=True)(closure_for(net, x, y))
    assert opt.counters.calls == 0
    assert all(torch.equal(p, q) for p, q in zip(before, net.parameters()))
    opt.step(closure_for(net, x, y))  # the same optimizer, uncompiled, goes on
    assert opt.updates == 1


def test_compiling_the_model_in_the_closure_trains_as_eager():
    """torch.compile(model) with the default inductor backend (it needs the C++ compiler that
    builds the extension): measurements evaluate the closure without grad, a second graph."""
    data = batches(10, 16, 6, seed=3)

    def train(compiled):
        net = small_net(0)
        model = torch.compile(net) if compiled else net
        # ν fixed: m stays 1 (with 2 batches the measured noise would change m on these data)
        opt = LABPAL(net.parameters(), model=net, backend="eager", approximation_batches=2,
                     reuse_updates=4, noise_factor=1.0, **ALWAYS_VALID)
        torch.manual_seed(1)
        losses = [float(opt.step(closure_for(model, x, y))) for x, y in data]
        return losses, [p.detach().clone() for p in net.parameters()], opt.measurements()

    torch._dynamo.reset()
    losses, params, records = train(compiled=True)
    ref_losses, ref_params, ref_records = train(compiled=False)
    assert len(records) == len(ref_records) == 2 and all(r["valid"] for r in records)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    for r, q in zip(records, ref_records):
        assert r["s_upd"] == pytest.approx(q["s_upd"], rel=1e-3)


def test_changing_requires_grad_after_construction_is_refused(backend):
    net = small_net(0)
    net[2].bias.requires_grad_(False)  # frozen at construction: not trained
    opt = LABPAL(net.parameters(), approximation_batches=1, **ALWAYS_VALID)
    data = batches(3, 8, 6, seed=0)
    opt.step(closure_for(net, *data[0]))
    for p in (net[0].weight, net[2].bias):  # freezing a trained one, unfreezing a frozen one
        p.requires_grad_(not p.requires_grad)
        before = [q.detach().clone() for q in net.parameters()]
        with pytest.raises(RuntimeError, match=r"requires_grad of parameter\(s\) \[\d\] .*"
                                               "changed.*Build a new LABPAL"):
            opt.step(closure_for(net, *data[1]))
        assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
        p.requires_grad_(not p.requires_grad)
    opt.step(closure_for(net, *data[1]))  # as built again: it goes on
    assert opt.updates == 2
