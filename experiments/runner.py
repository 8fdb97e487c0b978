"""The runner: a grid of `RunSpec`s executed in worker processes, resumably.

Every finished run appends one JSON line to ``<results>/runs.jsonl``; a rerun skips the
run ids already there. A method whose optional package is missing is reported and gets a
``"status": "skipped"`` record instead of a crash. Records are written only by the parent
process, so a line is never interleaved.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import adaptive_lr
from adaptive_lr.controller import EVENTS
from adaptive_lr.telemetry import StepRecord
from experiments.config import RunSpec
from experiments.methods import METHODS, Setup
from experiments.tasks import TASKS

DEFAULT_RESULTS = Path("results/experiments")
RUNS_FILE = "runs.jsonl"
DIVERGENCE_THRESHOLD = 1e6
"""A run diverged if any minibatch or epoch training loss is non-finite or above this."""


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _as_float(loss: Any) -> float:
    return loss.detach().item() if isinstance(loss, torch.Tensor) else float(loss)


def _diverged(loss: float) -> bool:
    return not math.isfinite(loss) or loss > DIVERGENCE_THRESHOLD


@contextmanager
def evaluation(setup: Setup) -> Iterator[None]:
    """Bracket an evaluation of the model by ``optimizer.eval()`` ... ``optimizer.train()``
    for optimizers that need it (Schedule-Free trains at one point and evaluates at its
    average); a no-op for the others."""
    if not setup.train_eval_modes:
        yield
        return
    setup.optimizer.eval()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        setup.optimizer.train()  # type: ignore[attr-defined]


def train_step(setup: Setup, batch_loss: Callable[[], torch.Tensor]) -> float:
    """One optimizer step on one minibatch; returns the minibatch loss.

    Order: zero_grad, forward, backward, ``setup.gradient_hook`` (e.g. clipping), then the
    optimizer's update. The closure form lets wrappers that evaluate the closure themselves
    (adaptive_lr) see the loss.
    """
    optimizer = setup.optimizer

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = batch_loss()
        loss.backward()
        if setup.gradient_hook is not None:
            setup.gradient_hook()
        return loss

    return _as_float(optimizer.step(closure))


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train one grid point and return its record (``"status": "ok"``)."""
    task, method = TASKS[spec.task], METHODS[spec.method]
    torch.manual_seed(spec.seed)
    started = time.perf_counter()
    problem = task.build(spec.seed)
    params = [p for p in problem.model.parameters() if p.requires_grad]
    total_steps = spec.epochs * problem.steps_per_epoch
    events: Counter[str] = Counter()
    lr_trace: list[float] = []
    momentum_trace: list[float | None] = []
    event_steps: list[list[Any]] = []

    def on_controller_step(record: StepRecord) -> None:
        if record.event is not None:
            events[record.event] += 1
            event_steps.append([len(lr_trace) + 1, record.event])

    setup = method.build(params, spec.lr, total_steps=total_steps, callback=on_controller_step)
    optimizer = setup.optimizer
    with evaluation(setup):
        loss_curve = [problem.training_loss()]
    diverged_at: int | None = None
    steps_to_target: int | None = None
    steps = 0
    for _ in range(spec.epochs):
        for batch in problem.epoch_batches():
            loss = train_step(setup, functools.partial(problem.batch_loss, batch))
            steps += 1
            group = optimizer.param_groups[0]
            history = optimizer.history if isinstance(optimizer, adaptive_lr.AdaptiveOptimizer) else None
            if history:
                lr_trace.append(history[-1].lr)
                momentum_trace.append(history[-1].momentum)
            else:
                lr_trace.append(float(group["lr"]))
                momentum_trace.append(group.get("momentum", group.get("betas", (None,))[0]))
            if setup.scheduler is not None:
                setup.scheduler.step()
            if _diverged(loss):
                diverged_at = steps
                break
            if steps_to_target is None and loss <= task.target_loss:
                steps_to_target = steps
        if diverged_at is not None:
            break
        with evaluation(setup):
            loss_curve.append(problem.training_loss())
        if _diverged(loss_curve[-1]):
            diverged_at = steps
            break
        if setup.epoch_scheduler is not None:
            setup.epoch_scheduler.step(loss_curve[-1])
    final_loss = loss_curve[-1] if diverged_at is None else math.inf
    heldout = math.nan
    if diverged_at is None:
        with evaluation(setup):
            heldout = problem.heldout_metric()
    return {
        "id": spec.run_id,
        "status": "ok",
        "config": {
            **spec.to_dict(),
            "steps_per_epoch": problem.steps_per_epoch,
            "target_loss": task.target_loss,
            "torch": torch.__version__,
            "adaptive_lr": adaptive_lr.__version__,
        },
        "loss_curve": [_finite_or_none(loss) for loss in loss_curve],
        "final_training_loss": _finite_or_none(final_loss),
        "heldout_metric": task.heldout_metric,
        "heldout_value": _finite_or_none(heldout),
        "diverged": diverged_at is not None,
        "diverged_at_step": diverged_at,
        "steps": steps,
        "steps_to_target": steps_to_target,
        "wall_time_s": round(time.perf_counter() - started, 4),
        "events": {name: events.get(name, 0) for name in EVENTS} if method.adaptive else None,
        "trace": {"lr": lr_trace, "momentum": momentum_trace, "events": event_steps},
    }


