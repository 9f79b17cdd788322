"""Contiguous storage per (device, dtype): parameters and gradients become views into it.

One flat buffer per (device, dtype) lets every op run as a single pass over memory,
whatever the number of parameter tensors. The views are checked at every step and
re-attached when a caller replaced them (``model.zero_grad()`` setting grads to None,
``p.data = ...``), so the flat buffers stay the single source of truth.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Running sums and the direction are kept in fp32 for fp16 / bf16 parameters."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


class Flat:
    """Parameters of one (device, dtype), grouped by parameter group, as views into one buffer.

    Buffers (all 1-D, ``numel`` long):
      param      the parameters themselves (each ``p.data`` is a view into it)
      grad       the gradients (each ``p.grad`` is a view); zero between closure calls
      direction  d, the momentum / update direction, in the accumulation dtype
      grad_sum   running sum of the micro-batch gradients of one update (made on first need)
      origin     spare buffer: the line's origin θ₀ during a measurement (made on first need)
    """

    def __init__(self, params: Sequence[torch.Tensor], group_of: Sequence[int]):
        first = params[0]
        self.device, self.dtype = first.device, first.dtype
        self.acc_dtype = accumulation_dtype(self.dtype)
        self.params: List[torch.Tensor] = list(params)
        self.numel = sum(p.numel() for p in params)
        self.offsets: List[int] = []
        # one contiguous run per parameter group: (group index, start, end)
        self.segments: List[Tuple[int, int, int]] = []

        with torch.no_grad():
            self.param = torch.empty(self.numel, dtype=self.dtype, device=self.device)
            self.grad = torch.zeros_like(self.param)
            self.direction = torch.zeros(self.numel, dtype=self.acc_dtype, device=self.device)
            offset = 0
            for p, g in zip(params, group_of):
                self.offsets.append(offset)
                if self.segments and self.segments[-1][0] == g:
                    gi, start, _ = self.segments[-1]
                    self.segments[-1] = (gi, start, offset + p.numel())
                else:
                    self.segments.append((g, offset, offset + p.numel()))
                self.param[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
                if p.grad is not None:
                    self.grad[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
                offset += p.numel()
        self.param_views = [self._view(self.param, i) for i in range(len(params))]
        self.grad_views = [self._view(self.grad, i) for i in range(len(params))]
        self._param_ptrs = [v.data_ptr() for v in self.param_views]
        for p, pv, gv in zip(self.params, self.param_views, self.grad_views):
            p.data = pv
            p.grad = gv
        self.grad_sum: Optional[torch.Tensor] = None
        self.origin: Optional[torch.Tensor] = None

    def _view(self, buf: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        return buf[self.offsets[i]:self.offsets[i] + p.numel()].view(p.shape)

    def slices(self, buf: torch.Tensor) -> List[torch.Tensor]:
        """Per-parameter views of a flat buffer, shaped like the parameters."""
        return [buf[o:o + p.numel()].view(p.shape) for o, p in zip(self.offsets, self.params)]

    # -- lazily made buffers: once, then reused --------------------------------------
    def need_grad_sum(self) -> torch.Tensor:
        if self.grad_sum is None:
            self.grad_sum = torch.zeros(self.numel, dtype=self.acc_dtype, device=self.device)
        return self.grad_sum

    def need_origin(self) -> torch.Tensor:
        # the origin holds either θ₀ (param dtype) or a saved direction (acc dtype)
        if self.origin is None:
            self.origin = torch.empty(self.numel, dtype=self.acc_dtype, device=self.device)
        return self.origin

    # -- keeping the views attached -------------------------------------------------
    def attach_params(self) -> None:
        """Re-attach parameters whose storage a caller replaced, keeping their new values."""
        for i, p in enumerate(self.params):
            if p.data_ptr() == self._param_ptrs[i]:
                continue
            if p.device != self.device or p.dtype != self.dtype or p.shape != self.param_views[i].shape:
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} was moved to {p.device}/{p.dtype} after the "
                    f"LABPAL optimizer was created on {self.device}/{self.dtype}; create the optimizer "
                    "after moving the model")
            with torch.no_grad():
                self.param_views[i].copy_(p.detach())
            p.data = self.param_views[i]

    def attach_grads(self) -> None:
        """Re-attach gradients a caller set to None (zero) or replaced (their values are kept)."""
        for p, gv in zip(self.params, self.grad_views):
            g = p.grad
            if g is gv:
                continue
            with torch.no_grad():
                if g is None:
                    gv.zero_()
                else:
                    gv.copy_(g)
            p.grad = gv


def build_flats(param_groups: Sequence[dict]) -> List[Flat]:
    """One Flat per (device, dtype), parameters in group order; frozen parameters are left out."""
    buckets: Dict[Tuple[torch.device, torch.dtype], Tuple[list, list]] = {}
    seen = set()
    for gi, group in enumerate(param_groups):
        for p in group["params"]:
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            params, groups = buckets.setdefault((p.device, p.dtype), ([], []))
            params.append(p)
            groups.append(gi)
    return [Flat(params, groups) for params, groups in buckets.values()]
