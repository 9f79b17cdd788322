"""The op set as Triton kernels: one launch per op per (device, dtype) group.

Three tiers, as elsewhere in this package: private ``@triton.jit`` kernels (``_name_kernel``),
host launchers (every launch goes through `_launch`, which counts it and can record its
specialization), and `TritonBackend`, the contract of `base.Backend`. `TritonLine` does each
small computation of the line model in one single-program fp64 kernel instead of several eager
launches (it matters on the TRAINING path: `train_coef` runs once per update).

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

Weight decay differs per segment (parameter group). A direction launch takes up to ``_SEGS``
segments as runtime scalars (their ends and decays) and picks each element's decay by comparing
its offset with the ends: no tables, no pointer chasing, one launch for up to 4 groups per
(device, dtype), then one more launch per further 4 segments (their partial rows go to the
same buffer).

float64 parameters keep the eager ops (Triton passes Python floats as fp32, which would change
the arithmetic of an fp64 buffer); they are rare on GPUs and the eager path is exact there.

On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (set before this module is
imported): that is how CI tests them. Without triton installed, importing this module raises
ImportError, and the package keeps working on the eager backend.

``LABPAL_FAST_RECORD_LAUNCHES=FILE`` appends one JSON line per distinct kernel specialization
launched (kernel, argument types, 16-byte alignment, constexprs, num_warps): `make gpu-verify`
compiles exactly those for real GPU targets.
"""
from __future__ import annotations

import collections
import inspect
import json
import os
import weakref
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch

try:
    import triton
    import triton.language as tl
except Exception as exc:  # pragma: no cover - exercised only without triton
    raise ImportError(f"the Triton backend needs the 'triton' package ({exc}); "
                      "install labpal-fast[triton]") from exc

from .._support import triton_unsupported
from ..flat import Flat
from ..hyper import Hyper
from ..layout import NCONST, NPART, RECORD_SCALARS, REC_PARTIALS, REC_SUMS, Const, Partial, \
    record_size
from ..line import CLIP_EPS, NORM_MEAN_UPDATES, STEP_CAP, Line
from .base import LOCAL_SUM, LocalSum, call
from .eager import EagerBackend

# decided when the kernels below are decorated: interpreted kernels run on CPU tensors
_INTERPRETED = bool(triton.knobs.runtime.interpret)

