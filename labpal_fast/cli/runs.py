"""The command's runs: an optimizer built per name on a fresh model of the task, and what a
run records about its software. Shared by `compare`/`train` (command.py) and the quality suite
(suite.py), which is why it lives apart from both."""
from __future__ import annotations

import platform
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import __version__
from . import parallel, registry
from .tasks import BatchStream, Task
from .training import Run

# a flag not given (None is a value: "--max-grad-norm none" turns clipping off)
_UNSET = object()


def labpal_hyper(args) -> Dict[str, Any]:
    return {name[3:]: v for name, v in vars(args).items()
            if name.startswith("hp_") and name != "hp_mode" and v is not _UNSET}


def _versions() -> Dict[str, Optional[str]]:
    import importlib.metadata as md
    out: Dict[str, Optional[str]] = {"python": platform.python_version(),
                                     "labpal_fast": __version__, "torch": torch.__version__}
    for dist in ("numpy", "scikit-learn", "matplotlib", "tqdm", "schedulefree", "prodigyopt",
                 "dadaptation", "dog-optimizer", "triton"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _make_runs(names: Sequence[str], task: Task, args, device: torch.device,
               ranks: parallel.Ranks = parallel.Ranks()) -> List[Run]:
    runs = []
    hyper = labpal_hyper(args)
    for name in names:
        spec = registry.SPECS[name]
        torch.manual_seed(args.seed)                 # same initial weights for everyone
        model = task.make_model().to(device)
        model.train()
        forward = ranks.wrap(model)
        build = spec.build
        if name in ("labpal", "labpal-sgd") and getattr(args, "hp_mode", None):
            build = registry._labpal(args.hp_mode)
        built = build([p for p in model.parameters() if p.requires_grad], model=forward,
                      task_size=task.train_size, batch_size=args.batch_size // ranks.world,
                      steps=args.steps,
                      sgd_lr=args.sgd_lr, weight_decay=args.weight_decay, labpal_hyper=hyper,
                      backend=args.backend)
        if built.schedule_free:
            built.optimizer.train()
        label = spec.label
        if built.labpal and getattr(args, "hp_mode", None):
            label = f"LABPAL ({args.hp_mode})"
        runs.append(Run(name, label, task, model, built,
                        BatchStream(task.train_size, args.batch_size, args.seed),
                        torch.Generator().manual_seed(args.seed + 1), device,
                        forward=forward, ranks=ranks))
    return runs
