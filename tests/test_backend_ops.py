"""Every op of the backend contract, on every fast backend (ext, Triton), against eager.

Fresh random data, sizes 1 .. 278011 (several tiles, a ragged last tile, several weight-decay
segments), fp32 / fp16 / bf16 / fp64 parameters, outputs poisoned with NaN before each run so
that an element an op forgets to write shows; on CUDA too where a GPU is present. Then the
composite steps of the contract (one skip decision for the whole line), and each backend's
line model (`make_line`) against `line.Line`.
"""
from __future__ import annotations

import pytest
import torch

from labpal_fast.hyper import Hyper
from labpal_fast.layout import NPART, Partial
from labpal_fast.line import Line
from labpal_fast.ops import eager

from backend_cases import (FAST, SIZES, compare, devices, dtypes_for, make_flat, need, poison,
                           report, twin)

EAGER = eager.BACKEND
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def cases(sizes=SIZES):
    """(backend, device, dtype, n) for every combination a backend is tested in."""
    out = []
    for backend in FAST:
        for device in devices():
            name = device if isinstance(device, str) else device.values[0]
            marks = () if isinstance(device, str) else device.marks
            for dtype in dtypes_for(backend, name):
                for n in sizes:
                    out.append(pytest.param(backend, name, dtype, n, marks=marks,
                                            id=f"{backend}-{name}-{str(dtype)[6:]}-{n}"))
    return out


def run_both(backend, op, flat, kwargs, poisoned=()):
    ref, out = twin(flat), twin(flat)
    poison(ref, poisoned)
    poison(out, poisoned)
    r_ref = getattr(EAGER, op)(ref, **kwargs)
    r_out = getattr(backend, op)(out, **kwargs)
    return ref, out, r_ref, r_out


@pytest.mark.parametrize("name,device,dtype,n", cases())
@pytest.mark.parametrize("first", [True, False], ids=["first", "more"])
def test_accumulate(name, device, dtype, n, first):
    backend = need(name, device)
    flat = make_flat(n, dtype, seed=n + first, device=device)
    ref, out, _, _ = run_both(backend, "accumulate", flat, {"first": first},
                              poisoned=["grad_sum"] if first else [])
    compare("accumulate", ref, out, name)
    assert (out.grad == 0).all()


FORM_CASES = {
    "m1_plain": dict(summed=False, inv_m=1.0, momentum=0.0, decays=(0.0, 0.0, 0.0),
                     line_terms=False),
    "summed_mom_wd_line": dict(summed=True, inv_m=1 / 3, momentum=0.9, decays=(1e-2, 0.0, 5e-4),
                               line_terms=True),
    "m1_mom_wd_train": dict(summed=False, inv_m=1.0, momentum=0.5, decays=(0.0, 3e-3, 0.1),
                            line_terms=False),
    "summed_line_no_wd": dict(summed=True, inv_m=0.25, momentum=0.0, decays=(0.0, 0.0, 0.0),
                              line_terms=True),
}


def exact_partials(flat, kwargs) -> torch.Tensor:
    """The partial sums in fp64 from the inputs: the reference for every backend (eager's
    fp16 ⟨θ,θ⟩ is an fp16 dot product, not an accurate reference). With a grad_scale c,
    d = β·d + c·ḡ + wd·θ and ⟨ḡ, d⟩ takes the objective's gradient ḡ + wd·θ (unclipped)."""
    gs = flat.grad_sum.double().cpu() if kwargs["summed"] else 0.0
    g = (gs + flat.grad.double().cpu()) * kwargs["inv_m"]
    theta = flat.param.double().cpu()
    wd = torch.zeros_like(theta)
    for (_, s, e), w in zip(flat.segments, kwargs["decays"]):
        wd[s:e] = w
    scale = kwargs.get("grad_scale")
    c = 1.0 if scale is None else float(scale)
    d = c * g + wd * theta + kwargs["momentum"] * flat.direction.double().cpu()
    g = g + wd * theta
    out = torch.zeros(NPART, dtype=torch.float64)
    out[Partial.DD] = d @ d
    if kwargs["line_terms"]:
        out[Partial.GD] = g @ d
        out[Partial.WD_DD] = (wd * d) @ d
        out[Partial.WD_TD] = (wd * theta) @ d
        out[Partial.WD_TT] = (wd * theta) @ theta
    return out


