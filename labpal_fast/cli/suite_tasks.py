"""The quality suite's tasks (`labpal-fast suite`, docs/quality.md): small problems of the kinds
people train, each a `Task` of cli/tasks.py with a test split added.

Nothing is downloaded: the data are scikit-learn's bundled data sets, its generators, and the
source text of Python's own modules. Every task splits its data once, the same for every seed
(train / validation / test); the seed picks the initial weights, the batch order and the dropout
masks. A task reports its final test figure: accuracy (%), mean squared error (of the
standardized target) or bits per character, and the figure of its trivial predictor (the
training split's majority class, the training mean, the training text's unigram frequencies).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .tasks import CharTransformer, DigitsCNN, Task, TaskDefaults, make_spirals

SPLIT_SEED = 1234            # the one split of every task's data, whatever the run's seed
LOSS_SUBSET = 2048           # training examples whose loss tells a divergence (start vs end)
METRICS = ("accuracy", "mse", "bits")


@dataclass
class SuiteTask(Task):
    """A `Task` (train and validation splits, model, batches) plus what the suite needs."""
    x_test: torch.Tensor = None
    y_test: torch.Tensor = None
    metric: str = "accuracy"          # accuracy (%, higher is better), mse or bits (lower)
    weight_decay: float = 0.0         # every optimizer gets it through its own argument
    sgd_lrs: Tuple[float, ...] = (0.3, 0.1, 0.03, 0.01)   # tuned SGD's grid
    ms_per_step: float = 1.0          # CPU ms per Adam step at 1 thread: the time estimate's basis
    note: str = ""

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.metric == "mse":
            return F.mse_loss(out.squeeze(-1), y)
        return super().loss(out, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 1000) -> Tuple[float, float]:
        """Mean loss and accuracy on the validation split (accuracy NaN for regression)."""
        if self.metric != "mse":
            return super().evaluate(model, batch_size)
        was_training = model.training
        model.eval()
        try:
            total = sum(float(F.mse_loss(model(self.x_val[i:i + batch_size]).squeeze(-1),
                                         self.y_val[i:i + batch_size], reduction="sum"))
                        for i in range(0, self.x_val.shape[0], batch_size))
        finally:
            model.train(was_training)
        return total / self.x_val.shape[0], float("nan")

    def figure(self, loss: float, accuracy: float) -> float:
        """The reported figure from an evaluation's (loss, accuracy)."""
        if self.metric == "accuracy":
            return 100.0 * accuracy
        return loss / math.log(2) if self.metric == "bits" else loss

    def on(self, split: str) -> "SuiteTask":
        """The same task evaluating on `split` (test, or the first LOSS_SUBSET of train)."""
        if split == "test":
            return replace(self, x_val=self.x_test, y_val=self.y_test)
        return replace(self, x_val=self.x_train[:LOSS_SUBSET], y_val=self.y_train[:LOSS_SUBSET])

    @property
    def trivial(self) -> float:
        """The trivial predictor's test figure, from the training split alone."""
        if self.metric == "accuracy":
            majority = torch.bincount(self.y_train.flatten()).argmax()
            return 100.0 * float((self.y_test == majority).float().mean())
        if self.metric == "mse":
            return float(((self.y_test - self.y_train.mean()) ** 2).mean())
        symbols = int(max(self.y_train.max(), self.y_test.max())) + 1
        counts = torch.bincount(self.y_train.flatten(), minlength=symbols)
        p = (counts.double() + 1) / (counts.sum() + counts.numel())     # add-one smoothing
        return float(-torch.log2(p[self.y_test.flatten()]).mean())

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"


