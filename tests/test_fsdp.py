"""FSDP2 (fully_shard) with LABPAL: real gloo process groups of spawned CPU ranks.

Oracle: the same model and data in one process, a plain LABPAL on the whole global batch. Each
rank holds its share of every global batch (equal shares: the mean of the ranks' mean losses is
the global mean loss, and FSDP2 averages the gradients), so the line samples, ‖d‖², ⟨ḡ, d⟩ and
the weight-decay terms, and so every step, are those of the one process up to the order of
float additions. The models are float64, without BatchNorm or dropout.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from dist_cases import run_ranks
from labpal_fast.layout import NPART

D_IN, D_HID, D_OUT = 6, 9, 3   # odd sizes: uneven shards, padding, an empty shard on 4 ranks
BATCH = 8                      # global batch per closure call (each rank: BATCH / world rows)
CALLS = 24                     # measurements start at calls 0, 8 and 18
HYPER = dict(batch_size_schedule=((0, 2),), noise_factor=1.0, approximation_batches=2,
             reuse_updates=3, warmup_updates=3, averaging_window=2,
             sample_positions=(0.0, 0.1, 0.3), max_step_size=5.0, update_step_adaptation=1.0)
# relative deviation from the one-process run allowed after CALLS calls: float64, and float32
# for Triton (its kernels have no float64); measured: 3e-12 and 1.6e-4
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3}


class Net(torch.nn.Module):
    """Two linear blocks and a root parameter `bias`: added to the output (`in_forward`), or
    only in a penalty of its own, so that its gradient is the same on every rank even when no
    fully_shard manages it."""

    def __init__(self, seed: int, in_forward: bool, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.hidden = torch.nn.Linear(D_IN, D_HID, dtype=dtype)
        self.out = torch.nn.Linear(D_HID, D_OUT, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
        self.bias = torch.nn.Parameter(torch.randn(D_OUT, generator=g, dtype=dtype))
        self.in_forward = in_forward

    def forward(self, x):
        y = self.out(torch.tanh(self.hidden(x)))
        return y + self.bias if self.in_forward else y

    def loss(self, x, y):
        loss = torch.nn.functional.mse_loss(self(x), y)
        if not self.in_forward:
            loss = loss + 0.5 * ((self.bias - 1.0) ** 2).sum()
        return loss


def batch(call: int, rank: int = 0, world: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + call)
    x = torch.randn(BATCH, D_IN, generator=g, dtype=dtype)
    y = torch.randn(BATCH, D_OUT, generator=g, dtype=dtype)
    share = BATCH // world
    return x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]


def sharded(seed: int, wrap: str, hsdp: bool = False, dtype=torch.float64):
    """wrap "nested": fully_shard on each block and the root (bias: the root's own FSDP2
    parameter); "blocks": on the blocks only (bias: a plain tensor outside any fully_shard);
    "replicate": FSDP2's replicate (every parameter whole on every rank, counted once).
    hsdp: a 2-D mesh (replicate, shard) of 2 × world/2 ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (2, world // 2) if hsdp else (world,),
                            mesh_dim_names=("replicate", "shard") if hsdp else ("shard",))
    model = Net(seed, in_forward=wrap != "blocks", dtype=dtype)
    if wrap == "replicate":  # FSDP2's data parallelism without sharding: Replicate() DTensors
        from torch.distributed._composable.replicate_with_fsdp import replicate
        for module in (model.hidden, model.out, model):
            replicate(module, mesh=mesh)
        return model
    fully_shard(model.hidden, mesh=mesh)
    fully_shard(model.out, mesh=mesh)
    if wrap == "nested":
        fully_shard(model, mesh=mesh)
    return model


def full(model) -> dict:
    """Every parameter as a whole tensor (a collective for the sharded ones)."""
    from torch.distributed.tensor import DTensor
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}


