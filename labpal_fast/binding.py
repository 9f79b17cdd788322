"""Late binding, found exactly: what a closure's code reads, and whether it changed since.

A closure made in a loop (``def closure(): return loss_fn(model(x), y)``) reads the loop's
``x, y`` when it runs, not when it was made: evaluated again by a measurement, it computes the
latest batch's loss, and the line is mismeasured. Right after each kept closure's first call,
`record` notes the variables its code reads, the contents of its cells (``co_freevars``) and
the globals its code loads (``LOAD_GLOBAL``, nested code objects included), that hold a tensor
or a list, tuple or dict of tensors, by reference with each tensor's ``_version``. Before the
closures run again, `check` tells whether one of them now holds another object or was written
in place; a new tensor with the same shape, dtype, device and contents is no change (compared
on the device: the verdict joins the measurement's one host read, no sync of its own).

Loop-made closures share their cell objects, so the cells' contents are compared, not the
cells. Non-tensor variables (step counters, timestamps, the model, iterators) are ignored, and
attributes (``self.x``) are not seen here: the loss comparisons catch those
(`Line.drop_unless_repeated`).
"""
from __future__ import annotations

import dis
import functools
import types
from dataclasses import dataclass
from typing import Any, Collection, List, Optional, Sequence, Tuple

import torch

_MISSING = object()  # a global deleted, or a cell emptied, since the record
_MAX_ITEMS = 64      # larger containers (a data set held in a list) are not recorded
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # tensor subclasses (DTensor, ...) are ignored


@dataclass(frozen=True)
class Read:
    """One variable a closure read: its name, where it lives (a cell, or the globals), and its
    value at the record, with the tensors in it (key, tensor, _version)."""
    name: str
    where: Any
    value: Any
    tensors: Tuple[Tuple[Any, torch.Tensor, Optional[int]], ...]

    def now(self) -> Any:
        if isinstance(self.where, dict):
            return self.where.get(self.name, _MISSING)
        try:
            return self.where.cell_contents
        except ValueError:  # an empty cell
            return _MISSING


def record(closure: Any, skip: Collection[int] = ()) -> Tuple[Read, ...]:
    """The tensor variables `closure`'s code reads (module doc); one holding a tensor whose id
    is in `skip` (a trained parameter, which the optimizer writes) is left out."""
    fn = _function(closure)
    if fn is None:
        return ()
    code = fn.__code__
    places = list(zip(code.co_freevars, fn.__closure__ or ()))
    places += [(name, fn.__globals__) for name in _global_names(code)
               if name in fn.__globals__]
    reads = []
    for name, where in places:
        read = Read(name, where, None, ())
        value = read.now()
        try:
            tensors = _tensors(value)
        except Exception:  # a container subclass that cannot be read: not looked at (this
            continue       # runs in a step's commit, which must not fail)
        # a variable holding trained parameters is the model's, and the optimizer writes them
        if tensors and not any(id(t) in skip for _, t, _ in tensors):
            reads.append(Read(name, where, value, tensors))
    return tuple(reads)


def check(kept: Sequence[Sequence[Read]],
          device: torch.device) -> Tuple[List[str], torch.Tensor]:
    """Whether a variable read by the kept closures changed since their first calls: the
    names of the variables compared, and a 0-dim int64 tensor on `device`: i + 1 for the first
    that changed (names[i]), 0 for none."""
    names: List[str] = []
    flags: List[torch.Tensor] = []
    for reads in kept:
        for read in reads:
            differs = _differs(read)
            if differs is True:  # known on the host: no need to compare the others
                return [read.name], torch.ones((), dtype=torch.int64, device=device)
            if differs is not False:
                names.append(read.name)
                flags.append(differs.to(device))
    if not flags:
        return names, torch.zeros((), dtype=torch.int64, device=device)
    changed = torch.stack(flags).to(torch.int64)
    return names, (changed.argmax() + 1) * changed.amax()  # argmax: the first of the largest


def _differs(read: Read) -> Any:
    """False: the same tensors, untouched; True: another object that cannot be equal, or a
    tensor written in place; else a 0-dim bool device tensor: whether the other tensors (of the
    same shapes, dtypes and devices) have other contents."""
    now = read.now()
    tensors = _tensors(now)
    if tensors is None or type(now) is not type(read.value) or \
            [k for k, _, _ in tensors] != [k for k, _, _ in read.tensors]:
        return True
    flags = []
    for (_, new, _), (_, old, version) in zip(tensors, read.tensors):
        if version is not None and _version(old) != version:
            return True  # written in place: its first contents are gone
        if new is old:
            continue
        if new.shape != old.shape or new.dtype != old.dtype or new.device != old.device:
            return True
        flags.append(_unequal(old, new))
    return torch.stack(flags).any() if flags else False


def _unequal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether two tensors of one shape differ anywhere (NaN equal to NaN), on their device."""
    same = a == b
    if a.is_floating_point() or a.is_complex():
        same |= a.isnan() & b.isnan()
    return ~same.all()


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _tensors(value: Any) -> Optional[Tuple]:
    """(key, tensor, _version) for a plain tensor, or a list, tuple or dict of them."""
    if type(value) in _PLAIN and value.layout == torch.strided:
        items = [(None, value)]
    elif isinstance(value, (list, tuple, dict)) and 0 < len(value) <= _MAX_ITEMS:
        items = list(value.items() if isinstance(value, dict) else enumerate(value))
        if not all(type(t) in _PLAIN and t.layout == torch.strided for _, t in items):
            return None
    else:
        return None
    return tuple((k, t, _version(t)) for k, t in items)


def _function(closure: Any) -> Optional[types.FunctionType]:
    """The function whose code runs: functools.partial and bound methods unwrapped."""
    for _ in range(8):
        if isinstance(closure, functools.partial):
            closure = closure.func
        elif isinstance(closure, types.MethodType):
            closure = closure.__func__
        else:
            break
    return closure if isinstance(closure, types.FunctionType) else None


@functools.lru_cache(maxsize=512)
def _global_names(code: types.CodeType) -> Tuple[str, ...]:
    """The global names `code` and the code objects nested in it load."""
    names, stack = {}, [code]
    while stack:
        c = stack.pop()
        names.update((i.argval, None) for i in dis.get_instructions(c)
                     if i.opname == "LOAD_GLOBAL")
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return tuple(names)
