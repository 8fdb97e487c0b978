"""What is measured each step, with torch's foreach ops and one host sync.

The gradient norm (global and per group) is exact, over every gradient. The secant
signals need the last parameter change d = x_{t-1} - x_t; they are measured on a fixed
sample of coordinates (one contiguous block of each large tensor, at a fixed
pseudo-random offset; tensors of at most ``min_sample_size`` elements entirely), each
tensor's contribution weighted by numel / sampled so the sums estimate the full ones::

    curvature      = <g_{t-1} - g_t, d> / ||d||^2            (secant, Barzilai-Borwein)
    step_sharpness = <g_{t-1} - g_t, d> / <g_{t-1}, d>       (lr x curvature along the update)
    grad_cosine    = <g_t, d> / (||g_t|| ||d||)
    step_size      = ||d||
    successive_grad_cosine = <g_t, g_{t-1}> / (||g_t|| ||g_{t-1}||)   (track_successive_cosine)

With ``sample_fraction=1`` everything is exact. Sampling is what keeps the signals cheap:
the buffer for d (and, with ``track_successive_cosine``, for the last gradient) and the
memory traffic of the secant shrink by the sample fraction (d needs a copy before the
inner step and a subtraction after it).

For plain gradient descent d = lr g_{t-1}, so grad_cosine is the cosine between
successive gradients and step_sharpness = lr x curvature. For momentum and adaptive
methods d is the actual update, so grad_cosine < 0 says the gradient has turned against
the step just taken (overshoot), and step_sharpness measures the curvature along the
update in the optimizer's own metric.

All scalars of a step are stacked into one float64 vector and read back with a single
``.tolist()``: one host sync per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adaptive_lr.controller import Signals
from adaptive_lr.distributed import RankReduction, is_dtensor, local

_GOLDEN = 2654435761  # Knuth's multiplicative hash: spreads sample offsets over tensors.


def dots(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """Per-tensor dot products of flat (1-d, real) tensors as a float64 vector.

    torch has no foreach dot product; one ``torch.dot`` per tensor reads each operand once
    and allocates nothing parameter-sized.
    """
    if not xs:
        return torch.zeros(0, dtype=torch.float64)
    return _stack([torch.dot(x, y) for x, y in zip(xs, ys, strict=True)])


def squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """Per-tensor squared L2 norms as a float64 vector (foreach)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return _stack(torch._foreach_norm(list(tensors))).square()


def _flat(t: Tensor) -> Tensor:
    t = local(t)  # a DTensor's own shard: sums over it are this rank's part
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1)


def _block(flat: Tensor, offset: int, length: int) -> Tensor:
    return flat if length == flat.numel() else flat[offset : offset + length]


def _stack(scalars: Sequence[Tensor]) -> Tensor:
    """0-d tensors into one float64 vector on the first one's device."""
    try:
        # One device (the common case): stack promotes mixed float dtypes exactly, then one cast.
        return torch.stack(list(scalars)).to(torch.float64)
    except RuntimeError:  # several devices
        device = scalars[0].device
        return torch.stack([s.to(device=device, dtype=torch.float64) for s in scalars])


@dataclass(frozen=True)
class SampleLayout:
    """Which coordinates of each tensor the secant signals read."""

    fraction: float
    min_size: int

    def block(self, position: int, numel: int) -> tuple[int, int]:
        """(offset, length) of the sampled block of a tensor with `numel` elements.

        A function of the parameter's position in the param groups and its size only, so
        a resumed run samples the same coordinates.
        """
        length = min(numel, max(self.min_size, math.ceil(self.fraction * numel)))
        offset = (position * _GOLDEN) % (numel - length + 1)
        return offset, length


@dataclass
class GradientView:
    """The parameters that have a gradient this step, in param-group order."""

    params: list[Tensor]
    grads: list[Tensor]
    """The gradients' rank-local tensors (the gradients themselves unless DTensors)."""
    positions: list[int]
    """Position of each parameter in the param groups (as in state_dict)."""
    group_bounds: list[tuple[int, int]]
    """[start, end) of each param group inside params."""

    @classmethod
    def collect(cls, param_groups: Sequence[dict]) -> GradientView:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        positions: list[int] = []
        bounds: list[tuple[int, int]] = []
        position = 0
        for group in param_groups:
            start = len(params)
            for p in group["params"]:
                position += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(
                        "adaptive_lr does not support sparse gradients (e.g. "
                        "nn.Embedding(sparse=True)): use dense gradients or leave those "
                        "parameters to a separate, unwrapped optimizer"
                    )
                params.append(p)
                grads.append(local(p.grad))
                positions.append(position - 1)
            bounds.append((start, len(params)))
        return cls(params, grads, positions, bounds)


@dataclass
class StepSample:
    """This step's sampled blocks, built once and shared by measuring and stepping."""

    params: list[Tensor]
    param_blocks: list[Tensor]
    grad_blocks: list[Tensor]
    weights: Tensor
    """numel / sampled per tensor: the weights that turn block sums into full estimates."""


