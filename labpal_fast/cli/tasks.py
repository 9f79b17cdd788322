"""Built-in tasks for the `labpal-fast` command: data, models, batches and evaluation.

Every task keeps its whole data set in memory as tensors on the training device, and draws
its batches from its own seeded generator, so two runs with the same seed (or two optimizers
in one `compare`) see the same batch sequence. Nothing is ever downloaded:

- ``digits``: scikit-learn's bundled 8×8 hand-written digits, a small CNN with BatchNorm.
- ``spirals``: three interleaved noisy spirals in the plane, an MLP.
- ``charlm``: a character-level language model (a small causal transformer) on the source
  text of Python's own ``argparse`` module.
- ``cifar10``: ResNet-20 on a local copy of CIFAR-10 in torchvision's python-pickle format
  (``cifar-10-batches-py``), given with ``--data-dir``.
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TASKS = ("digits", "spirals", "charlm", "cifar10")


class DataError(RuntimeError):
    """A task's data cannot be found or read (the message says what to do)."""


@dataclass
class TaskDefaults:
    steps: int
    batch_size: int
    eval_every: int
    sgd_lr: float          # SGD's usual rate for this kind of model
    target_loss: float     # for "steps to reach a target loss" (smoothed training loss)


@dataclass
class Task:
    """Data in memory plus a model factory. `batch(idx)` turns indices into (x, y)."""
    name: str
    description: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    make_model: Callable[[], nn.Module]
    defaults: TaskDefaults
    augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None
    prepare: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x)
    sequence: bool = False   # targets are per position (language model)
    bits_per: Optional[str] = None  # the loss is reported in bits per this (e.g. "character")

    @property
    def train_size(self) -> int:
        return int(self.x_train.shape[0])

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.sequence:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return F.cross_entropy(logits, y)

    def batch(self, idx: torch.Tensor, gen: Optional[torch.Generator] = None):
        """The training batch for `idx` (a CPU index tensor); augmentation uses `gen`."""
        idx = idx.to(self.x_train.device)
        x = self.prepare(self.x_train[idx])
        if self.augment is not None and gen is not None:
            x = self.augment(x, gen)
        return x, self.y_train[idx]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 1000) -> Tuple[float, float]:
        """Mean loss and accuracy on the validation split (model in eval mode)."""
        was_training = model.training
        model.eval()
        total_loss, correct, count = 0.0, 0.0, 0
        try:
            for start in range(0, self.x_val.shape[0], batch_size):
                x = self.prepare(self.x_val[start:start + batch_size])
                y = self.y_val[start:start + batch_size]
                logits = model(x)
                n = y.numel()
                total_loss += float(self.loss(logits, y)) * n
                correct += float((logits.argmax(-1) == y).sum())
                count += n
        finally:
            model.train(was_training)
        return total_loss / count, correct / count


class BatchStream:
    """An endless, seeded sequence of training index batches: a fresh permutation per epoch,
    the last incomplete batch of an epoch dropped. The same seed gives the same sequence."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if batch_size > size:
            raise ValueError(f"--batch-size {batch_size} is larger than the training split "
                             f"({size} examples)")
        self.size, self.batch_size = size, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self._perm = torch.empty(0, dtype=torch.long)
        self._pos = 0

    def next(self) -> torch.Tensor:
        if self._pos + self.batch_size > self._perm.numel():
            self._perm = torch.randperm(self.size, generator=self.gen)
            self._pos = 0
        idx = self._perm[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx


def _split(n: int, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """A deterministic train/validation split of range(n) by seed."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ---------------------------------------------------------------------------- digits
class DigitsCNN(nn.Module):
    """A small CNN with BatchNorm for 1×8×8 images (about 60k parameters)."""

    def __init__(self, classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.MaxPool2d(2),                                   # 4×4
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * w, classes)

    def forward(self, x):
        return self.head(self.features(x))


def digits_task(seed: int, device: torch.device) -> Task:
    from sklearn.datasets import load_digits   # here: a slow import the other tasks skip
    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0 - 0.5) / 0.5          # in [-1, 1]
    y = data.target.astype(np.int64)
    tr, va = _split(len(y), 0.2, seed)

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return Task("digits", "scikit-learn digits (8×8), small CNN with BatchNorm",
                t(x[tr, None]), t(y[tr]), t(x[va, None]), t(y[va]), DigitsCNN,
                TaskDefaults(steps=2000, batch_size=128, eval_every=100, sgd_lr=0.1,
                             target_loss=0.05))


# ---------------------------------------------------------------------------- spirals
def make_spirals(n: int, classes: int, seed: int, noise: float = 0.25):
    rng = np.random.default_rng(seed)
    per = n // classes
    xs, ys = [], []
    for k in range(classes):
        r = np.sqrt(rng.uniform(0.0, 1.0, per)) * 3.0                 # radius 0..3
        theta = r * 2.2 + 2 * math.pi * k / classes
        pts = np.stack([r * np.cos(theta), r * np.sin(theta)], 1)
        xs.append(pts + rng.normal(0.0, noise * 0.4, pts.shape))
        ys.append(np.full(per, k))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)


def spirals_task(seed: int, device: torch.device) -> Task:
    x, y = make_spirals(3000, 3, seed=1234)        # the data set itself is fixed
    tr, va = _split(len(y), 0.2, seed)

    def model():
        return nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, 3))

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return Task("spirals", "three noisy spirals (2-D), MLP 2-64-64-3",
                t(x[tr]), t(y[tr]), t(x[va]), t(y[va]), model,
                TaskDefaults(steps=3000, batch_size=128, eval_every=100, sgd_lr=0.1,
                             target_loss=0.2))


