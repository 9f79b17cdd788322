"""SHA-256 hashes of LABPAL trajectories, for restructurings that must keep behaviour bit for bit.

    python tools/trajectory_hashes.py [--only SUBSTRING] [--out FILE] [--parts]

Each configuration trains a tiny model for 60 closure calls (steps) on fixed data, with at least
two measurements, and prints one line `<config> <sha256>`: the hash of the parameters, every
tensor and value of `state_dict()` and the records of `measurements()` after the last step. Run it
before and after a change and compare the outputs (`diff`): any difference in any bit shows.

Configurations: backend (eager, ext on the CPU, Triton under its interpreter) × mode (NSGD, SGD)
× momentum (0, 0.9) × m (1, 3) × precision (fp32; bf16 parameters with fp32 master weights; fp16
parameters with master weights and loss_scale="dynamic"), a clipped run per backend, and DDP and
FSDP2 on 2 gloo ranks (processes on 127.0.0.1) per backend. A configuration the backend cannot
run here prints `<config> skipped: <reason>`, never nothing. `--parts` adds a line per part
(params, state_dict, measurements) to show which one differs.

Only the public API is used (LABPAL(...), step(closure), state_dict(), measurements()), so the
tool runs unchanged on both sides of a restructuring. Deterministic: fixed seeds, one thread.
"""
from __future__ import annotations

import os

# Triton runs on the CPU only through its interpreter, which must be chosen before triton is
# imported (labpal_fast imports it on first use)
os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import hashlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from datetime import timedelta  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

STEPS = 60
BATCH = 8
BACKENDS = ("eager", "ext", "triton")
TIMEOUT = 600  # seconds a rank waits on the other: generous, the machine may be loaded
PRECISIONS = ("fp32", "bf16-master", "fp16-dynamic")
# short lines and steps: the tiny net trains calmly, and every run measures several times
# (with m = 3: measurements at calls 0, 9, 24, 45 of the 60)
HYPER = dict(approximation_batches=2, reuse_updates=4, warmup_updates=2, averaging_window=2,
             noise_factor=1.0, sample_positions=(0.0, 0.02, 0.05, 0.1),
             update_step_adaptation=1.0, max_step_size=0.1)


# ------------------------------------------------------------------------------ hashing
def _feed(h, value: Any) -> None:
    """A canonical byte stream of nested dicts (sorted keys), lists/tuples, tensors (dtype,
    shape, bytes) and Python scalars (repr: exact for floats, nan included)."""
    if isinstance(value, torch.Tensor):
        if hasattr(value, "full_tensor"):  # a DTensor (FSDP2): this rank's own shard
            value = value.to_local()
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__[0]}{len(value)}:".encode())
        for item in value:
            _feed(h, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(f"cannot hash a {type(value).__name__} canonically: {value!r}")


def digest(value: Any) -> str:
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def parts(params: List[torch.Tensor], opt) -> Dict[str, str]:
    records = opt.measurements()
    if len(records) < 2:
        raise AssertionError(f"only {len(records)} measurement(s) in {STEPS} steps: {records}")
    return {"params": digest(params), "state_dict": digest(opt.state_dict()),
            "measurements": digest(records)}


# ------------------------------------------------------------------------------ one process
def _data(seed: int, calls: int = STEPS, size: int = BATCH):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(calls)]


def _net(dtype, dropout: float = 0.1):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 16), torch.nn.Tanh()]
    if dropout:  # random numbers in the closure: replayed by every measurement
        layers.append(torch.nn.Dropout(dropout))
    return torch.nn.Sequential(*layers, torch.nn.Linear(16, 3)).to(dtype)


def _precision(name: str):
    """(parameter dtype, LABPAL keywords)."""
    return {"fp32": (torch.float32, {}),
            "bf16-master": (torch.bfloat16, {"master_weights": True}),
            "fp16-dynamic": (torch.float16, {"master_weights": True, "loss_scale": "dynamic"}),
            }[name]


def single(backend: str, mode: str, momentum: float, m: int, precision: str,
           loss_factor: float = 1.0, **extra) -> Dict[str, str]:
    """`loss_factor`: the closure's loss times it (64 with the dynamic loss scale: the scaled
    fp16 gradients overflow, the scale halves until they do not)."""
    from labpal_fast import LABPAL
    dtype, kw = _precision(precision)
    net = _net(dtype)
    groups = [{"params": list(net[0].parameters()), "weight_decay": 0.01},
              {"params": list(net[-1].parameters())}]
    opt = LABPAL(groups, backend=backend, model=net, mode=mode, momentum=momentum,
                 batch_size_schedule=((0, m),), **HYPER, **kw, **extra)
    for x, y in _data(seed=1):
        opt.step(lambda x=x, y=y: torch.nn.functional.cross_entropy(
            net(x.to(dtype)).float(), y) * loss_factor)
    return parts([p.detach() for p in net.parameters()], opt)


def skip_reason(backend: str, precision: str) -> Optional[str]:
    from labpal_fast import LABPAL
    try:  # a backend that cannot run on the parameters' device refuses them, saying why
        LABPAL([torch.nn.Parameter(torch.ones(2))], backend=backend)
    except RuntimeError as exc:
        return str(exc)
    if backend == "triton" and precision == "bf16-master":
        return "Triton's interpreter has no bf16 (it truncates; tests/backend_cases.py)"
    return None


