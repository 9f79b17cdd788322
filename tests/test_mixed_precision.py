"""Mixed precision (docs/mixed_precision.md): built-in loss scaling, GradScaler refused,
bf16 autocast, fp32 master weights for fp16 / bf16 parameters.

Oracles: a power-of-two loss scale is exact in floating point, so a scaled run is the fp32 run;
hand-derived overflow points of fp16 gradients; the update rule on the device counted by hand.
"""
import copy
import math
import re

import pytest
import torch

from labpal_fast import LABPAL
from labpal_fast.hyper import LOSS_SCALE_GROWTH_INTERVAL, Hyper
from labpal_fast.layout import ABANDON_REASONS, Abandon, Partial

from helpers import batches, labpal_entry, closure_for, small_net
from test_sync_and_memory import Watch

OVERFLOW = ABANDON_REASONS[int(Abandon.OVERFLOW)]


def _params(net):
    return torch.cat([p.detach().double().reshape(-1) for p in net.parameters()])


# ---------------------------------------------------------------------------- loss scaling
@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("clip", (None, 0.5))
def test_a_power_of_two_loss_scale_gives_the_unscaled_run(clip):
    """S·loss and ḡ/S are exact for S = 2**10: every measurement and the parameters match the
    run without scaling (with momentum, weight decay, and clipping, which reads ‖ḡ‖ unscaled;
    Triton: its fused direction without clipping, the composite with it)."""
    runs = []
    for scale in (None, 1024.0):
        net = small_net(3)
        opt = LABPAL([{"params": net[0].parameters(), "weight_decay": 1e-2},
                      {"params": net[2].parameters()}], loss_scale=scale, momentum=0.9,
                     approximation_batches=2, warmup_updates=0, reuse_updates=4,
                     noise_factor=1.0, batch_size_schedule=((0, 1),), max_grad_norm=clip,
                     sample_positions=(0.0, 0.02, 0.1),  # a fit one ulp does not move
                     # the paper's steps, whose fits are all valid here
                     step_check=False, momentum_correction=False)
        for x, y in batches(14, 16, 6, seed=4):
            opt.step(closure_for(net, x, y))
        runs.append((_params(net), opt.measurements(), opt.grad_norm.item()))
    (p0, m0, n0), (p1, m1, n1) = runs
    assert len(m0) == 3 and all(r["valid"] for r in m0)
    if clip is not None:
        assert n1 == pytest.approx(n0, rel=1e-6) and n0 > clip  # clipped, by the unscaled norm
    for r0, r1 in zip(m0, m1):
        # eager forms β·d + c·ḡ with clipping's rounding, β·d + ḡ without: d may differ by an
        # ulp, which moves the fit of fp32 losses by ~1e-4 (as in test_trajectories)
        for key, tol in (("a", 1e-3), ("b", 1e-3), ("s_upd", 1e-3),
                         ("directional_derivative", 1e-5), ("direction_norm", 1e-5)):
            assert r1[key] == pytest.approx(r0[key], rel=tol), key
        assert r1["mean_losses"] == pytest.approx(r0["mean_losses"], rel=1e-6)  # unscaled
    assert ((p1 - p0).norm() / p0.norm()).item() < 1e-5


def _quadratic_fp16(**hyper):
    """ℓ(w) = 250·Σ(w − t)² on 4 fp16 values from w = 2: ∇ = 500·(2 − t) = (500, 1500, 750,
    1000), so S·∇ overflows fp16 (65504) for S > 65504/1500 = 43.7: the dynamic scale halves
    from 2**16 eleven times, to 32."""
    w = torch.nn.Parameter(torch.full((4,), 2.0, dtype=torch.float16))
    t = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float16)
    opt = LABPAL([w], loss_scale="dynamic", approximation_batches=1, warmup_updates=0,
                 noise_factor=1.0, batch_size_schedule=((0, 1),),
                 sample_positions=(0.0, 0.01, 0.1), direction_norm_range=(0.0, math.inf),
                 **hyper)
    return w, t, opt, lambda factor=1.0: factor * 250.0 * ((w - t) ** 2).sum()


