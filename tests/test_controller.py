"""Specification of adaptive_lr.controller: the pure feedback rule, tested without a model.

Every expectation is derived from the formulas in the controller's module docstring and
from the options, never from a recorded run. Hand-made signal sequences drive `decide`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import fields, replace
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from adaptive_lr.controller import (
    Context,
    ControllerState,
    Decision,
    Signals,
    decide,
    first_step_scale,
    init_state,
    stability_bound,
)
from adaptive_lr.options import COMPONENTS, ControllerOptions

REL_TOL = 1e-9


SGD = Context(lr=0.1, momentum=0.9)
"""Heavy-ball SGD: secant curvature in 1/lr units."""
ADAM = Context(lr=1e-3, momentum=0.9, preconditioned=True, ema_momentum=True)
"""Adam family: preconditioned, EMA momentum (beta1)."""


def only(*components: str, **changes: Any) -> ControllerOptions:
    """Every component off except the named ones, so one rule is tested at a time."""
    return ControllerOptions.all_off(**dict.fromkeys(components, True), **changes)


def feed(
    grad_norms: Iterable[float],
    options: ControllerOptions,
    context: Context = SGD,
    state: ControllerState | None = None,
    **signal_fields: Any,
) -> tuple[list[Decision], ControllerState]:
    """Run decide() over a sequence of grad norms, the other signals constant."""
    state = init_state(options) if state is None else state
    decisions = []
    for grad_norm in grad_norms:
        decision, state = decide(Signals(grad_norm=grad_norm, **signal_fields), state, options, context)
        decisions.append(decision)
    return decisions, state


def steady_norms(steps: int = 40) -> list[float]:
    """A steady run: the norm wobbles by +-10% around 1."""
    return [1.0 + 0.1 * (-1) ** i for i in range(steps)]


def spike_threshold(state: ControllerState, options: ControllerOptions) -> float:
    """The documented threshold on z = log(grad_norm): m + spike_threshold * max(sqrt(v), min_log_std)."""
    std = max(math.sqrt(state.log_norm_var), options.min_log_std)
    return state.log_norm_mean + options.spike_threshold * std


def lr_cap(curvature: float, momentum: float, options: ControllerOptions, context: Context) -> float:
    """Largest lr the governor allows: stability_margin x the base method's stability bound."""
    bound = stability_bound(curvature, momentum, ema_momentum=context.ema_momentum)
    return options.stability_margin * bound


def yellowfin_momentum(kappa: float) -> float:
    return ((math.sqrt(kappa) - 1.0) / (math.sqrt(kappa) + 1.0)) ** 2


def cosine_ema(cosines: Iterable[float], decay: float, start: float = 0.0) -> float:
    value = start
    for cosine in cosines:
        value = decay * value + (1 - decay) * cosine
    return value


def statistics(state: ControllerState) -> tuple[Any, ...]:
    """What the rule has learnt from past signals (everything but the step bookkeeping)."""
    return (
        state.log_norm_mean,
        state.log_norm_var,
        state.norm_count,
        state.curvature,
        state.log_curvature_high,
        state.log_curvature_low,
        state.sharpness,
        state.grad_cosine,
    )


# --- init_state and stability_bound ----------------------------------------------------


def test_init_state_starts_at_initial_lr_multiplier() -> None:
    options = ControllerOptions(initial_lr_multiplier=0.25)
    assert init_state(options).lr_multiplier == 0.25


def test_init_state_starts_with_no_measurements() -> None:
    state = init_state(ControllerOptions())
    assert state.step == 0
    assert state.norm_count == 0
    assert state.curvature is None
    assert state.last_lr is None
    assert state.reference_norm is None


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_heavy_ball_stability_bound_is_two_times_one_plus_momentum_over_curvature(momentum: float) -> None:
    curvature = 40.0
    expected = 2 * (1 + momentum) / curvature
    assert math.isclose(stability_bound(curvature, momentum, ema_momentum=False), expected, rel_tol=REL_TOL)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_ema_momentum_stability_bound_divides_the_heavy_ball_bound_by_one_minus_momentum(
    momentum: float,
) -> None:
    curvature = 40.0
    expected = 2 * (1 + momentum) / ((1 - momentum) * curvature)
    assert math.isclose(stability_bound(curvature, momentum, ema_momentum=True), expected, rel_tol=REL_TOL)


def test_without_momentum_both_bounds_are_gradient_descents_two_over_curvature() -> None:
    curvature = 40.0
    assert stability_bound(curvature, 0.0, ema_momentum=False) == 2 / curvature
    assert stability_bound(curvature, 0.0, ema_momentum=True) == 2 / curvature


# --- non-finite guard ------------------------------------------------------------------


@pytest.mark.parametrize("grad_norm", [math.nan, math.inf, -math.inf])
def test_nonfinite_grad_norm_skips_the_step(grad_norm: float) -> None:
    options = ControllerOptions()
    decision, _ = decide(Signals(grad_norm=grad_norm), init_state(options), options, SGD)
    assert decision.skip
    assert decision.event == "skip"


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_nonfinite_loss_skips_the_step(loss: float) -> None:
    options = ControllerOptions()
    decision, _ = decide(Signals(grad_norm=1.0, loss=loss), init_state(options), options, SGD)
    assert decision.skip
    assert decision.event == "skip"


def test_skip_multiplies_the_multiplier_by_skip_backoff() -> None:
    options = ControllerOptions(initial_lr_multiplier=2.0, skip_backoff=0.3)
    decision, state = decide(Signals(grad_norm=math.nan), init_state(options), options, SGD)
    assert decision.lr_multiplier == 2.0 * options.skip_backoff
    assert state.lr_multiplier == decision.lr_multiplier


def test_skip_backoff_is_clamped_at_min_lr_multiplier() -> None:
    options = ControllerOptions(initial_lr_multiplier=0.1, min_lr_multiplier=0.08, skip_backoff=0.5)
    decision, _ = decide(Signals(grad_norm=math.inf), init_state(options), options, SGD)
    assert decision.lr_multiplier == options.min_lr_multiplier


def test_skip_leaves_the_statistics_unchanged() -> None:
    options = ControllerOptions()
    _, before = feed(steady_norms(), options, curvature=5.0, grad_cosine=0.5, sharpness=7.0)
    poisoned = Signals(grad_norm=math.nan, curvature=1e9, grad_cosine=-1.0, sharpness=1e9, step_size=1.0)
    _, after = decide(poisoned, before, options, SGD)
    assert statistics(after) == statistics(before)


def test_skip_starts_a_cooldown_without_growth() -> None:
    options = only("skip_nonfinite", "recovery", cooldown_steps=3)
    _, state = feed([1.0] * 5, options, grad_cosine=1.0)
    skipped, state = decide(Signals(grad_norm=math.nan), state, options, SGD)
    during, _ = feed([1.0] * options.cooldown_steps, options, state=state, grad_cosine=1.0)
    assert all(d.lr_multiplier == skipped.lr_multiplier for d in during)


@pytest.mark.parametrize("grad_norm", [math.nan, math.inf])
def test_nonfinite_grad_norm_is_not_skipped_when_skip_nonfinite_is_off(grad_norm: float) -> None:
    options = ControllerOptions(skip_nonfinite=False)
    decision, _ = decide(Signals(grad_norm=grad_norm), init_state(options), options, SGD)
    assert not decision.skip
    assert decision.event != "skip"


