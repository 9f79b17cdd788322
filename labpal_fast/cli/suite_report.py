"""The quality suite's report: per task the final test figures (mean ± std over seeds) with the
paired per-seed differences against Adam(1e-3) and tuned SGD, and the targets of issue 19
(docs/quality.md) evaluated for LABPAL's four configurations:

- floor: no divergence (a non-finite loss, or a final training loss above the initial) and, on
  every seed, not in the lower half between the trivial predictor and tuned SGD (its mean);
- parity: the paired mean difference to the weaker of Adam(1e-3) and tuned SGD (by mean) within
  the margin;
- the paper's claim: NSGD within the margin of tuned SGD on at least 80% of the counted tasks.

Margins: 1 accuracy point, 3% of bits per char, 10% of MSE (of the reference figure). A task
counts when the best and worst baseline means (Adam, AdamW, tuned SGD, the peers) differ by at
least 3 margins. Reported beyond: the best untuned peer per task against LABPAL.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, Dict, List, Optional, Sequence

from . import suite_tasks
from .suite_configs import LABPAL, PAPER, TUNED_SGD, UNTUNED, config, sgd_name

MARGINS = {"accuracy": ("abs", 1.0), "bits": ("rel", 0.03), "mse": ("rel", 0.10)}
UNITS = {"accuracy": "test accuracy %, higher is better", "bits": "test bits/char, lower is better",
         "mse": "test MSE (standardized target), lower is better"}
COUNT_MARGINS = 3          # a task counts when its baselines spread over this many margins
CLAIM_SHARE = 0.8          # (c): NSGD within the margin of tuned SGD on this share of tasks
DIGITS_MEAN, DIGITS_EVERY = 95.0, 90.0    # item 2's digits MLP: mean over seeds, every seed


def tuned_rate(task: str, lrs: Sequence[float], known: Dict[tuple, Dict[str, Any]], seed: int,
               higher_is_better: bool) -> Optional[float]:
    """SGD's rate with the best final validation figure on `seed` (None until all have run)."""
    rows = [known.get((task, sgd_name(lr), seed)) for lr in lrs]
    if any(r is None for r in rows):
        return None

    def goodness(row):
        v = row.get("val_figure", math.nan)
        if v is None or not math.isfinite(v) or row.get("diverged"):
            return -math.inf
        return v if higher_is_better else -v
    return max(zip(lrs, rows), key=lambda lr_row: goodness(lr_row[1]))[0]


def margin(metric: str, ref: float) -> float:
    kind, size = MARGINS[metric]
    return size if kind == "abs" else size * abs(ref)


def _mean(values: Sequence[float]) -> float:
    good = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.mean(good) if len(good) == len(values) and good else math.nan


