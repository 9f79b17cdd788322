"""The optimizers the quality suite runs, by name: LABPAL's configurations, the paper
variants, the untuned baselines and tuned SGD (one name per rate). Read by the runner
(suite.py) and the report (suite_report.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional


@dataclass(frozen=True)
class Config:
    """An optimizer as the suite runs it: a registry spec, LABPAL hyper-parameters to set, and
    for SGD the rate (None: the task's tuned one)."""
    spec: str
    label: str
    hyper: Dict[str, Any] = field(default_factory=dict)
    lr: Optional[float] = None


LABPAL = {"labpal": Config("labpal", "LABPAL NSGD"),
          "labpal-m09": Config("labpal", "LABPAL NSGD β=0.9", {"momentum": 0.9}),
          "labpal-sgd": Config("labpal-sgd", "LABPAL SGD"),
          "labpal-sgd-m09": Config("labpal-sgd", "LABPAL SGD β=0.9", {"momentum": 0.9})}
PAPER = {"labpal-paper": Config("labpal-paper", "LABPAL NSGD paper"),
         "labpal-sgd-paper": Config("labpal-sgd-paper", "LABPAL SGD paper")}
# untuned: every one at its documented defaults, the task's weight decay through its argument
UNTUNED = {"adam": Config("adam", "Adam 1e-3"), "adamw": Config("adamw", "AdamW"),
           "prodigy": Config("prodigy", "Prodigy"), "sf-adamw": Config("sf-adamw", "SF-AdamW"),
           "dog": Config("dog", "DoG"), "dadapt-adam": Config("dadapt-adam", "D-Adapt Adam")}
TUNED_SGD = "sgd"          # the name the report gives tuned SGD; a run is "sgd@<rate>"


def config(name: str) -> Config:
    if name.startswith(TUNED_SGD + "@"):
        lr = float(name.split("@", 1)[1])
        return Config("sgd", f"SGD+mom. lr {lr:g}", lr=lr)
    for table in (LABPAL, PAPER, UNTUNED):
        if name in table:
            return table[name]
    raise ValueError(f"unknown suite optimizer {name!r}; known: "
                     f"{', '.join([*LABPAL, *PAPER, *UNTUNED, TUNED_SGD])}")


def sgd_name(lr: float) -> str:
    return f"{TUNED_SGD}@{lr:g}"
