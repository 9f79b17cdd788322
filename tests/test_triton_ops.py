"""Every Triton kernel against the eager op (the ground truth), on fresh random data.

Sizes 1, 1023, 4097 and 278011 (several tiles, a ragged last tile, several weight-decay
segments), fp32 and fp16 parameters. Outputs are poisoned (NaN) before each run so that an
element a kernel forgets to write shows. Errors are reported as ‖out−ref‖/‖ref‖ (run with
``-s`` to see them; with LABPAL_FAST_REPORT_DIR set they are also appended to
``triton_rel_errors.jsonl`` there).

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here and in
tests/conftest.py before triton is imported).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
from labpal_fast.flat import Flat  # noqa: E402
from labpal_fast.hyper import Hyper  # noqa: E402
from labpal_fast.line import Line  # noqa: E402
from labpal_fast.ops import eager  # noqa: E402
from labpal_fast.ops import triton as tri  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not tri._INTERPRETED:
    pytest.skip("labpal_fast.ops.triton was imported before TRITON_INTERPRET=1 was set; "
                "its kernels cannot run on CPU tensors in this process", allow_module_level=True)

SIZES = (1, 1023, 4097, 278011)
# bf16 only on a GPU: the interpreter truncates fp32 -> bf16 instead of rounding to nearest
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE.type == "cuda" else ())
# ‖out−ref‖/‖ref‖ allowed: fp32 arithmetic in both; fp16 outputs may differ by one fp16 rounding
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
BUFFERS = ("param", "grad", "direction", "grad_sum", "origin")


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    if den == 0.0:
        return num
    return num / den


def report(op: str, n: int, dtype, field: str, err: float) -> None:
    line = {"op": op, "size": n, "dtype": str(dtype).replace("torch.", ""), "field": field,
            "rel_err": err}
    print(f"REL {op:<22} n={n:<7} {line['dtype']:<8} {field:<10} {err:.3e}")
    where = os.environ.get("LABPAL_FAST_REPORT_DIR")
    if where:
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, "triton_rel_errors.jsonl"), "a") as fh:
            fh.write(json.dumps(line) + "\n")


def make_flat(n: int, dtype: torch.dtype, seed: int) -> Flat:
    """A Flat of n elements over a few parameters in up to 3 groups, every buffer random."""
    g = torch.Generator().manual_seed(seed)
    if n == 1:
        sizes, groups = [1], [0]
    else:
        cut = [n // 5, n // 5 + n // 3, n]
        sizes = [cut[0], cut[1] - cut[0], cut[2] - cut[1]]
        groups = [0, 1, 2]
    params = [torch.randn(s, generator=g).to(dtype).to(DEVICE).requires_grad_() for s in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype).to(DEVICE)
    flat = Flat(params, groups)
    flat.direction.copy_(torch.randn(n, generator=g))
    flat.need_grad_sum().copy_(torch.randn(n, generator=g) * 3)
    flat.need_origin().copy_(torch.randn(n, generator=g).to(dtype))
    return flat


def twin(flat: Flat) -> Flat:
    """A copy of flat's buffers (shallow otherwise) for running the other backend."""
    other = Flat.__new__(Flat)
    other.__dict__.update(flat.__dict__)
    for name in BUFFERS:
        buf = getattr(flat, name)
        setattr(other, name, None if buf is None else buf.clone())
    return other


def poison(flat: Flat, names) -> None:
    for name in names:
        getattr(flat, name).fill_(float("nan"))


def compare(op: str, ref: Flat, out: Flat, dtype, skip=()) -> None:
    n = ref.numel
    for name in BUFFERS:
        if name in skip:
            continue
        a, b = getattr(ref, name), getattr(out, name)
        err = rel(b, a)
        report(op, n, dtype, name, err)
        assert torch.isfinite(b).all() == torch.isfinite(a).all(), f"{op}: {name} not written"
        assert err <= TOL[dtype], f"{op}: {name} differs from eager by {err:.3e}"


def run_both(op, flat, kwargs, poisoned=()):
    ref, out = twin(flat), twin(flat)
    poison(ref, poisoned)
    poison(out, poisoned)
    r_ref = getattr(eager, op)(ref, **kwargs)
    r_out = getattr(tri, op)(out, **kwargs)
    return ref, out, r_ref, r_out


params = pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"][:len(DTYPES)])
sizes = pytest.mark.parametrize("n", SIZES)


@params
@sizes
@pytest.mark.parametrize("first", [True, False], ids=["first", "more"])
def test_accumulate(n, dtype, first):
    flat = make_flat(n, dtype, seed=n + first)
    ref, out, _, _ = run_both("accumulate", flat, {"first": first},
                              poisoned=["grad_sum"] if first else [])
    compare("accumulate", ref, out, dtype)
    assert (out.grad == 0).all()


FORM_CASES = {
    "m1_plain": dict(summed=False, inv_m=1.0, momentum=0.0, decays=(0.0, 0.0, 0.0), line_terms=False),
    "summed_mom_wd_line": dict(summed=True, inv_m=1 / 3, momentum=0.9, decays=(1e-2, 0.0, 5e-4),
                               line_terms=True),
    "m1_mom_wd_train": dict(summed=False, inv_m=1.0, momentum=0.5, decays=(0.0, 3e-3, 0.1),
                            line_terms=False),
    "summed_line_no_wd": dict(summed=True, inv_m=0.25, momentum=0.0, decays=(0.0, 0.0, 0.0),
                              line_terms=True),
}


def _partials_reference(flat: Flat, kwargs) -> torch.Tensor:
    """The five sums in fp64 from the inputs (for the fp16 case, where eager's ⟨θ,θ⟩ is an
    fp16 dot product and therefore not an accurate reference)."""
    gs = flat.grad_sum.double() if kwargs["summed"] else 0.0
    g = (gs + flat.grad.double()) * kwargs["inv_m"]
    theta = flat.param.double()
    wd = torch.zeros_like(theta)
    for (_, s, e), w in zip(flat.segments, kwargs["decays"]):
        wd[s:e] = w
    g = g + wd * theta
    d = g + kwargs["momentum"] * flat.direction.double()
    out = [d @ d, g @ d, (wd * d) @ d, (wd * theta) @ d, (wd * theta) @ theta]
    if not kwargs["line_terms"]:
        out[1:] = [torch.zeros((), dtype=torch.float64, device=d.device)] * 4
    return torch.stack(out)


@params
@sizes
@pytest.mark.parametrize("case", list(FORM_CASES))
def test_form_direction(n, dtype, case):
    kwargs = dict(FORM_CASES[case])
    flat = make_flat(n, dtype, seed=7 * n + len(case))
    kwargs["decays"] = kwargs["decays"][:len(flat.segments)]
    exact = _partials_reference(flat, kwargs)
    poisoned = [] if kwargs["momentum"] else ["direction"]
    ref, out, p_ref, p_out = run_both("form_direction", flat, kwargs, poisoned)
    tri._ws(out).partials.fill_(float("nan"))  # poison the partial rows of the next call too
    compare(f"form_direction[{case}]", ref, out, dtype, skip=("grad_sum",))
    assert (out.grad == 0).all()
    # the returned sums: against eager, and against an fp64 evaluation of the same formula
    p_ref, p_out = p_ref.cpu(), p_out.cpu()
    for k, name in enumerate(("dd", "gd", "wd_dd", "wd_td", "wd_tt")):
        err_eager = rel(p_out[k:k + 1], p_ref[k:k + 1])
        err_exact = rel(p_out[k:k + 1], exact[k:k + 1].cpu())
        report(f"form_direction[{case}]", n, dtype, name, err_exact)
        assert torch.isfinite(p_out[k]), name
        assert err_exact <= 2e-5, f"partial {name}: {err_exact:.3e} from the fp64 value"
        if dtype != torch.float32 and name == "wd_tt":
            continue  # eager's _dot(θ, θ) runs in fp16 (and overflows past 65504): the fp64
            #           value above is the reference for this one
        assert err_eager <= (2e-5 if dtype == torch.float32 else 2e-3), \
            f"partial {name}: {err_eager:.3e} from eager"


