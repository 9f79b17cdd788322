"""The op set as Triton kernels: one launch per op per (device, dtype) group.

Three tiers, as elsewhere in this package: private ``@triton.jit`` kernels (``_name_kernel``),
host launchers, and the public ops of ``eager.OPS`` with the same signatures and semantics.
A ``Line`` subclass replaces the line model's small tensor expressions (each several eager
launches) by one single-program kernel each, all in fp64 on the device; its ``fit_and_move``
finishes a measurement (fit, step rule, move to s_upd) in one launch per flat, every program
redoing the tiny fit from the unchanged line state, plus one single-program commit of the new
state (staged by the first launch, so no program ever reads a half-updated state).

Rules kept throughout:
- hyper-parameter *values* (inverse multiplier, momentum, weight decays, step rule constants)
  are runtime arguments or device scalars, never ``tl.constexpr``; the few ``constexpr`` flags
  select code paths (first micro-batch, momentum on/off, weight decay on/off, line terms),
  so there are a handful of compiles, not one per value;
- device scalars (``coef``, ``ok``, ``s_upd``, ``‖d‖²``) are loaded by the kernels: no host reads;
- reductions are deterministic: each program writes its fp32 partial sums to a buffer (one row
  per program, the grid size depends on the buffer size only, not on the GPU), and one more
  single-program kernel sums the rows in a fixed order in fp64. No atomics anywhere.
- fp16 / bf16 parameters are read and written in their dtype, all arithmetic is fp32, the
  running sums / direction / origin are fp32 (``Flat.acc_dtype``).

Weight decay differs per segment (parameter group). A launch takes up to ``_SEGS`` segments as
runtime scalars (their ends and decays) and picks each element's decay by comparing its offset
with the ends: no tables, no pointer chasing, one launch for up to 4 groups per (device, dtype),
then one more launch per further 4 groups (their partial rows go to the same buffer).

float64 parameters keep the eager ops (Triton passes Python floats as fp32, which would change
the arithmetic of an fp64 buffer); they are rare on GPUs and the eager path is exact there.

On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (set before this module is
imported): that is how CI tests them. Without triton installed, importing this module raises
ImportError, and the package keeps working on the eager backend.
"""
from __future__ import annotations

import os
import weakref
from typing import Dict, Optional, Sequence, Tuple

import torch

try:
    import triton
    import triton.language as tl
except Exception as exc:  # pragma: no cover - exercised only without triton
    raise ImportError(f"the Triton backend needs the 'triton' package ({exc}); "
                      "install labpal-fast[triton]") from exc

from .. import line as _line
from ..flat import Flat
from ..hyper import Hyper
from . import eager

NAME = "triton"

# decided when the kernels below are decorated: interpreted kernels run on CPU tensors
_INTERPRETED = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else \
    os.environ.get("TRITON_INTERPRET", "0") == "1"

BLOCK = 4096          # elements per tile of the streaming kernels
NUM_WARPS = 8
MAX_PROGRAMS = 1024   # reduction kernels: fixed cap on the grid (so results do not depend on the GPU)
REDUCE_BLOCK = 1024   # rows summed per step by the partial-sum reducer
_SEGS = 4             # weight-decay segments handled by one launch
_NPART = 5            # partial sums: ‖d‖², ⟨ḡ,d⟩, Σwd‖d‖², Σwd⟨θ,d⟩, Σwd‖θ‖²
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason(devices) -> Optional[str]:
    """None when the kernels can run on these devices, else why not."""
    devices = list(devices)
    for dev in devices:
        dev = torch.device(dev)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available"
        elif dev.type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
            if not _INTERPRETED:
                return ("Triton runs on CPU tensors only under TRITON_INTERPRET=1, and "
                        "labpal_fast.ops.triton was imported before it was set")
        else:
            return f"Triton does not run on {dev.type} tensors"
    return None


