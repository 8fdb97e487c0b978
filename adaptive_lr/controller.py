"""The feedback rule: pure logic from measured signals to a decision, no torch.

`decide(signals, state, options, context) -> (Decision, ControllerState)` is the whole
controller. It is a pure function over small typed records (as optax's transformations
are), so every rule can be tested with hand-made signal sequences and no model.

Per step, in this order:

1. Non-finite guard. If the gradient norm or the loss is NaN/Inf the step is skipped and
   ``multiplier *= skip_backoff``.
2. Explosion guard. With z = log(grad_norm) and an EMA mean m and variance v of z::

       threshold = m + spike_threshold * max(sqrt(v), min_log_std)

   z > threshold is a spike: the gradient is clipped to exp(threshold) (clip coefficient
   exp(threshold - z)) and ``multiplier *= spike_backoff``. The statistics are fed
   min(z, threshold), so one spike does not poison them, and the next step's secant,
   which pairs the spike's gradient (often from another loss surface: a poisoned
   batch), is not taken as a curvature sample.
3. Curvature governor. From the curvature estimate h (secant, smoothed, or the Hessian
   probe when it is larger) it caps the learning rate at ``stability_margin`` times the
   stability bound of the base method with momentum mu:

       heavy ball (SGD, RMSprop):        lr * h < 2 (1 + mu)
       EMA momentum (Adam family):       lr * h_P < 2 (1 + mu) / (1 - mu)

   where for preconditioned methods h_P is the curvature along the update in the
   optimizer's own metric, measured as (lr x h_P) = <g_{t-1} - g_t, d> / <g_{t-1}, d> with
   d = x_{t-1} - x_t the last descent step (equal to lr x h for plain gradient descent).
   Update guard (a trust region needing no curvature): the last step's size ||d|| scaled
   by the lr ratio predicts this step's, and the multiplier is capped so that
   ||d|| <= max_update_ratio * ||x_0||. The very first step, which nothing can predict,
   is checked after the fact by `first_step_scale` and shortened if too long.
4. Recovery. After ``cooldown_steps`` without a spike or skip,
   ``multiplier *= exp(growth_rate * c')`` with c the EMA of grad_cosine and
   ``c' = c`` for c >= 0, ``c' = min(c + recovery_deadband, 0)`` for c < 0, never above
   the caps nor ``max_lr_multiplier``. This is a bounded, multiplicative hypergradient
   rule (Baydin et al. 2018): while successive steps keep pointing the same way (c > 0)
   the learning rate is too small and grows; once gradient noise dominates, c ~ 0 and it
   stops; on oscillation beyond the deadband (c < -recovery_deadband) it shrinks. The
   band absorbs the small negative c that noise alone produces (short-horizon bias).
   With ``restore_after_event``, a spike or skip cut is given back at up to
   exp(growth_rate) per step once the cooldown has passed without another event, up to
   the multiplier before the cut; a cut while still giving back lowers that target by
   the backoff, so events that repeat ratchet the lr down and an isolated one is undone.
   While c > 0 below the curvature cap, the log step is at least
   ``cap_approach * c * log(cap / multiplier)``: a share of the log gap to the stability
   bound is closed per step.
5. Momentum. For heavy-ball methods the target is the larger of the user's momentum and
   YellowFin's ``((sqrt(kappa) - 1) / (sqrt(kappa) + 1))**2`` from the range
   kappa = h_high / h_low of the curvature samples (slowly forgetting extremes, decay
   ``curvature_range_decay``; h_high is at least the last Hessian probe's top
   eigenvalue when the probe runs), or that value alone with ``lower_momentum``; for
   EMA-momentum methods it is the user's beta1. It is then
   lowered on oscillation: ``mu = target * (1 - max(0, -c))`` with c the EMA of
   grad_cosine, and clamped to [min_momentum, max_momentum].

Scale invariance (loss multiplied by c > 0): the spike and skip decisions, the clip
coefficient, the oscillation signal, the momentum rule and, for preconditioned methods,
the governor depend only on ratios and are unchanged. For plain SGD the curvature scales
with c and so does the stable learning rate: the governor follows it, as it should.
``max_grad_norm`` is an absolute threshold and is not scale invariant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from adaptive_lr.options import ControllerOptions

EVENTS = ("skip", "spike", "clip", "curvature_cap", "update_cap", "anneal")


@dataclass(frozen=True)
class Signals:
    """What was measured this step (None where a signal is not available)."""

    grad_norm: float
    loss: float | None = None
    curvature: float | None = None
    """Secant curvature along the last step, <g_t - g_{t-1}, dx> / <dx, dx> [1/lr]."""
    step_sharpness: float | None = None
    """lr x curvature along the last update in the optimizer's metric [dimensionless]."""
    grad_cosine: float | None = None
    """Cosine between the gradient and the last descent step x_{t-1} - x_t."""
    sharpness: float | None = None
    """Top Hessian eigenvalue from the probe, when it ran this step [1/lr]."""
    step_size: float | None = None
    """Size of the last step, ||x_{t-1} - x_t||."""
    successive_grad_cosine: float | None = None
    """Cosine between successive gradients, <g_t, g_{t-1}> / (||g_t|| ||g_{t-1}||) (telemetry)."""
    param_grad_dot: float | None = None
    """<x_t, g_t>, the left side of the fluctuation-dissipation test (annealing only)."""