# Tile sizes: checked for register spills on sm_80/sm_90 by `make gpu-verify`, timed on a GPU
# by benchmarks/gpu_check.py (its --sweep), which may set these module globals to compare.
BLOCK = 4096          # elements per tile of the streaming kernels
NUM_WARPS = 8
DIRECTION_BLOCK = 2048  # the direction kernel keeps five accumulators per element: smaller tiles
DIRECTION_WARPS = 16  # 2048 x 16 warps: ~64 registers, fastest of the H200 sweep (RESULTS.md)
# a measurement's direction with clipping keeps one value more per element: half the tile, so
# it does not spill (make gpu-verify); measurements are rare, their speed hardly matters
CLIP_LINE_BLOCK = DIRECTION_BLOCK // 2
MAX_PROGRAMS = 1024   # reduction kernels: fixed cap on the grid (so results do not depend on the GPU)
REDUCE_BLOCK = 1024   # rows summed per step by the partial-sum reducer
CLIP_BLOCK = 256      # rows of ‖ḡ‖² summed per step by each direction program (clipping)
_SEGS = 4             # weight-decay segments handled by one direction launch
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# the shared layouts (layout.py) as compile-time constants of the kernels
_DD: tl.constexpr = tl.constexpr(int(Partial.DD))
_GD: tl.constexpr = tl.constexpr(int(Partial.GD))
_WD_DD: tl.constexpr = tl.constexpr(int(Partial.WD_DD))
_WD_TD: tl.constexpr = tl.constexpr(int(Partial.WD_TD))
_WD_TT: tl.constexpr = tl.constexpr(int(Partial.WD_TT))
_NPART: tl.constexpr = tl.constexpr(NPART)
_EPS: tl.constexpr = tl.constexpr(int(Const.EPS))
_LOW: tl.constexpr = tl.constexpr(int(Const.NORM_LOW))
_HIGH: tl.constexpr = tl.constexpr(int(Const.NORM_HIGH))
_ALPHA: tl.constexpr = tl.constexpr(int(Const.ALPHA))
_MAX_STEP: tl.constexpr = tl.constexpr(int(Const.MAX_STEP))
_CLIP_MAX: tl.constexpr = tl.constexpr(int(Const.CLIP_MAX))
_CLIP_EPS: tl.constexpr = tl.constexpr(int(Const.CLIP_EPS))
_REC_PARTIALS: tl.constexpr = tl.constexpr(REC_PARTIALS)
_REC_SUMS: tl.constexpr = tl.constexpr(REC_SUMS)


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
def _grad_sqnorm_kernel(grad_ptr, sum_ptr, part_ptr, n, part_base, inv_m,
                        SUMMED: tl.constexpr, BLOCK: tl.constexpr):
    """Per-program partial sums of ‖ḡ‖², ḡ = (sum + grad)·inv_m (or grad) formed as the
    direction kernel forms it; program p writes part[part_base + p]. Reads only."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, n, nprog * BLOCK):  # int64 when n needs it
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        if SUMMED:
            g = (tl.load(sum_ptr + offs, mask=mask, other=0.0) + g.to(tl.float32)) * inv_m
        else:
            g = g.to(tl.float32)
        acc += g * g
    tl.store(part_ptr + part_base + pid, tl.sum(acc, axis=0))


@triton.jit
def _direction_kernel(grad_ptr, sum_ptr, d_ptr, theta_ptr, part_ptr, clip_ptr, consts_ptr,
                      norm_ptr, lo, hi, part_stride, part_base, nclip, store_norm,
                      inv_m, beta, e0, e1, e2, wd0, wd1, wd2, wd3,
                      SUMMED: tl.constexpr, HAS_MOM: tl.constexpr, HAS_WD: tl.constexpr,
                      LINE_TERMS: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
                      CLIP_BLOCK: tl.constexpr):
    """ḡ = c·(sum + grad)·inv_m + wd·θ;  d = β·d + ḡ;  grad = 0; per-program partial sums.

    Programs stride over the tiles of [lo, hi); program p writes partial sum k (layout.Partial)
    to part[k·part_stride + part_base + p]. c: 1 (CLIP 0), the fp64 scalar at clip_ptr (CLIP
    1), or (CLIP 2) the clipping factor from the nclip rows of ‖ḡ‖² at clip_ptr, summed by every
    program in the same fixed order (so no launch of its own), with the line's constants;
    with store_norm, program 0 stores [‖ḡ‖, c] at norm_ptr. ⟨ḡ, d⟩ takes the unclipped ḡ.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if CLIP == 1:
        scale = tl.load(clip_ptr).to(tl.float32)
    elif CLIP == 2:
        sq = tl.zeros([CLIP_BLOCK], dtype=tl.float64)
        for r0 in range(0, nclip, CLIP_BLOCK):
            r = r0 + tl.arange(0, CLIP_BLOCK)
            sq += tl.load(clip_ptr + r, mask=r < nclip, other=0.0).to(tl.float64)
        norm = tl.sqrt(tl.sum(sq, axis=0))
        factor = tl.load(consts_ptr + _CLIP_MAX) / (norm + tl.load(consts_ptr + _CLIP_EPS))
        factor = tl.where(factor < 1.0, factor, 1.0)
        factor = tl.where((norm * 0.0) == 0.0, factor, norm * 0.0)  # NaN: the update skips
        if store_norm != 0:
            if pid == 0:
                tl.store(norm_ptr, norm)
                tl.store(norm_ptr + 1, factor)
        scale = factor.to(tl.float32)
    acc_dd = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gd = tl.zeros([BLOCK], dtype=tl.float32)
    acc_wdd = tl.zeros([BLOCK], dtype=tl.float32)
    acc_wtd = tl.zeros([BLOCK], dtype=tl.float32)
    acc_wtt = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(lo + pid * BLOCK, hi, nprog * BLOCK):  # int64 when hi needs it
        offs = start + tl.arange(0, BLOCK)
        mask = offs < hi
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        if SUMMED:
            g = (tl.load(sum_ptr + offs, mask=mask, other=0.0) + grad.to(tl.float32)) * inv_m
        else:
            g = grad.to(tl.float32)
        if CLIP != 0:
            g_loss = g  # unclipped, for ⟨ḡ, d⟩
            g = g * scale
        if HAS_WD:
            theta = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            wd = tl.where(offs < e0, wd0, tl.where(offs < e1, wd1, tl.where(offs < e2, wd2, wd3)))
            g = tl.where(wd != 0.0, g + wd * theta, g)
        if HAS_MOM:
            d = g + beta * tl.load(d_ptr + offs, mask=mask, other=0.0)
        else:
            d = g
        tl.store(d_ptr + offs, d, mask=mask)
        tl.store(grad_ptr + offs, tl.zeros_like(grad), mask=mask)
        acc_dd += d * d
        if LINE_TERMS:
            if CLIP != 0:
                acc_gd += g_loss * d  # + Σ wd·⟨θ, d⟩ below: ⟨ḡ + wd·θ, d⟩
            else:
                acc_gd += g * d
            if HAS_WD:
                acc_wdd += tl.where(wd != 0.0, wd * (d * d), 0.0)
                acc_wtd += tl.where(wd != 0.0, wd * (theta * d), 0.0)
                acc_wtt += tl.where(wd != 0.0, wd * (theta * theta), 0.0)
    row = part_base + pid
    tl.store(part_ptr + _DD * part_stride + row, tl.sum(acc_dd, axis=0))
    gd = tl.sum(acc_gd, axis=0)
    if CLIP != 0:
        if HAS_WD:
            gd += tl.sum(acc_wtd, axis=0)
    tl.store(part_ptr + _GD * part_stride + row, gd)
    tl.store(part_ptr + _WD_DD * part_stride + row, tl.sum(acc_wdd, axis=0))
    tl.store(part_ptr + _WD_TD * part_stride + row, tl.sum(acc_wtd, axis=0))
    tl.store(part_ptr + _WD_TT * part_stride + row, tl.sum(acc_wtt, axis=0))


@triton.jit
def _reduce_kernel(part_ptr, out_ptr, nrows, part_stride, K: tl.constexpr, RBLOCK: tl.constexpr):
    """out[k] = Σ_rows part[k, row] (k < K) in fp64, always in the same order (one program)."""
    for k in tl.static_range(K):
        acc = tl.zeros([RBLOCK], dtype=tl.float64)
        for start in range(0, nrows, RBLOCK):
            rows = start + tl.arange(0, RBLOCK)
            acc += tl.load(part_ptr + k * part_stride + rows, mask=rows < nrows,
                           other=0.0).to(tl.float64)
        tl.store(out_ptr + k, tl.sum(acc, axis=0))