def test_nonfinite_loss_is_not_skipped_when_skip_nonfinite_is_off() -> None:
    options = ControllerOptions(skip_nonfinite=False)
    decision, _ = decide(Signals(grad_norm=1.0, loss=math.nan), init_state(options), options, SGD)
    assert not decision.skip


def test_nonfinite_grad_norm_leaves_the_norm_statistics_unchanged_when_skip_nonfinite_is_off() -> None:
    options = ControllerOptions(skip_nonfinite=False)
    _, before = feed(steady_norms(), options)
    _, after = decide(Signals(grad_norm=math.inf), before, options, SGD)
    assert (after.log_norm_mean, after.log_norm_var, after.norm_count) == (
        before.log_norm_mean,
        before.log_norm_var,
        before.norm_count,
    )


# --- explosion guard -------------------------------------------------------------------


def spike_setup(**changes: Any) -> tuple[ControllerOptions, ControllerState, float]:
    """Options with only the spike guard, the state after a steady run, and its threshold."""
    options = only("spike_guard", **changes)
    _, state = feed(steady_norms(), options)
    return options, state, spike_threshold(state, options)


def test_norm_above_the_running_threshold_is_a_spike() -> None:
    options, state, threshold = spike_setup()
    decision, _ = decide(Signals(grad_norm=math.exp(threshold) * 1.01), state, options, SGD)
    assert decision.event == "spike"
    assert not decision.skip


def test_norm_below_the_running_threshold_is_not_a_spike() -> None:
    options, state, threshold = spike_setup()
    decision, _ = decide(Signals(grad_norm=math.exp(threshold) * 0.99), state, options, SGD)
    assert decision.event is None
    assert decision.clip_coef == 1.0


def test_spike_clip_coef_is_exp_of_threshold_minus_log_norm() -> None:
    options, state, threshold = spike_setup()
    grad_norm = 1e6
    decision, _ = decide(Signals(grad_norm=grad_norm), state, options, SGD)
    assert math.isclose(decision.clip_coef, math.exp(threshold - math.log(grad_norm)), rel_tol=REL_TOL)


def test_spike_is_clipped_down_to_exp_of_the_threshold() -> None:
    options, state, threshold = spike_setup()
    grad_norm = 1e6
    decision, _ = decide(Signals(grad_norm=grad_norm), state, options, SGD)
    assert math.isclose(grad_norm * decision.clip_coef, math.exp(threshold), rel_tol=REL_TOL)


def test_spike_cuts_the_multiplier_by_spike_backoff() -> None:
    options, state, _ = spike_setup(spike_backoff=0.3, skip_backoff=0.3)
    decision, new_state = decide(Signals(grad_norm=1e6), state, options, SGD)
    assert decision.lr_multiplier == state.lr_multiplier * options.spike_backoff
    assert new_state.lr_multiplier == decision.lr_multiplier


def test_spike_backoff_is_clamped_at_min_lr_multiplier() -> None:
    options, state, _ = spike_setup(initial_lr_multiplier=0.1, min_lr_multiplier=0.08)
    decision, _ = decide(Signals(grad_norm=1e6), state, options, SGD)
    assert decision.lr_multiplier == options.min_lr_multiplier


def test_statistics_are_fed_the_threshold_whatever_the_spike_size() -> None:
    options, state, _ = spike_setup()
    _, after_large = decide(Signals(grad_norm=1e3), state, options, SGD)
    _, after_huge = decide(Signals(grad_norm=1e30), state, options, SGD)
    assert (after_huge.log_norm_mean, after_huge.log_norm_var) == (
        after_large.log_norm_mean,
        after_large.log_norm_var,
    )


def test_one_spike_moves_the_statistics_no_more_than_a_norm_at_the_threshold() -> None:
    options, state, threshold = spike_setup()
    _, after_spike = decide(Signals(grad_norm=1e30), state, options, SGD)
    _, after_threshold = decide(Signals(grad_norm=math.exp(threshold)), state, options, SGD)
    assert math.isclose(after_spike.log_norm_mean, after_threshold.log_norm_mean, rel_tol=REL_TOL)
    assert math.isclose(after_spike.log_norm_var, after_threshold.log_norm_var, rel_tol=REL_TOL)


def test_first_grad_norm_is_never_a_spike() -> None:
    options = only("spike_guard")
    decision, _ = decide(Signals(grad_norm=1e30), init_state(options), options, SGD)
    assert decision.event is None
    assert decision.clip_coef == 1.0


def test_no_spike_test_before_warmup_steps_samples() -> None:
    options = only("spike_guard", warmup_steps=5)
    _, state = feed([1.0] * (options.warmup_steps - 1), options)
    decision, _ = decide(Signals(grad_norm=1e30), state, options, SGD)
    assert decision.event is None
    assert decision.clip_coef == 1.0


def test_spike_test_starts_after_warmup_steps_samples() -> None:
    options = only("spike_guard", warmup_steps=5)
    _, state = feed([1.0] * options.warmup_steps, options)
    decision, _ = decide(Signals(grad_norm=1e30), state, options, SGD)
    assert decision.event == "spike"


def test_spike_guard_off_neither_clips_nor_cuts() -> None:
    options = ControllerOptions.all_off()
    _, state = feed(steady_norms(), options)
    decision, _ = decide(Signals(grad_norm=1e30), state, options, SGD)
    assert decision.event is None
    assert decision.clip_coef == 1.0
    assert decision.lr_multiplier == state.lr_multiplier


def test_zero_grad_norm_leaves_the_norm_statistics_unchanged() -> None:
    options, state, _ = spike_setup()
    decision, after = decide(Signals(grad_norm=0.0), state, options, SGD)
    assert decision.clip_coef == 1.0
    assert (after.log_norm_mean, after.log_norm_var, after.norm_count) == (
        state.log_norm_mean,
        state.log_norm_var,
        state.norm_count,
    )


def test_max_grad_norm_clips_to_the_cap_with_event_clip() -> None:
    options = only(max_grad_norm=2.0)
    decision, _ = decide(Signals(grad_norm=5.0), init_state(options), options, SGD)
    assert decision.event == "clip"
    assert decision.clip_coef == options.max_grad_norm / 5.0


def test_max_grad_norm_leaves_a_norm_below_the_cap() -> None:
    options = only(max_grad_norm=2.0)
    decision, _ = decide(Signals(grad_norm=1.5), init_state(options), options, SGD)
    assert decision.event is None
    assert decision.clip_coef == 1.0


def test_max_grad_norm_tightens_a_spike_clip_that_is_still_above_it() -> None:
    options, state, threshold = spike_setup(max_grad_norm=1.0)
    assert math.exp(threshold) > options.max_grad_norm
    decision, _ = decide(Signals(grad_norm=1e6), state, options, SGD)
    assert decision.event == "spike"
    assert decision.clip_coef == options.max_grad_norm / 1e6


def test_infinite_grad_norm_is_not_zeroed_by_max_grad_norm_when_skip_nonfinite_is_off() -> None:
    # A non-finite norm carries no scale (the explosion guard leaves it at clip_coef 1.0);
    # max_grad_norm / inf = 0.0 would zero the finite entries and turn inf entries into NaN.
    options = ControllerOptions(skip_nonfinite=False, max_grad_norm=1.0)
    decision, _ = decide(Signals(grad_norm=math.inf), init_state(options), options, SGD)
    assert 0.0 < decision.clip_coef <= 1.0