@params
@pytest.mark.parametrize("n", (1023, 278011))
def test_form_direction_is_deterministic(n, dtype):
    flat = make_flat(n, dtype, seed=3)
    kwargs = dict(FORM_CASES["summed_mom_wd_line"])
    a, b = twin(flat), twin(flat)
    pa = tri.form_direction(a, **kwargs).clone()
    pb = tri.form_direction(b, **kwargs).clone()
    assert torch.equal(pa, pb) and torch.equal(a.direction, b.direction)


@params
@sizes
@pytest.mark.parametrize("ok", [True, False], ids=["ok", "not_finite"])
def test_train_update(n, dtype, ok):
    flat = make_flat(n, dtype, seed=11 * n + ok)
    coef = torch.tensor(-0.37 if ok else 0.0, dtype=torch.float64, device=DEVICE)
    okt = torch.tensor(ok, device=DEVICE)
    ref, out, _, _ = run_both("train_update", flat, {"coef": coef, "ok": okt})
    compare("train_update", ref, out, dtype)
    if not ok:
        assert (out.direction == 0).all() and torch.equal(out.param, flat.param)


@params
@sizes
def test_line_move(n, dtype):
    flat = make_flat(n, dtype, seed=13 * n)
    coef = torch.tensor(-0.0123, dtype=torch.float64, device=DEVICE)
    ref, out, _, _ = run_both("line_move", flat, {"coef": coef}, poisoned=["param"])
    compare("line_move", ref, out, dtype)


@params
@sizes
@pytest.mark.parametrize("op,dest", [("save_origin", "origin"), ("restore_origin", "param"),
                                     ("save_direction", "origin"),
                                     ("restore_direction", "direction"),
                                     ("clear_direction", "direction"), ("zero_grad", "grad")])
def test_copies(n, dtype, op, dest):
    flat = make_flat(n, dtype, seed=17 * n + len(op))
    ref, out, _, _ = run_both(op, flat, {}, poisoned=[dest])
    compare(op, ref, out, dtype)