# ---------------------------------------------------------------------------- helpers
def _split3(n: int, val: float = 0.2, test: float = 0.2):
    """One fixed train / validation / test split of range(n)."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_val, n_test = int(round(n * val)), int(round(n * test))
    return (np.sort(perm[n_val + n_test:]), np.sort(perm[:n_val]),
            np.sort(perm[n_val:n_val + n_test]))


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _standardize(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    mean, std = x[train].mean(0), x[train].std(0)
    return ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def _mlp(*widths: int, dropout: float = 0.0) -> Callable[[], nn.Module]:
    """A ReLU MLP without normalization: widths[0] inputs, widths[-1] outputs."""
    def make():
        layers = []
        for a, b in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        return nn.Sequential(*layers, nn.Linear(widths[-2], widths[-1]))
    return make


def _task(name, description, x, y, model, *, steps, batch_size, split=None, **kw) -> SuiteTask:
    tr, va, te = split if split is not None else _split3(len(y))
    return SuiteTask(name, description, _t(x[tr]), _t(y[tr]), _t(x[va]), _t(y[va]), model,
                     TaskDefaults(steps=steps, batch_size=batch_size,
                                  eval_every=max(1, steps // 20),
                                  sgd_lr=kw.get("sgd_lrs", SuiteTask.sgd_lrs)[1], target_loss=0.0),
                     x_test=_t(x[te]), y_test=_t(y[te]), **kw)


def _flip_labels(y: np.ndarray, noise: float, classes: int, seed: int) -> np.ndarray:
    """`y` with each label replaced by another class with probability `noise`."""
    rng = np.random.default_rng(seed)
    y = y.copy()
    flip = rng.random(len(y)) < noise
    y[flip] = (y[flip] + rng.integers(1, classes, flip.sum())) % classes
    return y


# ---------------------------------------------------------------------------- the tasks
def digits_mlp() -> SuiteTask:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    return _task("digits-mlp", "digits, MLP 64-64-64-10 (ReLU, no normalization), batch 64",
                 x, d.target.astype(np.int64), _mlp(64, 64, 64, 10), steps=1000,
                 batch_size=64, ms_per_step=0.8)


def digits_cnn_bn() -> SuiteTask:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    return _task("digits-cnn-bn", "digits, CNN with BatchNorm (width 16), batch 32, "
                 "weight decay 5e-4", x[:, None], d.target.astype(np.int64),
                 lambda: DigitsCNN(width=16), steps=800, batch_size=32, weight_decay=5e-4,
                 ms_per_step=5.0)


class SmallCNN(nn.Module):
    """Two 3×3 convolutions, no normalization, dropout before the head."""

    def __init__(self, width: int = 16, dropout: float = 0.25):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width * 4, 10))

    def forward(self, x):
        return self.head(self.features(x))


def digits_cnn_dropout() -> SuiteTask:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    return _task("digits-cnn-dropout", "digits, CNN without normalization, dropout 0.25, "
                 "batch 128", x[:, None], d.target.astype(np.int64), SmallCNN, steps=600,
                 batch_size=128, ms_per_step=4.3)


class RowGRU(nn.Module):
    """Reads an 8×8 digit row by row (a GRU of width 48) and classifies its last state."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.gru = nn.GRU(8, width, batch_first=True)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


def digits_gru() -> SuiteTask:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    return _task("digits-gru", "digits read row by row, GRU (width 48), batch 64",
                 x, d.target.astype(np.int64), RowGRU, steps=1000, batch_size=64,
                 sgd_lrs=(1.0, 0.3, 0.1, 0.03), ms_per_step=4.8)


def noisy_labels() -> SuiteTask:
    from sklearn.datasets import make_classification
    x, y = make_classification(3000, 20, n_informative=10, n_classes=4, class_sep=1.5,
                               random_state=7)
    split = _split3(len(y))
    y = y.astype(np.int64)
    y[split[0]] = _flip_labels(y[split[0]], 0.1, 4, seed=8)
    return _task("noisy-labels-b8", "make_classification (20 features, 4 classes), 10% of the "
                 "training labels wrong, MLP 20-64-64-4 with dropout 0.1, batch 8",
                 _standardize(x, split[0]), y, _mlp(20, 64, 64, 4, dropout=0.1), steps=3000,
                 batch_size=8, split=split, sgd_lrs=(0.1, 0.03, 0.01, 0.003), ms_per_step=0.8)


def _regression(name, description, x, y, model, **kw) -> SuiteTask:
    split = _split3(len(y))
    tr = split[0]
    y = ((y - y[tr].mean()) / y[tr].std()).astype(np.float32)
    return _task(name, description, _standardize(x, tr), y, model, split=split, metric="mse",
                 sgd_lrs=(0.1, 0.03, 0.01, 0.003), **kw)


def diabetes() -> SuiteTask:
    from sklearn.datasets import load_diabetes
    d = load_diabetes()
    return _regression("diabetes-b16", "diabetes regression (squared loss, standardized "
                       "target), MLP 10-64-64-1, batch 16, weight decay 1e-4", d.data, d.target,
                       _mlp(10, 64, 64, 1), steps=1500, batch_size=16, weight_decay=1e-4,
                       ms_per_step=0.7)