@pytest.mark.usefixtures("backend")
def test_dynamic_scale_halves_at_each_overflow_and_skips_it():
    w, t, opt, loss = _quadratic_fp16(reuse_updates=100)
    for _ in range(11):  # each call: a measurement whose direction overflows, abandoned
        opt.step(loss)
        assert torch.equal(w.detach(), torch.full((4,), 2.0, dtype=torch.float16))
    assert opt.line.loss_scale.item() == 32.0
    records = opt.measurements()
    assert [r["reason"] for r in records] == [OVERFLOW] * 11
    opt.step(loss)  # S = 32: 32·1500 = 48000, finite; the line samples are the unscaled loss
    r = opt.measurements()[-1]
    # 250·(1 + 9 + 2.25 + 4) = 4062.5, an fp16 loss: 4062 (the ulp is 2 from 2048 to 4096)
    assert r["valid"] and r["mean_losses"][0] == 4062.0
    norm = math.sqrt(500**2 + 1500**2 + 750**2 + 1000**2)  # d = ḡ, unscaled
    assert r["direction_norm"] == pytest.approx(norm, rel=1e-6)
    assert r["directional_derivative"] == pytest.approx(-norm, rel=1e-6)  # −⟨ḡ, d⟩/‖d‖
    # TRAINING: a call whose gradient overflows (the loss ×100) halves S and is skipped
    before = w.detach().clone()
    skipped = opt.line.skipped_updates.item()
    with Watch() as watch:
        opt.step(lambda: loss(100.0))
    assert opt.phase == "training" and watch.syncs == 0
    assert torch.equal(w.detach(), before)
    assert opt.line.loss_scale.item() == 16.0 and opt.line.skipped_updates.item() == skipped + 1
    opt.step(loss)  # and the next one trains
    assert ((w.detach().float() - t.float()) ** 2).sum() < ((before.float() - t.float()) ** 2).sum()


@pytest.mark.parametrize("backend", ("eager", "triton"))
def test_dynamic_scale_doubles_after_the_growth_interval(backend):
    """Line.update_loss_scale by hand: N − 1 finite directions keep S, the N-th doubles it and
    restarts the count; a non-finite one halves it and restarts the count."""
    from labpal_fast import ops
    if ops.why_unavailable(backend, [torch.device("cpu")]) is not None:
        pytest.skip(f"backend {backend} cannot run here")
    line = ops.resolve(backend, {torch.device("cpu")}).make_line(Hyper(loss_scale="dynamic"),
                                                                 torch.device("cpu"))
    n = LOSS_SCALE_GROWTH_INTERVAL
    line.partials[Partial.DD] = 4.0
    for _ in range(n - 1):
        line.update_loss_scale()
    assert line.loss_scale.item() == 2.0 ** 16 and line.scale_good.item() == n - 1
    line.update_loss_scale()
    assert line.loss_scale.item() == 2.0 ** 17 and line.scale_good.item() == 0
    line.update_loss_scale()
    line.partials[Partial.DD] = math.inf
    line.update_loss_scale()
    assert line.loss_scale.item() == 2.0 ** 16 and line.scale_good.item() == 0


def test_a_fixed_scale_stays_and_off_is_one():
    for scale, expected in ((None, 1.0), (8.0, 8.0)):
        w, t, _, loss = _quadratic_fp16()
        opt = LABPAL([w], loss_scale=scale, approximation_batches=1, warmup_updates=0,
                     noise_factor=1.0, batch_size_schedule=((0, 1),))
        opt.line.partials[Partial.DD] = math.inf
        opt.line.update_loss_scale()
        assert opt.line.loss_scale.item() == expected
    for bad in ("static", 0.0, -1.0, math.inf, True, 2.0 ** 65):
        with pytest.raises(ValueError, match="loss_scale"):
            Hyper(loss_scale=bad)


