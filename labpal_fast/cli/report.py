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
# step_size: LABPAL's s_upd, the distance an update moves along −d/‖d‖ (empty for the others)
COLUMNS = ("optimizer", "step", "kind", "loss", "lr", "phase", "updates", "wall_time",
           "val_loss", "val_accuracy", "step_size")
OPTIONAL = ("step_size",)  # absent from the files of older runs
LN2 = math.log(2.0)
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
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or []) and c not in OPTIONAL]
        if missing:
            raise ReportError(f"{path} lacks the column(s) {missing}")
        for r in reader:
            out: Dict[str, Any] = {"optimizer": r["optimizer"], "kind": r["kind"],
                                   "phase": r["phase"]}
            out["step"] = int(r["step"])
            out["updates"] = int(r["updates"]) if r["updates"] else None
            for k in ("loss", "lr", "wall_time", "val_loss", "val_accuracy", "step_size"):
                out[k] = float(r[k]) if r.get(k) not in ("", None) else None
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


def bits_per(summary: Dict[str, Any]) -> Optional[str]:
    """'character' when the task's loss is reported in bits per character (a language model:
    the loss is cross-entropy in nats, shown divided by ln 2), else None."""
    return (summary.get("task") or {}).get("bits_per")


def table(figs: Dict[str, Dict[str, Any]], labels: Dict[str, str],
          target_loss: Optional[float], bits: Optional[str] = None) -> str:
    def fmt(v, spec):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
    if bits:
        unit = f"bits/{'char' if bits == 'character' else bits}"
        tl = f"{target_loss / LN2:.3g}" if target_loss is not None else "target"
        head = ["optimizer", f"val {unit} (final)", f"steps to train {unit} ≤ {tl}"]
    else:
        tl = f"{target_loss:g}" if target_loss is not None else "target"
        head = ["optimizer", "val acc (final)", "val loss (final)", f"steps to train loss ≤ {tl}"]
    head += ["ms/step", "× SGD ms/step"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, f in figs.items():
        acc, loss = f["final_val_accuracy"], f["final_val_loss"]
        cells = [labels.get(name, name)]
        if bits:
            cells.append(fmt(None if loss is None else loss / LN2, ".4f"))
        else:
            cells += ["—" if acc is None else f"{100 * acc:.2f}%", fmt(loss, ".4f")]
        cells += [fmt(f["steps_to_target"], "d"), fmt(f["ms_per_step"], ".2f"),
                  fmt(f["ms_per_step_vs_sgd"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _floored(values: List[float], floor: float) -> List[float]:
    """Values for a log axis: a loss of exactly 0 (or below `floor`) is drawn at `floor`, the
    axis' bottom edge, so that the line stays whole instead of breaking off."""
    return [v if not _finite(v) or v > floor else floor for v in values]


def _log_floor(series: Iterable[List[float]]) -> float:
    positive = [v for vs in series for v in vs if _finite(v) and v > 0]
    return min(positive) / 3 if positive else 1e-12


def _in(values: List[Optional[float]], scale: float = 1.0) -> List[float]:
    return [float("nan") if v is None else v * scale for v in values]


def plot_loss_lr(rows, labels, path: str, title: str, modes: Optional[Dict[str, str]] = None,
                 bits: Optional[str] = None) -> None:
    """Training loss (running mean and per step), the learning rate of every optimizer whose
    rate is one (SGD, Adam, LABPAL in SGD mode) and, for LABPAL, its step size s_upd: in NSGD
    mode the rate s_upd/‖d‖ means nothing by itself (it grows as ‖d‖ shrinks)."""
    plt = _plt()
    # LABPAL runs with a recorded step size (older runs' files have none: their rate is shown)
    modes = {n: mode for n, mode in (modes or {}).items() if any(
        _finite(r.get("step_size")) and r["step_size"] > 0
        for r in by_optimizer(rows).get(n, {}).get("train", []))}
    labpal = [n for n in by_optimizer(rows) if n in modes]
    panels = 3 if labpal else 2
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3.2 * panels + 0.6), sharex=True)
    ax1, ax2 = axes[0], axes[1]
    scale = 1 / LN2 if bits else 1.0
    parts_of = by_optimizer(rows)
    losses_of = {n: _in([r["loss"] for r in p["train"]], scale) for n, p in parts_of.items()}
    smooth_of = {n: running_mean(v, max(1, min(SMOOTH_WINDOW, len(v) // 20 or 1)))
                 for n, v in losses_of.items()}
    floor = _log_floor(list(losses_of.values()) + list(smooth_of.values()))
    measured = False
    for name, parts in parts_of.items():
        train = parts["train"]
        if not train:
            continue
        label = labels.get(name, name)
        steps = [r["step"] for r in train]
        line, = ax1.plot(steps, _floored(smooth_of[name], floor), label=label, lw=1.4)
        color = line.get_color()
        ax1.plot(steps, _floored(losses_of[name], floor), color=color, alpha=0.15, lw=0.6)
        meas = [i for i, r in enumerate(train) if r["phase"] == "measuring"]
        if meas:
            measured = True
            ax1.plot([steps[i] for i in meas], _floored([smooth_of[name][i] for i in meas], floor),
                     "|", color=color, ms=7)
        if modes.get(name) != "NSGD":
            ax2.plot(steps, _in([r["lr"] for r in train]), color=color, label=label, lw=1.2)
        if name in modes:
            axes[2].plot(steps, _in([r.get("step_size") for r in train]), color=color,
                         label=label, lw=1.2)
    if measured:  # a legend entry that says what the ticks are
        ax1.plot([], [], "|", color="0.3", ms=7,
                 label="LABPAL measuring the line (calls that make no update)")
    unit = f"bits per {bits}" if bits else "training loss"
    ax1.set_yscale("log")
    ax1.set_ylabel(f"{unit} (running mean;\nlight: per step; 0 drawn at the bottom)")
    ax1.set_title(title)
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(loc="upper right", fontsize=8)
    ax2.set_yscale("log")
    nsgd = [labels.get(n, n) for n in labpal if modes[n] == "NSGD"]
    ax2.set_ylabel("learning rate" + ("\n(NSGD: see step size)" if nsgd else ""))
    if ax2.lines:
        ax2.legend(loc="best", fontsize=8)
    if labpal:
        axes[2].set_yscale("log")
        axes[2].set_ylabel("LABPAL step size s_upd\n(distance along −d/‖d‖)")
        axes[2].legend(loc="best", fontsize=8)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].set_xlabel("step (one batch, one closure call)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_validation(rows, labels, path: str, title: str, bits: Optional[str] = None) -> None:
    """Validation accuracy over the whole run (with a zoom on its second half) and loss; for a
    language model bits per character instead of both."""
    plt = _plt()
    parts_of = {n: p["eval"] for n, p in by_optimizer(rows).items() if p["eval"]}
    if bits:
        fig, ax = plt.subplots(1, 1, figsize=(7, 4.2))
        values = {n: _in([r["val_loss"] for r in ev], 1 / LN2) for n, ev in parts_of.items()}
        for name, ev in parts_of.items():
            ax.plot([r["step"] for r in ev], values[name], label=labels.get(name, name),
                    marker=".", lw=1.2)
        ax.set_ylabel(f"validation bits per {bits} (lower is better)")
        axes = [ax]
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        floor = _log_floor([_in([r["val_loss"] for r in ev]) for ev in parts_of.values()])
        last = max((r["step"] for ev in parts_of.values() for r in ev), default=0)
        zoom = ax1.inset_axes([0.42, 0.12, 0.55, 0.45]) if last > 0 else None
        late = []
        for name, ev in parts_of.items():
            steps = [r["step"] for r in ev]
            acc = _in([r["val_accuracy"] for r in ev], 100.0)
            line, = ax1.plot(steps, acc, label=labels.get(name, name), marker=".", lw=1.2)
            ax2.plot(steps, _floored(_in([r["val_loss"] for r in ev]), floor),
                     label=labels.get(name, name), marker=".", lw=1.2)
            if zoom is not None:
                half = [(x, a) for x, a in zip(steps, acc) if x >= last / 2]
                zoom.plot([x for x, _ in half], [a for _, a in half], marker=".", lw=1.0,
                          color=line.get_color())
                late += [a for _, a in half if _finite(a)]
        accs = [a for ev in parts_of.values() for a in _in([r["val_accuracy"] for r in ev], 100.0)
                if _finite(a)]
        if accs:  # the whole run: from the lowest point (the start) to 100%
            ax1.set_ylim(max(0.0, min(accs) - 2), min(101.0, max(accs) + 2))
        if zoom is not None and late:
            low, high = min(late), max(late)
            pad = max(0.2, (high - low) * 0.15)
            zoom.set_ylim(low - pad, min(100.2, high + pad))
            zoom.set_title("zoom: second half", fontsize=8)
            zoom.tick_params(labelsize=7)
            zoom.grid(True, alpha=0.3)
        ax1.set_ylabel("validation accuracy (%)")
        ax2.set_ylabel("validation loss (0 drawn at the bottom)")
        ax2.set_yscale("log")
        axes = [ax1, ax2]
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="center left" if not bits and ax is axes[0] else "best")
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


def _parabola(a, b, c):
    return lambda x: a * x * x + b * x + c


def _draw_line(ax, rec: Dict[str, Any], settings: Dict[str, Any]) -> None:
    """One valid (or refused but measured) line: every sample, the fit, its minimum, the clamp
    at max_step_size and the step taken, s_upd, on the fitted parabola."""
    pos = [float(p) for p in rec["positions"]]
    means = _in(rec["mean_losses"])
    a, b, c = (rec.get(k) for k in ("a", "b", "c"))
    s_min, s_new, s_upd = rec.get("s_min"), rec.get("s_new"), rec.get("s_upd")
    cap, adapt = settings.get("max_step_size"), settings.get("update_step_adaptation")
    marks = [v for v in (s_min, s_new, s_upd, rec.get("s_check")) if _finite(v)]
    right = max(pos + marks) * 1.12 or 1.0
    fit = _parabola(a, b, c) if all(_finite(v) for v in (a, b, c)) else None
    ax.plot(pos, means, "o", color="C0", ms=7, zorder=4,
            label=f"mean loss at the {len(pos)} sample positions")
    if fit is not None:
        xs = [right * i / 199 for i in range(200)]
        ax.plot(xs, [fit(x) for x in xs], "-", color="C1",
                label=f"fit {a:.3g}·s² {b:+.3g}·s {c:+.3g}")
    if _finite(s_min) and s_min > 0:
        ax.axvline(s_min, color="C2", ls="--", lw=1.2, label=f"fit's minimum s_min = {s_min:.3g}")
    if _finite(s_min) and _finite(cap) and s_min > cap:
        ax.axvline(cap, color="C4", ls="-.", lw=1.2,
                   label=f"clamp: max_step_size = {cap:g} < s_min")
    base = min(s_min, cap) if _finite(s_min) and _finite(cap) else None
    rule = f" = {adapt:g} × {base:.3g}" if _finite(adapt) and base is not None else ""
    # the step check's factor (and the momentum correction, when on) make s_new smaller still
    factor = s_new / (adapt * base) if rule and _finite(s_new) and adapt * base > 0 else 1.0
    if rule and abs(factor - 1.0) > 1e-6:
        rule += f" × {factor:.3g}"
        if _finite(rec.get("check_factor")) and rec["check_factor"] != 1.0:
            rule += " (step check"
            rule += ")" if abs(rec["check_factor"] - factor) < 1e-6 * factor else ", momentum)"
        else:
            rule += " (momentum correction)"
    if _finite(rec.get("s_check")) and _finite(rec.get("loss_check")):
        ax.plot([rec["s_check"]], [rec["loss_check"]], "x", color="C3", ms=9, mew=2, zorder=5,
                label=f"loss at the proposed step {rec['s_check']:.3g} (step check)")
    averaged = _finite(s_upd) and _finite(s_new) and abs(s_upd - s_new) > 1e-9 * s_upd
    if averaged and fit is not None:
        ax.plot([s_new], [fit(s_new)], "D", color="C3", ms=6, mfc="white", zorder=5,
                label=f"this measurement's s{rule} = {s_new:.3g}")
        rule = " (mean of the last measurements' s)"
    if _finite(s_upd) and fit is not None:
        above = ", fit above the start" if fit(s_upd) > fit(0.0) else ""
        ax.plot([s_upd], [fit(s_upd)], "*", color="C3", ms=14, zorder=5,
                label=f"step taken s_upd = {s_upd:.3g}{rule if not averaged else ''}"
                      f"{' (mean of the last measurements)' if averaged else ''}{above}")
    ax.set_xlim(-0.03 * right, right)
    xmin = min((q - p for p, q in zip(pos, pos[1:])), default=right)
    if fit is not None and len(pos) > 1 and xmin < 0.03 * right:
        # samples closer together than the plot can show: the small positions magnified
        near = [p for p in pos if p <= pos[0] + 10 * xmin] or pos[:2]
        width = max(near) * 1.3 or right * 0.02
        inset = ax.inset_axes([0.3, 0.58, 0.3, 0.3])
        xs = [width * i / 49 for i in range(50)]
        inset.plot(xs, [fit(x) for x in xs], "-", color="C1")
        inset.plot(near, [m for p, m in zip(pos, means) if p in near], "o", color="C0", ms=5)
        inset.set_xlim(-0.05 * width, width)
        inset.set_title(f"s ≤ {width:.2g}: {len(near)} samples", fontsize=7)
        inset.tick_params(labelsize=6)
        inset.set_yticklabels([])  # the main axes give the losses; here: which samples
        inset.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
        inset.grid(True, alpha=0.3)
    ax.set_xlabel("distance s along −d/‖d‖")
    ax.set_ylabel("mean loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))


def _draw_abandoned(ax, rec: Dict[str, Any], settings: Dict[str, Any]) -> None:
    """A measurement that stopped before sampling the line: the reason in words, not axes."""
    ax.set_axis_off()
    lines = [rec.get("reason") or "refused"]
    norm = rec.get("direction_norm")
    low_high = settings.get("direction_norm_range")
    if _finite(norm):
        lines.append(f"‖d‖ = {norm:.3g}" + (f", direction_norm_range = ({low_high[0]:g}, "
                                            f"{low_high[1]:g})" if low_high else ""))
    first = (rec.get("mean_losses") or [None])[0]
    if _finite(first):
        lines.append(f"loss at s = 0: {first:.3g}; no other position was sampled")
    lines.append("training went on with the step size in use")
    ax.text(0.5, 0.5, "\n".join(textwrap.fill(t, 44) for t in lines), transform=ax.transAxes,
            ha="center", va="center", fontsize=9,
            bbox=dict(boxstyle="round", fc="#fff4f0", ec="C3"))


def plot_lines(records: List[Dict[str, Any]], path: str, title: str,
               settings: Optional[Dict[str, Any]] = None) -> bool:
    chosen = pick_measurements(records)
    if not chosen:
        return False
    settings = settings or {}
    plt = _plt()
    fig, axes = plt.subplots(1, len(chosen), figsize=(5.2 * len(chosen), 6), squeeze=False)
    whens = ("early", "middle", "late") if len(chosen) == 3 else ("early", "late")[-len(chosen):]
    for ax, rec, when in zip(axes[0], chosen, whens):
        sampled = sum(m is not None for m in rec.get("mean_losses") or []) > 1
        (_draw_line if sampled else _draw_abandoned)(ax, rec, settings)
        status = "valid" if rec.get("valid") else (rec.get("reason") or "invalid")
        if sampled and not rec.get("valid"):
            ax.text(0.5, 0.04, textwrap.fill(status, 50), transform=ax.transAxes, ha="center",
                    va="bottom", fontsize=7, color="C3")
        ax.set_title(f"{when}: update {rec.get('update')} (call {rec.get('call')})\n"
                     f"{textwrap.shorten(status, 60, placeholder='…')}", fontsize=9)
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
        if not records:
            notes.append(_first_calls_note(run, len(train), settings))
            continue
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


def _first_calls_note(run: Dict[str, Any], calls: int, settings: Dict[str, Any]) -> str:
    """A run that ended inside LABPAL's first measurement: no update was made yet."""
    try:
        hyper = Hyper(**{k: v for k, v in settings.items() if k in NAMES})
        first = hyper.approximation_batches * hyper.multiplier_at(0)
        need = f"the first {first} closure calls (approximation_batches × m = " \
               f"{hyper.approximation_batches} × {hyper.multiplier_at(0)})"
    except (TypeError, ValueError):  # settings of another version
        need = "its first closure calls"
    return (f"{run.get('label', run['optimizer'])}: 0 updates in {calls} calls. LABPAL spends "
            f"{need} measuring the loss along the first direction before it makes its first "
            "update, so the figures above are those of the initial weights: run more steps.")


def results_text(figs: Dict[str, Dict[str, Any]], rows: List[Dict[str, Any]],
                 lines: Dict[str, List[Dict[str, Any]]], summary: Dict[str, Any]) -> str:
    """results.md: the table of `figs` (`figures(rows, ...)`), then the LABPAL runs' notes;
    first a line saying so when the run was interrupted."""
    labels = {r["optimizer"]: r.get("label", r["optimizer"]) for r in summary.get("runs", [])}
    target = summary.get("settings", {}).get("target_loss")
    head = ""
    if summary.get("interrupted"):
        steps = summary.get("settings", {}).get("steps", "?")
        done = ", ".join(f"{labels.get(n, n)} {f['steps_done']}" for n, f in figs.items())
        head = (f"**Interrupted** (Ctrl-C) before the {steps} steps asked for: these figures "
                f"cover the steps done ({done}).\n\n")
    return head + table(figs, labels, target, bits_per(summary)) + \
        labpal_notes(rows, lines, summary.get("runs", []))


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
    settings = {r["optimizer"]: r.get("settings") or {} for r in summary.get("runs", [])}
    modes = {name: settings.get(name, {}).get("mode", "NSGD") for name in lines}
    p = os.path.join(out_dir, "loss_lr.png")
    plot_loss_lr(rows, labels, p, title, modes, bits_per(summary))
    files.append(p)
    p = os.path.join(out_dir, "val_accuracy.png")
    plot_validation(rows, labels, p, title, bits_per(summary))
    files.append(p)
    for name, records in lines.items():
        p = os.path.join(out_dir, f"lines_{name}.png")
        if plot_lines(records, p, f"{labels.get(name, name)} on {task}: line measurements",
                      settings.get(name)):
            files.append(p)
    text = results_text(figs, rows, lines, summary)
    with open(os.path.join(out_dir, TABLE), "w") as f:
        f.write(text)
    files.append(os.path.join(out_dir, TABLE))
    return {"table": text, "files": files, "figures": figs}
