"""Whole LABPAL trajectories on the Triton backend against the eager backend.

Both modes, momentum, weight decay on some groups, two (device, dtype) groups (fp32 and fp16
parameters), a measurement that is abandoned (‖d‖ out of range), NaN loss samples, a change of
the multiplier, and several measurements (averaged ones too). On Triton the optimizer uses the
fused ops (one-pass SGD, move + record in one launch, the fit + step rule + move to s_upd in
one launch per flat). No training step reads a device value
on the host.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
from labpal_fast import LABPAL  # noqa: E402
from labpal_fast.ops import triton as tri  # noqa: E402
from labpal_fast.optimizer import MEASURING  # noqa: E402

from helpers import batches, small_net  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not tri._INTERPRETED:
    pytest.skip("labpal_fast.ops.triton was imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


class Net(torch.nn.Module):
    """small_net plus an fp16 bias (a second flat buffer), dropout for the replay RNG."""

    def __init__(self):
        super().__init__()
        self.body = small_net(0, dropout=0.1)
        self.bias16 = torch.nn.Parameter(0.1 * torch.randn(3).half())

    def forward(self, x):
        return self.body(x) + self.bias16.float()


def trajectory(backend, *, mode, momentum, steps=34):
    """Parameters after every step and the measurement records."""
    torch.manual_seed(0)
    net = Net().to(DEVICE)
    groups = [{"params": list(net.body[0].parameters()), "weight_decay": 0.01},
              {"params": list(net.body[3].parameters()), "weight_decay": 0.0},
              {"params": [net.bias16], "weight_decay": 0.002}]
    opt = LABPAL(groups, backend=backend, model=net, mode=mode, momentum=momentum,
              approximation_batches=3, reuse_updates=3, warmup_updates=4, averaging_window=2,
              noise_factor=1.0, batch_size_schedule=((0, 1), (20, 2)),
              sample_positions=(0.0, 1.77e-4, 0.01, 0.05))
    assert opt.backend == backend
    data = [(x.to(DEVICE), y.to(DEVICE)) for x, y in batches(steps, 16, 6, seed=5)]
    evals = [0]

    def make(i, x, y):
        def closure():
            loss = torch.nn.functional.cross_entropy(net(x), y)
            if i == 0:
                return loss * 1e6  # ‖d‖ > 100: the first measurement is abandoned
            if not torch.is_grad_enabled():
                evals[0] += 1
                if evals[0] % 7 == 3:
                    return loss * float("nan")  # a NaN sample, skipped
            return loss
        return closure

    params, lrs, phases = [], [], []
    for i, (x, y) in enumerate(data):
        opt.step(make(i, x, y))
        params.append(torch.cat([p.detach().double().reshape(-1) for p in net.parameters()]))
        lrs.append(float(opt.param_groups[0]["lr"]))
        phases.append(opt.phase)
    return torch.stack(params), lrs, phases, opt.measurements(), opt


def _compare(ref, out, label):
    p_ref, lr_ref, ph_ref, m_ref, _ = ref
    p_out, lr_out, ph_out, m_out, opt = out
    assert ph_out == ph_ref, label
    err = ((p_out - p_ref).norm(dim=1) / p_ref.norm(dim=1)).max().item()
    print(f"REL trajectory {label}: max over steps of ‖θ−θ_eager‖/‖θ_eager‖ = {err:.3e}")
    assert err < 2e-5, f"{label}: parameters differ by {err:.3e}"
    torch.testing.assert_close(torch.tensor(lr_out), torch.tensor(lr_ref), rtol=1e-4, atol=0)
    assert len(m_out) == len(m_ref)
    reasons = [m["reason"] for m in m_ref]
    assert any(r is None for r in reasons) and sum(r is None for r in reasons) >= 2, reasons
    assert any(r is not None and r.startswith("abandoned") for r in reasons), reasons
    assert any(c < 3 for m in m_ref for c in m["counts"]), "no NaN sample was skipped"
    assert any(m["averaged"] for m in m_ref if m["reason"] is None)
    for a, b in zip(m_ref, m_out):
        assert a["reason"] == b["reason"] and a["counts"] == b["counts"]
        for key in ("s_upd", "eta", "s_new", "a", "b", "direction_norm"):
            if a["reason"] is None or key in ("s_upd", "eta", "direction_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-12, nan_ok=True), (label, key)
    assert int(opt.line.skipped_samples) > 0


@pytest.mark.parametrize("mode,momentum", [("NSGD", 0.0), ("SGD", 0.9), ("NSGD", 0.5)])
def test_trajectory_matches_eager(mode, momentum):
    ref = trajectory("eager", mode=mode, momentum=momentum)
    out = trajectory("triton", mode=mode, momentum=momentum)
    _compare(ref, out, f"{mode} β={momentum}")


class _Counted:
    """A kernel wrapper that counts launches (or refuses them, with forbid)."""

    def __init__(self, kernel, forbid=False):
        self.kernel, self.forbid, self.launches = kernel, forbid, 0

    def __getitem__(self, grid):
        assert not self.forbid, "a kernel of the three-launch finish was launched"
        self.launches += 1
        return self.kernel[grid]


def test_measurement_finish_is_one_launch_per_flat(monkeypatch):
    """Each finished measurement: one fused fit+move launch per flat (fp32 and fp16 here) and
    one commit of the line state; the single-program fit kernel is not used."""
    fit_move = _Counted(tri._fit_move_kernel)
    commit = _Counted(tri._commit_kernel)
    monkeypatch.setattr(tri, "_fit_move_kernel", fit_move)
    monkeypatch.setattr(tri, "_commit_kernel", commit)
    monkeypatch.setattr(tri, "_fit_kernel", _Counted(tri._fit_kernel, forbid=True))
    *_, records, opt = trajectory("triton", mode="NSGD", momentum=0.0)
    finished = sum(r["reason"] is None or r["reason"].startswith("fit invalid") for r in records)
    assert finished >= 2 and len(opt.flats) == 2
    assert fit_move.launches == 2 * finished and commit.launches == finished


def test_training_steps_do_not_sync():
    """No host read of a device value in a TRAINING step (counted under a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    net = small_net(1).to(DEVICE)
    opt = LABPAL(net.parameters(), backend="triton", mode="NSGD", momentum=0.9,
                 approximation_batches=2, reuse_updates=100, warmup_updates=100,
                 noise_factor=1.0, batch_size_schedule=((0, 2),))
    data = [(x.to(DEVICE), y.to(DEVICE)) for x, y in batches(14, 16, 6, seed=2)]
    for i, (x, y) in enumerate(data):
        def closure(x=x, y=y):
            return torch.nn.functional.cross_entropy(net(x), y)
        if i < 4:
            opt.step(closure)
            continue
        assert opt.phase != MEASURING
        with Count():
            opt.step(closure)
    assert Count.n == 0, f"{Count.n} host reads in training steps"


@pytest.mark.cuda
def test_cuda_sync_debug_mode_error():
    """On a GPU: TRAINING steps raise under sync_debug_mode('error') if anything syncs, and
    a measurement syncs at most twice."""
    import warnings
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
        if opt.phase == MEASURING or opt.updates - opt._last_end >= opt.hyper.reuse_updates:
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


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["SGD", "NSGD"])
def test_cuda_trajectory_matches_eager(mode):
    ref = trajectory("eager", mode=mode, momentum=0.9)
    out = trajectory("triton", mode=mode, momentum=0.9)
    _compare(ref, out, f"cuda {mode}")
