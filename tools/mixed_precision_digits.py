"""The mixed-precision figures of docs/mixed_precision.md (outside CI: about a minute per run on 2 CPU cores):
a 64-64-10 MLP on sklearn's digits (1400 train / 397 test, batch 32, 600 closure calls,
reuse_updates=100, warmup_updates=50), in fp32, under bf16 autocast, and with bf16 parameters
with and without master weights; test accuracy, test loss and the measurements' validity.
The runs share the initialization and the batch order, so they end at nearly the same function:
their accuracy may agree to the image while the loss tells them apart.

    PYTHONPATH=. .venv/bin/python tools/mixed_precision_digits.py
"""
from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from labpal_fast import LABPAL

WIDE = dict(sample_positions=(0.0, 0.02, 0.1))  # positions a bf16 parameter copy resolves
# (kind, hyper-parameters, the run's label in docs/mixed_precision.md's table)
RUNS = [("fp32", {}, "fp32, defaults"), ("autocast", {}, "bf16 autocast, defaults"),
        ("bf16", {}, "bf16 parameters, master weights, defaults"),
        ("bf16", WIDE, "bf16 parameters, master weights, `sample_positions=(0, 0.02, 0.1)`"),
        ("bf16", dict(WIDE, master_weights=False),
         "bf16 parameters, `master_weights=False`, same positions")]


def run(kind: str, steps: int = 600, **hyper) -> str:
    data = load_digits()
    x_all = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y_all = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x_all), generator=g)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    net = net.to(dtype)
    opt = LABPAL(net.parameters(), dataset_size=1400, batch_size=32, reuse_updates=100,
                 warmup_updates=50, **hyper)
    for _ in range(steps):
        idx = train[torch.randint(0, 1400, (32,), generator=g)]
        x, y = x_all[idx].to(dtype), y_all[idx]

        def closure(x=x, y=y):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "autocast"):
                return torch.nn.functional.cross_entropy(net(x), y)
        opt.step(closure)
    with torch.no_grad():
        out = net(x_all[test].to(dtype)).float()
    acc = (out.argmax(1) == y_all[test]).double().mean().item()
    loss = torch.nn.functional.cross_entropy(out, y_all[test]).item()
    records = opt.measurements()
    valid = sum(r["valid"] for r in records)
    return f"{acc:.1%} | {loss:.4f} | {valid}/{len(records)}"


if __name__ == "__main__":
    print("| run | accuracy | test loss | valid |")
    print("|---|---|---|---|")
    for kind, hyper, label in RUNS:
        print(f"| {label} | {run(kind, **hyper)} |", flush=True)
