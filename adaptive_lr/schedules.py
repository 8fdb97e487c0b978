"""Fixed schedules: the baselines the feedback controller is validated against.

A schedule is a pure function ``step -> value`` (optax's ``count -> value``): no state,
no optimizer, the same value for the same step. Steps count from 0; a negative step
raises ``ValueError``. Every factory validates its arguments once, at construction, and
raises ``ValueError`` naming the argument.

For the learning rate alone, torch's own schedulers are the recommended route:
``StepLR``, ``ExponentialLR``, ``CosineAnnealingLR``, ``LinearLR``, ``OneCycleLR``,
``SequentialLR`` and ``LambdaLR`` (:func:`lr_lambda` turns any schedule here into a
``LambdaLR`` multiplier). The functions in this module exist

* as reference values: each one with a torch counterpart reproduces the learning rates
  that scheduler writes, step by step (``tests/test_schedules.py`` checks this);
* for momentum and weight decay, which torch cannot schedule for every optimizer
  (only ``OneCycleLR``/``CyclicLR`` touch momentum, nothing touches weight decay):
  :class:`HyperparameterScheduler` writes any schedule into any hyperparameter of any
  ``torch.optim.Optimizer``;
* for combination: :func:`linear_warmup`, :func:`multiply`, :func:`sequential` and
  :func:`scheduler`, which bundles one schedule per hyperparameter.

Names from the seed article: ``learning_rate_scheduler`` (step decay) is
:func:`step_decay`, ``momentum_scheduler`` is :func:`cyclic_momentum`, the
``weight_decay`` schedule is :func:`weight_decay_schedule`, and ``scheduler`` builds a
:class:`ScheduleSet`.
"""

from __future__ import annotations

import itertools
import math
import numbers
import operator
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch

__all__ = [
    "HyperparameterScheduler",
    "Schedule",
    "ScheduleSet",
    "constant",
    "cosine_decay",
    "cyclic_momentum",
    "exponential_decay",
    "learning_rate_scheduler",
    "linear_warmup",
    "lr_lambda",
    "momentum_scheduler",
    "multiply",
    "one_cycle",
    "scheduler",
    "sequential",
    "step_decay",
    "weight_decay_schedule",
]

Schedule = Callable[[int], float]
"""A hyperparameter as a function of the step number (0, 1, 2, ...)."""

Anneal = Literal["cos", "linear"]


# --- validation -------------------------------------------------------------------