# --- curvature governor ----------------------------------------------------------------


def test_governor_keeps_the_heavy_ball_lr_at_the_stability_margin_of_the_bound() -> None:
    options = only("curvature_governor", initial_lr_multiplier=10.0)
    curvature = 100.0
    decisions, _ = feed([1.0] * 3, options, curvature=curvature)
    cap = lr_cap(curvature, SGD.momentum, options, SGD)
    assert SGD.lr * options.initial_lr_multiplier > cap  # the cap binds
    assert decisions[0].event == "curvature_cap"
    for decision in decisions:
        assert math.isclose(SGD.lr * decision.lr_multiplier, cap, rel_tol=REL_TOL)


def test_governor_bound_uses_the_momentum_it_decides() -> None:
    options = only("curvature_governor", "momentum_control", initial_lr_multiplier=10.0)
    decisions, _ = feed([1.0] * 5, options, curvature=100.0, grad_cosine=-0.8)
    for decision in decisions:
        assert decision.momentum < SGD.momentum  # oscillation lowered it
        cap = lr_cap(decision.curvature, decision.momentum, options, SGD)
        assert math.isclose(SGD.lr * decision.lr_multiplier, cap, rel_tol=REL_TOL)


def test_governor_uses_the_ema_momentum_bound_for_the_adam_family() -> None:
    options = only("curvature_governor", initial_lr_multiplier=1000.0)
    state = replace(init_state(options), last_lr=ADAM.lr)
    step_sharpness = 0.5
    decision, _ = decide(Signals(grad_norm=1.0, step_sharpness=step_sharpness), state, options, ADAM)
    cap = lr_cap(step_sharpness / ADAM.lr, ADAM.momentum, options, ADAM)
    assert decision.event == "curvature_cap"
    assert math.isclose(ADAM.lr * decision.lr_multiplier, cap, rel_tol=REL_TOL)


def test_lr_below_the_stability_margin_is_not_capped() -> None:
    options = only("curvature_governor")
    curvature = 0.5 * lr_cap(1.0, SGD.momentum, options, SGD) / SGD.lr  # bound at twice the lr
    decision, _ = decide(Signals(grad_norm=1.0, curvature=curvature), init_state(options), options, SGD)
    assert decision.event is None
    assert decision.lr_multiplier == options.initial_lr_multiplier


def test_secant_curvature_estimate_is_the_ema_of_the_samples() -> None:
    options = only("curvature_governor")
    state = init_state(options)
    samples = [10.0, 30.0, 20.0]
    for sample in samples:
        decision, state = decide(Signals(grad_norm=1.0, curvature=sample), state, options, SGD)
    decay = options.curvature_decay
    expected = samples[0]
    for sample in samples[1:]:
        expected = decay * expected + (1 - decay) * sample
    assert math.isclose(decision.curvature, expected, rel_tol=REL_TOL)


def test_preconditioned_curvature_sample_is_step_sharpness_over_last_lr() -> None:
    options = only("curvature_governor")
    last_lr = 2e-3
    state = replace(init_state(options), last_lr=last_lr)
    decision, _ = decide(Signals(grad_norm=1.0, step_sharpness=0.3), state, options, ADAM)
    assert math.isclose(decision.curvature, 0.3 / last_lr, rel_tol=REL_TOL)


def test_preconditioned_context_ignores_the_secant_curvature() -> None:
    options = only("curvature_governor")
    state = replace(init_state(options), last_lr=ADAM.lr)
    decision, _ = decide(Signals(grad_norm=1.0, curvature=1e6), state, options, ADAM)
    assert decision.curvature is None
    assert decision.lr_multiplier == options.initial_lr_multiplier


def test_preconditioned_curvature_needs_a_last_lr() -> None:
    options = only("curvature_governor")
    decision, _ = decide(Signals(grad_norm=1.0, step_sharpness=0.3), init_state(options), options, ADAM)
    assert decision.curvature is None


def test_governor_off_leaves_the_multiplier_uncapped() -> None:
    options = ControllerOptions.all_off(initial_lr_multiplier=10.0)
    decisions, _ = feed([1.0] * 3, options, curvature=1e6, sharpness=1e6)
    assert all(d.lr_multiplier == options.initial_lr_multiplier for d in decisions)
    assert all(d.event is None for d in decisions)


def test_probe_sharpness_above_the_secant_estimate_governs() -> None:
    options = only("curvature_governor", initial_lr_multiplier=10.0)
    secant, sharpness = 10.0, 100.0
    decision, _ = decide(
        Signals(grad_norm=1.0, curvature=secant, sharpness=sharpness), init_state(options), options, SGD
    )
    assert decision.curvature == sharpness
    assert math.isclose(
        SGD.lr * decision.lr_multiplier, lr_cap(sharpness, SGD.momentum, options, SGD), rel_tol=REL_TOL
    )


def test_probe_sharpness_below_the_secant_estimate_does_not_govern() -> None:
    options = only("curvature_governor", initial_lr_multiplier=10.0)
    secant, sharpness = 100.0, 10.0
    decision, _ = decide(
        Signals(grad_norm=1.0, curvature=secant, sharpness=sharpness), init_state(options), options, SGD
    )
    assert decision.curvature == secant


def test_probe_sharpness_keeps_governing_until_the_next_probe() -> None:
    options = only("curvature_governor")
    _, state = decide(Signals(grad_norm=1.0, sharpness=100.0), init_state(options), options, SGD)
    decision, _ = decide(Signals(grad_norm=1.0, curvature=10.0), state, options, SGD)
    assert decision.curvature == 100.0


@pytest.mark.parametrize("curvature", [0.0, -50.0])
def test_non_positive_curvature_sets_no_cap(curvature: float) -> None:
    options = only("curvature_governor", initial_lr_multiplier=10.0)
    decision, _ = decide(Signals(grad_norm=1.0, curvature=curvature), init_state(options), options, SGD)
    assert decision.curvature is None
    assert decision.lr_multiplier == options.initial_lr_multiplier


@given(
    curvatures=st.lists(st.floats(min_value=1e-3, max_value=1e6), min_size=1, max_size=30),
    cosines=st.lists(st.floats(min_value=-1.0, max_value=1.0), min_size=30, max_size=30),
    ema_momentum=st.booleans(),
)
def test_lr_never_exceeds_the_stability_margin_of_the_bound_for_any_curvature_sequence(
    curvatures: list[float], cosines: list[float], ema_momentum: bool
) -> None:
    options = ControllerOptions(update_guard=False, min_lr_multiplier=1e-12, initial_lr_multiplier=100.0)
    context = Context(lr=0.1, momentum=0.9, ema_momentum=ema_momentum)
    state = init_state(options)
    for curvature, cosine in zip(curvatures, cosines, strict=False):
        signals = Signals(grad_norm=1.0, curvature=curvature, grad_cosine=cosine)
        decision, state = decide(signals, state, options, context)
        cap = lr_cap(decision.curvature, decision.momentum, options, context)
        assert context.lr * decision.lr_multiplier <= cap * (1 + REL_TOL)


# --- update guard ----------------------------------------------------------------------


