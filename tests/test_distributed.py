"""LABPAL under torch.distributed: real gloo process groups of CPU ranks (tests/dist_cases.py).

The oracle of every run on N ranks is one process on the whole batch: each rank's closure sees
its share (rows rank, rank+N, ...) of the same global batch, and the line, the rates and the
parameters must match the single process to rounding (float64 models, no dropout or BatchNorm).
Across ranks they must agree bit for bit.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

from labpal_fast import LABPAL

from dist_cases import run_ranks

PER_RANK = 4          # batch_size: the per-rank batch
# ν = (128/(ranks·batch_size))·(N/40000) is 1 on the global batch of 8 (2 ranks · 4, or the single
# process's 8), so the schedule's multiplier 2 from call 30 on gives m = 2 everywhere; were the
# per-rank batch used, ranks would take m = 2 from the start and part from the single process.
GLOBAL = 8
DATASET = 40000 * GLOBAL // 128


def hyper(ranks: int, **over):
    h = dict(approximation_batches=2, reuse_updates=4, warmup_updates=6, averaging_window=3,
             dataset_size=DATASET, batch_size=GLOBAL // ranks,
             batch_size_schedule=((0, 1), (30, 2)), sample_positions=(0.0, 0.03, 0.1))
    if ranks == 1:  # the one-process oracle: the step check is off under torch.distributed,
        # and ν is the paper's there: (128/8)·(DATASET/40000) = 1 on every rank count
        h.update(step_check=False, noise_factor=1.0)
    h.update(over)
    return h


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3)).double()


def global_batches(n: int, seed: int = 1, size: int = GLOBAL):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def build(case: dict, ranks: int):
    """The model, what the closure calls, and LABPAL, as `case` says: wrap="model" (DDP passed
    as model=), "ddp" (DDP, not passed), "none" (one process)."""
    model = net()
    wrap = case["wrap"] if ranks > 1 else "none"
    called = model
    if wrap != "none":
        called = DDP(model, gradient_as_bucket_view=case.get("bucket_view", False))
    groups = [{"params": list(model[0].parameters()), "weight_decay": case.get("wd", 0.0)},
              {"params": list(model[2].parameters())}]
    opt = LABPAL(groups, model=called if wrap == "model" else model, mode=case["mode"],
                 momentum=case["momentum"], **hyper(ranks))
    return model, called, opt


def train(model, called, opt, batches, rank: int, ranks: int, start: int = 0):
    for x, y in batches[start:]:
        xs, ys = x[rank::ranks], y[rank::ranks]
        opt.step(lambda xs=xs, ys=ys: torch.nn.functional.cross_entropy(called(xs), ys))
    return {"params": [p.detach().clone() for p in model.parameters()],
            "lr": opt.param_groups[0]["lr"], "updates": opt.updates,
            "records": opt.measurements()}


def local(record) -> bool:
    """Records of measurements that ended before the line's collective (abandoned, interrupted)
    hold the rank's own loss samples at position 0 (docs/distributed.md)."""
    return bool(record["reason"]) and record["reason"].split(":")[0] in ("abandoned", "interrupted")


def same_records(a, b) -> bool:
    """Bit for bit, NaN equal to NaN; local samples (and what each rank says about its own
    interruption) left out."""
    def key(r):
        out = {k: v for k, v in r.items()
               if not (local(r) and k in ("mean_losses", "counts", "reason"))}
        return repr(out)  # repr: nan == nan
    return len(a) == len(b) and all(key(x) == key(y) for x, y in zip(a, b))


CASES = [
    dict(mode="NSGD", momentum=0.9, wd=1e-3, wrap="model"),
    dict(mode="SGD", momentum=0.5, wd=1e-2, wrap="model", bucket_view=True),
    dict(mode="NSGD", momentum=0.0, wd=0.0, wrap="ddp"),
]
CALLS = 50


def _cases_worker(rank, world, cases, calls):
    out = []
    for case in cases:
        model, called, opt = build(case, world)
        out.append(train(model, called, opt, global_batches(calls), rank, world))
    return out


