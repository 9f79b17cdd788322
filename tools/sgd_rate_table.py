"""SGD mode's two rates side by side (outside CI: about 15 minutes on one CPU core).

Each task and seed trains LABPAL in SGD mode twice through `labpal-fast train --optimizer
labpal-sgd`, once per `--sgd-rate` ("paper": η = s_upd/‖d‖ of the measurement; "robust", the
default: η = s_upd/n̄, n̄ the running mean of ‖d‖ over training updates, each step at most
2·s_upd; docs/algorithm.md "SGD mode"), every other setting at its default. It prints the final
validation figure of every run (accuracy %, or bits per character for charlm), the mean over
seeds, and how many runs diverged and how many training losses were NaN/inf.

    .venv/bin/python tools/sgd_rate_table.py --out runs/sgd_rate             # all of it
    .venv/bin/python tools/sgd_rate_table.py --tasks digits-b32 --seeds 0    # a quick look

A run already in --out (its summary.json) is read, not run again. Every run's figures also go to
OUT/runs.jsonl; a copy committed as benchmarks/sgd_rate/runs.jsonl is what the documentation's
tables are rendered from again (`--record FILE`: the table of a runs.jsonl, nothing trained;
`make check-figures` compares it with docs/usage.md and benchmarks/RESULTS.md).
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
from typing import Dict, List, Optional, Tuple

from table_output import save_and_print  # tools/table_output.py (the script's folder)

# (name in the table, task, batch size or None for the task's own)
VARIANTS = {"digits-b32": ("digits", 32), "spirals": ("spirals", None),
            "charlm": ("charlm", None), "digits": ("digits", None)}
RATES = ("paper", "robust")


def run_train(variant: str, seed: int, rate: str, out: str, threads: int,
              steps: Optional[int]) -> str:
    task, batch = VARIANTS[variant]
    path = os.path.join(out, f"{variant}-{rate}-seed{seed}")
    if os.path.isfile(os.path.join(path, "summary.json")):
        return path  # done by an earlier, interrupted call: keep it
    cmd = [sys.executable, "-m", "labpal_fast", "train", "--optimizer", "labpal-sgd",
           "--sgd-rate", rate, "--task", task, "--seed", str(seed), "--out", path, "--quiet",
           "--no-plots", "--threads", str(threads), "--device", "cpu"]
    if batch is not None:
        cmd += ["--batch-size", str(batch)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return path


def result(path: str, task: str) -> Tuple[float, bool, int, float]:
    """(final validation figure, diverged, non-finite training losses, final training loss)
    of one run."""
    with open(os.path.join(path, "summary.json")) as f:
        run = json.load(f)["runs"][0]
    train = run.get("final_train_loss")
    train = math.nan if train is None else float(train)
    if task == "charlm":
        loss = run.get("final_val_loss")
        value = math.nan if loss is None else loss / math.log(2)
    else:
        acc = run.get("final_val_accuracy")
        value = math.nan if acc is None else 100 * acc
    with open(os.path.join(path, "metrics.csv"), newline="") as f:
        bad = sum(1 for r in csv.DictReader(f)
                  if r["kind"] == "train" and not math.isfinite(float(r["loss"])))
    diverged = bool(run.get("diverged")) or not math.isfinite(value)
    return value, diverged, bad, train


def table(runs: List[Dict]) -> List[str]:
    """The markdown table of the runs' figures (dicts of variant, rate, seed, value, diverged,
    bad, train), tasks and rates in the order they come."""
    seeds = sorted({r["seed"] for r in runs})
    lines = ["| task (figure) | sgd_rate | per seed " + ", ".join(map(str, seeds)) +
             " | mean | final train loss per seed | diverged runs | NaN/inf train losses |",
             "|---|---|---|---:|---|---:|---:|"]
    for variant, rate in dict.fromkeys((r["variant"], r["rate"]) for r in runs):
        got = sorted((r for r in runs if (r["variant"], r["rate"]) == (variant, rate)),
                     key=lambda r: r["seed"])
        unit = "val bits/char, lower is better" if VARIANTS[variant][0] == "charlm" \
            else "val accuracy %"
        finite = [g["value"] for g in got if math.isfinite(g["value"])]
        mean = f"{statistics.mean(finite):.2f}" if finite else "—"
        lines.append(f"| {variant} ({unit}) | {rate} | "
                     + ", ".join(f"{g['value']:.2f}" for g in got) + f" | {mean} | "
                     + ", ".join(f"{g['train']:.3g}" for g in got)
                     + f" | {sum(g['diverged'] for g in got)} | {sum(g['bad'] for g in got)} |")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=None, help="default: each task's own")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/sgd_rate")
    p.add_argument("--record", help="print the table of this runs.jsonl; train nothing")
    a = p.parse_args(argv)
    if a.record:
        with open(a.record) as f:
            print("\n".join(table([json.loads(line) for line in f if line.strip()])))
        return 0
    runs = []
    for variant in a.tasks.split(","):
        for rate in RATES:
            for seed in map(int, a.seeds.split(",")):
                value, diverged, bad, train = result(
                    run_train(variant, seed, rate, a.out, a.threads, a.steps), VARIANTS[variant][0])
                runs.append(dict(variant=variant, rate=rate, seed=seed, value=value,
                                 diverged=diverged, bad=bad, train=train))
    with open(os.path.join(a.out, "runs.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in runs)
    save_and_print(a.out, "sgd_rate.md", table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