class Watch(TorchDispatchMode):
    """LABPAL's reduction of the partial sums (an all-gather of one fp64 row of 5 numbers per
    rank: 40 bytes, a size no FSDP2 all-gather of this model has) and host reads."""

    def __init__(self):
        super().__init__()
        self.partial_gathers, self.syncs = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and func.__name__.startswith("_allgather_base"):
            sent = args[1]
            if sent.numel() * sent.element_size() == NPART * 8:
                self.partial_gathers += 1
        elif func.overloadpacket.__name__ in ("_local_scalar_dense", "item"):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def train(model, opt, calls, rank=0, world=1, watch=None):
    """Steps on the batches of `calls`; with `watch`, (partial-sum gathers, host reads,
    counters.acc) of each step are appended to it."""
    dtype = next(model.parameters()).dtype
    for call in calls:
        x, y = batch(call, rank, world, dtype)
        model.zero_grad()  # p.grad = None: FSDP2 then makes a new gradient, LABPAL takes it in
        w = Watch() if watch is not None else contextlib.nullcontext()
        with w:
            opt.step(lambda x=x, y=y: model.loss(x, y))
        if watch is not None:
            watch.append((w.partial_gathers, w.syncs, opt.counters.acc))


def summary(opt) -> list:
    return [(r["valid"], r["reason"], r["s_upd"], r["eta"], r["direction_norm"],
             r["mean_losses"]) for r in opt.measurements()]


def _equivalence(rank, world, cases, hsdp=False, dtype=torch.float64):
    from labpal_fast import LABPAL
    out, counts = [], []
    for mode, wrap in cases:
        model = sharded(0, wrap, hsdp, dtype)
        opt = LABPAL(model.parameters(), model=model, mode=mode, momentum=0.9,
                     weight_decay=0.01, **HYPER)
        per_call = []
        train(model, opt, range(CALLS), rank, world, per_call)
        out.append((full(model), summary(opt), float(opt.param_groups[0]["lr"])))
        counts.append((per_call, [r["call"] for r in opt.measurements()]))
    return out, counts


def oracle(mode, wrap, dtype=torch.float64, **extra):
    from labpal_fast import LABPAL
    model = Net(0, in_forward=wrap != "blocks", dtype=dtype)
    # without the step check, which is off under torch.distributed (docs/algorithm.md)
    opt = LABPAL(model.parameters(), model=model, mode=mode, momentum=0.9, weight_decay=0.01,
                 **dict(HYPER, step_check=False, **extra))
    train(model, opt, range(CALLS))
    return ({n: p.detach().clone() for n, p in model.named_parameters()}, summary(opt),
            float(opt.param_groups[0]["lr"]))


def _assert_matches(got, want, what, tol=TOLERANCE[torch.float64]):
    params, records, lr = got
    oparams, orecords, olr = want
    assert len(orecords) >= 3 and all(r[0] for r in orecords), orecords  # valid fits
    assert len(records) == len(orecords), (what, records, orecords)
    for (v, reason, s, eta, norm, losses), (ov, oreason, os_, oeta, onorm, olosses) in \
            zip(records, orecords):
        assert (v, reason) == (ov, oreason), what
        for a, b in [(s, os_), (eta, oeta), (norm, onorm)] + list(zip(losses, olosses)):
            assert abs(a - b) <= tol * abs(b), (what, a, b)
    assert abs(lr - olr) <= tol * abs(olr), (what, lr, olr)
    for name, want_p in oparams.items():
        err = (params[name] - want_p).norm() / want_p.norm()
        assert err <= tol, (what, name, float(err))


CASES = [("SGD", "nested"), ("NSGD", "blocks")]


def test_two_ranks_match_one_process(backend):
    """Both modes, momentum and weight decay, ≥ 3 measurements: every rank holds the same
    parameters and measurements as the others, and those of one process on the whole batch;
    one all-gather of the partial sums per update, no host read in TRAINING (check_counts)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    ranks, counts = zip(*run_ranks(_equivalence, 2, CASES, False, dtype, backend=backend))
    for i, case in enumerate(CASES):
        want = oracle(*case, dtype)
        for r, got in enumerate(ranks):
            _assert_matches(got[i], want, (case, r), TOLERANCE[dtype])
        for name in ranks[0][i][0]:  # the ranks agree bit for bit
            assert torch.equal(ranks[0][i][0][name], ranks[1][i][0][name]), (case, name)
        assert ranks[0][i][1:] == ranks[1][i][1:], case
        check_counts(*counts[0][i], ranks[0][i][1])


def _four_ranks(rank, world, case):
    return (_equivalence(rank, world, [case])[0] + _equivalence(rank, world, [case], hsdp=True)[0]
            + _equivalence(rank, world, [(case[0], "replicate")])[0])


def test_four_ranks_match_one_process():
    """Correctness on 4 ranks, 2 rows of each batch each: FSDP (4 shards; out.weight's last
    shard is empty), HSDP (2 replicas of 2 shards: the partial sums are reduced over the
    shard dimension only) and FSDP2's replicate (nothing sharded: nothing reduced)."""
    case = CASES[0]
    want = oracle(*case)
    for r, (fsdp, hsdp, replicated) in enumerate(run_ranks(_four_ranks, 4, case)):
        _assert_matches(fsdp, want, (case, "FSDP", r))
        _assert_matches(hsdp, want, (case, "HSDP", r))
        _assert_matches(replicated, want, (case, "replicate", r))


