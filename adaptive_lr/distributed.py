"""Making every rank decide alike: the one all-reduce per step, and local shards.

Under DDP every rank holds the same parameters and, after backward, the same averaged
gradients, so every sum the signals take over them is already identical on every rank.
The loss is not: each rank computes it on its own batch. Under FSDP2
(``torch.distributed.fsdp.fully_shard``) parameters and gradients are DTensors sharded on
dim 0, and a sum over a rank's local shard is only that shard's part.

So the signals are computed on local tensors (``to_local()``), stacked into the one
vector a step reads back anyway (cast to float64 on several ranks), and that vector is
all-reduced once (SUM) before the read: partial sums over shards add up to the full
model's sums; values that are already identical (DDP, or any replicated tensor) are
divided by the world size first, so the sum returns them unchanged up to rounding and
identical on every rank; the loss is averaged. Every rank then feeds the same numbers to
the same pure controller and makes the same decision (skip, clip, lr multiplier,
momentum). A non-finite loss or gradient on one rank makes the reduced value non-finite
on every rank, so all of them skip the step.

The all-reduce runs only when ``torch.distributed`` is initialized with more than one
rank and the option ``sync_ranks`` is on (the default), over the default process group.
It is a collective: every rank must call ``step()`` the same number of times, with the
loss handed over the same way (all with a closure or ``loss=``, or all without).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

try:  # DTensor is public from torch 2.5; older versions have no FSDP2 to support.
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank-local tensor of a DTensor (a view of its storage); any other tensor as is."""
    if type(t) is Tensor:  # the common case, decided without the isinstance check (hot path)
        return t
    return t.to_local() if is_dtensor(t) else t


def is_sharded(t: Tensor) -> bool:
    return is_dtensor(t) and any(isinstance(p, Shard) for p in t.placements)


def world_size() -> int:
    """Ranks of the default process group; 1 when torch.distributed is not initialized."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


@dataclass(frozen=True)
class RankReduction:
    """How this step's scalars are combined across ranks."""

    world_size: int
    sharded: bool
    """Sums over parameters and gradients are partial (FSDP2 shards) and are added up."""

    @classmethod
    def for_tensors(cls, tensors: Sequence[Tensor], *, enabled: bool) -> RankReduction | None:
        """The reduction for a step over ``tensors``, or None on a single process.

        Raises ValueError when some tensors are sharded DTensors and others are not: a sum
        over them would mix partial and full values.
        """
        size = world_size() if enabled else 1
        if size == 1:
            return None
        sharded = [is_sharded(t) for t in tensors]
        if any(sharded) and not all(sharded):
            raise ValueError(
                "adaptive_lr needs all parameters with a gradient sharded alike: some are sharded "
                "DTensors (FSDP2) and some are not; shard the whole model (fully_shard on the root "
                "module) or wrap the unsharded parameters in a separate optimizer"
            )
        return cls(world_size=size, sharded=any(sharded))

    def __call__(self, values: Tensor, *, averaged: Sequence[int] = ()) -> Tensor:
        """All-reduce a float64 vector of sums; entries in ``averaged`` are averaged instead."""
        scale = torch.full_like(values, 1.0 if self.sharded else 1.0 / self.world_size)
        if averaged:
            scale[list(averaged)] = 1.0 / self.world_size
        reduced = values * scale
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
        return reduced
