"""Metrics per (task, method), computed from the run records of ``runs.jsonl``.

Pure functions: records in, a `Summary` out; nothing here trains, reads files or draws.
The grid of a task is the set of initial learning rates found in its records (all methods
together), so a method missing from part of the grid is measured against the whole grid.

Notation, for one task and one method: runs r over grid lrs eta and seeds s; L(r) is the
final training loss of run r, with L(r) = inf for a diverged run.

- divergence rate  = #{r : r diverged} / #{r}           (every (lr, seed) run counts once)
- median loss      m(eta) = median_s L(eta, s)          (inf when more than half of the
  seeds diverged, or, with an even number of seeds, half of them)
- best of the task m* = min over every method and eta of m(eta)
- robustness width = #{eta in grid : m(eta) is finite and m(eta) <= 1.5 m*}
  For the tasks in `log_scale_tasks` (default: the noisy quadratic, whose final loss is a
  noise floor proportional to the step size, so a ratio test of 1.5 rewards only the
  smallest lrs) the test is made on the log scale instead:
  log10 m(eta) - log10 m* <= 1, i.e. the median final loss is within one decade of the best.
- tuned best       = min_eta m(eta), and the smallest eta attaining it
- default lr       = the base optimizer's default lr from `DEFAULT_LR_BY_PREFIX`, moved to
  the grid lr nearest to it on the log scale; the result there is m(default lr)
- default within 1.1x of tuned (adaptive methods only):
  m(default lr) <= 1.1 min over the fixed-schedule baselines b of (tuned best of b)

Records whose status is not "ok" (a peer that is not installed writes "skipped") are
listed in `Summary.skipped` and counted nowhere else. A run id recorded twice counts once,
its last "ok" record winning over a "skipped" one (a method installed after a first run).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

WIDTH_RATIO = 1.5
"""A grid lr is in the robustness width if its median final loss is at most this times the best."""
WIDTH_LOG_DECADES = 1.0
"""On the log scale (tasks in `log_scale_tasks`): at most this many decades above the best."""
LOG_SCALE_TASKS = frozenset({"noisy_quadratic"})
"""Tasks whose robustness width uses the log-scale criterion by default."""
DEFAULT_WITHIN_RATIO = 1.1
"""Target: the adaptive method's loss at its default lr within this factor of the best tuned baseline."""
FALLBACK_DEFAULT_LR = 0.01
"""Default lr of a method with no entry in `DEFAULT_LR_BY_PREFIX`."""

DEFAULT_LR_BY_PREFIX: dict[str, float] = {
    # The longest matching prefix of the method name wins; edit here to add a method.
    "adaptive_sgd": 0.01,  # the base optimizer is SGD; torch.optim.SGD has no default lr
    "adaptive_adam": 1e-3,  # torch.optim.Adam's default
    "sgd": 0.01,  # every SGD schedule and variant (torch.optim.SGD has no default lr)
    "nesterov": 0.01,
    "adam": 1e-3,  # Adam and AdamW: torch's default
    "adagrad": 0.01,  # torch.optim.Adagrad's default
    "prodigy": 1.0,  # the lr is a multiplier of the estimated step size; default 1.0
    "dadapt": 1.0,  # D-Adaptation: the same
    "d_adapt": 1.0,
    "dog": 1.0,  # DoG: the same
    "schedulefree_sgd": 1.0,  # schedulefree.SGDScheduleFree's default
    "schedule_free_sgd": 1.0,
    "schedulefree_adam": 0.0025,  # schedulefree.AdamWScheduleFree's default
    "schedule_free_adam": 0.0025,
    "zclip": 0.01,  # ZClip/AutoClip clip the gradient of an SGD-momentum base
    "autoclip": 0.01,
}
"""The base optimizer's default initial lr, keyed by method name prefix."""

PEER_PREFIXES = ("prodigy", "dadapt", "d_adapt", "dog", "schedulefree", "schedule_free", "zclip", "autoclip")
"""Methods that are published peers: neither adaptive_lr nor a fixed-schedule baseline."""


def default_lr(method: str) -> tuple[float, str]:
    """The default lr of ``method`` and where it comes from (the matching prefix, or "fallback")."""
    matches = [prefix for prefix in DEFAULT_LR_BY_PREFIX if method.startswith(prefix)]
    if not matches:
        return FALLBACK_DEFAULT_LR, "fallback"
    prefix = max(matches, key=len)
    return DEFAULT_LR_BY_PREFIX[prefix], prefix


def nearest_grid_lr(lr: float, grid: Iterable[float]) -> float:
    """The grid lr nearest to ``lr`` on the log scale (the smaller one on a tie)."""
    return min(sorted(grid), key=lambda point: abs(math.log10(point) - math.log10(lr)))