@triton.jit
def _train_update_kernel(theta_ptr, d_ptr, coef_ptr, ok_ptr, n,
                         partials_ptr, consts_ptr, s_upd_ptr, eta_ptr, lr_ptr, skipped_ptr,
                         sgd, commit, FROM_LINE: tl.constexpr, BLOCK: tl.constexpr):
    """θ += coef·d; a direction that is not finite (ok false) is cleared and does not move θ.

    coef and ok come from coef_ptr / ok_ptr, or with FROM_LINE every program derives them from
    the line itself (as `_train_coef_kernel`: one launch less per update), and with `commit`
    program 0 also stores what that kernel stores (lr in NSGD mode, the skip count)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if FROM_LINE:
        okv0 = (tl.load(partials_ptr + _DD) * 0.0) == 0.0
        if sgd != 0:
            coef64 = tl.where(okv0, -tl.load(eta_ptr), 0.0)
        else:
            step = tl.load(s_upd_ptr) / _safe_norm(partials_ptr, consts_ptr)
            coef64 = tl.where(okv0, -step, 0.0)
            if commit != 0:
                if pid == 0:
                    tl.store(lr_ptr, tl.where(okv0, step, tl.load(lr_ptr)))
        if commit != 0:
            if pid == 0:
                tl.store(skipped_ptr, tl.load(skipped_ptr) + tl.where(okv0, 0, 1).to(tl.int64))
        coef = coef64.to(tl.float32)
        okv = okv0.to(tl.int32) + tl.zeros([BLOCK], dtype=tl.int32)
    else:
        coef = tl.load(coef_ptr).to(tl.float32)
        okv = tl.load(ok_ptr).to(tl.int32) + tl.zeros([BLOCK], dtype=tl.int32)
    ok = okv != 0
    d = tl.load(d_ptr + offs, mask=mask, other=0.0)
    d = tl.where(ok, d, 0.0)
    theta = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(theta_ptr + offs, (theta + coef * d).to(theta_ptr.dtype.element_ty), mask=mask)
    tl.store(d_ptr + offs, d, mask=mask & (okv == 0))


@triton.jit
def _move_kernel(theta_ptr, origin_ptr, d_ptr, coef_ptr, n, BLOCK: tl.constexpr):
    """θ = θ₀ + coef·d."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    coef = tl.load(coef_ptr).to(tl.float32)
    origin = tl.load(origin_ptr + offs, mask=mask, other=0.0)
    d = tl.load(d_ptr + offs, mask=mask, other=0.0)
    tl.store(theta_ptr + offs, (origin + coef * d).to(theta_ptr.dtype.element_ty), mask=mask)


# -- the line model: single-program fp64 kernels ---------------------------------------
@triton.jit
def _record_kernel(loss_ptr, sums_ptr, counts_ptr, skipped_ptr, j):
    """One loss sample at position j; a non-finite one is skipped and counted."""
    y = tl.load(loss_ptr).to(tl.float64)
    finite = (y * 0.0) == 0.0
    tl.store(sums_ptr + j, tl.load(sums_ptr + j) + tl.where(finite, y, 0.0))
    tl.store(counts_ptr + j, tl.load(counts_ptr + j) + tl.where(finite, 1.0, 0.0))
    tl.store(skipped_ptr, tl.load(skipped_ptr) + tl.where(finite, 0, 1).to(tl.int64))


@triton.jit
def _safe_norm(partials_ptr, consts_ptr):
    """max(‖d‖, ε): the divisor of every move along d/‖d‖."""
    norm = tl.sqrt(tl.load(partials_ptr + _DD))
    eps = tl.load(consts_ptr + _EPS)
    return tl.where(norm < eps, eps, norm)


@triton.jit
def _coef_kernel(out_ptr, s_ptr, partials_ptr, consts_ptr):
    """out = −s / max(‖d‖, ε)."""
    tl.store(out_ptr, -tl.load(s_ptr) / _safe_norm(partials_ptr, consts_ptr))


@triton.jit
def _train_coef_kernel(coef_ptr, ok_ptr, partials_ptr, consts_ptr, s_upd_ptr, eta_ptr, lr_ptr,
                       skipped_ptr, norm_mean_ptr, sgd, robust, mean_updates, step_cap):
    """As `Line.train_coef`; with `robust` (SGD mode, sgd_rate="robust") it updates n̄ in
    norm_mean_ptr and takes η = max(min(s_upd/max(n̄, ε), step_cap·s_upd/max(‖d‖, ε)), ε)."""
    dd = tl.load(partials_ptr + _DD)
    ok = (dd * 0.0) == 0.0
    if robust != 0:
        old = tl.load(norm_mean_ptr)
        norm = tl.sqrt(dd)
        mean = tl.where(old > 0.0, old + (norm - old) / mean_updates, norm)
        mean = tl.where(ok, mean, old)
        tl.store(norm_mean_ptr, mean)
        eps = tl.load(consts_ptr + _EPS)
        s = tl.load(s_upd_ptr)
        rate = tl.minimum(s / tl.where(mean < eps, eps, mean),
                          step_cap * s / _safe_norm(partials_ptr, consts_ptr))
        rate = tl.where(rate < eps, eps, rate)
        coef = tl.where(ok, -rate, 0.0)
        tl.store(lr_ptr, tl.where(ok, rate, tl.load(lr_ptr)))
    elif sgd != 0:
        coef = tl.where(ok, -tl.load(eta_ptr), 0.0)
    else:
        step = tl.load(s_upd_ptr) / _safe_norm(partials_ptr, consts_ptr)
        coef = tl.where(ok, -step, 0.0)
        tl.store(lr_ptr, tl.where(ok, step, tl.load(lr_ptr)))
    tl.store(coef_ptr, coef)
    tl.store(ok_ptr, ok)
    tl.store(skipped_ptr, tl.load(skipped_ptr) + tl.where(ok, 0, 1).to(tl.int64))


