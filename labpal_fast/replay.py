"""Replaying a closure exactly: the random state of its first call, and untouched buffers.

A measurement evaluates every closure again at other positions on the line. Each repeat
must draw the same random numbers (dropout masks, augmentation) as the first call, and the
global RNG must end as if the repeats never ran: torch's CPU and CUDA generators, Python's
`random` and numpy's global generator (when numpy is imported; its state is kept only then). Buffers updated in training mode
(BatchNorm running statistics) must not absorb the repeats.
"""
from __future__ import annotations

import random
import sys
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch

# torch CPU, torch CUDA per device, Python's random, numpy's global generator (or None)
RngState = Tuple[torch.Tensor, List[Tuple[int, torch.Tensor]], Any, Any]


def cuda_indices(devices: Iterable[torch.device]) -> Tuple[int, ...]:
    return tuple(sorted({d.index if d.index is not None else torch.cuda.current_device()
                         for d in devices if d.type == "cuda"}))


def capture_rng(cuda: Sequence[int]) -> RngState:
    """The CPU generator, the generator of every CUDA device in use, Python's and numpy's."""
    numpy = sys.modules.get("numpy")  # not imported: nothing can draw from it
    return (torch.get_rng_state(), [(i, torch.cuda.get_rng_state(i)) for i in cuda],
            random.getstate(), numpy.random.get_state() if numpy is not None else None)


def restore_rng(state: RngState) -> None:
    cpu, cuda, py, np_state = state
    torch.set_rng_state(cpu)
    for i, s in cuda:
        torch.cuda.set_rng_state(s, i)
    random.setstate(py)
    if np_state is not None:
        sys.modules["numpy"].random.set_state(np_state)


class BufferSnapshot:
    """Copies of a module's buffers, kept in storage made once and reused."""

    def __init__(self, model: Optional[torch.nn.Module]):
        self.model = model
        self._copies: List[torch.Tensor] = []

    def _buffers(self) -> List[torch.Tensor]:
        return [] if self.model is None else list(self.model.buffers())

    @torch.no_grad()
    def save(self) -> None:
        buffers = self._buffers()
        if len(buffers) != len(self._copies) or any(
                b.shape != c.shape or b.dtype != c.dtype or b.device != c.device
                for b, c in zip(buffers, self._copies)):
            self._copies = [torch.empty_like(b) for b in buffers]
        for b, c in zip(buffers, self._copies):
            c.copy_(b)

    @torch.no_grad()
    def restore(self) -> None:
        for b, c in zip(self._buffers(), self._copies):
            b.copy_(c)