class Trajectory:
    """The last descent step on the sampled coordinates, and the secant's scalars."""

    def __init__(self, layout: SampleLayout, *, track_last_grad: bool = False) -> None:
        self.layout = layout
        self.track_last_grad = track_last_grad
        self.descent: dict[Tensor, Tensor] = {}
        """Sampled d per parameter (a flat block)."""
        self.blocks: dict[Tensor, tuple[int, int, float]] = {}
        """(offset, length, weight = numel / length) per parameter."""
        self.grad_dot_descent: Tensor | None = None
        """Estimate of <g_{t-1}, d>, computed with the unclipped gradient."""
        self.descent_sq: Tensor | None = None
        """Estimate of ||d||^2."""
        self.last_grad: dict[Tensor, Tensor] = {}
        """Sampled g_{t-1} per parameter (unclipped), for the successive-gradient cosine."""
        self._param_blocks: dict[Tensor, tuple[int, Tensor]] = {}
        """(data_ptr, sampled view) per plain-tensor parameter: the views of x are reused
        while the parameter keeps its storage (in-place updates, load_state_dict)."""
        self._weights: tuple[tuple, Tensor] | None = None
        """The weights tensor of the last step's parameters, keyed by device and their ids."""

    def __getstate__(self) -> dict:
        # The cached views are not copied (deepcopy, pickle): a copy rebuilds them for its
        # own parameters, and views made under no_grad cannot be deep-copied anyway.
        return {**self.__dict__, "_param_blocks": {}, "_weights": None}

    @property
    def ready(self) -> bool:
        return self.grad_dot_descent is not None and bool(self.descent)

    def reset(self) -> None:
        self.descent.clear()
        self.last_grad.clear()
        self.grad_dot_descent = None
        self.descent_sq = None

    def place(self, p: Tensor, position: int) -> None:
        """Fix the sampled block of parameter `p` at `position` in the param groups."""
        if p not in self.blocks:
            numel = _flat(p).numel()
            offset, length = self.layout.block(position, numel)
            # An empty local shard (FSDP2, more ranks than rows) contributes nothing.
            self.blocks[p] = (offset, length, numel / length if length else 0.0)

    def prepare(self, view: GradientView) -> StepSample:
        """The sampled blocks of this step's parameters and gradients."""
        param_blocks, grad_blocks = [], []
        for p, g, position in zip(view.params, view.grads, view.positions, strict=True):
            self.place(p, position)
            offset, length, _ = self.blocks[p]
            param_blocks.append(self._param_block(p, offset, length))
            grad_blocks.append(_block(_flat(g), offset, length))
        return StepSample(view.params, param_blocks, grad_blocks, self._weights_of(view.params))

    def _param_block(self, p: Tensor, offset: int, length: int) -> Tensor:
        if is_dtensor(p):  # its local shard is looked up afresh each step
            return _block(_flat(p), offset, length)
        pointer = p.data_ptr()
        cached = self._param_blocks.get(p)
        if cached is None or cached[0] != pointer:
            cached = (pointer, _block(_flat(p), offset, length))
            self._param_blocks[p] = cached
        return cached[1]

    def _weights_of(self, params: list[Tensor]) -> Tensor:
        device = params[0].device if params else None
        key = (device, *map(id, params))  # a model moved to another device gets new weights
        if self._weights is None or self._weights[0] != key:
            weights = [self.blocks[p][2] for p in params]
            self._weights = (key, torch.tensor(weights, dtype=torch.float64, device=device))
        return self._weights[1]

    def snapshot(self, sample: StepSample) -> None:
        """Keep x_t's sample in the descent buffers before the inner step."""
        if len(self.descent) != len(sample.params) or any(p not in self.descent for p in sample.params):
            kept = set(sample.params)
            for p in [p for p in self.descent if p not in kept]:
                del self.descent[p]  # Not updated this step: its descent is zero, drop it.
            for p, block in zip(sample.params, sample.param_blocks, strict=True):
                if p not in self.descent:
                    self.descent[p] = torch.empty_like(block)
        torch._foreach_copy_([self.descent[p] for p in sample.params], sample.param_blocks)

    def finish(self, sample: StepSample, clip_coef: float) -> None:
        """After the inner step: d = x_t - x_{t+1} on the sample, and its scalars (on device)."""
        if not sample.params:
            self.reset()
            return
        buffers = [self.descent[p] for p in sample.params]
        torch._foreach_sub_(buffers, sample.param_blocks)
        self.grad_dot_descent = (dots(sample.grad_blocks, buffers) @ sample.weights) / clip_coef
        self.descent_sq = squared_norms(buffers) @ sample.weights
        if self.track_last_grad:
            self._keep_last_grad(sample, clip_coef)

    def _keep_last_grad(self, sample: StepSample, clip_coef: float) -> None:
        for p in [p for p in self.last_grad if p not in self.descent]:
            del self.last_grad[p]
        for p, block in zip(sample.params, sample.grad_blocks, strict=True):
            if p not in self.last_grad:
                self.last_grad[p] = torch.empty_like(block)
        last = [self.last_grad[p] for p in sample.params]
        torch._foreach_copy_(last, sample.grad_blocks)
        if clip_coef != 1.0:
            torch._foreach_div_(last, clip_coef)  # the unclipped gradient

    def successive_grad_products(self, sample: StepSample) -> tuple[Tensor, Tensor, Tensor]:
        """Estimates of <g_t, g_{t-1}>, ||g_t||^2 and ||g_{t-1}||^2 on the shared sample."""
        kept = [i for i, p in enumerate(sample.params) if p in self.last_grad]
        if not kept:
            zero = torch.zeros((), dtype=torch.float64)
            return zero, zero, zero
        grads = [sample.grad_blocks[i] for i in kept]
        last = [self.last_grad[sample.params[i]] for i in kept]
        weights = sample.weights[kept] if len(kept) < len(sample.params) else sample.weights
        return dots(grads, last) @ weights, squared_norms(grads) @ weights, squared_norms(last) @ weights

    def param_grad_dot(self, sample: StepSample) -> Tensor:
        """Estimate of <x_t, g_t> (before the step), for the fluctuation-dissipation test."""
        return dots(sample.param_blocks, sample.grad_blocks) @ sample.weights

    def grad_dot(self, sample: StepSample) -> Tensor:
        """Estimate of <g_t, d> over the parameters that have both."""
        if all(p in self.descent for p in sample.params):
            buffers = [self.descent[p] for p in sample.params]
            return dots(sample.grad_blocks, buffers) @ sample.weights
        kept = [i for i, p in enumerate(sample.params) if p in self.descent]
        if not kept:
            return torch.zeros((), dtype=torch.float64)
        grads = [sample.grad_blocks[i] for i in kept]
        buffers = [self.descent[sample.params[i]] for i in kept]
        return dots(grads, buffers) @ sample.weights[kept]


