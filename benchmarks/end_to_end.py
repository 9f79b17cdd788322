"""Whole training steps: LABPAL against AdamW(fused=True) and SGD(fused=True) on two models.

The `end_to_end` section of benchmarks/gpu_check.py; docs/benchmarks.md shows the table it
fills and how to read it. On a GPU (`gpu_rig`): a ResNet-50-shaped CNN (batch 128, 224x224,
channels_last, bf16 autocast) and a GPT-2-small-shaped transformer (12 layers, d = 768,
sequence 1024, batch 8) in bf16 autocast with fp32 parameters, and with bf16 parameters (LABPAL
with fp32 master weights; AdamW(fused) and SGD(fused) keep none: their states are bf16 too), on
synthetic data; the transformer also with its forward+backward captured in CUDA graphs and with
its blocks compiled (`torch.compile`). On CPU (`dry_run_rig`) the same code runs on tiny shapes
(the tests): a perf_counter clock, a TorchDispatchMode counting host reads instead of
`set_sync_debug_mode`, no peak memory, and the graphs' static outputs emulated (`StaticOutputs`).

Per optimizer, one model copy each, interleaved in rounds (one block of steps per optimizer per
round), each step between two clock marks (CUDA events on a GPU):
- the TRAINING step (forward + backward + update; m = 1, so one closure call is one update);
  LABPAL's block spans a whole cycle, a measurement and `reuse` TRAINING steps after it;
- a measurement = its k·m step() calls minus m TRAINING steps, and its floor: the forward
  passes without grad it needs beyond the update's own m forward+backward passes,
  k·P·m − m + 1 (P points: the positions and, with the step check, the proposed step; the
  repeat of the first closure included), each timed alone;
- its share of training time at the default reuse_updates, at m = 1 and at the noise factor ν
  of ImageNet-1k at batch 256 (estimated from m = 1, and measured directly when time is left);
- peak memory per optimizer's block above what was allocated before it, and what the model
  copy with its optimizer keeps allocated between steps;
- LABPAL's host syncs beyond the model's own: per TRAINING step (must be 0; on a GPU under
  `set_sync_debug_mode("error")`, which raises on one) and per measurement (at most 2).
A whole LABPAL step cannot be captured in a CUDA graph, by design: its phases are host-side
counters, and a measurement reads two device values on the host. Only the model's forward and
backward inside the closure can be.
"""
from __future__ import annotations

import copy
import functools
import itertools
import math
import statistics
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from labpal_fast import LABPAL
from labpal_fast.hyper import Hyper

from plan import Plan

TRAINING = "training"
REUSE_DEFAULT = Hyper().reuse  # the share is reported at the default configuration (NSGD, β = 0)
# ImageNet-1k's 1,281,167 training images at batch 256: ν = (128/256)·(N/40000) = 16.0
IMAGENET_NU = Hyper(dataset_size=1_281_167, batch_size=256).nu
MiB = 2.0 ** 20


# ---------------------------------------------------------------------------------- models
class Bottleneck(nn.Module):
    """ResNet-50's block (v1.5: the stride on the 3x3 convolution)."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True), nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet(width: int = 64, depths=(3, 4, 6, 3), classes: int = 1000) -> nn.Module:
    """ResNet-50's shape at the defaults (25.6M parameters)."""
    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
              nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = width
    for stage, n in enumerate(depths):
        for j in range(n):
            layers.append(Bottleneck(cin, width * 2 ** stage, 2 if j == 0 and stage else 1))
            cin = 4 * width * 2 ** stage
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention and a 4x MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc, self.out = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2 small's shape at (vocab 50304, d 768, 12 layers, 12 heads): 124M parameters, the
    output layer tied to the token embedding."""

    def __init__(self, vocab: int, seq: int, d: int, layers: int, heads: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        x = self.tok(idx) + self.pos.weight[:idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def loss_of(forward: Callable, batch, device_type: str, cache: bool = True) -> torch.Tensor:
    """Mean cross-entropy of forward(x) under bf16 autocast (`cache`: autocast's weight cache,
    which CUDA graph capture needs off)."""
    x, y = batch
    with torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=cache):
        out = forward(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class WithLoss(nn.Module):
    """The model and its loss (times `scale`) as one module: captured whole, the loss is the
    graph's static output."""

    def __init__(self, model: nn.Module, device_type: str):
        super().__init__()
        self.model, self.device_type = model, device_type

    def forward(self, x, y, scale):
        return loss_of(self.model, (x, y), self.device_type, cache=False) * scale


