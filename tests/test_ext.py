"""The compiled extension (csrc/, `labpal_fast._C`): every op against eager, opcheck,
determinism, whole trajectories "ext" vs "eager", the fallback without it, and `nvcc -c`."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

from labpal_fast import LABPAL
from labpal_fast import ops as backends
from labpal_fast.flat import Flat
from labpal_fast.ops import eager, ext

from helpers import batches, closure_for, small_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ext = pytest.mark.skipif(not ext.available, reason=f"extension not built: {ext.why}")

SIZES = (1, 1023, 4097, 300_007)
# the CUDA kernels run wherever a GPU and a CUDA build are there (benchmarks/gpu_check.py)
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))


def _device_or_skip(device: str) -> torch.device:
    if device == "cuda" and not (torch.cuda.is_available() and ext.cuda_built):
        pytest.skip("needs a GPU and labpal_fast._C built with CUDA kernels")
    return torch.device(device)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# ‖out−ref‖/‖ref‖ allowed for buffers in the parameter dtype (eager may round differently:
# fused multiply-add, fp32 vs fp16 intermediates) and in the accumulation dtype (fp32)
PARAM_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-14}
ACC_TOL = 1e-6


def test_extension_is_built_in_ci():
    """CI builds the extension from source: a silent build failure must not pass unnoticed."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("not CI (set CI=true to require the extension)")
    assert ext.available, ext.why


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def assert_rel(out, ref, tol, what):
    err = rel(out, ref)
    if not err <= tol:
        diff = (out.double() - ref.double()).abs()
        i = int(diff.argmax())
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e}; worst at {i}: "
                             f"out {out.reshape(-1)[i].item()!r} ref {ref.reshape(-1)[i].item()!r}")


def make_pair(n: int, dtype: torch.dtype, seed: int, groups=(0, 1), device="cpu"):
    """Two Flats with the same fresh random contents (two parameters in two groups)."""
    g = torch.Generator().manual_seed(seed)
    first = max(n // 3, 1) if n > 1 else 0
    sizes = [s for s in (first, n - first) if s > 0]
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    data = {"param": torch.randn(n, generator=g).to(dtype), "grad": torch.randn(n, generator=g).to(dtype),
            "direction": torch.randn(n, generator=g).to(acc), "grad_sum": torch.randn(n, generator=g).to(acc),
            "origin": torch.randn(n, generator=g).to(acc)}
    flats = []
    for _ in range(2):
        params = [torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device)) for s in sizes]
        flat = Flat(params, list(groups[:len(sizes)]))
        for name, value in data.items():
            buf = flat.need_grad_sum() if name == "grad_sum" else \
                flat.need_origin() if name == "origin" else getattr(flat, name)
            buf.copy_(value)
        flats.append(flat)
    return flats


# ------------------------------------------------------------------------------ ops vs eager
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_matches_eager(n, dtype, device):
    device = _device_or_skip(device)
    for first in (True, False):
        a, b = make_pair(n, dtype, seed=n + int(first), device=device)
        eager.accumulate(a, first)
        ext.accumulate(b, first)
        assert_rel(b.grad_sum, a.grad_sum, ACC_TOL, f"grad_sum first={first}")
        assert torch.count_nonzero(b.grad) == 0


def reference_partials(flat: Flat, gbar: torch.Tensor, decays) -> torch.Tensor:
    """The five partial sums in float64 from d (as stored), ḡ and θ."""
    d, theta = flat.direction.double(), flat.param.double()
    out = [d @ d, gbar @ d, 0.0, 0.0, 0.0]
    for (_, s, e), wd in zip(flat.segments, decays):
        if wd:
            out[2] += wd * (d[s:e] @ d[s:e])
            out[3] += wd * (theta[s:e] @ d[s:e])
            out[4] += wd * (theta[s:e] @ theta[s:e])
    return torch.tensor([float(x) for x in out], dtype=torch.float64, device=flat.device)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("summed,momentum,decays,line_terms", [
    (False, 0.0, (0.0, 0.0), False), (True, 0.9, (0.0, 0.01), False),
    (False, 0.5, (0.1, 0.0), True), (True, 0.9, (0.01, 0.05), True)])
