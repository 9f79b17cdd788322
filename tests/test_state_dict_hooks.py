"""torch's state-dict hooks run on LABPAL as on torch.optim.SGD: the same calls in the same
order with the same arguments, a hook's returned state_dict replacing it, and a load pre-hook
working on a shallow copy of the state_dict passed in."""
from dataclasses import asdict

import pytest
import torch

from labpal_fast import LABPAL

from helpers import batches, labpal_entry, closure_for, small_net

pytestmark = pytest.mark.usefixtures("backend")

HYPER = dict(approximation_batches=2, reuse_updates=4, warmup_updates=6, noise_factor=1.0,
             batch_size_schedule=((0, 1),), direction_norm_range=(0.0, float("inf")))


def _register(opt, log):
    """Every kind of hook, two of each (one prepended), logging what it was called with."""
    handles = []

    def sd_pre(name):
        def hook(o):
            log.append((name, o is opt))
        return hook

    def sd_post_marks(o, sd):  # changes the state_dict in place
        log.append(("sd_post_marks", o is opt, sorted(sd)))
        sd["marked"] = True

    def sd_post_replaces(o, sd):  # returns another one: what state_dict() returns
        log.append(("sd_post_replaces", o is opt, sorted(sd)))
        return dict(sd, replaced=True)

    def sd_post_sees(o, sd):
        log.append(("sd_post_sees", o is opt, sorted(sd)))

    def load_pre_copy(o, sd):  # receives a shallow copy: dropping a key leaves the caller's
        log.append(("load_pre_copy", o is opt, sorted(sd), sd is log.passed))
        del sd["marked"]

    def load_pre_replaces(o, sd):  # returns the state_dict that is loaded
        log.append(("load_pre_replaces", o is opt, sorted(sd)))
        return {k: v for k, v in sd.items() if k != "replaced"}

    def load_post(name):
        def hook(o):
            log.append((name, o is opt))
        return hook

    handles.append(opt.register_state_dict_pre_hook(sd_pre("sd_pre_a")))
    handles.append(opt.register_state_dict_pre_hook(sd_pre("sd_pre_first"), prepend=True))
    handles.append(opt.register_state_dict_post_hook(sd_post_replaces))
    handles.append(opt.register_state_dict_post_hook(sd_post_sees))
    handles.append(opt.register_state_dict_post_hook(sd_post_marks, prepend=True))
    handles.append(opt.register_load_state_dict_pre_hook(load_pre_replaces))
    handles.append(opt.register_load_state_dict_pre_hook(load_pre_copy, prepend=True))
    handles.append(opt.register_load_state_dict_post_hook(load_post("load_post_a")))
    handles.append(opt.register_load_state_dict_post_hook(load_post("load_post_first"),
                                                          prepend=True))
    return handles


class _Log(list):
    passed = None  # the state_dict passed to load_state_dict


def _trained(make, data):
    net = small_net(3)
    opt = make(net)
    for x, y in data:
        opt.step(closure_for(net, x, y))
    return net, opt


def _exercise(make, data):
    """state_dict, then load_state_dict into a second optimizer, with the hooks on both."""
    net, opt = _trained(make, data)
    log = _Log()
    handles = _register(opt, log)
    saved = opt.state_dict()
    top = sorted(saved)
    _, other = _trained(make, data[:1])
    _register(other, log)
    log.append("load")
    log.passed = saved
    other.load_state_dict(saved)
    # the hooks worked on a shallow copy: the caller's state_dict keeps its keys
    assert sorted(saved) == top
    for handle in handles:  # removed hooks are not called again
        handle.remove()
    log.append("removed")
    opt.state_dict()
    return log, top, opt, other


def _sgd(net):
    return torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)


def _labpal(net):
    return LABPAL(net.parameters(), model=net, **HYPER)


def _with_labels(log, top, own_keys):
    """The log with this optimizer's own top-level keys named alike (SGD has no 'labpal')."""
    def name(entry):
        if isinstance(entry, tuple) and len(entry) > 2:
            keys = ["<own>" if k in own_keys else k for k in entry[2]]
            return entry[:2] + (sorted(set(keys)),) + entry[3:]
        return entry
    return [name(e) for e in log]


def test_hooks_are_called_as_on_sgd():
    data = batches(14, 8, 6, seed=4)
    sgd_log, sgd_top, _, _ = _exercise(_sgd, data)
    log, top, opt, other = _exercise(_labpal, data)
    assert "marked" in top and "replaced" in top  # LABPAL's own entry: in param_groups[0]
    assert _with_labels(log, top, {"state", "param_groups", "labpal"}) == \
        _with_labels(sgd_log, sgd_top, {"state", "param_groups"})
    assert log[:5] == [("sd_pre_first", True), ("sd_pre_a", True),
                       ("sd_post_marks", True, ["param_groups", "state"]),
                       ("sd_post_replaces", True, ["marked", "param_groups", "state"]),
                       ("sd_post_sees", True,
                        ["marked", "param_groups", "replaced", "state"])]
    # the state the pre-hooks left was loaded: the second optimizer holds the first one's state
    assert asdict(other.counters) == labpal_entry(opt.state_dict())["counters"]
    assert other.updates > 0
    assert repr(other.measurements()) == repr(opt.measurements())
    for f, g in zip(opt.flats, other.flats):
        assert torch.equal(f.direction, g.direction)


def test_a_load_pre_hook_can_turn_a_foreign_state_into_one_that_loads():
    """Replacement as in torch: without the hook the state is refused, with it it loads."""
    data = batches(10, 8, 6, seed=5)
    _, opt = _trained(_labpal, data)
    saved = opt.state_dict()
    foreign = {"wrapped": saved}
    _, other = _trained(_labpal, data[:1])
    with pytest.raises(ValueError, match="state_dict"):
        other.load_state_dict(foreign)
    other.register_load_state_dict_pre_hook(lambda o, sd: sd["wrapped"])
    other.load_state_dict(foreign)
    assert asdict(other.counters) == labpal_entry(saved)["counters"] and other.updates > 0
    assert repr(other.measurements()) == repr(opt.measurements())
