"""Every tunable constant of the controller: one name, one default, one line of documentation.

`ControllerOptions` is validated once, at construction. Unknown names raise `TypeError`,
out-of-range values raise `ValueError`; both name the option. Each feedback component has
its own on/off switch so that ablations can remove exactly one of them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

COMPONENTS = (
    "spike_guard",
    "skip_nonfinite",
    "curvature_governor",
    "recovery",
    "momentum_control",
    "update_guard",
)
"""The switches of the feedback components that are on by default, each of which can be
turned off on its own (the experimental ``anneal`` component is off by default)."""

PROBE_SOLVERS = ("power", "krylov")
"""The Hessian probe's eigenvalue solvers: ``adaptive_lr.hessian.top_eigenvalue`` and
``adaptive_lr.hessian.krylov_top_eigenvalue``."""


@dataclass(frozen=True)
class ControllerOptions:
    """Options of the feedback controller (units in brackets).

    Component switches:
        spike_guard: clip the gradient and cut the lr multiplier when the gradient norm
            jumps above its running statistics.
        skip_nonfinite: skip the step (parameters and optimizer state untouched) when the
            gradient or the loss is NaN or Inf.
        curvature_governor: cap the learning rate below the stability bound of the base
            method computed from the measured curvature.
        recovery: let the multiplier grow back while training is stable.
        momentum_control: choose the momentum from the curvature range and oscillation.
        anneal: (experimental, off by default) cut the multiplier when the run is
            statistically stationary, by the fluctuation-dissipation test of heavy ball.
        update_guard: keep each step's size ||x_t - x_{t+1}|| below max_update_ratio times
            the parameter norm at the first step (a trust region that needs no curvature,
            so it also protects the very first step).

    Learning-rate multiplier (dimensionless; lr used = scheduled lr x multiplier):
        initial_lr_multiplier: multiplier at step 0.
        min_lr_multiplier: floor of the multiplier.
        max_lr_multiplier: user cap of the multiplier (recovery never grows above it).
        growth_rate: largest change of log(multiplier) per step by the recovery rule,
            multiplier *= exp(growth_rate * mean grad_cosine).
        recovery_deadband: a negative mean grad_cosine c shrinks the multiplier only by
            its excess beyond this band, exp(growth_rate * min(c + band, 0)). Gradient
            noise alone makes c slightly negative at any lr (about -lr h / 2 per mode on a
            quadratic), and the one-step hypergradient would then decay the lr to zero
            (short-horizon bias) and fight the user's schedule; the band keeps lowering
            the lr for real oscillation only.
        cap_approach: while c > 0 and the multiplier is below the curvature governor's
            cap, grow by at least exp(cap_approach * c * log(cap / multiplier)): close
            this share of the log gap to the cap per step, so a learning rate decades too
            small is corrected in tens of steps rather than hundreds. 0 disables it.
        restore_after_event: after a spike or skip cut and a quiet cooldown, give the cut
            back at up to exp(growth_rate) per step, up to the multiplier before the cut:
            an isolated fault (a bad batch, a NaN) costs a few steps, not the rest of the
            run. Another cut while giving back lowers the target by its backoff, so
            repeated events ratchet the lr down. Part of recovery.
        cooldown_steps: steps after a spike or skip during which the multiplier does not grow.

    Explosion guard, on z = log(grad_norm):
        norm_decay: EMA decay of the running mean and variance of z (per step).
        spike_threshold: a step is a spike when z > mean + spike_threshold * std [std units].
        min_log_std: floor of std in that test [log units], so a very steady run still
            allows ordinary fluctuations (exp(3 * 0.25) = 2.1x by default).
        warmup_steps: steps of statistics gathered before the spike test starts.
        spike_backoff: multiplier *= spike_backoff on a spike.
        skip_backoff: multiplier *= skip_backoff on a non-finite gradient or loss
            (at most spike_backoff, so a larger spike never leaves a larger lr).
        max_update_ratio: largest step size relative to the first step's parameter norm
            [dimensionless].
        max_grad_norm: optional hard cap on the global gradient norm (event "clip"), as
            torch.nn.utils.clip_grad_norm_ would apply; None disables it.

    Curvature governor (curvature from secant estimates along the trajectory, and from the
    optional Hessian probe):
        curvature_decay: EMA decay of the secant curvature estimate (per step).
        stability_margin: the lr is kept below stability_margin x the stability bound.
        curvature_probe_every: run the Hessian power-iteration probe every this many steps
            when step() gets a closure; 0 disables the probe.
        probe_iterations: most Hessian-vector products per probe (power iteration; each
            product is a central difference of gradients, two extra closure calls). Every
            probe starts from the last one's eigenvector, so across probes the iteration
            carries on and, while the top of the spectrum holds still, a few products each
            suffice; a sharper direction that appears elsewhere is found only over many
            probes (benchmarks/probe_warm_start.py). The first probe, which starts at the
            gradient (already weighted toward the top eigenvectors), may run twice as
            many.
        probe_tolerance: a probe stops early once its Rayleigh quotient changes by at
            most this fraction between products; a warm probe compares its first product's
            with the last probe's estimate, so where the iteration has settled a probe
            costs one product.
        probe_solver: "power" (power iteration) or "krylov" (the top Ritz value of the
            Krylov space of the same products, its warm probes started from the last
            vector and the current gradient's direction in equal parts; it holds up to
            2 x probe_iterations + 1 parameter-sized vectors during a probe, and its warm
            probes seldom stop before probe_iterations products, where settled power
            probes stop at one). On the 1M MLP of benchmarks/probe_warm_start.py its
            median error against Lanczos was 8-13% with SGD where power iteration's was
            20-28%, and 11% against 62% with AdamW on minibatches; where a run memorizes
            its fixed batch both read far off (finite-difference products are then mostly
            rounding). A sharper direction that appears between probes it finds at once,
            where a settled power probe keeps the old top (tests/test_wrapper.py). On the
            quadratics of benchmarks/quadratic_limit.py (row
            adaptive_sgd_full_batch_krylov) its readings, closer to L, cost one to five
            iterations and lowered the noisy final loss 1.2-16x.
        sample_fraction: fraction of each large tensor's coordinates (one contiguous block)
            on which the secant signals are measured; 1.0 measures every coordinate.
        min_sample_size: tensors with at most this many elements are measured whole, and
            no block is smaller [elements].
        track_successive_cosine: also keep the last gradient on the sample, to report the
            cosine between successive gradients (telemetry; a second sampled buffer).
        preconditioned: treat the base method as preconditioned (Adam family) when
            applying the bound; None infers it from the optimizer class.

    Annealing (heavy-ball methods; the relation below does not hold for the Adam family):
        anneal_factor: multiplier *= anneal_factor when stationarity is detected.
        anneal_window: steps of statistics (EMA horizon) and the least number of steps
            between two annealing cuts.
        anneal_tolerance: stationary when |E<x, g> - (1 + mu)/(2 lr) E||d||^2| is at most
            this fraction of the right-hand side.

    Momentum (heavy-ball coefficient, or beta1 of the Adam family):
        min_momentum, max_momentum: bounds of the momentum the controller sets.
        lower_momentum: heavy ball only: let the curvature-range rule set momentum below
            the user's value (YellowFin's value alone). Off by default, where the rule only
            raises it: on ill-conditioned problems the range of the samples underestimates
            kappa, and lowering then slows convergence; on well-conditioned or noisy
            problems it helps. With curvature_range_decay=0.999 (row adaptive_sgd_lower of
            benchmarks/quadratic_limit.py), iterations to the target went 143 -> 50 at
            kappa 10 and 186 -> 337 at kappa 1000, and noisy final losses 5-9x lower.
            With the Hessian probe as well, whose last top eigenvalue bounds the range
            from above (row adaptive_sgd_probe_lower), kappa 10000 took 608 iterations
            against optimal heavy ball's 619.
        curvature_range_decay: per-sample decay of the slowly forgetting extremes of the
            positive secant samples (the curvature range kappa = h_high / h_low).
        cosine_decay: EMA decay of grad_cosine, the signal of recovery and oscillation.

    Telemetry:
        history_size: number of per-step records kept in `history` (oldest dropped).

    Distributed:
        sync_ranks: when torch.distributed is initialized with several ranks, all-reduce
            the step's scalars once (partial sums of FSDP2 shards added, the loss
            averaged) so that every rank makes the same decision; see
            adaptive_lr.distributed. Turn off only when each rank steps its own model.
    """

    spike_guard: bool = True
    skip_nonfinite: bool = True
    curvature_governor: bool = True
    recovery: bool = True
    momentum_control: bool = True
    update_guard: bool = True
    anneal: bool = False

    initial_lr_multiplier: float = 1.0
    min_lr_multiplier: float = 1e-6
    max_lr_multiplier: float = 10000.0
    growth_rate: float = 0.05
    recovery_deadband: float = 0.1
    cap_approach: float = 0.1
    restore_after_event: bool = True
    cooldown_steps: int = 10

    norm_decay: float = 0.95
    spike_threshold: float = 3.0
    min_log_std: float = 0.25
    warmup_steps: int = 1
    spike_backoff: float = 0.5
    skip_backoff: float = 0.5
    max_update_ratio: float = 0.05
    max_grad_norm: float | None = None

    curvature_decay: float = 0.9
    stability_margin: float = 0.5
    curvature_probe_every: int = 0
    probe_iterations: int = 3
    probe_tolerance: float = 0.01
    probe_solver: str = "power"
    sample_fraction: float = 0.0625
    min_sample_size: int = 4096
    track_successive_cosine: bool = False
    preconditioned: bool | None = None

    anneal_factor: float = 0.5
    anneal_window: int = 200
    anneal_tolerance: float = 0.1

    min_momentum: float = 0.0
    max_momentum: float = 0.99
    lower_momentum: bool = False
    curvature_range_decay: float = 0.9
    cosine_decay: float = 0.9

    history_size: int = 1000
    sync_ranks: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        _in_range("initial_lr_multiplier", self.initial_lr_multiplier, low=0.0, low_open=True)
        _in_range("min_lr_multiplier", self.min_lr_multiplier, low=0.0, low_open=True)
        _in_range("max_lr_multiplier", self.max_lr_multiplier, low=self.min_lr_multiplier)
        if not self.min_lr_multiplier <= self.initial_lr_multiplier <= self.max_lr_multiplier:
            raise ValueError(
                "initial_lr_multiplier must lie in [min_lr_multiplier, max_lr_multiplier], "
                f"got {self.initial_lr_multiplier} not in "
                f"[{self.min_lr_multiplier}, {self.max_lr_multiplier}]"
            )
        _in_range("growth_rate", self.growth_rate, low=0.0, high=1.0)
        _in_range("recovery_deadband", self.recovery_deadband, low=0.0, high=1.0, high_open=True)
        _in_range("cap_approach", self.cap_approach, low=0.0, high=1.0)
        _in_range("cooldown_steps", self.cooldown_steps, low=0)
        _in_range("norm_decay", self.norm_decay, low=0.0, high=1.0, high_open=True)
        _in_range("spike_threshold", self.spike_threshold, low=0.0, low_open=True)
        _in_range("min_log_std", self.min_log_std, low=0.0)
        _in_range("warmup_steps", self.warmup_steps, low=1)
        _in_range("spike_backoff", self.spike_backoff, low=0.0, high=1.0, low_open=True)
        _in_range("skip_backoff", self.skip_backoff, low=0.0, high=1.0, low_open=True)
        if self.skip_backoff > self.spike_backoff:
            # A non-finite gradient is the largest spike of all: it must not cut less.
            raise ValueError(
                f"option skip_backoff ({self.skip_backoff}) must not exceed spike_backoff "
                f"({self.spike_backoff})"
            )
        _in_range("max_update_ratio", self.max_update_ratio, low=0.0, low_open=True)
        if self.max_grad_norm is not None:
            _in_range("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        _in_range("curvature_decay", self.curvature_decay, low=0.0, high=1.0, high_open=True)
        _in_range("stability_margin", self.stability_margin, low=0.0, high=1.0, low_open=True)
        _in_range("curvature_probe_every", self.curvature_probe_every, low=0)
        _in_range("probe_iterations", self.probe_iterations, low=1)
        _in_range("probe_tolerance", self.probe_tolerance, low=0.0, low_open=True)
        if self.probe_solver not in PROBE_SOLVERS:
            raise ValueError(f"option probe_solver must be one of {PROBE_SOLVERS}, got {self.probe_solver!r}")
        _in_range("sample_fraction", self.sample_fraction, low=0.0, high=1.0, low_open=True)
        _in_range("min_sample_size", self.min_sample_size, low=1)
        _in_range("anneal_factor", self.anneal_factor, low=0.0, high=1.0, low_open=True)
        _in_range("anneal_window", self.anneal_window, low=1)
        _in_range("anneal_tolerance", self.anneal_tolerance, low=0.0, low_open=True)
        _in_range("min_momentum", self.min_momentum, low=0.0, high=1.0, high_open=True)
        _in_range("max_momentum", self.max_momentum, low=self.min_momentum, high=1.0, high_open=True)
        _in_range("curvature_range_decay", self.curvature_range_decay, low=0.0, high=1.0, high_open=True)
        _in_range("cosine_decay", self.cosine_decay, low=0.0, high=1.0, high_open=True)
        _in_range("history_size", self.history_size, low=1)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ControllerOptions:
        """Build from keyword arguments; an unknown name raises TypeError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"unknown adaptive_lr option(s): {', '.join(unknown)}; "
                f"valid options are: {', '.join(sorted(known))}"
            )
        return cls(**kwargs)

    def replace(self, **changes: Any) -> ControllerOptions:
        """A copy with some options changed, validated like a new instance."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown adaptive_lr option(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def all_off(cls, **changes: Any) -> ControllerOptions:
        """Every feedback component switched off: the wrapper then reproduces the base optimizer."""
        base: dict[str, Any] = dict.fromkeys((*COMPONENTS, "anneal"), False)
        base.update(changes)
        return cls.from_kwargs(**base)

    @classmethod
    def full_batch(cls, **changes: Any) -> ControllerOptions:
        """Settings for deterministic (full-batch) problems, where the curvature signals
        are clean: the Hessian probe every 100 steps (pass ``step(closure)``), momentum from
        the curvature range alone over slowly forgotten extremes, a stability margin of
        0.9 instead of 0.5, a faster approach to it, each step's gradient cosine as it is
        (no average: on a deterministic problem it carries no noise to average, and an
        average only delays the lr's rise and the oscillation signal), and no update
        guard (the probe bounds the very first step by the measured top curvature). On
        the quadratics of benchmarks/quadratic_limit.py (row adaptive_sgd_full_batch),
        from SGD(lr=1e-3, momentum=0.9), it needed 17 / 49 / 127 / 319 iterations at
        kappa 10 / 100 / 1000 / 10000 (median of 3 seeds; 29 / 61 / 139 / 337 gradient
        evaluations with the probe's) where optimal heavy ball, which knows L and mu,
        needs 12 / 47 / 173 / 619, and optimal gradient descent 26 / 248 / 2556 / more
        than 20000. Under gradient noise or on networks the defaults are the safer
        choice: their margin of 0.5 leaves room for a network's sharpening, and their
        cosine average for noise (under the benchmark's noise this preset ends 1.1-1.5x
        higher than with a two-step average).
        """
        base: dict[str, Any] = {
            "curvature_probe_every": 100,
            "lower_momentum": True,
            "curvature_range_decay": 0.999,
            "stability_margin": 0.9,
            "cap_approach": 0.5,
            "cosine_decay": 0.0,
            "update_guard": False,
        }
        base.update(changes)
        return cls.from_kwargs(**base)


_TYPES = {
    "bool": (bool,),
    "float": (int, float),
    "int": (int,),
    "float | None": (int, float, type(None)),
    "bool | None": (bool, type(None)),
    "str": (str,),
}


def _check_type(name: str, value: Any, annotation: Any) -> None:
    allowed = _TYPES[str(annotation)]
    # bool is an int subclass: True must not pass for a number, nor 1 for a flag.
    is_bool = isinstance(value, bool)
    ok = isinstance(value, allowed) and (is_bool == (bool in allowed) or value is None)
    if not ok:
        raise TypeError(f"option {name} must be {annotation}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"option {name} must be finite, got {value}")


def _in_range(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"option {name} must be in {left}{lo}, {hi}{right}, got {value}")