# -- the extra fused ops ------------------------------------------------------------------
@params
@sizes
@pytest.mark.parametrize("finite", [True, False], ids=["finite", "nan_grad"])
def test_sgd_step_matches_form_direction_and_update(n, dtype, finite):
    """One-pass SGD (+ its revert) == eager form_direction, Line.train_coef, train_update."""
    flat = make_flat(n, dtype, seed=19 * n + finite)
    if not finite:
        flat.grad[n // 2] = float("nan")
    hyper = Hyper(mode="SGD")
    kwargs = dict(summed=True, inv_m=0.5, momentum=0.9, decays=(1e-2, 0.0, 1e-3)[:len(flat.segments)])
    ref, out = twin(flat), twin(flat)
    l_ref, l_out = Line(hyper, DEVICE), tri.Line(hyper, DEVICE)
    for line in (l_ref, l_out):
        line.eta.fill_(0.05)
    l_ref.set_partials(eager.form_direction(ref, line_terms=False, **kwargs))
    coef, ok = l_ref.train_coef()
    eager.train_update(ref, coef, ok)
    l_out.set_partials(tri.sgd_step(out, eta=l_out.eta, **kwargs))
    _, ok2 = l_out.train_coef()
    tri.sgd_revert(out, l_out.eta, ok2)
    assert bool(ok2) == finite and int(l_out.skipped_updates) == int(l_ref.skipped_updates)
    # on the skip path θ comes back up to one rounding: allow a few ulps there
    compare("sgd_step" if finite else "sgd_step[revert]", ref, out, dtype, skip=("grad_sum",))


@params
@pytest.mark.parametrize("n", (1, 4097, 278011))
@pytest.mark.parametrize("loss", [1.25, float("nan"), float("inf")], ids=["finite", "nan", "inf"])
def test_line_move_record(n, dtype, loss):
    flat = make_flat(n, dtype, seed=23 * n)
    hyper = Hyper()
    coef = torch.tensor(-0.02, dtype=torch.float64, device=DEVICE)
    y = torch.tensor(loss, device=DEVICE)
    ref, out = twin(flat), twin(flat)
    poison(ref, ["param"]), poison(out, ["param"])
    l_ref, l_out = Line(hyper, DEVICE), tri.Line(hyper, DEVICE)
    for line in (l_ref, l_out):
        line.sums.copy_(torch.tensor([3.0, 2.0, 1.0]))
        line.counts.copy_(torch.tensor([2.0, 2.0, 1.0]))
    eager.line_move(ref, coef)
    l_ref.record(2, y)
    tri.line_move_record(out, coef, l_out, 2, y)
    compare("line_move_record", ref, out, dtype)
    for name in ("sums", "counts", "skipped_samples"):
        assert torch.equal(getattr(l_out, name), getattr(l_ref, name)), name


# -- the line model kernels ---------------------------------------------------------------
def _lines(seed: int, **hyper):
    h = Hyper(**hyper)
    ref, out = Line(h, DEVICE), tri.Line(h, DEVICE)
    g = torch.Generator().manual_seed(seed)
    return h, ref, out, g


def _same_state(ref: Line, out: Line, rtol=1e-12):
    for name in Line.STATE:
        a, b = getattr(ref, name), getattr(out, name)
        if a.dtype.is_floating_point:
            torch.testing.assert_close(b, a, rtol=rtol, atol=0, equal_nan=True, msg=name)
        else:
            assert torch.equal(a, b), name


def _set_partials(lines, dd, gd, wd=(0.0, 0.0, 0.0)):
    for line in lines:
        line.set_partials(torch.tensor([dd, gd, *wd], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["SGD", "NSGD"])
@pytest.mark.parametrize("dd", [4.0, float("nan"), float("inf"), 1e-20])
def test_line_train_coef(mode, dd):
    h, ref, out, g = _lines(1, mode=mode)
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


@pytest.mark.parametrize("dd,gd", [(4.0, 1.0), (4.0, -1.0), (0.0, 1.0), (1e-8, 1.0), (1e6, 5.0),
                                   (float("nan"), 1.0), (4.0, float("nan")), (float("inf"), 1.0)])
def test_line_abandon_code(dd, gd):
    _, ref, out, _ = _lines(2, direction_norm_range=(1e-3, 100.0))
    _set_partials((ref, out), dd, gd)
    assert int(out.abandon_code()) == int(ref.abandon_code())


def test_line_coefs_and_record():
    h, ref, out, g = _lines(3)
    _set_partials((ref, out), 2.5, 1.0)
    for s in h.line_positions:
        torch.testing.assert_close(out.position_coef(s).clone(), ref.position_coef(s), rtol=1e-15,
                                   atol=0)
    for line in (ref, out):
        line.s_upd.fill_(0.042)
    torch.testing.assert_close(out.target_coef(), ref.target_coef(), rtol=1e-15, atol=0)
    losses = torch.randn(20, generator=g).tolist() + [float("nan"), float("-inf"), 2.0]
    for i, y in enumerate(losses):
        for line in (ref, out):
            line.record(i % 3, torch.tensor(y, dtype=torch.float32 if i % 2 else torch.float16))
    _same_state(ref, out, rtol=0)


def _samples(lines, g, curvature, slope, noise=1e-3, nan_at=None):
    """Loss samples of a parabola at the line positions (counts 1..4 per position)."""
    h = lines[0].hyper
    sums, counts = [], []
    for j, s in enumerate(h.line_positions):
        k = 1 + j % 4
        ys = [curvature * s * s + slope * s + 2.0 + noise * float(torch.randn((), generator=g))
              for _ in range(k)]
        sums.append(sum(ys))
        counts.append(float(k))
    if nan_at is not None:
        counts[nan_at] = 0.0
        sums[nan_at] = 0.0
    for line in lines:
        line.sums.copy_(torch.tensor(sums, dtype=torch.float64))
        line.counts.copy_(torch.tensor(counts, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["SGD", "NSGD"])
@pytest.mark.parametrize("averaged", [False, True], ids=["plain", "averaged"])
def test_line_fit_sequence(mode, averaged):
    """Many fits in a row (valid, invalid, empty position, weight decay, window wrap-around):
    the state and every record field agree with the eager Line to fp64 rounding."""
    h, ref, out, g = _lines(4, mode=mode, averaging_window=3,
                            sample_positions=(0.0, 1.77e-4, 0.01, 0.02))
    cases = [(50.0, -1.0, None, (0.0, 0.0, 0.0)), (10.0, -2.0, None, (0.1, 0.05, 3.0)),
             (-5.0, -1.0, None, (0.0, 0.0, 0.0)), (30.0, 0.5, None, (0.0, 0.0, 0.0)),
             (20.0, -0.1, 2, (0.0, 0.0, 0.0)), (80.0, -3.0, None, (0.01, -0.2, 1.0)),
             (5.0, -0.01, None, (0.0, 0.0, 0.0)), (400.0, -4.0, None, (0.0, 0.0, 0.0))]
    for i, (curv, slope, nan_at, wd) in enumerate(cases):
        _set_partials((ref, out), 4.0 + i, -1.0, wd)
        _samples((ref, out), g, curv, slope, nan_at=nan_at)
        r_ref = ref.fit(averaged)
        r_out = out.fit(averaged)
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


# -- the fused finish: fit + step rule + move to s_upd, one launch per flat ----------------
FINISH_CASES = {
    # name: (curvature, slope, empty position, wd partials, previous s_upd, averaged, hist_n)
    "valid": (50.0, -1.0, None, (0.0, 0.0, 0.0), 0.02, False, 0),
    "invalid_keeps_rate": (-5.0, -1.0, None, (0.0, 0.0, 0.0), 0.03, False, 0),
    "no_rate": (30.0, 0.5, None, (0.0, 0.0, 0.0), 0.0, False, 0),
    "no_rate_empty_position": (30.0, -0.5, 1, (0.0, 0.0, 0.0), 0.0, False, 0),
    "averaged_wrap_wd": (400.0, -2.0, None, (0.1, 0.05, 3.0), 0.04, True, 7),
    "averaged_invalid": (20.0, 0.3, None, (0.01, -0.2, 1.0), 0.05, True, 5),
}


class _NoLaunch:
    """Stands in for a kernel that must not be launched."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} launched by fit_and_move")


def _finish_state(case: str, seed: int):
    """An eager Line, a Triton Line and a Triton Line for the three-launch path, all in the
    same random state of `case`."""
    curv, slope, empty, wd, s_prev, averaged, hist_n = FINISH_CASES[case]
    h = Hyper(mode="SGD" if seed % 2 else "NSGD", averaging_window=3,
              sample_positions=(0.0, 1.77e-4, 0.01, 0.02))
    lines = (Line(h, DEVICE), tri.Line(h, DEVICE), tri.Line(h, DEVICE))
    g = torch.Generator().manual_seed(seed)
    _set_partials(lines, 2.0 + float(torch.rand((), generator=g)), -1.0, wd)
    _samples(lines, g, curv, slope, nan_at=empty)
    hist_s, hist_eta = torch.rand(3, generator=g).double() * 0.1, torch.rand(3, generator=g).double()
    for line in lines:
        line.s_upd.fill_(s_prev)
        line.eta.fill_(s_prev * 0.7)
        line.lr.fill_(0.123)
        line.hist_s.copy_(hist_s)
        line.hist_eta.copy_(hist_eta)
        line.hist_n.fill_(hist_n)
    return lines, averaged


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", list(FINISH_CASES))
def test_fit_and_move_matches_eager(n, case, monkeypatch):
    """Line.fit_and_move on Triton (one launch per flat + one commit) == eager Line.fit +
    target_coef + line_move, on an fp32 and an fp16 flat: parameters, line state, record."""
    (l_ref, l_out, l_three), averaged = _finish_state(case, seed=n + len(case))
    flats = [make_flat(n, torch.float32, seed=29 * n), make_flat(n, torch.float16, seed=31 * n + 1)]
    refs, outs, threes = ([twin(f) for f in flats] for _ in range(3))
    for f in refs + outs + threes:
        poison(f, ["param"])
    l_out._next.fill_(float("nan"))
    l_out._next_n.fill_(-7)
    # the ground truth: eager fit, eager move
    r_ref = l_ref.fit_and_move(refs, eager, averaged)
    # the three-launch Triton path it replaces
    r_three = l_three.fit(averaged)
    coef = l_three.target_coef()
    for f in threes:
        tri.line_move(f, coef)
    with monkeypatch.context() as mp:
        for name in ("_fit_kernel", "_coef_kernel", "_move_kernel"):
            mp.setattr(tri, name, _NoLaunch(name))
        r_out = l_out.fit_and_move(outs, tri, averaged)
    valid = bool(r_ref["valid"])
    assert valid == (case in ("valid", "averaged_wrap_wd"))
    assert set(r_out) == set(r_ref)
    for key in r_ref:
        a, b = r_ref[key], r_out[key]
        if a.dtype == torch.bool:
            assert bool(a) == bool(b), key
        else:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, equal_nan=True, msg=key)
            assert torch.equal(b, r_three[key]) or torch.isnan(b).all(), key
    _same_state(l_ref, l_out, rtol=1e-9)
    _same_state(l_three, l_out, rtol=0)
    for f_ref, f_out, f_three in zip(refs, outs, threes):
        compare(f"fit_and_move[{case}]", f_ref, f_out, f_ref.dtype)
        assert torch.equal(f_out.param, f_three.param), "differs from the three-launch path"
        if float(l_ref.s_upd) == 0.0:  # no rate: the move lands on θ₀ itself, eager too
            origin = f_out.origin.to(f_out.dtype)
            assert torch.equal(f_out.param, origin) and torch.equal(f_ref.param, origin)
    if averaged and valid:
        assert int(l_out.hist_n) == FINISH_CASES[case][6] + 1


def test_fit_and_move_sequence_and_unfused_flat():
    """Several finishes in a row (window wrap-around) with an fp32, an fp16 and an fp64 flat
    (the last moved by the eager op after the commit): state and parameters follow eager."""
    h, ref, out, g = _lines(6, averaging_window=2, sample_positions=(0.0, 1.77e-4, 0.01))
    flats = [make_flat(4097, torch.float32, seed=1), make_flat(1023, torch.float16, seed=2),
             make_flat(1023, torch.float64, seed=3)]
    refs, outs = [twin(f) for f in flats], [twin(f) for f in flats]
    cases = [(50.0, -1.0), (-5.0, -1.0), (10.0, -2.0), (80.0, -3.0), (30.0, 0.5), (400.0, -4.0)]
    for i, (curv, slope) in enumerate(cases):
        _set_partials((ref, out), 3.0 + i, -1.0, (0.0, 0.01 * i, 0.5))
        _samples((ref, out), g, curv, slope)
        for f in refs + outs:
            poison(f, ["param"])
        r_ref = ref.fit_and_move(refs, eager, averaged=i >= 1)
        r_out = out.fit_and_move(outs, tri, averaged=i >= 1)
        assert bool(r_ref["valid"]) == bool(r_out["valid"])
        for key in ("a", "b", "s_upd", "eta", "s_new"):
            torch.testing.assert_close(r_out[key], r_ref[key], rtol=1e-9, atol=1e-12)
        _same_state(ref, out, rtol=1e-9)
        for f_ref, f_out in zip(refs, outs):
            compare("fit_and_move[seq]", f_ref, f_out, f_ref.dtype if f_ref.dtype in TOL
                    else torch.float32)
    assert int(out.hist_n) == 4


# -- backend choice -------------------------------------------------------------------------
def test_unavailable_reason_cpu(monkeypatch):
    assert tri.unavailable_reason([torch.device("cpu")]) is None if tri._INTERPRETED else True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = tri.unavailable_reason([torch.device("cpu")])
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_import_without_triton_raises_import_error():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, labpal_fast\n"
            "from labpal_fast.ops import why_unavailable, resolve\n"
            "try:\n"
            "    import labpal_fast.ops.triton\n"
            "except ImportError as e:\n"
            "    print('IMPORTERROR', e)\n"
            "print('REASON', why_unavailable('triton', [torch.device('cpu')]))\n"
            "print('AUTO', resolve('auto', [torch.device('cpu')]).NAME)\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "IMPORTERROR" in res.stdout and "install labpal-fast[triton]" in res.stdout
    assert "REASON it cannot be imported" in res.stdout
    assert "AUTO eager" in res.stdout or "AUTO ext" in res.stdout