class TaskResults:
    """One task's figures: {optimizer: {seed: row}}, tuned SGD under TUNED_SGD."""

    def __init__(self, t: suite_tasks.SuiteTask, rows: List[Dict[str, Any]], seeds: Sequence[int]):
        self.task, self.seeds = t, list(seeds)
        self.runs: Dict[str, Dict[int, Dict[str, Any]]] = {}
        for r in rows:
            if r["task"] == t.name and r["seed"] in self.seeds:
                self.runs.setdefault(r["optimizer"], {})[r["seed"]] = r
        known = {(t.name, o, s): r for o, per in self.runs.items() for s, r in per.items()}
        self.sgd_lr = tuned_rate(t.name, t.sgd_lrs, known, self.seeds[0], t.higher_is_better)
        if self.sgd_lr is not None:
            self.runs[TUNED_SGD] = self.runs[sgd_name(self.sgd_lr)]
        self.sign = 1.0 if t.higher_is_better else -1.0

    def figures(self, name: str) -> Dict[int, float]:
        return {s: (r["figure"] if r.get("figure") is not None else math.nan)
                for s, r in self.runs.get(name, {}).items()}

    def mean(self, name: str) -> float:
        figs = self.figures(name)
        return _mean([figs.get(s) for s in self.seeds]) if figs else math.nan

    def paired(self, name: str, ref: str) -> Optional[float]:
        """The mean over common seeds of (figure − reference's figure), in the figure's unit;
        a seed where only the reference diverged is left out (`name` is ahead there: see
        `ref_diverged`), one where `name` diverged makes it NaN."""
        a, b = self.figures(name), self.figures(ref)
        common = [s for s in self.seeds if s in a and s in b
                  and s not in self.ref_diverged(name, ref)]
        return _mean([a[s] - b[s] for s in common]) if common else None

    def ref_diverged(self, name: str, ref: str) -> List[int]:
        """Seeds where the reference's figure is not finite and `name`'s is."""
        a, b = self.figures(name), self.figures(ref)
        return [s for s in self.seeds if s in a and s in b and math.isfinite(a[s])
                and not math.isfinite(b[s])]

    def better(self, a: float, b: float) -> bool:
        return self.sign * (a - b) > 0

    def shortfall(self, name: str, ref: str) -> Optional[float]:
        """How far `name` misses the margin of `ref` (≤ 0: within it), paired."""
        d = self.paired(name, ref)
        if d is None:
            return None
        left_out = self.ref_diverged(name, ref)
        figs = self.figures(ref)
        base = _mean([figs.get(s) for s in self.seeds if s not in left_out])
        return -self.sign * d - margin(self.task.metric, base)

    def baseline_names(self) -> List[str]:
        return [n for n in list(UNTUNED) + [TUNED_SGD] if n in self.runs]

    def counts(self) -> Optional[bool]:
        means = [m for m in map(self.mean, self.baseline_names()) if math.isfinite(m)]
        if len(means) < 2:
            return None
        best = max(means, key=lambda m: self.sign * m)
        return max(means) - min(means) >= COUNT_MARGINS * margin(self.task.metric, best)

    def floor(self, name: str) -> List[str]:
        """The floor's failures of `name`, one phrase per failing seed."""
        out = []
        mid = (self.task.trivial + self.mean(TUNED_SGD)) / 2 if TUNED_SGD in self.runs else None
        for s, r in sorted(self.runs.get(name, {}).items()):
            if r.get("error"):
                out.append(f"seed {s} failed")
            elif r.get("diverged"):
                out.append(f"seed {s} diverged")
            elif mid is not None and math.isfinite(mid) and self.better(mid, r["figure"]):
                out.append(f"seed {s} {r['figure']:.3g} in the lower half (mid {mid:.3g})")
        return out

    def parity_ref(self) -> Optional[str]:
        """The weaker of Adam(1e-3) and tuned SGD by mean."""
        have = [n for n in ("adam", TUNED_SGD) if n in self.runs]
        if len(have) < 2:
            return have[0] if have else None
        a, b = (self.mean(n) for n in have)
        return have[0] if not math.isfinite(b) or self.better(b, a) else have[1]

    def best_peer(self) -> Optional[str]:
        peers = [n for n in UNTUNED if n in self.runs and math.isfinite(self.mean(n))]
        return max(peers, key=lambda n: self.sign * self.mean(n)) if peers else None


# ---------------------------------------------------------------------------- text
def _fmt(v: Optional[float], spec: str = ".3g") -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, spec)


def _signed(v: Optional[float]) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:+.3g}"


def _label(name: str, res: TaskResults) -> str:
    if name == TUNED_SGD:
        return f"tuned SGD (lr {res.sgd_lr:g})"
    return config(name).label


def _steps(res: TaskResults) -> str:
    return ", ".join(map(str, sorted({r["steps"] for per in res.runs.values()
                                      for r in per.values()}))) or "?"


def task_table(res: TaskResults) -> List[str]:
    t = res.task
    counts = res.counts()
    lines = [f"### {t.name}", "",
             f"{t.description}; {_steps(res)} steps. {UNITS[t.metric]}; trivial predictor "
             f"{t.trivial:.4g}; counts: {'—' if counts is None else 'yes' if counts else 'no'}."
             + (f" {t.note}." if t.note else ""), "",
             "| optimizer | mean ± std | seeds | Δ vs Adam | Δ vs tuned SGD | diverged |",
             "|---|---:|---|---:|---:|---:|"]
    order = [n for n in list(LABPAL) + list(PAPER) + list(UNTUNED) + [TUNED_SGD] if n in res.runs]
    for name in order:
        figs = res.figures(name)
        vals = [figs[s] for s in sorted(figs)]
        mean = res.mean(name)
        std = statistics.stdev(vals) if len(vals) > 1 and all(map(math.isfinite, vals)) else None
        lines.append("| " + " | ".join([
            _label(name, res), _fmt(mean, ".4g") + (f" ± {std:.2g}" if std is not None else ""),
            ", ".join(_fmt(v, ".4g") for v in vals),
            _signed(res.paired(name, "adam")) if name != "adam" else "",
            _signed(res.paired(name, TUNED_SGD)) if name != TUNED_SGD else "",
            str(sum(bool(r.get("diverged")) for r in res.runs[name].values()))]) + " |")
    grid = [(lr, res.runs.get(sgd_name(lr), {}).get(res.seeds[0])) for lr in t.sgd_lrs]
    if all(r is not None for _, r in grid):
        lines += ["", f"SGD's rates on seed {res.seeds[0]} (final validation figure): " + ", ".join(
            f"{lr:g}: {_fmt(r.get('val_figure'), '.4g')}" for lr, r in grid)]
    first = [(n, res.runs[n].get(res.seeds[0])) for n in LABPAL if n in res.runs]
    described = [f"{config(n).label} {r['labpal']['updates']} updates, "
                 f"{r['labpal']['measurements']} measurements ({r['labpal']['averaged']} "
                 f"averaged after the warm-up), m = {', '.join(map(str, r['labpal']['m']))}"
                 for n, r in first if r and r.get("labpal")]
    if described:
        lines += ["", f"Seed {res.seeds[0]}: " + "; ".join(described) + "."]
    return lines + [""]