def is_fixed_schedule_baseline(method: str, adaptive: bool) -> bool:
    """A hand-tuned baseline: not adaptive_lr (no controller events) and not a published peer."""
    return not adaptive and not method.startswith(PEER_PREFIXES)


@dataclass(frozen=True)
class MethodSummary:
    """The metrics of one method on one task (see the module docstring for the formulas)."""

    task: str
    method: str
    adaptive: bool
    """The method records controller events (it wraps a base optimizer in adaptive_lr)."""
    runs: int
    seeds: int
    """Number of distinct seeds among the runs."""
    diverged_runs: int
    divergence_rate: float
    median_final_loss: dict[float, float]
    """Grid lr -> median over seeds of the final training loss (inf: diverged)."""
    robustness_width: int
    grid_size: int
    tuned_best_loss: float
    tuned_best_lr: float | None
    default_lr: float
    """The base optimizer's default lr (`DEFAULT_LR_BY_PREFIX`)."""
    default_lr_source: str
    default_grid_lr: float
    """The grid lr nearest to `default_lr`, where the default result is read."""
    default_loss: float
    """Median final training loss at `default_grid_lr` (nan if the method has no run there)."""
    best_baseline_loss: float | None
    """Best tuned loss over the fixed-schedule baselines of the task (None if there are none)."""
    best_baseline: str | None
    default_within_tuned: bool | None
    """Adaptive methods: default_loss <= 1.1 best_baseline_loss; None for the others."""
    mean_events: float | None
    """Mean over runs of the number of controller events (None for non-adaptive methods)."""
    mean_events_by_kind: dict[str, float] | None
    median_steps_to_target: float | None
    """At the tuned best lr, median over seeds (inf: the median seed never reached the target)."""
    target_reached_rate: float
    """Share of all runs whose minibatch loss reached the task's target loss."""
    median_wall_time_s: float
    heldout_metric: str | None
    heldout_at_tuned_best: float | None
    """Median over seeds of the held-out metric at the tuned best lr (diverged seeds left out)."""


@dataclass(frozen=True)
class SkippedRun:
    id: str
    task: str
    method: str
    lr: float | None
    seed: int | None
    status: str
    reason: str


@dataclass
class Summary:
    width_ratio: float
    width_log_decades: float
    log_scale_tasks: list[str]
    grids: dict[str, list[float]]
    """Task -> its grid of initial lrs."""
    methods: dict[tuple[str, str], MethodSummary] = field(default_factory=dict)
    """(task, method) -> metrics."""
    skipped: list[SkippedRun] = field(default_factory=list)

    def tasks(self) -> list[str]:
        return sorted(self.grids)

    def methods_of(self, task: str) -> list[MethodSummary]:
        return [summary for (name, _), summary in sorted(self.methods.items()) if name == task]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; inf and nan become the strings "inf" and "nan"."""
        return _json_ready(
            {
                "criteria": {
                    "width_ratio": self.width_ratio,
                    "width_log_decades": self.width_log_decades,
                    "log_scale_tasks": self.log_scale_tasks,
                    "default_within_ratio": DEFAULT_WITHIN_RATIO,
                },
                "grids": self.grids,
                "methods": [asdict(summary) for summary in self.methods.values()],
                "skipped": [asdict(run) for run in self.skipped],
            }
        )


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    return value


def final_loss(record: Mapping[str, Any]) -> float:
    """The run's final training loss; inf if it diverged or recorded no finite loss."""
    value = record.get("final_training_loss")
    if record.get("diverged") or value is None:
        return math.inf
    return float(value)