@dataclass(frozen=True)
class Context:
    """Facts about the base optimizer the rule needs."""

    lr: float
    """Largest scheduled learning rate over the param groups (before the multiplier)."""
    momentum: float | None
    """The user's scheduled momentum (beta1 for the Adam family); None if it has none."""
    preconditioned: bool = False
    ema_momentum: bool = False
    """True where momentum averages as m = mu m + (1 - mu) g (Adam family)."""


@dataclass(frozen=True)
class ControllerState:
    """Everything the rule remembers between steps: plain numbers only."""

    step: int = 0
    lr_multiplier: float = 1.0
    log_norm_mean: float = 0.0
    log_norm_var: float = 0.0
    norm_count: int = 0
    curvature: float | None = None
    log_curvature_high: float | None = None
    log_curvature_low: float | None = None
    sharpness: float | None = None
    grad_cosine: float = 0.0
    """EMA of grad_cosine: > 0 while steps keep going the same way, < 0 on oscillation."""
    steps_since_event: int = 0
    last_lr: float | None = None
    """Reference lr actually used at the last applied step (lr x multiplier)."""
    reference_norm: float | None = None
    """Parameter norm ||x_0|| at the first step, the update guard's yardstick."""
    last_momentum: float | None = None
    """Momentum used at the last applied step."""
    pending_param_grad: float | None = None
    """<x_t, g_t> of the last applied step, paired with its step size at the next step."""
    stationarity_lhs: float | None = None
    """EMA of <x_t, g_t>."""
    stationarity_rhs: float | None = None
    """EMA of (1 + mu) / (2 lr) ||d_t||^2."""
    steps_since_anneal: int = 0
    restore_multiplier: float | None = None
    """Multiplier before the last spike or skip cut: restored once the cooldown passes quietly."""
    spiked: bool = False
    """The last applied step was a spike: the next secant pairs its gradient, drawn from
    another loss surface (a poisoned batch), and is not a curvature sample."""


_STATE_FIELDS = frozenset(f.name for f in fields(ControllerState))


def _evolve(state: ControllerState, **changes: object) -> ControllerState:
    """``dataclasses.replace`` for the state, minus its cost: replace re-runs ``__init__``
    over every field."""
    return _set(_working_copy(state), **changes)


def _working_copy(state: ControllerState) -> ControllerState:
    """A copy of the state that `_set` may change in place: `decide` evolves the state
    several times a step, and one copy is all it needs."""
    new = object.__new__(ControllerState)
    new.__dict__.update(state.__dict__)
    return new


def _set(state: ControllerState, **changes: object) -> ControllerState:
    """Change a working copy (from `_working_copy`) in place; returns it."""
    unknown = changes.keys() - _STATE_FIELDS
    if unknown:
        raise TypeError(f"ControllerState has no field(s) {sorted(unknown)}")
    state.__dict__.update(changes)
    return state


@dataclass(frozen=True)
class Decision:
    skip: bool
    lr_multiplier: float
    momentum: float | None
    clip_coef: float = 1.0
    event: str | None = None
    curvature: float | None = None
    """Curvature the governor used (max of the smoothed secant estimate and the probe)."""


def init_state(options: ControllerOptions) -> ControllerState:
    return ControllerState(
        lr_multiplier=options.initial_lr_multiplier,
        steps_since_event=options.cooldown_steps,
    )


