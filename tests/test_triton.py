"""What is the Triton backend's own: availability on CPU, import without triton, the number of
kernel launches per step (counted on the launchers, under the interpreter on CPU), and the
sync-debug check on a GPU. Its ops against eager and its trajectories are in
test_backend_ops.py and test_trajectories.py, with the other backends'."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections import Counter

import pytest
import torch

pytest.importorskip("triton")
from labpal_fast import LABPAL  # noqa: E402
from labpal_fast.ops import triton as tri  # noqa: E402
from labpal_fast.optimizer import MEASURING  # noqa: E402

from helpers import batches  # noqa: E402

# compiled kernels on a GPU, the interpreter on CPU (tests/conftest.py)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_unavailable_reason_on_cpu(monkeypatch):
    if tri._INTERPRETED:
        assert tri.BACKEND.unavailable_reason([torch.device("cpu")]) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = tri.BACKEND.unavailable_reason([torch.device("cpu")])
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_import_without_triton_raises_import_error():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, labpal_fast\n"
            "from labpal_fast.ops import why_unavailable, resolve\n"
            "try:\n"
            "    import labpal_fast.ops.triton\n"
            "except ImportError as e:\n"
            "    print('IMPORTERROR', e)\n"
            "print('REASON', why_unavailable('triton', [torch.device('cpu')]))\n"
            "print('AUTO', resolve('auto', [torch.device('cpu')]).name)\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "IMPORTERROR" in res.stdout and "install labpal-fast[triton]" in res.stdout
    assert "REASON it cannot be imported" in res.stdout
    assert "AUTO eager" in res.stdout or "AUTO ext" in res.stdout


class TwoFlats(torch.nn.Module):
    """An fp32 body in three weight-decay groups and an fp16 bias: two flats."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 16)
        self.b = torch.nn.Linear(16, 3)
        self.bias16 = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) + self.bias16.float()


def _launches_per_call(m: int, k: int, positions):
    torch.manual_seed(0)
    net = TwoFlats().to(DEVICE)
    groups = [{"params": [net.a.weight], "weight_decay": 1e-3}, {"params": [net.a.bias]},
              {"params": list(net.b.parameters()) + [net.bias16], "weight_decay": 1e-2}]
    opt = LABPAL(groups, backend="triton", momentum=0.9, approximation_batches=k,
                 batch_size_schedule=((0, m),), noise_factor=1.0, reuse_updates=3,
                 warmup_updates=100, sample_positions=positions,
                 direction_norm_range=(0.0, float("inf")),
                 master_weights=False)  # the fp16 bias's flat on the fp16 kernels
    assert len(opt.flats) == 2
    calls = []
    for x, y in batches(k * m + 3 * m, 8, 6, seed=1):
        x, y = x.to(DEVICE), y.to(DEVICE)
        before = Counter(tri.LAUNCHES)
        phase = opt.phase if opt.phase == MEASURING else ("boundary" if opt.counters.acc == 0
                                                          else "training")
        opt.step(lambda x=x, y=y: torch.nn.functional.cross_entropy(net(x), y))
        calls.append((phase, Counter(tri.LAUNCHES) - before))
    return opt, calls


@pytest.mark.parametrize("m", [1, 2])
def test_launches_are_one_per_op_per_flat(m):
    """DESIGN.md's promise, counted: a TRAINING update launches, per flat, the direction pass
    and the update pass (which derives the step's coefficient itself), plus one fixed-order
    reduction of all flats' partial sums; an accumulation call one pass per flat. A measurement launches one record per loss sample,
    one move per flat per position, and a handful of single-program line kernels: nothing
    scales with the number of parameter tensors."""
    k, positions = 2, (0.0, 0.01, 0.05)
    opt, calls = _launches_per_call(m, k, positions)
    flats, npos, samples = 2, len(positions), k * m * len(positions)
    measurement = Counter()
    for _, launched in calls[:k * m]:
        measurement.update(launched)
    assert opt.measurements()[0]["valid"]
    assert measurement == Counter({
        "_record_kernel": samples, "_accumulate_kernel": flats * (m - 1),
        "_direction_kernel": flats, "_reduce_kernel": 1, "_abandon_kernel": 1,
        # moves: to each position, to the step check's proposed step, to s_upd (the check's
        # coefficient and samples are Line's torch math on Triton too: no kernel of their own)
        "_coef_kernel": (npos - 1) + 1, "_move_kernel": flats * (npos - 1) + 2 * flats,
        "_fit_kernel": 1})
    training = calls[k * m:]
    assert len(training) == 3 * m
    for i, (_, launched) in enumerate(training):
        if (i + 1) % m:  # a micro-batch that only accumulates
            assert launched == Counter({"_accumulate_kernel": flats}), (i, launched)
        else:
            assert launched == Counter({"_direction_kernel": flats, "_reduce_kernel": 1,
                                        "_train_update_kernel": flats}), (i, launched)


@pytest.mark.cuda
def test_cuda_sync_debug_mode_error():
    """On a GPU: TRAINING steps raise under sync_debug_mode('error') if anything syncs, and
    a measurement syncs at most twice."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(),
                              torch.nn.Linear(256, 10)).cuda()
    opt = LABPAL(net.parameters(), backend="triton", mode="SGD", momentum=0.9,
                 approximation_batches=2, reuse_updates=20, warmup_updates=0, noise_factor=1.0,
                 batch_size_schedule=((0, 1),))
    x, y = torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")

    def closure():
        return torch.nn.functional.cross_entropy(net(x), y)

    for _ in range(3):
        opt.step(closure)  # the first measurement: compiles the kernels
    torch.cuda.synchronize()
    syncs = 0
    for _ in range(40):
        c = opt.counters
        if opt.phase == MEASURING or c.updates - c.last_end >= opt.hyper.reuse:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    opt.step(closure)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = max(syncs, sum("synchroniz" in str(w.message) for w in caught))
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(closure)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert syncs <= 2


def test_an_untested_triton_version_disables_the_backend_with_the_reason(monkeypatch):
    monkeypatch.setattr(tri.triton, "__version__", "3.5.0")
    from labpal_fast import ops
    reason = ops.why_unavailable("triton", [torch.device("cpu")])
    assert reason is not None and "triton 3.5.0" in reason and "labpal-fast[triton]" in reason
    with pytest.raises(RuntimeError, match="triton 3.5.0"):
        LABPAL([torch.nn.Parameter(torch.randn(3))], backend="triton")