@pytest.mark.parametrize("device", DEVICES)
def test_form_direction_matches_eager(n, dtype, summed, momentum, decays, line_terms, device):
    a, b = make_pair(n, dtype, seed=7 * n + int(summed), device=_device_or_skip(device))
    inv_m = 1.0 / 3.0
    # ḡ in float64, for the partials' reference (eager's fp16 dots are less exact than ext's)
    gbar = a.grad.double()
    if summed:
        gbar = (a.grad_sum.double() + gbar) * inv_m
    for (_, s, e), wd in zip(a.segments, decays):
        gbar[s:e] += wd * a.param[s:e].double()
    kw = dict(summed=summed, inv_m=inv_m, momentum=momentum, decays=list(decays[:len(a.segments)]),
              line_terms=line_terms)
    pa = eager.form_direction(a, **kw)
    pb = ext.form_direction(b, **kw)
    assert pb.dtype == torch.float64 and pb.shape == (5,)
    assert_rel(b.direction, a.direction, ACC_TOL, "direction")
    assert torch.count_nonzero(b.grad) == 0
    assert torch.equal(b.param, a.param)
    ref = reference_partials(b, gbar, kw["decays"])
    if not line_terms:
        ref[1:] = 0
    for k in range(5):
        tol = 1e-5 * (abs(ref[k].item()) + 1e-12 * abs(ref[0].item()))
        assert abs(pb[k].item() - ref[k].item()) <= tol, (k, pb.tolist(), ref.tolist())
    # eager's dd and gd come from fp32 dots of the same vectors: close too
    assert pb[0].item() == pytest.approx(pa[0].item(), rel=1e-4)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("device", DEVICES)
def test_moves_match_eager(n, dtype, device):
    device = _device_or_skip(device)
    for ok_value in (True, False):
        a, b = make_pair(n, dtype, seed=3 * n + int(ok_value), device=device)
        coef = torch.tensor(-0.37 if ok_value else 0.0, dtype=torch.float64)
        ok = torch.tensor(ok_value)
        eager.train_update(a, coef, ok)
        ext.train_update(b, coef, ok)
        assert_rel(b.param, a.param, PARAM_TOL[dtype], f"train_update ok={ok_value} param")
        assert_rel(b.direction, a.direction, ACC_TOL, f"train_update ok={ok_value} direction")
    a, b = make_pair(n, dtype, seed=5 * n, device=device)
    coef = torch.tensor(0.123, dtype=torch.float64)
    eager.line_move(a, coef)
    ext.line_move(b, coef)
    assert_rel(b.param, a.param, PARAM_TOL[dtype], "line_move")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_direction_is_cleared_and_never_reaches_theta(device):
    a, b = make_pair(4097, torch.float32, seed=1, device=_device_or_skip(device))
    b.direction[17] = float("nan")
    b.direction[4000] = float("inf")
    before = b.param.clone()
    ext.train_update(b, torch.tensor(0.0, dtype=torch.float64), torch.tensor(False))
    assert torch.count_nonzero(b.direction) == 0
    assert torch.equal(b.param, before)


@needs_ext
def test_reductions_are_deterministic_whatever_the_threads():
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 1, max(threads, 2)):
            torch.set_num_threads(t)
            _, b = make_pair(300_007, torch.float32, seed=11)
            results.append(ext.form_direction(b, summed=True, inv_m=0.5, momentum=0.9,
                                              decays=[0.01, 0.02], line_terms=True))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])