# ---------------------------------------------------------------------------------- devices
class StaticOutputs(torch.autograd.Function):
    """What a replayed CUDA graph returns (torch.cuda.make_graphed_callables): its outputs
    live in buffers that the next replay overwrites. Used on CPU to emulate capture."""

    @staticmethod
    def forward(ctx, out, buffer):
        buffer.copy_(out)
        return buffer.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class HostReads(TorchDispatchMode):
    """Counts device-to-host reads (`.item()`, bool(t), float(t): aten._local_scalar_dense),
    the CPU stand-in for CUDA's sync-debug mode; `strict` raises on the first, as "error" does."""

    def __init__(self, strict: bool):
        super().__init__()
        self.strict, self.n = strict, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_local_scalar_dense", "item"):
            self.n += 1
            if self.strict:
                raise RuntimeError(f"host read ({func}) in a step that must not read")
        return func(*args, **(kwargs or {}))


@dataclass
class Rig:
    """What differs between the GPU run and the CPU dry run: shapes, counts, clock, memory, sync
    counting, capture and the compile backend."""
    device: torch.device
    backend: str              # LABPAL's
    compile_backend: str
    resnet: dict
    gpt: dict
    k: int                    # approximation_batches (10, LABPAL's default, on a GPU)
    reuse: int                # TRAINING updates between two measurements, in the timed blocks
    rounds: int
    reps: int                 # forward / forward+backward passes timed alone, for the floor
    nu: float                 # the noise factor of the direct measurement at ν
    baseline_block: int       # steps per round for AdamW / SGD
    minimum: float            # seconds below which a part is skipped
    dry_run: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    # clock: marks between steps; read them after wait()
    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def wait(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    # memory: what is allocated, and the peak since the last reset (None on CPU)
    def allocated(self) -> Optional[int]:
        return torch.cuda.memory_allocated() if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> Optional[int]:
        return torch.cuda.max_memory_allocated() if self.cuda else None

    @contextmanager
    def host_syncs(self, strict: bool):
        """Counts host syncs in the block (`.n` after it); `strict`: the first one raises."""
        if not self.cuda:
            with HostReads(strict) as reads:
                yield reads
            return
        counter = SimpleNamespace(n=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("error" if strict else "warn")
            try:
                yield counter
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counter.n = sum("synchroniz" in str(w.message) for w in caught)

    def capture(self, module: nn.Module, sample: tuple, device_type: str) -> Callable:
        """module's forward and backward as CUDA graphs (make_graphed_callables; autocast's
        cache off, as capture needs); on CPU the module with its outputs in static buffers."""
        if self.cuda:
            with torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False):
                return torch.cuda.make_graphed_callables(module, sample)
        buffers: list = []

        def replay(*args):
            out = module(*args)
            if not buffers:
                buffers.append(torch.empty_like(out))
            return StaticOutputs.apply(out, buffers[0])
        return replay

    def compile(self, model: nn.Module) -> nn.Module:
        """Each transformer block compiled (regional compilation: the 12 identical blocks share
        one compiled graph, so the compile takes about a twelfth of the whole model's)."""
        for block in model.blocks:
            block.compile(backend=self.compile_backend)
        return model


def gpu_rig() -> Rig:
    return Rig(device=torch.device("cuda"), backend="triton", compile_backend="inductor",
               resnet=dict(batch=128, image=224, width=64, depths=(3, 4, 6, 3), classes=1000),
               gpt=dict(batch=8, seq=1024, vocab=50304, d=768, layers=12, heads=12),
               k=Hyper().approximation_batches, reuse=10, rounds=3, reps=10, nu=IMAGENET_NU,
               baseline_block=10, minimum=8.0)


def dry_run_rig() -> Rig:
    """Tiny shapes on CPU, eager backend, aot_eager compile: the tests' run of the section."""
    return Rig(device=torch.device("cpu"), backend="eager", compile_backend="aot_eager",
               resnet=dict(batch=4, image=32, width=4, depths=(1, 1, 1, 1), classes=10),
               gpt=dict(batch=2, seq=16, vocab=64, d=32, layers=2, heads=2),
               k=2, reuse=2, rounds=2, reps=2, nu=2.0, baseline_block=2, minimum=0.0,
               dry_run=True)


# ---------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    name: str
    make: Callable[[], nn.Module]    # the initial model (on the device, in its dtype)
    batches: List[tuple]
    channels_last: bool = False


def resnet_task(rig: Rig) -> Task:
    s = rig.resnet
    torch.manual_seed(0)
    model = resnet(s["width"], s["depths"], s["classes"]).to(
        rig.device, memory_format=torch.channels_last)
    g = torch.Generator(device=rig.device).manual_seed(1)
    batches = [(torch.randn(s["batch"], 3, s["image"], s["image"], device=rig.device,
                            generator=g).contiguous(memory_format=torch.channels_last),
                torch.randint(0, s["classes"], (s["batch"],), device=rig.device, generator=g))
               for _ in range(4)]
    name = f"ResNet-50 shape, batch {s['batch']}, {s['image']}², channels_last, bf16 autocast"
    return Task(name, lambda: copy.deepcopy(model), batches, channels_last=True)


def gpt_task(rig: Rig, dtype=torch.float32) -> Task:
    s = rig.gpt
    torch.manual_seed(0)
    model = GPT(s["vocab"], s["seq"], s["d"], s["layers"], s["heads"]).to(rig.device, dtype)
    g = torch.Generator(device=rig.device).manual_seed(1)
    batches = []
    for _ in range(4):
        tokens = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), device=rig.device,
                               generator=g)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    params = "bf16 parameters" if dtype == torch.bfloat16 else "fp32 parameters"
    name = (f"GPT-2-small shape ({s['layers']} layers, d {s['d']}), batch {s['batch']} x "
            f"{s['seq']}, bf16 autocast, {params}")
    return Task(name, lambda: copy.deepcopy(model), batches)


