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

With ``sample_fraction=1`` everything is exact. Sampling is what keeps the signals
cheap: the buffer for d (and, with ``track_successive_cosine``, for the last gradient),
the sampled gradient copied each step and the memory traffic of the secant shrink by the
sample fraction (d needs a copy before the inner step and a subtraction after it). The
weights are applied per run of equally weighted coordinates, one multiply each; only a
layout with many distinct weights keeps them as a per-coordinate vector as large as d.
The samples of all parameters on a device (of one working dtype) lie end to end in one
flat buffer, so each sum is one ``torch.dot``, whatever the number of tensors.

For plain gradient descent d = lr g_{t-1}, so grad_cosine is the cosine between
successive gradients and step_sharpness = lr x curvature. For momentum and adaptive
methods d is the actual update, so grad_cosine < 0 says the gradient has turned against
the step just taken (overshoot), and step_sharpness measures the curvature along the
update in the optimizer's own metric.

All scalars of a step are stacked into one vector and read back with a single
``.tolist()``: one host sync per step. The terms of the gradient norms are summed on the
host, in float64: one dot per large gradient, and one per device and param group over
the small gradients, which the sample holds whole (they are laid out first in it).
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


_MAX_WEIGHT_PIECES = 8
"""Up to this many runs of equally weighted coordinates per segment, the weights are applied
one multiply per run (by a 0-d tensor); beyond, through a per-coordinate vector."""

_DOT_DTYPES = (torch.float32, torch.float64)
_DOT_MIN_NUMEL = 1 << 14
"""Tensors at least this large go through ``torch.dot`` in `squared_norms`."""


def squared_norms(tensors: Sequence[Tensor], *, ordered: bool = True) -> Tensor:
    """Per-tensor squared L2 norms as a float64 vector.

    Large contiguous float32/float64 tensors go through ``torch.dot`` (a BLAS call, about
    twice as fast on CPU as torch's norm kernel), the others through one foreach norm,
    which accumulates half-precision tensors in float32. With ``ordered=False`` the vector
    holds the same values in an unspecified order (enough for a sum, and cheaper).
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    by_dot = [i for i, t in enumerate(tensors) if _dottable(t) and t.numel() >= _DOT_MIN_NUMEL]
    if not by_dot:
        return _stack(torch._foreach_norm(list(tensors))).square()
    dot_part = _stack([torch.dot(v, v) for v in (tensors[i].view(-1) for i in by_dot)])
    if len(by_dot) == len(tensors):
        return dot_part
    chosen = set(by_dot)
    rest = [i for i in range(len(tensors)) if i not in chosen]
    foreach_part = _stack(torch._foreach_norm([tensors[i] for i in rest])).square()
    values = torch.cat([dot_part, foreach_part.to(dot_part.device)])
    if not ordered:
        return values
    order = torch.tensor(by_dot + rest, device=values.device)
    return torch.empty_like(values).index_copy_(0, order, values)


def _dottable(t: Tensor) -> bool:
    """Whether ``torch.dot`` can take t's squared norm: contiguous float32 or float64."""
    return t.dtype in _DOT_DTYPES and t.is_contiguous()


def _memory_flat(t: Tensor) -> Tensor | None:
    """A 1-d view of a dense tensor's elements in memory order, or None if it has none."""
    if t.is_contiguous():
        return t.view(-1)
    # channels_last and other dense layouts: the permutation that makes it contiguous.
    permuted = t.permute(sorted(range(t.dim()), key=t.stride, reverse=True))
    return permuted.view(-1) if permuted.is_contiguous() else None


def _real(t: Tensor) -> Tensor:
    t = local(t)  # a DTensor's own shard: sums over it are this rank's part
    return torch.view_as_real(t) if t.is_complex() else t


