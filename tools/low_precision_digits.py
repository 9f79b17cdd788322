"""A digits MLP trained with bf16 parameters or under bf16 autocast: robust fit against paper.

    PYTHONPATH=$PWD python tools/low_precision_digits.py [--steps 1500]

Prints, per precision and line_fit, the final validation accuracy and how many measurements
gave a rate (docs/paper_and_quality.md, "What differs from the paper";
tools/check_figures.py compares it with the page).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from labpal_fast import LABPAL  # noqa: E402


def run(precision: str, line_fit: str, steps: int, seed: int = 0):
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor((data.images.reshape(-1, 64) / 16.0 - 0.5) / 0.5, dtype=torch.float32)
    y = torch.tensor(data.target)
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, va = perm[360:], perm[:360]
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    dtype = torch.float32
    if precision == "bf16 parameters":
        net, dtype = net.to(torch.bfloat16), torch.bfloat16
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) \
        if precision == "bf16 autocast" else contextlib.nullcontext
    opt = LABPAL(net.parameters(), backend="eager", line_fit=line_fit, batch_size=32,
                 dataset_size=len(tr), reuse_updates=100, warmup_updates=50)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.from_numpy(tr)[torch.randint(0, len(tr), (32,), generator=g)]

        def closure(idx=idx):
            with ctx():
                out = net(x[idx].to(dtype))
            return torch.nn.functional.cross_entropy(out.float(), y[idx])
        opt.step(closure)
    with torch.no_grad(), ctx():
        acc = (net(x[va].to(dtype)).argmax(1) == y[va]).float().mean().item()
    recs = opt.measurements()
    return acc, sum(r["valid"] for r in recs), len(recs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print("| precision | line_fit | val accuracy | measurements with a rate |")
    print("|---|---|---:|---:|")
    for precision in ("fp32", "bf16 parameters", "bf16 autocast"):
        for fit in ("paper", "robust"):
            acc, valid, total = run(precision, fit, args.steps)
            print(f"| {precision} | {fit} | {acc:.1%} | {valid} of {total} |", flush=True)


if __name__ == "__main__":
    main()