@pytest.mark.parametrize("name,device,dtype,n", cases())
@pytest.mark.parametrize("case", list(FORM_CASES))
def test_form_direction(name, device, dtype, n, case):
    backend = need(name, device)
    kwargs = dict(FORM_CASES[case])
    flat = make_flat(n, dtype, seed=7 * n + len(case), device=device)
    kwargs["decays"] = kwargs["decays"][:len(flat.segments)]
    exact = exact_partials(flat, kwargs)
    poisoned = [] if kwargs["momentum"] else ["direction"]
    ref, out, p_ref, p_out = run_both(backend, "form_direction", flat, kwargs, poisoned)
    # ḡ is scratch in grad_sum: eager leaves it there, the fused backends need not
    compare(f"form_direction[{case}]", ref, out, name, skip=("grad_sum",))
    assert (out.grad == 0).all()
    assert p_out.dtype == torch.float64 and p_out.shape == (NPART,)
    p_out = p_out.cpu()
    for k in Partial:
        err = abs(p_out[k].item() - exact[k].item()) / (abs(exact[k].item()) + 1e-30)
        report(f"form_direction[{case}]", n, dtype, k.name, err, name)
        # fp32 sums of fp32 products (fp64 parameters: fp64 throughout)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert err <= tol or abs(p_out[k].item()) <= 1e-12 * abs(exact[Partial.DD].item()), \
            (k.name, p_out.tolist(), exact.tolist())


# clipping: ḡ scaled by a device scalar (fp64, as Line.clip_scale makes it)
SCALED_CASES = {
    "summed_mom_wd_line": dict(FORM_CASES["summed_mom_wd_line"], grad_scale=0.3719),
    "m1_mom_wd_train": dict(FORM_CASES["m1_mom_wd_train"], grad_scale=0.0625),
    "summed_train": dict(summed=True, inv_m=0.5, momentum=0.0, decays=(0.0, 2e-3, 0.0),
                         line_terms=False, grad_scale=0.81),
    "m1_line_no_wd": dict(FORM_CASES["m1_plain"], line_terms=True, grad_scale=0.5),
}


@pytest.mark.parametrize("name,device,dtype,n", cases())
@pytest.mark.parametrize("case", list(SCALED_CASES))
def test_form_direction_scaled(name, device, dtype, n, case):
    """form_direction with a grad_scale against eager (buffers) and the fp64 partial sums
    (⟨ḡ, d⟩ with the unscaled ḡ)."""
    backend = need(name, device)
    kwargs = dict(SCALED_CASES[case])
    flat = make_flat(n, dtype, seed=5 * n + len(case), device=device)
    kwargs["decays"] = kwargs["decays"][:len(flat.segments)]
    exact = exact_partials(flat, kwargs)
    kwargs["grad_scale"] = torch.tensor(kwargs["grad_scale"], dtype=torch.float64, device=device)
    poisoned = [] if kwargs["momentum"] else ["direction"]
    ref, out, _, p_out = run_both(backend, "form_direction", flat, kwargs, poisoned)
    compare(f"form_direction_scaled[{case}]", ref, out, name, skip=("grad_sum",))
    assert (out.grad == 0).all()
    p_out = p_out.cpu()
    for k in Partial:
        err = abs(p_out[k].item() - exact[k].item()) / (abs(exact[k].item()) + 1e-30)
        report(f"form_direction_scaled[{case}]", n, dtype, k.name, err, name)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert err <= tol or abs(p_out[k].item()) <= 1e-12 * abs(exact[Partial.DD].item()), \
            (k.name, p_out.tolist(), exact.tolist())


