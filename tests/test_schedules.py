"""Specification of adaptive_lr.schedules: fixed schedules and the adapter that applies them.

Where torch has a scheduler of the same name, the schedule must reproduce the learning
rate torch writes into the param group after every ``scheduler.step()``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptive_lr.schedules import (
    HyperparameterScheduler,
    Schedule,
    ScheduleSet,
    constant,
    cosine_decay,
    cyclic_momentum,
    exponential_decay,
    learning_rate_scheduler,
    linear_warmup,
    lr_lambda,
    momentum_scheduler,
    multiply,
    one_cycle,
    scheduler,
    sequential,
    step_decay,
    weight_decay_schedule,
)

REL_TOL = 1e-9

values = st.floats(min_value=1e-6, max_value=10.0, allow_nan=False)
gammas = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)
fractions = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
total_steps = st.integers(min_value=1, max_value=200)


def trajectory(schedule: Schedule, steps: int) -> list[float]:
    return [schedule(step) for step in range(steps)]


def is_non_increasing(xs: list[float]) -> bool:
    return all(a >= b for a, b in itertools.pairwise(xs))


def is_non_decreasing(xs: list[float]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(xs))


def is_between(x: float, low: float, high: float) -> bool:
    """low <= x <= high, allowing one rounding error at either end."""
    slack = 1e-12 * max(abs(low), abs(high))
    return low - slack <= x <= high + slack


def all_close(xs: list[float], ys: list[float]) -> bool:
    return len(xs) == len(ys) and all(
        math.isclose(x, y, rel_tol=REL_TOL, abs_tol=1e-15) for x, y in zip(xs, ys, strict=True)
    )


def make_optimizer(
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.SGD,
    **hyperparameters: Any,
) -> torch.optim.Optimizer:
    return optimizer_class([torch.nn.Parameter(torch.zeros(1))], **hyperparameters)


def momentum_of(group: dict[str, Any]) -> float:
    return group["momentum"] if "momentum" in group else group["betas"][0]


def torch_trajectory(
    optimizer: torch.optim.Optimizer,
    make_scheduler: Callable[[torch.optim.Optimizer], Any],
    steps: int,
    read: Callable[[dict[str, Any]], float] = lambda group: group["lr"],
) -> list[float]:
    """What torch writes into the (single) param group at steps 0 .. steps-1."""
    torch_scheduler = make_scheduler(optimizer)
    written = []
    for _ in range(steps):
        written.append(float(read(optimizer.param_groups[0])))
        optimizer.step()  # before scheduler.step(), as torch requires
        torch_scheduler.step()
    return written


def adapter_trajectory(
    adapter: HyperparameterScheduler,
    steps: int,
    read: Callable[[dict[str, Any]], float],
) -> list[float]:
    written = []
    for _ in range(steps):
        written.append(float(read(adapter.optimizer.param_groups[0])))
        adapter.optimizer.step()
        adapter.step()
    return written


# --- constant ---------------------------------------------------------------------


@given(value=values, step=st.integers(min_value=0, max_value=10**6))
def test_constant_is_the_same_value_at_every_step(value: float, step: int) -> None:
    assert constant(value)(step) == value


# --- step decay ---------------------------------------------------------------------


def test_step_decay_multiplies_by_gamma_every_step_size_steps() -> None:
    schedule = step_decay(1.0, step_size=3, gamma=0.5)
    assert trajectory(schedule, 7) == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_learning_rate_scheduler_is_step_decay() -> None:
    assert learning_rate_scheduler is step_decay


@given(initial=values, gamma=gammas, step_size=st.integers(min_value=1, max_value=20))
def test_step_decay_is_non_increasing_for_any_gamma(initial: float, gamma: float, step_size: int) -> None:
    xs = trajectory(step_decay(initial, step_size=step_size, gamma=gamma), 100)
    assert xs[0] == initial
    assert is_non_increasing(xs)


def test_step_decay_matches_torch_step_lr() -> None:
    expected = torch_trajectory(
        make_optimizer(lr=0.3),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.3),
        40,
    )
    assert all_close(trajectory(step_decay(0.3, step_size=4, gamma=0.3), 40), expected)


# --- exponential decay --------------------------------------------------------------


@given(initial=values, gamma=gammas)
def test_exponential_decay_is_non_increasing_for_any_gamma(initial: float, gamma: float) -> None:
    xs = trajectory(exponential_decay(initial, gamma=gamma), 100)
    assert xs[0] == initial
    assert is_non_increasing(xs)


def test_exponential_decay_matches_torch_exponential_lr() -> None:
    expected = torch_trajectory(
        make_optimizer(lr=0.1),
        lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95),
        60,
    )
    assert all_close(trajectory(exponential_decay(0.1, gamma=0.95), 60), expected)


# --- cosine decay -------------------------------------------------------------------


def test_cosine_decay_goes_from_initial_to_final_and_stays_there() -> None:
    schedule = cosine_decay(1.0, total_steps=10, final=0.1)
    assert schedule(0) == 1.0
    assert math.isclose(schedule(5), 0.55, rel_tol=REL_TOL)
    assert schedule(10) == pytest.approx(0.1, rel=REL_TOL)
    assert schedule(11) == schedule(10_000) == schedule(10)


@given(initial=values, final_fraction=fractions, total=total_steps)
def test_cosine_decay_is_non_increasing_between_initial_and_final(
    initial: float, final_fraction: float, total: int
) -> None:
    final = initial * final_fraction
    xs = trajectory(cosine_decay(initial, total_steps=total, final=final), total + 5)
    assert is_non_increasing(xs)
    assert all(is_between(x, final, initial) for x in xs)


def test_cosine_decay_has_no_jump_at_total_steps() -> None:
    # The cosine flattens into the constant tail: the last decaying step is the smallest.
    xs = trajectory(cosine_decay(1.0, total_steps=20), 23)
    drops = [a - b for a, b in itertools.pairwise(xs)]
    assert drops[19] <= drops[18]
    assert drops[20:] == [0.0, 0.0]


def test_cosine_decay_matches_torch_cosine_annealing_lr_up_to_total_steps() -> None:
    expected = torch_trajectory(
        make_optimizer(lr=0.2),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50, eta_min=0.01),
        51,
    )
    assert all_close(trajectory(cosine_decay(0.2, total_steps=50, final=0.01), 51), expected)


# --- linear warm-up -----------------------------------------------------------------


def test_linear_warmup_starts_at_start_factor_times_the_schedule() -> None:
    schedule = linear_warmup(constant(2.0), warmup_steps=4, start_factor=0.25)
    assert trajectory(schedule, 6) == [0.5, 0.875, 1.25, 1.625, 2.0, 2.0]


def test_linear_warmup_is_the_wrapped_schedule_after_warmup_steps() -> None:
    decay = cosine_decay(1.0, total_steps=50)
    warmed = linear_warmup(decay, warmup_steps=10)
    assert warmed(0) == 0.0
    assert [warmed(step) for step in range(10, 60)] == [decay(step) for step in range(10, 60)]


@given(value=values, warmup=st.integers(min_value=1, max_value=50), start_factor=fractions)
def test_linear_warmup_is_non_decreasing_during_warmup(
    value: float, warmup: int, start_factor: float
) -> None:
    xs = trajectory(
        linear_warmup(constant(value), warmup_steps=warmup, start_factor=start_factor),
        warmup + 1,
    )
    assert is_non_decreasing(xs)
    assert xs[-1] == value


@given(warmup=st.integers(min_value=1, max_value=50), start_factor=fractions)
def test_linear_warmup_ramp_reaches_the_schedule_at_warmup_steps_without_a_jump(
    warmup: int, start_factor: float
) -> None:
    xs = trajectory(
        linear_warmup(constant(1.0), warmup_steps=warmup, start_factor=start_factor),
        warmup + 1,
    )
    rises = [b - a for a, b in itertools.pairwise(xs)]
    assert all(math.isclose(rise, (1 - start_factor) / warmup, abs_tol=1e-12) for rise in rises)


def test_linear_warmup_matches_torch_linear_lr() -> None:
    expected = torch_trajectory(
        make_optimizer(lr=0.1),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.01, end_factor=1.0, total_iters=8),
        20,
    )
    warmed = linear_warmup(constant(0.1), warmup_steps=8, start_factor=0.01)
    assert all_close(trajectory(warmed, 20), expected)


# --- one cycle ----------------------------------------------------------------------


def test_one_cycle_endpoints_are_max_over_div_factor_max_and_final() -> None:
    schedule = one_cycle(1.0, total_steps=100, pct_start=0.3, div_factor=20.0, final_div_factor=100.0)
    xs = trajectory(schedule, 100)
    assert math.isclose(xs[0], 1.0 / 20.0, rel_tol=REL_TOL)
    assert max(xs) == 1.0
    assert math.isclose(xs[-1], 1.0 / 20.0 / 100.0, rel_tol=REL_TOL)
    assert schedule(100) == schedule(10_000) == xs[-1]


def test_one_cycle_peaks_at_the_end_of_phase_one_without_a_jump() -> None:
    # torch's phase one ends at step pct_start * total_steps - 1 = 29.
    xs = trajectory(one_cycle(1.0, total_steps=100, pct_start=0.3), 100)
    assert xs.index(1.0) == 29
    assert xs[28] < xs[29] and xs[30] < xs[29]
    assert max(xs[29] - xs[28], xs[29] - xs[30]) < 0.01


@given(
    total=total_steps,
    pct_start=fractions,
    anneal=st.sampled_from(["cos", "linear"]),
    three_phase=st.booleans(),
)
def test_one_cycle_rises_then_falls_within_its_bounds(
    total: int, pct_start: float, anneal: str, three_phase: bool
) -> None:
    schedule = one_cycle(
        2.0,
        total_steps=total,
        pct_start=pct_start,
        anneal=anneal,
        three_phase=three_phase,
    )
    xs = trajectory(schedule, total)
    peak = xs.index(max(xs))
    assert is_non_decreasing(xs[: peak + 1])
    assert is_non_increasing(xs[peak:])
    assert all(is_between(x, 2.0 / 25.0 / 1e4, 2.0) for x in xs)


def test_one_cycle_takes_the_peak_where_torch_divides_by_a_zero_length_phase() -> None:
    # pct_start * total_steps == 1: torch's OneCycleLR raises ZeroDivisionError at step 0.
    assert one_cycle(1.0, total_steps=4, pct_start=0.25)(0) == 1.0


@pytest.mark.parametrize(
    ("total", "pct_start", "anneal", "three_phase"),
    [
        (100, 0.3, "cos", False),
        (37, 0.25, "linear", False),
        (100, 0.3, "cos", True),
        (41, 0.4, "linear", True),
        (3, 0.3, "cos", False),
        (1, 0.3, "cos", False),
    ],
)
@pytest.mark.parametrize(
    ("optimizer_class", "hyperparameters"),
    [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.Adam, {"lr": 0.1})],
    ids=["sgd-momentum", "adam-betas"],
)
def test_one_cycle_and_cyclic_momentum_match_torch_one_cycle_lr(
    total: int,
    pct_start: float,
    anneal: str,
    three_phase: bool,
    optimizer_class: type[torch.optim.Optimizer],
    hyperparameters: dict[str, Any],
) -> None:
    def make(o: torch.optim.Optimizer) -> torch.optim.lr_scheduler.OneCycleLR:
        return torch.optim.lr_scheduler.OneCycleLR(
            o,
            max_lr=0.5,
            total_steps=total,
            pct_start=pct_start,
            anneal_strategy=anneal,
            three_phase=three_phase,
            base_momentum=0.8,
            max_momentum=0.9,
        )

    cycle = {"pct_start": pct_start, "anneal": anneal, "three_phase": three_phase}
    lrs = trajectory(one_cycle(0.5, total_steps=total, **cycle), total)
    momenta = trajectory(
        cyclic_momentum(total_steps=total, base_momentum=0.8, max_momentum=0.9, **cycle),
        total,
    )
    optimizer = make_optimizer(optimizer_class, **hyperparameters)
    assert all_close(lrs, torch_trajectory(optimizer, make, total))
    optimizer = make_optimizer(optimizer_class, **hyperparameters)
    assert all_close(momenta, torch_trajectory(optimizer, make, total, read=momentum_of))


# --- cyclic momentum ----------------------------------------------------------------


def test_momentum_scheduler_is_cyclic_momentum() -> None:
    assert momentum_scheduler is cyclic_momentum


@given(data=st.data(), total=st.integers(min_value=3, max_value=200))
def test_cyclic_momentum_falls_while_one_cycle_lr_rises_and_rises_while_it_falls(
    data: st.DataObject, total: int
) -> None:
    # Phase one ends on a step (pct_start * total_steps - 1 = peak), so both peak there.
    peak = data.draw(st.integers(min_value=1, max_value=total - 2))
    pct_start = (peak + 1) / total
    lrs = trajectory(one_cycle(1.0, total_steps=total, pct_start=pct_start), total)
    momenta = trajectory(cyclic_momentum(total_steps=total, pct_start=pct_start), total)
    assert lrs.index(max(lrs)) == momenta.index(min(momenta)) == peak
    assert is_non_increasing(momenta[: peak + 1])
    assert is_non_decreasing(momenta[peak:])
    assert momenta[0] == 0.95
    assert all(is_between(m, 0.85, 0.95) for m in momenta)


# --- weight decay -------------------------------------------------------------------


@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_weight_decay_schedule_goes_from_initial_to_final_and_stays_there(
    anneal: str,
) -> None:
    schedule = weight_decay_schedule(0.04, final=0.4, total_steps=100, anneal=anneal)
    assert math.isclose(schedule(0), 0.04, rel_tol=REL_TOL)
    assert math.isclose(schedule(50), 0.22, rel_tol=REL_TOL)
    assert math.isclose(schedule(100), 0.4, rel_tol=REL_TOL)
    assert schedule(10_000) == schedule(100)


@given(
    initial=st.floats(0.0, 1.0),
    final=st.floats(0.0, 1.0),
    total=total_steps,
    anneal=st.sampled_from(["cos", "linear"]),
)
def test_weight_decay_schedule_is_monotone_toward_final(
    initial: float, final: float, total: int, anneal: str
) -> None:
    xs = trajectory(
        weight_decay_schedule(initial, final=final, total_steps=total, anneal=anneal),
        total + 3,
    )
    assert is_non_decreasing(xs) if final >= initial else is_non_increasing(xs)
    assert all(is_between(x, min(initial, final), max(initial, final)) for x in xs)


# --- combination --------------------------------------------------------------------


def test_sequential_restarts_each_schedule_at_zero_at_its_milestone() -> None:
    schedule = sequential([constant(1.0), step_decay(8.0, step_size=1, gamma=0.5)], [3])
    assert trajectory(schedule, 6) == [1.0, 1.0, 1.0, 8.0, 4.0, 2.0]


def test_sequential_matches_torch_sequential_lr() -> None:
    def make(o: torch.optim.Optimizer) -> torch.optim.lr_scheduler.SequentialLR:
        return torch.optim.lr_scheduler.SequentialLR(
            o,
            schedulers=[
                torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=5),
                torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
                torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.001),
            ],
            milestones=[5, 15],
        )

    schedule = sequential(
        [
            linear_warmup(constant(0.1), warmup_steps=5, start_factor=0.1),
            exponential_decay(0.1, gamma=0.9),
            cosine_decay(0.1, total_steps=20, final=0.001),
        ],
        [5, 15],
    )
    assert all_close(trajectory(schedule, 36), torch_trajectory(make_optimizer(lr=0.1), make, 36))


def test_multiply_is_the_pointwise_product() -> None:
    warmup = linear_warmup(constant(1.0), warmup_steps=4)
    decay = exponential_decay(0.5, gamma=0.5)
    product = multiply(warmup, decay)
    assert [product(s) for s in range(8)] == [warmup(s) * decay(s) for s in range(8)]


def test_scheduler_maps_each_hyperparameter_to_its_schedule() -> None:
    schedules = scheduler(lr=constant(0.1), momentum=constant(0.9))
    assert isinstance(schedules, ScheduleSet)
    assert sorted(schedules) == ["lr", "momentum"]
    assert schedules(7) == {"lr": 0.1, "momentum": 0.9}


def test_scheduler_rejects_a_schedule_that_is_not_callable() -> None:
    with pytest.raises(TypeError, match="momentum"):
        scheduler(lr=constant(0.1), momentum=0.9)  # type: ignore[arg-type]


def test_lr_lambda_drives_torch_lambda_lr_to_the_schedule() -> None:
    schedule = linear_warmup(cosine_decay(0.3, total_steps=30), warmup_steps=5, start_factor=0.2)
    expected = torch_trajectory(
        make_optimizer(lr=0.3),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda=lr_lambda(schedule, 0.3)),
        35,
    )
    assert all_close(trajectory(schedule, 35), expected)


# --- validation ---------------------------------------------------------------------

EVERY_SCHEDULE = {
    "constant": constant(1.0),
    "step_decay": step_decay(1.0, step_size=2),
    "exponential_decay": exponential_decay(1.0, gamma=0.9),
    "cosine_decay": cosine_decay(1.0, total_steps=10),
    "linear_warmup": linear_warmup(constant(1.0), warmup_steps=3),
    "one_cycle": one_cycle(1.0, total_steps=10),
    "cyclic_momentum": cyclic_momentum(total_steps=10),
    "weight_decay_schedule": weight_decay_schedule(0.0, final=0.1, total_steps=10),
    "sequential": sequential([constant(1.0), constant(2.0)], [2]),
    "multiply": multiply(constant(1.0), constant(2.0)),
}


@pytest.mark.parametrize("name", sorted(EVERY_SCHEDULE))
def test_every_schedule_rejects_a_negative_step(name: str) -> None:
    with pytest.raises(ValueError, match="step"):
        EVERY_SCHEDULE[name](-1)


BAD_ARGUMENTS: list[tuple[Callable[..., Any], dict[str, Any], str]] = [
    (constant, {"value": math.nan}, "value"),
    (constant, {"value": -1.0}, "value"),
    (step_decay, {"initial": -1.0, "step_size": 1}, "initial"),
    (step_decay, {"initial": 1.0, "step_size": 0}, "step_size"),
    (step_decay, {"initial": 1.0, "step_size": 2.5}, "step_size"),
    (step_decay, {"initial": 1.0, "step_size": 1, "gamma": 0.0}, "gamma"),
    (step_decay, {"initial": 1.0, "step_size": 1, "gamma": 1.5}, "gamma"),
    (exponential_decay, {"initial": math.inf, "gamma": 0.9}, "initial"),
    (exponential_decay, {"initial": 1.0, "gamma": -0.5}, "gamma"),
    (cosine_decay, {"initial": 1.0, "total_steps": 0}, "total_steps"),
    (cosine_decay, {"initial": 1.0, "total_steps": True}, "total_steps"),
    (cosine_decay, {"initial": 1.0, "total_steps": 10, "final": 2.0}, "final"),
    (linear_warmup, {"schedule": constant(1.0), "warmup_steps": 0}, "warmup_steps"),
    (
        linear_warmup,
        {"schedule": constant(1.0), "warmup_steps": 5, "start_factor": 1.5},
        "start_factor",
    ),
    (one_cycle, {"max_value": -1.0, "total_steps": 10}, "max_value"),
    (one_cycle, {"max_value": 1.0, "total_steps": 0}, "total_steps"),
    (one_cycle, {"max_value": 1.0, "total_steps": 10, "pct_start": 1.2}, "pct_start"),
    (one_cycle, {"max_value": 1.0, "total_steps": 10, "div_factor": 0.0}, "div_factor"),
    (
        one_cycle,
        {"max_value": 1.0, "total_steps": 10, "final_div_factor": -1.0},
        "final_div_factor",
    ),
    (one_cycle, {"max_value": 1.0, "total_steps": 10, "anneal": "cosine"}, "anneal"),
    (cyclic_momentum, {"total_steps": 10, "max_momentum": 1.0}, "max_momentum"),
    (cyclic_momentum, {"total_steps": 10, "base_momentum": -0.1}, "base_momentum"),
    (
        cyclic_momentum,
        {"total_steps": 10, "base_momentum": 0.95, "max_momentum": 0.9},
        "base_momentum",
    ),
    (cyclic_momentum, {"total_steps": 10, "pct_start": -0.1}, "pct_start"),
    (
        weight_decay_schedule,
        {"initial": -0.1, "final": 0.1, "total_steps": 10},
        "initial",
    ),
    (
        weight_decay_schedule,
        {"initial": 0.1, "final": math.nan, "total_steps": 10},
        "final",
    ),
    (
        weight_decay_schedule,
        {"initial": 0.1, "final": 0.2, "total_steps": 0},
        "total_steps",
    ),
    (
        weight_decay_schedule,
        {"initial": 0.1, "final": 0.2, "total_steps": 10, "anneal": "step"},
        "anneal",
    ),
    (sequential, {"schedules": [], "milestones": []}, "schedules"),
    (
        sequential,
        {"schedules": [constant(1.0), constant(2.0)], "milestones": []},
        "milestones",
    ),
    (
        sequential,
        {"schedules": [constant(1.0), constant(2.0)], "milestones": [0]},
        "milestones",
    ),
    (
        sequential,
        {"schedules": [constant(1.0)] * 3, "milestones": [5, 5]},
        "milestones",
    ),
    (multiply, {}, "schedules"),
    (lr_lambda, {"schedule": constant(1.0), "initial_lr": 0.0}, "initial_lr"),
]


@pytest.mark.parametrize(
    ("factory", "arguments", "argument"),
    BAD_ARGUMENTS,
    ids=[f"{factory.__name__}-{argument}" for factory, _, argument in BAD_ARGUMENTS],
)
def test_a_bad_argument_raises_value_error_naming_it(
    factory: Callable[..., Any], arguments: dict[str, Any], argument: str
) -> None:
    with pytest.raises(ValueError, match=argument):
        factory(**arguments)


@pytest.mark.parametrize(
    "build",
    [
        lambda: linear_warmup(0.1, warmup_steps=5),  # type: ignore[arg-type]
        lambda: sequential([constant(1.0), "cosine"], [5]),  # type: ignore[list-item]
        lambda: multiply(constant(1.0), 2.0),  # type: ignore[arg-type]
        lambda: lr_lambda(None, 0.1),  # type: ignore[arg-type]
    ],
    ids=["linear_warmup", "sequential", "multiply", "lr_lambda"],
)
def test_a_schedule_argument_that_is_not_callable_raises_type_error(
    build: Callable[[], Any],
) -> None:
    with pytest.raises(TypeError, match="schedule"):
        build()


# --- the adapter --------------------------------------------------------------------


def test_adapter_applies_step_zero_at_construction() -> None:
    optimizer = make_optimizer(lr=1.0, momentum=0.0)
    adapter = HyperparameterScheduler(
        optimizer, {"lr": constant(0.05), "momentum": cyclic_momentum(total_steps=10)}
    )
    assert optimizer.param_groups[0]["lr"] == 0.05
    assert optimizer.param_groups[0]["momentum"] == 0.95
    assert adapter.last_step == 0
    assert adapter.get_last_values() == {"lr": 0.05, "momentum": 0.95}


def test_adapter_drives_momentum_on_sgd() -> None:
    schedule = cyclic_momentum(total_steps=20)
    adapter = HyperparameterScheduler(make_optimizer(lr=0.1, momentum=0.5), {"momentum": schedule})
    assert adapter_trajectory(adapter, 20, momentum_of) == trajectory(schedule, 20)


def test_adapter_drives_beta1_on_adam_and_keeps_beta2() -> None:
    schedule = cyclic_momentum(total_steps=20)
    optimizer = make_optimizer(torch.optim.Adam, lr=0.1, betas=(0.9, 0.98))
    adapter = HyperparameterScheduler(optimizer, scheduler(momentum=schedule))
    assert adapter_trajectory(adapter, 20, momentum_of) == trajectory(schedule, 20)
    assert optimizer.param_groups[0]["betas"][1] == 0.98


def test_adapter_drives_weight_decay_on_adamw() -> None:
    schedule = weight_decay_schedule(0.04, final=0.4, total_steps=15)
    optimizer = make_optimizer(torch.optim.AdamW, lr=0.1)
    adapter = HyperparameterScheduler(optimizer, {"weight_decay": schedule})
    written = adapter_trajectory(adapter, 20, lambda group: group["weight_decay"])
    assert written == trajectory(schedule, 20)


def test_adapter_writes_every_param_group() -> None:
    parameters = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    optimizer = torch.optim.SGD([{"params": [p]} for p in parameters], lr=1.0)
    adapter = HyperparameterScheduler(optimizer, {"lr": exponential_decay(1.0, gamma=0.5)})
    adapter.step()
    assert [group["lr"] for group in optimizer.param_groups] == [0.5, 0.5, 0.5]


def test_adapter_with_one_cycle_schedules_matches_torch_one_cycle_lr() -> None:
    total = 50
    expected_lrs = torch_trajectory(
        make_optimizer(torch.optim.Adam, lr=0.1),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=total),
        total,
    )
    expected_momenta = torch_trajectory(
        make_optimizer(torch.optim.Adam, lr=0.1),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=total),
        total,
        read=momentum_of,
    )
    schedules = scheduler(
        lr=one_cycle(0.1, total_steps=total),
        momentum=cyclic_momentum(total_steps=total),
    )

    def adapter() -> HyperparameterScheduler:
        return HyperparameterScheduler(make_optimizer(torch.optim.Adam, lr=0.1), schedules)

    assert adapter_trajectory(adapter(), total, lambda group: group["lr"]) == expected_lrs
    assert adapter_trajectory(adapter(), total, momentum_of) == expected_momenta


def test_adapter_state_dict_round_trip_resumes_the_same_sequence() -> None:
    schedules = {
        "lr": step_decay(1.0, step_size=3, gamma=0.5),
        "momentum": constant(0.9),
    }
    first = HyperparameterScheduler(make_optimizer(lr=1.0, momentum=0.0), schedules)
    for _ in range(7):
        first.step()
    state = first.state_dict()
    assert state == {"last_step": 7}
    assert all(type(value) is int for value in state.values())

    resumed = HyperparameterScheduler(make_optimizer(lr=1.0, momentum=0.0), schedules)
    resumed.load_state_dict(state)
    assert resumed.optimizer.param_groups[0]["lr"] == first.optimizer.param_groups[0]["lr"]
    for _ in range(5):
        first.step()
        resumed.step()
        assert resumed.get_last_values() == first.get_last_values()
        assert resumed.optimizer.param_groups[0]["lr"] == first.optimizer.param_groups[0]["lr"]


def test_adapter_constructed_with_last_step_continues_after_it() -> None:
    adapter = HyperparameterScheduler(
        make_optimizer(lr=1.0), {"lr": exponential_decay(1.0, gamma=0.5)}, last_step=2
    )
    assert adapter.last_step == 3
    assert adapter.optimizer.param_groups[0]["lr"] == 0.125


def test_adapter_raises_value_error_naming_a_missing_hyperparameter() -> None:
    with pytest.raises(ValueError, match=r"'dampening'.*Adam"):
        HyperparameterScheduler(make_optimizer(torch.optim.Adam, lr=0.1), {"dampening": constant(0.1)})


def test_adapter_raises_value_error_for_momentum_without_momentum_or_betas() -> None:
    with pytest.raises(ValueError, match=r"'momentum'.*Adagrad"):
        HyperparameterScheduler(make_optimizer(torch.optim.Adagrad, lr=0.1), {"momentum": constant(0.9)})


def test_adapter_checks_groups_added_after_construction_before_writing_any() -> None:
    optimizer = make_optimizer(lr=1.0)
    adapter = HyperparameterScheduler(optimizer, {"dampening": constant(0.5)})
    optimizer.param_groups.append({"params": [], "lr": 1.0})  # a group without dampening
    with pytest.raises(ValueError, match="param group 1"):
        adapter.step()
    assert optimizer.param_groups[0]["dampening"] == 0.5


def test_adapter_rejects_an_object_that_is_not_an_optimizer() -> None:
    with pytest.raises(TypeError, match="optimizer"):
        HyperparameterScheduler(object(), {"lr": constant(0.1)})  # type: ignore[arg-type]


def test_adapter_rejects_a_last_step_below_minus_one() -> None:
    with pytest.raises(ValueError, match="last_step"):
        HyperparameterScheduler(make_optimizer(lr=0.1), {"lr": constant(0.1)}, last_step=-2)


def test_adapter_keeps_a_tensor_learning_rate_as_the_same_tensor() -> None:
    lr = torch.tensor(1.0)
    optimizer = make_optimizer(torch.optim.Adam, lr=lr)
    HyperparameterScheduler(optimizer, {"lr": constant(0.25)})
    assert optimizer.param_groups[0]["lr"] is lr
    assert lr.item() == 0.25


class DelegatingOptimizer(torch.optim.Optimizer):
    """A wrapper whose param_groups is the inner optimizer's list, read through a property."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:  # no super().__init__: nothing to own
        self.inner = inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.inner.step(closure)


def test_adapter_drives_a_wrapper_whose_param_groups_is_a_property() -> None:
    inner = make_optimizer(lr=1.0, momentum=0.0)
    adapter = HyperparameterScheduler(DelegatingOptimizer(inner), {"lr": exponential_decay(1.0, gamma=0.5)})
    inner.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    adapter.step()
    assert [group["lr"] for group in inner.param_groups] == [0.5, 0.5]