@pytest.mark.usefixtures("backend")
def test_sync_free_training_and_two_reads_per_measurement_with_dynamic_scaling():
    net = small_net(5)
    opt = LABPAL(net.parameters(), loss_scale="dynamic", approximation_batches=2,
                 warmup_updates=0, reuse_updates=6, noise_factor=1.0,
                 batch_size_schedule=((0, 1),))
    syncs = {"training": 0, "measuring": 0}
    for x, y in batches(20, 16, 6, seed=6):
        before = opt.phase
        with Watch() as watch:
            opt.step(closure_for(net, x, y))
        # a measurement of k = 2 calls: its first call ends measuring, its last starts so
        syncs["measuring" if "measuring" in (before, opt.phase) else "training"] += watch.syncs
    records = opt.measurements()
    assert all(r["valid"] for r in records) and len(records) == 3
    assert syncs["training"] == 0 and syncs["measuring"] <= 2 * len(records)


def test_a_closure_running_backward_itself_is_refused_under_loss_scaling():
    net = small_net(0)
    opt = LABPAL(net.parameters(), loss_scale="dynamic")
    x, y = batches(1, 8, 6, seed=0)[0]

    def closure():
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss
    before = _params(net)
    with pytest.raises(RuntimeError, match="loss_scale is set and the closure ran backward"):
        opt.step(closure)
    assert torch.equal(_params(net), before)
    opt.step(closure_for(net, x, y))  # and stepping goes on


@pytest.mark.usefixtures("backend")
def test_a_closure_running_backward_on_scale_loss_trains_as_labpals_own_backward():
    """torch's convention (the closure runs backward, as Lightning's does) under the dynamic
    scale, through its overflows and halvings: the same bits as LABPAL running backward."""
    runs = []
    for own in (False, True):
        w, t, opt, loss = _quadratic_fp16(reuse_updates=3)

        def closure():
            value = loss()
            if own:
                opt.scale_loss(value).backward()
            return value
        for _ in range(20):
            opt.step(closure)
        runs.append((w.detach().clone(), opt.line.loss_scale.item(), opt.measurements()))
    (w0, s0, r0), (w1, s1, r1) = runs
    assert s0 == s1 == 32.0 and sum(r["valid"] for r in r0) >= 3
    assert torch.equal(w0, w1) and not torch.equal(w0, torch.full_like(w0, 2.0))
    assert [r["s_upd"] for r in r1] == pytest.approx([r["s_upd"] for r in r0], rel=0, abs=0,
                                                      nan_ok=True)


def test_scale_loss_without_loss_scaling_is_the_loss():
    net = small_net(0)
    opt = LABPAL(net.parameters())
    x, y = batches(1, 8, 6, seed=0)[0]
    loss = torch.nn.functional.cross_entropy(net(x), y)
    assert opt.scale_loss(loss) is loss
    with pytest.raises(TypeError, match="scale_loss"):
        opt.scale_loss(1.0)


def test_grad_scaler_around_labpal_is_refused_with_the_fix():
    net = small_net(0)
    opt = LABPAL(net.parameters())
    scaler = torch.amp.GradScaler("cpu")
    x, y = batches(1, 8, 6, seed=0)[0]
    fix = re.escape("loss_scale='dynamic'")
    # the usual loop: scale(loss).backward(), scaler.step(opt)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    scaler.scale(loss).backward()
    with pytest.raises(RuntimeError, match="GradScaler.*" + fix):
        scaler.step(opt)
    # and with a closure
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.nn.functional.cross_entropy(net(x), y)).backward()
    with pytest.raises(RuntimeError, match="GradScaler.*" + fix):
        scaler.step(opt, closure_for(net, x, y))
    # the optimizer was left as it was: it trains on
    assert "found_inf" not in vars(opt) and "grad_scale" not in vars(opt)
    opt.zero_grad()
    opt.step(closure_for(net, x, y))
    assert opt.counters.calls == 1


