"""How accurately one LABPAL measurement fits the line, against the exact line in fp64.

For each case (a model, its dtype or autocast, its batches) and each fit variant, one
measurement is taken (k·m = 10 closures, m = 1) and its fitted a and b are compared with the
exact line ℓ(s) = L(θ₀ − s·d/‖d‖) over the same 10 batches, evaluated in fp64 at θ₀ and d as
the optimizer holds them (a quadratic in s for these models, so three fp64 points give it
exactly). Prints a Markdown table (docs/paper_and_quality.md, "What differs from the paper").

    PYTHONPATH=$PWD python tools/line_accuracy.py            # all cases, a minute or two
    PYTHONPATH=$PWD python tools/line_accuracy.py --quick    # 1M instead of 10M parameters
    PYTHONPATH=$PWD python tools/line_accuracy.py --summary  # the page's table (make check-figures)
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from labpal_fast import LABPAL  # noqa: E402

VARIANTS = {  # label: hyper-parameters
    "paper": dict(line_fit="paper"),
    "paper + resolve": dict(line_fit="paper", resolve_positions=True),
    "gradient slope": dict(line_fit="gradient"),
    "robust literal positions": dict(line_fit="robust", resolve_positions=False),
    "robust (default)": dict(),
}


class Quadratic(torch.nn.Module):
    """½‖θ − t‖² with θ of scale 1 and t = θ + offset (‖offset‖ = 0.2)."""

    def __init__(self, n: int, gen: torch.Generator):
        super().__init__()
        theta = torch.randn(n, generator=gen, dtype=torch.float64)
        offset = torch.randn(n, generator=gen, dtype=torch.float64)
        self.theta = torch.nn.Parameter(theta.float())
        self.register_buffer("target", (theta + 0.2 * offset / offset.norm()).float())

    def forward(self, _batch=None):
        return 0.5 * (self.theta - self.target.to(self.theta.dtype)).square().sum()


class LeastSquares(torch.nn.Module):
    """mean (X·w − y)² on its batch (one linear layer, no bias)."""

    def __init__(self, dim: int, gen: torch.Generator):
        super().__init__()
        self.lin = torch.nn.Linear(dim, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(1, dim, generator=gen) / math.sqrt(dim))

    def forward(self, batch):
        x, y = batch
        out = self.lin(x.to(self.lin.weight.dtype))
        return (out.float().squeeze(1) - y.float()).square().mean()


def ls_batches(dim: int, n: int, count: int, gen: torch.Generator, same: bool):
    w = torch.randn(dim, generator=gen) / math.sqrt(dim)
    out = []
    for _ in range(count):
        x = torch.randn(n, dim, generator=gen)
        out.append((x, x @ w + 0.3 * torch.randn(n, generator=gen)))
    return [out[0]] * count if same else out


def exact_line(model: torch.nn.Module, batches, origin, direction):
    """(a, b, c) of the line over `batches` in fp64, from three points (exact for quadratics)."""
    ref = _fp64_copy(model)
    params = [p for p in ref.parameters()]
    d = [t.double() for t in direction]
    norm = math.sqrt(sum(float(x.square().sum()) for x in d))

    def loss(s):
        with torch.no_grad():
            for p, o, dd in zip(params, origin, d):
                p.copy_(o.double() - s * dd / norm)
            total = sum(float(ref(_fp64_batch(b))) for b in batches)
        return total / len(batches)

    h = 0.1
    l0, l1, l2 = loss(0.0), loss(h), loss(2 * h)
    a = (l2 - 2 * l1 + l0) / (2 * h * h)
    b = (l1 - l0) / h - a * h
    return a, b, l0


def _fp64_copy(model):
    import copy
    ref = copy.deepcopy(model).double()
    return ref


def _fp64_batch(b):
    if b is None:
        return None
    return tuple(t.double() for t in b)


def measure(make_model, batches, hyper: dict, *, dtype=None, autocast=False):
    """One measurement: (fitted a, b, exact a, b, valid, reason, positions)."""
    model = make_model()
    if dtype is not None:
        model = model.to(dtype)
    origin = [p.detach().clone() for p in model.parameters()]
    opt = LABPAL(model.parameters(), backend="eager", **hyper)
    seen = []  # the direction, as the first move of the line uses it
    move = opt.ops.move

    class Spy:
        def __getattr__(self, name):
            return getattr(spy_of, name)

        def move(self, flats, coef, run=None):
            if not seen:
                seen.extend(t.clone() for f in flats for t in f.slices(f.direction))
            return move(flats, coef) if run is None else move(flats, coef, run=run)
    spy_of = opt.ops
    opt.ops = Spy()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else \
        contextlib.nullcontext
    for b in batches:
        def closure(b=b):
            with ctx():
                return model(b)
        opt.step(closure)
    rec = opt.measurements()[0]
    a, b, _ = exact_line(model, batches, origin, seen)
    return rec, a, b


# --summary: the page's table, one column per fit (its header there)
SUMMARY = {"paper": "paper", "paper + resolve": "paper fit + resolved positions",
           "gradient slope": '`"gradient"` slope', "robust (default)": "robust (default)"}


def rel(x, ref):
    return abs(x - ref) / abs(ref) if math.isfinite(x) else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1M parameters instead of 10M")
    ap.add_argument("--ulps", type=float, default=None,
                    help="resolve_positions' RESOLVE_ULPS (line.py) to try instead of its value")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated labels of the fits to compare")
    ap.add_argument("--summary", action="store_true",
                    help="the table of docs/paper_and_quality.md: the fits of SUMMARY, a column "
                         "each")
    args = ap.parse_args()
    if args.summary:
        args.variants = ",".join(SUMMARY)
    if args.ulps is not None:
        from labpal_fast import line
        line.RESOLVE_ULPS = args.ulps
    chosen = {k: VARIANTS[k] for k in args.variants.split(",")}
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    n_quad = 1_000_000 if args.quick else 10_000_000
    gen = torch.Generator().manual_seed(0)
    quad_state = Quadratic(n_quad, gen).state_dict()
    ls_gen = torch.Generator().manual_seed(1)
    ls_state = LeastSquares(64, ls_gen).state_dict()

    def quad():
        m = Quadratic(1, torch.Generator())
        m.theta = torch.nn.Parameter(quad_state["theta"].clone())
        m.target = quad_state["target"].clone()
        return m

    def small_quad():
        g = torch.Generator().manual_seed(2)
        return Quadratic(10_000, g)

    def ls():
        m = LeastSquares(64, torch.Generator())
        m.load_state_dict(ls_state)
        return m

    same = ls_batches(64, 256, 10, torch.Generator().manual_seed(3), same=True)
    mixed = ls_batches(64, 256, 10, torch.Generator().manual_seed(3), same=False)
    cases = [
        (f"fp32 quadratic, {n_quad / 1e6:g}M parameters", quad, [None] * 10, {}),
        ("bf16 parameters, quadratic 10k", small_quad, [None] * 10, dict(dtype=torch.bfloat16)),
        ("bf16 parameters, least squares", ls, same, dict(dtype=torch.bfloat16)),
        ("bf16 autocast, least squares", ls, same, dict(autocast=True)),
        ("fp32 least squares, 10 batches", ls, mixed, {}),
    ]
    results = [(label, [(variant, *measure(make, batches, hyper, **kw))
                        for variant, hyper in chosen.items()])
               for label, make, batches, kw in cases]
    print("\n".join(summary(results) if args.summary else details(results)), flush=True)


def details(results):
    """A row per case and fit: the exact and the fitted a and b, their errors, the verdict."""
    lines = ["| case | fit | a (exact) | a fitted | err a | b (exact) | b fitted | err b | "
             "valid / reason |", "|---|---|---|---|---|---|---|---|---|"]
    for label, fits in results:
        for variant, rec, a, b in fits:
            lines.append(f"| {label} | {variant} | {a:.4g} | {rec['a']:.4g} | "
                         f"{rel(rec['a'], a):.1%} | {b:.4g} | {rec['b']:.4g} | "
                         f"{rel(rec['b'], b):.1%} | "
                         f"{'valid' if rec['valid'] else rec['reason']} |")
    return lines


def summary(results):
    """A row per case, a column per fit: the relative errors of a and b, or the fit refused."""
    lines = ["| case | " + " | ".join(SUMMARY.values()) + " |", "|---" * (len(SUMMARY) + 1) + "|"]
    for label, fits in results:
        _, _, a, b = fits[0]
        cells = []
        for _variant, rec, _a, _b in fits:
            if rec["valid"]:
                cells.append(f"{rel(rec['a'], a):.1%}, {rel(rec['b'], b):.1%}")
            else:
                cells.append(f"a = {float(rec['a']):.2g}, b = {float(rec['b']):.2g}: refused")
        lines.append(f"| {label} (exact a = {a:.3g}, b = {b:.3g}) | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
