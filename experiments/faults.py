"""Fault injection: does a run survive NaN/Inf gradients, poisoned batches, loss spikes, ...?

    python -m experiments.faults [--steps 320] [--seed 0] [--output results/faults.json]

Every scenario trains the seed network (10 Linear layers 8 -> 20 -> 3, He init; see
`adaptive_lr.seed`) for --steps minibatch steps of 64 with SGD(lr=LR, momentum=0.9) and
torch's CosineAnnealingLR over the run (stepped on the optimizer the method holds), once
per method:

- ``sgd``: the bare optimizer;
- ``sgd_clip``: the bare optimizer with ``clip_grad_norm_(max_norm=1.0)`` before each step;
- ``adaptive``: ``adaptive_lr.wrap`` of the same optimizer, default options.

Faults (`FAULTS`), applied between backward and the optimizer step, or to the batch:

- ``clean``: none (the reference);
- ``nan_grad`` / ``inf_grad``: at each step with probability 0.05, one gradient entry is
  set to NaN / +Inf;
- ``poisoned_batch``: at step --steps/3 the inputs are multiplied by 1e6;
- ``loss_spike``: at step --steps/3 the loss is multiplied by 1e4 before backward;
- ``zero_grads``: for 20 steps from --steps/3 every gradient is zero;
- ``frozen_params``: the first layer is frozen (requires_grad=False) from --steps/3 on;
- ``intermittent_grad``: an extra head on the input gets a gradient every third step only;
- ``sparse_grad``: an nn.Embedding(sparse=True) among the parameters (a clear error is
  the documented outcome for the wrapper).

Reported per (fault, method): whether the run completed, whether any parameter or
optimizer-state tensor was ever non-finite after a step, the final full-data loss, and
its ratio to the same method's clean run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import adaptive_lr
from adaptive_lr.seed import seed_data, seed_network

LR = 0.05
MOMENTUM = 0.9
BATCH_SIZE = 64
CLIP_NORM = 1.0
FAULT_PROBABILITY = 0.05
POISON_SCALE = 1e6
SPIKE_SCALE = 1e4
ZERO_STEPS = 20
METHODS = ("sgd", "sgd_clip", "adaptive")
FAULTS = (
    "clean",
    "nan_grad",
    "inf_grad",
    "poisoned_batch",
    "loss_spike",
    "zero_grads",
    "frozen_params",
    "intermittent_grad",
    "sparse_grad",
)
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "results" / "faults.json"


class _Model(nn.Module):
    """The seed network, plus an intermittently used head and an optional sparse embedding."""

    def __init__(self, seed: int, sparse: bool) -> None:
        super().__init__()
        self.body = seed_network(init="he", generator_seed=seed)
        torch.manual_seed(seed + 1)
        self.side = nn.Linear(8, 3)
        self.embedding = nn.Embedding(4, 3, sparse=True) if sparse else None

    def forward(self, x: Tensor, use_side: bool) -> Tensor:
        out = self.body(x)
        if use_side:
            out = out + 0.1 * self.side(x)
        if self.embedding is not None:
            out = out + self.embedding(torch.zeros(len(x), dtype=torch.long))
        return out


@dataclass(frozen=True)
class Outcome:
    fault: str
    method: str
    completed: bool
    error: str | None
    nonfinite_at_step: int | None
    """First step after which a parameter or optimizer-state tensor was non-finite."""
    final_loss: float | None
    steps: int


def _index_stream(n: int, steps: int, seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batches: list[Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(n, generator=generator)
        batches += [order[i : i + BATCH_SIZE] for i in range(0, n - BATCH_SIZE + 1, BATCH_SIZE)]
    return batches[:steps]


def _finite(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    tensors = [p for p in model.parameters()]
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
    dense = [t for t in tensors if not t.is_sparse]
    return all(bool(torch.isfinite(t).all()) for t in dense)


def run(fault: str, method: str, *, steps: int = 320, seed: int = 0) -> Outcome:
    """Train under one fault with one method; never raises for a fault (the error is reported)."""
    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    inputs, labels = seed_data(seed=seed)
    model = _Model(seed, sparse=fault == "sparse_grad")
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    optimizer: torch.optim.Optimizer = adaptive_lr.wrap(base) if method == "adaptive" else base
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    rng = torch.Generator().manual_seed(seed + 7)
    at = steps // 3
    nonfinite_at: int | None = None
    done = 0
    try:
        for step, batch in enumerate(_index_stream(len(inputs), steps, seed)):
            x = inputs[batch] * (POISON_SCALE if fault == "poisoned_batch" and step == at else 1.0)
            if fault == "frozen_params" and step == at:
                model.body[0].weight.requires_grad_(False)
                model.body[0].bias.requires_grad_(False)
                model.body[0].weight.grad = model.body[0].bias.grad = None
            optimizer.zero_grad()
            use_side = fault != "intermittent_grad" or step % 3 == 0
            loss = F.cross_entropy(model(x, use_side), labels[batch])
            scaled = loss * (SPIKE_SCALE if fault == "loss_spike" and step == at else 1.0)
            scaled.backward()
            _inject(fault, model, step, at, rng)
            if method == "sgd_clip":
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], CLIP_NORM)
            if method == "adaptive":
                optimizer.step(loss=scaled.detach())
            else:
                optimizer.step()
            scheduler.step()
            done += 1
            if nonfinite_at is None and not _finite(model, optimizer):
                nonfinite_at = step
    except Exception as error:  # the outcome of sparse_grad for the wrapper, reported
        message = str(error).splitlines()[0] if str(error) else ""
        return Outcome(fault, method, False, f"{type(error).__name__}: {message}", nonfinite_at, None, done)
    with torch.no_grad():
        final = F.cross_entropy(model(inputs, True), labels).item()
    return Outcome(fault, method, True, None, nonfinite_at, final if math.isfinite(final) else math.inf, done)


def _inject(fault: str, model: nn.Module, step: int, at: int, rng: torch.Generator) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None and not p.grad.is_sparse]
    if fault in ("nan_grad", "inf_grad") and torch.rand((), generator=rng).item() < FAULT_PROBABILITY:
        target = grads[int(torch.randint(len(grads), (), generator=rng))]
        target.view(-1)[int(torch.randint(target.numel(), (), generator=rng))] = (
            math.nan if fault == "nan_grad" else math.inf
        )
    if fault == "zero_grads" and at <= step < at + ZERO_STEPS:
        for g in grads:
            g.zero_()


def run_all(steps: int, seed: int, progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    outcomes = []
    for fault in FAULTS:
        for method in METHODS:
            outcomes.append(run(fault, method, steps=steps, seed=seed))
            if progress is not None:
                progress(outcomes[-1])
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    clean = {o.method: o.final_loss for o in outcomes if o.fault == "clean"}
    lines = [
        "| fault | method | completed | non-finite params/state | final loss | / clean run |",
        "|---|---|---|---|---:|---:|",
    ]
    for o in outcomes:
        error = o.error if o.error is None or len(o.error) <= 90 else o.error[:87] + "..."
        completed = "yes" if o.completed else f"no: {error}"
        nonfinite = "never" if o.nonfinite_at_step is None else f"from step {o.nonfinite_at_step}"
        loss = "—" if o.final_loss is None else f"{o.final_loss:.4g}"
        reference = clean.get(o.method)
        ratio = "—"
        if o.final_loss is not None and reference:
            ratio = f"{o.final_loss / reference:.2f}" if math.isfinite(o.final_loss) else "inf"
        lines.append(f"| {o.fault} | {o.method} | {completed} | {nonfinite} | {loss} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3")
    torch.set_num_threads(1)
    started = time.perf_counter()
    outcomes = run_all(args.steps, args.seed, lambda o: print(f"  {o.fault} {o.method}", file=sys.stderr))
    markdown = table(outcomes)
    print(markdown)
    command = "python -m experiments.faults " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\nCommand: `{command.strip()}`; torch {torch.__version__}; {platform.platform()}.")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "command": command.strip(),
                "machine": {"platform": platform.platform(), "torch": torch.__version__},
                "wall_time_s": round(time.perf_counter() - started, 1),
                "outcomes": [asdict(o) for o in outcomes],
                "markdown": markdown,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