SAVE_AT = 13   # a call in TRAINING with one micro-batch of an update summed (acc = 1)


def _checkpoint(rank, world, path):
    import torch.distributed.checkpoint as dcp
    from labpal_fast import LABPAL
    out = []
    for wrap in ("nested", "blocks"):
        def build(seed):
            model = sharded(seed, wrap)
            return model, LABPAL(model.parameters(), model=model, mode="SGD", momentum=0.9,
                                 weight_decay=0.01, **HYPER)

        model, opt = build(0)
        train(model, opt, range(SAVE_AT), rank, world)
        assert opt.phase == "training" and opt.counters.acc == 1
        at = os.path.join(path, wrap)
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=at)
        train(model, opt, range(SAVE_AT, CALLS), rank, world)
        straight = (full(model), summary(opt), opt.counters, float(opt.param_groups[0]["lr"]))

        model, opt = build(1)  # other initial values, overwritten by the checkpoint
        state = {"model": model.state_dict(), "optim": opt.state_dict()}
        dcp.load(state, checkpoint_id=at)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        train(model, opt, range(SAVE_AT, CALLS), rank, world)
        out.append((straight, (full(model), summary(opt), opt.counters,
                               float(opt.param_groups[0]["lr"]))))
    return out


def _resume(rank, world, path):
    """A 2-rank checkpoint resumed on `world` ranks (torch.distributed.checkpoint reshards)."""
    import torch.distributed.checkpoint as dcp
    from labpal_fast import LABPAL
    model = sharded(1, "nested")
    opt = LABPAL(model.parameters(), model=model, mode="SGD", momentum=0.9, weight_decay=0.01,
                 **HYPER)
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=os.path.join(path, "nested"))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    train(model, opt, range(SAVE_AT, CALLS), rank, world)
    return full(model), summary(opt), float(opt.param_groups[0]["lr"])


def test_distributed_checkpoint_resumes_exactly(tmp_path):
    """Saved with torch.distributed.checkpoint mid-update (a gradient sum pending) and loaded
    into a LABPAL over a freshly initialized model, training goes on bit for bit (the root's
    parameter sharded, or a plain tensor outside fully_shard); resumed on 4 ranks, as the
    2 would have gone on (to the float64 tolerance: other shards, other sums)."""
    ranks = run_ranks(_checkpoint, 2, str(tmp_path))
    for rank in ranks:
        for straight, resumed in rank:
            assert len(straight[1]) >= 3
            assert straight[1:] == resumed[1:]
            for name, p in straight[0].items():
                assert torch.equal(p, resumed[0][name]), name
    # lr: the rate of the last update (SGD's robust rate follows n̄, saved and resharded alike)
    params, records, _, lr = ranks[0][0][0]
    for r, got in enumerate(run_ranks(_resume, 4, str(tmp_path))):
        _assert_matches(got, (params, records, lr), ("4 ranks", r))