# ---------------------------------------------------------------------------------- optimizers
def labpal_hyper(rig: Rig, **changes) -> dict:
    """m = 1; a measurement at the first step and after every `reuse` updates; the direction's
    norm unbounded so that no measurement is abandoned (a shorter one would not be timed)."""
    hyper = dict(noise_factor=1.0, batch_size_schedule=((0, 1),), warmup_updates=0,
                 reuse_updates=rig.reuse, approximation_batches=rig.k,
                 direction_norm_range=(0.0, math.inf))
    hyper.update(changes)
    return hyper


OPTIMIZERS: Dict[str, Callable] = {
    # LABPAL's defaults otherwise: NSGD without momentum; SGD mode with momentum 0.9, as SGD
    "LABPAL NSGD": lambda model, rig, master: LABPAL(
        model.parameters(), model=model, backend=rig.backend, mode="NSGD",
        master_weights=master, **labpal_hyper(rig)),
    "LABPAL SGD": lambda model, rig, master: LABPAL(
        model.parameters(), model=model, backend=rig.backend, mode="SGD", momentum=0.9,
        master_weights=master, **labpal_hyper(rig)),
    "AdamW(fused)": lambda model, rig, master: torch.optim.AdamW(
        model.parameters(), lr=1e-4, weight_decay=0.01, fused=True),
    "SGD(fused)": lambda model, rig, master: torch.optim.SGD(
        model.parameters(), lr=1e-3, momentum=0.9, fused=True),
}


class Runner:
    """One model copy with its optimizer; step() makes one training step on the next batch."""

    def __init__(self, name: str, model: nn.Module, opt, forward: Callable, batches, loss):
        self.name, self.model, self.opt, self.forward = name, model, opt, forward
        self.batches, self.loss, self.calls = batches, loss, 0
        self.labpal = isinstance(opt, LABPAL)

    @property
    def phase(self) -> str:
        return self.opt.phase if self.labpal else TRAINING

    def step(self):
        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        if self.labpal:
            return self.opt.step(functools.partial(self.loss, self.forward, batch))
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.forward, batch)
        loss.backward()
        self.opt.step()
        return loss.detach()