def friedman_long() -> SuiteTask:
    from sklearn.datasets import make_friedman1
    x, y = make_friedman1(2000, 10, noise=1.0, random_state=3)
    return _regression("friedman-long", "make_friedman1 regression (squared loss), MLP "
                       "10-32-32-1, batch 32", x, y, _mlp(10, 32, 32, 1),
                       steps=20000, batch_size=32, ms_per_step=0.7,
                       note="long: warm-up averaging and reuse; m = 1 throughout")


def wine_long() -> SuiteTask:
    from sklearn.datasets import load_wine
    d = load_wine()
    split = _split3(len(d.target))
    return _task("wine-long", "wine, MLP 13-32-32-3, batch 16, weight decay 1e-3",
                 _standardize(d.data, split[0]), d.target.astype(np.int64),
                 _mlp(13, 32, 32, 3), steps=20000, batch_size=16, split=split,
                 weight_decay=1e-3, ms_per_step=0.7,
                 note="long: warm-up averaging and reuse; m = 1 throughout")


def breast_cancer() -> SuiteTask:
    from sklearn.datasets import load_breast_cancer
    d = load_breast_cancer()
    split = _split3(len(d.target))
    return _task("breast-cancer-b256", "breast cancer, MLP 30-64-2, batch 256, weight decay "
                 "1e-4", _standardize(d.data, split[0]), d.target.astype(np.int64),
                 _mlp(30, 64, 2), steps=500, batch_size=256, split=split, weight_decay=1e-4,
                 ms_per_step=1.0)


def spirals() -> SuiteTask:
    x, y = make_spirals(3000, 3, seed=1234)
    return _task("spirals-b256", "three noisy spirals, MLP 2-64-64-3, batch 256", x, y,
                 _mlp(2, 64, 64, 3), steps=1500, batch_size=256, ms_per_step=0.9)


def text_transformer(context: int = 32) -> SuiteTask:
    import calendar
    import textwrap
    text = "".join(open(m.__file__, encoding="utf-8").read() for m in (textwrap, calendar))
    vocab = sorted(set(text))
    codes = np.array([vocab.index(c) for c in text], dtype=np.int64)
    a, b = int(len(codes) * 0.8), int(len(codes) * 0.9)   # train, validation, test: in order

    def windows(part, stride):
        starts = np.arange(0, len(part) - context - 1, stride)
        w = part[starts[:, None] + np.arange(context + 1)[None]]
        return w[:, :-1], w[:, 1:]
    (xt, yt), (xv, yv), (xs, ys) = (windows(codes[:a], 1), windows(codes[a:b], context),
                                    windows(codes[b:], context))
    model = lambda: CharTransformer(len(vocab), context, width=32, layers=1, heads=2)  # noqa
    return SuiteTask(
        "text-transformer", f"character LM on textwrap.py + calendar.py ({len(text)} chars), "
        f"causal transformer (1 layer, width 32), context {context}, batch 32",
        _t(xt), _t(yt), _t(xv), _t(yv), model,
        TaskDefaults(steps=1000, batch_size=32, eval_every=50, sgd_lr=0.3, target_loss=0.0),
        sequence=True, x_test=_t(xs), y_test=_t(ys), metric="bits",
        sgd_lrs=(1.0, 0.3, 0.1, 0.03), ms_per_step=8.0)


SUITE: Dict[str, Callable[[], SuiteTask]] = {
    "digits-mlp": digits_mlp, "digits-cnn-bn": digits_cnn_bn,
    "digits-cnn-dropout": digits_cnn_dropout, "digits-gru": digits_gru,
    "noisy-labels-b8": noisy_labels, "diabetes-b16": diabetes, "friedman-long": friedman_long,
    "wine-long": wine_long, "breast-cancer-b256": breast_cancer, "spirals-b256": spirals,
    "text-transformer": text_transformer,
}


def load(name: str) -> SuiteTask:
    if name not in SUITE:
        raise ValueError(f"unknown suite task {name!r}; choose from {', '.join(SUITE)}")
    return SUITE[name]()


_LOADED: Dict[str, SuiteTask] = {}


def loaded(name: str) -> SuiteTask:
    """A task, loaded once per process (the runner's jobs and the report share it)."""
    if name not in _LOADED:
        _LOADED[name] = load(name)
    return _LOADED[name]
