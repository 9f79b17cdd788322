"""Shared by the backend tests: which backends run where, flats with fresh random contents,
and comparisons against eager reported as ‖out−ref‖/‖ref‖ (run pytest with ``-s`` to see
them; with LABPAL_FAST_REPORT_DIR set they are also appended to ``rel_errors.jsonl`` there).

Devices: the CPU always; CUDA where a GPU is present (marked ``cuda``, skipped elsewhere).
Triton on CPU runs in its interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""
from __future__ import annotations

import json
import os
from typing import List, Sequence

import pytest
import torch

from labpal_fast import ops
from labpal_fast.flat import Flat

FAST = ("ext", "triton")
BUFFERS = ("param", "grad", "direction", "grad_sum", "origin")
# ‖out−ref‖/‖ref‖ allowed for a buffer in this dtype: fp32 arithmetic on both sides, and the
# parameter dtype's own rounding (eager may round fp16/bf16 intermediates differently)
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-14}
SIZES = (1, 1023, 4097, 278011)


def devices() -> List:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def dtypes_for(backend: str, device: str) -> List[torch.dtype]:
    """What each backend is tested in: Triton's interpreter has no bf16 (it truncates)."""
    out = [torch.float32, torch.float16, torch.float64]
    if not (backend == "triton" and device == "cpu"):
        out.append(torch.bfloat16)
    return out


def need(backend: str, device: str):
    """The backend object, or a skip naming why it cannot run on `device`."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    reason = ops.why_unavailable(backend, [dev])
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot run on {device}: {reason}")
    return ops.load(backend)


def make_flat(n: int, dtype: torch.dtype, seed: int, device="cpu",
              groups: Sequence[int] = (0, 1, 2)) -> Flat:
    """A Flat of n elements over up to three parameters in `groups`, every buffer random."""
    g = torch.Generator().manual_seed(seed)
    if n == 1:
        sizes = [1]
    else:
        cut = [n // 5, n // 5 + n // 3, n]
        sizes = [cut[0], cut[1] - cut[0], cut[2] - cut[1]][:len(groups)]
        sizes[-1] += n - sum(sizes)
    params = [torch.randn(s, generator=g).to(dtype).to(device).requires_grad_() for s in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype).to(device)
    flat = Flat(params, list(groups[:len(sizes)]))
    flat.direction.copy_(torch.randn(n, generator=g))
    flat.need_grad_sum().copy_(torch.randn(n, generator=g) * 3)
    flat.need_origin().copy_(torch.randn(n, generator=g).to(dtype))
    return flat


def twin(flat: Flat) -> Flat:
    """A copy of flat's buffers (shallow otherwise) for running another backend on."""
    other = Flat.__new__(Flat)
    other.__dict__.update({k: v for k, v in flat.__dict__.items() if not k.startswith("_eager")})
    for name in BUFFERS:
        buf = getattr(flat, name)
        setattr(other, name, None if buf is None else buf.clone())
    return other


def poison(flat: Flat, names) -> None:
    """NaN into buffers an op must write in full, so an element it forgets shows."""
    for name in names:
        getattr(flat, name).fill_(float("nan"))


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def report(op: str, n: int, dtype, field: str, err: float, backend: str = "") -> None:
    line = {"backend": backend, "op": op, "size": n, "dtype": str(dtype).replace("torch.", ""),
            "field": field, "rel_err": err}
    print(f"REL {backend:<7} {op:<24} n={n:<7} {line['dtype']:<8} {field:<10} {err:.3e}")
    where = os.environ.get("LABPAL_FAST_REPORT_DIR")
    if where:
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, "rel_errors.jsonl"), "a") as fh:
            fh.write(json.dumps(line) + "\n")


def compare(op: str, ref: Flat, out: Flat, backend: str = "", skip=(), tol=None) -> None:
    """Every buffer of `out` against `ref` (eager), within the tolerance of its dtype (or
    `tol`, for results that depend on an fp32 sum over other flats)."""
    for name in BUFFERS:
        if name in skip:
            continue
        a, b = getattr(ref, name), getattr(out, name)
        err = rel(b, a)
        report(op, ref.numel, a.dtype, name, err, backend)
        assert torch.isfinite(b).all() == torch.isfinite(a).all(), f"{op}: {name} not written"
        limit = TOL[a.dtype] if tol is None else max(tol, TOL[a.dtype])
        assert err <= limit, f"{backend} {op}: {name} differs from eager by {err:.3e}"