def decide(
    signals: Signals, state: ControllerState, options: ControllerOptions, context: Context
) -> tuple[Decision, ControllerState]:
    """One step of the feedback rule (see the module docstring for the formulas)."""
    finite = math.isfinite(signals.grad_norm) and (signals.loss is None or math.isfinite(signals.loss))
    if not finite and options.skip_nonfinite:
        multiplier = _clamp(
            state.lr_multiplier * options.skip_backoff,
            options.min_lr_multiplier,
            options.max_lr_multiplier,
        )
        new_state = _evolve(
            state,
            step=state.step + 1,
            lr_multiplier=multiplier,
            steps_since_event=0,
            restore_multiplier=_restore_target(state, options.skip_backoff),
        )
        return Decision(skip=True, lr_multiplier=multiplier, momentum=None, event="skip"), new_state

    event: str | None = None
    multiplier = state.lr_multiplier
    clip_coef = 1.0

    state = _working_copy(state)  # the caller's state stays as it was
    state, spike_coef = _explosion_guard(signals.grad_norm, state, options)
    if spike_coef < 1.0:
        clip_coef = spike_coef
        state = _set(state, restore_multiplier=_restore_target(state, options.spike_backoff))
        multiplier *= options.spike_backoff
        event = "spike"
    finite_norm = math.isfinite(signals.grad_norm)  # (an infinite one only with skip_nonfinite off)
    if (
        options.max_grad_norm is not None
        and finite_norm
        and signals.grad_norm * clip_coef > options.max_grad_norm
    ):
        clip_coef = options.max_grad_norm / signals.grad_norm
        event = event or "clip"

    if not state.spiked:
        state = _track_curvature(signals, state, options, context)
    state = _track_cosine(signals, state, options)
    momentum = _momentum(state, options, context)
    state, stationary = _track_stationarity(signals, state, options, context)
    if stationary:
        multiplier *= options.anneal_factor
        event = event or "anneal"

    curvature_cap = cap = _multiplier_cap(state, options, context, momentum)
    update_cap = _update_cap(signals, state, options, context)
    if update_cap is not None and (cap is None or update_cap < cap):
        cap, cap_event = update_cap, "update_cap"
    else:
        cap_event = "curvature_cap"
    since_event = 0 if event == "spike" else state.steps_since_event + 1
    if options.recovery and since_event > options.cooldown_steps:
        # With annealing on, lowering the lr is the stationarity test's job: the one-step
        # hypergradient would lower it as soon as gradient noise dominates (short-horizon bias).
        cosine = max(state.grad_cosine, 0.0) if options.anneal else state.grad_cosine
        if cosine < 0.0:
            cosine = min(cosine + options.recovery_deadband, 0.0)
        log_step = options.growth_rate * cosine
        if cosine > 0.0 and curvature_cap is not None and curvature_cap > multiplier:
            # Far below the stability bound, close a share of the (log) gap per step.
            log_step = max(log_step, options.cap_approach * cosine * math.log(curvature_cap / multiplier))
        restore = state.restore_multiplier
        if options.restore_after_event and restore is not None and multiplier < restore:
            # A quiet cooldown after a cut: the event was isolated, give the cut back.
            log_step = max(log_step, min(options.growth_rate, math.log(restore / multiplier)))
        multiplier *= math.exp(log_step)
        if restore is not None and multiplier >= restore:
            state = _set(state, restore_multiplier=None)
    if cap is not None and multiplier > cap:
        multiplier = cap
        event = event or cap_event
    multiplier = _clamp(multiplier, options.min_lr_multiplier, options.max_lr_multiplier)

    curvature = _governing_curvature(state)
    new_state = _set(
        state,
        step=state.step + 1,
        lr_multiplier=multiplier,
        steps_since_event=since_event,
        spiked=spike_coef < 1.0,
        last_lr=context.lr * multiplier,
        last_momentum=momentum,
        pending_param_grad=None if signals.param_grad_dot is None else signals.param_grad_dot * clip_coef,
    )
    decision = Decision(
        skip=False,
        lr_multiplier=multiplier,
        momentum=momentum,
        clip_coef=clip_coef,
        event=event,
        curvature=curvature,
    )
    return decision, new_state


def _restore_target(state: ControllerState, backoff: float) -> float:
    """The multiplier to give back after this cut: the one before it, or, on a cut while
    still giving back an earlier one (events that repeat), the earlier target cut too."""
    restore = state.restore_multiplier
    if restore is None or state.lr_multiplier >= restore:
        return state.lr_multiplier
    return restore * backoff