def _check_ranks_and_oracle(results, cases, calls, ranks):
    for i, case in enumerate(cases):
        model, called, opt = build(case, 1)
        oracle = train(model, called, opt, global_batches(calls), 0, 1)
        valid = [r for r in oracle["records"] if r["valid"]]
        assert len(valid) >= 3 and {r["m"] for r in valid} == {1, 2}, oracle["records"]
        first = results[0][i]
        for other in results[1:]:  # bit for bit across ranks
            got = other[i]
            assert all(torch.equal(a, b) for a, b in zip(first["params"], got["params"])), case
            assert first["lr"] == got["lr"] and same_records(first["records"], got["records"])
        # one process on the whole batch, to rounding
        assert first["updates"] == oracle["updates"]
        assert [r["reason"] for r in first["records"]] == [r["reason"] for r in oracle["records"]]
        for r, o in zip(first["records"], oracle["records"]):
            assert r["call"] == o["call"] and r["m"] == o["m"], (r, o)
            assert r["counts"] == [c * (1 if local(r) else ranks) for c in o["counts"]], (r, o)
            for key in ("s_min", "s_upd", "eta"):
                assert r[key] == pytest.approx(o[key], rel=1e-9, abs=1e-15, nan_ok=True), (key, r, o)
        assert first["lr"] == pytest.approx(oracle["lr"], rel=1e-9)
        for a, b in zip(first["params"], oracle["params"]):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-10), (case, (a - b).abs().max())


def test_ranks_bit_identical_and_equal_to_one_process(backend):
    """2 ranks, DDP as model= (with and without gradient_as_bucket_view) and DDP not passed;
    both modes, momentum, weight decay; m = 1 then 2 (the multiplier's change measures again)."""
    cases = CASES if backend == "eager" else CASES[1:2]  # the other backends: one case (time)
    results = run_ranks(_cases_worker, 2, cases, CALLS, backend=backend, deadline=240)
    _check_ranks_and_oracle(results, cases, CALLS, 2)


def test_four_ranks_match_one_process():
    cases = [dict(mode="NSGD", momentum=0.9, wd=1e-3, wrap="model")]
    results = run_ranks(_cases_worker, 4, cases, CALLS, deadline=120)
    _check_ranks_and_oracle(results, cases, CALLS, 4)


# ---------------------------------------------------------------- positions (resolve_positions)
RESOLUTION_CASES = [  # fp32; the default positions resolve (kept); tiny ones move by the loss floor
    dict(sample_positions=(0.0, 1.77e-4, 0.01)),
    dict(sample_positions=(0.0, 1e-6, 1e-4)),
]


def _resolution_run(rank, ranks, over):
    model = net().float()
    called = DDP(model) if ranks > 1 else model
    opt = LABPAL(model.parameters(), model=called, **hyper(ranks, **over))
    for x, y in global_batches(8):
        xs, ys = x[rank::ranks].float(), y[rank::ranks]
        opt.step(lambda xs=xs, ys=ys: torch.nn.functional.cross_entropy(called(xs), ys))
    return opt.measurements()


def _resolution_worker(rank, world):
    return [_resolution_run(rank, world, case) for case in RESOLUTION_CASES]


def test_positions_on_two_ranks_are_those_of_one_process():
    """The positions are set at call k·m from the loss at s = 0 (its rounding floor): over every
    rank's samples (one all-reduce of the loss sum and count), so 2 ranks measure where one
    process on the same global batch does, fp32 at the defaults (kept as given) and where the
    floor moves them (there the fit agrees too: at the paper's positions, an fp32 loss
    difference of a few roundings makes s_min differ by ~10% between two sums of the same
    samples in another order, the accuracy those positions have in fp32)."""
    results = run_ranks(_resolution_worker, 2)
    for i, case in enumerate(RESOLUTION_CASES):
        oracle = _resolution_run(0, 1, case)
        ranks = [r[i] for r in results]
        assert len(oracle) >= 2 and all(r["valid"] for r in oracle), oracle
        assert repr(ranks[0]) == repr(ranks[1])  # bit for bit across ranks
        # fp32 sums of the ranks' shares and of the whole batch differ by rounding, and so the
        # parameters after each measurement's move (at the paper's positions fp32 rounding
        # alone moves s_min by ~10%): the first measurement, from the same θ₀, is compared
        # closely, the later ones' positions to 1% (the floor missing across ranks moved them
        # by a factor of 200 in the second case)
        got, want = ranks[0][0], oracle[0]
        assert got["positions"] == pytest.approx(want["positions"], rel=1e-5), case
        assert got["mean_losses"] == pytest.approx(want["mean_losses"], rel=1e-6), case
        if i == 1:
            assert got["s_min"] == pytest.approx(want["s_min"], rel=1e-3), case
        for got, want in zip(ranks[0], oracle):
            assert got["call"] == want["call"]
            assert got["positions"] == pytest.approx(want["positions"], rel=1e-2), case
        moved = oracle[0]["positions"][1] / case["sample_positions"][1]
        assert (moved == 1.0) if i == 0 else (moved > 100), oracle[0]["positions"]


