"""A run's files and what is made from them: metrics.csv, summary.json, lines.json, the PNG
plots and the markdown table. `rebuild(dir)` makes the plots and the table again from the
files alone (what `labpal-fast report DIR` does)."""
from __future__ import annotations

import csv
import json
import math
import os
import textwrap
from typing import Any, Dict, Iterable, List, Optional

from ..hyper import NAMES, Hyper

METRICS = "metrics.csv"
SUMMARY = "summary.json"
LINES = "lines.json"
TABLE = "results.md"
# one row per training step (kind "train") and per evaluation (kind "eval")
COLUMNS = ("optimizer", "step", "kind", "loss", "lr", "phase", "updates", "wall_time",
           "val_loss", "val_accuracy")
SMOOTH_WINDOW = 50   # training loss is a running mean over this many steps for the target


class ReportError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- files
def write_metrics(path: str, rows: Iterable[Dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in COLUMNS})


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


def read_metrics(path: str) -> List[Dict[str, Any]]:
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ReportError(f"{path} lacks the column(s) {missing}")
        for r in reader:
            out: Dict[str, Any] = {"optimizer": r["optimizer"], "kind": r["kind"],
                                   "phase": r["phase"]}
            out["step"] = int(r["step"])
            out["updates"] = int(r["updates"]) if r["updates"] else None
            for k in ("loss", "lr", "wall_time", "val_loss", "val_accuracy"):
                out[k] = float(r[k]) if r[k] != "" else None
            rows.append(out)
    return rows


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=2, allow_nan=True)
        f.write("\n")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


# ---------------------------------------------------------------------------- figures
def by_optimizer(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, List[Dict[str, Any]]]]:
    out: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    for r in rows:
        out.setdefault(r["optimizer"], {"train": [], "eval": []})[r["kind"]].append(r)
    return out


def running_mean(values: List[float], window: int) -> List[float]:
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def figures(rows: List[Dict[str, Any]], target_loss: Optional[float]) -> Dict[str, Dict[str, Any]]:
    """Final figures per optimizer from the metrics rows alone."""
    out = {}
    for name, parts in by_optimizer(rows).items():
        train, evals = parts["train"], parts["eval"]
        losses = [r["loss"] if r["loss"] is not None else float("nan") for r in train]
        smooth = running_mean(losses, SMOOTH_WINDOW)
        steps_to = None
        if target_loss is not None:
            for r, v in zip(train, smooth):
                if len(smooth) and v <= target_loss and r["step"] >= min(SMOOTH_WINDOW, len(train)):
                    steps_to = r["step"]
                    break
        steps = len(train)
        wall = train[-1]["wall_time"] if train else 0.0
        last = evals[-1] if evals else {}
        out[name] = {
            "steps_done": steps,
            "final_train_loss": smooth[-1] if smooth else None,
            "final_val_loss": last.get("val_loss"),
            "final_val_accuracy": last.get("val_accuracy"),
            "best_val_accuracy": max((e["val_accuracy"] for e in evals
                                      if e["val_accuracy"] is not None), default=None),
            "steps_to_target": steps_to,
            "train_time_s": wall,
            "ms_per_step": 1000.0 * wall / steps if steps else None,
        }
    sgd = out.get("sgd", {}).get("ms_per_step")
    for f in out.values():
        f["ms_per_step_vs_sgd"] = (f["ms_per_step"] / sgd) if sgd and f["ms_per_step"] else None
    return out


