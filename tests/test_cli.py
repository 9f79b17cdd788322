"""The `labpal-fast` command: subcommands on tiny budgets, files and columns, errors,
interrupted runs and determinism. Everything runs on the CPU in a few seconds."""
import csv
import json
import os
import pickle
import subprocess
import sys
import time

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from labpal_fast import cli  # noqa: E402
from labpal_fast.cli import command, registry, report, tasks, training  # noqa: E402
from labpal_fast.hyper import NAMES, Hyper  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--quiet", "--device", "cpu", "--threads", "1"]


def run(*argv):
    return cli.main([str(a) for a in argv] + TINY)


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def train_rows(rows, name):
    return [r for r in rows if r["optimizer"] == name and r["kind"] == "train"]


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG and os.path.getsize(path) > 2000


# ---------------------------------------------------------------------------- train
def test_train_writes_metrics_summary_lines_and_plots(tmp_path):
    out = tmp_path / "run"
    assert run("train", "--optimizer", "labpal", "--task", "digits", "--steps", 14,
               "--eval-every", 7, "--out", out) == 0
    header, rows = read_csv(out / "metrics.csv")
    assert tuple(header) == report.COLUMNS
    train = train_rows(rows, "labpal")
    assert [int(r["step"]) for r in train] == list(range(1, 15))
    for r in train:
        assert float(r["loss"]) > 0 and r["phase"] in ("training", "measuring")
        assert float(r["lr"]) >= 0 and float(r["wall_time"]) > 0
    # the first measurement takes approximation_batches = 10 calls, then training follows
    assert [r["phase"] for r in train[:10]] == ["measuring"] * 10
    assert train[-1]["phase"] == "training" and float(train[-1]["lr"]) > 0
    walls = [float(r["wall_time"]) for r in train]
    assert walls == sorted(walls)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [int(r["step"]) for r in evals] == [0, 7, 14]
    for r in evals:
        assert 0 <= float(r["val_accuracy"]) <= 1 and float(r["val_loss"]) > 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is False and summary["command"] == "train"
    assert summary["settings"]["steps"] == 14 and summary["settings"]["seed"] == 0
    assert summary["versions"]["torch"] == torch.__version__
    assert summary["device"]["device"] == "cpu"
    assert summary["task"]["train_size"] + summary["task"]["val_size"] == 1797
    (r,) = summary["runs"]
    assert r["optimizer"] == "labpal" and r["steps_done"] == 14
    assert r["settings"]["mode"] == "NSGD"
    assert r["settings"]["dataset_size"] == summary["task"]["train_size"]
    assert r["settings"]["batch_size"] == 128
    assert r["ms_per_step"] > 0 and r["final_val_accuracy"] == float(evals[-1]["val_accuracy"])

    lines = json.loads((out / "lines.json").read_text())
    (m,) = lines["labpal"][:1]
    # the positions moved to (resolve_positions): 0 and the defaults, moved outward in order
    zero, small, large = m["positions"]
    assert zero == 0.0 and 1.77e-4 <= small < large and 0.01 <= large and m["valid"] is True
    assert m["s_upd"] > 0 and len(m["mean_losses"]) == 3
    for name in ("loss_lr.png", "val_accuracy.png", "lines_labpal.png"):
        assert is_png(out / name), name
    assert "LABPAL (NSGD)" in (out / "results.md").read_text()


def test_labpal_flags_reach_the_optimizer(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "--task", "spirals", "--steps", 6, "--out", out, "--no-plots",
               "--approximation-batches", 3, "--reuse_updates", 2, "--warmup-updates", 1,
               "--sample-positions", "0,0.001,0.02", "--noise-factor", 2.0,
               "--mode", "SGD", "--batch-size", 32) == 0
    summary = json.loads((out / "summary.json").read_text())
    s = summary["runs"][0]["settings"]
    assert s["mode"] == "SGD" and s["approximation_batches"] == 3 and s["reuse_updates"] == 2
    assert s["sample_positions"] == [0.0, 0.001, 0.02] and s["noise_factor"] == 2.0
    assert s["batch_size"] == 32
    assert summary["runs"][0]["label"] == "LABPAL (SGD)"
    _, rows = read_csv(out / "metrics.csv")
    # m = floor(2.0) = 2 calls per update, 3·2 = 6 calls for the first measurement
    assert [r["phase"] for r in train_rows(rows, "labpal")] == ["measuring"] * 6
    assert not (out / "loss_lr.png").exists()
    # a bad value is refused with a message that names it
    assert run("train", "--task", "spirals", "--steps", 2, "--out", tmp_path / "bad",
               "--max-step-size", -1) == 2
    assert "max_step_size" in capsys.readouterr().err