# ---------------------------------------------------------------- collectives and host reads
class Watch(TorchDispatchMode):
    """The collectives (name, bytes sent) and host reads of the code it wraps."""

    def __init__(self):
        super().__init__()
        self.collectives, self.syncs = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            first = args[0]
            tensors = first if isinstance(first, (list, tuple)) else [first]
            if func.__name__.startswith("allgather"):
                tensors = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            self.collectives.append((func.__name__.split(".")[0],
                                     sum(t.numel() * t.element_size() for t in tensors)))
        elif func.overloadpacket.__name__ in ("_local_scalar_dense", "item"):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def _count_worker(rank, world, wrap, m, calls):
    model = net()
    called = DDP(model)
    opt = LABPAL(model.parameters(), model=called if wrap == "model" else model, momentum=0.9,
                 **hyper(world, batch_size_schedule=((0, m),)))
    per_call = []
    for x, y in global_batches(calls):
        xs, ys = x[rank::world], y[rank::world]
        with Watch() as w:
            opt.step(lambda xs=xs, ys=ys: torch.nn.functional.cross_entropy(called(xs), ys))
        # DDP rebuilds its buckets once, broadcasting from rank 0 (not a per-step cost)
        per_call.append(([c for c in w.collectives if c[0] != "broadcast_"], w.syncs))
    return per_call, opt.measurements(), sum(p.numel() * 8 for p in model.parameters())


def _count_both(rank, world, m, calls):
    return [_count_worker(rank, world, wrap, m, calls) for wrap in WRAPS]


WRAPS = ("model", "ddp")


def test_collectives_and_host_reads_per_update_and_measurement():
    """DDP as model=: one gradient all-reduce per update of m = 3 calls; DDP not passed: m.
    A measurement adds one all-reduce of its loss at s = 0 where the positions are set and one
    all-gather of its line row; no host read in TRAINING, <= 2 per measurement."""
    for wrap, result in zip(WRAPS, run_ranks(_count_both, 2, 3, 40)[0]):
        _check_counts(wrap, result)


def _check_counts(wrap, result):
    m, k = 3, 2
    per_call, records, grad_bytes = result
    measuring = set()
    for r in records:
        length = m if r["reason"] and r["reason"].startswith("abandoned") else k * m
        measuring.update(range(r["call"], r["call"] + length))
        syncs = sum(per_call[c][1] for c in range(r["call"], r["call"] + length))
        assert 1 <= syncs <= 2, r
        gathers = [c for call in range(r["call"], r["call"] + length)
                   for c in per_call[call][0] if c[0] != "allreduce_"]
        assert len(gathers) == (0 if length == m else 1), (r, gathers)
        # the loss sum and count at s = 0, where the positions are set (call k·m), 16 bytes
        origin = [c for call in range(r["call"], r["call"] + length)
                  for c in per_call[call][0] if c == ("allreduce_", 16)]
        assert len(origin) == (0 if length == m else 1), (r, origin)
    assert len(records) >= 3 and any(r["valid"] for r in records)
    train_calls = [c for c in range(len(per_call)) if c not in measuring]
    assert len(train_calls) >= 3 * m and all(per_call[c][1] == 0 for c in train_calls)
    reduces = [per_call[c][0] for c in train_calls]
    for i, found in enumerate(reduces):
        assert all(name == "allreduce_" for name, _ in found)
        if wrap == "ddp":          # DDP's own reduce in every backward
            assert len(found) == 1 and found[0][1] == grad_bytes
        else:                      # LABPAL's, once, at the m-th call of each update
            last = (train_calls[i] - min(train_calls)) % m == m - 1
            assert found == ([("allreduce_", grad_bytes)] if last else []), (i, found)


# ---------------------------------------------------------------- checkpoints
CKPT_CASE = dict(mode="SGD", momentum=0.9, wd=1e-3, wrap="model")


