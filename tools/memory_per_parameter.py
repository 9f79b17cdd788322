"""Bytes per parameter that LABPAL holds, by parameter dtype and master weights (docs/
mixed_precision.md): every buffer of its flats (the model's parameters and gradients are views
into them, so they are counted), after a measurement and a few updates; beside torch's SGD with
momentum and Adam (the parameters, their gradients and every state tensor). Prints the page's
table (`make check-figures` and tests/test_check_figures.py compare it): the compiled
extension's figure, and the eager backend's in parentheses where it differs.

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


def torch_bytes_per_parameter(dtype: torch.dtype, make) -> float:
    """torch.optim's optimizer `make(params)`: the parameters, gradients and states."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(),
                              torch.nn.Linear(256, 10)).to(dtype)
    opt = make(net.parameters())
    x, y = torch.randn(32, 64).to(dtype), torch.randint(0, 10, (32,))
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(net(x).float(), y).backward()
        opt.step()
    tensors = [t for p in net.parameters() for t in (p, p.grad)]
    tensors += [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    total = sum(t.numel() * t.element_size() for t in tensors)
    return total / sum(p.numel() for p in net.parameters())


ROWS = (("fp32", torch.float32, None), ("bf16 / fp16, master weights (default)", torch.bfloat16,
                                        None),
        ("bf16 / fp16, `master_weights=False`", torch.bfloat16, False))


def _labpal_cell(dtype: torch.dtype, master, m: int) -> str:
    eager = f"{bytes_per_parameter(dtype, master, m, 'eager'):.0f}"
    if not _has_ext():
        return f"{eager} (eager; the extension is not built)"
    ext = f"{bytes_per_parameter(dtype, master, m, 'ext'):.0f}"
    return ext if ext == eager else f"{ext} (eager: {eager})"


def main() -> None:
    print("| parameters | LABPAL, m = 1 | LABPAL, m > 1 | SGD + momentum | Adam |")
    print("|---|---|---|---|---|")
    for label, dtype, master in ROWS:
        sgd = torch_bytes_per_parameter(dtype, lambda p: torch.optim.SGD(p, 0.1, momentum=0.9))
        adam = torch_bytes_per_parameter(dtype, lambda p: torch.optim.Adam(p, 1e-3))
        print(f"| {label} | {_labpal_cell(dtype, master, 1)} | {_labpal_cell(dtype, master, 2)} "
              f"| {sgd:.0f} | {adam:.0f} |")


def _has_ext() -> bool:
    from labpal_fast.ops import ext
    return ext.available


if __name__ == "__main__":
    main()
