"""LABPAL under the real Lightning Trainer (automatic optimization), against LABPAL run
directly on the same batches (the oracle): the same parameters, the measured learning rate in
LearningRateMonitor's CSV log, every batch logged once with its first evaluation's loss."""
import csv
import math

import lightning.pytorch as L  # the [integrations] extra (make setup installs it)
import pytest
import torch

from labpal_fast import LABPAL
from labpal_fast.integrations.lightning import LABPALCallback
from tests.helpers import closure_for, small_net

STEPS = 24
# m = 2 closure calls per update, a measurement every 3 updates over k·m = 4 calls: several
# measurements (with their line repeats) within STEPS
HYPER = dict(noise_factor=2.0, approximation_batches=2, reuse_updates=3, warmup_updates=4,
             averaging_window=2, sample_positions=(0.0, 0.05, 0.2))


class Net(L.LightningModule):
    def __init__(self, scheduler=None, **hyper):
        super().__init__()
        self.net = small_net(seed=3, dropout=0.2)
        self.scheduler = scheduler
        self.hyper = dict(HYPER, **hyper)
        self.training_steps = 0  # training_step calls, line repeats included

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        opt = LABPAL(self.parameters(), model=self, **self.hyper)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler(opt)}


class Outputs(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def data():
    """Random inputs, labels from a fixed random linear map (learnable)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(STEPS * 16, 6, generator=g)
    return x, (x @ torch.randn(6, 3, generator=g)).argmax(1)


def loader():
    x, y = data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def oracle(dtype=torch.float32, **hyper):
    """LABPAL run directly (forward-only closures): its losses, the lr before each step, θ.
    The global RNG (dropout) is seeded as before the Lightning run."""
    model = small_net(seed=3, dropout=0.2, dtype=dtype)
    model.train()
    opt = LABPAL(model.parameters(), model=model, **dict(HYPER, **hyper))
    losses, lrs = [], []
    torch.manual_seed(5)
    for x, y in loader():
        x = x.to(dtype)
        lrs.append(float(opt.param_groups[0]["lr"]))
        losses.append(opt.step(closure_for(model, x, y)).item())
    return losses, lrs, list(model.parameters()), opt.measurements()


def fit(tmp_path, module, callbacks=(), **trainer_args):
    logger = L.loggers.CSVLogger(tmp_path, name="run")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=logger,
                        callbacks=[LABPALCallback(), *callbacks], log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, **trainer_args)
    torch.manual_seed(5)
    trainer.fit(module, train_dataloaders=loader())
    return trainer, logger


def read_columns(path):
    """{column: [(step, value), ...]} of a CSVLogger metrics.csv, empty cells left out."""
    columns = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if name != "step" and value != "":
                    columns.setdefault(name, []).append((int(row["step"]), float(value)))
    return {name: [v for _, v in sorted(pairs)] for name, pairs in columns.items()}


def test_automatic_optimization_trains_as_labpal_directly(tmp_path):
    losses, lrs, params, measurements = oracle()
    assert len(measurements) >= 3 and sum(r["valid"] for r in measurements) >= 2
    # the rate changes (0 until the first measurement; the measured s_upd after it): a stale
    # or constant lr would be told apart
    assert len(set(lrs)) >= 2 and lrs[0] == 0 < lrs[-1]

    module, outputs = Net(), Outputs()
    monitor = L.callbacks.LearningRateMonitor(logging_interval="step")
    trainer, logger = fit(tmp_path, module, callbacks=[monitor, outputs])
    opt = trainer.optimizers[0]
    assert opt.updates > 0 and len(opt.measurements()) == len(measurements)
    # the repeats ran training_step again (that is what the callback guards against)
    assert module.training_steps > STEPS
    for mine, ref in zip(module.net.parameters(), params):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)

    logged = read_columns(f"{logger.log_dir}/metrics.csv")
    # LearningRateMonitor logs param_groups[0]["lr"] before each batch: the measured rate
    assert logged["lr-LABPAL"] == pytest.approx(lrs, rel=1e-12)
    assert [float(v) for v in monitor.lrs["lr-LABPAL"]] == pytest.approx(lrs, rel=1e-12)
    # once per batch, the first evaluation's loss (a repeat would overwrite it with the loss
    # at another line position, and add to the epoch mean)
    assert logged["train_loss_step"] == pytest.approx(losses, rel=1e-6)
    assert logged["train_loss_epoch"] == pytest.approx([sum(losses) / STEPS], rel=1e-5)
    assert outputs.losses == pytest.approx(losses, rel=1e-6)
    assert "log" not in vars(module) and "optimizer_step" not in vars(module)  # unwrapped

    x, y = data()  # and it learned
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(small_net(seed=3).eval()(x), y)
        after = torch.nn.functional.cross_entropy(module.net.eval()(x), y)
    assert after < 0.8 * before


def test_bf16_mixed_trains(tmp_path):
    module = Net()
    trainer, logger = fit(tmp_path, module, precision="bf16-mixed")
    records = trainer.optimizers[0].measurements()
    assert len(records) >= 3 and all(r["valid"] for r in records)
    assert len(read_columns(f"{logger.log_dir}/metrics.csv")["train_loss_step"]) == STEPS
    x, y = data()
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(small_net(seed=3).eval()(x), y)
        after = torch.nn.functional.cross_entropy(module.net.eval()(x), y)
    assert after < 0.8 * before


def test_fp16_true_with_loss_scaling_trains_as_labpal_directly(tmp_path):
    """precision="16-true" (fp16 parameters, Lightning's closure runs backward itself) with
    LABPAL's dynamic loss scale: the callback's scaled backward gives the parameters of LABPAL
    run directly on the fp16 model, where LABPAL runs the scaled backward itself."""
    losses, lrs, params, measurements = oracle(torch.float16, loss_scale="dynamic")
    # fp16 overflows at the first scale 2**16 (an update skipped, the scale halved), then trains
    assert sum(r["valid"] for r in measurements) >= 2 and len(set(lrs)) >= 2

    module = Net(loss_scale="dynamic")
    trainer, logger = fit(tmp_path, module, precision="16-true")
    opt = trainer.optimizers[0]
    assert next(module.net.parameters()).dtype == torch.float16
    assert opt.updates > 0 and len(opt.measurements()) == len(measurements)
    for mine, ref in zip(module.net.parameters(), params):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    assert read_columns(f"{logger.log_dir}/metrics.csv")["train_loss_step"] == pytest.approx(
        losses, rel=1e-3)
    assert "backward" not in vars(module)  # unwrapped after the fit

    x, y = data()
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(small_net(seed=3).eval()(x), y)
        after = torch.nn.functional.cross_entropy(module.net.float().eval()(x), y)
    assert after < 0.8 * before


def test_fp16_true_without_the_callback_names_scale_loss(tmp_path):
    """Lightning's closure runs backward on the unscaled loss: LABPAL refuses to unscale a
    gradient that was never scaled, and names the fix."""
    module = Net(loss_scale="dynamic")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, precision="16-true")
    with pytest.raises(RuntimeError, match="scale_loss"):
        trainer.fit(module, train_dataloaders=loader())
    assert module.training_steps == 1


@pytest.mark.parametrize("trainer_args, match", [
    (dict(accumulate_grad_batches=2), "accumulate_grad_batches"),
    (dict(gradient_clip_val=1.0), "max_grad_norm"),
])
def test_unsupported_trainer_settings_raise(tmp_path, trainer_args, match):
    module = Net()
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, module, **trainer_args)
    assert module.training_steps == 0


def test_fp16_grad_scaler_raises(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = Net()
    with pytest.raises(ValueError, match="GradScaler"):
        fit(tmp_path, module, plugins=[MixedPrecision("16-mixed", "cpu")])
    assert module.training_steps == 0


def test_lr_scheduler_raises(tmp_path):
    module = Net(scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5))
    with pytest.raises((ValueError, TypeError, RuntimeError), match="(?i)schedul"):
        fit(tmp_path, module)
    assert module.training_steps == 0


def test_accumulation_without_the_callback_is_refused_naming_it():
    """accumulate_grad_batches=2 without LABPALCallback: Lightning runs the first batch's
    backward outside step(); the step that would add it to its own gradient refuses."""
    module = Net()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accumulate_grad_batches=2)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(RuntimeError, match="outside LABPAL.step.*LABPALCallback"):
        trainer.fit(module, train_dataloaders=loader())
    assert module.training_steps == 1  # the accumulated batch; the step refused before its own
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


def test_lightnings_optimizer_to_device_keeps_the_state_live():
    """Lightning moves optimizer state through opt.state (as at the start of a fit): LABPAL's
    entries are its buffers' views; moved to their own device they stay those views, and
    training goes on as without the move."""
    from lightning.fabric.utilities.optimizer import _optimizer_to_device

    def trained(move):
        model = small_net(seed=3)
        opt = LABPAL(model.parameters(), **dict(HYPER, momentum=0.5))
        batches = list(loader())
        for i, (x, y) in enumerate(batches):
            if move and i == 9:
                seen = {id(v) for s in opt.state.values() for v in s.values()}
                _optimizer_to_device(opt, torch.device("cpu"))
                assert len(seen) == 2 * len(list(model.parameters()))  # direction, grad_sum
                flat = opt.flats[0]
                d = opt.state[model[0].weight]["momentum_buffer"]
                assert d.data_ptr() == flat.direction.data_ptr()
            opt.step(closure_for(model, x, y))
        return list(model.parameters())

    for a, b in zip(trained(True), trained(False)):
        assert torch.equal(a, b)


def test_reduce_lr_on_plateau_scales_the_measured_rate(tmp_path):
    """ReduceLROnPlateau (stepped by Lightning on the logged loss) with the callback: it assigns
    param_groups' lr, which LABPAL takes as a factor on its measured rate."""
    plateau = lambda opt: {  # noqa: E731
        "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
        "monitor": "train_loss_step", "interval": "step"}
    module = Net(scheduler=plateau)
    trainer, _ = fit(tmp_path, module)
    opt = trainer.optimizers[0]
    assert opt.rate.factor < 1 and math.log2(opt.rate.factor) == round(math.log2(opt.rate.factor))
    assert opt.line.multiplier < 1  # the updates used it (the last assignment: from the next)
    _, lrs, params, _ = oracle()
    assert not all(torch.equal(a, b) for a, b in zip(module.net.parameters(), params))