def _checkpoint_worker(rank, world, path, save_at, calls):
    batches = global_batches(calls)
    model, called, opt = build(CKPT_CASE, world)
    full = train(model, called, opt, batches, rank, world)
    resumed = []
    for at in save_at:
        model, called, opt = build(CKPT_CASE, world)
        train(model, called, opt, batches[:at], rank, world)
        phase, acc = opt.phase, opt.counters.acc
        if rank == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        dist.barrier()
        saved = torch.load(path, weights_only=False)
        model, called, opt = build(CKPT_CASE, world)
        with torch.no_grad():  # the fresh model must get everything from the checkpoint
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        resumed.append((phase, acc, train(model, called, opt, batches, rank, world, start=at)))
        dist.barrier()  # before rank 0 writes the next checkpoint
    return full, resumed


def test_checkpoint_saved_on_rank_0_resumes_exactly(tmp_path):
    # 35: in an update of m = 2; 17: between updates; 31: in a measurement
    results = run_ranks(_checkpoint_worker, 2, str(tmp_path / "ckpt.pt"), (35, 17, 31), 50,
                        deadline=120)
    (full, resumed), (full1, resumed1) = results
    assert all(torch.equal(a, b) for a, b in zip(full["params"], full1["params"]))
    for (_, _, got), (_, _, other) in zip(resumed, resumed1):  # across ranks: bit for bit
        assert all(torch.equal(a, b) for a, b in zip(got["params"], other["params"]))
        assert got["lr"] == other["lr"] and same_records(got["records"], other["records"])
    assert [(phase, acc) for phase, acc, _ in resumed] == [
        ("training", 1), ("training", 0), ("measuring", 0)]
    for (phase, acc, got), exact in zip(resumed, (False, True, False)):
        if exact:  # saved between updates: bit for bit the uninterrupted run
            assert all(torch.equal(a, b) for a, b in zip(got["params"], full["params"]))
            assert got["lr"] == full["lr"] and same_records(got["records"], full["records"])
        else:  # in a measurement, or in an update whose gradients are rank-local (DDP model=,
            # m > 1): it starts over at load, alike on every rank (checked above)
            assert got["updates"] < full["updates"]