def test_first_step_scale_shortens_a_step_longer_than_the_limit() -> None:
    options = ControllerOptions()
    state = replace(init_state(options), lr_multiplier=2.0, last_lr=0.2)
    param_norm, step_size = 10.0, 4.0
    limit = options.max_update_ratio * param_norm
    scale, new_state = first_step_scale(step_size, param_norm, state, options)
    assert math.isclose(scale, limit / step_size, rel_tol=REL_TOL)
    assert math.isclose(new_state.lr_multiplier, 2.0 * scale, rel_tol=REL_TOL)
    assert math.isclose(new_state.last_lr, 0.2 * scale, rel_tol=REL_TOL)


def test_first_step_scale_leaves_a_step_within_the_limit() -> None:
    options = ControllerOptions()
    state = replace(init_state(options), last_lr=0.1)
    param_norm = 10.0
    scale, new_state = first_step_scale(
        0.5 * options.max_update_ratio * param_norm, param_norm, state, options
    )
    assert scale == 1.0
    assert (new_state.lr_multiplier, new_state.last_lr) == (state.lr_multiplier, state.last_lr)


def test_first_step_scale_sets_the_reference_norm() -> None:
    options = ControllerOptions()
    _, state = first_step_scale(0.01, 10.0, init_state(options), options)
    assert state.reference_norm == 10.0


def test_first_step_scale_with_zero_param_norm_keeps_the_step_and_sets_no_reference() -> None:
    options = ControllerOptions()
    scale, state = first_step_scale(4.0, 0.0, init_state(options), options)
    assert scale == 1.0
    assert state.reference_norm is None


def test_first_step_scale_never_takes_the_multiplier_below_its_floor() -> None:
    options = ControllerOptions(min_lr_multiplier=0.5)
    scale, state = first_step_scale(1e6, 1.0, init_state(options), options)
    assert scale < 1.0
    assert math.isclose(state.lr_multiplier, options.min_lr_multiplier, rel_tol=REL_TOL)


def test_first_step_scale_with_update_guard_off_keeps_the_step() -> None:
    options = ControllerOptions(update_guard=False)
    scale, state = first_step_scale(1e6, 1.0, init_state(options), options)
    assert scale == 1.0
    assert state.lr_multiplier == options.initial_lr_multiplier


def guarded_state(options: ControllerOptions, reference_norm: float = 10.0) -> ControllerState:
    """The state after a first step taken at SGD.lr with a reference norm."""
    return replace(init_state(options), reference_norm=reference_norm, last_lr=SGD.lr)


def predicted_step_size(step_size: float, state: ControllerState, decision: Decision) -> float:
    """The documented prediction: last step's size scaled by the ratio of learning rates."""
    return step_size / state.last_lr * SGD.lr * decision.lr_multiplier


def test_update_guard_caps_the_predicted_step_at_the_limit() -> None:
    options = only("update_guard", initial_lr_multiplier=4.0)
    state = guarded_state(options)
    limit = options.max_update_ratio * state.reference_norm
    step_size = 2.0 * limit  # at the last lr; 8x the limit at the initial multiplier
    decision, _ = decide(Signals(grad_norm=1.0, step_size=step_size), state, options, SGD)
    assert decision.event == "update_cap"
    assert math.isclose(predicted_step_size(step_size, state, decision), limit, rel_tol=REL_TOL)


def test_update_guard_leaves_a_predicted_step_within_the_limit() -> None:
    options = only("update_guard")
    state = guarded_state(options)
    step_size = 0.5 * options.max_update_ratio * state.reference_norm
    decision, _ = decide(Signals(grad_norm=1.0, step_size=step_size), state, options, SGD)
    assert decision.event is None
    assert decision.lr_multiplier == state.lr_multiplier


def test_update_guard_off_leaves_a_long_step_uncapped() -> None:
    options = ControllerOptions.all_off()
    state = guarded_state(options)
    decision, _ = decide(Signals(grad_norm=1.0, step_size=1e6), state, options, SGD)
    assert decision.event is None
    assert decision.lr_multiplier == state.lr_multiplier


def test_update_guard_needs_a_reference_norm() -> None:
    options = only("update_guard")
    state = replace(init_state(options), last_lr=SGD.lr)
    decision, _ = decide(Signals(grad_norm=1.0, step_size=1e6), state, options, SGD)
    assert decision.lr_multiplier == state.lr_multiplier


@pytest.mark.parametrize(("curvature", "binding"), [(1e4, "curvature_cap"), (1.0, "update_cap")])
def test_the_tighter_of_the_two_caps_binds(curvature: float, binding: str) -> None:
    options = only("update_guard", "curvature_governor", initial_lr_multiplier=100.0)
    state = guarded_state(options)
    step_size = options.max_update_ratio * state.reference_norm
    signals = Signals(grad_norm=1.0, step_size=step_size, curvature=curvature)
    decision, _ = decide(signals, state, options, SGD)
    curvature_cap = lr_cap(curvature, SGD.momentum, options, SGD) / SGD.lr
    update_cap = options.max_update_ratio * state.reference_norm / (step_size / state.last_lr * SGD.lr)
    assert decision.event == binding
    assert math.isclose(decision.lr_multiplier, min(curvature_cap, update_cap), rel_tol=REL_TOL)


# --- recovery --------------------------------------------------------------------------


def test_recovery_grows_the_multiplier_by_exp_growth_rate_times_mean_cosine() -> None:
    options = only("recovery")
    cosine = 0.6
    decision, _ = decide(Signals(grad_norm=1.0, grad_cosine=cosine), init_state(options), options, SGD)
    mean_cosine = cosine_ema([cosine], options.cosine_decay)
    expected = options.initial_lr_multiplier * math.exp(options.growth_rate * mean_cosine)
    assert math.isclose(decision.lr_multiplier, expected, rel_tol=REL_TOL)


def test_recovery_grows_at_most_exp_growth_rate_per_step() -> None:
    options = only("recovery", growth_rate=0.1)
    decisions, _ = feed([1.0] * 60, options, grad_cosine=1.0)
    multipliers = [options.initial_lr_multiplier] + [d.lr_multiplier for d in decisions]
    for before, after in itertools.pairwise(multipliers):
        assert before < after <= before * math.exp(options.growth_rate) * (1 + REL_TOL)


def test_recovery_never_grows_above_max_lr_multiplier() -> None:
    options = only("recovery", growth_rate=0.5, max_lr_multiplier=3.0)
    decisions, _ = feed([1.0] * 60, options, grad_cosine=1.0)
    assert max(d.lr_multiplier for d in decisions) == options.max_lr_multiplier


def test_recovery_never_grows_above_the_curvature_cap() -> None:
    options = only("recovery", "curvature_governor", growth_rate=0.5)
    curvature = 1.0
    decisions, _ = feed([1.0] * 60, options, grad_cosine=1.0, curvature=curvature)
    cap = lr_cap(curvature, SGD.momentum, options, SGD) / SGD.lr
    assert options.initial_lr_multiplier < cap < options.max_lr_multiplier
    assert all(d.lr_multiplier <= cap * (1 + REL_TOL) for d in decisions)
    assert math.isclose(decisions[-1].lr_multiplier, cap, rel_tol=REL_TOL)


def test_recovery_may_grow_from_the_first_step() -> None:
    options = only("recovery")
    decision, _ = decide(Signals(grad_norm=1.0, grad_cosine=1.0), init_state(options), options, SGD)
    assert decision.lr_multiplier > options.initial_lr_multiplier