@needs_ext
def test_float64_parameters():
    a, b = make_pair(4097, torch.float64, seed=2)
    kw = dict(summed=True, inv_m=0.25, momentum=0.9, decays=[0.01, 0.0], line_terms=True)
    pa, pb = eager.form_direction(a, **kw), ext.form_direction(b, **kw)
    torch.testing.assert_close(b.direction, a.direction, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(pb, pa, rtol=1e-12, atol=1e-12)


@needs_ext
def test_bad_arguments_raise_with_a_message():
    a, _ = make_pair(10, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="direction"):
        torch.ops.labpal_fast.form_direction(a.direction[:5], a.grad, None, a.param, [0], [10], [0.0],
                                             1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="segment"):
        torch.ops.labpal_fast.form_direction(a.direction, a.grad, None, a.param, [0], [11], [0.0],
                                             1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="grad_sum"):
        torch.ops.labpal_fast.accumulate(a.grad_sum.double(), a.grad, True)


# ------------------------------------------------------------------------------ opcheck
def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    n = 1000
    r = lambda dtype=torch.float32: torch.randn(n, generator=g).to(dtype)  # noqa: E731
    coef = torch.tensor(-0.5, dtype=torch.float64)
    return [
        ("accumulate", (r(), r(torch.float16), True)),
        ("accumulate", (r(), r(), False)),
        ("form_direction", (r(), r(), None, r(), [0, 400], [400, n], [0.0, 0.1], 1.0, 0.9, True)),
        ("form_direction", (r(), r(torch.bfloat16), r(), r(torch.bfloat16), [0], [n], [0.01], 0.5,
                            0.0, False)),
        ("train_update", (r(), r(), coef, torch.tensor(True))),
        ("train_update", (r(torch.float16), r(), coef, torch.tensor(False))),
        ("line_move", (r(), r(), r(), coef)),
    ]


@needs_ext
@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.labpal_fast, name).default, args)


# ------------------------------------------------------------------------------ trajectories
def run_trajectory(backend, *, mode, momentum, decays, nan_every, dtype, calls=90, m=2, seed=0,
                   device="cpu"):
    """A short run with many measurements. The positions are spread so that the fit is well
    conditioned: with the default (0, 1.77e-4, 0.01), a·s² at the small position is ~1e-9 of
    the loss, so a one-ulp difference in a loss sample moves the fitted curvature by ~1e-7 even
    in float64 (by ~1 in float32), and two correct implementations part ways at a fit. Steps are
    kept small (α = 1, clamp 0.1): with the default 3.6·0.5 this tiny net trains chaotically and
    amplifies one-ulp differences to 1e-3 within 40 updates, whatever the backends."""
    net = small_net(seed, dtype=dtype).to(device)
    positions = (0.0, 0.25, 0.5) if dtype == torch.float32 else (0.0, 0.05, 0.2)
    groups = [{"params": list(net[0].parameters()), "weight_decay": decays[0]},
              {"params": list(net[2].parameters()), "weight_decay": decays[1]}]
    opt = LABPAL(groups, backend=backend, mode=mode, momentum=momentum, approximation_batches=2,
                 batch_size_schedule=((0, m),), noise_factor=1.0, reuse_updates=6,
                 warmup_updates=10, averaging_window=3, direction_norm_range=(0.0, float("inf")),
                 sample_positions=positions, update_step_adaptation=1.0, max_step_size=0.1)
    assert opt.backend == backend
    data = [(x.to(device, dtype), y.to(device)) for x, y in batches(calls, 16, 6, seed=seed + 1)]
    for i, (x, y) in enumerate(data):
        base = closure_for(net, x, y)
        count = {"n": 0}

        def closure(base=base, i=i, count=count):
            loss = base()
            count["n"] += 1
            # some repeats (line samples) are NaN, and now and then a training call too
            if nan_every and (i * 7 + count["n"]) % nan_every == 0:
                loss = loss * float("nan")
            return loss
        opt.step(closure)
    return net, opt


@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("mode,momentum,decays,nan_every", [
    ("NSGD", 0.0, (0.0, 0.0), 0), ("SGD", 0.9, (0.01, 0.0), 5), ("NSGD", 0.5, (0.0, 0.05), 4),
    ("SGD", 0.0, (0.02, 0.03), 0)])
