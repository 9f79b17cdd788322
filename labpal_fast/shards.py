"""FSDP2 support (`torch.distributed.fsdp.fully_shard`): the flat buffers become FSDP2's storage.

One call at construction, `Placement(params, model)`, finds FSDP2's sharded parameters (and
refuses FSDP1); it gives `flat.build_flats` a `ShardSlot` for each (how a local shard sits in a
flat) and wraps the backend in `ShardedOps`.

Under FSDP2 a parameter is a DTensor whose local shard lives in a padded 1-D tensor of its
`FSDPParam` (`_sharded_param_data`). FSDP2 all-gathers from that tensor before a forward, and
its reduce-scatter adds each gradient shard into ``p.grad``'s local tensor when ``p.grad``
exists. So a `Flat` keeps every local shard, its padding included, and points FSDP2's padded
storage, the DTensor's local tensor and the gradient's local tensor into its buffers (FSDP2's
own `reset_sharded_param` re-points the same two attributes). The backends' ops then run on
the flat buffers as without FSDP2: no copy in or out, one launch per op per flat
(docs/algorithm.md, "FSDP2", has the measured alternative: copies of the shards).

The partial sums of the direction (‖d‖², ⟨ḡ, d⟩, the weight-decay terms), and the norms of
clipping and resolve_positions, of the sharded flats are per shard: `ShardSum`, the reduction
the backends' one direction protocol calls under FSDP2, all-gathers them over FSDP2's shard
group (HSDP: the shard dimension; one collective of a few fp64 numbers, on the device) and sums
the rows in rank order, so every rank holds the same bits. Parameters that are not sharded
(plain tensors outside every ``fully_shard``, FSDP2's ``replicate``) sit in flats of their own
and are added once, locally.

FSDP1 (`FullyShardedDataParallel`) flattens parameters into storage of its own that it
re-points on every forward; LABPAL refuses it at construction (`refuse_fsdp1`).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .layout import NPART
from .ops.base import Backend, LocalSum, call
from .slots import Slot

_FSDP1 = (
    "LABPAL does not support FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel): it "
    "flattens the parameters into storage of its own and re-points them before every forward, "
    "so the moves of a line measurement would never reach the model (and with "
    "use_orig_params=False the optimizer sees one FlatParameter instead of the parameters). "
    "Use FSDP2 instead: torch.distributed.fsdp.fully_shard(module) on each block and on the "
    "root, then LABPAL(model.parameters(), model=model)")


def _loaded(module: str) -> bool:
    """Whether a torch.distributed package is imported: none of its types can exist before,
    so a plain training run imports nothing of it here."""
    return module in sys.modules


def is_dtensor(t: torch.Tensor) -> bool:
    if not _loaded("torch.distributed.tensor"):
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard; any other tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


def refuse_fsdp1(params: Sequence[torch.Tensor], model: Optional[torch.nn.Module]) -> None:
    """Raise TypeError (naming FSDP2 as the fix) for parameters or a model= of FSDP1."""
    if not _loaded("torch.distributed.fsdp"):
        return
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._flat_param import FlatParameter
    # FSDP1 marks the FlatParameter and, with use_orig_params=True, every original parameter
    if any(isinstance(p, FlatParameter) or getattr(p, "_fsdp_flattened", False) for p in params):
        raise TypeError(_FSDP1)
    if model is not None and any(isinstance(m, FullyShardedDataParallel)
                                 for m in model.modules()):
        raise TypeError(_FSDP1)


def fsdp_params(model: Optional[torch.nn.Module]) -> Dict[int, Any]:
    """id(sharded parameter) -> its FSDPParam, over every fully_shard module in `model`."""
    if model is None or not _loaded("torch.distributed.fsdp"):
        return {}
    from torch.distributed.fsdp import FSDPModule
    found: Dict[int, Any] = {}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            for fp in (group.fsdp_params if group is not None else ()):
                found[id(fp.sharded_param)] = fp
    return found


def check_placed(params: Sequence[torch.Tensor], placed: Dict[int, Any], has_model: bool) -> None:
    """Every DTensor parameter is FSDP2's sharded parameter, in a layout LABPAL handles."""
    for i, p in enumerate(params):
        if not is_dtensor(p):
            continue
        fp = placed.get(id(p))
        if fp is None:
            if not has_model:
                raise ValueError(
                    f"params: parameter {i} is a DTensor; LABPAL handles FSDP2 (fully_shard) "
                    "parameters and finds their sharded storage through the model: pass "
                    "model=<the fully_shard-ed root module>")
            raise TypeError(
                f"params: parameter {i} is a DTensor with placements {tuple(p.placements)} that "
                "no fully_shard module in model= manages; LABPAL supports DTensor parameters "
                "only as FSDP2's sharded parameters (tensor parallelism is not supported)")
        if fp.is_dtensor or fp.mesh_info.is_spmd_mesh:
            raise TypeError(f"params: parameter {i} is FSDP2-sharded over a tensor-parallel "
                            "DTensor (FSDP2 + TP); LABPAL supports FSDP2 and HSDP meshes only")
        if fp.offload_to_cpu:
            raise TypeError(f"params: parameter {i} is offloaded to the CPU by FSDP2 "
                            "(CPUOffloadPolicy), which LABPAL does not support: fully_shard "
                            "without offload_policy")