@pytest.mark.parametrize("name", ("eager",) + FAST)
@pytest.mark.parametrize("line_terms", [False, True], ids=["train", "line"])
def test_form_direction_with_a_nan_scale_gives_a_direction_that_is_not_finite(name, line_terms):
    """A non-finite ‖ḡ‖ makes the clipping factor NaN: ‖d‖² must not be finite (the skip rule)."""
    backend = need(name, "cpu")
    flat = make_flat(4097, torch.float32, seed=2)
    parts = backend.form_direction(flat, summed=True, inv_m=0.5, momentum=0.9,
                                   decays=(1e-2, 0.0, 0.0), line_terms=line_terms,
                                   grad_scale=torch.tensor(float("nan"), dtype=torch.float64))
    assert not torch.isfinite(parts[Partial.DD]) and not torch.isfinite(flat.direction).any()


def exact_sqnorm(flat, summed, inv_m) -> float:
    gs = flat.grad_sum.double().cpu() if summed else 0.0
    g = (gs + flat.grad.double().cpu()) * inv_m
    return float(g @ g)


@pytest.mark.parametrize("name,device,dtype,n", cases())
@pytest.mark.parametrize("summed", [False, True], ids=["m1", "summed"])
def test_grad_sqnorm(name, device, dtype, n, summed):
    """‖ḡ‖² against eager and the fp64 value; it reads only (every buffer bit for bit)."""
    backend = need(name, device)
    flat = make_flat(n, dtype, seed=19 * n + summed, device=device)
    inv_m = 1 / 3 if summed else 1.0
    before = twin(flat)
    ref, out, r_ref, r_out = run_both(backend, "grad_sqnorm", flat,
                                      {"summed": summed, "inv_m": inv_m})
    assert r_out.dtype == torch.float64 and r_out.shape == () and r_out.device == flat.device
    exact = exact_sqnorm(flat, summed, inv_m)
    for label, value in (("vs_exact", r_out), ("eager_vs_exact", r_ref)):
        err = abs(float(value) - exact) / exact
        report(f"grad_sqnorm[{label}]", n, dtype, "sqnorm", err, name)
        assert err <= (1e-12 if dtype == torch.float64 else 2e-5), (label, float(value), exact)
    for name_ in ("param", "grad", "direction", "grad_sum", "origin"):
        assert torch.equal(getattr(out, name_), getattr(before, name_)), name_


@pytest.mark.parametrize("name,device,dtype,n", cases(sizes=(1023, 278011)))
def test_grad_sqnorm_is_deterministic(name, device, dtype, n):
    backend = need(name, device)
    flat = make_flat(n, dtype, seed=4, device=device)
    a = backend.grad_sqnorm(flat, summed=True, inv_m=0.25).clone()
    b = backend.grad_sqnorm(twin(flat), summed=True, inv_m=0.25).clone()
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,device,dtype,n", cases(sizes=(1023, 278011)))
def test_form_direction_is_deterministic(name, device, dtype, n):
    backend = need(name, device)
    flat = make_flat(n, dtype, seed=3, device=device)
    a, b = twin(flat), twin(flat)
    pa = backend.form_direction(a, **FORM_CASES["summed_mom_wd_line"]).clone()
    pb = backend.form_direction(b, **FORM_CASES["summed_mom_wd_line"]).clone()
    assert torch.equal(pa, pb) and torch.equal(a.direction, b.direction)