@pytest.mark.parametrize("device", DEVICES)
def test_trajectory_ext_equals_eager(mode, momentum, decays, nan_every, dtype, device):
    kw = dict(mode=mode, momentum=momentum, decays=decays, nan_every=nan_every, dtype=dtype,
              device=_device_or_skip(device))
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-9, 1e-11)
    net_e, opt_e = run_trajectory("eager", **kw)
    net_x, opt_x = run_trajectory("ext", **kw)
    assert opt_x.updates == opt_e.updates and opt_x.updates > 10
    rec_e, rec_x = opt_e.measurements(), opt_x.measurements()
    assert len(rec_x) == len(rec_e) >= 3
    assert [r["valid"] for r in rec_x] == [r["valid"] for r in rec_e]
    assert [r["counts"] for r in rec_x] == [r["counts"] for r in rec_e]
    for p, q in zip(net_x.parameters(), net_e.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
    torch.testing.assert_close(opt_x.line.s_upd, opt_e.line.s_upd, rtol=10 * rtol, atol=0)
    torch.testing.assert_close(opt_x.line.eta, opt_e.line.eta, rtol=10 * rtol, atol=0)
    assert int(opt_x.line.skipped_samples) == int(opt_e.line.skipped_samples)
    if nan_every:
        assert int(opt_x.line.skipped_samples) > 0


# ------------------------------------------------------------------------------ choice, fallback
def test_auto_takes_ext_on_cpu_when_built(monkeypatch):
    monkeypatch.delenv("LABPAL_FAST_BACKEND", raising=False)
    chosen = backends.resolve("auto", [torch.device("cpu")])
    assert chosen.NAME == ("ext" if ext.available else "eager")
    monkeypatch.setenv("LABPAL_FAST_BACKEND", "eager")
    assert backends.resolve("auto", [torch.device("cpu")]).NAME == "eager"


def test_fallback_when_the_extension_is_absent():
    """A fresh interpreter in which `labpal_fast._C` cannot be imported."""
    code = r"""
import sys, torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "labpal_fast._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
from labpal_fast.ops import ext
from labpal_fast import ops, LABPAL
assert not ext.available and "not built" in ext.why and "blocked" in ext.why, ext.why
assert ext.unavailable_reason([torch.device("cpu")]) == ext.why
assert ops.resolve("auto", [torch.device("cpu")]).NAME == "eager"
try:
    ops.resolve("ext", [torch.device("cpu")])
except RuntimeError as exc:
    assert "not built" in str(exc)
else:
    raise AssertionError("an explicit ext request must raise")
net = torch.nn.Linear(3, 2)
opt = LABPAL(net.parameters(), approximation_batches=1)
assert opt.backend == "eager"
x = torch.randn(4, 3)
opt.step(lambda: net(x).pow(2).mean())
print("fallback ok")
"""
    env = dict(os.environ)
    env.pop("LABPAL_FAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout


def test_unavailable_reason_for_devices():
    if not ext.available:
        assert ext.unavailable_reason([torch.device("cpu")]) == ext.why
        return
    assert ext.unavailable_reason([torch.device("cpu")]) is None
    reason = ext.unavailable_reason([torch.device("cuda", 0)])
    assert (reason is None) == ext.cuda_built
    assert ext.unavailable_reason([torch.device("meta")]) is not None


# ------------------------------------------------------------------------------ CUDA sources
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))


def test_cu_files_include_no_torch_headers():
    assert CU_FILES
    for path in CU_FILES + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.h")):
        text = open(path).read()
        for bad in ("<torch/", "<ATen/", "<c10/", '"torch/', '"ATen/', '"c10/'):
            assert bad not in text, f"{path} includes {bad}: keep .cu kernels free of torch headers"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on this machine")
@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_cu_files_compile_with_nvcc(path, tmp_path):
    out = subprocess.run(["nvcc", "-c", path, "-o", str(tmp_path / "x.o")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
