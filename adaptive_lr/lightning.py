"""PyTorch Lightning: log the controller's signals through the Trainer's logger.

Returning the wrapped optimizer from ``configure_optimizers`` needs nothing from here: an
``AdaptiveOptimizer`` is a ``torch.optim.Optimizer``, Lightning steps it with its training
closure, and its state is saved and restored with Lightning's checkpoints::

    def configure_optimizers(self):
        opt = adaptive_lr.wrap(torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    trainer = lightning.Trainer(callbacks=[adaptive_lr.lightning.AdaptiveLRMonitor()])

This module imports ``lightning`` (the ``integrations`` extra); ``import adaptive_lr``
does not.
"""

from __future__ import annotations

import math
from typing import Any

import lightning

from adaptive_lr.telemetry import scalar_values
from adaptive_lr.wrapper import AdaptiveOptimizer


class AdaptiveLRMonitor(lightning.Callback):
    """After every training batch, log the last step record of each wrapped optimizer.

    Logged with ``pl_module.log_dict`` (so to every logger of the Trainer) under
    ``{prefix}/{field}`` for the fields in `adaptive_lr.telemetry.SCALARS`, plus
    ``{prefix}/event`` = 1.0 on steps with a controller event; with several wrapped
    optimizers the prefix gets the optimizer's index.
    """

    def __init__(self, prefix: str = "adaptive_lr") -> None:
        super().__init__()
        self.prefix = prefix

    def on_train_batch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        wrapped = [opt for opt in trainer.optimizers if isinstance(_unwrap(opt), AdaptiveOptimizer)]
        for index, opt in enumerate(wrapped):
            history = _unwrap(opt).history
            if not history:
                continue
            record = history[-1]
            prefix = self.prefix if len(wrapped) == 1 else f"{self.prefix}_{index}"
            scalars = scalar_values(record).items()
            values = {f"{prefix}/{name}": value for name, value in scalars if math.isfinite(value)}
            values[f"{prefix}/event"] = 0.0 if record.event is None else 1.0
            pl_module.log_dict(values, on_step=True, on_epoch=False)


def _unwrap(optimizer: Any) -> Any:
    """The user's optimizer, also when Lightning hands out its LightningOptimizer around it.

    (An AdaptiveOptimizer has an ``optimizer`` attribute too, its base: not unwrapped.)
    """
    if isinstance(optimizer, AdaptiveOptimizer):
        return optimizer
    return getattr(optimizer, "optimizer", optimizer)
