"""Contiguous storage per (device, dtype): parameters and gradients become views into it.

One flat buffer per (device, dtype) lets every op run as a single pass over memory,
whatever the number of parameter tensors. The views are checked at every step and
re-attached when a caller replaced them (``model.zero_grad()`` setting grads to None,
``p.data = ...``), so the flat buffers stay the single source of truth.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .slots import Slot

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

    With fp32 master weights (`master`, fp16 / bf16 parameters, README "Mixed precision") the
    flat is an fp32 one (`dtype`; every backend runs on it unchanged) and the model's own
    parameters and gradients are views into two more buffers of their dtype (`model_dtype`):
      low        the parameters as the model sees them: `param` rounded (`publish`)
      low_grad   the gradients backward writes; `pull_grads` moves them into `grad` (fp32)
    """

    def __init__(self, params: Sequence[torch.Tensor], group_of: Sequence[int],
                 slots: Optional[Sequence[Slot]] = None, master: bool = False):
        first = params[0]
        self.device, self.model_dtype = first.device, first.dtype
        self.master = bool(master) and self.model_dtype in LOW_PRECISION
        self.dtype = torch.float32 if self.master else self.model_dtype
        self.acc_dtype = accumulation_dtype(self.dtype)
        self.params: List[torch.Tensor] = list(params)
        # how each parameter sits in the buffers (slots.py: plain; shards.py: an FSDP2 local
        # shard with its padding, which stays zero in every buffer)
        self.slots: List[Slot] = list(slots) if slots is not None else [Slot(p) for p in params]
        self.sharded = any(s.sharded for s in self.slots)
        self.numel = sum(s.size for s in self.slots)
        self.offsets: List[int] = []
        # one contiguous run per parameter group: (group index, start, end)
        self.segments: List[Tuple[int, int, int]] = []

        with torch.no_grad():
            self.param = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
            self.grad = torch.zeros_like(self.param)
            if self.master:
                self.low = torch.zeros(self.numel, dtype=self.model_dtype, device=self.device)
                self.low_grad = torch.zeros_like(self.low)
            else:
                self.low, self.low_grad = self.param, self.grad  # the model's, as they are
            self.direction = torch.zeros(self.numel, dtype=self.acc_dtype, device=self.device)
            offset = 0
            for p, s, g in zip(params, self.slots, group_of):
                self.offsets.append(offset)
                if self.segments and self.segments[-1][0] == g:
                    gi, start, _ = self.segments[-1]
                    self.segments[-1] = (gi, start, offset + s.size)
                else:
                    self.segments.append((g, offset, offset + s.size))
                self.param[offset:offset + s.numel].copy_(s.values(p).reshape(-1))
                grad = s.grad_values(p)
                if grad is not None:
                    self.low_grad[offset:offset + s.numel].copy_(grad.reshape(-1))
                offset += s.size
            if self.master:
                self.low.copy_(self.param)  # exact: fp16 / bf16 values are fp32 values
        self.param_views = [self._view(self.low, i) for i in range(len(params))]
        self.grad_views = [self._view(self.low_grad, i) for i in range(len(params))]
        for i, (p, s) in enumerate(zip(self.params, self.slots)):
            o = self.offsets[i]
            s.bind(p, self.low[o:o + s.size], self.param_views[i], self.grad_views[i])
        # the parameters' version counters as of the last master update: another count means
        # the model's parameters were written in place from outside (model.load_state_dict)
        self._versions = [p._version for p in self.params] if self.master else None
        self._plain = [type(s) is Slot for s in self.slots]
        self._param_ptrs = [v.data_ptr() if plain else None
                            for v, plain in zip(self.param_views, self._plain)]
        self.grad_sum: Optional[torch.Tensor] = None
        self.origin: Optional[torch.Tensor] = None

    def _view(self, buf: torch.Tensor, i: int) -> torch.Tensor:
        s = self.slots[i]
        return buf[self.offsets[i]:self.offsets[i] + s.numel].view(s.shape)

    def slices(self, buf: torch.Tensor) -> List[torch.Tensor]:
        """Per-parameter views of a flat buffer, shaped like the parameters (FSDP2: like
        their local shards)."""
        return [buf[o:o + s.numel].view(s.shape) for o, s in zip(self.offsets, self.slots)]

    def saved(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """A copy of parameter i's slice `t` as its state entry (FSDP2: a DTensor)."""
        return self.slots[i].wrap(self.params[i], t.clone())

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
        ptrs = self._param_ptrs
        for i, p in enumerate(self.params):
            # plain parameters inline (this runs every step), others through their slot
            if (p.data_ptr() == ptrs[i]) if ptrs[i] is not None else self.slots[i].bound(p):
                continue
            s = self.slots[i]
            values = s.values(p)
            if values.device != self.device or values.dtype != self.model_dtype or \
                    values.shape != self.param_views[i].shape:
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} was moved to {p.device}/{p.dtype} after the "
                    f"LABPAL optimizer was created on {self.device}/{self.model_dtype}; create the "
                    "optimizer after moving the model")
            with torch.no_grad():
                self.param_views[i].copy_(values)
                if self.master:
                    o = self.offsets[i]
                    self.param[o:o + s.numel].copy_(values.reshape(-1))
            s.rebind(p)
        if self.master:
            self._follow_model()

    # -- fp32 master weights ----------------------------------------------------------
    def _follow_model(self) -> None:
        """Parameters written in place from outside (their version counter moved) are taken
        into the master copy (`take_master`). Host-side integers only: no sync."""
        for i, p in enumerate(self.params):
            if p._version != self._versions[i]:
                o = self.offsets[i]
                n = self.slots[i].numel
                self.take_master(self.param[o:o + n], i)

    def take_master(self, master: torch.Tensor, i: int) -> None:
        """Parameter i's fp32 master values from `master` (a saved copy, or its own): kept
        where they round to the model's value, the model's value elsewhere (it was changed)."""
        o = self.offsets[i]
        n = self.slots[i].numel
        low = self.low[o:o + n]
        master = master.reshape(-1).to(self.param)
        with torch.no_grad():
            self.param[o:o + n].copy_(torch.where(master.to(low.dtype) == low, master,
                                                  low.to(master.dtype)))
        self._versions[i] = self.params[i]._version

    def publish(self) -> None:
        """The model's parameters ← the master copy, rounded (after every write of θ)."""
        if self.master:
            self.low.copy_(self.param)

    def pull_grads(self) -> None:
        """After a backward: the model's gradients into the fp32 gradient buffer (zero
        there), and zeroed where backward accumulates."""
        if self.master:
            self.grad.copy_(self.low_grad)
            self.low_grad.zero_()

    def clear_model_grads(self) -> None:
        """The model's gradients that were not pulled (a failed or discarded backward)."""
        if self.master:
            self.low_grad.zero_()

    def attach_grads(self) -> None:
        """Re-attach gradients a caller set to None (zero) or replaced (their values are kept)."""
        for p, s, gv, plain in zip(self.params, self.slots, self.grad_views, self._plain):
            if (p.grad is gv) if plain else s.grad_bound(p):
                continue
            g = s.grad_values(p)
            with torch.no_grad():
                if g is None:
                    gv.zero_()
                else:
                    gv.copy_(g)
            s.rebind_grad(p)


