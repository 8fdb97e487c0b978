"""The method registry: name -> how to build the optimizer for a run.

A `Method` builds a `Setup` from the parameters, the initial learning rate and the run's
length: the optimizer, optional schedulers (one stepped after every optimizer step, one
stepped once per epoch with the epoch's training loss), an optional gradient hook the
runner calls after backward and before the optimizer step (clipping), and whether the
optimizer needs ``train()``/``eval()`` around evaluation (Schedule-Free). Peers from PyPI
name the module they need in ``requires``; when it is not importable the runner reports
the method as skipped instead of failing.

For the parameter-free peers (Prodigy, D-Adaptation, DoG) the grid lr is passed as their
``lr``, a multiplier on the step size they estimate whose default is 1.0, so the grid
sweeps that multiplier and the grid point lr=1 is each one's default. Schedule-Free's
``lr`` is an ordinary learning rate (defaults 1.0 for SGD, 0.0025 for AdamW).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    ExponentialLR,
    LRScheduler,
    MultiStepLR,
    OneCycleLR,
    ReduceLROnPlateau,
)

import adaptive_lr
from adaptive_lr.options import COMPONENTS
from adaptive_lr.telemetry import HistoryCallback

MOMENTUM = 0.9
CLIP_NORM = 1.0
"""Global gradient-norm bound of the fixed-threshold clipping baselines."""
WEIGHT_DECAY_SGD = 5e-4
WEIGHT_DECAY_ADAMW = 0.01
EXPONENTIAL_FINAL_FACTOR = 1e-2
"""`sgd_exponential` decays the lr to this fraction of its initial value over the run."""
STEP_MILESTONES = (0.5, 0.75)
"""`sgd_step` multiplies the lr by 0.1 at these fractions of the run."""
PLATEAU_FACTOR = 0.1
PLATEAU_PATIENCE = 5
"""Epochs without a relative improvement of 1e-4 (torch's default) before the lr drops."""
AUTOCLIP_PERCENTILE = 10
AUTOCLIP_HISTORY = 10**9
"""AutoClip keeps the whole history of gradient norms; no run is this long."""


@dataclass
class Setup:
    optimizer: Optimizer
    scheduler: LRScheduler | None = None
    """Stepped once after every optimizer step."""
    epoch_scheduler: ReduceLROnPlateau | None = None
    """Stepped once after every epoch with that epoch's full training loss."""
    gradient_hook: Callable[[], object] | None = None
    """Called after backward and before every optimizer step, e.g. to clip the gradients."""
    train_eval_modes: bool = False
    """The optimizer has ``train()``/``eval()`` (Schedule-Free): the runner calls ``train()``
    before training and brackets every evaluation of the loss or held-out metric by
    ``eval()`` ... ``train()``."""


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


# --- torch built-ins ------------------------------------------------------------------


def _sgd(params: list[Tensor], lr: float, **options: Any) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, **options)


def _clip(params: list[Tensor]) -> Callable[[], object]:
    return functools.partial(torch.nn.utils.clip_grad_norm_, params, CLIP_NORM)


def _sgd_constant(params: list[Tensor], lr: float, **_: Any) -> Setup:
    return Setup(_sgd(params, lr))


def _sgd_momentum(params: list[Tensor], lr: float, **_: Any) -> Setup:
    return Setup(_sgd(params, lr, momentum=MOMENTUM))


def _sgd_nesterov(params: list[Tensor], lr: float, **_: Any) -> Setup:
    return Setup(_sgd(params, lr, momentum=MOMENTUM, nesterov=True))


def _sgd_weight_decay(params: list[Tensor], lr: float, **_: Any) -> Setup:
    return Setup(_sgd(params, lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY_SGD))


def _sgd_step(params: list[Tensor], lr: float, *, total_steps: int, **_: Any) -> Setup:
    optimizer = _sgd(params, lr, momentum=MOMENTUM)
    milestones = [max(round(fraction * total_steps), 1) for fraction in STEP_MILESTONES]
    return Setup(optimizer, scheduler=MultiStepLR(optimizer, milestones=milestones, gamma=0.1))