def test_no_growth_during_cooldown_steps_after_a_spike() -> None:
    options = only("recovery", "spike_guard", cooldown_steps=5)
    _, state = feed(steady_norms(), options, grad_cosine=1.0)
    spiked, state = decide(Signals(grad_norm=1e6, grad_cosine=1.0), state, options, SGD)
    assert spiked.event == "spike"
    during, _ = feed([1.0] * options.cooldown_steps, options, state=state, grad_cosine=1.0)
    assert all(d.lr_multiplier == spiked.lr_multiplier for d in during)


def test_growth_resumes_once_the_cooldown_is_over() -> None:
    options = only("recovery", "spike_guard", cooldown_steps=5)
    _, state = feed(steady_norms(), options, grad_cosine=1.0)
    spiked, state = decide(Signals(grad_norm=1e6, grad_cosine=1.0), state, options, SGD)
    decisions, _ = feed([1.0] * (options.cooldown_steps + 1), options, state=state, grad_cosine=1.0)
    assert decisions[-1].lr_multiplier > spiked.lr_multiplier


def test_negative_mean_cosine_shrinks_the_multiplier_without_deadband() -> None:
    options = only("recovery", recovery_deadband=0.0)
    decisions, _ = feed([1.0] * 10, options, grad_cosine=-0.5)
    multipliers = [options.initial_lr_multiplier] + [d.lr_multiplier for d in decisions]
    assert all(after < before for before, after in itertools.pairwise(multipliers))


def test_zero_mean_cosine_leaves_the_multiplier_unchanged() -> None:
    options = only("recovery")
    decisions, _ = feed([1.0] * 10, options, grad_cosine=0.0)
    assert all(d.lr_multiplier == options.initial_lr_multiplier for d in decisions)


def test_recovery_off_keeps_the_multiplier_constant_in_a_stable_run() -> None:
    options = ControllerOptions(recovery=False, initial_lr_multiplier=0.5)
    decisions, _ = feed(steady_norms(), options, grad_cosine=1.0)
    assert all(d.lr_multiplier == options.initial_lr_multiplier for d in decisions)


def test_too_low_learning_rate_is_corrected_upward_over_many_steps() -> None:
    options = ControllerOptions(initial_lr_multiplier=0.01)
    cosine = 0.5  # steps keep pointing the same way: the lr is too small
    target = 1.0
    # Growth is at least exp(growth_rate * cosine / 2) per step once the cosine EMA reaches half of it.
    ema_steps = math.ceil(math.log(2) / -math.log(options.cosine_decay))
    growth_steps = math.ceil(math.log(target / 0.01) / (options.growth_rate * cosine / 2))
    decisions, _ = feed(steady_norms(ema_steps + growth_steps), options, grad_cosine=cosine)
    multipliers = [d.lr_multiplier for d in decisions]
    assert all(after > before for before, after in itertools.pairwise(multipliers))
    assert multipliers[-1] >= target


def _recovery_multiplier(cosines: Iterable[float], options: ControllerOptions) -> float:
    """The multiplier after plain recovery steps, from the documented formula."""
    multiplier, mean = options.initial_lr_multiplier, 0.0
    for cosine in cosines:
        mean = options.cosine_decay * mean + (1 - options.cosine_decay) * cosine
        effective = min(mean + options.recovery_deadband, 0.0) if mean < 0 else mean
        multiplier *= math.exp(options.growth_rate * effective)
    return multiplier


@pytest.mark.parametrize("cosine", [-0.01, -0.05, -0.1])
def test_negative_mean_cosine_inside_the_deadband_leaves_the_multiplier_unchanged(cosine: float) -> None:
    options = only("recovery", recovery_deadband=0.1)
    decisions, _ = feed([1.0] * 50, options, grad_cosine=cosine)
    assert all(d.lr_multiplier == options.initial_lr_multiplier for d in decisions)


def test_negative_mean_cosine_beyond_the_deadband_shrinks_by_the_excess() -> None:
    options = only("recovery", recovery_deadband=0.1)
    cosines = [-0.5] * 30
    decisions, _ = feed([1.0] * len(cosines), options, grad_cosine=-0.5)
    expected = _recovery_multiplier(cosines, options)
    assert expected < options.initial_lr_multiplier
    assert math.isclose(decisions[-1].lr_multiplier, expected, rel_tol=REL_TOL)
    # Without the deadband the same run shrinks more.
    plain, _ = feed([1.0] * len(cosines), only("recovery", recovery_deadband=0.0), grad_cosine=-0.5)
    assert plain[-1].lr_multiplier < decisions[-1].lr_multiplier


def test_deadband_does_not_change_growth_on_positive_mean_cosine() -> None:
    with_band, _ = feed([1.0] * 20, only("recovery", recovery_deadband=0.3), grad_cosine=0.4)
    without, _ = feed([1.0] * 20, only("recovery"), grad_cosine=0.4)
    assert [d.lr_multiplier for d in with_band] == [d.lr_multiplier for d in without]


def test_cap_approach_closes_a_share_of_the_log_gap_to_the_curvature_cap() -> None:
    options = only("recovery", "curvature_governor", cap_approach=0.3, growth_rate=0.05)
    curvature, cosine = 1e-2, 0.8
    decision, _ = decide(
        Signals(grad_norm=1.0, grad_cosine=cosine, curvature=curvature), init_state(options), options, SGD
    )
    cap = lr_cap(curvature, SGD.momentum, options, SGD) / SGD.lr
    mean = cosine_ema([cosine], options.cosine_decay)
    log_step = max(options.growth_rate * mean, options.cap_approach * mean * math.log(cap))
    assert log_step > options.growth_rate * mean  # far below the cap: the approach term wins
    assert math.isclose(decision.lr_multiplier, math.exp(log_step), rel_tol=REL_TOL)


def test_cap_approach_is_plain_recovery_when_the_cap_is_near() -> None:
    # One step of exp(growth * c) already exceeds approach * c * log(cap / multiplier).
    options = only("recovery", "curvature_governor", cap_approach=0.01, growth_rate=0.05)
    curvature = 1.0
    cap = lr_cap(curvature, SGD.momentum, options, SGD) / SGD.lr
    assert options.cap_approach * math.log(cap) < options.growth_rate
    decision, _ = decide(
        Signals(grad_norm=1.0, grad_cosine=1.0, curvature=curvature), init_state(options), options, SGD
    )
    expected = math.exp(options.growth_rate * cosine_ema([1.0], options.cosine_decay))
    assert math.isclose(decision.lr_multiplier, expected, rel_tol=REL_TOL)


@given(
    approach=st.floats(min_value=0.0, max_value=1.0),
    cosine=st.floats(min_value=-1.0, max_value=1.0),
    log10_curvature=st.floats(min_value=-6.0, max_value=6.0),
)
def test_multiplier_never_exceeds_the_curvature_cap_whatever_the_cap_approach(
    approach: float, cosine: float, log10_curvature: float
) -> None:
    options = only("recovery", "curvature_governor", cap_approach=approach, max_lr_multiplier=1e12)
    curvature = 10.0**log10_curvature
    decisions, _ = feed([1.0] * 30, options, grad_cosine=cosine, curvature=curvature)
    cap = max(lr_cap(curvature, SGD.momentum, options, SGD) / SGD.lr, options.min_lr_multiplier)
    assert all(d.lr_multiplier <= max(cap, options.initial_lr_multiplier) * (1 + REL_TOL) for d in decisions)
    assert decisions[-1].lr_multiplier <= cap * (1 + REL_TOL)