def table(figs: Dict[str, Dict[str, Any]], labels: Dict[str, str],
          target_loss: Optional[float]) -> str:
    tl = f"{target_loss:g}" if target_loss is not None else "target"
    head = ["optimizer", "val acc (final)", "val loss (final)", f"steps to train loss ≤ {tl}",
            "ms/step", "× SGD ms/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * 5) + "|"]
    for name, f in figs.items():
        def fmt(v, spec):
            return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
        acc = f["final_val_accuracy"]
        lines.append("| " + " | ".join([
            labels.get(name, name),
            "—" if acc is None else f"{100 * acc:.2f}%",
            fmt(f["final_val_loss"], ".4f"),
            fmt(f["steps_to_target"], "d"),
            fmt(f["ms_per_step"], ".2f"),
            fmt(f["ms_per_step_vs_sgd"], ".2f"),
        ]) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_loss_lr(rows, labels, path: str, title: str) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for name, parts in by_optimizer(rows).items():
        train = parts["train"]
        if not train:
            continue
        steps = [r["step"] for r in train]
        losses = [r["loss"] if r["loss"] is not None else float("nan") for r in train]
        window = max(1, min(SMOOTH_WINDOW, len(train) // 20 or 1))
        line, = ax1.plot(steps, running_mean(losses, window), label=labels.get(name, name), lw=1.4)
        ax1.plot(steps, losses, color=line.get_color(), alpha=0.15, lw=0.6)
        lrs = [r["lr"] if r["lr"] is not None else float("nan") for r in train]
        ax2.plot(steps, lrs, color=line.get_color(), label=labels.get(name, name), lw=1.2)
        meas = [r["step"] for r in train if r["phase"] == "measuring"]
        if meas:
            ax1.plot(meas, [losses[s - steps[0]] if 0 <= s - steps[0] < len(losses) else
                            float("nan") for s in meas], "|", color=line.get_color(), ms=6)
    ax1.set_yscale("log")
    ax1.set_ylabel("training loss (running mean, light: per step)")
    ax1.set_title(title)
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(loc="upper right", fontsize=9)
    ax2.set_yscale("log")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("step (one inference batch)")
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_validation(rows, labels, path: str, title: str) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, parts in by_optimizer(rows).items():
        ev = parts["eval"]
        if not ev:
            continue
        steps = [r["step"] for r in ev]
        ax1.plot(steps, [100 * (r["val_accuracy"] if r["val_accuracy"] is not None
                                else float("nan")) for r in ev],
                 label=labels.get(name, name), marker=".", lw=1.2)
        ax2.plot(steps, [r["val_loss"] if r["val_loss"] is not None else float("nan")
                         for r in ev], label=labels.get(name, name), marker=".", lw=1.2)
    ax1.set_ylabel("validation accuracy (%)")
    accs = [100 * r["val_accuracy"] for r in rows if r["kind"] == "eval"
            and r["val_accuracy"] is not None]
    if accs:
        top = max(accs)
        ax1.set_ylim(max(0.0, min(top - 15.0, sorted(accs)[len(accs) // 2] - 5)), min(100.5, top + 1))
    ax2.set_ylabel("validation loss")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pick_measurements(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Early, middle and late measurements (valid ones preferred, never the same twice)."""
    if not records:
        return []
    pool = [r for r in records if r.get("valid")] or records
    if len(pool) < 3 and len(records) >= 3:
        pool = records
    idx = sorted({0, (len(pool) - 1) // 2, len(pool) - 1})
    return [pool[i] for i in idx]


def plot_lines(records: List[Dict[str, Any]], path: str, title: str) -> bool:
    chosen = pick_measurements(records)
    if not chosen:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.6 * len(chosen), 4), squeeze=False)
    for ax, rec, when in zip(axes[0], chosen, ("early", "middle", "late")[-len(chosen):]
                             if len(chosen) < 3 else ("early", "middle", "late")):
        pos = [float(p) for p in rec["positions"]]
        means = [float("nan") if m is None else float(m) for m in rec["mean_losses"]]
        ax.plot(pos, means, "o", color="C0", ms=7, label="mean loss (measured)", zorder=3)
        a, b, c = (rec.get(k) for k in ("a", "b", "c"))
        s_min, s_upd = rec.get("s_min"), rec.get("s_upd")
        right = max([p for p in pos] + [v for v in (s_min, s_upd) if _finite(v)]) * 1.15
        if all(_finite(v) for v in (a, b, c)):
            n = 200
            xs = [right * i / (n - 1) for i in range(n)]
            ax.plot(xs, [a * x * x + b * x + c for x in xs], "-", color="C1",
                    label=f"fit {a:.3g}·s² {b:+.3g}·s {c:+.3g}")
        if _finite(s_min) and s_min > 0:
            ax.axvline(s_min, color="C2", ls="--", label=f"s_min = {s_min:.3g}")
        if _finite(s_upd):
            ax.axvline(s_upd, color="C3", ls=":", lw=2, label=f"s_upd = {s_upd:.3g}")
        status = "valid" if rec.get("valid") else (rec.get("reason") or "invalid")
        if not rec.get("valid"):
            ax.text(0.5, 0.5, textwrap.fill(status, 40), transform=ax.transAxes, ha="center",
                    va="center", fontsize=8, color="C3",
                    bbox=dict(boxstyle="round", fc="white", ec="C3", alpha=0.8))
        status = textwrap.shorten(status, 48, placeholder="…")
        ax.set_title(f"{when}: update {rec.get('update')} (call {rec.get('call')})\n{status}",
                     fontsize=9)
        ax.set_xlabel("distance s along −d/‖d‖")
        ax.set_ylabel("mean loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def labpal_notes(rows: List[Dict[str, Any]], lines: Dict[str, List[Dict[str, Any]]],
                 runs: List[Dict[str, Any]]) -> str:
    """A line per LABPAL run under the table: its updates, m (closure calls per update) and
    measurements, and why a run shorter than the warm-up took its rate from single ones."""
    notes = []
    for run in runs:
        records = lines.get(run["optimizer"])
        if records is None:
            continue
        settings = run.get("settings") or {}
        train = [r for r in rows if r["optimizer"] == run["optimizer"] and r["kind"] == "train"]
        updates = train[-1]["updates"] if train else 0
        ms = sorted({r["m"] for r in records})
        count = len(records)
        text = (f"{run.get('label', run['optimizer'])}: {updates} updates (m = "
                f"{', '.join(map(str, ms)) or '?'} closure call{'s' * (ms != [1])} per update), "
                f"{count} line "
                f"measurement{'s' * (count != 1)} ({sum(bool(r['valid']) for r in records)} "
                "valid)")
        warmup = settings.get("warmup_updates")
        if warmup is not None and updates < warmup:
            text += (f". The warm-up ({warmup} updates) was not reached, so no measurements "
                     "were averaged")
            if ms and ms[-1] > 1 and settings.get("noise_factor") is None:
                nu = Hyper(**{k: v for k, v in settings.items() if k in NAMES}).nu
                text += (f"; m comes from the noise factor ν = (128/batch_size)·(dataset_size/"
                         f"40000) = {nu:.2f}: on a run this short set noise_factor (README, "
                         "\"Quality without tuning\")")
        notes.append(text + ".")
    return "".join(f"\n{text}\n" for text in notes)


def results_text(figs: Dict[str, Dict[str, Any]], rows: List[Dict[str, Any]],
                 lines: Dict[str, List[Dict[str, Any]]], summary: Dict[str, Any]) -> str:
    """results.md: the table of `figs` (`figures(rows, ...)`), then the LABPAL runs' notes."""
    labels = {r["optimizer"]: r.get("label", r["optimizer"]) for r in summary.get("runs", [])}
    target = summary.get("settings", {}).get("target_loss")
    return table(figs, labels, target) + labpal_notes(rows, lines, summary.get("runs", []))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# ---------------------------------------------------------------------------- all of it
def rebuild(out_dir: str) -> Dict[str, Any]:
    """Plots and table from a run's files; returns {"table": str, "files": [...]}."""
    mpath, spath = os.path.join(out_dir, METRICS), os.path.join(out_dir, SUMMARY)
    for p in (mpath, spath):
        if not os.path.isfile(p):
            raise ReportError(f"{p} not found: is {out_dir!r} the --out directory of a run?")
    rows = read_metrics(mpath)
    with open(spath) as f:
        summary = json.load(f)
    lines_path = os.path.join(out_dir, LINES)
    lines = {}
    if os.path.isfile(lines_path):
        with open(lines_path) as f:
            lines = json.load(f)
    labels = {r["optimizer"]: r.get("label", r["optimizer"]) for r in summary.get("runs", [])}
    target = summary.get("settings", {}).get("target_loss")
    task = summary.get("task", {}).get("name", "?")
    figs = figures(rows, target)
    files = []
    title = f"{task}: {summary.get('settings', {}).get('steps', '?')} steps, " \
            f"batch {summary.get('settings', {}).get('batch_size', '?')}, " \
            f"seed {summary.get('settings', {}).get('seed', '?')}" + \
            (" (interrupted)" if summary.get("interrupted") else "")
    p = os.path.join(out_dir, "loss_lr.png")
    plot_loss_lr(rows, labels, p, title)
    files.append(p)
    p = os.path.join(out_dir, "val_accuracy.png")
    plot_validation(rows, labels, p, title)
    files.append(p)
    for name, records in lines.items():
        p = os.path.join(out_dir, f"lines_{name}.png")
        if plot_lines(records, p, f"{labels.get(name, name)} on {task}: line measurements"):
            files.append(p)
    text = results_text(figs, rows, lines, summary)
    with open(os.path.join(out_dir, TABLE), "w") as f:
        f.write(text)
    files.append(os.path.join(out_dir, TABLE))
    return {"table": text, "files": files, "figures": figs}