def _sgd_exponential(params: list[Tensor], lr: float, *, total_steps: int, **_: Any) -> Setup:
    optimizer = _sgd(params, lr, momentum=MOMENTUM)
    gamma = EXPONENTIAL_FINAL_FACTOR ** (1 / max(total_steps, 1))
    return Setup(optimizer, scheduler=ExponentialLR(optimizer, gamma=gamma))


def _sgd_cosine(params: list[Tensor], lr: float, *, total_steps: int, **_: Any) -> Setup:
    optimizer = _sgd(params, lr, momentum=MOMENTUM)
    return Setup(optimizer, scheduler=CosineAnnealingLR(optimizer, T_max=max(total_steps, 1)))


def _sgd_one_cycle(params: list[Tensor], lr: float, *, total_steps: int, **_: Any) -> Setup:
    optimizer = _sgd(params, lr, momentum=MOMENTUM)
    # The runner steps the scheduler after every optimizer step, i.e. total_steps times,
    # which is exactly what OneCycleLR allows.
    scheduler = OneCycleLR(optimizer, max_lr=lr, total_steps=max(total_steps, 1), cycle_momentum=True)
    return Setup(optimizer, scheduler=scheduler)


def _sgd_plateau(params: list[Tensor], lr: float, **_: Any) -> Setup:
    optimizer = _sgd(params, lr, momentum=MOMENTUM)
    plateau = ReduceLROnPlateau(optimizer, mode="min", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE)
    return Setup(optimizer, epoch_scheduler=plateau)


def _sgd_clip(params: list[Tensor], lr: float, **_: Any) -> Setup:
    return Setup(_sgd(params, lr, momentum=MOMENTUM), gradient_hook=_clip(params))


def _sgd_clip_cosine(params: list[Tensor], lr: float, *, total_steps: int, **_: Any) -> Setup:
    setup = _sgd_cosine(params, lr, total_steps=total_steps)
    setup.gradient_hook = _clip(params)
    return setup


def _adam(params: list[Tensor], lr: float, **_: Any) -> Setup:
    return Setup(torch.optim.Adam(params, lr=lr))


def _adamw(params: list[Tensor], lr: float, **_: Any) -> Setup:
    return Setup(torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY_ADAMW))


def _adagrad(params: list[Tensor], lr: float, **_: Any) -> Setup:
    return Setup(torch.optim.Adagrad(params, lr=lr))


# --- adaptive_lr ----------------------------------------------------------------------


def _adaptive(base: str, *, cosine: bool = False, **switches: bool) -> Builder:
    def build(
        params: list[Tensor], lr: float, *, total_steps: int, callback: HistoryCallback, **_: Any
    ) -> Setup:
        if base == "sgd":
            optimizer: Optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
        else:
            optimizer = torch.optim.Adam(params, lr=lr)
        wrapped = adaptive_lr.wrap(optimizer, callback=callback, **switches)
        if not cosine:
            return Setup(wrapped)
        # The user's own schedule on the wrapper: the controller's multiplier scales it.
        return Setup(wrapped, scheduler=CosineAnnealingLR(wrapped, T_max=max(total_steps, 1)))

    return build


# --- published peers (optional packages) ----------------------------------------------


def _prodigy(params: list[Tensor], lr: float, **_: Any) -> Setup:
    prodigyopt = importlib.import_module("prodigyopt")
    return Setup(prodigyopt.Prodigy(params, lr=lr))


def _dadapt_sgd(params: list[Tensor], lr: float, **_: Any) -> Setup:
    dadaptation = importlib.import_module("dadaptation")
    return Setup(dadaptation.DAdaptSGD(params, lr=lr, momentum=MOMENTUM))


def _dadapt_adam(params: list[Tensor], lr: float, **_: Any) -> Setup:
    dadaptation = importlib.import_module("dadaptation")
    return Setup(dadaptation.DAdaptAdam(params, lr=lr))