def timed_steps(rig: Rig, runner: Runner, n: int) -> List[tuple]:
    """n steps, each between two clock marks: (phase before, phase after, call index, mark,
    next mark)."""
    marks, steps = [rig.now()], []
    for _ in range(n):
        before, index = runner.phase, runner.calls
        runner.step()
        steps.append((before, runner.phase, index))
        marks.append(rig.now())
    return [step + (marks[i], marks[i + 1]) for i, step in enumerate(steps)]


def abandoned(records: List[dict]) -> Set[int]:
    """The calls at which measurements (`LABPAL.measurements()`) were abandoned: such one spans
    m calls, not k·m, and at m = 1 the phases alone would take it for a TRAINING step."""
    return {x["call"] for x in records if (x["reason"] or "").startswith("abandoned")}


def split(calls, skip: Set[int] = frozenset()) -> Tuple[List[float], List[List[float]]]:
    """(TRAINING steps' values, one list per whole measurement) from (phase before, phase after,
    call index, value); measurements starting at a call in `skip` are left out."""
    train, spans, span = [], [], None
    for before, after, index, value in calls:
        if index in skip:
            span = None
        elif before == TRAINING and after == TRAINING:
            train.append(value)
        elif before == TRAINING:
            span = [value]
        elif span is not None:
            span.append(value)
            if after == TRAINING:
                spans.append(span)
                span = None
    return train, spans


def time_alone(rig: Rig, fn: Callable, reps: int) -> float:
    """Median ms of fn over reps calls, each between two clock marks (after one warm-up call)."""
    fn()
    marks = [rig.now()]
    for _ in range(reps):
        fn()
        marks.append(rig.now())
    rig.wait()
    return statistics.median(rig.ms(a, b) for a, b in zip(marks, marks[1:]))


def positions(opt: LABPAL) -> int:
    """The points a measurement evaluates each closure at: the line's positions, and the step
    the fit proposes while the step check is on (docs/algorithm.md "The step check")."""
    return len(opt.hyper.line_positions) + int(opt.line.checking)


def floor_passes(k: int, p: int, m: int) -> int:
    """Forward passes without grad a measurement needs beyond its m forward+backward passes:
    k·m closures at P positions, m of them with backward, and the first closure once more."""
    return k * p * m - m + 1


def share(measure_ms: float, update_ms: float) -> float:
    """The measurement's share of training time when it comes every REUSE_DEFAULT updates."""
    return measure_ms / (measure_ms + REUSE_DEFAULT * update_ms)


# ---------------------------------------------------------------------------------- comparison
def build(rig: Rig, task: Task, names, master: Optional[bool] = None, wrap=None,
          loss=None) -> List[Runner]:
    """One model copy and optimizer per name, warmed up (LABPAL: its first whole cycle, so that
    the timed blocks start at a measurement), with what each keeps allocated."""
    loss = loss or functools.partial(loss_of, device_type=rig.device.type)
    runners = []
    for name in names:
        before = rig.allocated()
        model = task.make()
        opt = OPTIMIZERS[name](model, rig, master)
        forward = wrap(model) if wrap else model
        runner = Runner(name, model, opt, forward, task.batches, loss)
        t0 = time.monotonic()
        for _ in range(rig.k + rig.reuse if runner.labpal else 2):
            runner.step()
        rig.wait()
        runner.warmup_s = time.monotonic() - t0
        after = rig.allocated()
        runner.resident = None if before is None else (after - before) / MiB
        runner.channels_last = all(p.is_contiguous(memory_format=torch.channels_last)
                                   for p in model.parameters() if p.dim() == 4) \
            if task.channels_last else None
        runners.append(runner)
    return runners


