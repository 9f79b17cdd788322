"""Bytes per parameter that LABPAL holds, by parameter dtype and master weights (docs/
mixed_precision.md): every buffer of its flats (the model's parameters and gradients are views
into them, so they are counted), after a measurement and a few updates.

    PYTHONPATH=. .venv/bin/python tools/memory_per_parameter.py
"""
from __future__ import annotations

import torch

from labpal_fast import LABPAL

BUFFERS = ("param", "grad", "low", "low_grad", "direction", "grad_sum", "origin")


def bytes_per_parameter(dtype: torch.dtype, master, m: int, backend: str) -> float:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(),
                              torch.nn.Linear(256, 10)).to(dtype)
    opt = LABPAL(net.parameters(), backend=backend, master_weights=master,
                 approximation_batches=1, warmup_updates=0, noise_factor=float(m),
                 batch_size_schedule=((0, 1),), sample_positions=(0.0, 0.02, 0.1),
                 direction_norm_range=(0.0, float("inf")))
    x, y = torch.randn(32, 64).to(dtype), torch.randint(0, 10, (32,))
    for _ in range(3 * m):
        opt.step(lambda: torch.nn.functional.cross_entropy(net(x).float(), y))
    seen, total = set(), 0
    for flat in opt.flats:
        for name in BUFFERS:
            t = getattr(flat, name, None)
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total / sum(p.numel() for p in net.parameters())


def main() -> None:
    backends = ["eager"] + (["ext"] if _has_ext() else [])
    for backend in backends:
        for dtype, master in ((torch.float32, None), (torch.bfloat16, None),
                              (torch.bfloat16, False)):
            label = "master weights" if dtype != torch.float32 and master is None else \
                "no master weights"
            for m in (1, 2):
                print(f"{backend:5s} {str(dtype):15s} {label:17s} m={m}: "
                      f"{bytes_per_parameter(dtype, master, m, backend):.0f} B/parameter")


def _has_ext() -> bool:
    from labpal_fast.ops import ext
    return ext.available


if __name__ == "__main__":
    main()
