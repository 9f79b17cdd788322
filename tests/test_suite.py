"""The quality suite (`labpal-fast suite`, docs/quality.md): a smoke run of 1 task, 2 optimizers
and 20 steps, interrupted in the middle and resumed, must give what an uninterrupted run gives;
and the report's targets against figures worked out by hand."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from labpal_fast.cli import command, suite, suite_report, suite_tasks, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["suite", "--quick", "--tasks", "digits-mlp", "--optimizers", "labpal,adam",
         "--steps", "20", "--no-plots", "--quiet"]
TIMING = ("train_time_s", "cpu_s")


def _rows(out):
    rows = suite.read_rows(os.path.join(out, suite.RESULTS))
    return {(r["optimizer"], r["seed"]): {k: v for k, v in r.items() if k not in TIMING}
            for r in rows}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("whole"))
    assert command.run(SMOKE + ["--workers", "0", "--out", out]) == 0
    rows = _rows(out)
    assert set(rows) == {("labpal", 0), ("adam", 0)}
    for row in rows.values():
        assert row["steps"] == 20 and math.isfinite(row["figure"]) and row["curve"]
    return rows


def test_interrupted_in_a_job_and_resumed_equals_an_uninterrupted_run(
        uninterrupted, tmp_path, monkeypatch, capsys):
    out = str(tmp_path)
    jobs = []

    def interrupt(run):   # Ctrl-C at step 10 of the second job
        if run.steps_done == 1:
            jobs.append(run.name)
        if len(jobs) == 2 and run.steps_done == 10:
            raise KeyboardInterrupt
    monkeypatch.setattr(training, "_after_step", interrupt)
    assert command.run(SMOKE + ["--workers", "0", "--out", out]) == suite.EXIT_INTERRUPTED
    first = _rows(out)
    assert list(first) == [(jobs[0], 0)]          # the interrupted job left nothing behind
    monkeypatch.undo()
    capsys.readouterr()
    assert command.run(SMOKE + ["--workers", "0", "--out", out]) == 0
    assert "1 job(s) to run (1 done before)" in capsys.readouterr().out
    assert _rows(out) == uninterrupted


def test_killed_by_a_signal_and_resumed_equals_an_uninterrupted_run(uninterrupted, tmp_path):
    """A real process with a worker pool, sent SIGTERM while its first jobs run."""
    out = str(tmp_path)
    cmd = [sys.executable, "-m", "labpal_fast"] + SMOKE + ["--workers", "1", "--out", out]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    assert "job(s) to run" in proc.stdout.readline()
    time.sleep(0.5)          # the worker is starting (it imports torch) or training
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == suite.EXIT_INTERRUPTED, err
    assert "run the same command again" in err
    assert len(_rows(out)) < 2
    assert command.run(SMOKE + ["--workers", "0", "--out", out]) == 0   # resumed here
    assert _rows(out) == uninterrupted


def test_the_report_renders_again_from_its_record_alone(uninterrupted, tmp_path):
    out = str(tmp_path)
    assert command.run(SMOKE + ["--workers", "0", "--out", out]) == 0
    record = os.path.join(out, suite_report.RECORD)
    os.remove(os.path.join(out, suite.RESULTS))   # the record alone, as committed
    with open(os.path.join(out, "suite.md")) as f:
        assert suite_report.render_record(record) + "\n" == f.read()   # as it was written
    with open(record) as f:
        rows = [json.loads(line) for line in f][1:]
    assert {(r["optimizer"], r["seed"]) for r in rows} == set(uninterrupted)
    assert not any("curve" in r or "val_curve" in r for r in rows)  # the figures, not the curves


def test_a_file_that_is_no_record_is_refused_with_what_to_copy(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"task": "digits-mlp", "optimizer": "adam", "seed": 0}) + "\n")
    with pytest.raises(ValueError, match="report.jsonl"):
        suite_report.render_record(str(path))


def test_a_torn_last_line_is_skipped_so_its_job_runs_again(tmp_path):
    path = str(tmp_path / suite.RESULTS)
    whole = dict(task="digits-mlp", optimizer="adam", seed=0, figure=90.0)
    suite.append_row(path, whole)
    with open(path, "a") as f:
        f.write('{"task": "digits-mlp", "optimizer": "labpal", "se')   # killed mid-write
    assert suite.read_rows(path) == [whole]


# ---------------------------------------------------------------------------- the report
def _row(task, optimizer, seed, figure, val=None, diverged=False):
    return dict(task=task, optimizer=optimizer, seed=seed, figure=figure,
                val_figure=figure if val is None else val, diverged=diverged, steps=10)


def test_targets_against_hand_worked_figures():
    """digits-mlp (accuracy, margin 1 point, trivial 9.749): SGD's rate 0.1 has the best
    validation figure on seed 0, so tuned SGD = sgd@0.1 with 97 and 95 (mean 96), Adam 94 and
    92 (mean 93) is the weaker: parity's reference. The floor's middle is (9.749 + 96) / 2."""
    t = suite.task("digits-mlp")
    assert t.trivial == pytest.approx(9.749, abs=1e-3)
    rows = [_row("digits-mlp", "sgd@0.3", 0, 50.0, val=50.0),
            _row("digits-mlp", "sgd@0.1", 0, 97.0, val=96.0),
            _row("digits-mlp", "sgd@0.03", 0, 90.0, val=95.0),
            _row("digits-mlp", "sgd@0.01", 0, 80.0, val=80.0),
            _row("digits-mlp", "sgd@0.1", 1, 95.0),
            _row("digits-mlp", "adam", 0, 94.0), _row("digits-mlp", "adam", 1, 92.0),
            # paired differences to Adam: -1.5 and -0.3 → mean -0.9, within the 1-point margin
            _row("digits-mlp", "labpal", 0, 92.5), _row("digits-mlp", "labpal", 1, 91.7),
            # -3 and -52 → mean -27.5: missed by 26.5; seed 1 lies below the middle (52.87)
            _row("digits-mlp", "labpal-sgd", 0, 91.0), _row("digits-mlp", "labpal-sgd", 1, 40.0),
            _row("digits-mlp", "labpal-m09", 0, 96.0, diverged=True),
            _row("digits-mlp", "labpal-m09", 1, 96.0)]
    res = suite_report.TaskResults(t, rows, [0, 1])
    assert res.sgd_lr == 0.1
    assert res.mean(suite.TUNED_SGD) == 96.0
    assert res.parity_ref() == "adam"
    assert res.shortfall("labpal", "adam") == pytest.approx(-0.1)
    assert res.floor("labpal") == []
    assert res.shortfall("labpal-sgd", "adam") == pytest.approx(26.5)
    assert res.floor("labpal-sgd") == ["seed 1 40 in the lower half (mid 52.9)"]
    assert res.floor("labpal-m09") == ["seed 0 diverged"]
    # counted: baselines 96 (tuned SGD) and 93 (Adam) differ by 3 margins exactly
    assert res.counts() is True
    # (c): NSGD against tuned SGD: (92.5 - 97 + 91.7 - 95) / 2 = -3.9, missed by 2.9
    assert res.shortfall("labpal", suite.TUNED_SGD) == pytest.approx(2.9)
    assert res.best_peer() == "adam"


def test_a_seed_where_only_the_reference_diverged_is_left_out_of_the_pairing():
    """Tuned SGD's rate is picked on seed 0 and may diverge on another seed (text-transformer's
    lr 1 does on seeds 1 and 2): NSGD is ahead there, so that seed is left out and said so;
    a seed where NSGD diverged still makes its difference NaN."""
    t = suite.task("diabetes-b16")     # MSE, lower is better, margin 10% of the reference
    rows = [_row("diabetes-b16", "sgd@0.1", 0, 0.50, val=0.4),
            _row("diabetes-b16", "sgd@0.03", 0, 0.60, val=0.6),
            _row("diabetes-b16", "sgd@0.01", 0, 0.70, val=0.7),
            _row("diabetes-b16", "sgd@0.003", 0, 0.80, val=0.8),
            _row("diabetes-b16", "sgd@0.1", 1, math.nan),
            _row("diabetes-b16", "labpal", 0, 0.52), _row("diabetes-b16", "labpal", 1, 0.9),
            _row("diabetes-b16", "labpal-sgd", 0, 0.52), _row("diabetes-b16", "labpal-sgd", 1,
                                                               math.nan)]
    res = suite_report.TaskResults(t, rows, [0, 1])
    assert res.ref_diverged("labpal", suite.TUNED_SGD) == [1]
    assert res.paired("labpal", suite.TUNED_SGD) == pytest.approx(0.02)  # seed 0 only
    assert res.shortfall("labpal", suite.TUNED_SGD) == pytest.approx(0.02 - 0.05)
    assert math.isnan(res.paired("labpal-sgd", suite.TUNED_SGD))
    table = "\n".join(suite_report.targets([res]))
    assert "ok (tuned SGD diverged on seed 1: left out)" in table


def test_relative_margins_for_loss_figures():
    t = suite.task("diabetes-b16")     # MSE: 10% of the reference, lower is better
    rows = [_row("diabetes-b16", "adam", 0, 0.50), _row("diabetes-b16", "labpal", 0, 0.56)]
    res = suite_report.TaskResults(t, rows, [0])
    assert suite_report.margin("mse", 0.5) == pytest.approx(0.05)
    assert res.shortfall("labpal", "adam") == pytest.approx(0.01)
    assert suite_report.margin("bits", 2.0) == pytest.approx(0.06)


def test_every_task_has_three_splits_and_a_trivial_figure_from_its_data():
    kinds = set()
    for name in suite_tasks.SUITE:
        t = suite.task(name)
        sizes = (t.train_size, t.x_val.shape[0], t.x_test.shape[0])
        assert min(sizes) > 0, name
        kinds.add(t.metric)
        assert math.isfinite(t.trivial)
    assert kinds == set(suite_tasks.METRICS)
    assert len(suite_tasks.SUITE) >= 10
    batches = sorted(suite.task(n).defaults.batch_size for n in suite_tasks.SUITE)
    assert batches[0] == 8 and batches[-1] == 256
    assert sum(suite.task(n).defaults.steps >= 20000 for n in suite_tasks.SUITE) >= 2


def test_unknown_names_are_refused_with_the_known_ones(tmp_path, capsys):
    assert command.run(["suite", "--tasks", "nope", "--out", str(tmp_path)]) == 2
    assert "digits-mlp" in capsys.readouterr().err
    assert command.run(["suite", "--optimizers", "lion", "--out", str(tmp_path)]) == 2
    assert "unknown suite optimizer 'lion'" in capsys.readouterr().err


def test_the_labpal_tier_without_baselines_says_how_to_make_them(tmp_path, capsys):
    empty = tmp_path / "baselines.jsonl"
    empty.write_text("")
    code = command.run(["suite", "--labpal", "--tasks", "digits-mlp", "--baselines", str(empty),
                        "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--regenerate-baselines" in err and str(empty) in err


def test_regenerating_some_tasks_keeps_the_other_tasks_baselines(tmp_path):
    path = str(tmp_path / "baselines.jsonl")
    other = dict(task="wine-long", optimizer="adam", seed=0, figure=90.0, fingerprint="x")
    with open(path, "w") as f:
        f.write(json.dumps({"header": {"date": "old"}}) + "\n" + json.dumps(other) + "\n")
    assert command.run(["suite", "--tasks", "digits-mlp", "--optimizers", "adam,labpal",
                        "--seeds", "0", "--steps", "5", "--regenerate-baselines", "--baselines",
                        path, "--workers", "0", "--no-plots", "--quiet",
                        "--out", str(tmp_path / "out")]) == 0
    with open(path) as f:
        head = json.loads(f.readline())
    assert head["header"]["date"] != "old" and "torch" in head["header"]["versions"]
    rows = suite.read_rows(path)
    assert rows[0] == other
    assert [(r["task"], r["optimizer"]) for r in rows[1:]] == [("digits-mlp", "adam")]