# ====================================================================== kernels
@triton.jit
def _accumulate_kernel(grad_ptr, sum_ptr, n, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """sum (+)= grad (fp32); grad = 0."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FIRST:
        s = g
    else:
        s = tl.load(sum_ptr + offs, mask=mask, other=0.0) + g
    tl.store(sum_ptr + offs, s, mask=mask)
    tl.store(grad_ptr + offs, tl.zeros_like(g).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _direction_kernel(grad_ptr, sum_ptr, d_ptr, theta_ptr, part_ptr, eta_ptr,
                      lo, hi, part_stride, part_base,
                      inv_m, beta, e0, e1, e2, wd0, wd1, wd2, wd3,
                      SUMMED: tl.constexpr, HAS_MOM: tl.constexpr, HAS_WD: tl.constexpr,
                      LINE_TERMS: tl.constexpr, APPLY: tl.constexpr, BLOCK: tl.constexpr):
    """ḡ = (sum + grad)·inv_m + wd·θ;  d = β·d + ḡ;  grad = 0; per-program partial sums.

    With APPLY (the one-pass SGD update) also θ ← θ − η·d where d is finite (η from eta_ptr).
    Programs stride over the tiles of [lo, hi); program p writes its sums to
    part[k·part_stride + part_base + p] for k = 0..4.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc_dd = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gd = tl.zeros([BLOCK], dtype=tl.float32)
    acc_wdd = tl.zeros([BLOCK], dtype=tl.float32)
    acc_wtd = tl.zeros([BLOCK], dtype=tl.float32)
    acc_wtt = tl.zeros([BLOCK], dtype=tl.float32)
    if APPLY:
        neg_eta = -tl.load(eta_ptr).to(tl.float32)
    for start in range(lo + pid * BLOCK, hi, nprog * BLOCK):  # int64 when hi needs it
        offs = start + tl.arange(0, BLOCK)
        mask = offs < hi
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        if SUMMED:
            g = (tl.load(sum_ptr + offs, mask=mask, other=0.0) + grad.to(tl.float32)) * inv_m
        else:
            g = grad.to(tl.float32)
        if HAS_WD or APPLY:
            theta = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_WD:
            wd = tl.where(offs < e0, wd0, tl.where(offs < e1, wd1, tl.where(offs < e2, wd2, wd3)))
            g = tl.where(wd != 0.0, g + wd * theta, g)
        if HAS_MOM:
            d = g + beta * tl.load(d_ptr + offs, mask=mask, other=0.0)
        else:
            d = g
        tl.store(d_ptr + offs, d, mask=mask)
        tl.store(grad_ptr + offs, tl.zeros_like(grad), mask=mask)
        if APPLY:
            finite = (d * 0.0) == 0.0
            new = tl.where(finite, theta + neg_eta * d, theta)
            tl.store(theta_ptr + offs, new.to(theta_ptr.dtype.element_ty), mask=mask)
        acc_dd += d * d
        if LINE_TERMS:
            acc_gd += g * d
            if HAS_WD:
                acc_wdd += tl.where(wd != 0.0, wd * (d * d), 0.0)
                acc_wtd += tl.where(wd != 0.0, wd * (theta * d), 0.0)
                acc_wtt += tl.where(wd != 0.0, wd * (theta * theta), 0.0)
    row = part_base + pid
    tl.store(part_ptr + row, tl.sum(acc_dd, axis=0))
    tl.store(part_ptr + part_stride + row, tl.sum(acc_gd, axis=0))
    tl.store(part_ptr + 2 * part_stride + row, tl.sum(acc_wdd, axis=0))
    tl.store(part_ptr + 3 * part_stride + row, tl.sum(acc_wtd, axis=0))
    tl.store(part_ptr + 4 * part_stride + row, tl.sum(acc_wtt, axis=0))


@triton.jit
def _reduce_kernel(part_ptr, out_ptr, nrows, part_stride, NPART: tl.constexpr,
                   RBLOCK: tl.constexpr):
    """out[k] = Σ_rows part[k, row] in fp64, always in the same order (one program)."""
    for k in tl.static_range(NPART):
        acc = tl.zeros([RBLOCK], dtype=tl.float64)
        for start in range(0, nrows, RBLOCK):
            rows = start + tl.arange(0, RBLOCK)
            acc += tl.load(part_ptr + k * part_stride + rows, mask=rows < nrows,
                           other=0.0).to(tl.float64)
        tl.store(out_ptr + k, tl.sum(acc, axis=0))


@triton.jit
def _train_update_kernel(theta_ptr, d_ptr, coef_ptr, ok_ptr, n, BLOCK: tl.constexpr):
    """θ += coef·d; a direction that is not finite (ok false) is cleared and does not move θ."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    coef = tl.load(coef_ptr).to(tl.float32)
    okv = tl.load(ok_ptr).to(tl.int32) + tl.zeros([BLOCK], dtype=tl.int32)
    ok = okv != 0
    d = tl.load(d_ptr + offs, mask=mask, other=0.0)
    d = tl.where(ok, d, 0.0)
    theta = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(theta_ptr + offs, (theta + coef * d).to(theta_ptr.dtype.element_ty), mask=mask)
    tl.store(d_ptr + offs, d, mask=mask & (okv == 0))


@triton.jit
def _sgd_revert_kernel(theta_ptr, d_ptr, eta_ptr, ok_ptr, n, BLOCK: tl.constexpr):
    """After a one-pass SGD update whose direction turned out not finite: undo it, clear d.
    When the direction was finite (the usual case) every program only reads `ok`."""
    if tl.load(ok_ptr).to(tl.int32) == 0:
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        eta = tl.load(eta_ptr).to(tl.float32)
        d = tl.load(d_ptr + offs, mask=mask, other=0.0)
        theta = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        finite = (d * 0.0) == 0.0
        theta = tl.where(finite, theta + eta * d, theta)
        tl.store(theta_ptr + offs, theta.to(theta_ptr.dtype.element_ty), mask=mask)
        tl.store(d_ptr + offs, tl.zeros_like(d), mask=mask)


@triton.jit
def _add_sample(loss_ptr, sums_ptr, counts_ptr, skipped_ptr, j):
    """One loss sample at position j; a non-finite one is skipped and counted."""
    y = tl.load(loss_ptr).to(tl.float64)
    finite = (y * 0.0) == 0.0
    tl.store(sums_ptr + j, tl.load(sums_ptr + j) + tl.where(finite, y, 0.0))
    tl.store(counts_ptr + j, tl.load(counts_ptr + j) + tl.where(finite, 1.0, 0.0))
    tl.store(skipped_ptr, tl.load(skipped_ptr) + tl.where(finite, 0, 1).to(tl.int64))


@triton.jit
def _move_kernel(theta_ptr, origin_ptr, d_ptr, coef_ptr, n,
                 loss_ptr, sums_ptr, counts_ptr, skipped_ptr, j,
                 RECORD: tl.constexpr, BLOCK: tl.constexpr):
    """θ = θ₀ + coef·d. With RECORD, program 0 also adds one loss sample at position j
    (a non-finite sample is skipped and counted), in the same launch."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    coef = tl.load(coef_ptr).to(tl.float32)
    origin = tl.load(origin_ptr + offs, mask=mask, other=0.0)
    d = tl.load(d_ptr + offs, mask=mask, other=0.0)
    tl.store(theta_ptr + offs, (origin + coef * d).to(theta_ptr.dtype.element_ty), mask=mask)
    if RECORD:
        if pid == 0:
            _add_sample(loss_ptr, sums_ptr, counts_ptr, skipped_ptr, j)


# -- the line model: single-program fp64 kernels ---------------------------------------
@triton.jit
def _record_kernel(loss_ptr, sums_ptr, counts_ptr, skipped_ptr, j):
    _add_sample(loss_ptr, sums_ptr, counts_ptr, skipped_ptr, j)


@triton.jit
def _coef_kernel(out_ptr, s_ptr, partials_ptr, consts_ptr):
    """out = −s / max(‖d‖, ε)."""
    eps = tl.load(consts_ptr)
    norm = tl.sqrt(tl.load(partials_ptr))
    norm = tl.where(norm < eps, eps, norm)
    tl.store(out_ptr, -tl.load(s_ptr) / norm)


@triton.jit
def _train_coef_kernel(coef_ptr, ok_ptr, partials_ptr, consts_ptr, s_upd_ptr, eta_ptr, lr_ptr,
                       skipped_ptr, sgd):
    dd = tl.load(partials_ptr)
    ok = (dd * 0.0) == 0.0
    eps = tl.load(consts_ptr)
    norm = tl.sqrt(dd)
    norm = tl.where(norm < eps, eps, norm)
    if sgd != 0:
        coef = tl.where(ok, -tl.load(eta_ptr), 0.0)
    else:
        step = tl.load(s_upd_ptr) / norm
        coef = tl.where(ok, -step, 0.0)
        tl.store(lr_ptr, tl.where(ok, step, tl.load(lr_ptr)))
    tl.store(coef_ptr, coef)
    tl.store(ok_ptr, ok)
    tl.store(skipped_ptr, tl.load(skipped_ptr) + tl.where(ok, 0, 1).to(tl.int64))


@triton.jit
def _abandon_kernel(code_ptr, partials_ptr, consts_ptr):
    """0 to go on; +1: −⟨ḡ,d⟩/‖d‖ not negative; +2: ‖d‖ outside [low, high] or not finite."""
    eps = tl.load(consts_ptr)
    low = tl.load(consts_ptr + 1)
    high = tl.load(consts_ptr + 2)
    norm = tl.sqrt(tl.load(partials_ptr))
    safe = tl.where(norm < eps, eps, norm)
    slope = -tl.load(partials_ptr + 1) / safe
    bad_slope = tl.where(slope < 0.0, 0, 1)
    bad_norm = tl.where((norm >= low) & (norm <= high), 0, 2)
    tl.store(code_ptr, (bad_slope + bad_norm).to(tl.int64))


@triton.jit
def _fit_math(positions_ptr, sums_ptr, counts_ptr, partials_ptr, consts_ptr, s_upd_ptr, eta_ptr,
              hist_s_ptr, hist_eta_ptr, hist_n_ptr, npos, window, averaged,
              P_BLOCK: tl.constexpr, A_BLOCK: tl.constexpr):
    """Least-squares parabola through the samples, the step rule, the averaging window, all
    from the line state (read only, nothing stored). A few dozen fp64 flops: cheap enough for
    every program of a launch to do it redundantly.

    Returns (a, b, c, s_min, s_new, eta_new, valid, norm, s_upd, eta, hist_s, hist_eta, hist_n,
    sums, counts): the record values, the new s_upd / η and the new history (ring and count;
    the old ones unless `averaged`), sums / counts as loaded (P_BLOCK, padded with 0).
    """
    eps = tl.load(consts_ptr)
    alpha = tl.load(consts_ptr + 3)
    max_step = tl.load(consts_ptr + 4)
    scale = tl.load(consts_ptr + 5)
    p = tl.arange(0, P_BLOCK)
    pm = p < npos
    t = tl.load(positions_ptr + p, mask=pm, other=0.0) / scale
    n = tl.load(counts_ptr + p, mask=pm, other=0.0)
    y = tl.load(sums_ptr + p, mask=pm, other=0.0)
    t2 = t * t
    m0 = tl.sum(n, axis=0)
    m1 = tl.sum(n * t, axis=0)
    m2 = tl.sum(n * t2, axis=0)
    m3 = tl.sum(n * (t2 * t), axis=0)
    m4 = tl.sum(n * (t2 * t2), axis=0)
    r0 = tl.sum(y, axis=0)
    r1 = tl.sum(y * t, axis=0)
    r2 = tl.sum(y * t2, axis=0)
    # normal equations [[m4 m3 m2] [m3 m2 m1] [m2 m1 m0]] (A B C)ᵀ = (r2 r1 r0)ᵀ, Cramer's rule
    det = m4 * (m2 * m0 - m1 * m1) - m3 * (m3 * m0 - m1 * m2) + m2 * (m3 * m1 - m2 * m2)
    dA = r2 * (m2 * m0 - m1 * m1) - m3 * (r1 * m0 - m1 * r0) + m2 * (r1 * m1 - m2 * r0)
    dB = m4 * (r1 * m0 - m1 * r0) - r2 * (m3 * m0 - m1 * m2) + m2 * (m3 * r0 - r1 * m2)
    dC = m4 * (m2 * r0 - r1 * m1) - m3 * (m3 * r0 - r1 * m2) + r2 * (m3 * m1 - m2 * m2)
    A = dA / det
    B = dB / det
    C = dC / det
    dd = tl.load(partials_ptr)
    norm = tl.sqrt(dd)
    norm = tl.where(norm < eps, eps, norm)
    wd_dd = tl.load(partials_ptr + 2)
    wd_td = tl.load(partials_ptr + 3)
    wd_tt = tl.load(partials_ptr + 4)
    a = A / (scale * scale) + 0.5 * wd_dd / (norm * norm)
    b = B / scale - wd_td / norm
    c = C + 0.5 * wd_tt
    all_counted = tl.sum(tl.where(pm & (n <= 0.0), 1, 0), axis=0) == 0
    valid = all_counted & ((a * 0.0) == 0.0) & ((b * 0.0) == 0.0) & (a > 0.0) & (b < 0.0)
    s_min = tl.where(valid, -b / (2.0 * a), 0.0)
    s_new = alpha * tl.where(s_min > max_step, max_step, s_min)
    s_new = tl.where(s_new < eps, eps, s_new)
    eta_new = s_new / norm
    eta_new = tl.where(eta_new < eps, eps, eta_new)
    s_old = tl.load(s_upd_ptr)
    eta_old = tl.load(eta_ptr)
    k = tl.arange(0, A_BLOCK)
    km = k < window
    hist_n = tl.load(hist_n_ptr)
    hs = tl.load(hist_s_ptr + k, mask=km, other=0.0)
    he = tl.load(hist_eta_ptr + k, mask=km, other=0.0)
    if averaged != 0:
        slot = valid & (k == hist_n % window)
        hs = tl.where(slot, s_new, hs)
        he = tl.where(slot, eta_new, he)
        hist_n = hist_n + tl.where(valid, 1, 0).to(tl.int64)
        filled = km & (k < hist_n)
        count = tl.where(hist_n < 1, 1, tl.where(hist_n > window, window, hist_n)).to(tl.float64)
        s_use = tl.sum(tl.where(filled, hs, 0.0), axis=0) / count
        eta_use = tl.sum(tl.where(filled, he, 0.0), axis=0) / count
    else:
        s_use = s_new
        eta_use = eta_new
    s_upd = tl.where(valid, s_use, s_old)
    eta = tl.where(valid, eta_use, eta_old)
    return a, b, c, s_min, s_new, eta_new, valid, norm, s_upd, eta, hs, he, hist_n, y, n


@triton.jit
def _store_record(out_ptr, valid_ptr, partials_ptr, a, b, c, s_min, s_new, eta_new, s_upd, eta,
                  valid, y, n, npos, P_BLOCK: tl.constexpr):
    """The measurement record: valid, and out = [a, b, c, s_min, s_new, eta_new, s_upd, eta,
    partials(5), sums(npos), counts(npos)]."""
    tl.store(valid_ptr, valid)
    tl.store(out_ptr, a)
    tl.store(out_ptr + 1, b)
    tl.store(out_ptr + 2, c)
    tl.store(out_ptr + 3, s_min)
    tl.store(out_ptr + 4, s_new)
    tl.store(out_ptr + 5, eta_new)
    tl.store(out_ptr + 6, s_upd)
    tl.store(out_ptr + 7, eta)
    q = tl.arange(0, 8)
    tl.store(out_ptr + 8 + q, tl.load(partials_ptr + q, mask=q < 5, other=0.0), mask=q < 5)
    p = tl.arange(0, P_BLOCK)
    pm = p < npos
    tl.store(out_ptr + 13 + p, y, mask=pm)
    tl.store(out_ptr + 13 + npos + p, n, mask=pm)


@triton.jit
def _fit_kernel(out_ptr, valid_ptr, positions_ptr, sums_ptr, counts_ptr, partials_ptr, consts_ptr,
                s_upd_ptr, eta_ptr, lr_ptr, hist_s_ptr, hist_eta_ptr, hist_n_ptr,
                npos, window, averaged, sgd,
                P_BLOCK: tl.constexpr, A_BLOCK: tl.constexpr):
    """`_fit_math` in one program, storing the new s_upd / η / lr / histories in place and the
    measurement record (`_store_record`)."""
    a, b, c, s_min, s_new, eta_new, valid, norm, s_upd, eta, hs, he, hist_n, y, n = _fit_math(
        positions_ptr, sums_ptr, counts_ptr, partials_ptr, consts_ptr, s_upd_ptr, eta_ptr,
        hist_s_ptr, hist_eta_ptr, hist_n_ptr, npos, window, averaged,
        P_BLOCK=P_BLOCK, A_BLOCK=A_BLOCK)
    if averaged != 0:
        k = tl.arange(0, A_BLOCK)
        km = k < window
        tl.store(hist_s_ptr + k, hs, mask=km)
        tl.store(hist_eta_ptr + k, he, mask=km)
        tl.store(hist_n_ptr, hist_n)
    tl.store(s_upd_ptr, s_upd)
    tl.store(eta_ptr, eta)
    if sgd != 0:
        tl.store(lr_ptr, eta)
    else:
        tl.store(lr_ptr, s_upd / norm)
    _store_record(out_ptr, valid_ptr, partials_ptr, a, b, c, s_min, s_new, eta_new, s_upd, eta,
                  valid, y, n, npos, P_BLOCK=P_BLOCK)


@triton.jit
def _fit_move_kernel(theta_ptr, origin_ptr, d_ptr, numel,
                     out_ptr, valid_ptr, next_ptr, next_n_ptr,
                     positions_ptr, sums_ptr, counts_ptr, partials_ptr, consts_ptr,
                     s_upd_ptr, eta_ptr, hist_s_ptr, hist_eta_ptr, hist_n_ptr,
                     npos, window, averaged, sgd, write,
                     P_BLOCK: tl.constexpr, A_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """Finish a measurement on one flat: every program redoes the fit (`_fit_math`) from the
    old line state and moves its tile to the target, θ = θ₀ − s_upd/max(‖d‖, ε)·d.

    The line state is only read here. With `write` (the first flat's launch) program 0 also
    stores the record and the NEW state into the staging buffers next = [s_upd, η, lr,
    hist_s(window), hist_eta(window)] and next_n = hist_n; `_commit_kernel` copies them into
    the state once every flat has moved, so no program of any launch sees a half-updated state.
    """
    a, b, c, s_min, s_new, eta_new, valid, norm, s_upd, eta, hs, he, hist_n, y, n = _fit_math(
        positions_ptr, sums_ptr, counts_ptr, partials_ptr, consts_ptr, s_upd_ptr, eta_ptr,
        hist_s_ptr, hist_eta_ptr, hist_n_ptr, npos, window, averaged,
        P_BLOCK=P_BLOCK, A_BLOCK=A_BLOCK)
    pid = tl.program_id(0)
    coef = (-s_upd / norm).to(tl.float32)  # as Line.target_coef, then line_move's fp32 factor
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    origin = tl.load(origin_ptr + offs, mask=mask, other=0.0)
    d = tl.load(d_ptr + offs, mask=mask, other=0.0)
    tl.store(theta_ptr + offs, (origin + coef * d).to(theta_ptr.dtype.element_ty), mask=mask)
    if write != 0:
        if pid == 0:
            tl.store(next_ptr, s_upd)
            tl.store(next_ptr + 1, eta)
            if sgd != 0:
                tl.store(next_ptr + 2, eta)
            else:
                tl.store(next_ptr + 2, s_upd / norm)
            k = tl.arange(0, A_BLOCK)
            km = k < window
            tl.store(next_ptr + 3 + k, hs, mask=km)
            tl.store(next_ptr + 3 + window + k, he, mask=km)
            tl.store(next_n_ptr, hist_n)
            _store_record(out_ptr, valid_ptr, partials_ptr, a, b, c, s_min, s_new, eta_new,
                          s_upd, eta, valid, y, n, npos, P_BLOCK=P_BLOCK)


@triton.jit
def _commit_kernel(next_ptr, next_n_ptr, s_upd_ptr, eta_ptr, lr_ptr, hist_s_ptr, hist_eta_ptr,
                   hist_n_ptr, window, A_BLOCK: tl.constexpr):
    """The staged line state of `_fit_move_kernel` into the line state (one program)."""
    tl.store(s_upd_ptr, tl.load(next_ptr))
    tl.store(eta_ptr, tl.load(next_ptr + 1))
    tl.store(lr_ptr, tl.load(next_ptr + 2))
    k = tl.arange(0, A_BLOCK)
    km = k < window
    tl.store(hist_s_ptr + k, tl.load(next_ptr + 3 + k, mask=km, other=0.0), mask=km)
    tl.store(hist_eta_ptr + k, tl.load(next_ptr + 3 + window + k, mask=km, other=0.0), mask=km)
    tl.store(hist_n_ptr, tl.load(next_n_ptr))


# ====================================================================== launchers
class _Workspace:
    """Per-Flat buffers made once: partial sums and the fp64 result of the direction op."""

    def __init__(self, flat: Flat):
        dev = flat.device
        nchunks = max(1, -(-len(flat.segments) // _SEGS))
        self.stride = MAX_PROGRAMS * nchunks
        self.partials = torch.zeros(_NPART * self.stride, dtype=torch.float32, device=dev)
        self.out = torch.zeros(_NPART, dtype=torch.float64, device=dev)
        self.chunks = [flat.segments[i:i + _SEGS] for i in range(0, len(flat.segments), _SEGS)] \
            or [[(0, 0, flat.numel)]]


_WS: "weakref.WeakKeyDictionary[Flat, _Workspace]" = weakref.WeakKeyDictionary()


def _ws(flat: Flat) -> _Workspace:
    ws = _WS.get(flat)
    if ws is None:
        ws = _WS[flat] = _Workspace(flat)
    return ws


def _fast(flat: Flat) -> bool:
    return flat.dtype in _KERNEL_DTYPES and flat.numel > 0


def _grid(n: int) -> Tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device, non_blocking=True)


def _direction(flat: Flat, *, summed: bool, inv_m: float, momentum: float, decays: Sequence[float],
               line_terms: bool, eta: Optional[torch.Tensor]) -> torch.Tensor:
    ws = _ws(flat)
    decays = [float(w) for w in decays]
    if summed and flat.grad_sum is None:
        raise RuntimeError("form_direction(summed=True) before any accumulate()")
    grad_sum = flat.grad_sum if summed else flat.grad
    apply = eta is not None
    eta_arg = _on(eta, flat.device) if apply else ws.out
    row = 0
    for ci, chunk in enumerate(ws.chunks):
        lo, hi = chunk[0][1], chunk[-1][2]
        ends = [end for _, _, end in chunk][:_SEGS - 1]
        ends += [hi] * (_SEGS - 1 - len(ends))
        wds = decays[ci * _SEGS:ci * _SEGS + len(chunk)] if len(flat.segments) else [0.0]
        wds = wds + [0.0] * (_SEGS - len(wds))
        ntiles = triton.cdiv(hi - lo, BLOCK)
        nprog = max(1, min(MAX_PROGRAMS, ntiles))
        _direction_kernel[(nprog,)](
            flat.grad, grad_sum, flat.direction, flat.param, ws.partials, eta_arg,
            lo, hi, ws.stride, row,
            float(inv_m), float(momentum), ends[0], ends[1], ends[2],
            wds[0], wds[1], wds[2], wds[3],
            SUMMED=bool(summed), HAS_MOM=momentum != 0.0, HAS_WD=any(w != 0.0 for w in wds),
            LINE_TERMS=bool(line_terms), APPLY=apply, BLOCK=BLOCK, num_warps=NUM_WARPS)
        row += nprog
    _reduce_kernel[(1,)](ws.partials, ws.out, row, ws.stride, NPART=_NPART, RBLOCK=REDUCE_BLOCK,
                         num_warps=4)
    return ws.out


# ====================================================================== the op set
def accumulate(flat: Flat, first: bool) -> None:
    """grad_sum (+)= grad; grad = 0, in one pass."""
    if not _fast(flat):
        return eager.accumulate(flat, first)
    grad_sum = flat.need_grad_sum()
    _accumulate_kernel[_grid(flat.numel)](flat.grad, grad_sum, flat.numel, FIRST=bool(first),
                                          BLOCK=BLOCK, num_warps=NUM_WARPS)


def form_direction(flat: Flat, *, summed: bool, inv_m: float, momentum: float,
                   decays: Sequence[float], line_terms: bool) -> torch.Tensor:
    """ḡ = (grad_sum + grad)·inv_m + wd·θ;  d = β·d + ḡ;  grad = 0, with the partial sums.

    Returns fp64 [5] (‖d‖², ⟨ḡ,d⟩, Σwd‖d‖², Σwd⟨θ,d⟩, Σwd‖θ‖²; the last four 0 without
    `line_terms`) in a buffer of this flat that the next call overwrites. Unlike eager, ḡ is
    not left in grad_sum (it is a scratch value there; nothing reads it).
    """
    if not _fast(flat):
        return eager.form_direction(flat, summed=summed, inv_m=inv_m, momentum=momentum,
                                    decays=decays, line_terms=line_terms)
    return _direction(flat, summed=summed, inv_m=inv_m, momentum=momentum, decays=decays,
                      line_terms=line_terms, eta=None)


def sgd_step(flat: Flat, *, summed: bool, inv_m: float, momentum: float, decays: Sequence[float],
             eta: torch.Tensor) -> torch.Tensor:
    """The SGD-mode TRAINING update in one pass: form d (as form_direction without line terms),
    θ ← θ − η·d where d is finite, grad = 0; returns the partial sums like form_direction.

    The caller then decides `ok` = ‖d‖² finite (``Line.train_coef``) and calls `sgd_revert`,
    which does nothing when ok and otherwise undoes the move and clears d, as eager does.
    """
    if not _fast(flat):
        parts = eager.form_direction(flat, summed=summed, inv_m=inv_m, momentum=momentum,
                                     decays=decays, line_terms=False)
        ok = torch.isfinite(flat.direction).all()
        eager.train_update(flat, torch.where(ok, -eta.to(flat.device), 0.0), ok)
        return parts
    return _direction(flat, summed=summed, inv_m=inv_m, momentum=momentum, decays=decays,
                      line_terms=False, eta=eta)


def sgd_revert(flat: Flat, eta: torch.Tensor, ok: torch.Tensor) -> None:
    """Second half of `sgd_step`: when the direction was not finite, undo the move and clear d
    (θ is restored up to one rounding); otherwise each program reads one flag and exits."""
    if not _fast(flat):
        return  # the eager path of sgd_step has already applied the finiteness rule
    _sgd_revert_kernel[_grid(flat.numel)](flat.param, flat.direction, _on(eta, flat.device),
                                          _on(ok, flat.device), flat.numel, BLOCK=BLOCK,
                                          num_warps=NUM_WARPS)


def train_update(flat: Flat, coef: torch.Tensor, ok: torch.Tensor) -> None:
    """θ += coef·d; a direction that is not finite (ok false) is cleared instead."""
    if not _fast(flat):
        return eager.train_update(flat, coef, ok)
    _train_update_kernel[_grid(flat.numel)](flat.param, flat.direction, _on(coef, flat.device),
                                            _on(ok, flat.device), flat.numel, BLOCK=BLOCK,
                                            num_warps=NUM_WARPS)


def line_move(flat: Flat, coef: torch.Tensor) -> None:
    """θ = θ₀ + coef·d, θ₀ kept in flat.origin."""
    if not _fast(flat):
        return eager.line_move(flat, coef)
    _move_kernel[_grid(flat.numel)](flat.param, flat.origin, flat.direction, _on(coef, flat.device),
                                    flat.numel, coef, coef, coef, coef, 0, RECORD=False,
                                    BLOCK=BLOCK, num_warps=NUM_WARPS)


def line_move_record(flat: Flat, coef: torch.Tensor, line: "_line.Line", j: int,
                     loss: torch.Tensor) -> None:
    """`line_move` and `line.record(j, loss)` in one launch (the loss of the position just
    measured is recorded by the launch that moves on to the next one)."""
    loss = loss.detach().reshape(())
    if (not _fast(flat) or loss.device != flat.device or line.sums.device != flat.device
            or not loss.is_floating_point()):
        line_move(flat, coef)
        line.record(j, loss)
        return
    _move_kernel[_grid(flat.numel)](flat.param, flat.origin, flat.direction, _on(coef, flat.device),
                                    flat.numel, loss, line.sums, line.counts, line.skipped_samples,
                                    int(j), RECORD=True, BLOCK=BLOCK, num_warps=NUM_WARPS)


from .eager import (  # noqa: E402,F401  plain copies and fills: torch's single launches
    clear_direction, restore_direction, restore_origin, save_direction, save_origin, zero_grad)


OPS = eager.OPS + ("sgd_step", "sgd_revert", "line_move_record")


# ====================================================================== the line model
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class Line(_line.Line):
    """`labpal_fast.line.Line` with each method one single-program kernel (fp64, on device).

    Same attribute tensors (``Line.STATE``) and semantics; returned scalars live in buffers
    made once (a coefficient is valid until the same method is called again), the fit's
    record in fresh tensors (one allocation per measurement).
    """

    def __init__(self, hyper: Hyper, device: torch.device):
        super().__init__(hyper, device)
        f64 = dict(dtype=torch.float64, device=device)
        low, high = hyper.direction_norm_range
        self.consts = torch.tensor([hyper.epsilon, low, high, hyper.update_step_adaptation,
                                    hyper.max_step_size, self.scale], **f64)
        self._index = {s: j for j, s in enumerate(hyper.line_positions)}
        self._coefs = torch.zeros(len(hyper.line_positions) + 2, **f64)  # positions, target, train
        self._ok = torch.zeros((), dtype=torch.bool, device=device)
        self._code = torch.zeros((), dtype=torch.int64, device=device)
        self._npos = len(hyper.line_positions)
        # staging of fit_and_move: the new [s_upd, η, lr, hist_s, hist_eta] and hist_n
        self._next = torch.zeros(3 + 2 * hyper.averaging_window, **f64)
        self._next_n = torch.zeros((), dtype=torch.int64, device=device)
        self._p_block = max(2, _next_pow2(self._npos))
        self._a_block = max(2, _next_pow2(hyper.averaging_window))

    def record(self, j: int, loss: torch.Tensor) -> None:
        y = loss.detach().reshape(())
        if y.device != self.sums.device or not y.is_floating_point():
            return super().record(j, loss)
        _record_kernel[(1,)](y, self.sums, self.counts, self.skipped_samples, int(j), num_warps=1)

    def position_coef(self, s: float) -> torch.Tensor:
        j = self._index.get(float(s))
        if j is None:
            return super().position_coef(s)
        out = self._coefs[j]
        _coef_kernel[(1,)](out, self.positions[j:], self.partials, self.consts, num_warps=1)
        return out

    def target_coef(self) -> torch.Tensor:
        out = self._coefs[self._npos]
        _coef_kernel[(1,)](out, self.s_upd, self.partials, self.consts, num_warps=1)
        return out

    def train_coef(self) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self._coefs[self._npos + 1]
        _train_coef_kernel[(1,)](out, self._ok, self.partials, self.consts, self.s_upd, self.eta,
                                 self.lr, self.skipped_updates, int(self.hyper.mode == "SGD"),
                                 num_warps=1)
        return out, self._ok

    def abandon_code(self) -> torch.Tensor:
        _abandon_kernel[(1,)](self._code, self.partials, self.consts, num_warps=1)
        return self._code

    def fit(self, averaged: bool) -> Dict[str, torch.Tensor]:
        h = self.hyper
        npos = self._npos
        out = torch.empty(13 + 2 * npos, dtype=torch.float64, device=self.sums.device)
        valid = torch.empty((), dtype=torch.bool, device=self.sums.device)
        _fit_kernel[(1,)](out, valid, self.positions, self.sums, self.counts, self.partials,
                          self.consts, self.s_upd, self.eta, self.lr, self.hist_s, self.hist_eta,
                          self.hist_n, npos, h.averaging_window, int(bool(averaged)),
                          int(h.mode == "SGD"), P_BLOCK=self._p_block, A_BLOCK=self._a_block,
                          num_warps=1)
        return self._record(out, valid)

    def _record(self, out: torch.Tensor, valid: torch.Tensor) -> Dict[str, torch.Tensor]:
        npos = self._npos
        names = ("a", "b", "c", "s_min", "s_new", "eta_new", "s_upd", "eta")
        record = {name: out[i] for i, name in enumerate(names)}
        record.update(partials=out[8:13], sums=out[13:13 + npos], counts=out[13 + npos:],
                      valid=valid)
        return record

    def fit_and_move(self, flats, ops, averaged: bool) -> Dict[str, torch.Tensor]:
        """`fit` and the move of every flat to s_upd in one launch per flat, plus one
        single-program launch that commits the new line state.

        Every program of every launch computes the fit from the unchanged line state (so all
        agree bit for bit); program 0 of the first launch writes the record and the new state
        to staging buffers, and `_commit_kernel` copies the staged state in after the last
        launch. Flats the kernel does not take (fp64, empty, another device) move afterwards
        with `ops.line_move` and the committed s_upd.
        """
        dev = self.sums.device
        fused = [f for f in flats if _fast(f) and f.device == dev and f.origin is not None]
        if not fused:
            return super().fit_and_move(flats, ops, averaged)
        h = self.hyper
        npos, window = self._npos, h.averaging_window
        out = torch.empty(13 + 2 * npos, dtype=torch.float64, device=dev)
        valid = torch.empty((), dtype=torch.bool, device=dev)
        for i, flat in enumerate(fused):
            _fit_move_kernel[_grid(flat.numel)](
                flat.param, flat.origin, flat.direction, flat.numel,
                out, valid, self._next, self._next_n,
                self.positions, self.sums, self.counts, self.partials, self.consts,
                self.s_upd, self.eta, self.hist_s, self.hist_eta, self.hist_n,
                npos, window, int(bool(averaged)), int(h.mode == "SGD"), int(i == 0),
                P_BLOCK=self._p_block, A_BLOCK=self._a_block, BLOCK=BLOCK, num_warps=NUM_WARPS)
        _commit_kernel[(1,)](self._next, self._next_n, self.s_upd, self.eta, self.lr, self.hist_s,
                             self.hist_eta, self.hist_n, window, A_BLOCK=self._a_block,
                             num_warps=1)
        taken = {id(f) for f in fused}
        rest = [f for f in flats if id(f) not in taken]
        if rest:
            coef = self.target_coef()
            for flat in rest:
                ops.line_move(flat, coef)
        return self._record(out, valid)
