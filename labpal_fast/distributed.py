"""LABPAL under torch.distributed: the few collectives a measurement needs, nothing else.

Data parallel training averages gradients across ranks, but each rank measures the line on its
own batches: without these collectives every rank would fit its own parabola, take its own step
and drift apart silently. With them every rank fits the same global samples, takes the same
decisions and holds bit for bit the same parameters and rate.

API (used by `optimizer.LABPAL`; kept stable for other parallel wrappers such as FSDP2):

  ``Collectives.of(process_group, model, device, npos)``
      the collectives over ``process_group`` (None: the DDP model's group, else the default
      group when torch.distributed is initialized), or None when there is one rank (a group of
      size 1 opts out). Raises ValueError/TypeError for a foreign or inconsistent group.
  ``c.world``, ``c.rank``, ``c.group``, ``c.ddp`` (the DistributedDataParallel ``model=`` or None)
  ``c.sum_(t)`` / ``c.average_(t)``: in-place all-reduce (SUM; SUM then ÷ world) of a device tensor.
  ``c.reduce_line(line, call, update, missed=None)``: the measurement's one collective (an all-gather of a
      small fp64 row per rank): afterwards ``line.sums`` / ``line.counts`` hold the global
      samples, summed in rank order (bit-identical on every rank), and the verdict of the
      cross-rank checks waits on the device. No host read.
  ``c.join_failed(line, call, update)``: a rank whose measurement failed joins the others'
      pending collective with its error flag up, so they end the measurement too instead of
      waiting for the process group's timeout.
  ``c.restore_rate(line)``: after a failed one, ``line.lr`` as before its fit.
  ``c.code(valid)``: one int64 device scalar to read on the host in place of ``valid``:
      bit 0 the fit is valid, bits ``PEER_FAILED``, ``OUT_OF_STEP``, ``DIRECTIONS_DIFFER``,
      ``NOT_REPEATED`` (``missed``: a device bool, this rank's closure did not repeat its loss).
  ``c.explain(code)``: the error message for a code with error bits (reads the gathered table:
      only on that failure path).

The row each rank contributes (fp64, layout below): its loss sums and sample counts per position,
the measurement's sequence number (the closure call where it started, the update count then), an
error flag, ‖d‖², ⟨ḡ, d⟩ and whether the first closure repeated its loss (equal on every rank when gradients are averaged; if they differ, the
ranks are not training one model and the measurement fails loudly instead of drifting).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .layout import Partial

# verdict bits above bit 0 (the fit is valid)
PEER_FAILED = 2        # a rank's measurement failed (its line evaluations raised)
OUT_OF_STEP = 4        # the ranks are in different measurements (sequence numbers differ)
DIRECTIONS_DIFFER = 8  # ‖d‖² or ⟨ḡ,d⟩ differ: gradients are not averaged across ranks
NOT_REPEATED = 16      # a rank's first closure did not repeat its loss (replay_tolerance)
ERRORS = PEER_FAILED | OUT_OF_STEP | DIRECTIONS_DIFFER | NOT_REPEATED

# the row's trailing fields, after the sums and counts of each position
_CALL, _UPDATE, _FAILED, _DD, _GD, _MISSED = range(6)
_TAIL = 6


# all_gather_single is all_gather_into_tensor's newer name (the old one warns from torch 2.13)
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor",
                                                                   None)


def _ddp_class():
    return torch.nn.parallel.DistributedDataParallel


class Collectives:
    """LABPAL's collectives over one process group of at least two ranks (module doc)."""

    def __init__(self, group, world: int, rank: int, device: torch.device, npos: int,
                 ddp: Optional[torch.nn.Module]):
        self.group, self.world, self.rank, self.ddp = group, world, rank, ddp
        self.npos = npos
        self.width = 2 * npos + _TAIL
        f64 = dict(dtype=torch.float64, device=device)
        self._row = torch.zeros(self.width, **f64)               # this rank's row
        self._table = torch.zeros(world * self.width, **f64)     # every rank's, in rank order
        self._global = torch.zeros(2 * npos, **f64)              # the summed sums and counts
        self._code = torch.zeros((), dtype=torch.int64, device=device)
        self._lr = torch.zeros((), **f64)  # the rate before the fit, put back when it fails

    @classmethod
    def of(cls, process_group, model: Optional[torch.nn.Module], device: torch.device,
           npos: int) -> Optional["Collectives"]:
        ddp = model if isinstance(model, _ddp_class()) else None
        if process_group is not None:
            if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
                raise TypeError("process_group must be a torch.distributed ProcessGroup or None, "
                                f"got {type(process_group).__name__}")
            if ddp is not None and ddp.process_group is not process_group:
                raise ValueError(
                    "process_group is not the process group of the DistributedDataParallel "
                    "model=: LABPAL must measure over the ranks that average the gradients; "
                    "pass the group the model was wrapped with (or leave process_group=None)")
        elif ddp is not None:
            process_group = ddp.process_group
        elif dist.is_available() and dist.is_initialized():
            process_group = dist.group.WORLD
        else:
            return None
        world = dist.get_world_size(process_group)
        if world == 1:
            return None
        return cls(process_group, world, dist.get_rank(process_group), device, npos, ddp)

    # ------------------------------------------------------------------ gradients
    def sum_(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    def average_(self, tensor: torch.Tensor) -> None:
        # SUM then a division: gloo has no AVG; every rank divides the same sum the same way
        self.sum_(tensor)
        tensor.div_(self.world)

    # ------------------------------------------------------------------ the line
    def origin_loss(self, line) -> torch.Tensor:
        """[Σ loss, count] at s = 0 over every rank, when the positions are set (call k·m): one
        all-reduce of 16 bytes (its result is the same bits on every rank)."""
        pair = torch.stack([line.sums[0], line.counts[0]])
        self.sum_(pair)
        return pair

    def _gather(self, line, call: int, update: int, failed: bool,
                missed: Optional[torch.Tensor] = None) -> None:
        p = self.npos
        row = self._row
        row[:p].copy_(line.sums)
        row[p:2 * p].copy_(line.counts)
        tail = row[2 * p:]
        tail[_CALL], tail[_UPDATE], tail[_FAILED] = float(call), float(update), float(failed)
        tail[_DD:_GD + 1].copy_(line.partials[Partial.DD:Partial.GD + 1])
        if missed is None:
            tail[_MISSED] = 0.0
        else:
            tail[_MISSED].copy_(missed)
        _all_gather(self._table, row, group=self.group)

    def reduce_line(self, line, call: int, update: int,
                    missed: Optional[torch.Tensor] = None) -> None:
        """The measurement's collective; afterwards the line holds the global samples (module doc).
        With any error bit the samples are emptied, so the fit is invalid and writes no rate."""
        self._gather(line, call, update, failed=False, missed=missed)
        self._lr.copy_(line.lr)
        p = self.npos
        table = self._table.view(self.world, self.width)
        tails = table[:, 2 * p:]
        first = tails[:1]
        out_of_step = (tails[:, _CALL:_UPDATE + 1] != first[:, _CALL:_UPDATE + 1]).any()
        failed = (tails[:, _FAILED] != 0).any()
        missed = (tails[:, _MISSED] != 0).any()
        dirs, ref = tails[:, _DD:_GD + 1], first[:, _DD:_GD + 1]
        differ = ~((dirs == ref) | (dirs.isnan() & ref.isnan())).all()
        self._code.copy_(PEER_FAILED * failed.long() + OUT_OF_STEP * out_of_step.long()
                         + DIRECTIONS_DIFFER * differ.long() + NOT_REPEATED * missed.long())
        ok = self._code == 0
        # every rank reduces the same table with the same kernel: the same bits everywhere
        torch.sum(table[:, :2 * p], dim=0, out=self._global)
        line.sums.copy_(torch.where(ok, self._global[:p], 0.0))
        line.counts.copy_(torch.where(ok, self._global[p:], 0.0))

    def missed_here(self) -> bool:
        """Whether this rank's closure did not repeat (reads this rank's row: failure path)."""
        return bool(self._row[2 * self.npos + _MISSED].item())

    def restore_rate(self, line) -> None:
        """After a failed measurement's fit (no rate written, but lr shown for the new d):
        the rate shown before it, as on the rank that raised."""
        line.lr.copy_(self._lr)

    def join_failed(self, line, call: int, update: int) -> None:
        self._gather(line, call, update, failed=True)

    def code(self, valid: torch.Tensor) -> torch.Tensor:
        return self._code | valid.long()

    def explain(self, code: int) -> str:
        """Why the measurement failed on every rank (reads the gathered table on the host)."""
        p = self.npos
        rows = self._table.view(self.world, self.width)[:, 2 * p:].tolist()
        parts = []
        if code & PEER_FAILED:
            ranks = [r for r, row in enumerate(rows) if row[_FAILED]]
            parts.append(f"the line evaluations raised on rank(s) {ranks} (see their error); "
                         "every rank ended the measurement with the parameters at the line's "
                         "origin, so training can go on in step")
        if code & OUT_OF_STEP:
            seqs = {r: (int(row[_CALL]), int(row[_UPDATE])) for r, row in enumerate(rows)}
            parts.append(f"the ranks are in different measurements ((closure call, update) "
                         f"where each started: {seqs}): every rank must call step() equally "
                         "often (the same number of batches per rank; a rank that caught an "
                         "exception must not skip or add calls)")
        if code & NOT_REPEATED:
            ranks = [r for r, row in enumerate(rows) if row[_MISSED]]
            parts.append(f"the first closure of the measurement did not repeat its loss on "
                         f"rank(s) {ranks} (replay_tolerance)")
        if code & DIRECTIONS_DIFFER:
            norms = {r: row[_DD] ** 0.5 for r, row in enumerate(rows)}
            parts.append(f"the ranks' directions differ (‖d‖ per rank: {norms}): the gradients "
                         "are not averaged across ranks. Wrap the model in "
                         "DistributedDataParallel (and pass it as model=), or give each "
                         "independent run its own LABPAL with process_group=<a group of its "
                         "own rank>")
        return ("LABPAL measurement failed across ranks: " + "; ".join(parts)
                + ". The parameters are back at the line's origin on this rank.")