def rounds(rig: Rig, runners: List[Runner], deadline: float, reserve: float) -> dict:
    """Interleaved rounds; per runner its steps' (before, after, ms), its peak memory above what
    was allocated before its block, and the measurements made in its blocks."""
    calls = {r.name: [] for r in runners}
    peaks = {r.name: [] for r in runners}
    records = {r.name: len(r.opt.measurements()) for r in runners if r.labpal}
    done = 0
    for _ in range(rig.rounds):
        t0 = time.monotonic()
        marked = []
        for r in runners:
            rig.reset_peak()
            before = rig.allocated()
            marked.append((r, timed_steps(rig, r, rig.k + rig.reuse if r.labpal
                                          else rig.baseline_block)))
            if before is not None:
                peaks[r.name].append((rig.peak() - before) / MiB)
        rig.wait()
        for r, steps in marked:
            calls[r.name] += [(b, a, i, rig.ms(m0, m1)) for b, a, i, m0, m1 in steps]
        done += 1
        if time.monotonic() + (time.monotonic() - t0) + reserve > deadline:
            break
    made = {r.name: r.opt.measurements()[records[r.name]:] for r in runners if r.labpal}
    return {"calls": calls, "peaks": peaks, "measurements": made, "rounds": done}


def sync_check(rig: Rig, runner: Runner, model_syncs: Tuple[int, int]) -> dict:
    """LABPAL's own host syncs per step over one cycle and a half, beyond the model's own
    (`model_syncs`: per forward+backward, per forward without grad, counted alone): strict (a
    sync raises) in steps known to be TRAINING (after a measurement that gave a rate, before the
    next is due) when the model makes none, counted in the others. Phases and the measurements'
    records tell each step's kind afterwards."""
    calls, since_end, rate = [], None, False
    per_fwd_bwd, per_fwd = model_syncs
    try:
        for _ in range(rig.k + 2 * rig.reuse):
            before, updates = runner.phase, runner.opt.updates
            strict = before == TRAINING and rate and since_end is not None \
                and since_end < rig.reuse and per_fwd_bwd == 0
            index = runner.calls
            with rig.host_syncs(strict) as syncs:
                runner.step()
            calls.append((before, runner.phase, index, syncs.n))
            if before != TRAINING and runner.phase == TRAINING:  # a measurement ended
                since_end, rate = 0, runner.opt.updates > updates
            elif since_end is not None:
                since_end += 1
    except RuntimeError as exc:
        return {"error": f"{exc}"[:300], "calls": calls}
    train, spans = split(calls, abandoned(runner.opt.measurements()))
    model_in_measurement = per_fwd_bwd + floor_passes(rig.k, positions(runner.opt), 1) * per_fwd
    return {"train_steps": len(train), "strict": per_fwd_bwd == 0,
            "model_syncs_per_fwd_bwd": per_fwd_bwd, "model_syncs_per_fwd": per_fwd,
            "syncs_per_train_step": max(train, default=math.nan) - per_fwd_bwd,
            "measurements": len(spans),
            "syncs_per_measurement": max((sum(s) for s in spans), default=math.nan)
            - model_in_measurement}


def direct_nu(rig: Rig, task: Task, fwd_ms: float, m1: dict, deadline: float) -> dict:
    """A measurement at m = ν timed directly (LABPAL NSGD, its own model copy, a measurement
    after every update): after a first measurement that gives a rate, an update of m TRAINING
    steps and the next measurement are timed."""
    m = int(rig.nu)
    model = task.make()
    opt = LABPAL(model.parameters(), model=model, backend=rig.backend, mode="NSGD",
                 **labpal_hyper(rig, noise_factor=rig.nu, reuse_updates=1))
    k, p = rig.k, positions(opt)
    # two measurements and two updates, at the cost found at m = 1
    estimate_s = 2 * (floor_passes(k, p, m) * fwd_ms * m1["measure_over_floor"]
                      + m * m1["train_ms"]) / 1e3
    if not time.monotonic() + estimate_s < deadline:  # NaN: no measurement was timed at m = 1
        return {"skipped": f"out of time (about {estimate_s:.0f} s needed)"}
    runner = Runner("LABPAL NSGD", model, opt, model, task.batches,
                    functools.partial(loss_of, device_type=rig.device.type))
    # warm: until a measurement gave a rate (after 3 without, LABPAL falls back to a safe step)
    for _ in range(6 * (k * m + m)):
        before, updates = runner.phase, opt.updates
        runner.step()
        if before != TRAINING and runner.phase == TRAINING and opt.updates > updates:
            break
    steps = timed_steps(rig, runner, m + k * m)
    rig.wait()
    train, spans = split([(b, a, i, rig.ms(m0, m1)) for b, a, i, m0, m1 in steps],
                         abandoned(opt.measurements()))
    if len(spans) != 1 or len(train) != m:
        return {"error": f"expected one measurement and {m} TRAINING steps, got {len(spans)} "
                         f"and {len(train)} (reasons: {[x['reason'] for x in opt.measurements()]})"}
    update = sum(train)
    measure = sum(spans[0]) - update
    floor = floor_passes(k, p, m) * fwd_ms
    return {"m": m, "measure_ms": measure, "update_ms": update, "floor_ms": floor,
            "measure_over_floor": measure / floor, "share": share(measure, update)}