def _dcp_worker(rank, world, path, at, calls):
    """torch.distributed.checkpoint without FSDP2 (DDP model=): dcp.save / dcp.load of
    opt.state_dict(), and of get_optimizer_state_dict into set_optimizer_state_dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    batches = global_batches(calls)
    model, called, opt = build(CKPT_CASE, world)
    full = train(model, called, opt, batches, rank, world)
    model, called, opt = build(CKPT_CASE, world)
    train(model, called, opt, batches[:at], rank, world)
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()},
             checkpoint_id=os.path.join(path, "plain"))
    dcp.save({"optim": get_optimizer_state_dict(called, opt)},
             checkpoint_id=os.path.join(path, "dsd"))
    resumed = []
    for how in ("plain", "dsd"):
        model, called, opt = build(CKPT_CASE, world)
        with torch.no_grad():  # the fresh model must get everything from the checkpoint
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        state = {"model": model.state_dict()}
        if how == "plain":
            state["optim"] = opt.state_dict()
            dcp.load(state, checkpoint_id=os.path.join(path, "plain"))
            opt.load_state_dict(state["optim"])
        else:
            dcp.load(state, checkpoint_id=os.path.join(path, "plain"))
            optim = {"optim": get_optimizer_state_dict(called, opt)}
            dcp.load(optim, checkpoint_id=os.path.join(path, "dsd"))
            set_optimizer_state_dict(called, opt, optim["optim"])
        model.load_state_dict(state["model"])
        resumed.append(train(model, called, opt, batches, rank, world, start=at))
    return full, resumed


def test_distributed_checkpoint_without_fsdp_resumes_exactly(tmp_path):
    """Saved between updates (call 17) with torch.distributed.checkpoint on 2 DDP ranks."""
    results = run_ranks(_dcp_worker, 2, str(tmp_path), 17, 26, deadline=120)
    for full, resumed in results:
        assert len(full["records"]) >= 3
        for got in resumed:
            assert all(torch.equal(a, b) for a, b in zip(got["params"], full["params"]))
            assert got["lr"] == full["lr"] and same_records(got["records"], full["records"])


# ---------------------------------------------------------------- faults and misuse
FAULT_CASE = dict(mode="NSGD", momentum=0.9, wd=1e-3, wrap="model")
FAULT_FROM = 10    # the first line evaluated from this call on fails


def _closure(called, xs, ys, explode):
    calls = [0]

    def closure():
        calls[0] += 1
        if explode is not None and calls[0] == 2:  # its repeat in the line evaluations
            explode()
        return torch.nn.functional.cross_entropy(called(xs), ys)
    return closure


class Boom(Exception):
    pass


def _raise():
    raise Boom("a closure failed on this rank")


def _exit():
    os._exit(3)


def _fault_worker(rank, world, failing_rank, how, calls):
    """`failing_rank`'s closure fails in the first line evaluations from call FAULT_FROM on
    (how: "raise", caught and stepped on; "exit": the process dies)."""
    model, called, opt = build(FAULT_CASE, world)
    batches = global_batches(calls)
    out = {}
    for i, (x, y) in enumerate(batches):
        xs, ys = x[rank::world], y[rank::world]
        explode = None
        if i >= FAULT_FROM and rank == failing_rank and "call" not in out:
            explode = _raise if how == "raise" else _exit
        before = [p.detach().clone() for p in model.parameters()]
        try:
            opt.step(_closure(called, xs, ys, explode))
        except Exception as exc:
            out.update(call=i, error=type(exc).__name__, message=str(exc), phase=opt.phase,
                       at_origin=all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
            if how == "exit":
                break
    out.update(train(model, called, opt, [], rank, world))
    return out


def test_exception_on_one_rank_in_a_measurement():
    """Rank 0's closure raises in the line evaluations and rank 0 steps on: it joins the pending
    collective with its error flag, so rank 1 ends the measurement too (RuntimeError naming
    rank 0, not a timeout); both are at the line's origin and go on in step, bit for bit."""
    results = run_ranks(_fault_worker, 2, 0, "raise", 30, timeout=30.0, deadline=120)
    (r0, r1) = results
    assert r0["call"] == r1["call"] >= FAULT_FROM
    assert r0["error"] == "Boom"
    assert r1["error"] == "RuntimeError" and "raised on rank(s) [0]" in r1["message"]
    assert r0["at_origin"] and r1["at_origin"] and r0["phase"] == r1["phase"] == "training"
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    assert r0["lr"] == r1["lr"] and r0["updates"] == r1["updates"] > FAULT_FROM // 2
    ended = [r["reason"] for r in r0["records"] + r1["records"]
             if r["call"] <= r0["call"] and r["reason"] and r["reason"].startswith("interrupted")]
    assert len(ended) == 2 and all(e.startswith("interrupted") for e in ended), ended
    assert any(r["valid"] and r["call"] > r0["call"] for r in r0["records"])
    assert same_records(r0["records"], r1["records"])


def test_rank_that_dies_in_a_measurement_does_not_hang_the_others():
    """Rank 0's process exits in the line evaluations: rank 1's collective fails (gloo reports
    the lost peer, at the latest at the process group's timeout), which ends its measurement at
    the line's origin, and step() raises it."""
    results = run_ranks(_fault_worker, 2, 0, "exit", 30, timeout=5.0, deadline=60, exits=(0,))
    r1 = results[1]
    assert r1["call"] >= FAULT_FROM and r1["error"] in ("RuntimeError", "DistBackendError")
    assert r1["at_origin"] and r1["phase"] == "training"
    assert r1["records"][-1]["reason"].startswith("interrupted")