def publish(flats: Sequence[Flat], run: Callable) -> None:
    """After a write of θ: fp16 / bf16 parameters ← their fp32 master copy, rounded."""
    for flat in flats:
        if flat.master:
            run(flat.publish)


def build_flats(param_groups: Sequence[dict],
                slot_of: Callable[[torch.Tensor], Slot] = Slot,
                master: Optional[bool] = None) -> List[Flat]:
    """One Flat per (device, dtype), parameters in group order; frozen parameters are left out.
    `slot_of` says how each parameter sits in a flat (`shards.Placement.slot_of` under FSDP2):
    parameters whose partial sums are one shard's (`Slot.sharded`) go to flats of their own
    (they are reduced differently). `master` (master_weights): fp32 master weights for
    fp16 / bf16 flats; None: for those of plain parameters (FSDP2's own mixed precision keeps
    fp32 shards), True: refused for parameters that are not plain (FSDP2's)."""
    buckets: Dict[tuple, Tuple[list, list, list]] = {}
    seen = set()
    for gi, group in enumerate(param_groups):
        for p in group["params"]:
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            slot = slot_of(p)
            params, groups, slots = buckets.setdefault((p.device, p.dtype, slot.sharded),
                                                       ([], [], []))
            params.append(p)
            groups.append(gi)
            slots.append(slot)
    flats = []
    for params, groups, slots in buckets.values():
        plain = all(type(s) is Slot for s in slots)
        if master and not plain and params[0].dtype in LOW_PRECISION:
            raise ValueError(
                "master_weights=True with FSDP2 parameters of dtype "
                f"{params[0].dtype}: LABPAL keeps master weights only for plain parameters. "
                "Keep the FSDP2 parameters in fp32 and let FSDP2 compute in low precision "
                "(fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)))")
        use = plain if master is None else bool(master)
        flats.append(Flat(params, groups, slots, master=use))
    return flats
