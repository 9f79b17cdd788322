"""benchmarks/gpu_check.py kept alive without a GPU: its end-to-end section runs on CPU (the dry
run: tiny shapes, perf_counter clock, host reads counted by a TorchDispatchMode, aot_eager
compile, the graphs' static outputs emulated), and every figure the GPU run will report is
checked here; the time plan and the measurement's floor are checked against what they claim."""
import json
import math
import os
import sys
import time
import warnings

import pytest
import torch

from labpal_fast import LABPAL

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import end_to_end  # noqa: E402
import gpu_check  # noqa: E402
from plan import Plan  # noqa: E402

BASELINES = ("AdamW(fused)", "SGD(fused)")


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():  # tiny models' first fits fail: LABPAL falls back, says so
            warnings.filterwarnings("ignore", "LABPAL: 3 measurements in a row", RuntimeWarning)
            rc = gpu_check.main(["--dry-run", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    return rc, out, json.loads((out / "end_to_end.json").read_text())


def test_dry_run_writes_every_step(dry_run):
    rc, out, result = dry_run
    assert rc == 0
    for step in gpu_check.STEPS:  # one JSON per step, the GPU-only ones saying why skipped
        saved = json.loads((out / f"{step}.json").read_text())
        if step != "end_to_end":
            assert saved == {"skipped": "dry run: needs a GPU"}
    summary = (out / "summary.txt").read_text()
    assert "LABPAL NSGD" in summary and "cannot be captured" in summary
    assert json.loads((out / "summary.json").read_text())["end_to_end"]["dry_run"] is True
    assert set(end_to_end.PARTS) <= set(result)
    for part in end_to_end.PARTS:
        assert "skipped" not in result[part] and "error" not in result[part], result[part]


@pytest.mark.parametrize("part", ["resnet50", "gpt2", "gpt2_bf16_params"])
def test_dry_run_figures(dry_run, part):
    _, _, result = dry_run
    res = result[part]
    rig = end_to_end.dry_run_rig()
    assert finite(res["fwd_ms"]) and finite(res["fwd_bwd_ms"]) and res["parameters"] > 0
    figures = res["optimizers"]
    assert set(figures) == set(end_to_end.OPTIMIZERS)
    for name, f in figures.items():
        for key in ("train_ms", "optimizer_ms", "over_AdamW(fused)", "over_SGD(fused)"):
            assert finite(f[key]), (name, key, f[key])
        assert f["train_ms"] > 0
        # allocator figures exist on CUDA only
        assert f["peak_MiB"] is None and f["resident_MiB"] is None
        if part == "resnet50":  # whether the 4-D weights are still channels_last (reported)
            assert f["channels_last_params"] is True if name in BASELINES else \
                isinstance(f["channels_last_params"], bool)
    for base in BASELINES:
        assert figures[base]["over_" + base] == 1.0
    for name in ("LABPAL NSGD", "LABPAL SGD"):
        f = figures[name]
        # each timed block is one whole cycle: a measurement, then `reuse` TRAINING steps (a
        # measurement abandoned at its m-th call shifts the cycle: SGD mode with momentum)
        assert 1 <= f["measurements_timed"] <= res["rounds"]
        if f["abandoned_timed"] == 0:
            assert f["measurements_timed"] == res["rounds"]
            assert f["steps_timed"] == res["rounds"] * rig.reuse
        for key in ("measure_ms", "floor_ms", "measure_over_floor", "share_m1",
                    "share_nu_estimated"):
            assert finite(f[key]), (name, key, f[key])
        assert 0 < f["share_m1"] < 1 and 0 < f["share_nu_estimated"] < 1
        # k·P·m − m + 1, m = 1, P = 4: 3 positions and the step check's proposed step
        assert f["floor_passes"] == rig.k * 4 - 1 + 1
        syncs = f["syncs"]
        assert "error" not in syncs, syncs
        assert syncs["strict"] is True and syncs["model_syncs_per_fwd_bwd"] == 0
        # TRAINING steps read nothing (strict: a read raised); a measurement reads at most 2
        assert syncs["train_steps"] >= rig.reuse and syncs["syncs_per_train_step"] == 0
        assert syncs["measurements"] >= 1 and 1 <= syncs["syncs_per_measurement"] <= 2
    nu = res["nu_direct"]
    assert nu["m"] == int(rig.nu) == 2
    for key in ("measure_ms", "update_ms", "floor_ms", "measure_over_floor", "share"):
        assert finite(nu[key]), (key, nu)


def test_dry_run_graphs_and_compile(dry_run):
    _, _, result = dry_run
    graphs = result["gpt2_cuda_graphs"]
    assert graphs["works"] is True
    for name in ("LABPAL NSGD", "AdamW(fused)"):
        assert finite(graphs["optimizers"][name]["train_ms"])
    assert graphs["optimizers"]["LABPAL NSGD"]["measurements_timed"] >= 1
    assert graphs["optimizers"]["LABPAL NSGD"]["syncs"]["syncs_per_train_step"] == 0
    probe = graphs["loss_in_graph"]
    # the loss returned as the graph's static output is overwritten by the next replay; cloned
    # in the closure it is not, and the repeat check stops a closure that does not repeat
    assert probe["aliased"]["returned_loss_overwritten"] is True
    assert probe["cloned"] == {"returned_loss_overwritten": False, "repeat_check": "caught"}
    assert probe["aliased"]["repeat_check"] in ("caught", "missed")
    compiled = result["gpt2_compiled"]
    assert compiled["backend"] == "aot_eager" and compiled["graphs_compiled"] >= 2
    labpal = compiled["optimizers"]["LABPAL NSGD"]
    assert labpal["measurements_timed"] >= 1 and finite(labpal["measure_ms"])
    assert finite(labpal["over_AdamW(fused)"])


def test_host_reads_counts_and_strict_raises():
    x = torch.randn(3)
    with end_to_end.HostReads(strict=False) as reads:
        float(x.sum())
        bool(x[0] > 0)
        x.mul(2)
    assert reads.n == 2
    with pytest.raises(RuntimeError, match="host read"):
        with end_to_end.HostReads(strict=True):
            x.sum().item()


@pytest.mark.parametrize("m", [1, 2])
def test_floor_counts_the_forward_passes_a_measurement_makes(m, backend):
    """k·P·m − m + 1 forward passes without grad, beyond m with grad: counted on the model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    passes = {True: 0, False: 0}  # forward passes with grad enabled, without

    def count(*_):
        passes[torch.is_grad_enabled()] += 1
    model.register_forward_hook(count)
    k = 3
    opt = LABPAL(model.parameters(), noise_factor=float(m),
                 batch_size_schedule=((0, 1),), approximation_batches=k, warmup_updates=0,
                 reuse_updates=10, direction_norm_range=(0.0, math.inf))
    data = [(torch.randn(6, 5), torch.randint(0, 2, (6,))) for _ in range(k * m)]
    for x, y in data:  # the first measurement: k·m calls
        opt.step(lambda x=x, y=y: torch.nn.functional.cross_entropy(model(x), y))
    assert opt.phase == "training" and len(opt.measurements()) == 1
    p = len(opt.hyper.line_positions) + 1  # and the step check's proposed step (on by default)
    assert passes == {True: m, False: end_to_end.floor_passes(k, p, m)}


def test_plan_shares_skips_and_saves_each_step_when_it_ends():
    saved = []
    lines = []
    plan = Plan(10.0, {"a": (1, None), "b": (1, 2.0), "c": (2, None), "d": (1, None)},
                save=lambda name, result: saved.append((name, dict(result))),
                minimum=1.0, log=lines.append)
    allowed, saved_before = {}, {}

    def step(name, fail=False):
        def fn(deadline):
            allowed[name] = deadline - time.monotonic()
            saved_before[name] = [n for n, _ in saved]
            if fail:
                raise ValueError("broken step")
            return {"ran": name}
        return fn
    plan.run("a", step("a"))
    assert 10 / 5 - 0.5 < allowed["a"] <= 10 / 5  # its share of 5
    plan.run("b", step("b", fail=True))
    assert allowed["b"] <= 2.0  # the cap
    assert saved[-1][1]["error"] == "ValueError: broken step"
    plan.end = time.monotonic() + 1.2  # little time left: c gets 2/3 of it, under the minimum
    assert plan.run("c", step("c")) == {"skipped": saved[-1][1]["skipped"]}
    assert "c" not in allowed and any(line.startswith("[c] skipped: out of time")
                                      for line in lines)
    plan.run("d", step("d"))  # d gets all that is left, above the minimum
    assert [n for n, _ in saved] == ["a", "b", "c", "d"] and saved[-1][1]["ran"] == "d"
    # each step's result was saved before the next step started
    assert saved_before == {"a": [], "b": ["a"], "d": ["a", "b", "c"]}
