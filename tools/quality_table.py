"""Regenerates the quality table of docs/paper_and_quality.md (outside CI: about an hour on 2 CPU cores).

Every built-in task (and a small-batch variant) with several seeds, each optimizer at its
defaults, through `labpal-fast compare` (same data, same start, same batches for all of them).
The figure is the final validation accuracy (digits, spirals) or validation bits per
character (charlm), as the mean over seeds; a run that diverged or ended with a NaN counts as
such. The measurement's share of training time is measured from the runs' own timings: the
wall time of the closure calls made while measuring (their line evaluations included) over
the whole training time (`metrics.csv`, column `phase`): an upper bound, as it counts the
measurement's own update and its m gradient calls too.

    .venv/bin/python tools/quality_table.py --out runs/quality          # all of it
    .venv/bin/python tools/quality_table.py --tasks spirals --seeds 0 --steps 300   # a quick look
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

from table_output import save_and_print  # tools/table_output.py (the script's folder)

# name in the table: (task, batch size or None for the task's own, extra arguments). The last
# one is not a default but what was tried where LABPAL misses Adam (docs/paper_and_quality.md): charlm with one
# inference batch per update instead of the noise factor's m = 8.
VARIANTS = {"digits": ("digits", None, ()), "spirals": ("spirals", None, ()),
            "charlm": ("charlm", None, ()), "digits-b16": ("digits", 16, ()),
            "charlm-nu1": ("charlm", None, ("--noise-factor", "1"))}
DEFAULT_VARIANTS = "digits,spirals,charlm,digits-b16"
DEFAULT_OPTIMIZERS = "labpal,labpal-sgd,labpal-paper,labpal-sgd-paper,adam,sgd"


def run_compare(variant: str, seed: int, optimizers: str, out: str, steps: Optional[int],
                threads: int) -> str:
    task, batch, extra = VARIANTS[variant]
    path = os.path.join(out, f"{variant}-seed{seed}")
    if os.path.isfile(os.path.join(path, "summary.json")):
        return path  # done by an earlier, interrupted call: keep it
    cmd = [sys.executable, "-m", "labpal_fast", "compare", "--task", task, "--seed", str(seed),
           "--optimizers", optimizers, "--out", path, "--quiet", "--no-plots",
           "--threads", str(threads), "--device", "cpu"]
    if batch is not None:
        cmd += ["--batch-size", str(batch)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    cmd += list(extra)
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return path


def figure(run: Dict, task: str) -> float:
    """The final validation figure: accuracy in %, or bits per character for charlm."""
    if run.get("diverged"):
        return math.nan
    if task == "charlm":
        loss = run.get("final_val_loss")
        return math.nan if loss is None else loss / math.log(2)
    acc = run.get("final_val_accuracy")
    return math.nan if acc is None else 100 * acc


def measuring_share(path: str, optimizer: str) -> float:
    """The wall time of the calls made while measuring over the whole training time."""
    with open(os.path.join(path, "metrics.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["optimizer"] == optimizer and r["kind"] == "train"]
    total = measuring = 0.0
    before = 0.0
    for r in rows:
        t = float(r["wall_time"])
        total, spent = t, t - before
        before = t
        if r["phase"] == "measuring":
            measuring += spent
    return measuring / total if total else math.nan


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=DEFAULT_VARIANTS,
                   help=f"any of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS)
    p.add_argument("--steps", type=int, default=None, help="default: each task's own")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/quality")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    names = a.optimizers.split(",")
    cells: Dict[str, Dict[str, List[float]]] = {}
    shares: Dict[str, List[float]] = {}
    labels: Dict[str, str] = {}
    for variant in a.tasks.split(","):
        task = VARIANTS[variant][0]
        for seed in seeds:
            path = run_compare(variant, seed, a.optimizers, a.out, a.steps, a.threads)
            with open(os.path.join(path, "summary.json")) as f:
                summary = json.load(f)
            for run in summary["runs"]:
                labels[run["optimizer"]] = run["label"]
                cells.setdefault(variant, {}).setdefault(run["optimizer"], []).append(
                    figure(run, task))
                if run["optimizer"].startswith("labpal"):
                    shares.setdefault(run["optimizer"], []).append(
                        measuring_share(path, run["optimizer"]))
    head = "| task (figure) | " + " | ".join(labels.get(n, n) for n in names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 1)]
    for variant, per in cells.items():
        unit = "val bits/char, lower is better" if VARIANTS[variant][0] == "charlm" \
            else "val accuracy %"
        row = [f"{variant} ({unit})"]
        for n in names:
            vals = per.get(n, [])
            nan = sum(math.isnan(v) for v in vals)
            good = [v for v in vals if not math.isnan(v)]
            text = f"{statistics.mean(good):.2f}" if good else "—"
            if len(good) > 1:
                text += f" ± {statistics.stdev(good):.2f}"
            if nan:
                text += f" ({nan} NaN/diverged)"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"Mean over seeds {seeds} (± the standard deviation across seeds). Share of "
                 "training wall time spent measuring: " + ", ".join(
                     f"{labels.get(n, n)} {100 * statistics.mean(v):.1f}%"
                     for n, v in shares.items()))
    save_and_print(a.out, "quality.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