# ---------------------------------------------------------------------------- fp16 autocast
@pytest.mark.parametrize("own_backward", (False, True))
def test_fp16_autocast_with_dynamic_loss_scaling_trains_like_fp32(own_backward):
    """The classic fp16 AMP recipe, GradScaler replaced by LABPAL's own scale: fp32 parameters,
    the forward under fp16 autocast, loss_scale="dynamic" (the closure returning the loss, or
    running backward on opt.scale_loss(loss)). The loss is 10·cross-entropy, so that 2**16 times
    its gradient overflows fp16 at first. The fp32 run is the oracle: accuracy within 5 points;
    every measurement valid but those abandoned for an overflow, each of which halved S."""
    acc, overflows = {}, 0
    for fp16 in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
        opt = LABPAL(net.parameters(), approximation_batches=2, warmup_updates=0,
                     reuse_updates=20, noise_factor=1.0, batch_size_schedule=((0, 1),),
                     sample_positions=(0.0, 0.02, 0.1), loss_scale="dynamic" if fp16 else None)

        def closure(x, y):
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                loss = 10 * torch.nn.functional.cross_entropy(net(x), y)
            if own_backward:
                opt.scale_loss(loss).backward()
            return loss
        for x, y in _blobs(80, seed=1, dtype=torch.float32):
            opt.step(lambda x=x, y=y: closure(x, y))
        records = opt.measurements()
        overflow = [r for r in records if r["reason"] == OVERFLOW]
        assert all(r["valid"] for r in records if r["reason"] != OVERFLOW), records
        assert sum(r["valid"] for r in records) >= 3
        if fp16:
            overflows = len(overflow)
            assert opt.line.loss_scale.item() == 2.0 ** (16 - overflows)
            assert all(p.dtype == torch.float32 for p in net.parameters())
        else:
            assert not overflow
        x, y = _blobs(1, seed=2, dtype=torch.float32)[0]
        with torch.no_grad():
            acc[fp16] = (net(x).argmax(1) == y).double().mean().item()
    assert overflows >= 1
    assert acc[False] > 0.9 and acc[True] >= acc[False] - 0.05, acc


# ---------------------------------------------------------------------------- bf16 autocast
def test_bf16_autocast_in_the_closure_trains_like_fp32():
    """Autocast out of the box: the same MLP (with dropout: its repeats are replayed) trained
    with its forward under bf16 autocast reaches the fp32 run's accuracy within 5 points; the
    repeat check (replay_tolerance) never fires (a miss raises), and the first measurement
    (same origin and batches as fp32's) is valid with the fp32 run's directional derivative
    within 1%, and its fitted slope within 5% at the same positions. (How accurately a and b
    are fitted from bf16-rounded losses is tests/test_line_accuracy.py's matter.)"""
    acc, first = {}, {}
    for autocast in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                  torch.nn.Linear(32, 3))
        opt = LABPAL(net.parameters(), model=net, approximation_batches=2, warmup_updates=0,
                     reuse_updates=20, noise_factor=1.0, batch_size_schedule=((0, 1),),
                     sample_positions=(0.0, 0.02, 0.1))

        def closure(x, y):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return torch.nn.functional.cross_entropy(net(x), y)
        for x, y in _blobs(80, seed=1, dtype=torch.float32):
            opt.step(lambda x=x, y=y: closure(x, y))  # raises if a repeat missed
        records = opt.measurements()
        assert len(records) == 4 and not any("repeat" in (r["reason"] or "") for r in records)
        first[autocast] = records[0]
        net.eval()
        x, y = _blobs(1, seed=2, dtype=torch.float32)[0]
        with torch.no_grad():
            acc[autocast] = (net(x).argmax(1) == y).double().mean().item()
    assert acc[False] > 0.9 and acc[True] >= acc[False] - 0.05, acc
    assert first[True]["valid"] and first[True]["directional_derivative"] == pytest.approx(
        first[False]["directional_derivative"], rel=0.01)
    # resolve_positions measures under autocast farther out than in fp32 (bf16 resolves less),
    # so the two fits of this non-quadratic line see different ranges: compared at the same
    # literal positions, the fitted slopes agree within 5%
    literal = {}
    for autocast in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
        opt = LABPAL(net.parameters(), approximation_batches=2, noise_factor=1.0,
                     batch_size_schedule=((0, 1),), sample_positions=(0.0, 0.02, 0.1),
                     resolve_positions=False)

        def plain(x, y):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return torch.nn.functional.cross_entropy(net(x), y)
        for x, y in _blobs(2, seed=1, dtype=torch.float32):
            opt.step(lambda x=x, y=y: plain(x, y))
        literal[autocast] = opt.measurements()[0]
    assert literal[True]["valid"] and literal[False]["valid"]
    assert literal[True]["b"] == pytest.approx(literal[False]["b"], rel=0.05)