def _number(name: str, value: float, requirement: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a float if it is a finite real number satisfying ``ok``."""
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if is_real and math.isfinite(value) and ok(value):
        return float(value)
    raise ValueError(f"{name} must be {requirement}, got {value!r}")


def _non_negative(name: str, value: float) -> float:
    return _number(name, value, "finite and >= 0", lambda v: v >= 0)


def _positive(name: str, value: float) -> float:
    return _number(name, value, "finite and > 0", lambda v: v > 0)


def _integer(name: str, value: int, minimum: int) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum:
        return int(value)
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _momentum(name: str, value: float) -> float:
    return _number(name, value, "in [0, 1)", lambda v: 0 <= v < 1)


def _unit_interval(name: str, value: float) -> float:
    return _number(name, value, "in [0, 1]", lambda v: 0 <= v <= 1)


def _anneal(value: str) -> Callable[[float, float, float], float]:
    if value not in _ANNEALS:
        raise ValueError(f"anneal must be one of {sorted(_ANNEALS)}, got {value!r}")
    return _ANNEALS[value]


def _schedule(name: str, value: Schedule) -> Schedule:
    if not callable(value):
        raise TypeError(f"{name} must be a schedule (callable step -> value), got {value!r}")
    return value


def _step(step: int) -> int:
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


# --- annealing between two values, as torch's OneCycleLR writes it ----------------


def _anneal_cos(start: float, end: float, pct: float) -> float:
    """end + (start - end) * (1 + cos(pi * pct)) / 2, from start at pct=0 to end at 1."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _anneal_linear(start: float, end: float, pct: float) -> float:
    """start + (end - start) * pct."""
    return (end - start) * pct + start


_ANNEALS: dict[str, Callable[[float, float, float], float]] = {
    "cos": _anneal_cos,
    "linear": _anneal_linear,
}


# --- schedules ----------------------------------------------------------------------


def constant(value: float) -> Schedule:
    """value(step) = value."""
    value = _non_negative("value", value)

    def schedule(step: int) -> float:
        _step(step)
        return value

    return schedule


def step_decay(initial: float, *, step_size: int, gamma: float = 0.1) -> Schedule:
    """value(step) = initial * gamma ** (step // step_size), as torch's ``StepLR``.

    Also exported as ``learning_rate_scheduler``, the seed article's name for it.
    """
    initial = _non_negative("initial", initial)
    step_size = _integer("step_size", step_size, minimum=1)
    gamma = _number("gamma", gamma, "in (0, 1]", lambda v: 0 < v <= 1)

    def schedule(step: int) -> float:
        return initial * gamma ** (_step(step) // step_size)

    return schedule


learning_rate_scheduler = step_decay


def exponential_decay(initial: float, *, gamma: float) -> Schedule:
    """value(step) = initial * gamma ** step, as torch's ``ExponentialLR``."""
    initial = _non_negative("initial", initial)
    gamma = _number("gamma", gamma, "in (0, 1]", lambda v: 0 < v <= 1)

    def schedule(step: int) -> float:
        return initial * gamma ** _step(step)

    return schedule


def cosine_decay(initial: float, *, total_steps: int, final: float = 0.0) -> Schedule:
    """value(step) = final + (initial - final) * (1 + cos(pi * t / total_steps)) / 2,
    with t = min(step, total_steps): ``final`` from total_steps on.

    Equals torch's ``CosineAnnealingLR(T_max=total_steps, eta_min=final)`` for
    step <= total_steps (torch's keeps going and rises again after).
    """
    initial = _non_negative("initial", initial)
    total_steps = _integer("total_steps", total_steps, minimum=1)
    final = _number("final", final, "finite, >= 0 and <= initial", lambda v: 0 <= v <= initial)

    def schedule(step: int) -> float:
        t = min(_step(step), total_steps)
        return final + (initial - final) * (1 + math.cos(math.pi * t / total_steps)) / 2

    return schedule


def linear_warmup(schedule: Schedule, *, warmup_steps: int, start_factor: float = 0.0) -> Schedule:
    """value(step) = schedule(step) * factor(step), where
    factor(step) = start_factor + (1 - start_factor) * step / warmup_steps for
    step < warmup_steps and 1 afterwards.

    The factor reaches 1 exactly at warmup_steps, so there is no jump at the boundary.
    Over a constant schedule this is torch's
    ``LinearLR(start_factor, end_factor=1.0, total_iters=warmup_steps)``, except that
    start_factor=0 (torch requires > 0) is allowed: warm-up from zero.
    """
    schedule = _schedule("schedule", schedule)
    warmup_steps = _integer("warmup_steps", warmup_steps, minimum=1)
    start_factor = _unit_interval("start_factor", start_factor)

    def warmed_up(step: int) -> float:
        step = _step(step)
        if step >= warmup_steps:
            return schedule(step)
        return schedule(step) * (start_factor + (1 - start_factor) * step / warmup_steps)

    return warmed_up


def _one_cycle_phases(
    points: Sequence[float],
    *,
    total_steps: int,
    pct_start: float,
    anneal: Anneal,
) -> Schedule:
    """Anneal from points[i] to points[i + 1] during phase i, on OneCycleLR's phases.

    torch's phase i ends at step ``end[i]`` (inclusive) and a step belongs to the first
    phase whose end it does not pass; the fraction through a phase is
    (step - end[i-1]) / (end[i] - end[i-1]), with end[-1] = 0. The ends are
    pct_start * total_steps - 1 (and 2 * pct_start * total_steps - 2 with three phases),
    then total_steps - 1. Where torch divides by a zero-length phase (pct_start *
    total_steps == 1, step 0) this takes the phase's end value. From total_steps - 1 on
    the value stays at points[-1]; torch extrapolates one step further, then raises.
    """
    ends = [float(pct_start * total_steps) - 1]
    if len(points) == 4:  # three phases
        ends.append(float(2 * pct_start * total_steps) - 2)
    ends.append(total_steps - 1)
    anneal_between = _anneal(anneal)

    def schedule(step: int) -> float:
        step = min(_step(step), total_steps - 1)
        start = 0.0
        for phase, end in enumerate(ends):
            if step <= end or phase == len(ends) - 1:
                pct = (step - start) / (end - start) if end != start else 1.0
                return anneal_between(points[phase], points[phase + 1], pct)
            start = end
        raise AssertionError("unreachable: the last phase takes every remaining step")

    return schedule


def one_cycle(
    max_value: float,
    *,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal: Anneal = "cos",
    three_phase: bool = False,
) -> Schedule:
    """The 1cycle learning rate: the values of torch's ``OneCycleLR`` lr, step by step.

    With initial = max_value / div_factor and final = initial / final_div_factor, the
    value anneals (``anneal`` = "cos" or "linear") initial -> max_value over the first
    pct_start of total_steps, then max_value -> final over the rest; with three_phase,
    max_value -> initial over a second pct_start, then initial -> final. Phase
    boundaries follow torch exactly (see ``_one_cycle_phases``); the value is final from
    step total_steps - 1 on.
    """
    max_value = _non_negative("max_value", max_value)
    total_steps = _integer("total_steps", total_steps, minimum=1)
    pct_start = _unit_interval("pct_start", pct_start)
    div_factor = _positive("div_factor", div_factor)
    final_div_factor = _positive("final_div_factor", final_div_factor)
    _anneal(anneal)
    initial = max_value / div_factor
    final = initial / final_div_factor
    points = [initial, max_value, initial, final] if three_phase else [initial, max_value, final]
    return _one_cycle_phases(points, total_steps=total_steps, pct_start=pct_start, anneal=anneal)


def cyclic_momentum(
    *,
    total_steps: int,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    pct_start: float = 0.3,
    anneal: Anneal = "cos",
    three_phase: bool = False,
) -> Schedule:
    """The 1cycle momentum, the inverse of :func:`one_cycle`'s learning rate: the values
    torch's ``OneCycleLR(cycle_momentum=True)`` writes to ``momentum`` or ``betas[0]``.

    Anneals max_momentum -> base_momentum while the learning rate rises, then
    base_momentum -> max_momentum while it falls; with three_phase it holds
    max_momentum during the last phase. Same phase boundaries as :func:`one_cycle`.

    Also exported as ``momentum_scheduler``, the seed article's name for it.
    """
    total_steps = _integer("total_steps", total_steps, minimum=1)
    base_momentum = _momentum("base_momentum", base_momentum)
    max_momentum = _momentum("max_momentum", max_momentum)
    if base_momentum > max_momentum:
        raise ValueError(f"base_momentum must be <= max_momentum, got {base_momentum} > {max_momentum}")
    pct_start = _unit_interval("pct_start", pct_start)
    _anneal(anneal)
    points = [max_momentum, base_momentum, max_momentum]
    if three_phase:
        points.append(max_momentum)
    return _one_cycle_phases(points, total_steps=total_steps, pct_start=pct_start, anneal=anneal)


momentum_scheduler = cyclic_momentum


# No factory is named `weight_decay`: that is the hyperparameter's own name (the param
# group key and every optimizer's argument), so `weight_decay(...)` would read as the
# value rather than a schedule of it.
def weight_decay_schedule(
    initial: float, *, final: float, total_steps: int, anneal: Anneal = "cos"
) -> Schedule:
    """The seed article's ``weight_decay`` schedule: initial -> final over total_steps,
    then final. Either direction, e.g. the rising weight decay of some ViT recipes.

    With t = min(step, total_steps):
    "cos":    value = final + (initial - final) * (1 + cos(pi * t / total_steps)) / 2
    "linear": value = initial + (final - initial) * t / total_steps
    """
    initial = _non_negative("initial", initial)
    final = _non_negative("final", final)
    total_steps = _integer("total_steps", total_steps, minimum=1)
    anneal_between = _anneal(anneal)

    def schedule(step: int) -> float:
        return anneal_between(initial, final, min(_step(step), total_steps) / total_steps)

    return schedule


# --- combination ------------------------------------------------------------------


def sequential(schedules: Sequence[Schedule], milestones: Sequence[int]) -> Schedule:
    """schedules[i] runs from milestones[i-1] (0 for i = 0) until milestones[i], its own
    step counter restarting at 0 at its milestone, as torch's ``SequentialLR``:
    value(step) = schedules[i](step - milestones[i-1]), i = #{m in milestones: m <= step}.

    milestones must be strictly increasing, >= 1, and one fewer than schedules.
    """
    schedules = [_schedule(f"schedules[{i}]", s) for i, s in enumerate(schedules)]
    if not schedules:
        raise ValueError("schedules must hold at least one schedule")
    milestones = [_integer(f"milestones[{i}]", m, minimum=1) for i, m in enumerate(milestones)]
    if len(milestones) != len(schedules) - 1:
        raise ValueError(
            f"milestones must hold one fewer entry than schedules, "
            f"got {len(milestones)} milestones for {len(schedules)} schedules"
        )
    if any(a >= b for a, b in itertools.pairwise(milestones)):
        raise ValueError(f"milestones must be strictly increasing, got {milestones}")
    starts = [0, *milestones]

    def schedule(step: int) -> float:
        step = _step(step)
        i = bisect_right(milestones, step)
        return schedules[i](step - starts[i])

    return schedule


def multiply(*schedules: Schedule) -> Schedule:
    """value(step) = product of s(step) over schedules, e.g. a warm-up factor times a decay."""
    if not schedules:
        raise ValueError("schedules must hold at least one schedule")
    schedules = tuple(_schedule(f"schedules[{i}]", s) for i, s in enumerate(schedules))

    def product(step: int) -> float:
        step = _step(step)
        return math.prod(s(step) for s in schedules)

    return product


class ScheduleSet(Mapping[str, Schedule]):
    """A read-only mapping from hyperparameter name (a param group key such as "lr",
    "momentum", "weight_decay") to its schedule. ``schedule_set(step)`` returns every
    hyperparameter's value at that step.
    """

    def __init__(self, schedules: Mapping[str, Schedule]) -> None:
        if not schedules:
            raise ValueError("schedules must name at least one hyperparameter")
        for name, schedule in schedules.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"schedules keys must be hyperparameter names, got {name!r}")
            _schedule(f"schedules[{name!r}]", schedule)
        self._schedules = dict(schedules)

    def __getitem__(self, name: str) -> Schedule:
        return self._schedules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._schedules)

    def __len__(self) -> int:
        return len(self._schedules)

    def __call__(self, step: int) -> dict[str, float]:
        step = _step(step)
        return {name: schedule(step) for name, schedule in self._schedules.items()}

    def __repr__(self) -> str:
        return f"ScheduleSet({sorted(self._schedules)})"


