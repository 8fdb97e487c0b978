"""Integrations (the ``integrations`` extra): TensorBoard, PyTorch Lightning, torch.compile."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import adaptive_lr
from adaptive_lr.lightning import AdaptiveLRMonitor

STEPS = 12


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


def data(n: int = 256, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


# --- TensorBoard ----------------------------------------------------------------------


def test_tensorboard_writer_gets_lr_momentum_grad_norm_curvature_and_events(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = make_model()
    writer = SummaryWriter(tmp_path)
    opt = adaptive_lr.wrap(
        torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9),
        callback=adaptive_lr.ScalarWriterCallback(writer),
    )
    x, y = data()
    for step in range(STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[step * 16 : (step + 1) * 16]), y[step * 16 : (step + 1) * 16])
        loss.backward()
        opt.step(loss=loss)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("lr", "lr_multiplier", "momentum", "grad_norm", "curvature", "loss"):
        assert f"adaptive_lr/{name}" in tags
    lrs = events.Scalars("adaptive_lr/lr")
    assert [e.step for e in lrs] == [r.step for r in opt.history]
    assert [e.value for e in lrs] == pytest.approx([r.lr for r in opt.history], rel=1e-6)
    logged_events = {tag.rsplit("/", 1)[1] for tag in tags if tag.startswith("adaptive_lr/event/")}
    assert logged_events == {r.event for r in opt.history if r.event}
    assert logged_events  # lr = 1 on this model triggers the guards


def test_scalar_writer_callback_rejects_a_writer_without_add_scalar() -> None:
    with pytest.raises(TypeError, match="add_scalar"):
        adaptive_lr.ScalarWriterCallback(object())


# --- PyTorch Lightning ----------------------------------------------------------------


class Classifier(lightning.LightningModule):
    def __init__(self, with_scheduler: bool) -> None:
        super().__init__()
        self.net = make_model()
        self.with_scheduler = with_scheduler

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = adaptive_lr.wrap(torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9))
        if not self.with_scheduler:
            return opt
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _trainer(tmp_path: Path, epochs: int) -> lightning.Trainer:
    return lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=lightning.pytorch.loggers.CSVLogger(tmp_path),
        callbacks=[AdaptiveLRMonitor()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        deterministic=True,
    )


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(*data()), batch_size=32, shuffle=False)


@pytest.mark.parametrize("with_scheduler", [False, True])
def test_lightning_fit_steps_the_wrapped_optimizer_and_logs_its_signals(
    tmp_path: Path, with_scheduler: bool
) -> None:
    module = Classifier(with_scheduler)
    trainer = _trainer(tmp_path, epochs=2)
    trainer.fit(module, _loader())
    opt = trainer.optimizers[0]
    assert isinstance(opt, adaptive_lr.AdaptiveOptimizer)
    assert opt.history[-1].step == 2 * len(_loader())
    assert opt.history[-1].loss is not None  # Lightning's closure hands the loss over
    metrics = trainer.logged_metrics
    for name in ("lr", "momentum", "grad_norm"):
        assert f"adaptive_lr/{name}" in metrics
    assert float(metrics["adaptive_lr/lr"]) == pytest.approx(opt.history[-1].lr)
    if with_scheduler:
        # The scheduler was stepped on the wrapper: the group's lr is the cosine value.
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        assert opt.param_groups[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0])
        assert opt.param_groups[0]["lr"] < 0.5


def test_lightning_checkpoint_save_and_resume_restores_the_controller(tmp_path: Path) -> None:
    first = _trainer(tmp_path / "a", epochs=1)
    module = Classifier(with_scheduler=True)
    first.fit(module, _loader())
    path = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(path)
    saved = first.optimizers[0]
    state_after_one = (saved.history[-1].step, saved.lr_multiplier)

    resumed = _trainer(tmp_path / "b", epochs=2)
    resumed.fit(Classifier(with_scheduler=True), _loader(), ckpt_path=str(path))
    opt = resumed.optimizers[0]
    first_resumed = opt.history[0]
    assert first_resumed.step == state_after_one[0] + 1  # the controller's step counter continued

    straight = _trainer(tmp_path / "c", epochs=2)
    straight.fit(Classifier(with_scheduler=True), _loader())
    reference = straight.optimizers[0]
    assert opt.lr_multiplier == reference.lr_multiplier
    assert [r.lr for r in list(reference.history)[len(_loader()) :]] == [r.lr for r in opt.history]


# --- torch.compile --------------------------------------------------------------------


def test_a_compiled_model_trains_under_the_wrapped_optimizer_like_the_eager_one() -> None:
    """torch.compile (default inductor backend) on the model; the optimizer step stays eager."""
    x, y = data()

    def run(compiled: bool) -> tuple[list[float], adaptive_lr.AdaptiveOptimizer]:
        model = make_model()
        forward = torch.compile(model) if compiled else model
        opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
        losses = []
        for step in range(STEPS):
            opt.zero_grad()
            loss = F.cross_entropy(forward(x[step * 16 : (step + 1) * 16]), y[step * 16 : (step + 1) * 16])
            loss.backward()
            opt.step(loss=loss)
            losses.append(loss.item())
        return losses, opt

    eager_losses, eager = run(compiled=False)
    compiled_losses, compiled = run(compiled=True)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-6)
    # Compiled kernels round differently: a cap that binds by a hair may bind one step
    # apart, so the decisions are compared as numbers, not as event labels.
    for a, b in zip(compiled.history, eager.history, strict=True):
        assert a.lr_multiplier == pytest.approx(b.lr_multiplier, rel=1e-3)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
    assert compiled_losses[-1] < compiled_losses[0]
