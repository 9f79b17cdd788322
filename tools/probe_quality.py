"""A quick quality probe of LABPAL's defaults outside the built-in tasks (issue 19).

Six small tasks, each a few seconds at 1 thread, on data made in memory (scikit-learn's digits
and generators; argparse.py's text): LABPAL NSGD / SGD mode × momentum 0 / 0.9 at their
defaults (dataset_size and batch_size set, as a user would) and Adam(1e-3), seeds 0-2, the
FINAL test figure. A seed fixes the initialization and the batch order for every optimizer.

    PYTHONPATH=. .venv/bin/python tools/probe_quality.py --out runs/probe.jsonl \
        [--tasks mlp_digits reg_b16] [--opts nsgd sgd nsgd_m sgd_m adam] [--seeds 0 1 2] \
        [--hyper '{"update_step_adaptation": 2.0}'] [--tag NAME] [--jobs 2]
    PYTHONPATH=. .venv/bin/python tools/probe_quality.py --out runs/probe.jsonl \
        --also runs/new.jsonl --compare default check2     # the before/after table

Appends one JSON line per run (resumable: a (tag, task, opt, seed) already in --out is
skipped); `--table` prints the mean per task and configuration, by tag.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch import nn

from labpal_fast import LABPAL

LABPAL_OPTS = {"nsgd": ("NSGD", 0.0), "sgd": ("SGD", 0.0),
               "nsgd_m": ("NSGD", 0.9), "sgd_m": ("SGD", 0.9)}


def _t(a, dtype=None):
    return torch.from_numpy(np.ascontiguousarray(a)) if dtype is None else \
        torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def _split(n, test, rng):
    perm = rng.permutation(n)
    return perm[test:], perm[:test]


def mlp(sizes, dropout=0.0):
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.data.astype(np.float32) / 16.0 - 0.5) / 0.5
    return x, d.target.astype(np.int64)


def task(name):
    """(x_train, y_train, x_test, y_test, model factory, loss kind, batch, steps, wd)."""
    rng = np.random.default_rng(1234)  # the data and split are fixed; seeds vary the rest
    if name in ("mlp_digits", "dropwd_digits"):
        x, y = _digits()
        tr, te = _split(len(y), 597, rng)
        if name == "mlp_digits":  # issue 19's: 64-64-64-10, batch 64, 1000 steps
            return (_t(x[tr]), _t(y[tr]), _t(x[te]), _t(y[te]),
                    lambda: mlp([64, 64, 64, 10]), "ce", 64, 1000, 0.0)
        return (_t(x[tr]), _t(y[tr]), _t(x[te]), _t(y[te]),
                lambda: mlp([64, 256, 256, 10], dropout=0.2), "ce", 32, 1000, 5e-4)
    if name == "reg_b16":
        from sklearn.datasets import make_friedman1
        x, y = make_friedman1(2000, 10, noise=1.0, random_state=0)
        x = ((x - 0.5) / 0.29).astype(np.float32)
        y = ((y - y.mean()) / y.std()).astype(np.float32)[:, None]
        tr, te = _split(len(y), 500, rng)
        return (_t(x[tr]), _t(y[tr]), _t(x[te]), _t(y[te]),
                lambda: mlp([10, 64, 64, 1]), "mse", 16, 1500, 0.0)
    if name == "noisy_b8":
        from sklearn.datasets import make_classification
        x, y = make_classification(3000, 20, n_informative=10, n_classes=5,
                                   n_clusters_per_class=2, class_sep=1.5, random_state=0)
        x = x.astype(np.float32)
        tr, te = _split(len(y), 1000, rng)
        ytr = y[tr].copy()
        flip = rng.random(len(ytr)) < 0.1
        ytr[flip] = rng.integers(0, 5, flip.sum())
        return (_t(x[tr]), _t(ytr.astype(np.int64)), _t(x[te]), _t(y[te].astype(np.int64)),
                lambda: mlp([20, 128, 128, 5]), "ce", 8, 2000, 0.0)
    if name == "bn_cnn":
        from labpal_fast.cli.tasks import DigitsCNN
        x, y = _digits()
        x = x.reshape(-1, 1, 8, 8)
        tr, te = _split(len(y), 597, rng)
        return (_t(x[tr]), _t(y[tr]), _t(x[te]), _t(y[te]),
                lambda: DigitsCNN(width=16), "ce", 128, 400, 0.0)
    if name == "gru_lm":
        from labpal_fast.cli.tasks import charlm_text
        text = charlm_text()
        vocab = sorted(set(text))
        codes = np.array([vocab.index(c) for c in text], dtype=np.int64)
        ctx = 32
        split = int(len(codes) * 0.9)

        def windows(a, stride):
            starts = np.arange(0, len(a) - ctx - 1, stride)
            w = a[starts[:, None] + np.arange(ctx + 1)[None]]
            return w[:, :-1], w[:, 1:]
        xt, yt = windows(codes[:split], 4)
        xv, yv = windows(codes[split:], ctx)
        v = len(vocab)

        class GRULM(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(v, 32)
                self.gru = nn.GRU(32, 64, batch_first=True)
                self.head = nn.Linear(64, v)

            def forward(self, x):
                return self.head(self.gru(self.embed(x))[0])
        return _t(xt), _t(yt), _t(xv), _t(yv), GRULM, "bpc", 32, 500, 0.0
    raise ValueError(f"unknown task {name!r}")


TASKS = ("mlp_digits", "reg_b16", "noisy_b8", "bn_cnn", "gru_lm", "dropwd_digits")


def loss_fn(kind, out, y):
    if kind == "mse":
        return nn.functional.mse_loss(out, y)
    if kind == "bpc":
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return nn.functional.cross_entropy(out, y)


def evaluate(model, kind, x, y):
    model.eval()
    with torch.no_grad():
        out = model(x)
        loss = float(loss_fn(kind, out, y))
    model.train()
    if kind == "mse":
        return loss
    if kind == "bpc":
        return loss / math.log(2)
    return 100.0 * float((out.argmax(-1) == y).float().mean())


def run(job):
    tag, name, opt_name, seed, hyper = job
    torch.set_num_threads(1)
    xtr, ytr, xte, yte, factory, kind, b, steps, wd = task(name)
    torch.manual_seed(seed)
    model = factory()
    gen = torch.Generator().manual_seed(seed)
    if opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=wd)
    elif opt_name == "sgdm":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=wd)
    else:
        mode, beta = LABPAL_OPTS[opt_name]
        opt = LABPAL(model.parameters(), model=model, mode=mode, momentum=beta,
                     weight_decay=wd, dataset_size=len(ytr), batch_size=b, **hyper)
    t0 = time.time()
    first = last = None
    trace = []
    perm, pos = torch.randperm(len(ytr), generator=gen), 0
    for step in range(steps):
        if pos + b > len(perm):
            perm, pos = torch.randperm(len(ytr), generator=gen), 0
        idx = perm[pos:pos + b]
        pos += b
        x, y = xtr[idx], ytr[idx]
        if isinstance(opt, LABPAL):
            loss = opt.step(lambda x=x, y=y: loss_fn(kind, model(x), y))
        else:
            opt.zero_grad()
            loss = loss_fn(kind, model(x), y)
            loss.backward()
            opt.step()
        v = float(loss.detach())
        first = v if first is None else first
        last = v if last is None or not math.isfinite(v) else 0.95 * last + 0.05 * v
        if step % 50 == 0:
            trace.append(round(v, 4))
    out = {"tag": tag, "task": name, "opt": opt_name, "seed": seed, "hyper": hyper,
           "test": evaluate(model, kind, xte, yte), "kind": kind, "first_loss": first,
           "final_train": last, "seconds": round(time.time() - t0, 2), "trace": trace}
    if isinstance(opt, LABPAL):
        out["meas"] = [{k: r[k] for k in ("update", "m", "s_min", "s_upd", "eta", "direction_norm", "s_check",
                                          "loss_check", "check_factor",
                                          "mean_losses", "valid")}
                       for r in opt.measurements()]
    return out


def table(path):
    rows = [json.loads(l) for l in open(path)]
    by = {}
    for r in rows:
        by.setdefault((r["task"], r["tag"], r["opt"]), []).append(r)
    for key in sorted(by):
        rs = sorted(by[key], key=lambda r: r["seed"])
        vals = [r["test"] for r in rs]
        print(f"{key[0]:14s} {key[1]:18s} {key[2]:8s} mean {np.mean(vals):8.3f}  "
              + " ".join(f"{v:8.3f}" for v in vals))


def compare(paths, before, after):
    """A markdown table: per task and LABPAL configuration, tag `before` and tag `after` (each
    seed, the mean), their paired difference (after − before, mean over shared seeds) and
    Adam's mean."""
    rows = [json.loads(l) for path in paths for l in open(path)]
    fig = {(r["tag"], r["task"], r["opt"], r["seed"]): r["test"] for r in rows}
    units = {r["task"]: r["kind"] for r in rows}
    # rows made at an older commit carry "code" (a merged file's note): marked °
    older = {(r["task"], r["opt"]) for r in rows if r["tag"] == after and r.get("code", "final")
             != "final"}
    print(f"| task (figure) | config | {before} (seeds) | {after} (seeds) | paired Δ | Adam |")
    print("|---|---|---|---|---|---|")
    for t in TASKS:
        adam = [v for (g, tt, o, _), v in fig.items() if tt == t and o == "adam"]
        for o in LABPAL_OPTS:
            b = {sd: v for (g, tt, oo, sd), v in fig.items() if (g, tt, oo) == (before, t, o)}
            a = {sd: v for (g, tt, oo, sd), v in fig.items() if (g, tt, oo) == (after, t, o)}
            if not a:
                continue
            shared = sorted(set(a) & set(b))
            delta = np.mean([a[sd] - b[sd] for sd in shared]) if shared else float("nan")

            def cell(d):
                return (f"{np.mean(list(d.values())):.3g} ("
                        + ", ".join(f"{d[sd]:.3g}" for sd in sorted(d)) + ")") if d else "—"
            unit = {"ce": "acc %", "mse": "MSE", "bpc": "bits/char"}[units[t]]
            mark = "°" if (t, o) in older else ""
            print(f"| {t} ({unit}) | {o}{mark} | {cell(b)} | {cell(a)} | {delta:+.3g} | "
                  f"{np.mean(adam):.3g} |" if adam else "— |")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/probe.jsonl")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--opts", nargs="+", default=list(LABPAL_OPTS) + ["adam"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--hyper", default="{}")
    p.add_argument("--tag", default="default")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--table", action="store_true")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                   help="the markdown table of two tags (read from --out and --also)")
    p.add_argument("--also", nargs="*", default=[], help="more result files for --compare")
    a = p.parse_args(argv)
    if a.compare:
        compare([a.out] + a.also, *a.compare)
        return
    if a.table:
        table(a.out)
        return
    hyper = json.loads(a.hyper)
    done = set()
    if os.path.exists(a.out):
        done = {(r["tag"], r["task"], r["opt"], r["seed"])
                for r in map(json.loads, open(a.out))}
    jobs = [(a.tag if o not in ("adam", "sgdm") else "baseline", t, o, s,
             {} if o in ("adam", "sgdm") else hyper)
            for t in a.tasks for o in a.opts for s in a.seeds]
    jobs = [j for j in jobs if j[:4] not in done]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with ProcessPoolExecutor(a.jobs) as pool, open(a.out, "a") as f:
        for r in pool.map(run, jobs):
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"{r['task']:14s} {r['tag']:14s} {r['opt']:7s} seed {r['seed']} "
                  f"test {r['test']:.3f} train {r['final_train']:.4g} ({r['seconds']}s)",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