# ---------------------------------------------------------------------------- master weights
def _one_bf16(master_weights):
    """One bf16 parameter w = 1 under ℓ = ½(w + 1000)²: the first measurement's exact parabola
    moves it by s_upd = 3.6·min(s*, 0.5) = 1.8, to −0.8 (bf16: −0.80078125)."""
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.bfloat16))
    opt = LABPAL([w], master_weights=master_weights, approximation_batches=1, warmup_updates=0,
                 noise_factor=1.0, batch_size_schedule=((0, 1),),
                 sample_positions=(0.0, 0.5, 1.0), reuse_updates=1000,
                 direction_norm_range=(0.0, math.inf), step_check=False)  # s_upd = 3.6·0.5
    return w, opt, lambda: 0.5 * ((w.float() + 1000.0) ** 2).sum()


@pytest.mark.usefixtures("backend")
def test_master_weights_accumulate_steps_below_one_bf16_ulp():
    """Steps of 0.001 from −0.8, where one bf16 ulp is 2⁻⁸ ≈ 0.0039: rounded each time they
    vanish; kept in fp32 they add up, −0.8 − 10·0.001 = −0.81 → bf16 −0.80859375."""
    for master_weights in (None, False):
        w, opt, loss = _one_bf16(master_weights)
        opt.step(loss)
        assert opt.measurements()[0]["s_upd"] == pytest.approx(1.8)
        flat = opt.flats[0]
        assert flat.master == (master_weights is None)
        assert flat.param.dtype == (torch.float32 if flat.master else torch.bfloat16)
        start = flat.param[0].item()
        assert start == pytest.approx(-0.8, abs=1e-6 if flat.master else 2 ** -8)
        assert w.dtype == torch.bfloat16 and w.item() == start if not flat.master else True
        opt.line.s_upd.fill_(1e-3)  # each TRAINING update then moves w by 0.001 exactly
        opt.line.s_base.fill_(1e-3)
        with Watch() as watch:
            for _ in range(10):
                opt.step(loss)
        assert watch.syncs == 0
        if flat.master:
            assert flat.param[0].item() == pytest.approx(start - 0.01, abs=1e-6)
            assert w.item() == -0.80859375
        else:
            assert w.item() == start  # −0.8 − 0.001 rounds back to −0.8 each time


def _blobs(n_batches, seed, dtype):
    """Three Gaussian classes in 6 dimensions, well apart (the same for every seed): an MLP
    separates them."""
    centers = 2.0 * torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 3, (32,), generator=g)
        out.append(((centers[y] + torch.randn(32, 6, generator=g)).to(dtype), y))
    return out


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_a_low_precision_model_trains_like_fp32(dtype):
    """The fp32 run is the oracle: the same MLP in bf16 / fp16 with master weights reaches its
    accuracy within 5 points, from valid measurements; its parameters are its master copy
    rounded."""
    acc = {}
    for run_dtype in (torch.float32, dtype):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(),
                                  torch.nn.Linear(32, 3)).to(run_dtype)
        opt = LABPAL(net.parameters(), approximation_batches=2, warmup_updates=0,
                     reuse_updates=20, noise_factor=1.0, batch_size_schedule=((0, 1),),
                     sample_positions=(0.0, 0.02, 0.1))
        for x, y in _blobs(80, seed=1, dtype=run_dtype):
            opt.step(closure_for(net, x, y))
        records = opt.measurements()
        assert sum(r["valid"] for r in records) >= len(records) - 1, records
        x, y = _blobs(1, seed=2, dtype=run_dtype)[0]
        with torch.no_grad():
            acc[run_dtype] = (net(x).argmax(1) == y).double().mean().item()
        if run_dtype != torch.float32:
            flat = opt.flats[0]
            assert flat.master and flat.param.dtype == torch.float32
            assert all(p.dtype == run_dtype for p in net.parameters())
            assert torch.equal(flat.param.to(run_dtype), flat.low)
    assert acc[torch.float32] > 0.9 and acc[dtype] >= acc[torch.float32] - 0.05, acc