@triton.jit
def _abandon_kernel(code_ptr, partials_ptr, consts_ptr):
    """0 to go on, else the layout.Abandon bits (1: slope not negative; 2: ‖d‖ out of range)."""
    low = tl.load(consts_ptr + _LOW)
    high = tl.load(consts_ptr + _HIGH)
    norm = tl.sqrt(tl.load(partials_ptr + _DD))
    slope = -tl.load(partials_ptr + _GD) / _safe_norm(partials_ptr, consts_ptr)
    bad_slope = tl.where(slope < 0.0, 0, 1)
    bad_norm = tl.where((norm >= low) & (norm <= high), 0, 2)
    tl.store(code_ptr, (bad_slope + bad_norm).to(tl.int64))


@triton.jit
def _fit_kernel(out_ptr, valid_ptr, positions_ptr, sums_ptr, counts_ptr, partials_ptr, consts_ptr,
                s_upd_ptr, eta_ptr, lr_ptr, hist_s_ptr, hist_eta_ptr, hist_n_ptr,
                npos, window, averaged, sgd,
                P_BLOCK: tl.constexpr, A_BLOCK: tl.constexpr, FIT: tl.constexpr):
    """Least-squares parabola through the samples, the step rule and the averaging window
    (as `Line.fit`), in one program: stores the new s_upd / η / lr / histories in place and the
    record out = [RECORD_SCALARS, partials, sums, counts] (layout.py), valid in valid_ptr.
    `positions_ptr`: the positions moved to (`Line.at`); FIT: 0 the paper's fit and refusals,
    1 the robust fit, 2 the robust fit with the slope from ⟨ḡ,d⟩ (`Line._fit_line`)."""
    eps = tl.load(consts_ptr + _EPS)
    alpha = tl.load(consts_ptr + _ALPHA)
    max_step = tl.load(consts_ptr + _MAX_STEP)
    p = tl.arange(0, P_BLOCK)
    pm = p < npos
    at = tl.load(positions_ptr + p, mask=pm, other=0.0)
    scale = tl.max(at, axis=0)  # = max(sample_positions)·f: t = s/scale, all O(1)
    t = at / scale
    n = tl.load(counts_ptr + p, mask=pm, other=0.0)
    y = tl.load(sums_ptr + p, mask=pm, other=0.0)
    norm = _safe_norm(partials_ptr, consts_ptr)
    yf = y  # what is fitted (y itself goes to the record)
    if FIT == 2:  # y − b·s with the closures' own slope b = (−⟨ḡ,d⟩ + Σwd⟨θ,d⟩)/‖d‖
        b_loss = -tl.load(partials_ptr + _GD) / norm + tl.load(partials_ptr + _WD_TD) / norm
        yf = y - n * (b_loss * scale) * t
    t2 = t * t
    m0 = tl.sum(n, axis=0)
    m1 = tl.sum(n * t, axis=0)
    m2 = tl.sum(n * t2, axis=0)
    m3 = tl.sum(n * (t2 * t), axis=0)
    m4 = tl.sum(n * (t2 * t2), axis=0)
    r0 = tl.sum(yf, axis=0)
    r1 = tl.sum(yf * t, axis=0)
    r2 = tl.sum(yf * t2, axis=0)
    if FIT == 2:
        # normal equations [[m4 m2] [m2 m0]] (A C)ᵀ = (r2 r0)ᵀ
        det2 = m4 * m0 - m2 * m2
        A = (r2 * m0 - m2 * r0) / det2
        C = (m4 * r0 - m2 * r2) / det2
        b = -tl.load(partials_ptr + _GD) / norm
    else:
        # normal equations [[m4 m3 m2] [m3 m2 m1] [m2 m1 m0]] (A B C)ᵀ = (r2 r1 r0)ᵀ, Cramer's
        det = m4 * (m2 * m0 - m1 * m1) - m3 * (m3 * m0 - m1 * m2) + m2 * (m3 * m1 - m2 * m2)
        dA = r2 * (m2 * m0 - m1 * m1) - m3 * (r1 * m0 - m1 * r0) + m2 * (r1 * m1 - m2 * r0)
        dB = m4 * (r1 * m0 - m1 * r0) - r2 * (m3 * m0 - m1 * m2) + m2 * (m3 * r0 - r1 * m2)
        dC = m4 * (m2 * r0 - r1 * m1) - m3 * (m3 * r0 - r1 * m2) + r2 * (m3 * m1 - m2 * m2)
        A = dA / det
        C = dC / det
        b = dB / det / scale - tl.load(partials_ptr + _WD_TD) / norm
    a = A / (scale * scale) + 0.5 * tl.load(partials_ptr + _WD_DD) / (norm * norm)
    c = C + 0.5 * tl.load(partials_ptr + _WD_TT)
    all_counted = tl.sum(tl.where(pm & (n <= 0.0), 1, 0), axis=0) == 0
    if FIT == 0:  # the paper's: no curvature, no rate
        valid = all_counted & ((a * 0.0) == 0.0) & ((b * 0.0) == 0.0) & (a > 0.0) & (b < 0.0)
        s_min = tl.where(valid, -b / (2.0 * a), 0.0)
    else:  # refused only when not descending or not finite; no curvature: max_step_size
        valid = all_counted & ((a * 0.0) == 0.0) & ((b * 0.0) == 0.0) & ((c * 0.0) == 0.0) \
            & (b < 0.0)
        s_min = tl.where(valid, tl.where(valid & (a > 0.0), -b / (2.0 * a), max_step), 0.0)
    s_new = alpha * tl.where(s_min > max_step, max_step, s_min)
    s_new = tl.where(s_new < eps, eps, s_new)
    eta_new = s_new / norm
    eta_new = tl.where(eta_new < eps, eps, eta_new)
    if averaged != 0:
        k = tl.arange(0, A_BLOCK)
        km = k < window
        hist_n = tl.load(hist_n_ptr)
        slot = valid & (k == hist_n % window)
        hs = tl.where(slot, s_new, tl.load(hist_s_ptr + k, mask=km, other=0.0))
        he = tl.where(slot, eta_new, tl.load(hist_eta_ptr + k, mask=km, other=0.0))
        hist_n = hist_n + tl.where(valid, 1, 0).to(tl.int64)
        filled = km & (k < hist_n)
        count = tl.where(hist_n < 1, 1, tl.where(hist_n > window, window, hist_n)).to(tl.float64)
        s_use = tl.sum(tl.where(filled, hs, 0.0), axis=0) / count
        eta_use = tl.sum(tl.where(filled, he, 0.0), axis=0) / count
        tl.store(hist_s_ptr + k, hs, mask=km)
        tl.store(hist_eta_ptr + k, he, mask=km)
        tl.store(hist_n_ptr, hist_n)
    else:
        s_use = s_new
        eta_use = eta_new
    s_upd = tl.where(valid, s_use, tl.load(s_upd_ptr))
    eta = tl.where(valid, eta_use, tl.load(eta_ptr))
    tl.store(s_upd_ptr, s_upd)
    tl.store(eta_ptr, eta)
    if sgd != 0:
        tl.store(lr_ptr, eta)
    else:
        tl.store(lr_ptr, s_upd / norm)
    tl.store(valid_ptr, valid)
    tl.store(out_ptr + 0, a)  # the order of layout.RECORD_SCALARS
    tl.store(out_ptr + 1, b)
    tl.store(out_ptr + 2, c)
    tl.store(out_ptr + 3, s_min)
    tl.store(out_ptr + 4, s_new)
    tl.store(out_ptr + 5, eta_new)
    tl.store(out_ptr + 6, s_upd)
    tl.store(out_ptr + 7, eta)
    q = tl.arange(0, 8)
    tl.store(out_ptr + _REC_PARTIALS + q, tl.load(partials_ptr + q, mask=q < _NPART, other=0.0),
             mask=q < _NPART)
    tl.store(out_ptr + _REC_SUMS + p, y, mask=pm)
    tl.store(out_ptr + _REC_SUMS + npos + p, n, mask=pm)


