"""The seed article's scenario: a deep, narrow ReLU network on a small synthetic task.

The network has 10 Linear layers, 8 -> 20 -> ... -> 20 -> 3 (nine hidden layers of width
20), with ReLU between layers. With He initialisation it trains at lr = 0.01, but plain
SGD with momentum 0.9 at lr = 1 diverges within a few steps (seed 0) or collapses to a
constant prediction (some other seeds). With PyTorch's default initialisation the signal
shrinks by about 6x in variance per layer, the gradients of the early layers vanish and
the network does not learn. The demo, the tests and the experiments share this
module so that they all run the same scenario.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

INPUT_SIZE = 8
HIDDEN_SIZE = 20
OUTPUT_SIZE = 3
LINEAR_LAYERS = 10
INITS = ("he", "default")


def seed_network(*, init: str = "he", generator_seed: int = 0) -> nn.Sequential:
    """The seed article's network: 10 Linear layers 8 -> 20 (x9) -> 3, ReLU between them.

    Args:
        init: "he" draws every weight from N(0, 2 / fan_in) (``kaiming_normal_`` with
            ``nonlinearity="relu"``) and zeroes the biases; "default" keeps PyTorch's
            ``nn.Linear`` initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), under which
            the variance of the signal is multiplied by about 1/6 per layer, so the
            gradients vanish and the network does not learn.
        generator_seed: the weights are a function of this seed alone; the caller's global
            RNG state is left untouched.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    sizes = [INPUT_SIZE] + [HIDDEN_SIZE] * (LINEAR_LAYERS - 1) + [OUTPUT_SIZE]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            linear = nn.Linear(fan_in, fan_out)
            if init == "he":
                nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
                nn.init.zeros_(linear.bias)
            layers.append(linear)
            if i < LINEAR_LAYERS - 1:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def seed_data(n: int = 2048, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A 3-class task from a random linear teacher: X ~ N(0, I_8), y = argmax(X @ W_teacher).

    ``W_teacher`` (8 x 3) and X are drawn from a ``torch.Generator`` seeded with ``seed``,
    so the data are a function of (n, seed) alone. Returns X (n x 8, float32) and y (n,
    int64). The classes are separable by a linear map, so a network that learns reaches
    high accuracy; one that does not stays near the majority-class rate.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(INPUT_SIZE, OUTPUT_SIZE, generator=generator)
    inputs = torch.randn(n, INPUT_SIZE, generator=generator)
    labels = (inputs @ teacher).argmax(dim=1)
    return inputs, labels


@dataclass(frozen=True)
class TrainResult:
    """Outcome of `train`: losses are full-data mean cross-entropy [nats]."""

    final_loss: float
    """After training; inf if the run diverged."""
    accuracy: float
    """Fraction of the data classified correctly after training (0 if diverged)."""
    diverged: bool
    """A training loss was non-finite or above the divergence threshold at some step."""
    steps: int
    """Optimizer steps taken (training stops at the step that diverged)."""
    initial_loss: float
    """Before the first step."""


def train(
    model: nn.Module,
    optimizer: Optimizer,
    inputs: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    seed: int = 0,
    divergence_threshold: float = 1e6,
    progress: Callable[[int, float], None] | None = None,
    scheduler: LRScheduler | None = None,
) -> TrainResult:
    """Minibatch training with cross-entropy; the same call for a bare or a wrapped optimizer.

    Each step is ``optimizer.step(closure)``, so an ``AdaptiveOptimizer`` sees the loss.
    Batches are reshuffled every epoch by a ``torch.Generator`` seeded with ``seed``, so a
    run is a function of its arguments. ``progress``, if given, is called after every step
    with (steps taken, minibatch loss). ``scheduler``, if given, is stepped after every
    optimizer step (build it on the optimizer passed here, wrapped or not).
    """
    if epochs < 0:
        raise ValueError(f"epochs must be non-negative, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    initial_loss, _ = evaluate(model, inputs, labels)
    steps = 0
    n = len(inputs)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]

            def closure(batch: Tensor = batch) -> Tensor:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(inputs[batch]), labels[batch])
                loss.backward()
                return loss

            loss = optimizer.step(closure).detach().item()
            steps += 1
            if scheduler is not None:
                scheduler.step()
            if progress is not None:
                progress(steps, loss)
            if not math.isfinite(loss) or loss > divergence_threshold:
                return TrainResult(math.inf, 0.0, True, steps, initial_loss)
    final_loss, accuracy = evaluate(model, inputs, labels)
    if not math.isfinite(final_loss) or final_loss > divergence_threshold:
        return TrainResult(math.inf, 0.0, True, steps, initial_loss)
    return TrainResult(final_loss, accuracy, False, steps, initial_loss)


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, labels: Tensor) -> tuple[float, float]:
    """Full-data mean cross-entropy and accuracy."""
    logits = model(inputs)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    return loss, accuracy
