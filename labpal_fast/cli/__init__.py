"""The `labpal-fast` command, apart from the optimizer: `command` (arguments, the three
subcommands), `training` (the loop `train` and `compare` share), `registry` (the optimizers it
can train with), `tasks` (built-in data and models) and `report` (files, plots, table)."""
from .command import main

__all__ = ["main"]