def _flag_text(value):
    """A hyper-parameter value as a user types it after its flag."""
    if value is None:
        return "none"
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return ",".join(f"{p}:{f}" for p, f in value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# a valid value other than the default for hyper-parameters whose default is None (off)
_INSTEAD_OF_NONE = {"noise_factor": 2.0, "max_grad_norm": 1.5, "resolve_positions": False,
                    "loss_scale": "dynamic", "master_weights": False, "step_check": False,
                    "momentum_correction": False, "reuse_updates": 300, "max_step_shrink": 2.0}
# what a hyper-parameter needs beside it to be valid (max_step_shrink acts on momentum's step)
_COMPANIONS = {"max_step_shrink": {"momentum": 0.9}}


@pytest.mark.parametrize("name", [n for n in NAMES if n not in command._HYPER_SKIP])
def test_every_hyper_parameter_flag_parses_to_the_value_typed(name):
    value = getattr(Hyper(), name)
    if value is None:
        value = _INSTEAD_OF_NONE[name]
    elif isinstance(value, tuple) and value and isinstance(value[0], tuple):
        value = value + ((value[-1][0] + 1000, 0.5),)  # one more point than the default
    flag = "--" + name.replace("_", "-")
    args = command.build_parser().parse_args(["train", flag, _flag_text(value)])
    given = command.labpal_hyper(args)
    assert list(given) == [name]
    companions = _COMPANIONS.get(name, {})
    assert getattr(Hyper(**given, **companions), name) == value
    if command._HYPER_TYPES.get(name, (None, ""))[1] == "X|none":  # "none" turns it off
        off = command.build_parser().parse_args(["train", flag, "none"])
        assert getattr(Hyper(**command.labpal_hyper(off), **companions), name) is None


def test_every_builtin_optimizer_trains(tmp_path):
    for name in ("labpal-sgd", "sgd", "adam"):
        out = tmp_path / name
        assert run("train", "--optimizer", name, "--task", "spirals", "--steps", 4,
                   "--batch-size", 16, "--out", out, "--no-plots") == 0
        _, rows = read_csv(out / "metrics.csv")
        assert len(train_rows(rows, name)) == 4


@pytest.mark.parametrize("name,mode", [("labpal-paper", "NSGD"), ("labpal-sgd-paper", "SGD")])
def test_the_paper_variants_run_the_papers_algorithm(tmp_path, name, mode):
    """labpal-paper / labpal-sgd-paper: the paper's fit on its literal positions (and its SGD
    rate); a flag given on the command line still wins; not in compare's default set."""
    out = tmp_path / name
    assert run("train", "--optimizer", name, "--task", "spirals", "--steps", 12,
               "--batch-size", 16, "--out", out, "--no-plots", "--approximation-batches", 2) == 0
    summary = json.loads((out / "summary.json").read_text())
    settings = summary["runs"][0]["settings"]
    assert (settings["mode"], settings["line_fit"], settings["sgd_rate"]) == (mode, "paper", "paper")
    assert settings["approximation_batches"] == 2
    first = json.loads((out / "lines.json").read_text())[name][0]
    assert first["positions"] == pytest.approx([0.0, 1.77e-4, 0.01])  # literal: not resolved
    assert name not in registry.default_compare_set()


def test_sgd_schedule_divides_by_ten_at_half_and_three_quarters(tmp_path):
    out = tmp_path / "sgd"
    assert run("train", "--optimizer", "sgd", "--task", "spirals", "--steps", 8,
               "--batch-size", 16, "--sgd-lr", 0.2, "--out", out, "--no-plots") == 0
    _, rows = read_csv(out / "metrics.csv")
    lrs = [float(r["lr"]) for r in train_rows(rows, "sgd")]   # rate in force after each step
    assert lrs == pytest.approx([0.2] * 3 + [0.02] * 2 + [0.002] * 3)


# ---------------------------------------------------------------------------- compare
def test_compare_same_data_and_start_and_a_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run("compare", "--optimizers", "labpal,sgd,adam", "--task", "spirals",
               "--steps", 12, "--eval-every", 6, "--out", out) == 0
    printed = capsys.readouterr().out
    _, rows = read_csv(out / "metrics.csv")
    first = {n: float(train_rows(rows, n)[0]["loss"]) for n in ("labpal", "sgd", "adam")}
    # same initial weights, same first batch: the first loss is the same for everyone
    assert len(set(first.values())) == 1
    # and the same batches afterwards: LABPAL measures at s = 0 in its first 10 calls, i.e.
    # without moving, so its losses there are the initial model's on the common batches
    summary = json.loads((out / "summary.json").read_text())
    assert [r["optimizer"] for r in summary["runs"]] == ["labpal", "sgd", "adam"]
    by = {r["optimizer"]: r for r in summary["runs"]}
    assert by["sgd"]["ms_per_step_vs_sgd"] == pytest.approx(1.0)
    assert by["labpal"]["ms_per_step_vs_sgd"] == pytest.approx(
        by["labpal"]["ms_per_step"] / by["sgd"]["ms_per_step"])
    table = (out / "results.md").read_text()
    lines = [ln for ln in table.strip().splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| optimizer | val acc (final) | val loss (final) | steps to")
    assert "ms/step" in lines[0] and "× SGD" in lines[0]
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["LABPAL (NSGD)", "SGD+momentum",
                                                               "Adam"]
    assert table in printed
    assert is_png(out / "loss_lr.png") and is_png(out / "val_accuracy.png")


def test_results_say_how_labpal_spent_a_short_run(tmp_path):
    """Under the table, a line per LABPAL run: its updates, m and measurements; on a run
    shorter than the warm-up with m from the noise factor, the factor and the fix."""
    out = tmp_path / "run"
    # ν = (128/128)·(400000/40000) = 10, so m = 10; one measurement of k·m = 10 calls (its own
    # move is update 1), then 30 calls of training: 3 more updates
    assert run("train", "--task", "spirals", "--steps", 40, "--out", out, "--no-plots",
               "--dataset-size", 400000, "--approximation-batches", 1) == 0
    _, rows = read_csv(out / "metrics.csv")
    assert int(train_rows(rows, "labpal")[-1]["updates"]) == 4
    table = (out / "results.md").read_text()
    assert ("LABPAL (NSGD): 4 updates (m = 10 closure calls per update), 1 line measurement "
            "(1 valid). The warm-up (400 updates) was not reached") in table
    assert "noise factor ν = (128/batch_size)·(dataset_size/40000) = 10.00" in table
    assert "set noise_factor" in table

    out = tmp_path / "past-warmup"  # m = 1 and past the warm-up: the counts alone
    assert run("train", "--task", "spirals", "--steps", 12, "--out", out, "--no-plots",
               "--approximation-batches", 1, "--warmup-updates", 2, "--reuse-updates", 4) == 0
    notes = [ln for ln in (out / "results.md").read_text().splitlines() if ln.startswith("LABPAL")]
    records = json.loads((out / "lines.json").read_text())["labpal"]
    assert len(records) >= 3
    assert notes == [f"LABPAL (NSGD): 12 updates (m = 1 closure call per update), "
                     f"{len(records)} line measurements ({sum(r['valid'] for r in records)} "
                     "valid)."]


def test_compare_batches_are_the_same_sequence(tmp_path):
    """Runs in a compare draw identical index batches (one stream per run, same seed)."""
    task = tasks.load_task("spirals", 0, torch.device("cpu"))
    args = command.build_parser().parse_args(["compare", "--task", "spirals", "--steps", "3"])
    command._resolve_defaults(args, task)
    a, b = command._make_runs(["sgd", "adam"], task, args, torch.device("cpu"))
    for _ in range(30):
        assert torch.equal(a.stream.next(), b.stream.next())
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_default_compare_set_has_the_builtins_first():
    names = registry.default_compare_set()
    assert names[:4] == ["labpal", "labpal-sgd", "sgd", "adam"]
    for n in names[4:]:
        assert registry.SPECS[n].available()
    with pytest.raises(ValueError, match="unknown optimizer"):
        registry.parse_names("labpal,lion")


# ---------------------------------------------------------------------------- report
def test_report_rebuilds_plots_and_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("compare", "--optimizers", "labpal,sgd", "--task", "spirals", "--steps", 12,
               "--eval-every", 4, "--out", out) == 0
    table = (out / "results.md").read_text()
    for name in ("loss_lr.png", "val_accuracy.png", "lines_labpal.png", "results.md"):
        os.remove(out / name)
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    assert table in capsys.readouterr().out
    assert (out / "results.md").read_text() == table
    for name in ("loss_lr.png", "val_accuracy.png", "lines_labpal.png"):
        assert is_png(out / name), name


def test_report_of_a_directory_without_a_run(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "metrics.csv not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------- interrupts
def test_ctrl_c_stops_cleanly_and_reports_the_steps_done(tmp_path, monkeypatch, capsys):
    def interrupt(r):
        if r.name == "sgd" and r.steps_done == 5:
            raise KeyboardInterrupt
    monkeypatch.setattr(training, "_after_step", interrupt)
    out = tmp_path / "cut"
    assert run("compare", "--optimizers", "labpal,sgd", "--task", "spirals", "--steps", 40,
               "--eval-every", 20, "--out", out) == command.EXIT_INTERRUPTED
    assert "INTERRUPTED" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    _, rows = read_csv(out / "metrics.csv")
    # CPU runs take turns step by step: LABPAL had done 5 steps when SGD's 5th raised
    assert len(train_rows(rows, "labpal")) == 5 and len(train_rows(rows, "sgd")) == 5
    by = {r["optimizer"]: r for r in summary["runs"]}
    assert by["sgd"]["steps_done"] == 5
    # a final evaluation covers the steps done
    evals = [r for r in rows if r["optimizer"] == "sgd" and r["kind"] == "eval"]
    assert [int(r["step"]) for r in evals] == [0, 5]
    assert is_png(out / "loss_lr.png") and (out / "results.md").exists()
    text = (out / "results.md").read_text()
    assert text.startswith("**Interrupted**") and "before the 40 steps" in text
    assert "LABPAL (NSGD) 5" in text and "SGD+momentum 5" in text


# ---------------------------------------------------------------------------- determinism
def test_same_seed_same_metrics(tmp_path):
    def losses(seed, name):
        out = tmp_path / f"{name}-{seed}"
        assert run("train", "--optimizer", "labpal", "--task", "digits", "--steps", 14,
                   "--eval-every", 7, "--seed", seed, "--out", out, "--no-plots") == 0
        _, rows = read_csv(out / "metrics.csv")
        return [(r["step"], r["kind"], r["loss"], r["lr"], r["phase"], r["updates"],
                 r["val_loss"], r["val_accuracy"]) for r in rows]
    a, b, c = losses(3, "a"), losses(3, "b"), losses(4, "c")
    assert a == b
    assert a != c


def test_digits_split_is_deterministic_by_seed():
    d0 = tasks.load_task("digits", 0, torch.device("cpu"))
    d0b = tasks.load_task("digits", 0, torch.device("cpu"))
    d1 = tasks.load_task("digits", 1, torch.device("cpu"))
    assert torch.equal(d0.y_val, d0b.y_val) and torch.equal(d0.x_train, d0b.x_train)
    assert not torch.equal(d0.x_val, d1.x_val)
    assert d0.train_size + d0.x_val.shape[0] == 1797 and d0.x_val.shape[0] == 359


# ---------------------------------------------------------------------------- tasks
def write_fake_cifar(root, per_batch=12, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}, f)
        written[name] = (data, labels)
    return written


def test_cifar10_reads_torchvision_pickles_and_trains(tmp_path):
    written = write_fake_cifar(tmp_path / "data")
    task = tasks.load_task("cifar10", 0, torch.device("cpu"), str(tmp_path / "data"))
    assert task.x_train.shape == (60, 3, 32, 32) and task.x_val.shape == (12, 3, 32, 32)
    first, labels = written["data_batch_1"]
    assert torch.equal(task.x_train[:12], torch.from_numpy(first.reshape(12, 3, 32, 32)))
    assert task.y_train[:12].tolist() == labels
    assert task.y_val.tolist() == written["test_batch"][1]
    # augmentation: crops and flips of the padded image, same shape
    x = task.prepare(task.x_train[:4])
    aug = tasks.cifar_augment(x, torch.Generator().manual_seed(0))
    assert aug.shape == x.shape and not torch.equal(aug, x)
    model = tasks.ResNet20()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(272_474, rel=0.01)
    out = tmp_path / "run"
    assert run("train", "--optimizer", "sgd", "--task", "cifar10", "--data-dir",
               tmp_path / "data", "--steps", 2, "--batch-size", 8, "--out", out,
               "--no-plots") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"]["train_size"] == 60 and summary["runs"][0]["steps_done"] == 2


@pytest.mark.parametrize("given", ["missing", "empty", "none"])
def test_cifar10_without_data_says_so_and_downloads_nothing(tmp_path, capsys, given):
    argv = ["train", "--task", "cifar10", "--steps", 1, "--out", tmp_path / "out"]
    if given == "missing":
        argv += ["--data-dir", tmp_path / "nowhere"]
    elif given == "empty":
        (tmp_path / "empty").mkdir()
        argv += ["--data-dir", tmp_path / "empty"]
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and "nothing is downloaded" in err
    if given == "missing":
        assert "does not exist" in err
    assert not (tmp_path / "nowhere").exists()


def test_charlm_task_trains(tmp_path):
    task = tasks.load_task("charlm", 0, torch.device("cpu"))
    assert task.sequence and task.x_train.shape[1] == task.y_train.shape[1]
    # targets are the inputs shifted by one character
    assert torch.equal(task.x_train[0, 1:], task.y_train[0, :-1])
    out = tmp_path / "lm"
    assert run("train", "--optimizer", "adam", "--task", "charlm", "--steps", 3,
               "--out", out, "--no-plots") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["runs"][0]["final_val_accuracy"] <= 1
    # reported in bits per character: the metrics' last validation loss (nats) / ln 2
    _, rows = read_csv(out / "metrics.csv")
    nats = float([r for r in rows if r["kind"] == "eval"][-1]["val_loss"])
    table = (out / "results.md").read_text()
    assert "val bits/char (final)" in table and "val acc" not in table
    assert f"| {nats / np.log(2):.4f} |" in table, table


def test_progress_bar_unless_quiet(tmp_path, capsys):
    argv = ["train", "--optimizer", "sgd", "--task", "spirals", "--steps", "5", "--batch-size",
            "16", "--no-plots", "--device", "cpu"]
    assert cli.main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert "5/5" in capsys.readouterr().err
    assert cli.main(argv + ["--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "5/5" not in capsys.readouterr().err


def test_python_dash_m_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "labpal_fast", "train", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--optimizer", "--task", "--steps", "--batch-size", "--seed", "--device",
                 "--out", "--quiet", "--reuse-updates", "--update-step-adaptation"):
        assert flag in proc.stdout


FAKE_SCHEDULEFREE = '''
import torch
calls = []

class _Base(torch.optim.SGD):
    def __init__(self, params, lr=0.05, weight_decay=0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay)
    def train(self):
        calls.append("train")
    def eval(self):
        calls.append("eval")

class SGDScheduleFree(_Base):
    pass

class AdamWScheduleFree(_Base):
    pass
'''


def test_installed_optional_optimizers_join_compare(tmp_path, monkeypatch):
    """An installed optional package (here a stand-in `schedulefree`) joins the default
    compare set, and schedule-free runs are switched to eval mode around evaluations."""
    (tmp_path / "pkgs").mkdir()
    (tmp_path / "pkgs" / "schedulefree.py").write_text(FAKE_SCHEDULEFREE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.delitem(sys.modules, "schedulefree", raising=False)
    names = registry.default_compare_set()
    assert "sf-sgd" in names and "sf-adamw" in names
    out = tmp_path / "cmp"
    assert run("compare", "--optimizers", "sgd,sf-sgd", "--task", "digits", "--steps", 4,
               "--eval-every", 2, "--out", out, "--no-plots") == 0
    import schedulefree
    # train() at the start, then eval()/train() around each of the 3 evaluations
    assert schedulefree.calls == ["train"] + ["eval", "train"] * 3
    table = (out / "results.md").read_text()
    assert "Schedule-free SGD" in table


def test_real_sigint_writes_the_report(tmp_path):
    """Ctrl-C from outside (SIGINT to the process) ends the run with the files written."""
    import signal
    out = tmp_path / "sig"
    proc = subprocess.Popen(
        [sys.executable, "-m", "labpal_fast", "train", "--optimizer", "sgd", "--task",
         "spirals", "--steps", "1000000", "--eval-every", "1000", "--device", "cpu",
         "--threads", "1", "--no-plots", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "step" not in seen:           # the progress bar is running: training has begun
            ch = proc.stderr.read(1)
            assert ch, "the command ended before training began"
            seen += ch
        time.sleep(1.5)                      # some steps (about 1 ms each)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == command.EXIT_INTERRUPTED
    assert "INTERRUPTED" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and 0 < summary["runs"][0]["steps_done"] < 1000000
    _, rows = read_csv(out / "metrics.csv")
    assert len(train_rows(rows, "sgd")) == summary["runs"][0]["steps_done"]


def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["train", "--task", "spirals", "--steps", "1", "--quiet", "--device",
                     "cuda", "--out", str(tmp_path / "x")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert command.pick_device("auto") == torch.device("cpu")


def test_train_help_describes_every_optimizer(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in ("labpal", "labpal-sgd", "sgd", "adam", "prodigy"):
        assert f"{name}:" in text
    assert "÷10 at 50% and 75% of the steps" in text


# ---------------------------------------------------------------------------- help and bad values
def _help(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("sub", ["train", "compare"])
def test_help_lists_choices_and_the_defaults_the_command_passes(capsys, sub):
    from labpal_fast.hyper import LINE_FITS, SGD_RATES
    from labpal_fast.ops import BACKENDS
    text = _help(capsys, sub)
    assert "--backend {" + ",".join(BACKENDS) + "}" in text
    assert "--line-fit {" + ",".join(LINE_FITS) + "}" in text
    assert "--sgd-rate {" + ",".join(SGD_RATES) + "}" in text
    assert "HP_" not in text  # no dest-derived metavars
    # the command passes the training split, not LABPAL's 40000
    dataset = text[text.index("--dataset-size N, --dataset_size N"):][:120]
    assert "training-split size" in dataset and "40000" not in dataset, dataset


@pytest.mark.parametrize("argv, names", [
    (["--backend", "nonsense"], "--backend"),
    (["--threads", "-1"], "--threads"),
    (["--threads", "0"], "--threads"),
    (["--threads", "two"], "--threads"),
    (["--line-fit", "exact"], "--line-fit"),
    (["--data-dir", "."], "--data-dir"),
])
def test_a_bad_value_is_one_line_naming_the_argument_and_exit_2(tmp_path, capfd, argv, names):
    """In a child process, as a user runs it: one line on stderr, exit code 2, no traceback."""
    out = subprocess.run([sys.executable, "-m", "labpal_fast", "train", "--task", "digits",
                          "--steps", "2", "--quiet", "--out", str(tmp_path / "x"), *argv],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "x").exists()


def test_a_backend_that_cannot_run_on_the_device_is_a_usage_error(tmp_path, capsys, monkeypatch):
    from labpal_fast import ops
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = ops.why_unavailable("triton", [torch.device("cpu")])
    assert reason is not None  # Triton needs a GPU, or the interpreter, for CPU tensors
    assert run("train", "--steps", 2, "--out", tmp_path / "x", "--backend", "triton") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--backend triton cannot run on cpu" in err and reason in err


# ---------------------------------------------------------------------------- what the output says
def test_a_run_shorter_than_the_first_measurement_says_so(tmp_path):
    out = tmp_path / "short"
    assert run("train", "--task", "digits", "--steps", 5, "--out", out, "--no-plots") == 0
    text = (out / "results.md").read_text()
    # approximation_batches = 10 calls at m = 1 before the first update
    assert "0 updates in 5 calls" in text and "first 10 closure calls" in text, text


@pytest.mark.parametrize("name", ["labpal", "labpal-sgd"])
def test_step_size_column_is_labpals_s_upd(tmp_path, name):
    """metrics.csv's step_size is the s_upd each measurement set (lines.json), 0 before the
    first; NSGD's lr column is s_upd/‖d‖, not the step size; other optimizers have none."""
    out = tmp_path / name
    assert run("compare", "--optimizers", f"{name},sgd", "--task", "spirals", "--steps", 30,
               "--eval-every", 30, "--out", out, "--no-plots", "--approximation-batches", 3,
               "--reuse-updates", 8, "--warmup-updates", 100, "--noise-factor", 1) == 0
    _, rows = read_csv(out / "metrics.csv")
    train = train_rows(rows, name)
    records = json.loads((out / "lines.json").read_text())[name]
    assert len(records) >= 3 and all(r["valid"] for r in records)
    assert [float(r["step_size"]) for r in train[:2]] == [0.0, 0.0]  # no measurement yet
    # the training calls after each measurement (3 calls from its first) carry its s_upd
    ends = [rec["call"] + 3 for rec in records] + [len(train)]
    checked = 0
    for rec, start, stop in zip(records, ends, ends[1:]):
        for r in train[start:stop]:
            if r["phase"] == "training":
                assert float(r["step_size"]) == pytest.approx(rec["s_upd"], rel=1e-12)
                checked += 1
    assert checked >= 10
    if name == "labpal":
        assert any(abs(float(r["lr"]) - float(r["step_size"])) > 1e-3 for r in train[3:])
    assert all(r["step_size"] == "" for r in train_rows(rows, "sgd"))


def _axes():
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    return plt, fig, ax


def test_line_panel_shows_every_sample_the_clamp_and_the_step_taken():
    """A fit whose minimum lies past max_step_size: the clamp is drawn, the step taken is
    3.6 × 0.5 = 1.8 on the parabola (above the start there), and the two samples that overlap
    at the plot's scale are shown apart in an inset."""
    a, b, c = 0.314, -0.491, 2.34
    f = lambda s: a * s * s + b * s + c  # noqa: E731
    pos = [0.0, 0.0038, 0.217]
    rec = {"positions": pos, "mean_losses": [f(p) for p in pos], "a": a, "b": b, "c": c,
           "s_min": -b / (2 * a), "s_new": 1.8, "s_upd": 1.8, "valid": True}
    plt, fig, ax = _axes()
    report._draw_line(ax, rec, {"max_step_size": 0.5, "update_step_adaptation": 3.6})
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("clamp: max_step_size = 0.5" in t for t in labels), labels
    (star,) = [ln for ln in ax.lines if ln.get_marker() == "*"]
    assert star.get_xdata()[0] == 1.8 and star.get_ydata()[0] == pytest.approx(f(1.8))
    assert any("s_upd = 1.8 = 3.6 × 0.5" in t and "above the start" in t for t in labels)
    (inset,) = ax.child_axes
    shown = [x for ln in inset.lines if ln.get_marker() == "o" for x in ln.get_xdata()]
    assert shown == [0.0, 0.0038]
    plt.close(fig)


def test_abandoned_measurement_is_its_reason_not_empty_axes():
    rec = {"positions": [0.0, 0.000177, 0.01], "mean_losses": [1.87e-05, None, None],
           "valid": False, "direction_norm": 0.000512,
           "reason": "abandoned: direction norm outside direction_norm_range or not finite"}
    plt, fig, ax = _axes()
    report._draw_abandoned(ax, rec, {"direction_norm_range": [0.001, 100.0]})
    assert not ax.axison and not ax.lines
    text = " ".join(t.get_text() for t in ax.texts).replace("\n", " ")
    assert "direction norm outside" in text and "‖d‖ = 0.000512" in text and "0.001" in text
    plt.close(fig)


def test_zero_losses_stay_on_a_log_axis():
    values = [1.0, 1e-9, 0.0, 0.0, 2e-9]
    floor = report._log_floor([values])
    assert floor == pytest.approx(1e-9 / 3)
    assert report._floored(values, floor) == [1.0, 1e-9, floor, floor, 2e-9]
