"""The robust line measurement (line_fit="robust", resolve_positions) against the exact line.

Oracle: the line ℓ(s) = L(θ₀ − s·d/‖d‖) over the same batches, computed in fp64 from θ₀ and d
as the optimizer held them (these models are exactly quadratic along a line, so three fp64
points give a, b, c). The refusal rules: a descending line without curvature takes
max_step_size; measurements that keep failing warn once and fall back to the safe step.
"""
import copy
import math
import warnings

import pytest
import torch

from labpal_fast import LABPAL


class Spy:
    """The optimizer's backend, recording the direction the line's first move goes along."""

    def __init__(self, opt):
        self.inner, self.seen = opt.ops, None
        opt.ops = self

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def move(self, flats, coef, run=None):
        if self.seen is None:
            self.seen = [t.clone() for f in flats for t in f.slices(f.direction)]
        return self.inner.move(flats, coef) if run is None else self.inner.move(flats, coef, run=run)


def exact_line(model, batches, origin, direction):
    """(a, b, c) of the mean loss over `batches` along −d/‖d‖ from θ₀, in fp64."""
    ref = copy.deepcopy(model).double()
    d = [t.double() for t in direction]
    norm = math.sqrt(sum(float(x.square().sum()) for x in d))

    def at(s):
        with torch.no_grad():
            for p, o, dd in zip(ref.parameters(), origin, d):
                p.copy_(o.double() - s * dd / norm)
            return sum(float(ref(*[t.double() for t in b])) for b in batches) / len(batches)

    h = 0.1
    l0, l1, l2 = at(0.0), at(h), at(2 * h)
    a = (l2 - 2 * l1 + l0) / (2 * h * h)
    return a, (l1 - l0) / h - a * h, l0