def _refusals(rank, world):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from labpal_fast import LABPAL, shards
    messages = []
    for orig in (True, False):
        model = FullyShardedDataParallel(Net(0, True), use_orig_params=orig,
                                         device_id=torch.device("cpu"))
        before = [p.detach().clone() for p in model.parameters()]
        for kwargs in ({}, {"model": model}):
            with pytest.raises(TypeError) as err:
                LABPAL(model.parameters(), **kwargs)
            messages.append(str(err.value))
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model = sharded(0, "nested")
    with pytest.raises(ValueError) as err:  # DTensor parameters without model=
        LABPAL(model.parameters())
    messages.append(str(err.value))
    # a construction that fails after the flats were built leaves FSDP2's storage as it was
    fps = shards.fsdp_params(model)
    before = [(p._local_tensor, fps[id(p)]._sharded_param_data, p.grad)
              for p in model.parameters()]
    with pytest.raises(TypeError, match="process_group"):
        LABPAL(model.parameters(), model=model, process_group="all")
    after = [(p._local_tensor, fps[id(p)]._sharded_param_data, p.grad)
             for p in model.parameters()]
    assert all(a is b for x, y in zip(before, after) for a, b in zip(x, y))
    # DTensor parameters of other layouts: sharded without fully_shard (tensor parallel style),
    # and offloaded to the CPU by FSDP2
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    model = Net(0, True)
    model.hidden.weight = torch.nn.Parameter(distribute_tensor(model.hidden.weight.detach(),
                                                               mesh, [Shard(0)]))
    with pytest.raises(TypeError) as err:
        LABPAL(model.parameters(), model=model)
    messages.append(str(err.value))
    model = Net(0, True)
    fully_shard(model, offload_policy=CPUOffloadPolicy(pin_memory=False))
    with pytest.raises(TypeError) as err:
        LABPAL(model.parameters(), model=model)
    messages.append(str(err.value))
    return messages


def test_fsdp1_and_unsupported_layouts_are_refused():
    for messages in run_ranks(_refusals, 2):
        for text in messages[:4]:
            assert "FSDP1" in text and "fully_shard" in text, text
        assert "model=" in messages[4], messages[4]
        assert "no fully_shard module" in messages[5], messages[5]
        assert "CPUOffloadPolicy" in messages[6], messages[6]


def check_counts(per_call, starts, records):
    """The partial sums cost one all-gather of 40 bytes per update (the m-th call, TRAINING or
    the measurement's direction) and no host read; a measurement reads the host twice."""
    m, k = 2, HYPER["approximation_batches"]
    assert len(starts) >= 3 and all(r[0] for r in records)
    measuring = {c for s in starts for c in range(s, s + k * m)}
    for s in starts:
        calls = range(s, s + k * m)
        assert sum(per_call[c][1] for c in calls) == 2, [per_call[c] for c in calls]
        assert [per_call[c][0] for c in calls] == [0, 1] + [0] * (k * m - 2)
    training = [c for c in range(CALLS) if c not in measuring]
    assert len(training) >= 2 * m
    for c in training:
        gathers, syncs, acc = per_call[c]
        assert syncs == 0 and gathers == (1 if acc == 0 else 0), (c, per_call[c])


# clips every direction of this run (its ‖ḡ‖ stays above 0.05): checked against the unclipped run
CLIP = dict(max_grad_norm=0.05)


def _loss_scaled(rank, world):
    from labpal_fast import LABPAL
    out = []
    for extra in ({}, CLIP):
        model = sharded(0, "nested")
        opt = LABPAL(model.parameters(), model=model, mode="NSGD", momentum=0.9,
                     weight_decay=0.01, loss_scale=1024.0, **HYPER, **extra)
        train(model, opt, range(CALLS), rank, world)
        out.append((full(model), summary(opt), float(opt.param_groups[0]["lr"])))
    return out


def test_loss_scaling_and_clipping_under_fsdp2_are_the_one_process_runs():
    """loss_scale=2**10 on 2 FSDP2 ranks: the sharded direction divides ḡ by S (and the slope
    is unscaled), so the run is the unscaled one-process run; with max_grad_norm as well, ḡ is
    clipped by its norm over the whole model (the shards' ‖ḡ‖² all-gathered), as in one
    process, and clipping does change the run."""
    plain, clipped = oracle("NSGD", "nested"), oracle("NSGD", "nested", **CLIP)
    assert plain[2] != clipped[2]
    for got in run_ranks(_loss_scaled, 2):
        _assert_matches(got[0], plain, "loss_scale")
        _assert_matches(got[1], clipped, "loss_scale, max_grad_norm")
