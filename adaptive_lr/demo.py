"""Bare SGD with momentum against the same optimizer wrapped by adaptive_lr, on the seed network.

    python -m adaptive_lr.demo [--epochs 20] [--lrs 0.001 0.01 0.1 1 10] [--seed 0]
                               [--schedule cosine|constant]

For every learning rate both methods train the seed article's network (He init, see
`adaptive_lr.seed`) from the same initial weights on the same batches, under the same
learning-rate schedule: by default torch's CosineAnnealingLR over the whole run, stepped
on the optimizer the user holds (the wrapper, for the wrapped method), so the controller
scales the user's schedule; ``--schedule constant`` keeps the lr fixed. The output is a
markdown table (final loss, accuracy, divergence, the controller's events), then one line
with the machine, the command and the wall time. tqdm, from the ``demo`` extra, draws a
progress bar over the runs when it is installed and stderr is a terminal.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import adaptive_lr
from adaptive_lr.controller import EVENTS
from adaptive_lr.seed import TrainResult, seed_data, seed_network, train

BARE = "SGD(momentum=0.9)"
WRAPPED = "adaptive_lr.wrap(SGD(momentum=0.9))"
METHODS = (BARE, WRAPPED)
MOMENTUM = 0.9
SCHEDULES = ("cosine", "constant")
BATCH_SIZE = 64

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional (the `demo` extra): no progress bar then.
    tqdm = None


@dataclass(frozen=True)
class Run:
    lr: float
    method: str
    result: TrainResult
    events: Counter[str] | None
    """Controller events by type; None for the bare optimizer."""


def run_one(lr: float, method: str, *, epochs: int, seed: int, schedule: str = "cosine") -> Run:
    """Train the He-init seed network with one method at one learning rate."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    inputs, labels = seed_data(seed=seed)
    model = seed_network(init="he", generator_seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    events: Counter[str] | None = None
    if method == WRAPPED:
        events = Counter()
        counts = events  # The history keeps only the last history_size records; count all.
        optimizer = adaptive_lr.wrap(
            optimizer, callback=lambda record: counts.update([record.event] if record.event else [])
        )
    scheduler = None
    if schedule == "cosine":
        total_steps = epochs * math.ceil(len(inputs) / BATCH_SIZE)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    result = train(
        model, optimizer, inputs, labels, epochs=epochs, seed=seed, batch_size=BATCH_SIZE, scheduler=scheduler
    )
    return Run(lr, method, result, events)


def run_grid(
    lrs: Sequence[float],
    *,
    epochs: int,
    seed: int,
    schedule: str = "cosine",
    on_run: Callable[[Run], None] | None = None,
) -> list[Run]:
    runs = []
    for lr in lrs:
        for method in METHODS:
            runs.append(run_one(lr, method, epochs=epochs, seed=seed, schedule=schedule))
            if on_run is not None:
                on_run(runs[-1])
    return runs


def format_table(runs: Sequence[Run]) -> str:
    lines = [
        "| lr | method | final loss | accuracy | diverged | controller events |",
        "|---:|---|---:|---:|---|---|",
    ]
    for run in runs:
        result = run.result
        diverged = f"yes (step {result.steps})" if result.diverged else "no"
        accuracy = "—" if result.diverged else f"{result.accuracy:.1%}"
        lines.append(
            f"| {run.lr:g} | {run.method} | {result.final_loss:.4f} | {accuracy} | {diverged} "
            f"| {format_events(run.events)} |"
        )
    return "\n".join(lines)


def format_events(events: Counter[str] | None) -> str:
    if events is None:
        return "—"
    if not events:
        return "none"
    ordered = [name for name in EVENTS if name in events] + sorted(set(events) - set(EVENTS))
    return ", ".join(f"{name} {events[name]}" for name in ordered)


def machine_line(threads: int, argv: Sequence[str], seconds: float) -> str:
    command = shlex.join(["python", "-m", "adaptive_lr.demo", *argv])
    return (
        f"Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {threads} thread(s). Command: `{command}`. "
        f"Training wall time: {seconds:.1f} s."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m adaptive_lr.demo",
        description="Bare SGD(momentum=0.9) against adaptive_lr.wrap(SGD(momentum=0.9)) on the seed network.",
    )
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run (32 steps each)")
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0, 10.0], help="learning rates"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the weights and the batches")
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="lr schedule of both methods: CosineAnnealingLR over the run, or constant",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; a network 20 units wide gains nothing from more (they slow it when busy)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        bar = None
        if tqdm is not None:
            bar = tqdm(total=len(args.lrs) * len(METHODS), desc="runs", unit="run", disable=None)
        try:
            runs = run_grid(
                args.lrs,
                epochs=args.epochs,
                seed=args.seed,
                schedule=args.schedule,
                on_run=None if bar is None else _advance(bar),
            )
        finally:
            if bar is not None:
                bar.close()
    finally:
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - start
    print(format_table(runs))
    print()
    print(machine_line(args.threads, argv, seconds))


def _advance(bar: Any) -> Callable[[Run], None]:
    def on_run(run: Run) -> None:
        bar.set_postfix_str(f"lr={run.lr:g}")
        bar.update()

    return on_run


if __name__ == "__main__":
    main()