class LeastSquares(torch.nn.Module):
    def __init__(self, dim, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(dim, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(1, dim, generator=g) / math.sqrt(dim))

    def forward(self, x, y):
        out = self.lin(x.to(self.lin.weight.dtype))
        return (out.float().squeeze(1) - y.float()).square().mean()


def ls_batches(dim, seed, count=10, n=256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=g) / math.sqrt(dim)
    out = []
    for _ in range(count):
        x = torch.randn(n, dim, generator=g)
        out.append((x, x @ w + 0.3 * torch.randn(n, generator=g)))
    return out


def one_measurement(model, batches, autocast=False, **hyper):
    """The first measurement (k·m = len(batches) closures): its record and the exact line."""
    origin = [p.detach().clone() for p in model.parameters()]
    opt = LABPAL(model.parameters(), **hyper)
    spy = Spy(opt)
    for b in batches:
        def closure(b=b):
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(*b)
            return model(*b)
        opt.step(closure)
    assert opt.updates == 1
    record = opt.measurements()[0]
    return record, exact_line(model, batches, origin, spy.seen)


def test_fp32_at_10m_parameters_of_scale_1_within_1_percent():
    """½‖θ − t‖², θ ~ N(0, 1) in fp32 (10M), t = θ + offset with ‖offset‖ = 0.2: the exact line
    along d̂ has a = 0.5, b = −0.2. The paper's smallest position moves each coordinate by less
    than an ulp here (tools/line_accuracy.py shows the paper's fit)."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(10_000_000, generator=g)
    offset = torch.randn(10_000_000, generator=g, dtype=torch.float64)
    target = (theta.double() + 0.2 * offset / offset.norm()).float()
    param = torch.nn.Parameter(theta.clone())
    opt = LABPAL([param], backend="eager")
    spy = Spy(opt)
    for _ in range(10):
        opt.step(lambda: 0.5 * (param - target).square().sum())
    rec = opt.measurements()[0]
    d = spy.seen[0].double()
    u = d / d.norm()
    a, b = 0.5 * float(u @ u), -float((theta.double() - target.double()) @ u)
    assert b == pytest.approx(-0.2, rel=0.01), seed
    assert rec["valid"], (rec["reason"], seed)
    assert rec["a"] == pytest.approx(a, rel=0.01), seed
    assert rec["b"] == pytest.approx(b, rel=0.01), seed


@pytest.mark.parametrize("backend", ["eager", "ext", "triton"])
def test_bf16_parameters_within_5_percent(backend):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model = LeastSquares(64, seed).to(torch.bfloat16)
    batches = ls_batches(64, seed + 1)
    rec, (a, b, _) = one_measurement(model, batches, backend=backend)
    assert rec["valid"], (rec["reason"], seed)
    assert rec["a"] == pytest.approx(a, rel=0.05), seed
    assert rec["b"] == pytest.approx(b, rel=0.05), seed


@pytest.mark.parametrize("backend", ["eager", "ext", "triton"])
def test_bf16_autocast_within_5_percent(backend):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model = LeastSquares(64, seed)
    batches = ls_batches(64, seed + 1)
    rec, (a, b, _) = one_measurement(model, batches, autocast=True, backend=backend)
    assert rec["valid"], (rec["reason"], seed)
    assert rec["a"] == pytest.approx(a, rel=0.05), seed
    assert rec["b"] == pytest.approx(b, rel=0.05), seed


class Linear(torch.nn.Module):
    """⟨w, θ⟩ + κ/2·‖θ − θ₀‖² + 3: a descending line, flat (κ = 0) or concave (κ < 0)."""

    def __init__(self, n, seed, kappa):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(n, generator=g, dtype=torch.float64)
        self.theta = torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
        self.theta0 = self.theta.detach().clone()
        self.kappa = kappa

    def forward(self):
        return self.w @ self.theta + 0.5 * self.kappa * (self.theta - self.theta0).square().sum() + 3


@pytest.mark.parametrize("kappa", [0.0, -0.5])
@pytest.mark.parametrize("backend", ["eager", "ext", "triton"])
def test_a_line_without_curvature_takes_max_step_size(backend, kappa):
    model = Linear(50, int(torch.randint(0, 2**31 - 1, ())), kappa)
    opt = LABPAL(model.parameters(), backend=backend, approximation_batches=2,
                 max_step_size=0.3, update_step_adaptation=2.0)
    for _ in range(2):
        opt.step(model)
    rec = opt.measurements()[0]
    assert rec["valid"] and rec["reason"] is None
    assert rec["a"] == pytest.approx(kappa / 2, abs=1e-6)
    # no curvature: s_min = max_step_size (a rounding-size a > 0 puts it beyond, clamped)
    assert min(rec["s_min"], 0.3) == pytest.approx(0.3) and rec["s_upd"] == pytest.approx(0.6)
    # the update: 2·0.3 along −d/‖d‖, d = w (the gradient at θ₀)
    expected = model.theta0 - 0.6 * model.w / model.w.norm()
    torch.testing.assert_close(model.theta.detach(), expected, rtol=1e-9, atol=1e-12)
    if kappa < 0:  # the paper's fit refuses a concave line and has no rate
        paper_model = Linear(50, 1, kappa)
        paper = LABPAL(paper_model.parameters(), backend=backend, approximation_batches=2,
                       line_fit="paper")
        for _ in range(2):
            paper.step(paper_model)
        assert paper.measurements()[0]["reason"] == "fit invalid: curvature a <= 0"
        assert paper.updates == 0


def test_measurements_that_keep_failing_warn_once_and_fall_back_to_the_safe_step():
    """A closure returning its loss × 1e6 (as a scaled loss would): ‖d‖ outside
    direction_norm_range, every measurement abandoned. After 3 the optimizer warns once, naming
    the cause and the fix, and trains on with s_upd = min(largest measured position, 0.5)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = LeastSquares(8, seed=3)
    batches = ls_batches(8, seed=4, count=40, n=32)
    opt = LABPAL(model.parameters(), approximation_batches=2, reuse_updates=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches[:3]:  # each call: a measurement abandoned at its direction
            opt.step(lambda x=x, y=y: 1e6 * model(x, y))
        assert [r["reason"] for r in opt.measurements()] == \
            ["abandoned: direction norm outside direction_norm_range or not finite"] * 3
        assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
        text = str(caught[0].message)
        assert "3 measurements in a row" in text and "direction_norm_range" in text
        assert "unscaled loss" in text
        safe = min(float(opt.line.at.max()), 0.5)
        assert float(opt.line.s_upd) == pytest.approx(safe, rel=1e-12) and safe > 0
        before = [p.detach().clone() for p in model.parameters()]
        for x, y in batches[3:]:  # training (and measurements still failing: no new warning)
            opt.step(lambda x=x, y=y: 1e6 * model(x, y))
        assert len(caught) == 1
    assert opt.updates > 5
    assert not all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    # each update is a step of the safe length along −d/‖d‖
    assert float(opt.line.s_upd) == pytest.approx(safe, rel=1e-12)


def test_the_paper_fit_measures_again_without_falling_back():
    model = LeastSquares(8, seed=3)
    batches = ls_batches(8, seed=4, count=8, n=32)
    opt = LABPAL(model.parameters(), approximation_batches=2, line_fit="paper")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning
        for x, y in batches:
            opt.step(lambda x=x, y=y: 1e6 * model(x, y))
    assert opt.updates == 0 and len(opt.measurements()) == 8


def test_the_resolved_positions_by_hand():
    """lo = max(s₁, K·‖ε·θ‖, min(10⁴·ε_loss·|L₀|/|b|, cap·s₁/s_max)), K = max(4, 10³/√(12n)),
    hi = min(s_max·lo/s₁, max(cap, 2·lo)), cap = max(s_max, min(|L₀|/|b|, max_step_size)), the
    positions between on a log scale (docs/algorithm.md); the positions as given where they
    resolve: K·‖ε·θ‖ ≤ s₁ and |b|·s₁ ≥ 10²·ε_loss·|L₀|."""
    from labpal_fast.hyper import Hyper
    from labpal_fast.line import Line

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    literal = 0
    for trial in range(60):  # the largest position below max_step_size, or above it
        top = 0.01 if trial % 2 else 1.0
        h = Hyper(sample_positions=(0.0, 1e-4, top / 10, top))
        line = Line(h, torch.device("cpu"))
        level = float(torch.rand((), generator=g)) * 10 ** float(torch.randint(-3, 3, (), generator=g))
        slope = float(torch.rand((), generator=g)) * 10 ** float(torch.randint(-4, 2, (), generator=g))
        ulp = float(torch.rand((), generator=g)) * 10 ** float(torch.randint(-9, 0, (), generator=g))
        loss_eps = [0.0, 2.0 ** -23, 2.0 ** -7][int(torch.randint(0, 3, (), generator=g))]
        line.record(0, torch.tensor(level))
        line.record(0, torch.tensor(level))
        norm = 2.0
        line.set_partials(torch.tensor([norm ** 2, slope * norm, 0, 0, 0], dtype=torch.float64))
        count = int(10 ** float(torch.randint(0, 8, (), generator=g)))
        line.set_resolution(torch.tensor(ulp ** 2, dtype=torch.float64), loss_eps, count)
        level32 = float(torch.tensor(level).float())
        cap = max(top, min(level32 / slope, h.max_step_size))
        lo = max(1e-4, max(4, 1e3 / math.sqrt(12 * count)) * ulp,
                 min(1e4 * loss_eps * level32 / slope, cap * 1e-4 / top))
        hi = min(top * lo / 1e-4, max(cap, 2 * lo))
        gamma = math.log(hi / lo) / math.log(top / 1e-4)
        expected = [0.0] + [lo * (s / 1e-4) ** gamma for s in (1e-4, top / 10, top)]
        K = max(4, 1e3 / math.sqrt(12 * count))
        if K * ulp <= 1e-4 and slope * 1e-4 >= 1e2 * loss_eps * level32:  # they resolve
            expected, lo = [0.0, 1e-4, top / 10, top], 1e-4
            literal += 1
        torch.testing.assert_close(line.at, torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-9, atol=0)
        assert float(line.resolve) == pytest.approx(lo / 1e-4, rel=1e-12)
    assert 0 < literal < 60  # both outcomes were drawn


def _mlp_measurement(dtype, backend, **hyper):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=g)))
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4)).to(dtype)
    batches = [(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g))
               for _ in range(10)]
    opt = LABPAL(model.parameters(), backend=backend, **hyper)
    for x, y in batches:
        opt.step(lambda x=x, y=y: torch.nn.functional.cross_entropy(
            model(x.to(dtype)).float(), y))
    return opt.measurements()[0]


@pytest.mark.parametrize("backend", ["eager", "ext", "triton"])
def test_a_small_fp32_model_keeps_the_papers_positions(backend):
    """Its positions resolve (a coordinate moves by far more than its ulps at 1.77e-4, and the
    loss changes by far more than its rounding): the default measures where the paper does,
    with the fit of the literal positions; in bf16 the same model's positions move."""
    seed = torch.initial_seed()
    torch.manual_seed(seed)
    got = _mlp_measurement(torch.float32, backend)
    torch.manual_seed(seed)
    literal = _mlp_measurement(torch.float32, backend, resolve_positions=False)
    assert got["positions"] == [0.0, 1.77e-4, 0.01]
    assert got["valid"] and literal["valid"]
    for key in ("a", "b", "s_min", "s_upd", "eta"):
        assert got[key] == literal[key], key
    moved = _mlp_measurement(torch.bfloat16, backend)
    assert moved["positions"][1] > 10 * 1.77e-4