def _dog(params: list[Tensor], lr: float, **_: Any) -> Setup:
    dog = importlib.import_module("dog")
    # DoG logs a warning whenever lr != 1; the grid sweeps lr on purpose, once per run.
    logger = logging.getLogger(dog.DoG.__module__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        optimizer = dog.DoG(params, lr=lr)
    finally:
        logger.setLevel(level)
    return Setup(optimizer)


def _schedule_free_sgd(params: list[Tensor], lr: float, **_: Any) -> Setup:
    schedulefree = importlib.import_module("schedulefree")
    return Setup(schedulefree.SGDScheduleFree(params, lr=lr), train_eval_modes=True)


def _schedule_free_adamw(params: list[Tensor], lr: float, **_: Any) -> Setup:
    schedulefree = importlib.import_module("schedulefree")
    return Setup(schedulefree.AdamWScheduleFree(params, lr=lr), train_eval_modes=True)


class _Parameters:
    """The minimal module interface `zclip.ZClip.step(model)` reads: parameters() and
    modules() (its FSDP check); a Setup is built from parameters, not from the model."""

    def __init__(self, params: list[Tensor]) -> None:
        self._params = params

    def parameters(self) -> Iterator[Tensor]:
        return iter(self._params)

    def modules(self) -> Iterator[_Parameters]:
        return iter([self])


def _zclip(params: list[Tensor], lr: float, **_: Any) -> Setup:
    zclip = importlib.import_module("zclip")
    # The README's settings, but without its fixed cap max_grad_norm=1.0: with the cap, ZClip
    # clips to 1.0 whenever the norm exceeds it and its runs equal sgd_clip's on these tasks.
    clipper = zclip.ZClip(
        mode="zscore", alpha=0.97, z_thresh=2.5, clip_option="adaptive_scaling", max_grad_norm=None
    )
    return Setup(
        _sgd(params, lr, momentum=MOMENTUM),
        gradient_hook=functools.partial(clipper.step, _Parameters(params)),
    )


def _autoclip(params: list[Tensor], lr: float, **_: Any) -> Setup:
    autoclip_torch = importlib.import_module("autoclip.torch")
    clipper = autoclip_torch.QuantileClip(
        params, quantile=AUTOCLIP_PERCENTILE / 100, history_length=AUTOCLIP_HISTORY, global_threshold=True
    )
    return Setup(_sgd(params, lr, momentum=MOMENTUM), gradient_hook=clipper.step)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        # torch built-ins: the seed article's comparisons
        Method("sgd_constant", "SGD, no momentum, constant lr", _sgd_constant),
        Method("sgd_momentum", "SGD, momentum 0.9, constant lr", _sgd_momentum),
        Method(
            "sgd_step",
            "SGD, momentum 0.9, lr x0.1 at 50% and 75% of the steps (MultiStepLR, stepped per step)",
            _sgd_step,
        ),
        Method(
            "sgd_exponential",
            "SGD, momentum 0.9, ExponentialLR per step reaching 1e-2 x lr at the last step",
            _sgd_exponential,
        ),
        Method("sgd_cosine", "SGD, momentum 0.9, cosine decay to 0 over the run", _sgd_cosine),
        Method(
            "sgd_one_cycle",
            "SGD, OneCycleLR per step: max_lr = grid lr, torch defaults (30% warmup from lr/25, "
            "cosine to lr/1e4, momentum cycled 0.95 -> 0.85 -> 0.95)",
            _sgd_one_cycle,
        ),
        Method(
            "sgd_plateau",
            "SGD, momentum 0.9, ReduceLROnPlateau on the epoch training loss (x0.1 after 5 epochs "
            "without 1e-4 relative improvement)",
            _sgd_plateau,
        ),
        Method("sgd_nesterov", "SGD, Nesterov momentum 0.9, constant lr", _sgd_nesterov),
        Method(
            "sgd_weight_decay", "SGD, momentum 0.9, weight_decay 5e-4 (L2), constant lr", _sgd_weight_decay
        ),
        Method("adam", "Adam, default betas (0.9, 0.999), constant lr", _adam),
        Method("adamw", "AdamW, default betas, decoupled weight_decay 0.01, constant lr", _adamw),
        Method("adagrad", "Adagrad, torch defaults, constant lr", _adagrad),
        Method("sgd_clip", "SGD, momentum 0.9, constant lr, global gradient norm clipped to 1.0", _sgd_clip),
        Method(
            "sgd_clip_cosine",
            "SGD, momentum 0.9, global gradient norm clipped to 1.0, cosine decay to 0 (the tuned schedule)",
            _sgd_clip_cosine,
        ),
        # adaptive_lr and its ablations
        Method(
            "adaptive_sgd", "adaptive_lr over SGD momentum 0.9, defaults", _adaptive("sgd"), adaptive=True
        ),
        Method("adaptive_adam", "adaptive_lr over Adam, defaults", _adaptive("adam"), adaptive=True),
        Method(
            "adaptive_sgd_cosine",
            "adaptive_lr over SGD momentum 0.9, defaults, with the user's CosineAnnealingLR on the wrapper",
            _adaptive("sgd", cosine=True),
            adaptive=True,
        ),
        Method(
            "adaptive_adam_cosine",
            "adaptive_lr over Adam, defaults, with the user's CosineAnnealingLR on the wrapper",
            _adaptive("adam", cosine=True),
            adaptive=True,
        ),
        Method(
            "adaptive_sgd_anneal",
            "adaptive_lr over SGD momentum 0.9 with the experimental stationarity annealing (anneal=True)",
            _adaptive("sgd", anneal=True),
            adaptive=True,
        ),
        *(
            Method(
                f"adaptive_sgd_no_{component}",
                f"adaptive_sgd with {component} switched off",
                _adaptive("sgd", **{component: False}),
                adaptive=True,
            )
            for component in COMPONENTS
        ),
        # published peers
        Method(
            "prodigy",
            "Prodigy (prodigyopt), package defaults; grid lr = its step multiplier (default 1.0)",
            _prodigy,
            requires="prodigyopt",
        ),
        Method(
            "dadapt_sgd",
            "D-Adaptation SGD (dadaptation.DAdaptSGD), momentum 0.9; grid lr = its step multiplier "
            "(default 1.0)",
            _dadapt_sgd,
            requires="dadaptation",
        ),
        Method(
            "dadapt_adam",
            "D-Adaptation Adam (dadaptation.DAdaptAdam), package defaults; grid lr = its step "
            "multiplier (default 1.0)",
            _dadapt_adam,
            requires="dadaptation",
        ),
        Method(
            "dog",
            "DoG (dog-optimizer), reps_rel 1e-6; grid lr = its step multiplier c (default 1.0); "
            "without the recommended iterate averaging",
            _dog,
            requires="dog",
        ),
        Method(
            "schedule_free_sgd",
            "Schedule-Free SGD (schedulefree.SGDScheduleFree), momentum 0.9, no warmup; grid lr = "
            "its lr (package default 1.0); evaluated in eval() mode",
            _schedule_free_sgd,
            requires="schedulefree",
        ),
        Method(
            "schedule_free_adamw",
            "Schedule-Free AdamW (schedulefree.AdamWScheduleFree), betas (0.9, 0.999), no warmup, "
            "no weight decay; grid lr = its lr (package default 0.0025); evaluated in eval() mode",
            _schedule_free_adamw,
            requires="schedulefree",
        ),
        Method(
            "zclip",
            "SGD, momentum 0.9, constant lr, with ZClip (zclip): z-score mode, alpha 0.97, z_thresh 2.5, "
            "adaptive scaling, 25 unclipped warmup steps, no fixed cap (max_grad_norm=None)",
            _zclip,
            requires="zclip",
        ),
        Method(
            "autoclip",
            "SGD, momentum 0.9, constant lr, with AutoClip (autoclip.torch.QuantileClip): global norm "
            "clipped to the 10th percentile of all previous steps' norms (first step unclipped)",
            _autoclip,
            requires="autoclip",
        ),
    )
}
