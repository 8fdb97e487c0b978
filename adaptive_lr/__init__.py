"""adaptive_lr: a gradient-aware feedback controller for the learning rate and momentum of
any torch optimizer.

    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))

Architecture: signals (what is measured) -> controller (what is decided, pure logic) ->
wrapper (how it is applied to a torch optimizer).
"""

from adaptive_lr import hessian, schedules
from adaptive_lr.controller import (
    Context,
    ControllerState,
    Decision,
    Signals,
    decide,
    init_state,
    stability_bound,
)
from adaptive_lr.options import ControllerOptions
from adaptive_lr.schedules import (
    HyperparameterScheduler,
    learning_rate_scheduler,
    momentum_scheduler,
    scheduler,
    weight_decay_schedule,
)
from adaptive_lr.telemetry import CSVHistoryWriter, ScalarWriterCallback, StepRecord, write_history_csv
from adaptive_lr.wrapper import AdaptiveOptimizer, wrap

__version__ = "0.1.0"

__all__ = [
    "AdaptiveOptimizer",
    "CSVHistoryWriter",
    "Context",
    "ControllerOptions",
    "ControllerState",
    "Decision",
    "HyperparameterScheduler",
    "ScalarWriterCallback",
    "Signals",
    "StepRecord",
    "decide",
    "hessian",
    "init_state",
    "learning_rate_scheduler",
    "momentum_scheduler",
    "scheduler",
    "schedules",
    "stability_bound",
    "weight_decay_schedule",
    "wrap",
    "write_history_csv",
]
