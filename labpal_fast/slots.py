"""How one parameter sits in a `Flat`: the views that point it into the flat's buffers.

A `Slot` is a plain parameter: ``p.data`` and ``p.grad`` are views into the flat. Another
kind of parameter (FSDP2's sharded DTensors, `shards.ShardSlot`) subclasses it and says how
its own storage is pointed in; the flat only calls the methods below.
"""
from __future__ import annotations

from typing import Optional

import torch


class Slot:
    """A plain parameter in a flat: ``p.data`` and ``p.grad`` are views into its buffers."""
    sharded = False  # its partial sums are one shard's of a sum over ranks

    def __init__(self, p: torch.Tensor):
        self.shape = p.shape
        self.numel = p.numel()
        self.size = self.numel  # elements it takes in the flat

    def values(self, p: torch.Tensor) -> torch.Tensor:
        return p.detach()

    def grad_values(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        return p.grad

    def bind(self, p: torch.Tensor, padded: torch.Tensor, view: torch.Tensor,
             grad: torch.Tensor) -> None:
        self.view, self.grad = view, grad
        self._ptr = view.data_ptr()
        p.data = view
        p.grad = grad

    def bound(self, p: torch.Tensor) -> bool:
        return p.data_ptr() == self._ptr

    def rebind(self, p: torch.Tensor) -> None:
        p.data = self.view

    def grad_bound(self, p: torch.Tensor) -> bool:
        return p.grad is self.grad

    def rebind_grad(self, p: torch.Tensor) -> None:
        p.grad = self.grad

    def wrap(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A tensor of this parameter's local shape as the state entry it is saved as."""
        return t