def measure(
    view: GradientView,
    trajectory: Trajectory,
    sample: StepSample,
    loss: Tensor | float | None,
    *,
    param_grad: bool = False,
    reduction: RankReduction | None = None,
) -> tuple[Signals, list[float]]:
    """Compute this step's signals with one host sync.

    With a ``reduction`` (several ranks) the vector of scalars is all-reduced once before
    it is read, the loss averaged (see `adaptive_lr.distributed`).

    Returns the signals for the controller and the per-group gradient norms.
    """
    norms_sq = squared_norms(view.grads)
    if len(view.group_bounds) == 1:
        group_sq = [norms_sq.sum()]
        parts: list[Tensor] = [group_sq[0], group_sq[0]]
    else:
        group_sq = [norms_sq[a:b].sum() for a, b in view.group_bounds]
        parts = [norms_sq.sum(), *group_sq]
    secant = trajectory.ready
    successive = trajectory.ready and bool(trajectory.last_grad)
    if secant:
        parts += [trajectory.grad_dot(sample), trajectory.grad_dot_descent, trajectory.descent_sq]
    if successive:
        parts += trajectory.successive_grad_products(sample)
    param_grad = param_grad and bool(sample.params)
    if param_grad:
        parts.append(trajectory.param_grad_dot(sample))
    loss_in_vector = isinstance(loss, Tensor) or (reduction is not None and loss is not None)
    if loss_in_vector:
        loss_part = loss.detach().reshape(()) if isinstance(loss, Tensor) else torch.tensor(float(loss))
        parts.append(loss_part.to(device=parts[0].device))
    stacked = _stack(parts)
    if reduction is not None:
        stacked = reduction(stacked, averaged=[len(parts) - 1] if loss_in_vector else [])
    values = stacked.tolist()

    total_sq = values[0]
    groups = [v**0.5 for v in values[1 : 1 + len(group_sq)]]
    rest = values[1 + len(group_sq) :]
    grad_norm = total_sq**0.5
    curvature = step_sharpness = grad_cosine = step_size = successive_cosine = None
    if secant:
        grad_dot, previous_dot, descent_sq = rest[:3]
        rest = rest[3:]
        step_size = descent_sq**0.5
        change = previous_dot - grad_dot  # <g_{t-1} - g_t, d>
        if descent_sq > 0.0:
            curvature = change / descent_sq
            if grad_norm > 0.0:
                grad_cosine = max(-1.0, min(1.0, grad_dot / (grad_norm * step_size)))
        if previous_dot > 0.0:
            step_sharpness = change / previous_dot
    if successive:
        both, now_sq, last_sq = rest[:3]
        rest = rest[3:]
        if now_sq > 0.0 and last_sq > 0.0:
            successive_cosine = max(-1.0, min(1.0, both / (now_sq * last_sq) ** 0.5))
    param_grad_value = None
    if param_grad:
        param_grad_value, rest = rest[0], rest[1:]
    if loss_in_vector:
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
        successive_grad_cosine=successive_cosine,
        param_grad_dot=param_grad_value,
    )
    return signals, groups