# ====================================================================== launchers
LAUNCHES: "collections.Counter[str]" = collections.Counter()  # kernel name -> launches made
_RECORD_TO = os.environ.get("LABPAL_FAST_RECORD_LAUNCHES", "")
_recorded: set = set()
_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}


def _arg_type(value) -> str:
    """The Triton signature type this argument is launched with."""
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    return "fp32"


def _record(name: str, kernel, args, num_warps: int, constexprs: dict) -> None:
    fn = getattr(kernel, "fn", kernel)
    names = [p for p in inspect.signature(fn).parameters if p not in constexprs]
    values = dict(zip(names, args))
    # as the GPU's JIT specializes: an int argument equal to 1 becomes the constant 1
    ones = {n: 1 for n, v in values.items()
            if isinstance(v, int) and not isinstance(v, bool) and v == 1}
    values = {n: v for n, v in values.items() if n not in ones}
    signature = {n: _arg_type(v) for n, v in values.items()}
    aligned = sorted(n for n, v in values.items()
                     if (v.data_ptr() if isinstance(v, torch.Tensor) else
                         v if isinstance(v, int) and not isinstance(v, bool) else 1) % 16 == 0)
    entry = {"kernel": name, "signature": signature, "divisible_by_16": aligned,
             "constexprs": {k: (bool(v) if isinstance(v, bool) else v)
                            for k, v in sorted({**constexprs, **ones}.items())},
             "num_warps": num_warps}
    key = json.dumps(entry, sort_keys=True)
    if key not in _recorded:
        _recorded.add(key)
        # one write of the whole line to a file opened for appending: processes recording
        # into the same file at once (pytest workers, ranks) cannot interleave their lines
        fd = os.open(_RECORD_TO, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (key + "\n").encode())
        finally:
            os.close(fd)


def _launch(kernel, grid: Tuple[int], *args, num_warps: int, **constexprs) -> None:
    """Every kernel launch of this backend: counted (LAUNCHES), optionally recorded."""
    name = getattr(kernel, "fn", kernel).__name__
    LAUNCHES[name] += 1
    if _RECORD_TO:
        _record(name, kernel, args, num_warps, constexprs)
    kernel[grid](*args, num_warps=num_warps, **constexprs)


