"""`labpal-fast suite`: LABPAL's configurations at their defaults against the optimizers people
would otherwise pick, on the tasks of cli/suite_tasks.py, several seeds (docs/quality.md).

    labpal-fast suite --quick     seed 0: the 4 LABPAL configurations and Adam           (~5 min)
    labpal-fast suite             seeds 0-2: the 4 LABPAL configurations against the
                                  baselines committed in benchmarks/suite/baselines.jsonl (~15 min)
    labpal-fast suite --full      seeds 0-2: everything, the paper's variants and every
                                  baseline trained afresh                                (~60 min)

One job is one (task, optimizer, seed): a `Run` of the command's harness (`runs._make_runs`,
`training.train_runs`), the same weights and batch order for every optimizer of a seed. Jobs run
in worker processes (1 thread each); each finished job is appended to OUT/results.jsonl, so a
rerun with the same OUT skips what is done. Tuned SGD: SGD+momentum 0.9 with its step schedule
at each of the task's 4 rates on seed 0, the rate with the best validation figure on the other
seeds. The report (cli/suite_report.py) goes to OUT/suite.md with a plot per task, and what it
was made from to OUT/report.jsonl: committed under benchmarks/suite/, it renders the docs' tables
again (tools/check_figures.py, `make check-figures`).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import suite_tasks
from .suite_configs import LABPAL, PAPER, TUNED_SGD, UNTUNED, config, sgd_name  # noqa: F401
from .report import running_mean
from .runs import _make_runs, _versions
from .training import _recompute_batchnorm, train_runs

EXIT_INTERRUPTED = 130
RESULTS = "results.jsonl"
BASELINES = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks", "suite",
                         "baselines.jsonl")
CURVE_POINTS = 60      # points kept of each run's training-loss and validation curves


# ---------------------------------------------------------------------------- one job
@dataclass(frozen=True)
class Job:
    task: str
    optimizer: str      # a key of the tables above or sgd@<rate>
    seed: int
    steps: Optional[int] = None   # None: the task's

    @property
    def key(self) -> Tuple[str, str, int]:
        return (self.task, self.optimizer, self.seed)


def fingerprint(task: suite_tasks.SuiteTask, steps: int) -> str:
    """What a result depends on besides optimizer and seed: a baseline made for other task
    settings is stale."""
    text = (f"{task.name}|{task.make_model()!r}|{steps}|{task.defaults.batch_size}|"
            f"{task.weight_decay}|{task.sgd_lrs}|{task.train_size}/{task.x_val.shape[0]}/"
            f"{task.x_test.shape[0]}|{float(task.x_train.double().sum()):.6g}")
    return hashlib.sha1(text.encode()).hexdigest()[:12]


task = suite_tasks.loaded  # a task, loaded once per process


def _curve(points: List[Tuple[int, float]]) -> List[List[float]]:
    every = max(1, math.ceil(len(points) / CURVE_POINTS))
    picked = points[every - 1::every]
    if points and picked[-1] != points[-1]:
        picked.append(points[-1])
    return [[s, v if math.isfinite(v) else None] for s, v in picked]


def run_job(job: Job) -> Dict[str, Any]:
    """Trains one (task, optimizer, seed) with the command's harness; returns its result row.
    A KeyboardInterrupt during training propagates (nothing is recorded for this job)."""
    t = task(job.task)
    steps = job.steps or t.defaults.steps
    cfg = config(job.optimizer)
    args = argparse.Namespace(
        seed=job.seed, batch_size=t.defaults.batch_size, steps=steps,
        sgd_lr=cfg.lr if cfg.lr is not None else t.defaults.sgd_lr,
        weight_decay=t.weight_decay, backend="auto",
        **{"hp_" + k: v for k, v in cfg.hyper.items()})
    row: Dict[str, Any] = dict(task=job.task, optimizer=job.optimizer, seed=job.seed, steps=steps,
                               batch_size=t.defaults.batch_size, metric=t.metric,
                               fingerprint=fingerprint(t, steps), error=None)
    cpu = time.process_time()
    try:
        run, = _make_runs([cfg.spec], t, args, torch.device("cpu"))
        row["initial_train_loss"] = initial = t.on("train").evaluate(run.model)[0]
        if train_runs([run], steps, min(t.defaults.eval_every, steps), quiet=True):
            raise KeyboardInterrupt
        row.update(_final_figures(run, t, initial))
    except (RuntimeError, ValueError, FloatingPointError) as e:   # a failure of the optimizer
        row.update(error=f"{type(e).__name__}: {e}", figure=math.nan, val_figure=math.nan,
                   diverged=True)
    row["cpu_s"] = time.process_time() - cpu     # this process's CPU time: the load aside
    return row


def _final_figures(run, t: suite_tasks.SuiteTask, initial: float) -> Dict[str, Any]:
    """The final test figure, and whether the run diverged: a non-finite loss on the way, or a
    final training loss (on LOSS_SUBSET examples) above the initial one."""
    train = [r for r in run.rows if r["kind"] == "train"]
    evals = [r for r in run.rows if r["kind"] == "eval"]
    losses = [r["loss"] for r in train]
    opt = run.built.optimizer
    if run.built.schedule_free:       # evaluated at its averaged weights, as Run.evaluate does
        opt.eval()
        _recompute_batchnorm(run.model, t)
    test_loss, test_acc = t.on("test").evaluate(run.model)
    final_train = t.on("train").evaluate(run.model)[0]
    if run.built.schedule_free:
        opt.train()
    figure = t.figure(test_loss, test_acc)
    nonfinite = sum(not math.isfinite(v) for v in losses)
    out = dict(figure=figure, val_figure=t.figure(evals[-1]["val_loss"], evals[-1]["val_accuracy"]),
               final_train_loss=final_train, nonfinite_steps=nonfinite,
               train_time_s=run.train_time,
               curve=_curve(list(zip([r["step"] for r in train], running_mean(losses, 50)))),
               val_curve=_curve([(e["step"], t.figure(e["val_loss"], e["val_accuracy"]))
                                 for e in evals]))
    out["diverged"] = bool(run.diverged or nonfinite or not math.isfinite(figure)
                           or not math.isfinite(final_train) or final_train > initial)
    if run.built.labpal:
        records = run.measurements()
        out["labpal"] = dict(updates=opt.updates, measurements=len(records),
                             averaged=sum(bool(r["averaged"]) for r in records),
                             m=sorted({r["m"] for r in records}))
    return out


# ---------------------------------------------------------------------------- what to run
TIERS = {  # name: (seeds, optimizers; "sgd" = tuned SGD, baselines = every untuned one and it)
    "quick": ((0,), tuple(LABPAL) + ("adam",)),
    "labpal": ((0, 1, 2), tuple(LABPAL)),
    "full": ((0, 1, 2), tuple(LABPAL) + tuple(PAPER) + tuple(UNTUNED) + (TUNED_SGD,)),
}
BASELINE_SET = tuple(UNTUNED) + (TUNED_SGD,)
# CPU time per step relative to Adam's (measured on the suite, 1 thread); "peer": the others
COST = {"labpal": 1.2, "sgd": 0.9, "adam": 1.0, "peer": 1.4}


def plan(tasks: Sequence[str], optimizers: Sequence[str], seeds: Sequence[int],
         steps: Optional[int], known: Dict[tuple, Dict[str, Any]]) -> Tuple[List[Job], List[Job]]:
    """The jobs decided by what is known so far, and stand-ins for those that will follow (tuned
    SGD on the other seeds, once its grid on the first seed is done: they cost the same)."""
    from .suite_report import tuned_rate
    jobs: List[Job] = []
    later: List[Job] = []
    for t in tasks:
        for name in optimizers:
            if name != TUNED_SGD:
                jobs += [Job(t, name, s, steps) for s in seeds]
                continue
            jobs += [Job(t, sgd_name(lr), seeds[0], steps) for lr in task(t).sgd_lrs]
            lr = tuned_rate(t, task(t).sgd_lrs, known, seeds[0], task(t).higher_is_better)
            seeds_after = [Job(t, sgd_name(lr or task(t).sgd_lrs[0]), s, steps) for s in seeds[1:]]
            if lr is None:
                later += seeds_after
            else:
                jobs += seeds_after
    return jobs, later


def job_cost(job: Job) -> float:
    """Estimated seconds of one job at 1 thread."""
    t = task(job.task)
    family = next((k for k in COST if job.optimizer.startswith(k)), "peer")
    return (job.steps or t.defaults.steps) * t.ms_per_step * COST[family] / 1000.0


# ---------------------------------------------------------------------------- results files
def read_rows(path: str) -> List[Dict[str, Any]]:
    """The result rows of a results or baselines file (a torn last line, from a kill in the
    middle of a write, is skipped: its job runs again)."""
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "task" in row:
                    rows.append(row)
    return rows


def append_row(path: str, row: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def header(tier: str, workers: int) -> Dict[str, Any]:
    return {"header": {"date": datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC"), "tier": tier, "workers": workers, "threads_per_worker": 1,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "versions": _versions()}}


def current(rows: List[Dict[str, Any]], tasks: Sequence[str], steps: Optional[int]):
    """{(task, optimizer, seed): row} of the rows made with today's task settings."""
    prints = {t: fingerprint(task(t), steps or task(t).defaults.steps) for t in tasks}
    return {(r["task"], r["optimizer"], r["seed"]): r for r in rows
            if r["task"] in prints and r.get("fingerprint") == prints[r["task"]]}


