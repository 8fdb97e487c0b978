"""The method registry: name -> how to build the optimizer for a run.

A `Method` builds a `Setup` from the parameters, the initial learning rate and the run's
length: the optimizer, an optional scheduler stepped after every optimizer step, and an
optional gradient-norm clip the runner applies after backward. Peers from PyPI name the
module they need in ``requires``; when it is not importable the runner reports the method
as skipped instead of failing.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

import adaptive_lr
from adaptive_lr.options import COMPONENTS
from adaptive_lr.telemetry import HistoryCallback

MOMENTUM = 0.9


@dataclass
class Setup:
    optimizer: Optimizer
    scheduler: LRScheduler | None = None
    """Stepped once after every optimizer step."""
    clip_grad_norm: float | None = None
    """If set, the runner clips the global gradient norm to this value before each step."""


Builder = Callable[..., Setup]
"""``build(params, lr, *, total_steps, callback) -> Setup``; ``callback`` receives the
controller's `StepRecord`s (adaptive methods only)."""


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    build: Builder
    requires: str | None = None
    """Module an optional peer package provides (e.g. "prodigyopt"); None for built-ins."""
    adaptive: bool = False
    """Wraps the base optimizer in adaptive_lr (its controller events are recorded)."""

    def missing_requirement(self) -> str | None:
        """Why this method cannot run here, or None if it can."""
        if self.requires is None or importlib.util.find_spec(self.requires) is not None:
            return None
        return f"package providing {self.requires!r} is not installed (pip install -e .[experiments])"


def _sgd_momentum(params: list[Tensor], lr: float, **_: Any) -> Setup:
    return Setup(torch.optim.SGD(params, lr=lr, momentum=MOMENTUM))


def _sgd_cosine(params: list[Tensor], lr: float, *, total_steps: int, **_: Any) -> Setup:
    optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    return Setup(optimizer, scheduler=CosineAnnealingLR(optimizer, T_max=max(total_steps, 1)))


def _adam(params: list[Tensor], lr: float, **_: Any) -> Setup:
    return Setup(torch.optim.Adam(params, lr=lr))


def _sgd_clip(params: list[Tensor], lr: float, **_: Any) -> Setup:
    return Setup(torch.optim.SGD(params, lr=lr, momentum=MOMENTUM), clip_grad_norm=1.0)


def _adaptive(base: str, **switches: bool) -> Builder:
    def build(params: list[Tensor], lr: float, *, callback: HistoryCallback, **_: Any) -> Setup:
        if base == "sgd":
            optimizer: Optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
        else:
            optimizer = torch.optim.Adam(params, lr=lr)
        return Setup(adaptive_lr.wrap(optimizer, callback=callback, **switches))

    return build


def _prodigy(params: list[Tensor], lr: float, **_: Any) -> Setup:
    prodigyopt = importlib.import_module("prodigyopt")
    return Setup(prodigyopt.Prodigy(params, lr=lr))


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("sgd_momentum", "SGD, momentum 0.9, constant lr", _sgd_momentum),
        Method("sgd_cosine", "SGD, momentum 0.9, cosine decay to 0 over the run", _sgd_cosine),
        Method("adam", "Adam, default betas, constant lr", _adam),
        Method("sgd_clip", "SGD, momentum 0.9, gradient norm clipped to 1.0", _sgd_clip),
        Method(
            "adaptive_sgd", "adaptive_lr over SGD momentum 0.9, defaults", _adaptive("sgd"), adaptive=True
        ),
        Method("adaptive_adam", "adaptive_lr over Adam, defaults", _adaptive("adam"), adaptive=True),
        *(
            Method(
                f"adaptive_sgd_no_{component}",
                f"adaptive_sgd with {component} switched off",
                _adaptive("sgd", **{component: False}),
                adaptive=True,
            )
            for component in COMPONENTS
        ),
        Method(
            "prodigy",
            "Prodigy (prodigyopt); the grid lr is its lr multiplier (default 1.0)",
            _prodigy,
            requires="prodigyopt",
        ),
    )
}
