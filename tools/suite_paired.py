"""Two quality-suite runs of LABPAL's four configurations, paired per seed: how a change of the
defaults moved each configuration over the whole suite (docs/algorithm.md "How often to measure",
docs/quality.md).

    PYTHONPATH=$PWD python tools/suite_paired.py BEFORE AFTER [--suffix S]

BEFORE and AFTER are result rows: a suite record (`OUT/report.jsonl`, committed under
benchmarks/suite/) or a results file. AFTER's configuration `name` is read as `name + S`
(an experiment that ran the configurations under other names); a configuration AFTER has no
rows of is left out. The baselines (Adam, tuned SGD,
...) come from BEFORE. Per configuration: the tasks within the parity margin before and after,
the paired difference summed over the tasks in margins of each task (+: better) and the tasks
that got worse by more than a margin.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from labpal_fast.cli import suite_tasks  # noqa: E402
from labpal_fast.cli.suite import read_rows  # noqa: E402
from labpal_fast.cli.suite_configs import LABPAL, config  # noqa: E402
from labpal_fast.cli.suite_report import TaskResults, margin  # noqa: E402


def table(before: List[Dict[str, Any]], after: List[Dict[str, Any]], suffix: str) -> List[str]:
    changed = {n + suffix: n for n in LABPAL}
    renamed = [dict(r, optimizer="after:" + changed[r["optimizer"]]) for r in after
               if r["optimizer"] in changed]
    rows = before + renamed
    tasks = [t for t in suite_tasks.SUITE if any(r["task"] == t for r in renamed)]
    seeds = sorted({r["seed"] for r in renamed})
    results = [TaskResults(suite_tasks.loaded(t), rows, seeds) for t in tasks]
    lines = [f"| configuration | parity tasks (of {len(tasks)}), before → after | "
             "Σ paired Δ (margins) | tasks worse by more than a margin |",
             "|---|---|---|---|"]
    for name in (n for n in LABPAL if any(r["optimizer"] == "after:" + n for r in renamed)):
        parity, total, worse = [0, 0], 0.0, []
        for res in results:
            ref, new = res.parity_ref(), "after:" + name
            for i, n in enumerate((name, new)):
                short = res.shortfall(n, ref)
                parity[i] += short is not None and short <= 0
            d = res.paired(new, name)
            moved = res.sign * d / margin(res.task.metric, res.mean(name))
            total += moved
            if moved < -1:
                worse.append(f"{res.task.name} {moved:+.1f}")
        lines.append(f"| {config(name).label} | {parity[0]} → {parity[1]} | {total:+.1f} | "
                     f"{', '.join(worse) or 'none'} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--suffix", default="", help="AFTER's name of each configuration: name + S")
    a = p.parse_args(argv)
    print("\n".join(table(read_rows(a.before), read_rows(a.after), a.suffix)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