def _fp16_net(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                              torch.nn.Linear(16, 3)).half()
    opt = LABPAL(net.parameters(), loss_scale="dynamic", approximation_batches=1,
                 warmup_updates=0, reuse_updates=4, noise_factor=1.0,
                 batch_size_schedule=((0, 1),), sample_positions=(0.0, 0.02, 0.1))
    return net, opt


@pytest.mark.usefixtures("backend")
def test_master_weights_and_the_loss_scale_resume_bit_for_bit():
    data = _blobs(12, seed=3, dtype=torch.float16)
    net, opt = _fp16_net(0)
    for i, (x, y) in enumerate(data):
        if i == 5:
            saved = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
        opt.step(closure_for(net, x, y))
    state, params = saved
    assert all(e["master"].dtype == torch.float32 for e in state["state"].values())
    assert labpal_entry(state)["line"]["scale_good"].item() > 0  # a count under way
    net2, opt2 = _fp16_net(1)
    net2.load_state_dict(params)
    opt2.load_state_dict(state)
    for x, y in data[5:]:
        opt2.step(closure_for(net2, x, y))
    assert torch.equal(opt2.flats[0].param, opt.flats[0].param)  # the master weights
    assert all(torch.equal(p, q) for p, q in zip(net2.parameters(), net.parameters()))
    for name in ("loss_scale", "scale_good"):
        assert torch.equal(getattr(opt2.line, name), getattr(opt.line, name))
    assert repr(opt2.measurements()) == repr(opt.measurements())


def test_master_weights_follow_parameters_changed_in_place():
    """A parameter written from outside (its version counter moved) becomes its master's value
    where the master no longer rounds to it; untouched parameters keep their fp32 bits."""
    net, opt = _fp16_net(0)
    for x, y in _blobs(4, seed=3, dtype=torch.float16):
        opt.step(closure_for(net, x, y))
    flat = opt.flats[0]
    weight, bias = flat.slices(flat.param)[:2]
    kept = bias.clone()
    assert not torch.equal(bias, bias.half().float())  # fp32 bits below fp16's
    with torch.no_grad():
        net[0].weight.mul_(0.5)
    flat.attach_params()  # what every step() does first
    assert torch.equal(weight, net[0].weight.float())
    assert torch.equal(bias, kept)


def test_a_version_2_state_loads_with_the_documented_defaults():
    """Version 2 had no loss scale, no master weights (and no n̄ of robust SGD): S starts as
    this optimizer's loss_scale says (2**16, nothing counted), the master weights are the
    model's parameters."""
    data = _blobs(6, seed=3, dtype=torch.float16)
    net, opt = _fp16_net(0)
    for x, y in data[:5]:
        opt.step(closure_for(net, x, y))
    state = copy.deepcopy(opt.state_dict())
    labpal_entry(state)["version"] = 2
    for name in ("loss_scale", "scale_good", "norm_mean"):
        del labpal_entry(state)["line"][name]
    for entry in state["state"].values():
        del entry["master"]
    net2, opt2 = _fp16_net(1)
    net2.load_state_dict(net.state_dict())
    opt2.load_state_dict(state)
    assert opt2.line.loss_scale.item() == 2.0 ** 16 and opt2.line.scale_good.item() == 0
    flat = opt2.flats[0]
    assert torch.equal(flat.param, flat.low.float())  # the model's fp16 values, exactly
    opt2.step(closure_for(net2, *data[5]))  # and it trains on
    # a version-3 state without them is damaged
    labpal_entry(state)["version"] = 3
    with pytest.raises(ValueError, match=re.escape("['line']['norm_mean'] is missing")):
        _fp16_net(2)[1].load_state_dict(state)