def scheduler(**schedules: Schedule) -> ScheduleSet:
    """The seed article's ``scheduler``: one schedule per hyperparameter, e.g.
    ``scheduler(lr=cosine_decay(0.1, total_steps=1000), momentum=constant(0.9))``.
    """
    return ScheduleSet(schedules)


def lr_lambda(schedule: Schedule, initial_lr: float) -> Callable[[int], float]:
    """A ``torch.optim.lr_scheduler.LambdaLR`` multiplier: step -> schedule(step) / initial_lr.

    LambdaLR writes lr = initial_lr * multiplier(step), where initial_lr is the lr the
    optimizer was built with; pass that same value here.
    """
    schedule = _schedule("schedule", schedule)
    initial_lr = _positive("initial_lr", initial_lr)

    def multiplier(step: int) -> float:
        return schedule(step) / initial_lr

    return multiplier


# --- driving a torch optimizer -----------------------------------------------------


def _has_hyperparameter(group: Mapping[str, Any], name: str) -> bool:
    return name in group or (name == "momentum" and "betas" in group)


def _replaced(old: Any, value: float) -> Any:
    # A tensor hyperparameter (capturable or compiled steps) is read in place: keep the
    # tensor and change its value, as torch's own schedulers do.
    if isinstance(old, torch.Tensor):
        return old.fill_(value)
    return value


