"""Mixed precision on CPU: GradScaler (fp16-style loss scaling) and bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import adaptive_lr


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(n: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 4, generator=generator)
        yield x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def test_grad_scaler_with_unscale_before_clipping_reads_unscaled_gradients_once() -> None:
    """The AMP recipe with clipping: scaler.unscale_(opt), clip, scaler.step(opt)."""
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in batches(6):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        unscaled = nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf")).item()
        scaler.step(opt, loss=loss)
        scaler.update()
        assert opt.history[-1].grad_norm == pytest.approx(unscaled, rel=1e-6)
        assert opt.history[-1].loss == pytest.approx(loss.item())
    assert len(opt.history) == 6 and all(r.event != "skip" for r in opt.history)


def test_grad_scaler_overflow_does_not_disturb_the_controller_statistics() -> None:
    """A skipped overflow step leaves the controller's state exactly as before it."""
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    data = list(batches(5))
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if i == 3:
            before = opt._controller_state
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt, loss=loss)
        scaler.update()
        if i == 3:
            assert opt._controller_state is before  # never reached the controller
    assert scaler.get_scale() < 2.0**12  # the scaler backed off instead
    assert all(r.event not in ("spike", "skip") for r in opt.history)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_bf16_autocast_trains_with_finite_float32_parameters(base: str) -> None:
    model = make_model()
    inner = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if base == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=1e-2)
    )
    opt = adaptive_lr.wrap(inner)
    data = list(batches(40))
    with torch.no_grad():
        x0, y0 = data[0]
        start = F.cross_entropy(model(x0), y0).item()
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            assert logits.dtype == torch.bfloat16
            loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step(loss=loss)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        end = F.cross_entropy(model(x0), y0).item()
    assert end < start
    assert all(r.grad_norm > 0 for r in opt.history)