def compare(rig: Rig, task: Task, deadline: float, names=tuple(OPTIMIZERS),
            master: Optional[bool] = None, wrap=None, loss=None, syncs: bool = True,
            nu: bool = True) -> dict:
    """The figures of one model and set of optimizers (module docstring)."""
    t0 = time.monotonic()
    runners = build(rig, task, names, master, wrap, loss)
    build_s = time.monotonic() - t0
    loss = loss or functools.partial(loss_of, device_type=rig.device.type)
    # the model alone (no optimizer), as the runners call it: for the floor and the update's
    # own share of a step
    alone = task.make()
    forward = wrap(alone) if wrap else alone

    def fwd():
        with torch.no_grad():
            loss(forward, task.batches[0])

    def fwd_bwd():
        alone.zero_grad(set_to_none=True)
        loss(forward, task.batches[0]).backward()
    fwd_ms, fwd_bwd_ms = time_alone(rig, fwd, rig.reps), time_alone(rig, fwd_bwd, rig.reps)
    with rig.host_syncs(strict=False) as in_fwd_bwd:
        fwd_bwd()
    with rig.host_syncs(strict=False) as in_fwd:
        fwd()
    model_syncs = (in_fwd_bwd.n, in_fwd.n)
    del alone, forward
    out = {"task": task.name, "parameters": sum(p.numel() for p in runners[0].model.parameters()),
           "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "build_s": build_s}
    reserve = (time.monotonic() - t0) * 0.5 if syncs else 0.0
    timed = rounds(rig, runners, deadline, reserve)
    out["rounds"] = timed["rounds"]
    figures = {}
    for r in runners:
        made = timed["measurements"].get(r.name, [])
        skip = abandoned(made)
        train, spans = split(timed["calls"][r.name], skip)
        fig = {"train_ms": statistics.median(train), "steps_timed": len(train),
               "warmup_s": r.warmup_s}
        fig["optimizer_ms"] = fig["train_ms"] - fwd_bwd_ms
        fig["peak_MiB"] = max(timed["peaks"][r.name], default=None)
        fig["resident_MiB"] = r.resident
        if r.channels_last is not None:
            fig["channels_last_params"] = r.channels_last
        if r.labpal:
            k, p, m = rig.k, positions(r.opt), 1
            measures = [sum(s) - m * fig["train_ms"] for s in spans]
            floor = floor_passes(k, p, m) * fwd_ms
            fig.update(measurements_timed=len(spans), abandoned_timed=len(skip),
                       valid=sum(x["valid"] for x in made),
                       reasons=sorted({x["reason"] for x in made if x["reason"]}),
                       measure_ms=statistics.median(measures) if measures else math.nan,
                       floor_passes=floor_passes(k, p, m), floor_ms=floor)
            fig["measure_over_floor"] = fig["measure_ms"] / floor
            fig["share_m1"] = share(fig["measure_ms"], fig["train_ms"])
            # at ν: the forward passes scale with m, the measurement at the ratio found at m = 1
            # (its fixed costs scaled too: an overestimate), the update is m steps
            n = floor_passes(k, p, int(rig.nu)) * fwd_ms * fig["measure_over_floor"]
            fig["share_nu_estimated"] = share(n, int(rig.nu) * fig["train_ms"])
        figures[r.name] = fig
    for fig in figures.values():
        for base in ("AdamW(fused)", "SGD(fused)"):
            if base in figures:
                fig["over_" + base] = fig["train_ms"] / figures[base]["train_ms"]
    out["optimizers"] = figures
    if syncs:
        for r in runners:
            if r.labpal:
                figures[r.name]["syncs"] = sync_check(rig, r, model_syncs)
    if nu and "LABPAL NSGD" in figures:
        del runners, r  # their memory, before another copy
        out["nu_direct"] = direct_nu(rig, task, fwd_ms, figures["LABPAL NSGD"], deadline)
    return out


# ------------------------------------------------------------------------ capture, compile
def graphs(rig: Rig, task: Task, deadline: float) -> dict:
    """The model's forward+backward captured (CUDA graphs) inside the closure: steps and
    measurements timed with the loss computed outside the graph, then what the static outputs
    do to LABPAL when the loss is the graph's own output (`alias_probe`)."""
    device_type = rig.device.type
    sample = (task.batches[0][0],)
    out = {}
    try:
        out.update(compare(
            rig, task, deadline, names=("LABPAL NSGD", "AdamW(fused)"),
            wrap=lambda model: rig.capture(model, sample, device_type),
            loss=functools.partial(loss_of, device_type=device_type, cache=False),
            nu=False))
        out["works"] = True
    except Exception as exc:
        traceback.print_exc()
        out.update(works=False, error=f"{type(exc).__name__}: {exc}"[:500])
    try:
        out["loss_in_graph"] = {clone: alias_probe(rig, task, clone)
                                for clone in ("aliased", "cloned")}
    except Exception as exc:
        traceback.print_exc()
        out["loss_in_graph"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return out


def alias_probe(rig: Rig, task: Task, clone: str) -> dict:
    """The loss as the captured graph's output, returned as it is ("aliased") or cloned: is
    the loss step() returned overwritten by the next step, and does the measurement's repeat
    check still stop a closure that does not repeat its loss (a scale that changes per call)?"""
    model = task.make()
    opt = LABPAL(model.parameters(), model=model, backend=rig.backend, mode="NSGD",
                 **labpal_hyper(rig))
    device_type = rig.device.type
    x, y = task.batches[0]
    one = torch.ones((), device=rig.device)
    graphed = rig.capture(WithLoss(model, device_type), (x, y, one), device_type)
    calls = itertools.count(1)

    def closure():  # not repeatable: its loss is scaled by the number of calls made
        loss = graphed(x, y, next(calls) * one)
        return loss.clone() if clone == "cloned" else loss
    first = opt.step(closure)  # the first step starts a measurement
    kept = first.clone()
    result = {}
    try:
        for _ in range(rig.k + rig.reuse):
            opt.step(closure)
            if opt.phase == TRAINING:  # the measurement ended
                break
        result["repeat_check"] = "missed"
    except RuntimeError as exc:
        result["repeat_check"] = "caught" if "did not repeat" in str(exc) else f"error: {exc}"
    result["returned_loss_overwritten"] = not torch.equal(first, kept)  # by the later calls
    return result


def compiled(rig: Rig, task: Task, deadline: float) -> dict:
    """The transformer's blocks compiled inside the closure: LABPAL NSGD against AdamW(fused),
    each on its own compiled copy (the first steps include the compilation: warmup_s)."""
    from torch._dynamo.utils import counters
    graphs_before = counters["stats"]["unique_graphs"]
    out = compare(rig, task, deadline, names=("LABPAL NSGD", "AdamW(fused)"),
                  wrap=rig.compile, syncs=False, nu=False)
    # one per grad mode, and one more in a measurement's first call, which runs under LABPAL's
    # AutocastProbe (a TorchFunctionMode: dynamo guards on the mode stack), once per process
    out.update(backend=rig.compile_backend,
               graphs_compiled=counters["stats"]["unique_graphs"] - graphs_before)
    return out


# ---------------------------------------------------------------------------------- the section
PARTS = {  # name -> (share of the section's time left, cap)
    "resnet50": (3, None), "gpt2": (3, None), "gpt2_bf16_params": (2, None),
    "gpt2_cuda_graphs": (1.5, None), "gpt2_compiled": (2.5, None)}


def run(rig: Rig, deadline: float, save: Optional[Callable[[dict], None]] = None) -> dict:
    """The whole section by `deadline` (time.monotonic()); `save` gets the results so far after
    each part."""
    result = {"device": torch.cuda.get_device_name() if rig.cuda else "cpu (dry run)",
              "torch": torch.__version__, "dry_run": rig.dry_run, "backend": rig.backend,
              "settings": {"k": rig.k, "reuse_in_timed_blocks": rig.reuse,
                           "reuse_for_share": REUSE_DEFAULT, "rounds": rig.rounds,
                           "nu": rig.nu, "nu_source": "dry run" if rig.dry_run else
                           "ImageNet-1k (1,281,167 images) at batch 256: ν = (128/256)·"
                           "(1281167/40000)"},
              "not_capturable": "a whole LABPAL step cannot be captured in a CUDA graph: its "
                                "phases are host-side counters and a measurement reads two "
                                "device values on the host; the model's forward+backward inside "
                                "the closure can be (gpt2_cuda_graphs)"}

    def save_part(name, part):
        result[name] = part
        if save is not None:
            save(result)

    plan = Plan(deadline - time.monotonic(), PARTS, save=save_part, minimum=rig.minimum)
    cudnn = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        parts = {
            "resnet50": lambda d: compare(rig, resnet_task(rig), d),
            "gpt2": lambda d: compare(rig, gpt_task(rig), d),
            "gpt2_bf16_params": lambda d: compare(rig, gpt_task(rig, torch.bfloat16), d,
                                                  master=True),
            "gpt2_cuda_graphs": lambda d: graphs(rig, gpt_task(rig), d),
            "gpt2_compiled": lambda d: compiled(rig, gpt_task(rig), d),
        }
        for name, fn in parts.items():
            plan.run(name, fn)
            if rig.cuda:
                torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.benchmark = cudnn
    return result


def table(result: dict) -> str:
    """The section's figures as text: per part and optimizer, the step time and its ratios, the
    measurement against its floor and its share, memory and syncs."""
    head = (f"{'part':<17} {'optimizer':<13} {'step ms':>8} {'/AdamW':>7} {'/SGD':>6} "
            f"{'meas ms':>8} {'/floor':>7} {'share m=1':>9} {'share ν':>8} {'peak MiB':>9} "
            f"{'syncs':>5}")
    lines = [head, "-" * len(head)]

    def cell(v, fmt):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt % v
    for part in PARTS:
        res = result.get(part, {})
        if "optimizers" not in res:
            reason = res.get("skipped") or res.get("error") or "not run"
            lines.append(f"{part:<17} {str(reason)[:90]}")
            continue
        nu = res.get("nu_direct", {})
        for name, f in res["optimizers"].items():
            s = f.get("syncs", {})
            if name == "LABPAL NSGD" and "share" in nu:  # measured at ν
                share_nu = cell(100 * nu["share"], "%.2f%%")
            else:  # estimated from m = 1
                share_nu = cell(None if "share_nu_estimated" not in f
                                else 100 * f["share_nu_estimated"], "~%.2f%%")
            syncs = "error" if "error" in s else cell(s.get("syncs_per_train_step"), "%d")
            lines.append(
                f"{part:<17} {name:<13} {cell(f['train_ms'], '%.2f'):>8} "
                f"{cell(f.get('over_AdamW(fused)'), '%.3f'):>7} "
                f"{cell(f.get('over_SGD(fused)'), '%.3f'):>6} "
                f"{cell(f.get('measure_ms'), '%.1f'):>8} "
                f"{cell(f.get('measure_over_floor'), '%.2f'):>7} "
                f"{cell(None if 'share_m1' not in f else 100 * f['share_m1'], '%.2f%%'):>9} "
                f"{share_nu:>8} {cell(f.get('peak_MiB'), '%.0f'):>9} {syncs:>5}")
    lines.append("share ν: measured at m = ν (LABPAL NSGD, when time allowed), ~ estimated from "
                 "m = 1; syncs: LABPAL's own per TRAINING step")
    probe = result.get("gpt2_cuda_graphs", {}).get("loss_in_graph")
    if probe:
        lines.append(f"loss inside the captured graph: {probe}")
    lines.append(result["not_capturable"])
    return "\n".join(lines)