# ---------------------------------------------------------------------------- charlm
class CharTransformer(nn.Module):
    """A small causal transformer over characters (2 layers, width 64)."""

    def __init__(self, vocab: int, context: int, width: int = 64, layers: int = 2,
                 heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context),
                             persistent=False)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x):
        n = x.shape[1]
        h = self.embed(x) + self.pos[:n]
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


def charlm_text() -> str:
    import argparse
    with open(argparse.__file__, encoding="utf-8") as f:
        return f.read()


def charlm_task(seed: int, device: torch.device, context: int = 32) -> Task:
    text = charlm_text()
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    codes = np.array([lookup[c] for c in text], dtype=np.int64)
    split = int(len(codes) * 0.9)                     # the text's last 10% is validation

    def windows(a, stride):
        starts = np.arange(0, len(a) - context - 1, stride)
        idx = starts[:, None] + np.arange(context + 1)[None]
        w = a[idx]
        return w[:, :-1], w[:, 1:]
    xt, yt = windows(codes[:split], 1)
    xv, yv = windows(codes[split:], context)

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return Task("charlm", f"character LM on argparse.py ({len(text)} chars, {len(vocab)} symbols), "
                f"causal transformer, context {context}",
                t(xt), t(yt), t(xv), t(yv), lambda: CharTransformer(len(vocab), context),
                TaskDefaults(steps=2000, batch_size=32, eval_every=100, sgd_lr=0.1,
                             target_loss=2.0), sequence=True, bits_per="character")


# ---------------------------------------------------------------------------- cifar10
def _conv_bn(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.a = _conv_bn(cin, cout, stride)
        self.b = _conv_bn(cout, cout, 1)
        self.short = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.b(F.relu(self.a(x)))
        return F.relu(out + (x if self.short is None else self.short(x)))


class ResNet20(nn.Module):
    """ResNet-20 for 32×32 images (He et al. 2016, the CIFAR variant: 3×3 blocks, 16/32/64)."""

    def __init__(self, classes: int = 10, depth: int = 20):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(_conv_bn(3, 16, 1), nn.ReLU())
        layers, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            for j in range(n):
                layers.append(_Block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(64, classes)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _find_cifar(data_dir: Optional[str]) -> str:
    if not data_dir:
        raise DataError("the cifar10 task needs --data-dir DIR: a local copy of CIFAR-10 in "
                        "torchvision's format (DIR/cifar-10-batches-py/data_batch_1..5, "
                        "test_batch); nothing is downloaded")
    for cand in (os.path.join(data_dir, "cifar-10-batches-py"), data_dir):
        if os.path.isfile(os.path.join(cand, "data_batch_1")) and \
                os.path.isfile(os.path.join(cand, "test_batch")):
            return cand
    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir!r} does not exist. The cifar10 task reads a local "
                        "copy of CIFAR-10 in torchvision's format (DIR/cifar-10-batches-py/"
                        "data_batch_1..5, test_batch); nothing is downloaded")
    raise DataError(f"no CIFAR-10 found in {data_dir!r}: expected "
                    f"{os.path.join(data_dir, 'cifar-10-batches-py')}/data_batch_1..5 and "
                    "test_batch (torchvision's python-pickle format); nothing is downloaded")


def _load_cifar_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as e:
        raise DataError(f"cannot read CIFAR-10 batch {path!r}: {e}") from None
    return data, labels


def cifar_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (4-pixel zero padding) and horizontal flip, per image, from `gen`."""
    b, c, h, w = x.shape
    oy = torch.randint(0, 9, (b,), generator=gen).to(x.device)
    ox = torch.randint(0, 9, (b,), generator=gen).to(x.device)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    padded = F.pad(x, (4, 4, 4, 4))
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = torch.arange(w, device=x.device)[None, :].expand(b, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + ox[:, None]
    cols = cols[:, None, None, :]
    return padded[torch.arange(b, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def cifar10_task(seed: int, device: torch.device, data_dir: Optional[str]) -> Task:
    root = _find_cifar(data_dir)
    parts = [_load_cifar_batch(os.path.join(root, f"data_batch_{i}")) for i in range(1, 6)
             if os.path.isfile(os.path.join(root, f"data_batch_{i}"))]
    xt = np.concatenate([p[0] for p in parts])
    yt = np.concatenate([p[1] for p in parts])
    xv, yv = _load_cifar_batch(os.path.join(root, "test_batch"))
    mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)

    def prepare(x):                                   # uint8 storage → normalised float
        return (x.float() / 255.0 - mean) / std

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return Task("cifar10", f"CIFAR-10 from {root}, ResNet-20", t(xt), t(yt), t(xv), t(yv),
                ResNet20, TaskDefaults(steps=64000, batch_size=128, eval_every=1000,
                                       sgd_lr=0.1, target_loss=0.5),
                augment=cifar_augment, prepare=prepare)


def load_task(name: str, seed: int, device: torch.device, data_dir: Optional[str] = None) -> Task:
    if name == "digits":
        return digits_task(seed, device)
    if name == "spirals":
        return spirals_task(seed, device)
    if name == "charlm":
        return charlm_task(seed, device)
    if name == "cifar10":
        return cifar10_task(seed, device, data_dir)
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")


# the tasks that read --data-dir (for the others it is an error, not silently ignored)
DATA_DIR_TASKS = ("cifar10",)
TASK_HELP: Dict[str, str] = {
    "digits": "scikit-learn's bundled 8×8 digits, small CNN with BatchNorm (default)",
    "spirals": "three noisy spirals, MLP",
    "charlm": "character-level transformer LM on the source of Python's argparse module",
    "cifar10": "ResNet-20 on a local CIFAR-10 copy (--data-dir, torchvision pickle format)",
}
