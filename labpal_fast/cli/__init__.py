"""The `labpal-fast` command, apart from the optimizer: `command` (arguments, the three
subcommands), `training` (the loop `train` and `compare` share), `registry` (the optimizers it
can train with), `tasks` (built-in data and models) and `report` (files, plots, table).

numpy, scikit-learn, matplotlib and tqdm come with the `[cli]` extra; `import labpal_fast`
needs none of them. `main` checks them before importing the rest of this package, so that a
missing one stops the command at once rather than after training, when the plots are drawn.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import List, Optional, Sequence

# import name: distribution name (what pip installs)
NEEDS = {"numpy": "numpy", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def missing() -> List[str]:
    """The distributions of the `[cli]` extra that cannot be imported."""
    return [dist for name, dist in NEEDS.items() if importlib.util.find_spec(name) is None]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`labpal-fast`: exit code 2 and a one-line fix when the `[cli]` extra is missing."""
    absent = missing()
    if absent:
        # not `pip install 'labpal-fast[cli]'`: the package is on no public index
        print(f"labpal-fast needs {', '.join(absent)} (missing): pip install {' '.join(absent)} "
              "(or install the clone with its [cli] extra: pip install '.[cli]')", file=sys.stderr)
        return 2
    from .command import run
    return run(argv)


__all__ = ["main"]