def _diverged_note(res: "TaskResults", name: str, ref: str) -> str:
    seeds = res.ref_diverged(name, ref) if ref in res.runs and name in res.runs else []
    return f" ({config(ref).label if ref != TUNED_SGD else 'tuned SGD'} diverged on seed " \
        f"{', '.join(map(str, seeds))}: left out)" if seeds else ""


def _miss(short: Optional[float]) -> str:
    if short is None:
        return "—"
    return "ok" if short <= 0 else f"✗ by {short:.3g}"


def targets(results: List[TaskResults]) -> List[str]:
    configs = [n for n in LABPAL if any(n in r.runs for r in results)]
    lines = ["## Targets", "",
             "Floor: no divergence, and every seed above the middle between the trivial "
             "predictor and tuned SGD. Parity: the paired mean within the margin of the weaker "
             "of Adam(1e-3) and tuned SGD. A cell says `ok`, or by how much the target is missed "
             "(beyond the margin, in the task's unit).", "",
             "| task | counts | parity reference | " + " | ".join(
                 f"{config(n).label}: floor / parity" for n in configs) +
             " | NSGD vs tuned SGD | best untuned peer | NSGD vs it |",
             "|---|---|---|" + "---|" * len(configs) + "---|---|---|"]
    tally = {n: [0, 0, 0] for n in configs}     # floor passes, parity passes, tasks
    claim = [0, 0]
    for res in results:
        ref = res.parity_ref()
        cells = []
        for n in configs:
            if n not in res.runs:
                cells.append("—")
                continue
            fails = res.floor(n)
            short = res.shortfall(n, ref) if ref else None
            tally[n][0] += not fails
            tally[n][1] += short is not None and short <= 0
            tally[n][2] += 1
            cells.append(("ok" if not fails else "✗ " + "; ".join(fails)) + " / " + _miss(short))
        counts = res.counts()
        claim_short = res.shortfall("labpal", TUNED_SGD) if TUNED_SGD in res.runs else None
        if counts and claim_short is not None:
            claim[0] += claim_short <= 0
            claim[1] += 1
        peer = res.best_peer()
        lines.append("| " + " | ".join(
            [res.task.name, "—" if counts is None else "yes" if counts else "no",
             _label(ref, res) if ref else "—"] + cells +
            [_miss(claim_short) + _diverged_note(res, "labpal", TUNED_SGD),
             f"{config(peer).label} {res.mean(peer):.4g}" if peer else "—",
             _signed(res.paired("labpal", peer)) if peer else "—"]) + " |")
    lines.append("")
    for n in configs:
        f, p, total = tally[n]
        lines.append(f"- {config(n).label}: floor met on {f} of {total} tasks, parity on {p} of "
                     f"{total}.")
    if claim[1]:
        share = claim[0] / claim[1]
        lines.append(f"- The paper's claim (NSGD within the margin of tuned SGD on ≥ "
                     f"{CLAIM_SHARE:.0%} of the counted tasks): {claim[0]} of {claim[1]} "
                     f"({share:.0%}) — {'met' if share >= CLAIM_SHARE else 'missed'}; "
                     f"{claim[1]} task(s) count (≥ 8 wanted).")
    digits = next((r for r in results if r.task.name == "digits-mlp"), None)
    if digits is not None:
        parts = []
        for n in configs:
            figs = list(digits.figures(n).values())
            if figs:
                ok = digits.mean(n) >= DIGITS_MEAN and min(figs) >= DIGITS_EVERY
                parts.append(f"{config(n).label} {digits.mean(n):.1f} (min {min(figs):.1f}) "
                             f"{'ok' if ok else '✗'}")
        lines.append(f"- digits MLP (mean ≥ {DIGITS_MEAN:g}%, every seed ≥ {DIGITS_EVERY:g}%): "
                     + "; ".join(parts) + ".")
    return lines + [""]


def cpu_time(rows: List[Dict[str, Any]], tasks: Sequence[str], seeds: Sequence[int]) -> List[str]:
    """The budget's check: CPU seconds of all tasks for one (optimizer, seed), at 1 thread (the
    process's CPU time, so other load on the machine does not count)."""
    per: Dict[tuple, float] = {}
    for r in rows:
        if r["task"] in tasks and r["seed"] in seeds and r.get("cpu_s") is not None:
            per[(r["optimizer"], r["seed"])] = per.get((r["optimizer"], r["seed"]), 0.0) + r["cpu_s"]
    if not per:
        return []
    slowest = max(per, key=per.get)
    return [f"CPU time of all {len(tasks)} tasks for one (optimizer, seed): "
            f"{min(per.values()):.0f}–{per[slowest]:.0f} s (the most: {slowest[0]}, seed "
            f"{slowest[1]}).", ""]