def read_records(results: Path) -> list[dict[str, Any]]:
    """The records in ``<results>/runs.jsonl``; a torn last line (a killed run) is ignored."""
    path = results / RUNS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


@dataclass
class Summary:
    """What one call of `run_grid` did, by run id."""

    ran: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    """Run id -> why its method cannot run here."""
    failed: dict[str, str] = field(default_factory=dict)
    """Run id -> the error; failed runs write no record, so a rerun retries them."""


def _init_worker() -> None:
    # Parallelism comes from the worker processes; threads within each would oversubscribe.
    torch.set_num_threads(1)


def _safe_run(spec: RunSpec) -> dict[str, Any]:
    try:
        return run_one(spec)
    except Exception:
        return {"id": spec.run_id, "status": "error", "error": traceback.format_exc()}


def run_grid(
    specs: Iterable[RunSpec],
    results: Path = DEFAULT_RESULTS,
    *,
    workers: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Summary:
    """Run every spec not already recorded in ``<results>/runs.jsonl``, appending records."""
    results.mkdir(parents=True, exist_ok=True)
    recorded = {record["id"]: record.get("status") for record in read_records(results)}
    summary = Summary()
    todo: list[RunSpec] = []
    with open(results / RUNS_FILE, "a") as out:

        def write(record: dict[str, Any]) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()

        for spec in sorted(set(specs)):
            reason = METHODS[spec.method].missing_requirement()
            if reason is not None:
                summary.unavailable[spec.run_id] = reason
                if spec.run_id not in recorded:
                    write(
                        {"id": spec.run_id, "status": "skipped", "config": spec.to_dict(), "reason": reason}
                    )
            elif recorded.get(spec.run_id) == "ok":
                summary.already_done.append(spec.run_id)
            else:
                todo.append(spec)
        for method in sorted({run_id.split("/")[1] for run_id in summary.unavailable}):
            log(f"skipped method {method}: {METHODS[method].missing_requirement()}")
        if summary.already_done:
            log(f"skipped {len(summary.already_done)} run(s) already in {results / RUNS_FILE}")
        log(f"running {len(todo)} run(s) with {workers} worker(s)")

        def collect(record: dict[str, Any]) -> None:
            if record["status"] == "ok":
                write(record)
                summary.ran.append(record["id"])
            else:
                summary.failed[record["id"]] = record["error"]
                log(f"run {record['id']} failed:\n{record['error']}")

        bar = tqdm(total=len(todo), disable=not progress, unit="run")
        if workers <= 1:
            for spec in todo:
                collect(_safe_run(spec))
                bar.update()
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
                for future in as_completed([pool.submit(_safe_run, spec) for spec in todo]):
                    collect(future.result())
                    bar.update()
        bar.close()
    return summary
