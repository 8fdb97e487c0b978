"""What is measured each step, with torch's foreach ops and one host sync.

The secant signals need the last parameter change. They are kept with one buffer per
parameter, the last descent step d = x_{t-1} - x_t, and two scalars computed right after
that step: <g_{t-1}, d> and ||d||^2. At step t, with the new gradient g_t::

    curvature      = <g_{t-1} - g_t, d> / ||d||^2            (secant, Barzilai-Borwein)
    step_sharpness = <g_{t-1} - g_t, d> / <g_{t-1}, d>       (lr x curvature along the update)
    grad_cosine    = <g_t, d> / (||g_t|| ||d||)

For plain gradient descent d = lr g_{t-1}, so grad_cosine is the cosine between
successive gradients and step_sharpness = lr x curvature. For momentum and adaptive
methods d is the actual update, so grad_cosine < 0 says the gradient has turned against
the step just taken (overshoot), and step_sharpness measures the curvature along the
update in the optimizer's own metric. Storing g_{t-1} as well would give the plain
successive-gradient cosine at the price of a second parameter-sized buffer.

All scalars of a step (norms, dot products, the loss) are stacked into one float64 vector
and read back with a single ``.tolist()``: one host sync per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adaptive_lr.controller import Signals


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """Sum of per-tensor dot products as a 0-d float64 tensor (zero for empty lists).

    torch has no foreach dot product; one ``torch.dot`` per tensor reads each operand once
    and allocates nothing parameter-sized.
    """
    if not xs:
        return torch.zeros((), dtype=torch.float64)
    parts = [torch.dot(_flat(x), _flat(y)) for x, y in zip(xs, ys, strict=True)]
    return _stack(parts).sum()


def squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """Per-tensor squared L2 norms as a float64 vector (foreach)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return _stack(torch._foreach_norm(list(tensors))).square()


def _flat(t: Tensor) -> Tensor:
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1)


def _stack(scalars: Sequence[Tensor]) -> Tensor:
    """0-d tensors into one float64 vector on the first one's device."""
    device, dtype = scalars[0].device, scalars[0].dtype
    if all(s.device == device and s.dtype == dtype for s in scalars):
        return torch.stack(list(scalars)).to(torch.float64)  # the common case: one cast
    return torch.stack([s.to(device=device, dtype=torch.float64) for s in scalars])


@dataclass
class GradientView:
    """The parameters that have a gradient this step, in param-group order."""

    params: list[Tensor]
    grads: list[Tensor]
    group_bounds: list[tuple[int, int]]
    """[start, end) of each param group inside params."""

    @classmethod
    def collect(cls, param_groups: Sequence[dict]) -> GradientView:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        bounds: list[tuple[int, int]] = []
        for group in param_groups:
            start = len(params)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(
                        "adaptive_lr does not support sparse gradients (e.g. "
                        "nn.Embedding(sparse=True)): use dense gradients or leave those "
                        "parameters to a separate, unwrapped optimizer"
                    )
                params.append(p)
                grads.append(p.grad)
            bounds.append((start, len(params)))
        return cls(params, grads, bounds)


class Trajectory:
    """The last descent step per parameter and the scalars the secant signals need."""

    def __init__(self) -> None:
        self.descent: dict[Tensor, Tensor] = {}
        self.grad_dot_descent: Tensor | None = None
        """<g_{t-1}, d>, computed with the unclipped gradient."""
        self.descent_sq: Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.grad_dot_descent is not None and bool(self.descent)

    def reset(self) -> None:
        self.descent.clear()
        self.grad_dot_descent = None
        self.descent_sq = None

    def snapshot(self, params: Sequence[Tensor]) -> None:
        """Keep x_t in the descent buffers before the inner step (they become d after it)."""
        kept = set(params)
        for p in [p for p in self.descent if p not in kept]:
            del self.descent[p]  # Not updated this step: its descent is zero, drop it.
        for p in params:
            if p not in self.descent:
                self.descent[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        torch._foreach_copy_([self.descent[p] for p in params], list(params))

    def finish(self, view: GradientView, clip_coef: float) -> None:
        """After the inner step: d = x_t - x_{t+1}, and its scalars (kept on device)."""
        buffers = [self.descent[p] for p in view.params]
        if not buffers:
            self.reset()
            return
        torch._foreach_sub_(buffers, view.params)
        self.grad_dot_descent = dot(view.grads, buffers) / clip_coef
        self.descent_sq = squared_norms(buffers).sum()

    def shorten(self, params: Sequence[Tensor], scale: float) -> None:
        """Turn the step just taken, x_t -> x_t - d, into x_t -> x_t - scale * d."""
        buffers = [self.descent[p] for p in params]
        torch._foreach_add_(list(params), buffers, alpha=1.0 - scale)
        torch._foreach_mul_(buffers, scale)
        self.grad_dot_descent = self.grad_dot_descent * scale
        self.descent_sq = self.descent_sq * (scale * scale)


def measure(
    view: GradientView, trajectory: Trajectory, loss: Tensor | float | None
) -> tuple[Signals, list[float]]:
    """Compute this step's signals with one host sync.

    Returns the signals for the controller and the per-group gradient norms.
    """
    norms_sq = squared_norms(view.grads)
    group_sq = [norms_sq[a:b].sum() for a, b in view.group_bounds]
    device = norms_sq.device
    parts: list[Tensor] = [norms_sq.sum(), *group_sq]
    secant = trajectory.ready
    if secant:
        pairs = [
            (g, trajectory.descent[p])
            for p, g in zip(view.params, view.grads, strict=True)
            if p in trajectory.descent
        ]
        parts.append(dot([g for g, _ in pairs], [d for _, d in pairs]).to(device))
        parts.append(trajectory.grad_dot_descent.to(device))
        parts.append(trajectory.descent_sq.to(device))
    if isinstance(loss, Tensor):
        parts.append(loss.detach().reshape(()).to(device=device, dtype=torch.float64))
    values = _stack(parts).tolist()

    total_sq = values[0]
    groups = [v**0.5 for v in values[1 : 1 + len(group_sq)]]
    rest = values[1 + len(group_sq) :]
    grad_norm = total_sq**0.5
    curvature = step_sharpness = grad_cosine = step_size = None
    if secant:
        grad_dot, previous_dot, descent_sq = rest[:3]
        rest = rest[3:]
        step_size = descent_sq**0.5
        change = previous_dot - grad_dot  # <g_{t-1} - g_t, d>
        if descent_sq > 0.0:
            curvature = change / descent_sq
            if grad_norm > 0.0:
                grad_cosine = grad_dot / (grad_norm * descent_sq**0.5)
        if previous_dot > 0.0:
            step_sharpness = change / previous_dot
    if isinstance(loss, Tensor):
        loss_value: float | None = rest[0]
    else:
        loss_value = None if loss is None else float(loss)
    signals = Signals(
        grad_norm=grad_norm,
        loss=loss_value,
        curvature=curvature,
        step_sharpness=step_sharpness,
        grad_cosine=grad_cosine,
        step_size=step_size,
    )
    return signals, groups