def test_cap_approach_does_not_act_on_negative_mean_cosine() -> None:
    options = only("recovery", "curvature_governor", cap_approach=1.0, recovery_deadband=0.0)
    decisions, _ = feed([1.0] * 10, options, grad_cosine=-0.5, curvature=1e-3)
    multipliers = [options.initial_lr_multiplier] + [d.lr_multiplier for d in decisions]
    assert all(after < before for before, after in itertools.pairwise(multipliers))


def _spiked(options: ControllerOptions) -> tuple[Decision, ControllerState, float]:
    """A steady run, then one spike: (the spike's decision, the state after it, the multiplier before)."""
    _, state = feed(steady_norms(), options, grad_cosine=0.0)
    before = state.lr_multiplier
    spiked, state = decide(Signals(grad_norm=1e6, grad_cosine=0.0), state, options, SGD)
    assert spiked.event == "spike"
    return spiked, state, before


def test_an_isolated_spike_cut_is_given_back_after_a_quiet_cooldown() -> None:
    options = only("spike_guard", "recovery", cooldown_steps=5)
    spiked, state, before = _spiked(options)
    assert spiked.lr_multiplier == pytest.approx(before * options.spike_backoff)
    give_back = math.ceil(math.log(1 / options.spike_backoff) / options.growth_rate)
    decisions, state = feed(
        [1.0] * (options.cooldown_steps + give_back), options, state=state, grad_cosine=0.0
    )
    multipliers = [d.lr_multiplier for d in decisions]
    assert multipliers[: options.cooldown_steps] == [spiked.lr_multiplier] * options.cooldown_steps
    assert all(m <= before * (1 + REL_TOL) for m in multipliers)
    assert multipliers[-1] == pytest.approx(before, rel=REL_TOL)
    assert state.restore_multiplier is None


def test_a_skip_cut_is_given_back_after_a_quiet_cooldown() -> None:
    options = only("skip_nonfinite", "recovery", cooldown_steps=3)
    skipped, state = decide(Signals(grad_norm=math.nan), init_state(options), options, SGD)
    assert skipped.skip
    decisions, _ = feed([1.0] * 40, options, state=state, grad_cosine=0.0)
    assert decisions[-1].lr_multiplier == pytest.approx(options.initial_lr_multiplier, rel=REL_TOL)


def test_a_spike_while_giving_back_lowers_the_target_by_the_backoff() -> None:
    options = only("spike_guard", "recovery", cooldown_steps=5)
    _, state, before = _spiked(options)
    _, state = feed([1.0] * (options.cooldown_steps + 2), options, state=state, grad_cosine=0.0)
    assert state.lr_multiplier < before  # still giving back
    again, state = decide(Signals(grad_norm=1e6, grad_cosine=0.0), state, options, SGD)
    assert again.event == "spike"
    decisions, _ = feed([1.0] * 200, options, state=state, grad_cosine=0.0)
    assert decisions[-1].lr_multiplier == pytest.approx(before * options.spike_backoff, rel=REL_TOL)


def test_without_restore_after_event_a_cut_is_kept_when_nothing_else_grows_it() -> None:
    options = only("spike_guard", "recovery", cooldown_steps=5, restore_after_event=False)
    spiked, state, _ = _spiked(options)
    decisions, _ = feed([1.0] * 100, options, state=state, grad_cosine=0.0)
    assert all(d.lr_multiplier == spiked.lr_multiplier for d in decisions)


def test_the_secant_after_a_spike_is_not_a_curvature_sample() -> None:
    options = only("spike_guard", "curvature_governor")
    _, state = feed(steady_norms(), options, curvature=1.0)
    spiked, state = decide(Signals(grad_norm=1e6, curvature=1.0), state, options, SGD)
    assert spiked.event == "spike"
    curvature = state.curvature
    # The pair (spike gradient, this gradient) reads a huge secant: it is not a sample.
    _, state = decide(Signals(grad_norm=1.0, curvature=1e6), state, options, SGD)
    assert state.curvature == curvature
    _, state = decide(Signals(grad_norm=1.0, curvature=2.0), state, options, SGD)
    assert state.curvature != curvature


# --- momentum --------------------------------------------------------------------------


def test_momentum_equals_the_users_when_momentum_control_is_off() -> None:
    options = ControllerOptions(momentum_control=False)
    decisions, _ = feed([1.0] * 5, options, curvature=1.0, grad_cosine=-1.0)
    decisions += feed([1.0] * 5, options, curvature=1e4, grad_cosine=-1.0)[0]
    assert all(d.momentum == SGD.momentum for d in decisions)


def test_momentum_is_none_when_the_optimizer_has_none() -> None:
    options = ControllerOptions()
    context = Context(lr=0.1, momentum=None)
    decision, _ = decide(Signals(grad_norm=1.0, curvature=1.0), init_state(options), options, context)
    assert decision.momentum is None


def test_oscillation_lowers_momentum_by_the_mean_negative_cosine() -> None:
    options = only("momentum_control")
    cosines = [-0.8, -0.4, -0.6]
    state = init_state(options)
    for cosine in cosines:
        decision, state = decide(Signals(grad_norm=1.0, grad_cosine=cosine), state, options, SGD)
    mean_cosine = cosine_ema(cosines, options.cosine_decay)
    assert mean_cosine < 0.0
    assert math.isclose(decision.momentum, SGD.momentum * (1 + mean_cosine), rel_tol=REL_TOL)


def test_positive_mean_cosine_leaves_the_users_momentum() -> None:
    options = only("momentum_control")
    decisions, _ = feed([1.0] * 5, options, grad_cosine=0.7)
    assert all(d.momentum == SGD.momentum for d in decisions)


def curvature_range_momentum(
    samples: list[float], user_momentum: float, ema_momentum: bool = False, **changes: Any
) -> tuple[Decision, ControllerState]:
    """The decision and state after secant curvature samples, momentum control alone."""
    options = only("momentum_control", **changes)
    context = Context(lr=0.1, momentum=user_momentum, ema_momentum=ema_momentum)
    state = init_state(options)
    for sample in samples:
        decision, state = decide(Signals(grad_norm=1.0, curvature=sample), state, options, context)
    return decision, state


def test_wide_curvature_range_raises_heavy_ball_momentum_to_yellowfins_rule() -> None:
    user_momentum = 0.1
    decision, state = curvature_range_momentum([1.0, 1e4, 1.0, 1e4], user_momentum)
    kappa = math.exp(state.log_curvature_high - state.log_curvature_low)  # h_high / h_low
    assert kappa > 100.0
    assert decision.momentum > user_momentum
    assert math.isclose(decision.momentum, yellowfin_momentum(kappa), rel_tol=REL_TOL)


def test_curvature_range_never_lowers_the_users_momentum() -> None:
    user_momentum = 0.9
    decision, state = curvature_range_momentum([1.0, 2.0, 1.0, 2.0], user_momentum)
    kappa = math.exp(state.log_curvature_high - state.log_curvature_low)
    assert yellowfin_momentum(kappa) < user_momentum
    assert decision.momentum == user_momentum


def test_lower_momentum_lets_the_curvature_range_set_momentum_below_the_users() -> None:
    user_momentum = 0.9
    decision, state = curvature_range_momentum([1.0, 2.0, 1.0, 2.0], user_momentum, lower_momentum=True)
    kappa = math.exp(state.log_curvature_high - state.log_curvature_low)
    assert decision.momentum < user_momentum
    assert math.isclose(decision.momentum, yellowfin_momentum(kappa), rel_tol=REL_TOL)