def deduplicate(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One record per run id, in first-seen order; the last "ok" record wins over others."""
    chosen: dict[str, Mapping[str, Any]] = {}
    for record in records:
        previous = chosen.get(record["id"])
        if previous is None or record.get("status") == "ok" or previous.get("status") != "ok":
            chosen[record["id"]] = record
    return list(chosen.values())


def _median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else math.nan


def within_width(loss: float, best: float, *, log_scale: bool, ratio: float, decades: float) -> bool:
    """The robustness test of one grid lr: ``loss <= ratio best`` or, on the log scale,
    ``log10 loss - log10 best <= decades``."""
    if not math.isfinite(loss) or not math.isfinite(best):
        return False
    if log_scale:
        return loss <= best * 10.0**decades
    return loss <= ratio * best


def summarize(
    records: Iterable[Mapping[str, Any]],
    *,
    log_scale_tasks: Iterable[str] = LOG_SCALE_TASKS,
    width_ratio: float = WIDTH_RATIO,
    width_log_decades: float = WIDTH_LOG_DECADES,
) -> Summary:
    """Metrics per (task, method) from run records (see the module docstring)."""
    log_scale = frozenset(log_scale_tasks)
    ok: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    skipped: list[SkippedRun] = []
    for record in deduplicate(records):
        config = record.get("config", {})
        if record.get("status") != "ok":
            skipped.append(
                SkippedRun(
                    id=record["id"],
                    task=config.get("task", "?"),
                    method=config.get("method", "?"),
                    lr=config.get("lr"),
                    seed=config.get("seed"),
                    status=str(record.get("status")),
                    reason=str(record.get("reason") or record.get("error") or ""),
                )
            )
            continue
        ok.setdefault((config["task"], config["method"]), []).append(record)

    grids: dict[str, set[float]] = {}
    for (task, _), runs in ok.items():
        grids.setdefault(task, set()).update(float(run["config"]["lr"]) for run in runs)
    medians = {
        key: {
            lr: _median(final_loss(run) for run in runs if float(run["config"]["lr"]) == lr)
            for lr in sorted({float(run["config"]["lr"]) for run in runs})
        }
        for key, runs in ok.items()
    }
    best_of_task: dict[str, float] = {}
    for (task, _), by_lr in medians.items():
        best_of_task[task] = min([best_of_task.get(task, math.inf), *by_lr.values()])

    tuned = {key: _tuned_best(by_lr) for key, by_lr in medians.items()}
    adaptive = {key: any(run.get("events") is not None for run in runs) for key, runs in ok.items()}
    baselines: dict[str, tuple[float, str]] = {}
    for (task, method), (loss, _) in tuned.items():
        is_baseline = is_fixed_schedule_baseline(method, adaptive[(task, method)])
        if is_baseline and (task not in baselines or loss < baselines[task][0]):
            baselines[task] = (loss, method)

    summary = Summary(
        width_ratio=width_ratio,
        width_log_decades=width_log_decades,
        log_scale_tasks=sorted(log_scale),
        grids={task: sorted(lrs) for task, lrs in grids.items()},
        skipped=sorted(skipped, key=lambda run: run.id),
    )
    for (task, method), runs in sorted(ok.items()):
        by_lr = medians[(task, method)]
        best_loss, best_lr = tuned[(task, method)]
        lr, source = default_lr(method)
        grid_lr = nearest_grid_lr(lr, grids[task])
        default_loss = by_lr.get(grid_lr, math.nan)
        is_adaptive = adaptive[(task, method)]
        baseline_loss, baseline = baselines.get(task, (None, None))
        at_best = [run for run in runs if best_lr is not None and float(run["config"]["lr"]) == best_lr]
        event_counts = [run["events"] for run in runs if run.get("events") is not None]
        diverged = sum(1 for run in runs if not math.isfinite(final_loss(run)))
        summary.methods[(task, method)] = MethodSummary(
            task=task,
            method=method,
            adaptive=is_adaptive,
            runs=len(runs),
            seeds=len({run["config"].get("seed") for run in runs}),
            diverged_runs=diverged,
            divergence_rate=diverged / len(runs),
            median_final_loss=by_lr,
            robustness_width=sum(
                within_width(
                    loss,
                    best_of_task[task],
                    log_scale=task in log_scale,
                    ratio=width_ratio,
                    decades=width_log_decades,
                )
                for loss in by_lr.values()
            ),
            grid_size=len(grids[task]),
            tuned_best_loss=best_loss,
            tuned_best_lr=best_lr,
            default_lr=lr,
            default_lr_source=source,
            default_grid_lr=grid_lr,
            default_loss=default_loss,
            best_baseline_loss=baseline_loss,
            best_baseline=baseline,
            default_within_tuned=(
                bool(default_loss <= DEFAULT_WITHIN_RATIO * baseline_loss)
                if is_adaptive and baseline_loss is not None
                else None
            ),
            mean_events=(
                statistics.fmean(sum(counts.values()) for counts in event_counts) if event_counts else None
            ),
            mean_events_by_kind=(
                {
                    kind: statistics.fmean(counts.get(kind, 0) for counts in event_counts)
                    for kind in event_counts[0]
                }
                if event_counts
                else None
            ),
            median_steps_to_target=(
                _median(
                    math.inf if run.get("steps_to_target") is None else float(run["steps_to_target"])
                    for run in at_best
                )
                if at_best
                else None
            ),
            target_reached_rate=sum(run.get("steps_to_target") is not None for run in runs) / len(runs),
            median_wall_time_s=_median(float(run.get("wall_time_s", math.nan)) for run in runs),
            heldout_metric=runs[0].get("heldout_metric"),
            heldout_at_tuned_best=_median_or_none(
                run["heldout_value"] for run in at_best if run.get("heldout_value") is not None
            ),
        )
    return summary


def _tuned_best(by_lr: Mapping[float, float]) -> tuple[float, float | None]:
    """The best median final loss and the smallest lr attaining it; (inf, None) if all diverged."""
    finite = [(loss, lr) for lr, loss in by_lr.items() if math.isfinite(loss)]
    if not finite:
        return math.inf, None
    loss, lr = min(finite)
    return loss, lr


def _median_or_none(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None
