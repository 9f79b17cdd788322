"""What every benchmark prints around its table: what is compared and on what machine, ratios
with their spread over the rounds, and a warning when the machine is loaded (a load average
above the core count: other processes take turns on the cores, and a ratio measured then can
be off by 2x, as seen on shared machines).

`emit(title, text)` prints the table at once (seen with `pytest -s` or when a bench file runs
as a script) and keeps it for the end of the pytest run (benchmarks/conftest.py prints them all
in the terminal summary, so `pytest benchmarks -q` shows them too)."""
from __future__ import annotations

import os
import statistics
from typing import Dict, List, Optional

import torch

TABLES: List[str] = []


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} cores, load average {load:.1f} (last minute)")


def load_warning() -> Optional[str]:
    """A warning when the 1-minute load average is above the core count, else None."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"WARNING: load average {load:.1f} is above the {cores} cores: other processes "
            "share them, so these times and ratios are noise-prone (a spread over rounds wider "
            "than 10% says so too); rerun on an idle machine before reading a result")


def ratio_table(per_round: Dict[str, List[float]], what: str, base: Optional[str] = None) -> str:
    """A markdown table of `per_round` (name -> seconds in each round, the rounds interleaved):
    best time, and the time relative to `base` (default: the first entry) as the median of the
    per-round ratios with their smallest and largest (the spread)."""
    base = base or next(iter(per_round))
    rows = [f"| {what} | best ms | × {base} (median of rounds) | spread (min–max) |",
            "|---|---:|---:|---:|"]
    for name, times in per_round.items():
        ratios = [t / b for t, b in zip(times, per_round[base])]
        rows.append(f"| {name} | {1e3 * min(times):.2f} | {statistics.median(ratios):.2f} | "
                    f"{min(ratios):.2f}–{max(ratios):.2f} |")
    return "\n".join(rows)


def header(title: str) -> str:
    """`title` (what is compared), the machine, and the load warning when there is one."""
    warning = load_warning()
    return f"{title}\n{machine()}" + (f"\n{warning}" if warning else "")


def emit(title: str, text: str) -> str:
    """Prints and keeps `text` under `header(title)`."""
    block = header(title) + "\n" + text
    TABLES.append(block)
    print("\n" + block)
    return block
