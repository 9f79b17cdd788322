"""Data-parallel runs of the command: `--nproc N` spawns N local ranks; under `torchrun` (or any
launcher that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT) the ranks are already there.

Every rank trains on its share (rows rank, rank+N, ...) of every global batch of --batch-size,
through DistributedDataParallel (gloo on the CPU, nccl on CUDA); LABPAL measures its lines over
all ranks (labpal_fast/distributed.py). Rank 0 evaluates and writes the outputs.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch."""
        return idx[self.rank::self.world] if self.world > 1 else idx

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks (the global batch's loss from each rank's share)."""
        if self.world > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world
        return values

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        device = next(model.parameters()).device
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def launched() -> bool:
    """Started by torchrun (or another launcher that set the env:// variables)."""
    return all(name in os.environ for name in _ENV)


def start(device: torch.device, timeout_s: float = 600.0) -> Ranks:
    """Joins the process group the environment describes (nothing without one). On CUDA each
    rank takes the device LOCAL_RANK."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return Ranks()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return Ranks(rank, world, local)


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    return torch.device("cuda", ranks.local_rank) if device.type == "cuda" else device


def stop(ranks: Ranks, finished: bool = True) -> None:
    """Leaves the process group. After a run that finished on every rank, the ranks meet first:
    a gloo rank that tears down while another still talks to it can abort the process at exit
    ("terminate called without an active exception"). After a failure, no meeting: the other
    ranks may never come."""
    if ranks.world > 1 and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(entry: Callable[[List[str]], int], argv: List[str], rank: int, world: int,
               port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    raise SystemExit(entry(argv))


def launch(entry: Callable[[List[str]], int], argv: Sequence[str], nproc: int) -> int:
    """Runs the command `entry` (a module-level function: the spawned processes import it) with
    argv (without --nproc) on `nproc` local ranks, each in a spawned process. Returns rank 0's
    exit code, or the first non-zero one of the others."""
    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(entry, list(argv), r, nproc, port))
             for r in range(nproc)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:  # the ranks got the Ctrl-C too: let them write what they did
        for p in procs:
            p.join()
    codes = [p.exitcode for p in procs]
    return codes[0] if codes[0] else next((c for c in codes if c), 0)


def strip_nproc(argv: Sequence[str]) -> List[str]:
    out: List[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cpu_threads(world: int) -> Optional[int]:
    """Threads per rank that share the CPU cores instead of oversubscribing them."""
    return max(1, (os.cpu_count() or 1) // world) if world > 1 else None