def _flat_pair(p: Tensor, g: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Flat parameter and gradient with matching coordinates, and whether the parameter's
    is a view of it (else a copy, which must be taken again after the step)."""
    p, g = _real(p), _real(g)
    if p.is_contiguous() and g.is_contiguous():
        return p.view(-1), g.view(-1), True
    if p.stride() == g.stride():
        flat_p, flat_g = _memory_flat(p), _memory_flat(g)
        if flat_p is not None and flat_g is not None:
            return flat_p, flat_g, True
    return p.reshape(-1), g.reshape(-1), False  # logical order: copies


def _block(flat: Tensor, offset: int, length: int) -> Tensor:
    return flat if length == flat.numel() else flat[offset : offset + length]


def _stack(scalars: Sequence[Tensor], *, float64: bool = True) -> Tensor:
    """0-d tensors into one vector on the first one's device: float64, or with
    ``float64=False`` their common dtype (float64 anyway when they lie on several devices)."""
    try:
        # One device (the common case): stack promotes mixed float dtypes exactly, then one cast.
        stacked = torch.stack(list(scalars))
        return stacked.to(torch.float64) if float64 else stacked
    except RuntimeError:  # several devices
        device = scalars[0].device
        return torch.stack([s.to(device=device, dtype=torch.float64) for s in scalars])


def _total(scalars: list[Tensor]) -> Tensor:
    """The sum of per-segment scalars (zero for none)."""
    if not scalars:
        return torch.zeros((), dtype=torch.float64)
    return scalars[0] if len(scalars) == 1 else _stack(scalars).sum()


def _same(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


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
                g = p.grad  # read once: a property of the C tensor
                if g is None:
                    continue
                if g.is_sparse:
                    raise ValueError(
                        "adaptive_lr does not support sparse gradients (e.g. "
                        "nn.Embedding(sparse=True)): use dense gradients or leave those "
                        "parameters to a separate, unwrapped optimizer"
                    )
                params.append(p)
                grads.append(local(g))
                positions.append(position - 1)
            bounds.append((start, len(params)))
        return cls(params, grads, positions, bounds)


@dataclass(frozen=True)
class Segment:
    """The sampled coordinates of the step's parameters on one device, laid end to end."""

    members: list[int]
    """Indices of its parameters in the step's parameter list: those measured whole
    first, by param group, then the sampled ones."""
    starts: list[int]
    """Where each member's block starts in the flat vector, and its total length last."""
    device: torch.device
    dtype: torch.dtype
    """The working dtype: float32 for float32 and narrower parameters, else float64."""
    pieces: list[tuple[int, int, Tensor | None]]
    """(start, end, weight) of the runs of coordinates that share a weight, numel / sampled
    of their tensor, so weighted sums estimate the full ones: a 0-d tensor of the working
    dtype, None for weight 1 (members measured whole); in order, covering the flat vector."""
    weights: Tensor | None
    """The weights per coordinate, where there are more than ``_MAX_WEIGHT_PIECES`` pieces;
    else None, and each piece is multiplied by its weight (the same products, without
    holding and reading a vector as large as the sample)."""
    whole_runs: list[tuple[int, int, int]]
    """(param group, start, end) of each run of members measured whole, one per group:
    there the flat sampled gradient is the whole gradient, so one dot gives their exact
    squared norm."""
    in_order: bool
    """Whether the members are the step's parameters in their own order (no reindexing)."""

    def empty(self) -> Tensor:
        return torch.empty(self.starts[-1], dtype=self.dtype, device=self.device)

    def gather(self, blocks: list[Tensor], *, out: Tensor | None = None) -> Tensor:
        """Its members' blocks (from a per-parameter list) as one flat vector: a copy."""
        mine = blocks if self.in_order else [blocks[i] for i in self.members]
        if out is not None:
            return torch.cat(mine, out=out)
        flat = torch.cat(mine)
        return flat if flat.dtype == self.dtype else flat.to(self.dtype)

    def weigh_(self, flat: Tensor) -> Tensor:
        """Multiply each coordinate of a flat vector of this segment by its weight, in place."""
        return self.weighted(flat, out=flat)

    def weighted(self, flat: Tensor, out: Tensor) -> Tensor:
        """The flat vector times the weights, written into `out` (returned; `out` may be
        `flat` itself); `flat` itself when every weight is 1."""
        if self.weights is not None:
            return torch.mul(flat, self.weights, out=out)
        if len(self.pieces) == 1 and self.pieces[0][2] is None:
            return flat
        for a, b, weight in self.pieces:
            part = _block(out, a, b - a)
            source = part if out is flat else _block(flat, a, b - a)
            if weight is not None:
                torch.mul(source, weight, out=part)
            elif source is not part:
                part.copy_(source)
        return out


@dataclass
class StepSample:
    """This step's sampled coordinates, built once and shared by measuring and stepping."""

    params: list[Tensor]
    param_blocks: list[Tensor]
    """Per parameter, its sampled block of x: a view, except at the indices in `copied`."""
    copied: list[tuple[int, Tensor, int, int]]
    """(index, parameter, offset, end) of each parameter whose layout has no flat view:
    its block is a copy, taken again after the step."""
    grads: list[Tensor]
    """Per segment: the sampled gradient (unclipped: copied before any clipping). Without
    track_last_grad it is the weighted gradient itself, and `finish` reuses its room."""
    weighted_grads: list[Tensor]
    """Per segment: the sampled gradient times the segment's weights (a fresh tensor,
    whose room `finish` may reuse)."""
    norm_dots: list[tuple[int, Tensor]]
    """(index, flat gradient) of each sampled parameter whose gradient's squared norm is one
    ``torch.dot`` (contiguous float32 or float64), in parameter order."""
    norm_rest: list[int]
    """Indices of the other sampled parameters: their norms come from one foreach call."""


class Trajectory:
    """The last descent step on the sampled coordinates, and the secant's scalars.

    The samples of all parameters on a device are kept end to end in one flat buffer, so
    each signal is one ``torch.dot`` per device instead of one per tensor.
    """

    def __init__(self, layout: SampleLayout, *, track_last_grad: bool = False) -> None:
        self.layout = layout
        self.track_last_grad = track_last_grad
        self.blocks: dict[Tensor, tuple[int, int, float]] = {}
        """(offset, length, weight = numel / length) per parameter."""
        self.grad_dot_descent: Tensor | None = None
        """Estimate of <g_{t-1}, d>, computed with the unclipped gradient."""
        self.descent_sq: Tensor | None = None
        """Estimate of ||d||^2."""
        self._params: list[Tensor] = []
        """The parameters of the flat layout, in order."""
        self._segments: list[Segment] = []
        self._descent: list[Tensor] | None = None
        """Per segment: d = x_{t-1} - x_t on the sample (unweighted)."""
        self._last_grad: list[Tensor] | None = None
        """Per segment: the unclipped g_{t-1} on the sample (track_last_grad)."""
        self._restored: tuple[dict[Tensor, Tensor], dict[Tensor, Tensor]] | None = None
        """Per-parameter buffers from a checkpoint, laid out flat at the next step."""
        self._plan: list[tuple[int, int, bool]] = []
        """Per parameter of the layout: (offset, end, whole) of its sampled block."""
        self._views: list[tuple[int, Tensor] | None] = []
        """Per parameter of the layout: (data_ptr, sampled view of x) for plain real
        tensors, reused while the parameter keeps its storage (in-place updates,
        load_state_dict)."""
        self._descent_views: list[list[Tensor]] = []
        """Per segment: each member's part of the descent buffer."""
        self._group_bounds: list[tuple[int, int]] = []
        """The param groups' bounds in the step's parameter list, as laid out."""
        self._group_of: list[int] = []
        """Per parameter of the layout: its param group."""

    def __getstate__(self) -> dict:
        # The cached views are not copied (deepcopy, pickle): a copy rebuilds them for its
        # own parameters, and views made under no_grad cannot be deep-copied anyway.
        return {**self.__dict__, "_views": [None] * len(self._views), "_descent_views": []}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._set_descent(self._descent)  # views of the copy's own buffers

    # -- per-parameter views, for checkpoints ------------------------------------------------
    @property
    def descent(self) -> dict[Tensor, Tensor]:
        """Sampled d per parameter: views of the flat buffers."""
        return self._restored[0] if self._restored is not None else self._per_param(self._descent)

    @property
    def last_grad(self) -> dict[Tensor, Tensor]:
        """Sampled unclipped g_{t-1} per parameter (track_last_grad): views of the flat buffers."""
        return self._restored[1] if self._restored is not None else self._per_param(self._last_grad)

    def _per_param(self, flats: list[Tensor] | None) -> dict[Tensor, Tensor]:
        if flats is None:
            return {}
        views = {}
        for segment, flat in zip(self._segments, flats, strict=True):
            for k, i in enumerate(segment.members):
                views[self._params[i]] = flat[segment.starts[k] : segment.starts[k + 1]]
        return views

    def restore(
        self,
        descent: dict[Tensor, Tensor],
        last_grad: dict[Tensor, Tensor],
        grad_dot_descent: Tensor | None,
        descent_sq: Tensor | None,
    ) -> None:
        """Per-parameter buffers and scalars from a checkpoint (laid out at the next step)."""
        self._restored = (descent, last_grad)
        if descent and grad_dot_descent is not None:
            self.grad_dot_descent, self.descent_sq = grad_dot_descent, descent_sq

    def held_tensors(self) -> list[Tensor]:
        """Every tensor the trajectory keeps between steps (for memory accounting)."""
        weights = [s.weights for s in self._segments if s.weights is not None]
        if self._restored is not None:
            return [*weights, *self._restored[0].values(), *self._restored[1].values()]
        return weights + list(self._descent or []) + list(self._last_grad or [])

    @property
    def ready(self) -> bool:
        """Whether the last step's descent and scalars are known."""
        held = self._descent is not None or self._restored is not None
        return self.grad_dot_descent is not None and held

    @property
    def has_last_grad(self) -> bool:
        """Whether the last step's sampled gradient is held (after `prepare`)."""
        return self._last_grad is not None

    def reset(self) -> None:
        self._descent = self._last_grad = self._restored = None
        self.grad_dot_descent = None
        self.descent_sq = None

    def place(self, p: Tensor, position: int) -> None:
        """Fix the sampled block of parameter `p` at `position` in the param groups."""
        if p not in self.blocks:
            numel = _real(p).numel()
            offset, length = self.layout.block(position, numel)
            # An empty local shard (FSDP2, more ranks than rows) contributes nothing.
            self.blocks[p] = (offset, length, numel / length if length else 0.0)

    def _relayout(self, view: GradientView) -> None:
        """Lay this step's parameters out flat, keeping the buffers of those that stay."""
        old_descent, old_last = self.descent, self.last_grad
        had_descent = self._descent is not None or self._restored is not None
        self._restored = None
        # One segment per device and working dtype: float32 for float32 and narrower
        # parameters (their differences and sums keep float32's precision), float64 for
        # float64 ones.
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, (p, position) in enumerate(zip(view.params, view.positions, strict=True)):
            self.place(p, position)
            real = _real(p)
            kind = (real.device, torch.promote_types(torch.float32, real.dtype))
            by_kind.setdefault(kind, []).append(i)
        self._plan = []
        for p in view.params:
            offset, length, _ = self.blocks[p]
            self._plan.append((offset, offset + length, length == _real(p).numel()))
        group_of = [g for g, (a, b) in enumerate(view.group_bounds) for _ in range(a, b)]
        segments = []
        for (device, dtype), kind_members in by_kind.items():
            # Members measured whole first, by group, so each group's are one run.
            members = sorted(kind_members, key=lambda i: (not self._plan[i][2], group_of[i], i))
            lengths = [self.blocks[view.params[i]][1] for i in members]
            weights = [self.blocks[view.params[i]][2] for i in members]
            starts = [0]
            for length in lengths:
                starts.append(starts[-1] + length)
            runs: dict[int, tuple[int, int]] = {}
            for k, i in enumerate(members):
                if self._plan[i][2]:
                    runs[group_of[i]] = (runs.get(group_of[i], (starts[k],))[0], starts[k + 1])
            runs_of_weights: list[tuple[int, int, float]] = []
            for k, weight in enumerate(weights):
                if runs_of_weights and runs_of_weights[-1][2] == weight:
                    runs_of_weights[-1] = (runs_of_weights[-1][0], starts[k + 1], weight)
                else:
                    runs_of_weights.append((starts[k], starts[k + 1], weight))
            pieces = [
                (a, b, None if w == 1.0 else torch.tensor(w, dtype=dtype, device=device))
                for a, b, w in runs_of_weights
            ]
            per_coordinate = None
            if len(pieces) > _MAX_WEIGHT_PIECES:
                per_coordinate = torch.tensor(weights, dtype=dtype).repeat_interleave(
                    torch.tensor(lengths, dtype=torch.long)
                )
                per_coordinate = per_coordinate.to(device)
            in_order = members == list(range(len(view.params)))
            whole_runs = [(group, a, b) for group, (a, b) in runs.items()]
            segments.append(
                Segment(members, starts, device, dtype, pieces, per_coordinate, whole_runs, in_order)
            )
        self._params, self._segments = list(view.params), segments
        self._group_bounds = list(view.group_bounds)
        self._group_of = group_of
        self._views = [None] * len(view.params)

        def gather(old: dict[Tensor, Tensor]) -> list[Tensor] | None:
            """The old per-parameter buffers laid out anew; None if none is kept."""
            flats, kept_any = [], False
            for segment in segments:
                flat = segment.empty().zero_()  # not updated last step: d = 0
                for k, i in enumerate(segment.members):
                    kept = old.get(self._params[i])
                    part = flat[segment.starts[k] : segment.starts[k + 1]]
                    if kept is not None and kept.numel() == part.numel():
                        part.copy_(kept.reshape(-1))
                        kept_any = True
                flats.append(flat)
            return flats if kept_any else None

        self._set_descent(gather(old_descent) if had_descent else None)
        self._last_grad = gather(old_last) if self._descent is not None else None
        if self._descent is None:  # nothing of the last step is left: the secant restarts
            self.grad_dot_descent = self.descent_sq = None

    def _set_descent(self, flats: list[Tensor] | None) -> None:
        self._descent = flats
        self._descent_views = []
        if flats is not None:
            for segment, flat in zip(self._segments, flats, strict=True):
                bounds = zip(segment.starts[:-1], segment.starts[1:], strict=True)
                self._descent_views.append([flat[a:b] for a, b in bounds])

    # -- the step ---------------------------------------------------------------------------
    def prepare(self, view: GradientView) -> StepSample:
        """The sampled blocks of this step's parameters, and its sampled gradient."""
        if (
            not _same(view.params, self._params)
            or view.group_bounds != self._group_bounds
            or self._restored is not None
        ):
            self._relayout(view)
        param_blocks, grad_blocks, copied = [], [], []
        # The sampled parameters' gradients, for their exact norms (the whole ones are in
        # the sampled gradient): one dot each where that can take them.
        norm_dots: list[tuple[int, Tensor]] = []
        norm_rest: list[int] = []
        views = self._views
        for i, (p, g, (offset, end, whole)) in enumerate(
            zip(view.params, view.grads, self._plan, strict=True)
        ):
            cached = views[i]
            if cached is not None and cached[0] == p.data_ptr() and g.is_contiguous():
                param_blocks.append(cached[1])  # the common case: plain, real, contiguous
                flat = g.view(-1)
                if whole:
                    grad_blocks.append(flat)
                    continue
                grad_blocks.append(flat[offset:end])
                if flat.dtype in _DOT_DTYPES:
                    norm_dots.append((i, flat))
                else:
                    norm_rest.append(i)
                continue
            flat_p, flat_g, is_view = _flat_pair(p, g)
            param_blocks.append(flat_p if whole else flat_p[offset:end])
            grad_blocks.append(flat_g if whole else flat_g[offset:end])
            if not whole:
                if _dottable(g):
                    norm_dots.append((i, g.view(-1)))
                else:
                    norm_rest.append(i)
            if not is_view:
                copied.append((i, p, offset, end))
            elif not (is_dtensor(p) or p.is_complex()) and g.is_contiguous():
                views[i] = (p.data_ptr(), param_blocks[-1])
        grads, weighted = [], []
        for segment in self._segments:
            flat = segment.gather(grad_blocks)  # a copy: unclipped, whatever clipping follows
            grads.append(flat)
            # Without track_last_grad the unweighted gradient is not read again.
            weighted.append(segment.weigh_(flat.clone() if self.track_last_grad else flat))
        return StepSample(view.params, param_blocks, copied, grads, weighted, norm_dots, norm_rest)

    def snapshot(self, sample: StepSample) -> None:
        """Keep x_t's sample in the descent buffers before the inner step."""
        if self._descent is None:
            self._set_descent([s.empty() for s in self._segments])
        assert self._descent is not None
        for segment, buffer in zip(self._segments, self._descent, strict=True):
            segment.gather(sample.param_blocks, out=buffer)

    def finish(self, sample: StepSample) -> None:
        """After the inner step: d = x_t - x_{t+1} on the sample, and its scalars (on device)."""
        if not sample.params:
            self.reset()
            return
        blocks = sample.param_blocks
        if sample.copied:  # parameters without a flat view: take their blocks again
            blocks = list(blocks)
            for i, p, offset, end in sample.copied:
                blocks[i] = _real(p).reshape(-1)[offset:end]
        assert self._descent is not None
        squares, grad_dots = [], []
        for segment, buffer, parts, weighted in zip(
            self._segments, self._descent, self._descent_views, sample.weighted_grads, strict=True
        ):
            mine = blocks if segment.in_order else [blocks[i] for i in segment.members]
            torch._foreach_sub_(parts, mine)  # the buffer now holds d
            grad_dots.append(torch.dot(weighted, buffer))
            # The weighted gradient is not needed any more: its room takes w d.
            scaled = segment.weighted(buffer, out=weighted)
            squares.append(torch.dot(buffer, scaled))
        self.descent_sq, self.grad_dot_descent = _total(squares), _total(grad_dots)
        if self.track_last_grad:
            self._last_grad = sample.grads

    def grad_norm_terms(self, view: GradientView, sample: StepSample) -> tuple[list[Tensor], list[int], int]:
        """0-d tensors whose sums per param group are the groups' exact squared gradient norms.

        Returns (terms, the group of each, how many are squared norms): the terms after
        those are norms, to be squared on the host. Members measured whole contribute one
        dot per segment and group over the sampled gradient, which holds all of their
        coordinates; each other gradient one ``torch.dot`` (float32 and float64 contiguous
        tensors, a BLAS call) or, for the rest, a norm from one foreach call, which
        accumulates half-precision tensors in float32.
        """
        terms: list[Tensor] = []
        groups: list[int] = []
        for segment, grad in zip(self._segments, sample.grads, strict=True):
            for group, a, b in segment.whole_runs:
                part = grad if b - a == grad.numel() else grad[a:b]
                terms.append(torch.dot(part, part))
                groups.append(group)
        group_of = self._group_of
        for i, flat in sample.norm_dots:
            terms.append(torch.dot(flat, flat))
            groups.append(group_of[i])
        squared = len(terms)
        if sample.norm_rest:
            terms += torch._foreach_norm([view.grads[i] for i in sample.norm_rest])
            groups += [group_of[i] for i in sample.norm_rest]
        return terms, groups, squared

    def successive_grad_products(self, sample: StepSample) -> tuple[Tensor, Tensor, Tensor]:
        """Estimates of <g_t, g_{t-1}>, ||g_t||^2 and ||g_{t-1}||^2 on the shared sample."""
        assert self._last_grad is not None
        both, now_sq, last_sq = [], [], []
        for segment, last, grad, weighted in zip(
            self._segments, self._last_grad, sample.grads, sample.weighted_grads, strict=True
        ):
            both.append(torch.dot(weighted, last))
            now_sq.append(torch.dot(weighted, grad))
            last_sq.append(torch.dot(segment.weigh_(last.clone()), last))
        return _total(both), _total(now_sq), _total(last_sq)

    def param_grad_dot(self, sample: StepSample) -> Tensor:
        """Estimate of <x_t, g_t> (before the step), for the fluctuation-dissipation test."""
        return _total(
            [
                torch.dot(segment.gather(sample.param_blocks), weighted)
                for segment, weighted in zip(self._segments, sample.weighted_grads, strict=True)
            ]
        )

    def grad_dot(self, sample: StepSample) -> Tensor:
        """Estimate of <g_t, d> (d is zero on parameters not updated last step)."""
        if self._descent is None:
            return torch.zeros((), dtype=torch.float64)
        return _total([torch.dot(w, d) for w, d in zip(sample.weighted_grads, self._descent, strict=True)])


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
    terms, term_groups, squared = trajectory.grad_norm_terms(view, sample)
    parts: list[Tensor] = list(terms)
    secant = trajectory.ready
    successive = trajectory.ready and trajectory.has_last_grad
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
        parts.append(loss_part.to(device=parts[0].device) if parts else loss_part)
    if reduction is not None:
        stacked = _stack(parts) if parts else torch.zeros(0, dtype=torch.float64)
        values = reduction(stacked, averaged=[len(parts) - 1] if loss_in_vector else []).tolist()
    elif parts:
        values = _stack(parts, float64=False).tolist()  # float32 stays float32: exact on the host
    else:
        values = []

    # A sum of squares past the gradient dtype's range (float32: a norm above 1.8e19) reads
    # as inf, and the step is skipped as for a non-finite gradient: Adam's or Adagrad's
    # squares of that gradient would overflow their state.
    group_sq = [0.0] * len(view.group_bounds)
    for k, (value, group) in enumerate(zip(values, term_groups, strict=False)):
        group_sq[group] += value if k < squared else value * value
    total_sq = sum(group_sq)
    groups = [v**0.5 for v in group_sq]
    rest = values[len(terms) :]
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
