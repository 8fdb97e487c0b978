"""The task registry: what is trained, each small enough for a CPU.

A `Task` builds a `Problem` for a seed: the model, one epoch of minibatches at a time, the
differentiable minibatch loss, the full training objective and a held-out metric. The
seed varies the model's initialisation, the batch order and the gradient noise; the data
of a task are fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from adaptive_lr import seed as seed_scenario


@dataclass(frozen=True)
class Problem:
    """One task instance, ready to train."""

    model: nn.Module
    steps_per_epoch: int
    epoch_batches: Callable[[], Iterator[Any]]
    """A fresh epoch of minibatches (a new order every call)."""
    batch_loss: Callable[[Any], Tensor]
    """The differentiable loss on one minibatch."""
    training_loss: Callable[[], float]
    """The full training objective, without gradient."""
    heldout_metric: Callable[[], float]
    """The task's held-out metric (see `Task.heldout_metric`)."""


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    target_loss: float
    """`steps_to_target` counts optimizer steps until the minibatch loss is at or below this."""
    heldout_metric: str
    """Name of the held-out metric, e.g. "accuracy"."""
    heldout_higher_is_better: bool
    build: Callable[[int], Problem]


# --- the seed article's network -------------------------------------------------------

SEED_TRAIN_SIZE = 2048
SEED_HELDOUT_SIZE = 1024
SEED_BATCH_SIZE = 64
SEED_DATA_SEED = 0


def _seed_problem(init: str, seed: int) -> Problem:
    # One draw split in two: `seed_data` draws its teacher from the same seed, so a
    # held-out set drawn with another seed would be a different task.
    inputs, labels = seed_scenario.seed_data(SEED_TRAIN_SIZE + SEED_HELDOUT_SIZE, seed=SEED_DATA_SEED)
    train_x, train_y = inputs[:SEED_TRAIN_SIZE], labels[:SEED_TRAIN_SIZE]
    heldout_x, heldout_y = inputs[SEED_TRAIN_SIZE:], labels[SEED_TRAIN_SIZE:]
    model = seed_scenario.seed_network(init=init, generator_seed=seed)
    generator = torch.Generator().manual_seed(seed)

    def epoch_batches() -> Iterator[Tensor]:
        order = torch.randperm(SEED_TRAIN_SIZE, generator=generator)
        for start in range(0, SEED_TRAIN_SIZE, SEED_BATCH_SIZE):
            yield order[start : start + SEED_BATCH_SIZE]

    def batch_loss(batch: Tensor) -> Tensor:
        return F.cross_entropy(model(train_x[batch]), train_y[batch])

    return Problem(
        model=model,
        steps_per_epoch=-(-SEED_TRAIN_SIZE // SEED_BATCH_SIZE),
        epoch_batches=epoch_batches,
        batch_loss=batch_loss,
        training_loss=lambda: seed_scenario.evaluate(model, train_x, train_y)[0],
        heldout_metric=lambda: seed_scenario.evaluate(model, heldout_x, heldout_y)[1],
    )


# --- the noisy quadratic -------------------------------------------------------------

QUADRATIC_DIMENSION = 50
QUADRATIC_EIGENVALUES = torch.logspace(-2, 0, QUADRATIC_DIMENSION, dtype=torch.float64)
"""Spectrum of A: log-spaced in [0.01, 1] (condition number 100, lambda_max = 1)."""
QUADRATIC_GRADIENT_NOISE = 0.1
"""Standard deviation of the additive Gaussian noise on each gradient coordinate."""
QUADRATIC_STEPS_PER_EPOCH = 100


class _QuadraticPoint(nn.Module):
    def __init__(self, start: Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(start.clone())


def _quadratic_problem(seed: int) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(QUADRATIC_DIMENSION, generator=generator, dtype=torch.float64)
    model = _QuadraticPoint(start)
    eigenvalues = QUADRATIC_EIGENVALUES

    def objective() -> Tensor:
        return 0.5 * (eigenvalues * model.x**2).sum()

    def epoch_batches() -> Iterator[Tensor]:
        for _ in range(QUADRATIC_STEPS_PER_EPOCH):
            yield QUADRATIC_GRADIENT_NOISE * torch.randn(
                QUADRATIC_DIMENSION, generator=generator, dtype=torch.float64
            )

    def batch_loss(noise: Tensor) -> Tensor:
        # Value f(x), gradient A x + noise: the noise is in the gradient only, so the loss
        # the optimizer sees (and `steps_to_target`) is the exact objective.
        perturbation = (noise * model.x).sum()
        return objective() + perturbation - perturbation.detach()

    def training_loss() -> float:
        with torch.no_grad():
            return objective().item()

    def distance_to_optimum() -> float:
        with torch.no_grad():
            return model.x.norm().item()

    return Problem(
        model=model,
        steps_per_epoch=QUADRATIC_STEPS_PER_EPOCH,
        epoch_batches=epoch_batches,
        batch_loss=batch_loss,
        training_loss=training_loss,
        heldout_metric=distance_to_optimum,
    )


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="seed_he",
            description="the seed's 10-layer ReLU network (8 -> 20 x9 -> 3), He initialisation",
            target_loss=0.3,
            heldout_metric="accuracy",
            heldout_higher_is_better=True,
            build=lambda seed: _seed_problem("he", seed),
        ),
        Task(
            name="seed_default",
            description="the seed's network with PyTorch's default init (gradients vanish)",
            target_loss=0.3,
            heldout_metric="accuracy",
            heldout_higher_is_better=True,
            build=lambda seed: _seed_problem("default", seed),
        ),
        Task(
            name="noisy_quadratic",
            description=(
                "f(x) = x'Ax/2, d = 50, eigenvalues log-spaced in [0.01, 1], additive gradient "
                "noise N(0, 0.1^2 I), x0 ~ N(0, I); heavy-ball SGD with momentum 0.9 is stable "
                "for lr < 2(1 + 0.9)/lambda_max = 3.8, plain GD for lr < 2"
            ),
            target_loss=0.1,
            heldout_metric="distance_to_optimum",
            heldout_higher_is_better=False,
            build=_quadratic_problem,
        ),
    )
}