def shard_group(fp) -> Optional[Any]:
    """The process group the parameter is sharded over (None: not sharded, one shard)."""
    info = fp.mesh_info
    if getattr(info, "shard_mesh_dim", None) is None or info.shard_mesh_size == 1:
        return None
    return info.shard_process_group


# ------------------------------------------------------------------ one parameter in a Flat
class ShardSlot(Slot):
    """An FSDP2 parameter: the flat holds its padded local shard; FSDP2's storage, the
    DTensor's local tensor and the gradient's local tensor are views into the flat."""

    def __init__(self, p: torch.Tensor, fp):
        self.fp = fp
        local = p._local_tensor
        self.shape = local.shape
        self.numel = local.numel()
        self.size = fp.padded_sharded_param_size.numel()
        self.sharded = shard_group(fp) is not None

    def values(self, p: torch.Tensor) -> torch.Tensor:
        return p._local_tensor.detach()

    def grad_values(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        g = p.grad
        return g._local_tensor if g is not None and is_dtensor(g) else g

    def bind(self, p, padded, view, grad) -> None:
        self.padded, self.view = padded, view
        self.grad = self.fp.to_sharded_dtensor(grad)
        self.grad_view = grad
        self.rebind(p)
        p.grad = self.grad

    def bound(self, p: torch.Tensor) -> bool:
        fp = self.fp
        return fp.sharded_param is p and p._local_tensor is self.view and \
            fp._sharded_param_data is self.padded

    def rebind(self, p: torch.Tensor) -> None:
        if self.fp.sharded_param is not p:
            raise RuntimeError("FSDP2 replaced a parameter object after LABPAL was created "
                               "(load_state_dict(assign=True)?); create the optimizer after it")
        p._local_tensor = self.view
        self.fp._sharded_param_data = self.padded

    def grad_bound(self, p: torch.Tensor) -> bool:
        return p.grad is self.grad and self.grad._local_tensor is self.grad_view

    def rebind_grad(self, p: torch.Tensor) -> None:
        self.grad._local_tensor = self.grad_view
        p.grad = self.grad

    def wrap(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # a DTensor like the parameter: torch.distributed.checkpoint saves each rank's shard
        return self.fp.to_sharded_dtensor(t)


def reduce_group(placed: Dict[int, Any], params: Sequence[torch.Tensor]):
    """The one shard group of the trained FSDP2 parameters (None: nothing is sharded)."""
    groups = {}
    for p in params:
        fp = placed.get(id(p))
        g = None if fp is None else shard_group(fp)
        if g is not None:
            groups[tuple(torch.distributed.get_process_group_ranks(g))] = g
    if len(groups) > 1:
        raise ValueError(f"params: the FSDP2 parameters are sharded over different process "
                         f"groups {sorted(groups)}; LABPAL needs one shard group (one mesh)")
    return next(iter(groups.values()), None)


# ------------------------------------------------------------------ the backend, sharded
class ShardSum(LocalSum):
    """FSDP2's reduction strategy (`ops.base.LocalSum`'s contract): the sharded flats'
    results (one shard's part of a sum over the model) are all-gathered over the shard group
    (HSDP: the shard dimension; a few fp64 numbers, on the device) and added in rank order, so
    every rank holds the same bits; the flats of parameters that are not sharded are added
    once, locally."""

    def __init__(self, group, device: torch.device):
        self.group = group
        self.world = 1 if group is None else torch.distributed.get_world_size(group)
        f64 = dict(dtype=torch.float64, device=device)
        self._row = torch.zeros(NPART, **f64)
        self._table = torch.zeros(self.world * NPART, **f64)
        self._sum = torch.zeros(NPART, **f64)

    def total(self, flats, values, line) -> torch.Tensor:
        row = torch.zeros(1, dtype=torch.float64, device=self._row.device)
        for flat, p in zip(flats, values):
            if flat.sharded:
                row += p.to(row.device)
        table = torch.zeros(self.world, dtype=torch.float64, device=row.device)
        if self.group is None:
            table.copy_(row)
        else:
            _all_gather(table, row, self.group)
        total = table.sum()
        for flat, p in zip(flats, values):
            if not flat.sharded:
                total = total + p.to(total.device)
        return total

    def count(self, flats) -> int:
        return sum(flat.param.numel() * (self.world if flat.sharded else 1) for flat in flats)

    def set_partials(self, flats, parts, line, run) -> None:
        run(self._own_row, [p for flat, p in zip(flats, parts) if flat.sharded])
        # the collective is not retried by `run` (a second call would pair with the peers'
        # next one); if it raises, the commit is left unfinished and says so
        if self.group is None:
            run(self._table.copy_, self._row)
        else:
            _all_gather(self._table, self._row, self.group)
        run(self._total, line, [p for flat, p in zip(flats, parts) if not flat.sharded])

    def _own_row(self, parts: List[torch.Tensor]) -> None:
        self._row.zero_()
        for p in parts:
            self._row.add_(p.to(self._row.device))

    def _total(self, line, local: List[torch.Tensor]) -> None:
        total = torch.sum(self._table.view(self.world, NPART), dim=0, out=self._sum)
        for p in local:
            total.add_(p.to(total.device))
        line.set_partials(total)


class ShardedOps:
    """The optimizer's backend under FSDP2: the inner backend's ops, the composite steps of
    every backend with the sums reduced over the shard group (`ShardSum`), and FSDP2's modules
    resharded after every write to the parameters (a module left unsharded, as FSDP2 leaves
    the root after a forward, would compute the next forward from its stale all-gathered
    copy)."""

    def __init__(self, inner, group, modules: List[torch.nn.Module],
                 device: torch.device):
        self.inner = inner
        self.name = inner.name
        self.modules = modules
        self.sums = ShardSum(group, device)

    def __getattr__(self, name: str) -> Any:  # every op not overridden below
        return getattr(self.inner, name)

    def reshard(self) -> None:
        for module in self.modules:
            module.reshard()

    # -- the composite steps of every backend, with the shard group's reduction --------------
    def _sums(self, flats, line) -> ShardSum:
        return self.sums

    direction = Backend.direction
    _direction = Backend._direction
    resolution = Backend.resolution

    def update(self, flats, decays, line, *, m: int, run: Callable = call) -> None:
        Backend.update(self, flats, decays, line, m=m, run=run)
        self.reshard()

    # -- writes to the parameters -----------------------------------------------------------
    def move(self, flats, coef, run: Callable = call) -> None:
        self.inner.move(flats, coef, run=run)
        self.reshard()

    def finish(self, flats, line, averaged: bool, run: Callable = call):
        record = self.inner.finish(flats, line, averaged, run=run)
        self.reshard()
        return record

    def restore_origin(self, flat) -> None:
        self.inner.restore_origin(flat)
        self.reshard()


def fixed_layout(opt, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Under FSDP2, a state dict whose layout does not depend on the step it was saved at:
    torch.distributed.checkpoint loads into a template (the state_dict() of the optimizer to
    resume) and reads only the keys the template has. So every entry holds a grad_sum (zero
    when no micro-batch is pending: ignored on load when counters['acc'] is 0), whatever the
    schedule (the records are one tuple already, `checkpoint.save`)."""
    if not isinstance(opt.ops, ShardedOps):
        return state_dict
    for entry in state_dict["state"].values():
        if "grad_sum" not in entry:
            entry["grad_sum"] = torch.zeros_like(entry["direction"])
    return state_dict


def _all_gather(out: torch.Tensor, row: torch.Tensor, group) -> None:
    gather = getattr(torch.distributed, "all_gather_single", None) or \
        torch.distributed.all_gather_into_tensor
    gather(out, row, group=group)


def sharded_ops(inner, model: Optional[torch.nn.Module], placed: Dict[int, Any],
                params: Sequence[torch.Tensor], device: torch.device):
    """`inner` itself without FSDP2 parameters; else the `ShardedOps` over it."""
    if not any(id(p) in placed for p in params):
        return inner
    group = reduce_group(placed, params)
    from torch.distributed.fsdp import FSDPModule
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if group is None:  # one shard: nothing to reduce, but resharding is still needed
        group = _self_group()
    return ShardedOps(inner, group, modules, device)


def _self_group():
    return torch.distributed.new_group([torch.distributed.get_rank()])


# ------------------------------------------------------------------ the one call at construction
class Placement:
    """How the trained parameters sit, found once when the optimizer is made: FSDP1 refused,
    FSDP2's sharded parameters found (through `model`) and checked. `ops` wraps the backend,
    `slot_of` tells `flat.build_flats` how each parameter sits in a flat; `undo` puts back the
    storage the flats re-pointed, so that a failed construction leaves the model as it was."""

    def __init__(self, params: Sequence[torch.Tensor], model: Optional[torch.nn.Module]):
        refuse_fsdp1(params, model)
        self._params = list(params)
        self._model = model
        self._placed = fsdp_params(model)
        check_placed(self._params, self._placed, model is not None)
        self._saved = []  # what the flats will re-point
        for p in self._params:
            fp = self._placed.get(id(p))
            data = p.data if fp is None else (p._local_tensor, fp._sharded_param_data)
            self._saved.append((p, fp, data, p.grad))

    def ops(self, inner):
        """`inner` itself without FSDP2 parameters; else the `ShardedOps` over it."""
        return sharded_ops(inner, self._model, self._placed, self._params,
                           self._params[0].device)

    def slot_of(self, p: torch.Tensor) -> Slot:
        fp = self._placed.get(id(p))
        return Slot(p) if fp is None else ShardSlot(p, fp)

    def undo(self) -> None:
        for p, fp, data, grad in self._saved:
            if fp is None:
                p.data = data
            else:
                p._local_tensor, fp._sharded_param_data = data
            p.grad = grad