class SuiteError(RuntimeError):
    """A usage or setup error; the message says what to do."""


def baselines(path: str, tasks: Sequence[str], seeds: Sequence[int], steps: Optional[int],
              required: bool) -> Dict[tuple, Dict[str, Any]]:
    """The committed baselines for these tasks and seeds (tuned SGD's grid included)."""
    known = current(read_rows(path), tasks, steps)
    jobs, later = plan(tasks, BASELINE_SET, seeds, steps, known)
    missing = [j for j in jobs if j.key not in known]
    if (missing or later) and required:
        example = (missing or later)[0].key
        raise SuiteError(
            f"{path} lacks {len(missing) + len(later)} baseline run(s) for these tasks, seeds and "
            f"settings (e.g. {example}): regenerate it with `labpal-fast suite "
            "--regenerate-baselines` (about 13 min on 2 idle cores), or run `--full`")
    return known


# ---------------------------------------------------------------------------- running
def _worker_init() -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent stops the pool


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def execute(tasks, optimizers, seeds, steps, known, results_path, workers, quiet) -> None:
    """Runs every job not yet known, appending each result to `results_path` as it finishes.
    KeyboardInterrupt (Ctrl-C, SIGTERM) stops the workers; what finished is kept."""
    from tqdm.auto import tqdm
    jobs, later = plan(tasks, optimizers, seeds, steps, known)
    todo = [j for j in jobs if j.key not in known]
    estimate = sum(map(job_cost, todo + later))
    done_before = len(jobs) - len(todo)
    print(f"suite: {len(todo) + len(later)} job(s) to run ({done_before} done before), estimated "
          f"{estimate / 60 / max(1, workers):.1f} min with {max(1, workers)} worker(s) of 1 "
          "thread", flush=True)
    bar = None if quiet else tqdm(total=len(todo) + len(later), unit="job", dynamic_ncols=True,
                                  file=sys.stderr)
    pending: Dict[tuple, Any] = {}
    pool = None
    old, threads = signal.signal(signal.SIGTERM, _on_sigterm), torch.get_num_threads()
    try:
        if workers:
            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init)
        else:
            torch.set_num_threads(1)       # as in a worker: the same figures either way
        while True:
            jobs, _ = plan(tasks, optimizers, seeds, steps, known)
            # seed by seed (a partial run has whole seeds), tuned SGD's grid first (its other
            # seeds wait for it), then the longest jobs
            new = sorted((j for j in jobs if j.key not in known and j.key not in pending),
                         key=lambda j: (j.seed, "@" not in j.optimizer, -job_cost(j)))
            if workers:
                for j in new:
                    pending[j.key] = pool.apply_async(run_job, (j,))
                if not pending:
                    break
                finished = [(k, r.get()) for k, r in list(pending.items()) if r.ready()]
                if not finished:
                    time.sleep(0.2)
                    continue
            elif new:
                finished = [(new[0].key, run_job(new[0]))]
            else:
                break
            for key, row in finished:
                pending.pop(key, None)
                append_row(results_path, row)
                known[key] = row
                if row.get("error"):
                    print(f"suite: {'/'.join(map(str, key))} failed: {row['error']}",
                          file=sys.stderr)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{key[0]} {key[1]} seed {key[2]}: "
                                        f"{row['figure']:.4g}", refresh=False)
    finally:
        signal.signal(signal.SIGTERM, old)
        torch.set_num_threads(threads)
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------------------- the command
def add_arguments(p: argparse.ArgumentParser) -> None:
    tier = p.add_mutually_exclusive_group()
    tier.add_argument("--quick", dest="tier", action="store_const", const="quick",
                      help="seed 0, the 4 LABPAL configurations and Adam (~5 min)")
    tier.add_argument("--labpal", dest="tier", action="store_const", const="labpal",
                      help="seeds 0-2, the 4 LABPAL configurations against the committed "
                           "baselines (the default, ~15 min)")
    tier.add_argument("--full", dest="tier", action="store_const", const="full",
                      help="seeds 0-2, LABPAL with the paper's variants and every baseline "
                           "trained afresh (~60 min)")
    p.set_defaults(tier="labpal")
    p.add_argument("--out", default="runs/suite", help="results, table and plots (resumable: "
                   "a rerun with the same --out skips the finished jobs)")
    p.add_argument("--workers", type=int, default=2,
                   help="worker processes of 1 thread each (0: in this process)")
    p.add_argument("--regenerate-baselines", action="store_true",
                   help="train the baselines (Adam, AdamW, tuned SGD, the peers) on seeds 0-2 "
                        "too and write them to --baselines")
    p.add_argument("--baselines", default=os.path.normpath(BASELINES),
                   help="the committed baselines file (default: the repository's)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated subset of: " + ", ".join(suite_tasks.SUITE))
    p.add_argument("--optimizers", default=None,
                   help="comma-separated, instead of the tier's (sgd = tuned SGD)")
    p.add_argument("--seeds", default=None, help="comma-separated, instead of the tier's")
    p.add_argument("--steps", type=int, default=None,
                   help="every task's steps (a smoke test; the committed baselines do not apply)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="the table, no PNGs")


def _names(text: Optional[str], default: Sequence, check) -> List:
    if text is None:
        return list(default)
    names = [check(v.strip()) for v in text.split(",") if v.strip()]
    if not names:
        raise SuiteError("an empty list")
    return names


def _checked_task(name: str) -> str:
    if name not in suite_tasks.SUITE:
        raise SuiteError(f"--tasks: unknown task {name!r}; known: {', '.join(suite_tasks.SUITE)}")
    return name


def _checked_optimizer(name: str) -> str:
    from . import registry
    try:
        spec = registry.SPECS[config(name).spec] if name != TUNED_SGD else registry.SPECS["sgd"]
    except ValueError as e:
        raise SuiteError(f"--optimizers: {e}") from None
    if not spec.available():
        raise SuiteError(f"--optimizers: {name} needs the '{spec.package}' package: pip install "
                         "'labpal-fast[suite]' (or make suite-setup)")
    return name


def main(args) -> int:
    from . import suite_report
    try:
        seeds_default, opt_default = TIERS[args.tier]
        tasks = _names(args.tasks, suite_tasks.SUITE, _checked_task)
        seeds = _names(args.seeds, seeds_default, int)
        optimizers = list(opt_default)
        if args.regenerate_baselines:
            optimizers += [n for n in BASELINE_SET if n not in optimizers]
        optimizers = _names(args.optimizers, optimizers, _checked_optimizer)
        if args.steps is not None and args.steps < 1:
            raise SuiteError("--steps must be at least 1")
        if args.workers < 0:
            raise SuiteError("--workers must be 0 or more")
        os.makedirs(args.out, exist_ok=True)
        results = os.path.join(args.out, RESULTS)
        ours = current(read_rows(results), tasks, args.steps)
        # the baselines this run does not train come from the committed file
        fresh = args.regenerate_baselines or TUNED_SGD in optimizers
        known = {} if fresh else baselines(args.baselines, tasks, seeds, args.steps,
                                           required=args.tier == "labpal")
        known.update(ours)
        started = time.time()
        execute(tasks, optimizers, seeds, args.steps, known, results, args.workers, args.quiet)
    except SuiteError as e:
        print(f"labpal-fast suite: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"labpal-fast suite: interrupted; the finished jobs are in {results}: run the same "
              "command again to go on", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"suite: ran for {(time.time() - started) / 60:.1f} min", flush=True)
    if args.regenerate_baselines:
        # the other tasks' baselines stay as they were
        rows = [r for r in read_rows(args.baselines) if r["task"] not in tasks] + [
            r for k, r in sorted(known.items())
            if k[1] in UNTUNED or k[1].startswith(TUNED_SGD + "@")]
        os.makedirs(os.path.dirname(os.path.abspath(args.baselines)), exist_ok=True)
        with open(args.baselines, "w") as f:
            for row in [header(args.tier, args.workers)] + rows:
                f.write(json.dumps(row, allow_nan=True) + "\n")
        print(f"suite: wrote {len(rows)} baseline runs to {args.baselines}")
    text = suite_report.write(list(known.values()), tasks, seeds, args.out,
                              header(args.tier, args.workers)["header"], plots=not args.no_plots)
    print(text)
    return 0