@given(forget=st.floats(0.5, 0.99), later=st.integers(1, 50))
def test_a_slower_range_decay_keeps_the_curvature_range_at_least_as_wide(forget: float, later: int) -> None:
    samples = [1.0, 100.0] + [10.0] * later
    _, fast = curvature_range_momentum(samples, 0.9, curvature_range_decay=forget)
    _, slow = curvature_range_momentum(samples, 0.9, curvature_range_decay=1 - (1 - forget) / 10)
    width = lambda s: s.log_curvature_high - s.log_curvature_low  # noqa: E731
    assert width(slow) >= width(fast) - 1e-12
    assert width(fast) <= math.log(100.0) + 1e-12


@pytest.mark.parametrize(
    ("steps", "lower_momentum"),
    [
        # the probe at step 3, with a secant sample
        (((1.0, None), (2.0, None), (1.5, 400.0)), False),
        # the probe at step 0, before any secant sample (where it usually runs): its
        # reading bounds the range the later samples build, until the next probe
        (((None, 400.0), (1.0, None), (2.0, None), (1.5, None)), True),
    ],
    ids=["probe-with-sample", "probe-before-samples"],
)
def test_the_last_probes_top_eigenvalue_widens_the_curvature_range_from_above(
    steps: tuple[tuple[float | None, float | None], ...], lower_momentum: bool
) -> None:
    options = only("momentum_control", lower_momentum=lower_momentum)
    context = Context(lr=0.1, momentum=0.1)
    state = init_state(options)
    for curvature, sharpness in steps:  # (secant sample, probe's top eigenvalue) per step
        signals = Signals(grad_norm=1.0, curvature=curvature, sharpness=sharpness)
        decision, state = decide(signals, state, options, context)
    assert math.isclose(state.log_curvature_high, math.log(400.0), rel_tol=1e-12)
    kappa = math.exp(state.log_curvature_high - state.log_curvature_low)
    assert kappa > 300.0  # from the secant samples alone it would be below 2
    assert math.isclose(decision.momentum, yellowfin_momentum(kappa), rel_tol=REL_TOL)


def test_ema_momentum_ignores_the_curvature_range() -> None:
    user_momentum = 0.1
    decision, _ = curvature_range_momentum([1.0, 1e4, 1.0, 1e4], user_momentum, ema_momentum=True)
    assert decision.momentum == user_momentum


def test_momentum_rule_survives_the_widest_curvature_range() -> None:
    # Secant samples are float64 ratios: any positive finite float is a possible sample.
    # With slowly forgetting extremes (curvature_range_decay 0.99) kappa reaches ~1e627,
    # whose square root no float holds; the rule must still give the limit of YellowFin's formula.
    samples = [5e-324, 1.7e308] * 2
    decision, _ = curvature_range_momentum(samples, user_momentum=0.0, curvature_range_decay=0.99)
    assert math.isclose(decision.momentum, ControllerOptions().max_momentum, rel_tol=REL_TOL)


def test_momentum_is_clamped_to_max_momentum() -> None:
    options = only("momentum_control", max_momentum=0.95)
    context = Context(lr=0.1, momentum=0.999)
    decision, _ = decide(Signals(grad_norm=1.0), init_state(options), options, context)
    assert decision.momentum == options.max_momentum


def test_momentum_is_clamped_to_min_momentum() -> None:
    options = only("momentum_control", min_momentum=0.5)
    decisions, _ = feed([1.0] * 30, options, grad_cosine=-1.0)
    assert decisions[-1].momentum == options.min_momentum


# --- properties over arbitrary signal sequences ----------------------------------------

any_float = st.floats(allow_nan=True, allow_infinity=True)
normal_norms = st.floats(min_value=1e-3, max_value=1e3)
grad_norms = st.one_of(
    st.sampled_from([0.0, 1e-30, 1e30, math.inf, -math.inf, math.nan]),
    normal_norms,
    normal_norms.map(lambda x: x * 1e8),  # a sudden spike
)
cosines = st.one_of(
    st.none(), st.floats(min_value=-1.0, max_value=1.0), st.sampled_from([math.nan, math.inf])
)
signals_strategy = st.builds(
    Signals,
    grad_norm=grad_norms,
    loss=st.one_of(st.none(), any_float),
    curvature=st.one_of(st.none(), any_float),
    step_sharpness=st.one_of(st.none(), any_float),
    grad_cosine=cosines,
    sharpness=st.one_of(st.none(), any_float),
    step_size=st.one_of(st.none(), any_float),
)
contexts = st.builds(
    Context,
    lr=st.floats(min_value=1e-6, max_value=10.0),
    momentum=st.one_of(st.none(), st.floats(min_value=0.0, max_value=0.999)),
    preconditioned=st.booleans(),
    ema_momentum=st.booleans(),
)
fractions = st.floats(min_value=0.0, max_value=0.99)


@st.composite
def options_strategy(draw: st.DrawFn, max_grad_norm: bool = True) -> ControllerOptions:
    min_lr = draw(st.floats(min_value=1e-8, max_value=1.0))
    max_lr = draw(st.floats(min_value=min_lr, max_value=1e4))
    min_momentum = draw(st.floats(min_value=0.0, max_value=0.9))
    return ControllerOptions(
        **{flag: draw(st.booleans()) for flag in COMPONENTS},
        initial_lr_multiplier=draw(st.floats(min_value=min_lr, max_value=max_lr)),
        min_lr_multiplier=min_lr,
        max_lr_multiplier=max_lr,
        growth_rate=draw(st.floats(min_value=0.0, max_value=1.0)),
        cooldown_steps=draw(st.integers(min_value=0, max_value=5)),
        norm_decay=draw(fractions),
        spike_threshold=draw(st.floats(min_value=0.1, max_value=10.0)),
        min_log_std=draw(st.floats(min_value=0.0, max_value=1.0)),
        warmup_steps=draw(st.integers(min_value=1, max_value=5)),
        spike_backoff=(spike_backoff := draw(st.floats(min_value=0.01, max_value=1.0))),
        skip_backoff=draw(st.floats(min_value=0.01, max_value=spike_backoff)),
        max_update_ratio=draw(st.floats(min_value=1e-3, max_value=1.0)),
        max_grad_norm=draw(st.none() | st.floats(min_value=1e-3, max_value=1e3)) if max_grad_norm else None,
        curvature_decay=draw(fractions),
        stability_margin=draw(st.floats(min_value=0.01, max_value=1.0)),
        min_momentum=min_momentum,
        max_momentum=draw(st.floats(min_value=min_momentum, max_value=0.999)),
        cosine_decay=draw(fractions),
    )


def assert_finite_or_none(state: ControllerState) -> None:
    for f in fields(state):
        value = getattr(state, f.name)
        assert value is None or math.isfinite(value), f"state.{f.name} = {value}"


