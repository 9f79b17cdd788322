"""`labpal-fast`: train LABPAL on a built-in task, compare it with the optimizers a
practitioner would otherwise pick, and look at the result.

    labpal-fast train   --optimizer labpal --task digits --out runs/one
    labpal-fast compare --task digits --out runs/digits
    labpal-fast report  runs/digits

Every run writes metrics.csv, summary.json, lines.json (LABPAL's line measurements), PNG plots
and results.md into --out. `compare` trains the optimizers in turns of --eval-every steps each
(same seed, same initial weights, same batch sequence), so that a change in the machine's
load during the run falls on all of them alike; time spent evaluating is never counted.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any, Dict, Optional, Sequence

import torch

from .. import __version__
from ..hyper import LINE_FITS, NAMES, SGD_RATES, Hyper
from ..ops import BACKENDS, why_unavailable
from . import parallel, registry, suite
from . import report as rep
from .runs import _UNSET, _make_runs, _versions, labpal_hyper
from .tasks import DATA_DIR_TASKS, TASK_HELP, TASKS, DataError, Task, load_task
from .training import train_runs

EXIT_INTERRUPTED = 130


class UsageError(RuntimeError):
    pass


class Parser(argparse.ArgumentParser):
    """A bad value is one line naming the argument and exit 2, not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(text: str) -> int:
    """A positive whole number (--threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ---------------------------------------------------------------------------- arguments
def _floats(text: str):
    return tuple(float(v) for v in text.replace(" ", "").split(",") if v)


def _schedule(text: str):
    """'POINT:VALUE,...' → ((POINT, VALUE), ...): calls (batch_size_schedule) or updates
    (lr_multiplier_schedule) with their factor."""
    pairs = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        call, _, mult = part.partition(":")
        if not mult:
            raise argparse.ArgumentTypeError(f"expected POINT:FACTOR pairs, got {part!r}")
        pairs.append((int(call), float(mult)))
    return tuple(pairs)


def _optional_float(text: str):
    return None if text.lower() in ("none", "auto", "") else float(text)


def _optional_int(text: str):
    return None if text.lower() in ("none", "auto", "") else int(text)


def _loss_scale(text: str):
    """'none' (off), 'dynamic', or a fixed scale."""
    return text if text == "dynamic" else _optional_float(text)


def _optional_bool(text: str):
    """'none' (auto), 'true' / 'false' (also on / off, yes / no, 1 / 0)."""
    value = text.lower()
    if value in ("none", "auto", ""):
        return None
    if value in ("true", "on", "yes", "1"):
        return True
    if value in ("false", "off", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false or none, got {text!r}")


# every hyper-parameter whose default's type cannot parse its own text (tests/test_cli.py
# checks that each one round-trips)
_HYPER_TYPES = {"noise_factor": (_optional_float, "X|none"),
                "reuse_updates": (_optional_int, "N|none"),
                "max_grad_norm": (_optional_float, "X|none"),
                "replay_tolerance": (_optional_float, "X|none"),
                "resolve_positions": (_optional_bool, "true|false|none"),
                "loss_scale": (_loss_scale, "dynamic|X|none"),
                "master_weights": (_optional_bool, "true|false|none"),
                "step_check": (_optional_bool, "true|false|none"),
                "momentum_correction": (_optional_bool, "true|false|none"),
                "max_step_shrink": (_optional_float, "X|none"),
                "batch_size_schedule": (_schedule, "CALL:MULT,..."),
                "lr_multiplier_schedule": (_schedule, "UPDATE:FACTOR,..."),
                "sample_positions": (_floats, "S0,S1,..."),
                "direction_norm_range": (_floats, "LOW,HIGH")}
# the hyper-parameters with a fixed set of values (listed in --help, refused by argparse)
_HYPER_CHOICES = {"line_fit": LINE_FITS, "sgd_rate": SGD_RATES}
# what the command passes where LABPAL's own default is not used
_HYPER_CLI_DEFAULTS = {"dataset_size": "the task's training-split size"}
# set elsewhere: mode comes from the optimizer's name, batch_size is --batch-size
_HYPER_SKIP = ("mode", "batch_size")


def _add_common(p: argparse.ArgumentParser, compare: bool) -> None:
    p.add_argument("--task", default="digits", choices=TASKS,
                   help="; ".join(f"{k}: {v}" for k, v in TASK_HELP.items()))
    p.add_argument("--data-dir", default=None,
                   help=f"{', '.join(DATA_DIR_TASKS)} only: directory holding cifar-10-batches-py "
                        "(never downloaded)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (closure calls, one batch each); default: the task's")
    p.add_argument("--batch-size", type=int, default=None, help="default: the task's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default=None, help="output directory (default runs/<task>-<command>)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between validation evaluations; default: the task's")
    p.add_argument("--target-loss", type=float, default=None,
                   help="training loss (running mean) for 'steps to reach'; default: the task's")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="L2 weight decay for every optimizer (default 0)")
    p.add_argument("--sgd-lr", type=float, default=None,
                   help="SGD's base rate; default: the task's usual (0.1)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="LABPAL's backend (default auto: the fastest that runs on --device)")
    p.add_argument("--threads", type=_count, default=None, metavar="N",
                   help="torch CPU threads (default: the cores, shared among --nproc ranks)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel ranks on this machine (spawned; gloo on the CPU, nccl on "
                        "CUDA, one GPU each), each training on its share of every batch of "
                        "--batch-size; under torchrun leave it out (README)")
    p.add_argument("--no-plots", action="store_true", help="write the files but no PNGs")
    g = p.add_argument_group("LABPAL hyper-parameters (public names; unset = LABPAL's default)")
    defaults = Hyper()
    for name in NAMES:
        if name in _HYPER_SKIP:
            continue
        default = getattr(defaults, name)
        conv, metavar = _HYPER_TYPES.get(name, (type(default), None))
        choices = _HYPER_CHOICES.get(name)
        if metavar is None:
            metavar = "{" + ",".join(choices) + "}" if choices else \
                ("N" if isinstance(default, int) else "X")
        flags = ["--" + name.replace("_", "-")] + (["--" + name] if "_" in name else [])
        g.add_argument(*flags, dest="hp_" + name, type=conv, default=_UNSET, metavar=metavar,
                       choices=choices, help="default " + _HYPER_CLI_DEFAULTS.get(
                           name, f"{default!r}").replace("%", "%%"))
    if not compare:
        g.add_argument("--mode", dest="hp_mode", choices=("NSGD", "SGD"), default=None,
                       help="LABPAL's mode (default: NSGD for labpal, SGD for labpal-sgd)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="labpal-fast",
        description="Train with LABPAL, compare it with other optimizers, and plot the result.")
    parser.add_argument("--version", action="version", version=f"labpal-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,compare,report,suite}")
    sub.required = True
    p = sub.add_parser("train", help="one optimizer on one task")
    p.add_argument("--optimizer", default="labpal", choices=list(registry.SPECS),
                   metavar="NAME", help="; ".join(f"{n}: {s.note}".replace("%", "%%") for n, s in
                                                  registry.SPECS.items()))
    _add_common(p, compare=False)
    p = sub.add_parser("compare", help="several optimizers on the same task, data and seed")
    p.add_argument("--optimizers", default=None,
                   help="comma-separated; default: " + ",".join(registry.BUILTIN) +
                   " and every optional one installed (" +
                   ",".join(n for n in registry.SPECS if n not in registry.BUILTIN) + ")")
    _add_common(p, compare=True)
    p = sub.add_parser("report", help="rebuild plots and table from a finished run's files")
    p.add_argument("dir")
    p = sub.add_parser("suite", help="the quality suite: LABPAL's configurations against the "
                       "baselines on many small tasks and seeds (docs/quality.md)")
    suite.add_arguments(p)
    return parser


# ---------------------------------------------------------------------------- the command
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to this PyTorch "
                         f"({torch.__version__}); use --device cpu or auto")
    return torch.device(name)


def _device_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(),
                            "platform": platform.platform(), "cpu": platform.processor() or
                            platform.machine(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _resolve_defaults(args, task: Task) -> None:
    d = task.defaults
    args.steps = d.steps if args.steps is None else args.steps
    args.batch_size = d.batch_size if args.batch_size is None else args.batch_size
    args.eval_every = d.eval_every if args.eval_every is None else args.eval_every
    args.target_loss = d.target_loss if args.target_loss is None else args.target_loss
    args.sgd_lr = d.sgd_lr if args.sgd_lr is None else args.sgd_lr
    for name in ("steps", "batch_size", "eval_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    args.eval_every = min(args.eval_every, args.steps)
    if args.batch_size > task.train_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the training split "
                         f"of {task.name} ({task.train_size} examples)")


def run_training(args, names: Sequence[str]) -> int:
    device = pick_device(args.device)
    ranks = parallel.start(device)
    try:
        code = _train_and_report(args, names, parallel.rank_device(device, ranks), ranks)
    except BaseException:
        parallel.stop(ranks, finished=False)
        raise
    parallel.stop(ranks)
    return code


def _train_and_report(args, names: Sequence[str], device: torch.device,
                      ranks: parallel.Ranks) -> int:
    if args.data_dir is not None and args.task not in DATA_DIR_TASKS:
        raise UsageError(f"--data-dir: the {args.task} task reads no data directory "
                         f"(only {', '.join(DATA_DIR_TASKS)} does); leave it out")
    if args.backend != "auto":
        reason = why_unavailable(args.backend, [device])
        if reason is not None:
            raise UsageError(f"--backend {args.backend} cannot run on {device}: {reason}")
    threads = args.threads or (parallel.cpu_threads(ranks.world) if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    task = load_task(args.task, args.seed, device, args.data_dir)
    _resolve_defaults(args, task)
    if args.batch_size % ranks.world:
        raise UsageError(f"--batch-size {args.batch_size} is not a multiple of the {ranks.world} "
                         "ranks: each rank trains on an equal share of every batch")
    try:
        Hyper(**dict(labpal_hyper(args), batch_size=args.batch_size))
    except (TypeError, ValueError) as e:
        raise UsageError(f"LABPAL hyper-parameter: {e}") from None
    out = args.out or os.path.join("runs", f"{args.task}-{args.command}")
    if ranks.main:
        os.makedirs(out, exist_ok=True)
    runs = _make_runs(names, task, args, device, ranks)
    started = time.time()
    interrupted = train_runs(runs, args.steps, args.eval_every, args.quiet or not ranks.main)
    if not ranks.main:  # rank 0 writes the outputs
        return EXIT_INTERRUPTED if interrupted else 0
    rows = [r for run in runs for r in run.rows]
    rep.write_metrics(os.path.join(out, rep.METRICS), rows)
    lines = {run.name: run.measurements() for run in runs if run.built.labpal}
    rep.write_json(os.path.join(out, rep.LINES), lines)
    figs = rep.figures(rows, args.target_loss)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("hp_")}
    settings["labpal_hyper"] = labpal_hyper(args)
    settings["nproc"] = ranks.world
    summary = {
        "command": args.command,
        "interrupted": interrupted,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_time_s": time.time() - started,
        "settings": settings,
        "task": {"name": task.name, "description": task.description, "bits_per": task.bits_per,
                 "train_size": task.train_size, "val_size": int(task.x_val.shape[0]),
                 "parameters": sum(p.numel() for p in runs[0].model.parameters())},
        "versions": _versions(),
        "device": _device_info(device),
        "runs": [dict(optimizer=run.name, label=run.label, settings=run.built.settings,
                      diverged=run.diverged, eval_time_s=run.eval_time,
                      **figs.get(run.name, {})) for run in runs],
    }
    rep.write_json(os.path.join(out, rep.SUMMARY), summary)
    if args.no_plots:
        text = rep.results_text(figs, rows, lines, summary)
        with open(os.path.join(out, rep.TABLE), "w") as f:
            f.write(text)
    else:
        text = rep.rebuild(out)["table"]
    where = f"{ranks.world} ranks ({device.type})" if ranks.world > 1 else str(device)
    print(f"\n{task.description}; {args.steps} steps of batch {args.batch_size} on {where}"
          + (" — INTERRUPTED, report covers the steps done" if interrupted else ""))
    print(text)
    print(f"files in {out}: " + ", ".join(sorted(os.listdir(out))))
    return EXIT_INTERRUPTED if interrupted else 0


def run(argv: Optional[Sequence[str]] = None) -> int:
    """The command itself; `labpal_fast.cli.main` checks its dependencies first."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "suite":
        return suite.main(args)
    try:
        if args.command != "report" and args.nproc < 1:
            raise UsageError("--nproc must be at least 1")
        if args.command != "report" and (args.nproc > 1 or parallel.launched()):
            if parallel.launched():
                world = int(os.environ["WORLD_SIZE"])
                if args.nproc not in (1, world):
                    raise UsageError(f"--nproc {args.nproc} under a launcher that started "
                                     f"{world} ranks (WORLD_SIZE): leave --nproc out")
            else:
                return parallel.launch(run, parallel.strip_nproc(
                    sys.argv[1:] if argv is None else list(argv)), args.nproc)
        if args.command == "report":
            result = rep.rebuild(args.dir)
            print(result["table"])
            print("wrote " + ", ".join(result["files"]))
            return 0
        if args.command == "train":
            names = [args.optimizer]
            if not registry.SPECS[args.optimizer].available():
                raise UsageError(f"--optimizer {args.optimizer} needs the "
                                 f"'{registry.SPECS[args.optimizer].package}' package")
        else:
            try:
                names = registry.parse_names(args.optimizers) if args.optimizers else \
                    registry.default_compare_set()
            except ValueError as e:
                raise UsageError(f"--optimizers: {e}") from None
        return run_training(args, names)
    except (DataError, UsageError, rep.ReportError) as e:
        print(f"labpal-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # before training began, or a second Ctrl-C while writing
        print(f"labpal-fast {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