def _write_hyperparameter(group: dict[str, Any], name: str, value: float) -> None:
    if name == "momentum" and "momentum" not in group:
        beta1, *rest = group["betas"]
        group["betas"] = (_replaced(beta1, value), *rest)
    else:
        group[name] = _replaced(group[name], value)


class HyperparameterScheduler:
    """Writes ``schedules[name](step)`` into ``group[name]`` of every param group.

    Any hyperparameter of any ``torch.optim.Optimizer`` can be scheduled; every group
    gets the same value (for per-group learning rates use torch's ``LambdaLR`` with
    :func:`lr_lambda`, which scales each group's own lr). The name "momentum" writes
    ``group["momentum"]`` where the group has it and otherwise ``betas[0]``, as Adam's
    family calls it, keeping the other betas.

    Like torch's schedulers, construction applies step ``last_step + 1`` (step 0 by
    default) and each :meth:`step` advances one step; call it after
    ``optimizer.step()``. ``optimizer.param_groups`` is read afresh at every step, so
    wrappers that expose another optimizer's groups and groups added later both work.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedules: Mapping[str, Schedule] | ScheduleSet,
        *,
        last_step: int = -1,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.schedules = schedules if isinstance(schedules, ScheduleSet) else ScheduleSet(schedules)
        self.last_step = _integer("last_step", last_step, minimum=-1)
        self._last_values: dict[str, float] = {}
        self.step()

    def step(self) -> None:
        """Advance one step and write every schedule's value at it into every group."""
        self.last_step += 1
        self._apply()

    def get_last_values(self) -> dict[str, float]:
        """The values written at ``last_step``, by hyperparameter name."""
        return dict(self._last_values)

    def state_dict(self) -> dict[str, int]:
        """``{"last_step": int}``; the schedules themselves are code, not state."""
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: Mapping[str, int]) -> None:
        """Resume at ``state_dict["last_step"]`` and write that step's values, so the
        result does not depend on whether the optimizer's state is loaded before or after.
        """
        self.last_step = _integer("last_step", state_dict["last_step"], minimum=0)
        self._apply()

    def _apply(self) -> None:
        groups = self.optimizer.param_groups
        # Check every group before writing any, so a bad group leaves the others untouched.
        for index, group in enumerate(groups):
            for name in self.schedules:
                if not _has_hyperparameter(group, name):
                    looked_for = "'momentum' or 'betas'" if name == "momentum" else repr(name)
                    raise ValueError(
                        f"hyperparameter {name!r} not found: param group {index} of "
                        f"{type(self.optimizer).__name__} has no key {looked_for}"
                    )
        values = self.schedules(self.last_step)
        for group in groups:
            for name, value in values.items():
                _write_hyperparameter(group, name, value)
        self._last_values = values
