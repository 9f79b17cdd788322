"""The gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al., 2018, "An empirical model
of large-batch training") along an Adam(1e-3) run of each built-in task, beside the paper's
noise factor ν = (128/b)·(N/40000) that sets LABPAL's m (docs/paper_and_quality.md, "Quality without tuning").

At 0, ¼, ½ and all of the task's default steps: 16 gradients of batch b (drawn with replacement
from the training split), |G|² and tr(Σ) from the unbiased two-batch-size estimators with the
batch b and the 16·b mean (negative when |G|² is below their noise, as near convergence).
Outside CI (a minute or two on 2 cores):

    PYTHONPATH=. .venv/bin/python tools/gradient_noise.py spirals charlm digits
"""
from __future__ import annotations

import argparse
from typing import List, Optional

import torch

from labpal_fast.cli.tasks import TASKS, load_task

GRADIENTS = 16


def flat_gradient(model: torch.nn.Module, task, idx: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    x, y = task.batch(idx)
    task.loss(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def noise_scale(model: torch.nn.Module, task, b: int, gen: torch.Generator) -> float:
    grads = torch.stack([flat_gradient(model, task, torch.randint(0, task.train_size, (b,),
                                                                  generator=gen))
                         for _ in range(GRADIENTS)]).double()
    small = (grads ** 2).sum(1).mean()      # E|g_b|²  = |G|² + tr(Σ)/b
    large = (grads.mean(0) ** 2).sum()      # E|g_16b|² = |G|² + tr(Σ)/(16b)
    big = GRADIENTS * b
    signal = (big * large - b * small) / (big - b)
    trace = (small - large) / (1 / b - 1 / big)
    return float(trace / signal)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tasks", nargs="*", help="of digits, spirals, charlm (default: all three)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    unknown = set(a.tasks) - (set(TASKS) - {"cifar10"})
    if unknown:
        p.error(f"unknown tasks {sorted(unknown)}: pick from digits, spirals, charlm")
    torch.set_num_threads(a.threads)
    print("| task | b | ν (paper) | step | B_simple | B_simple / b |")
    print("|---|---|---|---|---|---|")
    for name in a.tasks or ["spirals", "charlm", "digits"]:
        task = load_task(name, 0, torch.device("cpu"))
        b, steps = task.defaults.batch_size, task.defaults.steps
        nu = (128 / b) * (task.train_size / 40000)
        torch.manual_seed(0)
        model = task.make_model()
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        for step in range(steps + 1):
            if step in (0, steps // 4, steps // 2, steps):
                scale = noise_scale(model, task, b, gen)
                print(f"| {name} | {b} | {nu:.2f} | {step} | {scale:.0f} | {scale / b:.1f} |",
                      flush=True)
            if step == steps:
                break
            x, y = task.batch(torch.randint(0, task.train_size, (b,), generator=gen))
            opt.zero_grad()
            task.loss(model(x), y).backward()
            opt.step()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