# ------------------------------------------------------------------------------ 2 gloo ranks
def _rank(rank: int, world: int, port: int, out: str, jobs) -> None:
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                              timeout=timedelta(seconds=TIMEOUT))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=TIMEOUT))
        try:
            results = [(_ddp if kind == "ddp" else _fsdp2)(rank, world, backend)
                       for kind, backend in jobs]
        finally:
            dist.destroy_process_group()
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _train_share(model, opt, rank: int, world: int) -> None:
    """Each rank's closure sees its rows (rank, rank+world, ...) of the same global batch."""
    for x, y in _data(seed=2, size=BATCH * world):
        xs, ys = x[rank::world], y[rank::world]
        opt.step(lambda xs=xs, ys=ys: torch.nn.functional.cross_entropy(model(xs), ys))


def _ddp(rank: int, world: int, backend: str) -> Dict[str, str]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from labpal_fast import LABPAL
    net = _net(torch.float32, dropout=0.0)
    ddp = DDP(net)
    opt = LABPAL(net.parameters(), backend=backend, model=ddp, mode="NSGD", momentum=0.9,
                 weight_decay=0.01, batch_size_schedule=((0, 1), (30, 2)), **HYPER)
    _train_share(ddp, opt, rank, world)
    return parts([p.detach() for p in net.parameters()], opt)


def _fsdp2(rank: int, world: int, backend: str) -> Dict[str, str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from labpal_fast import LABPAL
    net = _net(torch.float32, dropout=0.0)
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(net[0], mesh=mesh)
    fully_shard(net[-1], mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = LABPAL(net.parameters(), backend=backend, model=net, mode="SGD", momentum=0.9,
                 weight_decay=0.01, batch_size_schedule=((0, 2),), **HYPER)
    _train_share(net, opt, rank, world)
    params = [p.full_tensor().detach() for p in net.parameters()]  # the same on every rank
    return parts(params, opt)


def ranks(jobs, world: int = 2) -> List[Dict[str, str]]:
    """Run each (kind, backend) of `jobs` (kind "ddp" or "fsdp2") on `world` gloo ranks, all
    in one pair of spawned processes (each imports torch anew). The parameters and measurements
    must agree across ranks (the state_dict too, except FSDP2's: each rank saves its own
    shards, hashed in rank order)."""
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=TIMEOUT))
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.start_processes(_rank, args=(world, store.port, out, jobs), nprocs=world,
                               start_method="spawn")
        except Exception as exc:
            errors = [open(os.path.join(out, f)).read() for f in sorted(os.listdir(out))
                      if f.endswith(".err")]
            raise RuntimeError(f"{jobs} on {world} ranks failed:\n" + "\n".join(errors)) from exc
        per_rank = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]
    merged = []
    for (kind, backend), results in zip(jobs, zip(*per_rank)):
        shared = ("params", "measurements") if kind == "fsdp2" else \
            ("params", "measurements", "state_dict")
        for key in shared:
            if len({r[key] for r in results}) != 1:
                raise AssertionError(f"{kind} {backend}: the ranks' {key} differ: "
                                     f"{[r[key] for r in results]}")
        state = results[0]["state_dict"] if kind == "ddp" else \
            digest([r["state_dict"] for r in results])
        merged.append({"params": results[0]["params"], "state_dict": state,
                       "measurements": results[0]["measurements"]})
    return merged


# ------------------------------------------------------------------------------ the list
def configs():
    """(name, what to run, (backend, precision)), in a fixed order: what to run is a function
    of no arguments, or a (kind, backend) job for `ranks`."""
    for backend in BACKENDS:
        for mode in ("NSGD", "SGD"):
            for momentum in (0.0, 0.9):
                for m in (1, 3):
                    for precision in PRECISIONS:
                        name = f"{backend}/{mode}/momentum={momentum}/m={m}/{precision}"
                        yield name, (lambda b=backend, mo=mode, mu=momentum, m=m, p=precision:
                                     single(b, mo, mu, m, p)), (backend, precision)
        # the clipped direction (another path than the fused one on Triton)
        yield (f"{backend}/NSGD/momentum=0.9/m=1/fp32/max_grad_norm=0.05",
               lambda b=backend: single(b, "NSGD", 0.9, 1, "fp32", max_grad_norm=0.05),
               (backend, "fp32"))
        yield (f"{backend}/NSGD/momentum=0.9/m=1/fp16-dynamic/overflows",
               lambda b=backend: single(b, "NSGD", 0.9, 1, "fp16-dynamic", loss_factor=64.0),
               (backend, "fp16-dynamic"))
    for kind in ("ddp", "fsdp2"):
        for backend in BACKENDS:
            yield f"{kind}-2ranks/{backend}/fp32", (kind, backend), (backend, "fp32")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="run only configurations whose name "
                        "contains this substring")
    parser.add_argument("--out", help="also write the lines to this file")
    parser.add_argument("--parts", action="store_true", help="also print a hash per part "
                        "(params, state_dict, measurements)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # the interpreter's numpy warns on the NaN / inf of the overflow runs
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    chosen = [c for c in configs() if args.only in c[0]]
    if not chosen:
        parser.error(f"--only {args.only!r} matches no configuration")
    skipped = {name: skip_reason(backend, precision) for name, _, (backend, precision) in chosen}
    jobs = [(name, run) for name, run, _ in chosen if isinstance(run, tuple) and not skipped[name]]
    spawned = dict(zip([name for name, _ in jobs], ranks([run for _, run in jobs]))) \
        if jobs else {}
    lines = []
    for name, run, _ in chosen:
        if skipped[name] is not None:
            out = [f"{name} skipped: {skipped[name]}"]
        else:
            got = spawned[name] if name in spawned else run()
            out = [f"{name} {digest([got[k] for k in ('params', 'state_dict', 'measurements')])}"]
            if args.parts:
                out += [f"{name}:{k} {v}" for k, v in got.items()]
        for line in out:
            print(line, flush=True)
        lines += out
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