def _explosion_guard(
    grad_norm: float, state: ControllerState, options: ControllerOptions
) -> tuple[ControllerState, float]:
    """Update the log-norm statistics; return the clip coefficient (1.0: no spike)."""
    if not math.isfinite(grad_norm) or grad_norm <= 0.0:
        # A zero (or, with the non-finite guard off, invalid) norm carries no scale.
        return state, 1.0
    z = math.log(grad_norm)
    coef = 1.0
    if state.norm_count == 0:
        return _set(state, log_norm_mean=z, log_norm_var=0.0, norm_count=1), coef
    std = max(math.sqrt(state.log_norm_var), options.min_log_std)
    threshold = state.log_norm_mean + options.spike_threshold * std
    if options.spike_guard and state.norm_count >= options.warmup_steps and z > threshold:
        coef = math.exp(threshold - z)
        z = threshold
    decay = options.norm_decay
    delta = z - state.log_norm_mean
    mean = state.log_norm_mean + (1.0 - decay) * delta
    var = decay * (state.log_norm_var + (1.0 - decay) * delta * delta)
    return _set(state, log_norm_mean=mean, log_norm_var=var, norm_count=state.norm_count + 1), coef


def _curvature_sample(signals: Signals, state: ControllerState, context: Context) -> float | None:
    if context.preconditioned:
        if signals.step_sharpness is None or not state.last_lr:
            return None
        sample = signals.step_sharpness / state.last_lr
    else:
        sample = signals.curvature
    if sample is None or not math.isfinite(sample):
        return None
    return sample


def _track_curvature(
    signals: Signals, state: ControllerState, options: ControllerOptions, context: Context
) -> ControllerState:
    sample = _curvature_sample(signals, state, context)
    probed = signals.sharpness
    if probed is not None and math.isfinite(probed):
        state = _set(state, sharpness=probed)
    if sample is None:
        return state
    decay = options.curvature_decay
    # The signed EMA averages out gradient noise, which enters single secant samples with
    # either sign; clamping the samples at zero first would bias the estimate upward.
    smoothed = sample if state.curvature is None else decay * state.curvature + (1 - decay) * sample
    high, low = state.log_curvature_high, state.log_curvature_low
    if sample > 0.0:
        log_sample = math.log(sample)
        # Slowly forgetting extremes of the positive samples: the curvature range.
        forget = options.curvature_range_decay
        high = log_sample if high is None else max(log_sample, forget * high + (1 - forget) * log_sample)
        low = log_sample if low is None else min(log_sample, forget * low + (1 - forget) * log_sample)
    if high is not None and state.sharpness is not None and state.sharpness > 0.0:
        # The probe measures the top of the spectrum, which secant samples never reach;
        # its last reading holds until the next probe (it usually runs at step 0, before
        # the first sample).
        high = max(high, math.log(state.sharpness))
    return _set(state, curvature=smoothed, log_curvature_high=high, log_curvature_low=low)


def _track_cosine(signals: Signals, state: ControllerState, options: ControllerOptions) -> ControllerState:
    cosine = signals.grad_cosine
    if cosine is None or not math.isfinite(cosine):
        return state
    decay = options.cosine_decay
    return _set(state, grad_cosine=decay * state.grad_cosine + (1 - decay) * cosine)


def _track_stationarity(
    signals: Signals, state: ControllerState, options: ControllerOptions, context: Context
) -> tuple[ControllerState, bool]:
    """The fluctuation-dissipation test of heavy ball (Yaida 2018), for annealing.

    For x+ = x - lr b+, b+ = mu b + g at stationarity, E<x_t, g_t> = (1 + mu)/(2 lr) E||d_t||^2
    with d_t = x_t - x_{t+1}. Both sides are tracked as EMAs over `anneal_window` steps;
    when they agree within `anneal_tolerance` the run has stopped making progress at this
    lr, and the multiplier is cut by `anneal_factor`.
    """
    usable = (
        options.anneal
        and not context.preconditioned
        and state.pending_param_grad is not None
        and signals.step_size is not None
        and state.last_lr
    )
    if not usable:
        return _set(state, steps_since_anneal=state.steps_since_anneal + 1), False
    mu = state.last_momentum or 0.0
    rhs = (1.0 + mu) / (2.0 * state.last_lr) * signals.step_size**2
    decay = 1.0 - 1.0 / options.anneal_window
    lhs_ema = (
        state.pending_param_grad
        if state.stationarity_lhs is None
        else (decay * state.stationarity_lhs + (1 - decay) * state.pending_param_grad)
    )
    rhs_ema = rhs if state.stationarity_rhs is None else decay * state.stationarity_rhs + (1 - decay) * rhs
    since = state.steps_since_anneal + 1
    stationary = (
        since >= options.anneal_window
        and rhs_ema > 0.0
        and abs(lhs_ema - rhs_ema) <= options.anneal_tolerance * rhs_ema
    )
    if stationary:
        return _set(state, stationarity_lhs=None, stationarity_rhs=None, steps_since_anneal=0), True
    return _set(state, stationarity_lhs=lhs_ema, stationarity_rhs=rhs_ema, steps_since_anneal=since), False


