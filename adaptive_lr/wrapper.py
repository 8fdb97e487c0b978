"""The drop-in `torch.optim.Optimizer` that applies the controller to any base optimizer.

Signals (signals.py) -> decision (controller.py) -> application (here). The wrapper
shares ``param_groups``, ``state`` and ``defaults`` with the base optimizer through
properties, so schedulers, GradScaler and loggers see the truth. Between steps the param
groups hold the user's scheduled lr and momentum; the controller's multiplier and momentum
are written only for the duration of the inner step and restored in ``finally``.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adaptive_lr import controller as ctl
from adaptive_lr.distributed import RankReduction, local
from adaptive_lr.options import ControllerOptions
from adaptive_lr.signals import GradientView, SampleLayout, Trajectory, measure, squared_norms
from adaptive_lr.telemetry import HistoryCallback, StepRecord

if TYPE_CHECKING:
    from adaptive_lr.hessian import SharpnessEstimate

STATE_KEY = "adaptive_lr"
DESCENT_KEY = "adaptive_lr.descent"
LAST_GRAD_KEY = "adaptive_lr.last_grad"
PROBE_KEY = "adaptive_lr.probe_vector"
COLD_PROBE_FACTOR = 2
"""A cold probe (the first, or after the parameters changed), which starts at the gradient,
may run this many times ``probe_iterations`` products."""
FORMAT_VERSION = 1

_PRECONDITIONED = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
)

# Keys that survive pickling and deep copies. Schedulers patch `step` on the instance; it
# must not travel (a copy's step would advance the original's controller).
_PICKLED = (
    "optimizer",
    "options",
    "callback",
    "_controller_state",
    "_trajectory",
    "_history",
    "_probe_vector",
)


class AdaptiveOptimizer(Optimizer):
    """Wrap ``optimizer`` so a feedback controller sets its lr multiplier and momentum.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SGD, Adam, ... or a third-party one).
        options: a ``ControllerOptions``; or pass its fields as keyword arguments.
        callback: called with each ``StepRecord`` after every step (CSV, TensorBoard, ...).

    ``step(closure=None, *, loss=None)``: a closure is evaluated once under
    ``torch.enable_grad()`` and its loss returned, as torch optimizers do; ``loss`` hands
    the loss over when there is no closure (e.g. ``scaler.step(opt, loss=loss)``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        options: ControllerOptions | None = None,
        *,
        callback: HistoryCallback | None = None,
        **option_kwargs: Any,
    ) -> None:
        if isinstance(optimizer, AdaptiveOptimizer):
            raise TypeError("optimizer is already an AdaptiveOptimizer; wrap the base optimizer once")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"adaptive_lr wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if options is not None and not isinstance(options, ControllerOptions):
            raise TypeError(f"options must be a ControllerOptions, got {type(options).__name__}")
        if options is not None and option_kwargs:
            raise TypeError("pass either options=ControllerOptions(...) or keyword options, not both")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        opts = options if options is not None else ControllerOptions.from_kwargs(**option_kwargs)
        if not any(len(g["params"]) for g in optimizer.param_groups):
            raise ValueError(f"{type(optimizer).__name__} has no parameters to optimize")
        for i, group in enumerate(optimizer.param_groups):
            _check_group(group, i, type(optimizer).__name__)

        torch._C._log_api_usage_once("python.optimizer")
        self.optimizer = optimizer
        self.options = opts
        self.callback = callback
        self._controller_state = ctl.init_state(opts)
        self._trajectory = _trajectory(opts)
        self._history: deque[StepRecord] = deque(maxlen=opts.history_size)
        self._probe_vector: dict[Tensor, Tensor] = {}
        self._init_hooks()

    # -- sharing with the base optimizer -------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def history(self) -> deque[StepRecord]:
        """Recent step records, oldest first (at most ``options.history_size``)."""
        return self._history

    @property
    def lr_multiplier(self) -> float:
        return self._controller_state.lr_multiplier

    @property
    def controls_momentum(self) -> bool:
        """Whether the controller sets the momentum (False where the base has none)."""
        return self.options.momentum_control and _momentum_of(self.param_groups[0]) is not None

    def _init_hooks(self) -> None:
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    def __getstate__(self) -> dict[str, Any]:
        return {key: self.__dict__[key] for key in _PICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        changed = {
            f.name: getattr(self.options, f.name)
            for f in fields(self.options)
            if getattr(self.options, f.name) != f.default
        }
        if self.controls_momentum:
            key = "betas[0]" if "betas" in self.param_groups[0] else "momentum"
            controls = f"lr multiplier and momentum ({key})"
        elif self.options.momentum_control:
            controls = f"lr multiplier only: {type(self.optimizer).__name__} has no momentum to control"
        else:
            controls = "lr multiplier only: momentum_control=False"
        return (
            f"AdaptiveOptimizer(\n  controls: {controls}\n"
            f"  lr_multiplier: {self.lr_multiplier:.6g}\n"
            f"  options: {changed or 'defaults'}\n  optimizer:\n{inner}\n)"
        )

    # -- delegation ------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        _check_group(self.param_groups[-1], len(self.param_groups) - 1, type(self.optimizer).__name__)

    # -- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:  # type: ignore[override]
        """Measure, decide, then run the base optimizer's step with the decided lr/momentum."""
        if closure is not None:
            if loss is not None:
                raise ValueError("pass a closure or a loss to step(), not both")
            with torch.enable_grad():
                loss = closure()
        loss_for_signals = _validate_loss(loss)
        probe_due = self._probe_due()
        if probe_due and closure is None:
            raise ValueError(
                f"curvature_probe_every={self.options.curvature_probe_every} needs "
                "step(closure) with a closure that recomputes the loss and gradients and "
                "returns the loss"
            )
        view = GradientView.collect(self.param_groups)
        reduction = RankReduction.for_tensors(view.params, enabled=self.options.sync_ranks)
        if probe_due and reduction is not None and reduction.sharded:
            raise ValueError(
                "the Hessian probe (curvature_probe_every > 0) does not support sharded (FSDP2) "
                "parameters; set curvature_probe_every=0"
            )
        sample = self._trajectory.prepare(view)
        signals, group_norms = measure(
            view,
            self._trajectory,
            sample,
            loss_for_signals,
            param_grad=self.options.anneal,
            reduction=reduction,
        )
        if probe_due:
            # The probe leaves parameters and gradients as it found them: what was just
            # measured stays true.
            usable_gradient = math.isfinite(signals.grad_norm) and signals.grad_norm > 0.0
            signals = replace(signals, sharpness=self._probe(closure, view, usable_gradient))

        context = self._context()
        decision, new_state = ctl.decide(signals, self._controller_state, self.options, context)
        if not decision.skip and view.params:
            if decision.clip_coef < 1.0:
                torch._foreach_mul_(view.grads, decision.clip_coef)
            self._trajectory.snapshot(sample)
            # The first step's full parameters: kept once, for the update guard's check.
            first = new_state.reference_norm is None
            before = [local(p).detach().clone() for p in view.params] if first else None
            try:
                with _applied(self.param_groups, decision, self.options.momentum_control):
                    self.optimizer.step()
            except BaseException:
                self._trajectory.reset()
                raise
            if before is not None:
                new_state, decision = self._check_first_step(view, before, new_state, decision, reduction)
            self._trajectory.finish(sample)
        self._controller_state = new_state
        self._record(decision, signals, group_norms, context)
        return loss

    def _check_first_step(
        self,
        view: GradientView,
        before: list[Tensor],
        state: ctl.ControllerState,
        decision: ctl.Decision,
        reduction: RankReduction | None,
    ) -> tuple[ctl.ControllerState, ctl.Decision]:
        """The update guard's after-the-fact check of a step nothing could predict.

        Costs a copy of the parameters and one extra host sync (and, on several ranks, one
        extra all-reduce), on the first step only.
        """
        params = [local(p) for p in view.params]
        param_sq = squared_norms(before).sum()
        torch._foreach_sub_(before, params)  # now the full step d = x_0 - x_1
        sums = torch.stack([squared_norms(before).sum(), param_sq])
        step_sq, norm_sq = (sums if reduction is None else reduction(sums)).tolist()
        scale, state = ctl.first_step_scale(step_sq**0.5, norm_sq**0.5, state, self.options)
        if scale < 1.0:
            # Updates are linear in lr: x_0 - scale * d is the step at lr x scale.
            torch._foreach_add_(params, before, alpha=1.0 - scale)
            decision = replace(
                decision,
                lr_multiplier=decision.lr_multiplier * scale,
                event=decision.event or "update_cap",
            )
        return state, decision

    def _context(self) -> ctl.Context:
        group = self.param_groups[0]
        preconditioned = self.options.preconditioned
        if preconditioned is None:
            preconditioned = isinstance(self.optimizer, _PRECONDITIONED) or "betas" in group
        return ctl.Context(
            lr=max(float(g["lr"]) for g in self.param_groups),
            momentum=_momentum_of(group),
            preconditioned=preconditioned,
            ema_momentum="betas" in group,
        )

    def _probe_due(self) -> bool:
        every = self.options.curvature_probe_every
        return every > 0 and self._controller_state.step % every == 0

    def _probe(self, closure: Callable[[], Any], view: GradientView, usable_gradient: bool) -> float:
        """The top Hessian eigenvalue; `usable_gradient`: the gradient is finite and nonzero."""
        params = view.params
        warm = all(p in self._probe_vector for p in params)
        estimate = probe(
            closure,
            params,
            self.options,
            gradient=view.grads if usable_gradient else None,
            vector=[self._probe_vector[p] for p in params] if warm else None,
            reference=self._controller_state.sharpness if warm else None,  # the last finite one
        )
        self._probe_vector = dict(zip(params, estimate.vector, strict=True))
        return estimate.eigenvalue

    def _record(
        self,
        decision: ctl.Decision,
        signals: ctl.Signals,
        group_norms: list[float],
        context: ctl.Context,
    ) -> None:
        group = self.param_groups[0]
        applied = 0.0 if decision.skip else decision.lr_multiplier
        momentum = decision.momentum if self.options.momentum_control else context.momentum
        record = StepRecord(
            step=self._controller_state.step,
            lr=float(group["lr"]) * applied,
            lr_multiplier=decision.lr_multiplier,
            momentum=None if decision.skip else momentum,
            grad_norm=signals.grad_norm,
            curvature=decision.curvature,
            event=decision.event,
            loss=signals.loss,
            grad_cosine=signals.grad_cosine,
            successive_grad_cosine=signals.successive_grad_cosine,
            sharpness=signals.sharpness,
            clip_coef=decision.clip_coef,
            momentum_controlled=self.controls_momentum,
            group_grad_norms=tuple(group_norms),
        )
        self._history.append(record)
        if self.callback is not None:
            self.callback(record)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict with the controller's state inside it.

        Controller scalars sit in ``param_groups[0]["adaptive_lr"]`` and the per-parameter
        buffers in ``state[i]`` under ``"adaptive_lr.*"`` keys: the standard layout, which
        torch.distributed.checkpoint keeps, with plain numbers and tensors only.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        inner = self.optimizer.state_dict()
        index = _param_index(self.param_groups)
        state = {k: dict(v) for k, v in inner["state"].items()}
        for p, buffer in self._trajectory.descent.items():
            state.setdefault(index[p], {})[DESCENT_KEY] = buffer
        for p, buffer in self._trajectory.last_grad.items():
            state.setdefault(index[p], {})[LAST_GRAD_KEY] = buffer
        for p, vector in self._probe_vector.items():
            state.setdefault(index[p], {})[PROBE_KEY] = vector
        groups = [dict(g) for g in inner["param_groups"]]
        trajectory = self._trajectory
        groups[0][STATE_KEY] = {
            "version": FORMAT_VERSION,
            "optimizer_class": _class_name(self.optimizer),
            "options": self.options.to_dict(),
            "controller": asdict(self._controller_state),
            "grad_dot_descent": trajectory.grad_dot_descent,
            "descent_sq": trajectory.descent_sq,
        }
        state_dict = {"state": state, "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a state dict from ``state_dict()``; a bare base-optimizer one also loads
        (the controller then starts fresh). A checkpoint of another optimizer class raises
        ValueError, and nothing is changed when loading fails."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = [dict(g) for g in state_dict["param_groups"]]
        saved = groups[0].pop(STATE_KEY, None) if groups else None
        controller_state, options, scalars = ctl.init_state(self.options), self.options, (None, None)
        if saved is not None:
            if saved.get("version") != FORMAT_VERSION:
                raise ValueError(f"unsupported adaptive_lr checkpoint version {saved.get('version')!r}")
            if saved["optimizer_class"] != _class_name(self.optimizer):
                raise ValueError(
                    f"checkpoint was saved from an AdaptiveOptimizer over {saved['optimizer_class']}, "
                    f"cannot load it into one over {_class_name(self.optimizer)}"
                )
            options = ControllerOptions.from_kwargs(**saved["options"])
            known = {f.name for f in fields(ctl.ControllerState)}
            controller_state = ctl.ControllerState(
                **{k: v for k, v in saved["controller"].items() if k in known}
            )
            scalars = (saved["grad_dot_descent"], saved["descent_sq"])
        extra_keys = (DESCENT_KEY, LAST_GRAD_KEY, PROBE_KEY)
        inner_state = {}
        ours: dict[int, dict[str, Tensor]] = {}
        for k, v in state_dict["state"].items():
            kept = {name: t for name, t in v.items() if name not in extra_keys}
            mine = {name: t for name, t in v.items() if name in extra_keys}
            if kept:
                inner_state[k] = kept
            if mine:
                ours[k] = mine
        self.optimizer.load_state_dict({"state": inner_state, "param_groups": groups})

        params = [p for g in self.param_groups for p in g["params"]]
        trajectory = _trajectory(options)
        descent: dict[Tensor, Tensor] = {}
        last_grad: dict[Tensor, Tensor] = {}
        probe: dict[Tensor, Tensor] = {}
        for k, entries in ours.items():
            p = params[int(k)]
            # Copies in the saved dtype (the trajectory keeps at least float32), on p's device.
            if DESCENT_KEY in entries:
                descent[p] = entries[DESCENT_KEY].to(device=p.device).clone()
            if LAST_GRAD_KEY in entries:
                last_grad[p] = entries[LAST_GRAD_KEY].to(device=p.device).clone()
            if PROBE_KEY in entries:
                probe[p] = entries[PROBE_KEY].to(device=p.device, dtype=p.dtype).clone()
        grad_dot_descent, descent_sq = (None if s is None else s.clone() for s in scalars)
        trajectory.restore(descent, last_grad, grad_dot_descent, descent_sq)
        self.options = options
        self._controller_state = controller_state
        self._trajectory = trajectory
        self._probe_vector = probe
        self._history = deque(self._history, maxlen=options.history_size)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


def probe(
    closure: Callable[[], Any],
    params: list[Tensor],
    options: ControllerOptions,
    *,
    gradient: list[Tensor] | None,
    vector: list[Tensor] | None,
    reference: float | None,
) -> SharpnessEstimate:
    """One Hessian probe as ``step()`` runs it, through the training closure.

    ``gradient``: this step's gradients (``None`` where they are zero or non-finite);
    ``vector``: the last probe's vector (``None`` for a cold probe); ``reference``: the
    last finite estimate. A cold probe starts at the gradient, which the Hessian has
    already weighted toward its top eigenvectors (g = H x on a quadratic), or at random
    without one, and may spend COLD_PROBE_FACTOR times ``probe_iterations`` products. A
    warm probe carries on from the last vector, since the top of the spectrum drifts
    slowly, and tests its first product against ``reference``, so that where the
    iteration has settled it costs one product. The Krylov solver's warm probe starts
    from the last vector and the gradient's direction in equal parts: a last vector
    whose curvature holds still while a sharper direction appears elsewhere would keep
    the estimate low (power iteration's 20-27% on the 1M MLP of
    benchmarks/probe_warm_start.py), and the gradient leans toward the top of the
    spectrum; the Krylov space of that start finds both.
    """
    from adaptive_lr.hessian import _global_norm, closure_hvp, krylov_top_eigenvalue, top_eigenvalue

    krylov = options.probe_solver == "krylov"
    if vector is None:
        initial, reference, products = gradient, None, options.probe_iterations * COLD_PROBE_FACTOR
    else:
        initial, products = vector, options.probe_iterations
        if krylov and gradient is not None:  # vector has unit norm, and so has the added part
            direction = [g.to(v.dtype) for g, v in zip(gradient, vector, strict=True)]
            initial = torch._foreach_add(vector, direction, alpha=1.0 / _global_norm(direction).item())
    solver = krylov_top_eigenvalue if krylov else top_eigenvalue
    return solver(
        closure_hvp(closure, params),
        params,
        iterations=products,
        tolerance=options.probe_tolerance,
        initial=initial,
        reference=reference,
    )


def wrap(
    optimizer: Optimizer,
    options: ControllerOptions | None = None,
    *,
    callback: HistoryCallback | None = None,
    **option_kwargs: Any,
) -> AdaptiveOptimizer:
    """``AdaptiveOptimizer(optimizer, ...)``: gradient-aware control with good defaults."""
    return AdaptiveOptimizer(optimizer, options, callback=callback, **option_kwargs)


class _applied:
    """Context manager: the decided lr and momentum in every group, restored on exit."""

    def __init__(self, groups: list[dict[str, Any]], decision: ctl.Decision, set_momentum: bool) -> None:
        self.groups = groups
        self.decision = decision
        self.set_momentum = set_momentum and decision.momentum is not None
        self.saved: list[tuple[dict[str, Any], str, Any]] = []

    def __enter__(self) -> None:
        for group in self.groups:
            self.saved.append((group, "lr", group["lr"]))
            group["lr"] = group["lr"] * self.decision.lr_multiplier
            if not self.set_momentum or _momentum_of(group) is None:
                continue
            momentum = self.decision.momentum
            if "betas" in group:
                betas = group["betas"]
                self.saved.append((group, "betas", betas))
                beta1 = betas[0].new_tensor(momentum) if isinstance(betas[0], Tensor) else momentum
                group["betas"] = (beta1, betas[1])
            else:
                self.saved.append((group, "momentum", group["momentum"]))
                group["momentum"] = momentum

    def __exit__(self, *exc: object) -> None:
        for group, key, value in reversed(self.saved):
            group[key] = value


def _trajectory(options: ControllerOptions) -> Trajectory:
    layout = SampleLayout(fraction=options.sample_fraction, min_size=options.min_sample_size)
    return Trajectory(layout, track_last_grad=options.track_successive_cosine)


def _momentum_of(group: dict[str, Any]) -> float | None:
    """The group's momentum: betas[0] (Adam family) or a non-zero ``momentum``.

    A zero ``momentum`` means the base optimizer keeps no momentum buffer (RMSprop would
    fail to find one if it appeared mid-run), so the controller leaves it alone.
    """
    if "betas" in group:
        return float(group["betas"][0])
    momentum = group.get("momentum")
    if momentum is None or float(momentum) == 0.0:
        return None
    return float(momentum)


def _check_group(group: dict[str, Any], index: int, name: str) -> None:
    if "lr" not in group:
        raise ValueError(f"param group {index} of {name} has no 'lr': adaptive_lr scales the learning rate")
    lr = float(group["lr"])
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"param group {index} of {name} has an invalid lr {lr}")


def _validate_loss(loss: Any) -> Tensor | float | None:
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"the loss must be a scalar (one element), got a tensor of shape {tuple(loss.shape)}"
            )
        if loss.is_complex():
            raise ValueError("the loss must be real, got a complex tensor")
        return loss
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise ValueError(f"the loss must be a scalar tensor or a number, got {type(loss).__name__}")


def _param_index(groups: list[dict[str, Any]]) -> dict[Tensor, int]:
    index: dict[Tensor, int] = {}
    for group in groups:
        for p in group["params"]:
            index.setdefault(p, len(index))
    return index


def _class_name(optimizer: Optimizer) -> str:
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"
