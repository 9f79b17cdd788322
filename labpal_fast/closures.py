"""Calling the user's closure: the loss and the gradient of one call, by either convention.

LABPAL runs ``backward()`` itself, unless the closure does (torch's convention), which the
parameters' post-accumulate-grad hooks tell; the gradient lands in the flats. Under a
DistributedDataParallel ``model=`` with m > 1, backward runs under ``no_sync`` and the last call
of an update averages the summed gradient once. A call that only gives a loss sample runs the
forward pass without autograd (unless the closure runs backward itself).

The same hooks see a gradient accumulated outside a closure call (a backward of the user's
own, e.g. Lightning accumulating batches without LABPALCallback): it is marked, and a step that
finds it still there refuses (`refuse_outside_gradients`) rather than add it to its own.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .commit import Commit
from .flat import Flat


class Closures:
    """Runs closures against the flats (module doc); `LABPAL` holds one."""

    def __init__(self, flats: List[Flat], ops, line, scaling: bool, dist: Optional[Any],
                 trained: Sequence[torch.Tensor]):
        self.flats, self.ops, self.line, self.scaling, self.dist = flats, ops, line, scaling, dist
        self.ranks = 1 if dist is None else dist.world
        # set when gradients reach a parameter: tells whether a closure ran backward itself
        self.backward_seen = _Flag()
        self.hooks = [p.register_post_accumulate_grad_hook(self.backward_seen.hook)
                      for p in trained]
        self.scaled = False   # this call's closure ran backward on LABPAL.scale_loss(loss)
        self.reduced = False  # this call's gradients were averaged by LABPAL (DDP model=)

    def gradient(self, closure: Callable, m: int, last: bool,
                 watch: Any = None) -> Tuple[torch.Tensor, bool]:
        """(loss, whether the closure ran backward itself) of one of an update's m calls (`last`:
        the m-th); the gradient is in the flats' grad buffers. `watch`: a context around it."""
        with self._grad_sync(m, last), self._calling():
            if watch is None:
                return self._forward_backward(closure)
            with watch:
                return self._forward_backward(closure)

    @contextmanager
    def _calling(self) -> Iterator[None]:
        """A closure call and its backward: the gradients reaching the parameters are LABPAL's."""
        self.backward_seen.calling = True
        try:
            yield
        finally:
            self.backward_seen.calling = False

    def refuse_outside_gradients(self) -> None:
        """At a step: a gradient accumulated outside a closure call and not cleared since (by
        zero_grad, `p.grad = None`, or anything else that zeroes or replaces it) is refused."""
        marks, versions = self.backward_seen.outside, self.backward_seen.versions
        for key, (p, grad) in list(marks.items()):
            # the gradients of a flat are views of one buffer and share its version counter:
            # an in-place change since the last outside backward (a zeroing) clears the marks
            if p.grad is None or p.grad is not grad or grad._version != versions[_storage(grad)]:
                del marks[key]
        if not marks:
            versions.clear()
        if marks:
            raise RuntimeError(
                "a gradient was accumulated into the parameters outside LABPAL.step() (a "
                "backward() since the last step that nothing cleared): LABPAL computes each "
                "step's gradient from its closure and would add this one to it. Under Lightning "
                "this is accumulate_grad_batches > 1 without LABPALCallback: add LABPALCallback() "
                "to the Trainer's callbacks and set accumulate_grad_batches=1 (LABPAL averages "
                "micro-batches itself: batch_size_schedule). A backward for analysis: clear it "
                "with opt.zero_grad(), model.zero_grad() or p.grad = None before step()")

    def forget_outside_gradients(self) -> None:
        self.backward_seen.outside.clear()
        self.backward_seen.versions.clear()

    def _forward_backward(self, closure: Callable) -> Tuple[torch.Tensor, bool]:
        """Gradients that reached a parameter while the closure ran mean it ran backward itself
        (torch's convention): backward is not run again."""
        self.backward_seen.value = False
        self.scaled = False
        with torch.enable_grad():
            loss = checked_loss(closure())
            own = self.backward_seen.value
            if own and self.scaling and not self.scaled:
                raise RuntimeError(
                    "loss_scale is set and the closure ran backward() on a loss LABPAL did not "
                    "scale: LABPAL unscales the gradient in its update, so either return the "
                    "loss without calling backward() (LABPAL runs it), or run backward on "
                    "opt.scale_loss(loss) (Accelerate: accelerator.backward(opt.scale_loss(loss)); "
                    "never GradScaler.scale). Lightning's LABPALCallback and LABPALTrainer do "
                    "that themselves")
            if not own:
                if not loss.requires_grad:
                    raise RuntimeError(
                        "the closure's loss does not require grad and the closure did not run "
                        "backward(): LABPAL needs a loss computed from the parameters with "
                        "autograd enabled (it runs backward itself), or a closure that runs "
                        "loss.backward() itself")
                (self.line.scaled(loss) if self.scaling else loss).backward()
        for flat in self.flats:
            flat.attach_grads()
            flat.pull_grads()  # fp32 master weights: the model's gradients into the flat's
        return loss.detach(), own

    def sample(self, closure: Callable, own_backward: bool) -> torch.Tensor:
        """A call that only gives a loss sample: forward only, without autograd, unless the
        closure runs backward itself (torch's convention needs autograd); its gradient is
        dropped then."""
        if not own_backward:
            with torch.no_grad(), self._calling():
                return checked_loss(closure()).detach()
        with torch.enable_grad(), self._calling():
            loss = checked_loss(closure()).detach()
        for flat in self.flats:
            flat.attach_grads()
            flat.clear_model_grads()
            self.ops.zero_grad(flat)
        return loss

    # ------------------------------------------------------------------ DDP model=
    @contextmanager
    def _grad_sync(self, m: int, last: bool) -> Iterator[None]:
        """A backward of an update's m calls. With a DistributedDataParallel model= and m > 1,
        every backward runs under no_sync and the last call averages the summed gradient once
        (one all-reduce per flat, not m); with m = 1 DDP's own reduce (overlapping backward) is
        the one. Without model=, a DDP model reduces in every backward (m all-reduces)."""
        ddp = None if self.dist is None else self.dist.ddp
        if ddp is None or m == 1:
            yield
            return
        with ddp.no_sync():
            yield
        if last:
            self._reduce_grads()

    def _reduce_grads(self) -> None:
        """The last call's backward is done: average Σ(earlier calls) + this call's gradient
        across ranks into each flat's spare buffer, leaving grad_sum and grad untouched, so that
        a failed collective drops the call like a failed backward (`steps._drop_call`)."""
        with torch.no_grad():
            for flat in self.flats:
                flat.attach_grads()
                scratch = flat.need_origin()
                torch.add(flat.need_grad_sum(), flat.grad, out=scratch)
                self.dist.sum_(scratch)
        self.reduced = True

    def take_reduced(self, run: Commit) -> None:
        """In the call's commit: the averaged sum becomes grad_sum (grad zero), which the
        direction divides by m."""
        if not self.reduced:
            return
        self.reduced = False
        for flat in self.flats:
            run(torch.div, flat.origin, self.ranks, out=flat.grad_sum)
            run(self.ops.zero_grad, flat)

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()


class _Flag:
    """A bool the parameters' post-accumulate-grad hooks set (held by them, not the optimizer),
    and the marks of gradients accumulated outside a closure call (`refuse_outside_gradients`)."""
    __slots__ = ("value", "calling", "outside", "versions")

    def __init__(self):
        self.value = False
        self.calling = False  # a closure call (or its backward) is running
        self.outside: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # id -> param, grad
        self.versions: Dict[int, int] = {}  # per gradient storage: its version after then

    def hook(self, param: torch.Tensor) -> None:
        self.value = True
        if not self.calling:
            self.outside[id(param)] = (param, param.grad)
            self.versions[_storage(param.grad)] = param.grad._version


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def checked_loss(loss: Any) -> torch.Tensor:
    """The closure's loss as a 0-dim tensor: any one-element loss is taken, as backward() takes
    it (a (1,)-shaped one would not stack with the others' samples in the line's reads)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the closure must return the loss as a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"the closure must return a scalar loss, got shape {tuple(loss.shape)}")
    return loss.reshape(())