class _Workspace:
    """Per-Flat buffers made once: partial-sum rows and the fp64 result of the direction op."""

    def __init__(self, flat: Flat):
        # one direction launch per run of up to _SEGS weight-decay segments
        self.launches = [flat.segments[i:i + _SEGS] for i in range(0, len(flat.segments), _SEGS)] \
            or [[(0, 0, flat.numel)]]
        self.stride = MAX_PROGRAMS * len(self.launches)
        self.partials = torch.zeros(NPART * self.stride, dtype=torch.float32, device=flat.device)
        self.out = torch.zeros(NPART, dtype=torch.float64, device=flat.device)
        self.sqnorm = torch.zeros((), dtype=torch.float64, device=flat.device)


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


def _sqnorm_rows(flat: Flat, buf: torch.Tensor, row: int, *, summed: bool, inv_m: float,
                 run: Callable = call) -> int:
    """The ‖ḡ‖² pass over one flat, its per-program sums written to buf[row], buf[row+1], ...;
    returns the next free row."""
    if summed and flat.grad_sum is None:
        raise RuntimeError("grad_sqnorm(summed=True) before any accumulate()")
    nprog = max(1, min(MAX_PROGRAMS, triton.cdiv(flat.numel, BLOCK)))
    run(_launch, _grad_sqnorm_kernel, (nprog,), flat.grad,
        flat.grad_sum if summed else flat.grad, buf, flat.numel, row, float(inv_m),
        SUMMED=bool(summed), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return row + nprog


class _Clip(NamedTuple):
    """How direction launches scale ḡ: (mode 1) by the device scalar `src`, or (mode 2) by the
    factor each derives from the `nrows` rows of ‖ḡ‖² in `src` and the line's `consts`, the
    first launch (`store`) keeping [‖ḡ‖, factor] in `out` (line.clip)."""
    mode: int
    src: torch.Tensor
    nrows: int = 0
    consts: Optional[torch.Tensor] = None
    out: Optional[torch.Tensor] = None
    store: bool = False


def _direction_rows(flat: Flat, buf: torch.Tensor, stride: int, row: int, *, summed: bool,
                    inv_m: float, momentum: float, decays: Sequence[float],
                    line_terms: bool, clip: Optional[_Clip] = None, run: Callable = call) -> int:
    """The direction pass over one flat, its per-program partial sums written to rows
    row, row+1, ... of `buf` (partial k at k·stride); returns the next free row. Each launch
    goes through `run` (base.Backend: a fused composite's ops are its launches)."""
    if summed and flat.grad_sum is None:
        raise RuntimeError("form_direction(summed=True) before any accumulate()")
    clip = clip or _Clip(0, buf)  # off: `buf` stands in for the pointers the kernel ignores
    decays = [float(w) for w in decays] or [0.0]
    grad_sum = flat.grad_sum if summed else flat.grad
    for i, segments in enumerate(_ws(flat).launches):
        lo, hi = segments[0][1], segments[-1][2]
        ends = [end for _, _, end in segments][:_SEGS - 1]
        ends += [hi] * (_SEGS - 1 - len(ends))
        wds = decays[i * _SEGS:i * _SEGS + len(segments)]
        wds += [0.0] * (_SEGS - len(wds))
        block = CLIP_LINE_BLOCK if clip.mode and line_terms else DIRECTION_BLOCK
        nprog = max(1, min(MAX_PROGRAMS, triton.cdiv(hi - lo, block)))
        run(_launch, _direction_kernel, (nprog,),
            flat.grad, grad_sum, flat.direction, flat.param, buf, clip.src,
            buf if clip.consts is None else clip.consts, buf if clip.out is None else clip.out,
            lo, hi, stride, row, clip.nrows, int(clip.store and i == 0), float(inv_m),
            float(momentum), *ends, *wds,
            SUMMED=bool(summed), HAS_MOM=momentum != 0.0,
            HAS_WD=any(w != 0.0 for w in wds), LINE_TERMS=bool(line_terms), CLIP=clip.mode,
            BLOCK=block, CLIP_BLOCK=CLIP_BLOCK, num_warps=DIRECTION_WARPS)
        row += nprog
    return row


class _RowBuffer(LocalSum):
    """Triton's reduction when every flat runs on the kernels, on the line's device: the flats'
    direction launches write their per-program partial sums as rows of one buffer (made once
    per line), and one fixed-order launch reduces them all straight into line.partials (no
    per-flat results to add up). With clipping, one ‖ḡ‖² pass per flat writes rows that the
    direction launches sum themselves into the factor (mode 2: no launch of its own). The
    TRAINING update's pass derives its coefficient from the line itself: per update one launch
    per flat per pass plus one reduction (3 for one flat)."""

    def __init__(self, flats: Sequence[Flat], line: "TritonLine"):
        dev = line.partials.device
        self.stride = sum(MAX_PROGRAMS * len(_ws(f).launches) for f in flats)
        self.rows = torch.zeros(NPART * self.stride, dtype=torch.float32, device=dev)
        self.clip_rows = torch.zeros(MAX_PROGRAMS * len(flats), dtype=torch.float32,
                                     device=dev) if line.hyper.max_grad_norm is not None else None

    def clip_factor(self, ops, flats, line, *, m: int, run: Callable) -> _Clip:
        nclip = 0
        for flat in flats:
            nclip = _sqnorm_rows(flat, self.clip_rows, nclip, summed=m > 1, inv_m=1.0 / m,
                                 run=run)
        return _Clip(2, self.clip_rows, nclip, line.consts, line.clip, store=True)

    def form(self, ops, flats, decays, line, factor, *, m: int, line_terms: bool,
             run: Callable) -> None:
        # ḡ times a device scalar (mode 1: c/S under loss scaling), or the factor the
        # launches derive from the ‖ḡ‖² rows (mode 2: clipping)
        clip = _Clip(1, factor) if isinstance(factor, torch.Tensor) else factor
        row = 0
        for flat, wd in zip(flats, decays):
            row = _direction_rows(flat, self.rows, self.stride, row, summed=m > 1,
                                  inv_m=1.0 / m, momentum=line.hyper.momentum, decays=wd,
                                  line_terms=line_terms, clip=clip, run=run)
            if clip is not None:
                clip = clip._replace(store=False)  # ‖ḡ‖ is stored once (mode 2)
        run(_launch, _reduce_kernel, (1,), self.rows, line.partials, row, self.stride,
            K=NPART, RBLOCK=REDUCE_BLOCK, num_warps=4)

    def train(self, ops, flats, line, *, run: Callable) -> None:
        if line.robust_sgd:
            # n̄ changes with each update: one program updates it (`train_coef`) before the
            # update's programs read the rate, so none of them reads a half-updated n̄
            return super().train(ops, flats, line, run=run)
        for i, flat in enumerate(flats):
            run(_launch, _train_update_kernel, _grid(flat.numel), flat.param, flat.direction,
                line.partials, line.partials, flat.numel, line.partials, line.consts,
                line.s_upd, line.eta, line.lr, line.skipped_updates,
                int(line.hyper.mode == "SGD"), int(i == 0),
                FROM_LINE=True, BLOCK=BLOCK, num_warps=NUM_WARPS)


# ====================================================================== the contract
class TritonBackend(EagerBackend):
    """The fused passes as Triton kernels; fp64 (and empty) flats keep the eager ops."""
    name = "triton"

    def unavailable_reason(self, devices) -> Optional[str]:
        reason = triton_unsupported(triton.__version__)
        if reason is not None:
            return reason
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

    def make_line(self, hyper: Hyper, device: torch.device) -> Line:
        return TritonLine(hyper, device)

    def accumulate(self, flat: Flat, first: bool) -> None:
        if not _fast(flat):
            return super().accumulate(flat, first)
        _launch(_accumulate_kernel, _grid(flat.numel), flat.grad, flat.need_grad_sum(),
                flat.numel, FIRST=bool(first), BLOCK=BLOCK, num_warps=NUM_WARPS)

    def grad_sqnorm(self, flat: Flat, *, summed: bool, inv_m: float) -> torch.Tensor:
        if not _fast(flat):
            return super().grad_sqnorm(flat, summed=summed, inv_m=inv_m)
        ws = _ws(flat)
        rows = _sqnorm_rows(flat, ws.partials, 0, summed=summed, inv_m=inv_m)
        _launch(_reduce_kernel, (1,), ws.partials, ws.sqnorm, rows, ws.stride,
                K=1, RBLOCK=REDUCE_BLOCK, num_warps=4)
        return ws.sqnorm

    def form_direction(self, flat: Flat, *, summed: bool, inv_m: float, momentum: float,
                       decays: Sequence[float], line_terms: bool,
                       grad_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Returns the partial sums in a buffer of this flat that the next call overwrites.
        Unlike eager, ḡ is not left in grad_sum (it is scratch there; nothing reads it)."""
        if not _fast(flat):
            return super().form_direction(flat, summed=summed, inv_m=inv_m, momentum=momentum,
                                          decays=decays, line_terms=line_terms,
                                          grad_scale=grad_scale)
        ws = _ws(flat)
        clip = None if grad_scale is None else _Clip(1, _on(grad_scale, flat.device))
        rows = _direction_rows(flat, ws.partials, ws.stride, 0, summed=summed, inv_m=inv_m,
                               momentum=momentum, decays=decays, line_terms=line_terms,
                               clip=clip)
        _launch(_reduce_kernel, (1,), ws.partials, ws.out, rows, ws.stride,
                K=NPART, RBLOCK=REDUCE_BLOCK, num_warps=4)
        return ws.out

    # -- composite steps, fused where every flat runs on the kernels ---------------------
    def _sums(self, flats, line) -> LocalSum:
        """`_RowBuffer` (made once per line) when every flat is on the kernels on the line's
        device; else, or under loss scaling with clipping (c/S is one device scalar then), the
        per-flat ops added up as by every backend."""
        dev = line.partials.device
        if not isinstance(line, TritonLine) or not all(_fast(f) and f.device == dev
                                                       for f in flats):
            return LOCAL_SUM
        if line.hyper.loss_scale is not None and line.hyper.max_grad_norm is not None:
            return LOCAL_SUM
        if line.row_sums is None:
            line.row_sums = _RowBuffer(flats, line)
        return line.row_sums

    def train_update(self, flat: Flat, coef: torch.Tensor, ok: torch.Tensor) -> None:
        if not _fast(flat):
            return super().train_update(flat, coef, ok)
        coef, ok = _on(coef, flat.device), _on(ok, flat.device)
        _launch(_train_update_kernel, _grid(flat.numel), flat.param, flat.direction, coef, ok,
                flat.numel, coef, coef, coef, coef, coef, ok, 0, 0,
                FROM_LINE=False, BLOCK=BLOCK, num_warps=NUM_WARPS)

    def line_move(self, flat: Flat, coef: torch.Tensor) -> None:
        if not _fast(flat):
            return super().line_move(flat, coef)
        _launch(_move_kernel, _grid(flat.numel), flat.param, flat.origin, flat.direction,
                _on(coef, flat.device), flat.numel, BLOCK=BLOCK, num_warps=NUM_WARPS)


BACKEND = TritonBackend()


# ====================================================================== the line model
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


_FITS = {"paper": 0, "robust": 1, "gradient": 2}  # _fit_kernel's FIT


class TritonLine(Line):
    """`labpal_fast.line.Line` with each method one single-program kernel (fp64, on device).

    Same attribute tensors (``Line.STATE``) and semantics; returned scalars live in buffers
    made once (a coefficient is valid until the same method is called again), the fit's
    record in fresh tensors (one allocation per measurement).
    """

    def __init__(self, hyper: Hyper, device: torch.device):
        super().__init__(hyper, device)
        f64 = dict(dtype=torch.float64, device=device)
        low, high = hyper.direction_norm_range
        consts = [0.0] * NCONST
        alpha = hyper.update_step_adaptation * hyper.step_factor  # `Line._alpha` (no check)
        for index, value in ((Const.EPS, hyper.epsilon), (Const.NORM_LOW, low),
                             (Const.NORM_HIGH, high), (Const.ALPHA, alpha),
                             (Const.MAX_STEP, hyper.max_step_size),
                             (Const.CLIP_MAX, hyper.max_grad_norm or 0.0),
                             (Const.CLIP_EPS, CLIP_EPS)):
            consts[index] = value
        self.consts = torch.tensor(consts, **f64)
        self._npos = len(hyper.line_positions)
        self._coefs = torch.zeros(self._npos + 2, **f64)  # positions, target, train
        self._ok = torch.zeros((), dtype=torch.bool, device=device)
        self._code = torch.zeros((), dtype=torch.int64, device=device)
        self._p_block = max(2, _next_pow2(self._npos))
        self._a_block = max(2, _next_pow2(hyper.averaging_window))
        self.row_sums: Optional[_RowBuffer] = None  # the fused direction's rows (made once)

    def record(self, j: int, loss: torch.Tensor) -> None:
        y = loss.detach().reshape(())
        if y.device != self.sums.device or not y.is_floating_point():
            return super().record(j, loss)
        _launch(_record_kernel, (1,), y, self.sums, self.counts, self.skipped_samples, int(j),
                num_warps=1)

    def position_coef(self, s: float) -> torch.Tensor:
        j = self._index.get(float(s))
        if j is None:
            return super().position_coef(s)
        out = self._coefs[j]
        # at = positions (× resolve_positions' factor, when on)
        _launch(_coef_kernel, (1,), out, self.at[j:], self.partials, self.consts, num_warps=1)
        return out

    def target_coef(self) -> torch.Tensor:
        out = self._coefs[self._npos]
        _launch(_coef_kernel, (1,), out, self.s_upd, self.partials, self.consts, num_warps=1)
        return out

    def train_coef(self) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self._coefs[self._npos + 1]
        _launch(_train_coef_kernel, (1,), out, self._ok, self.partials, self.consts, self.s_upd,
                self.eta, self.lr, self.skipped_updates, self.norm_mean,
                int(self.hyper.mode == "SGD"), int(self.robust_sgd), NORM_MEAN_UPDATES,
                STEP_CAP, num_warps=1)
        return out, self._ok

    def abandon_code(self) -> torch.Tensor:
        _launch(_abandon_kernel, (1,), self._code, self.partials, self.consts, num_warps=1)
        return self._overflowed(self._code)

    def _fit_rate(self, averaged: bool) -> Dict[str, torch.Tensor]:
        h = self.hyper
        npos = self._npos
        out = torch.empty(record_size(npos), dtype=torch.float64, device=self.sums.device)
        valid = torch.empty((), dtype=torch.bool, device=self.sums.device)
        # the kernel's α: `Line._alpha` (the step check's factor; max_step_shrink's floor after
        # the warm-up, from the torch fit: a few launches once per measurement)
        alpha = h.update_step_adaptation * h.step_factor
        if averaged and h.max_step_shrink is not None:
            self.consts[Const.ALPHA].copy_(self._alpha(self._judged_fit(self._norm())[4], True))
        elif self.checking:
            torch.mul(self.check[4], alpha, out=self.consts[Const.ALPHA])
        elif h.max_step_shrink is not None:
            self.consts[Const.ALPHA].fill_(alpha)
        _launch(_fit_kernel, (1,), out, valid, self.at, self.sums, self.counts,
                self.partials, self.consts, self.s_upd, self.eta, self.lr, self.hist_s,
                self.hist_eta, self.hist_n, npos, h.averaging_window, int(bool(averaged)),
                int(h.mode == "SGD"), P_BLOCK=self._p_block, A_BLOCK=self._a_block,
                FIT=_FITS[h.line_fit], num_warps=1)
        record = {name: out[i] for i, name in enumerate(RECORD_SCALARS)}
        record.update(partials=out[REC_PARTIALS:REC_SUMS], sums=out[REC_SUMS:REC_SUMS + npos],
                      counts=out[REC_SUMS + npos:], valid=valid, positions=self.at.clone())
        return record