def _misuse_worker(rank, world):
    out = {}
    batches = global_batches(12)
    # 1. no DDP: each rank's gradient is its own, the directions differ
    model = net()
    opt = LABPAL(model.parameters(), **hyper(world))
    start = [p.detach().clone() for p in model.parameters()]
    try:
        train(model, model, opt, batches[:2], rank, world)
    except RuntimeError as exc:
        out["differ"] = (str(exc), all(torch.equal(a, b) for a, b in zip(start, model.parameters())))
    # 2. out of step: rank 1 makes one more call (its gradient is zero: θ is unchanged), so its
    # next measurement starts at another call than rank 0's
    model = net()
    opt = LABPAL(model.parameters(), **hyper(world, reuse_updates=2))
    try:
        for i, (x, y) in enumerate(batches):  # the whole batch on both ranks: equal directions
            opt.step(lambda x=x, y=y: torch.nn.functional.cross_entropy(model(x), y))
            if i == 3 and rank == 1:
                opt.step(lambda x=x: 0.0 * model(x).sum())
    except RuntimeError as exc:
        out["out_of_step"] = (i, str(exc))
    # 3. rank 1's closures do not repeat their loss (a drift on each call): every rank raises
    model = net()
    ddp = DDP(model)
    opt = LABPAL(ddp.parameters(), model=ddp, **hyper(world))
    drift = [0.0]

    def drifting(x, y):
        drift[0] += 0.1 if rank == 1 else 0.0
        return torch.nn.functional.cross_entropy(ddp(x), y) + drift[0]
    start = [p.detach().clone() for p in model.parameters()]
    try:
        for x, y in batches[:2]:
            xs, ys = x[rank::world], y[rank::world]
            opt.step(lambda xs=xs, ys=ys: drifting(xs, ys))
    except RuntimeError as exc:
        out["not_repeated"] = (str(exc), all(torch.equal(a, b)
                                             for a, b in zip(start, model.parameters())))
    # 4. process_group: checked; a group of this rank alone opts out
    model = net()
    for bad in (object(), "gloo"):
        try:
            LABPAL(model.parameters(), process_group=bad)
        except TypeError as exc:
            out.setdefault("type", []).append(str(exc))
    alone = [dist.new_group([r]) for r in range(world)][rank]
    opt = LABPAL(model.parameters(), process_group=alone, **hyper(world))
    out["alone"] = train(model, model, opt, batches, rank, world)
    ddp = DDP(net())
    try:
        LABPAL(ddp.parameters(), model=ddp, process_group=alone)
    except ValueError as exc:
        out["ddp_group"] = str(exc)
    # 5. step_check=True is refused across ranks; the parameters stay where and what they were
    model = net()
    before = [(p.data_ptr(), p.detach().clone()) for p in model.parameters()]
    try:
        LABPAL(model.parameters(), **hyper(world, step_check=True))
    except ValueError as exc:
        out["step_check"] = (str(exc), all(p.data_ptr() == ptr and torch.equal(p, value)
                                           for p, (ptr, value) in zip(model.parameters(), before)))
    return out


def test_misuse_fails_loudly_on_every_rank():
    r0, r1 = run_ranks(_misuse_worker, 2, deadline=90)
    for r in (r0, r1):
        message, at_origin = r["differ"]
        assert "directions differ" in message and "DistributedDataParallel" in message
        assert at_origin
        call, message = r["out_of_step"]
        assert "different measurements" in message and "where each started: {0: (" in message
        assert len(r["type"]) == 2 and all("process_group must be" in m for m in r["type"])
        assert "process_group is not the process group" in r["ddp_group"]
        message, untouched = r["step_check"]
        assert "step_check=True is not supported under torch.distributed" in message
        assert untouched
    for r in (r0, r1):
        message, at_origin = r["not_repeated"]
        assert "did not repeat its loss on rank(s) [1]" in message and at_origin
    assert "On this rank: the closure did not repeat" in r1["not_repeated"][0]
    assert "On this rank" not in r0["not_repeated"][0]
    assert r0["out_of_step"][1] == r1["out_of_step"][1]  # the same message on every rank
    # alone: no collective, each rank fits its own samples (the ranks' parameters part)
    # and is one process: ν is measured (m = 1 until the first measurement, k·m = 2 samples;
    # the paper's ν would count its batch alone: (128/4)·(N/40000) = 2, k·m = 4)
    first = r0["alone"]["records"][0]
    assert first["m"] == 1 and first["counts"][0] == 2
    assert not torch.equal(r0["alone"]["params"][0], r1["alone"]["params"][0])


# ---------------------------------------------------------------- the command
def test_command_trains_on_two_ranks(tmp_path):
    """`labpal-fast train --nproc 2`: two spawned gloo ranks, each on half of every batch; rank 0
    writes the outputs, and LABPAL's line samples are those of both ranks."""
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    k = 3
    proc = subprocess.run(
        [sys.executable, "-m", "labpal_fast", "train", "--task", "digits", "--steps", "10",
         "--eval-every", "5", "--batch-size", "64", "--nproc", "2", "--approximation-batches",
         str(k), "--device", "cpu", "--quiet", "--no-plots", "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 ranks (cpu)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["nproc"] == 2
    assert summary["runs"][0]["settings"]["batch_size"] == 32   # LABPAL's: per rank
    lines = json.loads((out / "lines.json").read_text())["labpal"]
    first = lines[0]
    assert first["counts"] == [2 * k * first["m"]] * 3, first  # k·m calls on each of 2 ranks
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len([r for r in rows if ",train," in r]) == 10