@given(
    sequence=st.lists(signals_strategy, min_size=1, max_size=30),
    options=options_strategy(),
    context=contexts,
    first_step=st.tuples(any_float, any_float),
)
def test_multiplier_and_momentum_stay_within_bounds_for_any_signal_sequence(
    sequence: list[Signals],
    options: ControllerOptions,
    context: Context,
    first_step: tuple[float, float],
) -> None:
    state = init_state(options)
    for signals in sequence:
        decision, state = decide(signals, state, options, context)
        if not decision.skip and state.reference_norm is None:  # as the wrapper does
            _, state = first_step_scale(*first_step, state, options)
        assert options.min_lr_multiplier <= decision.lr_multiplier <= options.max_lr_multiplier
        if options.momentum_control and decision.momentum is not None:
            assert options.min_momentum <= decision.momentum <= options.max_momentum
        assert 0.0 < decision.clip_coef <= 1.0
        assert_finite_or_none(state)


@given(
    history=st.lists(st.one_of(normal_norms, st.just(0.0)), min_size=0, max_size=20),
    norms=st.lists(st.one_of(normal_norms, normal_norms.map(lambda x: x * 1e8)), min_size=2, max_size=2),
    options=options_strategy(),
    cosine=st.floats(min_value=-1.0, max_value=1.0),
)
def test_larger_spike_never_yields_larger_learning_rate(
    history: list[float], norms: list[float], options: ControllerOptions, cosine: float
) -> None:
    smaller, larger = sorted(norms)
    assume(smaller < larger)
    _, state = feed(history, options, grad_cosine=cosine, curvature=10.0)
    after_smaller, _ = decide(Signals(grad_norm=smaller, grad_cosine=cosine), state, options, SGD)
    after_larger, _ = decide(Signals(grad_norm=larger, grad_cosine=cosine), state, options, SGD)
    assert after_larger.lr_multiplier <= after_smaller.lr_multiplier


def same_decision(a: Decision, b: Decision) -> bool:
    def close(x: float | None, y: float | None) -> bool:
        return x is y or (x is not None and y is not None and math.isclose(x, y, rel_tol=REL_TOL))

    return (
        a.skip == b.skip
        and a.event == b.event
        and close(a.clip_coef, b.clip_coef)
        and close(a.momentum, b.momentum)
        and close(a.lr_multiplier, b.lr_multiplier)
    )


@given(
    steps=st.lists(
        st.tuples(
            st.one_of(normal_norms, normal_norms.map(lambda x: x * 1e8), st.sampled_from([0.0, math.nan])),
            st.one_of(st.none(), st.floats(min_value=-2.0, max_value=2.0)),  # step_sharpness
            st.one_of(st.none(), st.floats(min_value=-1.0, max_value=1.0)),  # grad_cosine
        ),
        min_size=1,
        max_size=30,
    ),
    exponent=st.integers(min_value=-30, max_value=30),
    options=options_strategy(max_grad_norm=False),
)
def test_scaling_the_loss_leaves_scale_invariant_decisions_unchanged(
    steps: list[tuple[float, float | None, float | None]], exponent: int, options: ControllerOptions
) -> None:
    scale = 2.0**exponent
    state, scaled_state = init_state(options), init_state(options)
    for grad_norm, step_sharpness, cosine in steps:
        signals = Signals(grad_norm=grad_norm, step_sharpness=step_sharpness, grad_cosine=cosine)
        decision, state = decide(signals, state, options, ADAM)
        scaled = replace(signals, grad_norm=grad_norm * scale)
        scaled_decision, scaled_state = decide(scaled, scaled_state, options, ADAM)
        assert same_decision(decision, scaled_decision), (decision, scaled_decision)


@pytest.mark.parametrize("scale", [2.0**-3, 2.0, 2.0**5])
def test_scaling_the_loss_scales_the_sgd_curvature_and_divides_its_cap(scale: float) -> None:
    # Plain SGD is scale covariant, not invariant: the stable lr follows the curvature.
    options = ControllerOptions(initial_lr_multiplier=1000.0, min_lr_multiplier=1e-12)
    curvatures = [50.0, 80.0, 60.0]
    cosines = [0.5, -0.3, 0.2]
    state, scaled_state = init_state(options), init_state(options)
    for curvature, cosine in zip(curvatures, cosines, strict=True):
        signals = Signals(grad_norm=1.0, curvature=curvature, grad_cosine=cosine)
        decision, state = decide(signals, state, options, SGD)
        scaled = Signals(grad_norm=scale, curvature=scale * curvature, grad_cosine=cosine)
        scaled_decision, scaled_state = decide(scaled, scaled_state, options, SGD)
        assert decision.event == scaled_decision.event == "curvature_cap"
        assert math.isclose(scaled_decision.curvature, scale * decision.curvature, rel_tol=REL_TOL)
        assert math.isclose(scaled_decision.lr_multiplier, decision.lr_multiplier / scale, rel_tol=REL_TOL)
        assert math.isclose(scaled_decision.momentum, decision.momentum, rel_tol=REL_TOL)


# -- annealing (experimental, off by default) ----------------------------------------------


def stationary_signals(ratio: float, step_size: float = 0.1) -> dict[str, float]:
    """Signals whose <x, g> is `ratio` times the fluctuation-dissipation right-hand side
    (1 + mu)/(2 lr) ||d||^2 for SGD's context (lr 0.1, momentum 0.9, multiplier 1)."""
    rhs = (1.0 + SGD.momentum) / (2.0 * SGD.lr) * step_size**2
    return {"param_grad_dot": ratio * rhs, "step_size": step_size}


def test_anneal_cuts_the_multiplier_once_the_fluctuation_dissipation_relation_holds() -> None:
    options = only("anneal", anneal_window=10, momentum_control=False)
    decisions, state = feed([1.0] * 12, options, **stationary_signals(1.0))
    events = [d.event for d in decisions]
    assert events.count("anneal") == 1
    first = events.index("anneal")
    assert first >= options.anneal_window - 1
    assert decisions[first].lr_multiplier == options.initial_lr_multiplier * options.anneal_factor
    assert state.steps_since_anneal < options.anneal_window


def test_anneal_never_cuts_while_the_run_is_still_descending() -> None:
    options = only("anneal", anneal_window=10, momentum_control=False)
    decisions, _ = feed([1.0] * 60, options, **stationary_signals(3.0))
    assert all(d.event != "anneal" for d in decisions)
    assert decisions[-1].lr_multiplier == options.initial_lr_multiplier


def test_anneal_does_not_apply_to_preconditioned_optimizers() -> None:
    options = only("anneal", anneal_window=10, momentum_control=False)
    decisions, _ = feed([1.0] * 30, options, ADAM, **stationary_signals(1.0))
    assert all(d.event != "anneal" for d in decisions)


@pytest.mark.parametrize("anneal", [False, True])
def test_with_anneal_on_recovery_only_raises_the_multiplier(anneal: bool) -> None:
    options = only("recovery", anneal=anneal, cooldown_steps=0)
    decisions, _ = feed([1.0] * 20, options, grad_cosine=-0.5)
    if anneal:
        assert decisions[-1].lr_multiplier == options.initial_lr_multiplier
    else:
        assert decisions[-1].lr_multiplier < options.initial_lr_multiplier


def test_evolving_the_state_changes_only_the_named_fields_and_rejects_unknown_ones():
    from adaptive_lr.controller import _evolve

    state = ControllerState(step=3, curvature=2.0)
    evolved = _evolve(state, step=4, grad_cosine=0.5)
    assert evolved == replace(state, step=4, grad_cosine=0.5)
    assert state.step == 3  # the original is untouched
    with pytest.raises(TypeError, match="no field"):
        _evolve(state, stpe=4)