def _governing_curvature(state: ControllerState) -> float | None:
    candidates = [c for c in (state.curvature, state.sharpness) if c is not None and c > 0.0]
    return max(candidates) if candidates else None


def _momentum(state: ControllerState, options: ControllerOptions, context: Context) -> float | None:
    if context.momentum is None:
        return None
    if not options.momentum_control:
        return context.momentum
    target = context.momentum
    ranged = state.log_curvature_high is not None and state.log_curvature_low is not None
    if ranged and not context.ema_momentum:
        # ((sqrt(k) - 1) / (sqrt(k) + 1))^2 = tanh(log(k) / 4)^2, which cannot overflow.
        log_kappa = state.log_curvature_high - state.log_curvature_low
        # By default the range rule raises momentum on ill-conditioned problems and never
        # lowers the user's choice: the range of recent samples underestimates kappa there.
        from_range = math.tanh(0.25 * log_kappa) ** 2
        target = from_range if options.lower_momentum else max(target, from_range)
    value = target * (1.0 - max(0.0, -state.grad_cosine))
    return _clamp(value, options.min_momentum, options.max_momentum)


def stability_bound(curvature: float, momentum: float, *, ema_momentum: bool) -> float:
    """Largest stable lr for a quadratic of curvature h under heavy-ball or EMA momentum.

    Heavy ball x+ = x - lr g + mu (x - x-): lr < 2 (1 + mu) / h.
    EMA momentum m = mu m + (1 - mu) g, x+ = x - lr m: lr < 2 (1 + mu) / ((1 - mu) h).
    """
    bound = 2.0 * (1.0 + momentum) / curvature
    return bound / (1.0 - momentum) if ema_momentum else bound


def _multiplier_cap(
    state: ControllerState, options: ControllerOptions, context: Context, momentum: float | None
) -> float | None:
    if not options.curvature_governor or context.lr <= 0.0:
        return None
    curvature = _governing_curvature(state)
    if curvature is None:
        return None
    lr_max = options.stability_margin * stability_bound(
        curvature, momentum or 0.0, ema_momentum=context.ema_momentum
    )
    return max(lr_max / context.lr, options.min_lr_multiplier)


def _update_cap(
    signals: Signals, state: ControllerState, options: ControllerOptions, context: Context
) -> float | None:
    usable = (
        options.update_guard
        and state.reference_norm
        and state.last_lr
        and signals.step_size
        and context.lr > 0.0
    )
    if not usable:
        return None
    # Updates of torch's optimizers are linear in lr: size ~ lr x (lr-free direction).
    size_per_lr = signals.step_size / state.last_lr
    return max(
        options.max_update_ratio * state.reference_norm / (size_per_lr * context.lr),
        options.min_lr_multiplier,
    )


def first_step_scale(
    step_size: float, param_norm: float, state: ControllerState, options: ControllerOptions
) -> tuple[float, ControllerState]:
    """After the first applied step: the factor s <= 1 to shorten it by, and the state.

    The step is shortened to ``max_update_ratio * ||x_0||`` when longer; since the
    update is linear in lr this equals having stepped with lr x s, so the multiplier and
    last lr are scaled by s too. The parameter norm becomes the guard's yardstick.
    """
    if param_norm <= 0.0 or not math.isfinite(param_norm):
        return 1.0, state  # Zero-initialised parameters give no yardstick yet.
    state = _evolve(state, reference_norm=param_norm)
    limit = options.max_update_ratio * param_norm
    if not options.update_guard or not math.isfinite(step_size) or step_size <= limit:
        return 1.0, state
    scale = max(limit / step_size, options.min_lr_multiplier / state.lr_multiplier)
    return scale, _evolve(
        state,
        lr_multiplier=state.lr_multiplier * scale,
        last_lr=None if state.last_lr is None else state.last_lr * scale,
    )


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)