@pytest.mark.parametrize("name,device,dtype,n", cases())
@pytest.mark.parametrize("ok", [True, False], ids=["ok", "not_finite"])
def test_train_update(name, device, dtype, n, ok):
    backend = need(name, device)
    flat = make_flat(n, dtype, seed=11 * n + ok, device=device)
    if not ok:
        flat.direction[n // 2] = float("nan")
    coef = torch.tensor(-0.37 if ok else 0.0, dtype=torch.float64, device=device)
    okt = torch.tensor(ok, device=device)
    ref, out, _, _ = run_both(backend, "train_update", flat, {"coef": coef, "ok": okt})
    compare("train_update", ref, out, name)
    if not ok:  # a skipped update: θ bit for bit, d cleared
        assert (out.direction == 0).all() and torch.equal(out.param, flat.param)


@pytest.mark.parametrize("name,device,dtype,n", cases())
def test_line_move(name, device, dtype, n):
    backend = need(name, device)
    flat = make_flat(n, dtype, seed=13 * n, device=device)
    coef = torch.tensor(-0.0123, dtype=torch.float64, device=device)
    ref, out, _, _ = run_both(backend, "line_move", flat, {"coef": coef}, poisoned=["param"])
    compare("line_move", ref, out, name)


@pytest.mark.parametrize("name,device,dtype,n", cases(sizes=(4097,)))
@pytest.mark.parametrize("op,dest", [("save_origin", "origin"), ("restore_origin", "param"),
                                     ("save_direction", "origin"),
                                     ("restore_direction", "direction"),
                                     ("clear_direction", "direction"), ("zero_grad", "grad")])
def test_copies(name, device, dtype, n, op, dest):
    backend = need(name, device)
    flat = make_flat(n, dtype, seed=17 * n + len(op), device=device)
    ref, out, _, _ = run_both(backend, op, flat, {}, poisoned=[dest])
    compare(op, ref, out, name)


# -- the composite steps -------------------------------------------------------------------
BACKENDS = ("eager",) + FAST


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("mode", ["SGD", "NSGD"])
@pytest.mark.parametrize("other", [torch.float64, torch.float16], ids=["fp64", "fp16"])
@pytest.mark.parametrize("where", [0, 1], ids=["in_fp32", "in_other"])
@pytest.mark.parametrize("clip", [None, 0.5], ids=["no_clip", "clip"])
def test_update_skips_the_whole_line_bit_for_bit(name, mode, other, where, clip):
    """A non-finite gradient in one flat only (an fp32 flat and an fp64 or fp16 one; Triton
    fuses the update when every flat is on its kernels): no parameter of any flat moves (bit
    for bit), every direction is cleared, the skip is counted once; with clipping, its
    non-finite norm leads to the same skip."""
    backend = need(name, "cpu")
    flats = [make_flat(4097, torch.float32, seed=1), make_flat(1023, other, seed=2)]
    bad = flats[where]
    bad.grad[bad.numel // 3] = float("inf")
    before = [f.param.clone() for f in flats]
    line = backend.make_line(Hyper(mode=mode, max_grad_norm=clip, momentum=0.9),
                             torch.device("cpu"))
    line.eta.fill_(0.05)
    line.s_upd.fill_(0.1)
    backend.update(flats, [[0.01, 0.0, 1e-3], [0.0, 0.0, 0.0]], line, m=1)
    for f, b in zip(flats, before):
        assert torch.equal(f.param, b), f"{f.dtype} flat moved"
        assert (f.direction == 0).all()
    assert int(line.skipped_updates) == 1


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("mode,rate,norm_mean", [("SGD", "paper", 0.0), ("SGD", "robust", 0.0),
                                                 ("SGD", "robust", 7.0), ("SGD", "robust", 1e-3),
                                                 ("NSGD", "robust", 0.0)])
def test_update_matches_eager(name, mode, rate, norm_mean):
    """The TRAINING update across an fp32 and an fp16 flat (m = 2, momentum, weight decay);
    robust SGD with n̄ unknown (0), above ‖d‖ and far below it (the step cap decides)."""
    backend = need(name, "cpu")
    flats = [make_flat(4097, torch.float32, seed=3), make_flat(1023, torch.float16, seed=4)]
    refs, outs = [twin(f) for f in flats], [twin(f) for f in flats]
    decays = [[0.01, 0.0, 1e-3], [0.0, 0.02, 0.0]]
    lines = []
    for b, fl in ((EAGER, refs), (backend, outs)):
        line = b.make_line(Hyper(mode=mode, sgd_rate=rate, momentum=0.9), torch.device("cpu"))
        line.eta.fill_(0.05)
        line.s_upd.fill_(0.1)
        line.norm_mean.fill_(norm_mean)
        b.update(fl, decays, line, m=2)
        lines.append(line)
    for r, o in zip(refs, outs):
        compare(f"update[{mode}, {rate}]", r, o, name, skip=("grad_sum",))
    torch.testing.assert_close(lines[1].lr, lines[0].lr, rtol=1e-6, atol=0)
    torch.testing.assert_close(lines[1].norm_mean, lines[0].norm_mean, rtol=1e-6, atol=0)
    if rate == "robust" and mode == "SGD":  # n̄ took this update's ‖d‖
        assert float(lines[0].norm_mean) != norm_mean


def _clip_flats(other):
    return [make_flat(4097, torch.float32, seed=3), make_flat(1023, other, seed=4)]


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("mode", ["SGD", "NSGD"])
@pytest.mark.parametrize("other", [torch.float16, torch.float64], ids=["fp16", "fp64"])
@pytest.mark.parametrize("max_norm", [0.5, 1e4], ids=["active", "inactive"])
@pytest.mark.parametrize("m", [1, 3])
def test_clipped_update_matches_eager(name, mode, other, max_norm, m):
    """The TRAINING update with clipping across two flats (Triton: fused with an fp16 flat,
    its per-flat ops with an fp64 one): parameters, directions, ‖ḡ‖ and the factor follow
    eager, and ‖ḡ‖ is the fp64 norm of the averaged gradient over both flats."""
    backend = need(name, "cpu")
    flats = _clip_flats(other)
    refs, outs = [twin(f) for f in flats], [twin(f) for f in flats]
    decays = [[0.01, 0.0, 1e-3], [0.0, 0.02, 0.0]]
    exact = sum(exact_sqnorm(f, m > 1, 1.0 / m) for f in flats) ** 0.5
    assert (exact > max_norm) == (max_norm == 0.5)
    lines = []
    for b, fl in ((EAGER, refs), (backend, outs)):
        line = b.make_line(Hyper(mode=mode, max_grad_norm=max_norm, momentum=0.9),
                           torch.device("cpu"))
        line.eta.fill_(0.05)
        line.s_upd.fill_(0.1)
        b.update(fl, decays, line, m=m)
        lines.append(line)
    for r, o in zip(refs, outs):
        # the factor comes from ‖ḡ‖², summed in fp32 over the fp32 flat by every backend
        compare(f"clipped_update[{mode}]", r, o, name, skip=("grad_sum",), tol=2e-6)
    for line in lines:
        torch.testing.assert_close(line.grad_norm, torch.tensor(exact, dtype=torch.float64),
                                   rtol=1e-6, atol=0)
        want = min(1.0, max_norm / (exact + 1e-6))
        torch.testing.assert_close(line.clip_factor, torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-6, atol=0)
    torch.testing.assert_close(lines[1].lr, lines[0].lr, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("other", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_clipped_measurement_direction_matches_eager(name, other):
    """A measurement's direction with clipping (the line terms, ⟨ḡ, d⟩ unclipped) over two
    flats: directions and every partial sum follow eager."""
    backend = need(name, "cpu")
    flats = _clip_flats(other)
    refs, outs = [twin(f) for f in flats], [twin(f) for f in flats]
    decays = [[0.01, 0.0, 1e-3], [0.0, 0.02, 0.0]]
    lines = []
    for b, fl in ((EAGER, refs), (backend, outs)):
        line = b.make_line(Hyper(max_grad_norm=0.25, momentum=0.5), torch.device("cpu"))
        b.direction(fl, decays, line, m=2, line_terms=True)
        lines.append(line)
    for r, o in zip(refs, outs):
        compare("clipped_direction", r, o, name, skip=("grad_sum",), tol=2e-6)
    torch.testing.assert_close(lines[1].partials, lines[0].partials, rtol=2e-5, atol=0)
    torch.testing.assert_close(lines[1].clip, lines[0].clip, rtol=1e-6, atol=0)
    assert float(lines[0].clip_factor) < 1.0


def _samples(lines, g, curvature, slope, noise=1e-3, empty=None):
    """Loss samples of a parabola at the line positions (counts 1..4 per position)."""
    h = lines[0].hyper
    sums, counts = [], []
    for j, s in enumerate(h.line_positions):
        k = 1 + j % 4
        ys = [curvature * s * s + slope * s + 2.0 + noise * float(torch.randn((), generator=g))
              for _ in range(k)]
        sums.append(sum(ys))
        counts.append(float(k))
    if empty is not None:
        counts[empty], sums[empty] = 0.0, 0.0
    for line in lines:
        line.sums.copy_(torch.tensor(sums, dtype=torch.float64))
        line.counts.copy_(torch.tensor(counts, dtype=torch.float64))


def _set_partials(lines, dd, gd, wd=(0.0, 0.0, 0.0)):
    for line in lines:
        line.set_partials(torch.tensor([dd, gd, *wd], dtype=torch.float64))


def _same_state(ref: Line, out: Line, rtol=1e-12):
    for key in Line.STATE:
        a, b = getattr(ref, key), getattr(out, key)
        if a.dtype.is_floating_point:
            torch.testing.assert_close(b, a, rtol=rtol, atol=0, equal_nan=True, msg=key)
        else:
            assert torch.equal(a, b), key


FINISH_CASES = {
    # name: (curvature, slope, empty position, wd partials, previous s_upd, averaged, hist_n)
    "valid": (50.0, -1.0, None, (0.0, 0.0, 0.0), 0.02, False, 0),
    "invalid_keeps_rate": (-5.0, -1.0, None, (0.0, 0.0, 0.0), 0.03, False, 0),
    "no_rate": (30.0, 0.5, None, (0.0, 0.0, 0.0), 0.0, False, 0),
    "no_rate_empty_position": (30.0, -0.5, 1, (0.0, 0.0, 0.0), 0.0, False, 0),
    "averaged_wrap_wd": (400.0, -2.0, None, (0.1, 0.05, 3.0), 0.04, True, 7),
    "averaged_invalid": (20.0, 0.3, None, (0.01, -0.2, 1.0), 0.05, True, 5),
}


@pytest.mark.parametrize("line_fit", ["paper", "robust", "gradient"])
@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("case", list(FINISH_CASES))
def test_finish_matches_eager(name, case, line_fit):
    """The end of a measurement (fit, step rule, move to s_upd) over an fp32, an fp16 and an
    fp64 flat: parameters, line state and record follow eager; with no rate the parameters
    land on θ₀ itself."""
    backend = need(name, "cpu")
    curv, slope, empty, wd, s_prev, averaged, hist_n = FINISH_CASES[case]
    h = Hyper(mode="SGD" if len(case) % 2 else "NSGD", averaging_window=3,
              sample_positions=(0.0, 1.77e-4, 0.01, 0.02), line_fit=line_fit)
    lines = (Line(h, torch.device("cpu")), backend.make_line(h, torch.device("cpu")))
    g = torch.Generator().manual_seed(len(case))
    dd = 2.0 + float(torch.rand((), generator=g))
    # "gradient" takes the slope from ⟨ḡ,d⟩: the case's own (−slope·‖d‖)
    _set_partials(lines, dd, -slope * dd ** 0.5 if line_fit == "gradient" else -1.0, wd)
    _samples(lines, g, curv, slope, noise=1e-6, empty=empty)  # the fit's verdict is the case's
    if line_fit != "paper":  # positions × 3 (resolve_positions): the kernel reads Line.at
        for line in lines:
            line.set_resolution(torch.tensor((3 * 1.77e-4 / 4) ** 2, dtype=torch.float64),
                                0.0, 10**6)
            assert float(line.resolve) == pytest.approx(3.0)
    hist_s, hist_eta = torch.rand(3, generator=g).double() * 0.1, torch.rand(3, generator=g).double()
    for line in lines:
        line.s_upd.fill_(s_prev)
        line.eta.fill_(s_prev * 0.7)
        line.lr.fill_(0.123)
        line.hist_s.copy_(hist_s)
        line.hist_eta.copy_(hist_eta)
        line.hist_n.fill_(hist_n)
    flats = [make_flat(4097, torch.float32, seed=29), make_flat(1023, torch.float16, seed=31),
             make_flat(1023, torch.float64, seed=37)]
    refs, outs = [twin(f) for f in flats], [twin(f) for f in flats]
    for f in refs + outs:
        poison(f, ["param"])
    r_ref = EAGER.finish(refs, lines[0], averaged)
    r_out = backend.finish(outs, lines[1], averaged)
    valid = bool(r_ref["valid"])
    # the robust fits refuse only lines that do not descend: no curvature takes max_step_size
    valid_cases = ("valid", "averaged_wrap_wd") + (() if line_fit == "paper"
                                                    else ("invalid_keeps_rate",))
    assert valid == (case in valid_cases)
    assert set(r_out) == set(r_ref)
    for key in r_ref:
        a, b = r_ref[key], r_out[key]
        if a.dtype == torch.bool:
            assert bool(a) == bool(b), key
        else:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, equal_nan=True, msg=key)
    _same_state(lines[0], lines[1], rtol=1e-9)
    for f_ref, f_out in zip(refs, outs):
        compare(f"finish[{case}]", f_ref, f_out, name)
        if s_prev == 0.0 and not valid:  # no rate: the move lands on θ₀ itself
            assert torch.equal(f_out.param, f_out.origin.to(f_out.dtype))


# -- each backend's line model against line.Line -----------------------------------------
RATES = [("SGD", "paper"), ("SGD", "robust"), ("NSGD", "robust")]


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("mode,rate", RATES)
@pytest.mark.parametrize("dd", [4.0, float("nan"), float("inf"), 1e-20])
def test_line_train_coef(name, mode, rate, dd):
    backend = need(name, "cpu")
    h = Hyper(mode=mode, sgd_rate=rate)
    ref, out = Line(h, torch.device("cpu")), backend.make_line(h, torch.device("cpu"))
    for line in (ref, out):
        line.s_upd.fill_(0.3)
        line.eta.fill_(0.07)
        line.lr.fill_(0.5)
    _set_partials((ref, out), dd, 1.0)
    for _ in range(2):
        c_ref, ok_ref = ref.train_coef()
        c_out, ok_out = out.train_coef()
        assert bool(ok_ref) == bool(ok_out)
        torch.testing.assert_close(c_out, c_ref, rtol=1e-15, atol=0)
    _same_state(ref, out)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("mode,rate", RATES)
def test_line_train_coef_sequence(name, mode, rate):
    """Many updates in a row, ‖d‖ random over 8 orders of magnitude with non-finite and zero
    ones among them (n̄ unknown, set, kept, capped steps): coefficient, lr and n̄ agree with
    line.Line to fp64 rounding."""
    backend = need(name, "cpu")
    h = Hyper(mode=mode, sgd_rate=rate)
    ref, out = Line(h, torch.device("cpu")), backend.make_line(h, torch.device("cpu"))
    for line in (ref, out):
        line.s_upd.fill_(0.3)
        line.eta.fill_(0.07)
    g = torch.Generator().manual_seed(5)
    norms = (10 ** (8 * torch.rand(40, generator=g, dtype=torch.float64) - 4)).tolist()
    norms[:3] = [0.0, float("nan"), 0.5]
    norms[20:22] = [float("inf"), 1e-9]
    for norm in norms:
        _set_partials((ref, out), norm * norm, 1.0)
        c_ref, ok_ref = ref.train_coef()
        c_out, ok_out = out.train_coef()
        assert bool(ok_ref) == bool(ok_out)
        torch.testing.assert_close(c_out, c_ref, rtol=1e-14, atol=0)
        _same_state(ref, out, rtol=1e-14)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dd,gd", [(4.0, 1.0), (4.0, -1.0), (0.0, 1.0), (1e-8, 1.0), (1e6, 5.0),
                                   (float("nan"), 1.0), (4.0, float("nan")), (float("inf"), 1.0)])
def test_line_abandon_code(name, dd, gd):
    backend = need(name, "cpu")
    h = Hyper(direction_norm_range=(1e-3, 100.0))
    ref, out = Line(h, torch.device("cpu")), backend.make_line(h, torch.device("cpu"))
    _set_partials((ref, out), dd, gd)
    assert int(out.abandon_code()) == int(ref.abandon_code())


@pytest.mark.parametrize("name", FAST)
def test_line_coefs_and_record(name):
    backend = need(name, "cpu")
    h = Hyper()
    ref, out = Line(h, torch.device("cpu")), backend.make_line(h, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    _set_partials((ref, out), 2.5, 1.0)
    for s in h.line_positions:
        torch.testing.assert_close(out.position_coef(s).clone(), ref.position_coef(s),
                                   rtol=1e-15, atol=0)
    for line in (ref, out):
        line.s_upd.fill_(0.042)
    torch.testing.assert_close(out.target_coef(), ref.target_coef(), rtol=1e-15, atol=0)
    losses = torch.randn(20, generator=g).tolist() + [float("nan"), float("-inf"), 2.0]
    for i, y in enumerate(losses):
        for line in (ref, out):
            line.record(i % 3, torch.tensor(y, dtype=torch.float32 if i % 2 else torch.float16))
    _same_state(ref, out, rtol=0)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("mode", ["SGD", "NSGD"])
@pytest.mark.parametrize("averaged", [False, True], ids=["plain", "averaged"])
def test_line_fit_sequence(name, mode, averaged):
    """Many fits in a row (valid, invalid, empty position, weight decay, window wrap-around):
    the state and every record field agree with line.Line to fp64 rounding."""
    backend = need(name, "cpu")
    h = Hyper(mode=mode, averaging_window=3, sample_positions=(0.0, 1.77e-4, 0.01, 0.02))
    ref, out = Line(h, torch.device("cpu")), backend.make_line(h, torch.device("cpu"))
    g = torch.Generator().manual_seed(4)
    fits = [(50.0, -1.0, None, (0.0, 0.0, 0.0)), (10.0, -2.0, None, (0.1, 0.05, 3.0)),
            (-5.0, -1.0, None, (0.0, 0.0, 0.0)), (30.0, 0.5, None, (0.0, 0.0, 0.0)),
            (20.0, -0.1, 2, (0.0, 0.0, 0.0)), (80.0, -3.0, None, (0.01, -0.2, 1.0)),
            (5.0, -0.01, None, (0.0, 0.0, 0.0)), (400.0, -4.0, None, (0.0, 0.0, 0.0))]
    for i, (curv, slope, empty, wd) in enumerate(fits):
        _set_partials((ref, out), 4.0 + i, -1.0, wd)
        _samples((ref, out), g, curv, slope, empty=empty)
        r_ref, r_out = ref.fit(averaged), out.fit(averaged)
        assert set(r_out) == set(r_ref)
        for key in r_ref:
            a, b = r_ref[key], r_out[key]
            if a.dtype == torch.bool:
                assert bool(a) == bool(b), (i, key)
            else:
                torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, equal_nan=True,
                                           msg=f"fit {i}: {key}")
        _same_state(ref, out, rtol=1e-9)
    assert int(out.hist_n) == int(ref.hist_n)