# ---------------------------------------------------------------------------- plots
def plot(res: TaskResults, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in list(LABPAL) + list(PAPER) + list(UNTUNED) + [TUNED_SGD] if n in res.runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(names):
        first = res.runs[name].get(res.seeds[0])
        if first and first.get("curve"):
            steps, losses = zip(*[(s, v if v is not None else math.nan) for s, v in first["curve"]])
            ax1.plot(steps, losses, label=_label(name, res), lw=1.2)
        figs = res.figures(name)
        ax2.plot([i] * len(figs), list(figs.values()), "o", ms=5, color=f"C{i % 10}")
        ax2.plot([i - 0.3, i + 0.3], [res.mean(name)] * 2, color=f"C{i % 10}", lw=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"training loss (running mean, seed {res.seeds[0]})")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.axhline(res.task.trivial, color="grey", ls=":", label="trivial predictor")
    if TUNED_SGD in res.runs:
        ax2.axhline((res.task.trivial + res.mean(TUNED_SGD)) / 2, color="C3", ls="--",
                    label="floor (middle to tuned SGD)")
    ax2.set_xticks(range(len(names)), [_label(n, res) for n in names], rotation=60, ha="right",
                   fontsize=7)
    ax2.set_ylabel(UNITS[res.task.metric])
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(f"{res.task.name}: {res.task.description}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- all of it
# OUT/report.jsonl: what the report was made from (its header, then every row it read, the loss
# curves left out), so that a copy committed with the documentation (benchmarks/suite/) renders
# the same tables again: tools/check_figures.py compares them with docs/suite_results.md and
# docs/quality.md
RECORD = "report.jsonl"
_CURVES = ("curve", "val_curve")


def render(rows: List[Dict[str, Any]], tasks: Sequence[str], seeds: Sequence[int],
           info: Dict[str, Any]) -> str:
    """The report's markdown (suite.md)."""
    results = [TaskResults(suite_tasks.loaded(t), rows, seeds) for t in tasks]
    v = info.get("versions", {})
    lines = ["# Quality suite", "",
             f"{info.get('date')}, tier {info.get('tier')}, seeds {', '.join(map(str, seeds))}, "
             f"{info.get('workers')} worker(s) × 1 thread on {info.get('machine')}; torch "
             f"{v.get('torch')}, labpal_fast {v.get('labpal_fast')}.", ""]
    lines += targets(results)
    lines += cpu_time(rows, tasks, seeds)
    lines += ["## Per task", "", "Δ: the mean over seeds of the per-seed difference (same "
              "initialization and batch order), in the task's unit.", ""]
    for res in results:
        lines += task_table(res)
    return "\n".join(lines)


def write_record(path: str, rows: List[Dict[str, Any]], tasks: Sequence[str],
                 seeds: Sequence[int], info: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        f.write(json.dumps({"report": {"info": info, "tasks": list(tasks),
                                       "seeds": list(seeds)}}) + "\n")
        for row in sorted(rows, key=lambda r: (r["task"], r["optimizer"], r["seed"])):
            f.write(json.dumps({k: v for k, v in row.items() if k not in _CURVES},
                               allow_nan=True) + "\n")


def render_record(path: str) -> str:
    """The report of a report.jsonl, as `write` made it."""
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines or "report" not in lines[0]:
        raise ValueError(f"{path} is not a suite report record (its first line holds no "
                         f"'report' header): copy the OUT/{RECORD} that `labpal-fast suite` wrote")
    head = lines[0]["report"]
    return render(lines[1:], head["tasks"], head["seeds"], head["info"])


def write(rows: List[Dict[str, Any]], tasks: Sequence[str], seeds: Sequence[int], out: str,
          info: Dict[str, Any], plots: bool = True) -> str:
    """suite.md, its record report.jsonl (and plots/<task>.png) in `out`; returns the
    markdown."""
    text = render(rows, tasks, seeds, info)
    with open(os.path.join(out, "suite.md"), "w") as f:
        f.write(text + "\n")
    write_record(os.path.join(out, RECORD), rows, tasks, seeds, info)
    if plots:
        os.makedirs(os.path.join(out, "plots"), exist_ok=True)
        for t in tasks:
            res = TaskResults(suite_tasks.loaded(t), rows, seeds)
            plot(res, os.path.join(out, "plots", f"{t}.png"))
    return text
