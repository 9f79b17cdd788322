"""Real gloo process groups of CPU ranks, for the distributed tests (DDP here, FSDP2 too).

``results = run_ranks(fn, world, *args, backend="eager", timeout=10.0, deadline=60.0)``
    runs ``fn(rank, world, *args)`` on every rank, each in a process of its own, after
    ``dist.init_process_group("gloo", ...)`` over a TCPStore that this process hosts on
    127.0.0.1 (a free port, chosen by the OS), with the process group's ``timeout`` in seconds
    (short: a rank that waits on a dead peer fails fast). ``backend`` is the LABPAL backend the
    ranks use (``LABPAL_FAST_BACKEND``: the test's ``backend`` fixture does not reach them).
    ``fn`` must be a module-level function of an importable module (this one, or a test module:
    tests/ is on sys.path). Returns each rank's return value (torch.save / torch.load), in rank
    order (None for the ranks in ``exits``, which may end the process themselves). A rank that
    raises fails the call with its traceback; ranks still running after
    ``deadline`` seconds are killed and the call fails: no test hangs.

Processes start from a forkserver that imports torch and labpal_fast once, so a rank starts in
a fraction of a second and inherits no OpenMP state from the test process.
"""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List

import torch
import torch.distributed as dist

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "labpal_fast", "dist_cases"])
    return _CTX


def _rank_main(fn, rank, world, port, timeout, backend, out, args):
    os.environ["LABPAL_FAST_BACKEND"] = backend
    torch.set_num_threads(1)
    path = os.path.join(out, f"rank{rank}")
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                              timeout=timedelta(seconds=timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        torch.save(result, path + ".pt")
    except BaseException:
        with open(path + ".err", "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, backend: str = "eager",
              timeout: float = 10.0, deadline: float = 60.0, exits=()) -> List[Any]:
    ctx = _context()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_rank_main,
                             args=(fn, r, world, store.port, timeout, backend, out, args))
                 for r in range(world)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline
        for p in procs:
            p.join(max(end - time.monotonic(), 0.0))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = []
        for r in range(world):
            err = os.path.join(out, f"rank{r}.err")
            if os.path.exists(err):
                with open(err) as f:
                    errors.append(f"rank {r}:\n{f.read()}")
            elif procs[r].exitcode != 0 and r not in hung and r not in exits:
                errors.append(f"rank {r}: exit code {procs[r].exitcode}")
        if hung:
            errors.insert(0, f"ranks {hung} still running after {deadline} s (killed)")
        if errors:
            raise AssertionError("\n".join(errors))
        return [None if r in exits else
                torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]
