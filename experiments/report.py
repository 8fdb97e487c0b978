"""The report: a results folder turned into ``report.md``, ``summary.json`` and PNG figures.

``python -m experiments report --results DIR [--out DIR]`` (default out: ``DIR/report``).
Every number in the tables is read from the records through `experiments.summary`; the
figures are drawn from the same records. Figures, one file per task and kind:

- ``loss_curves_<task>.png``: training loss per epoch of every method at its tuned best lr
  (median over seeds);
- ``traces_<task>.png``: the applied lr and momentum of the adaptive methods (not the
  ablations) per step, one line per initial lr (first seed), controller events marked;
- ``robustness_<task>.png``: median final loss versus initial lr per method, diverged grid
  points drawn as crosses above the axes' finite range, and the width threshold;
- ``divergence_<task>.png``: share of seeds diverged, method x initial lr.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from experiments.runner import RUNS_FILE, read_records
from experiments.summary import (
    DEFAULT_WITHIN_RATIO,
    PEER_PREFIXES,
    MethodSummary,
    Summary,
    deduplicate,
    final_loss,
    summarize,
)
from experiments.tasks import TASKS

TARGET_METHODS = ("adaptive_sgd", "adaptive_adam", "adaptive_sgd_cosine", "adaptive_adam_cosine")
"""The methods the issue sets targets for (item 7): adaptive_lr with defaults over SGD
momentum and over Adam, alone and under the user's cosine schedule."""
TARGET_WIDTH = (8, 11)
"""Robustness width target: 8 of an 11-point grid; on another grid, the same share, rounded up."""
EVENT_MARKERS = {
    "skip": ("X", "tab:red"),
    "spike": ("v", "tab:orange"),
    "clip": ("^", "tab:purple"),
    "curvature_cap": ("s", "tab:brown"),
    "update_cap": ("o", "tab:gray"),
    "anneal": ("D", "tab:green"),
}
"""Controller event -> (marker, colour) in the trace figures; other events get a dot."""
DIVERGED_ROW_FACTOR = 1.25
"""Robustness figure: vertical spacing (a factor, log axis) of stacked divergence crosses."""


@dataclass
class ReportFiles:
    report: Path
    summary: Path
    figures: list[Path] = field(default_factory=list)


def build_report(results: Path, out: Path | None = None) -> ReportFiles:
    """Read ``<results>/runs.jsonl`` and write the report, summary.json and figures to ``out``."""
    out = results / "report" if out is None else out
    records = read_records(results)
    if not records:
        raise FileNotFoundError(f"no records in {results / RUNS_FILE}")
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    ok = [record for record in deduplicate(records) if record.get("status") == "ok"]
    files = ReportFiles(report=out / "report.md", summary=out / "summary.json")
    files.summary.write_text(json.dumps(summary.to_json(), indent=1) + "\n")
    figures: dict[str, list[Path]] = {}
    for task in summary.tasks():
        task_records = [record for record in ok if record["config"]["task"] == task]
        figures[task] = _task_figures(task, summary, task_records, out)
        files.figures += figures[task]
    files.report.write_text(_markdown(summary, results, len(records), len(ok), figures, out))
    return files


# --- formatting -------------------------------------------------------------------------


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "diverged" if value > 0 else "-inf"
    return f"{value:.3g}"


def _lr(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _width_required(grid_size: int) -> int:
    wanted, of = TARGET_WIDTH
    return math.ceil(wanted * grid_size / of)


def _heldout_direction(task: str) -> str:
    if task not in TASKS:
        return ""
    return " (higher is better)" if TASKS[task].heldout_higher_is_better else " (lower is better)"


def _width_rule(summary: Summary, task: str) -> str:
    if task in summary.log_scale_tasks:
        return f"log-scale: median final loss within {summary.width_log_decades:g} decade(s) of the best"
    return f"median final loss within {summary.width_ratio:g}x of the best"


# --- markdown ---------------------------------------------------------------------------


def _markdown(
    summary: Summary,
    results: Path,
    n_records: int,
    n_ok: int,
    figures: Mapping[str, list[Path]],
    out: Path,
) -> str:
    lines = [
        "# Experiment report",
        "",
        f"Generated by `python -m experiments report --results {results}` from {results / RUNS_FILE}: "
        f"{n_records} record(s), {n_ok} run(s) counted, {len(summary.skipped)} skipped.",
        "",
        "Definitions (formulas in `experiments/summary.py`): a run diverged if a training loss was "
        "non-finite or above 1e6 (its final loss counts as infinite); *divergence* is the share of "
        "(lr, seed) runs that diverged; *median loss* is the median over seeds of the final training "
        "loss at one grid lr; *width* counts the grid lrs whose median loss passes the task's "
        "robustness test against the best median of all methods on that task; *tuned best* is the "
        "best median loss over the grid; *default* is the median loss at the base optimizer's "
        "default lr (nearest grid lr); *events* is the mean number of controller events per run.",
        "",
    ]
    lines += targets_section(summary)
    lines += overall_section(summary)
    for task in summary.tasks():
        lines += task_section(summary, task, [path.relative_to(out) for path in figures.get(task, [])])
    if summary.skipped:
        lines += ["## Skipped runs (not counted)", ""]
        lines += _table(
            ["task", "method", "lr", "seed", "status", "reason"],
            [
                [run.task, run.method, _lr(run.lr), str(run.seed), run.status, run.reason.replace("|", "/")]
                for run in summary.skipped
            ],
        )
        lines.append("")
    return "\n".join(lines)


def targets_section(summary: Summary) -> list[str]:
    present = [item for item in summary.methods.values() if item.method in TARGET_METHODS]
    lines = [
        "## Targets of the controller",
        "",
        "Issue 3, item 7, over an 11-point lr grid and 3 seeds on every task: divergence 0%; "
        f"robustness width at least {TARGET_WIDTH[0]} of {TARGET_WIDTH[1]} (on another grid, the same "
        f"share rounded up); at the base optimizer's default lr, final loss within "
        f"{DEFAULT_WITHIN_RATIO:g}x of the best tuned fixed-schedule baseline.",
        "",
    ]
    if not present:
        return [*lines, "None of " + ", ".join(TARGET_METHODS) + " is in these results.", ""]
    rows = []
    for item in sorted(present, key=lambda item: (item.method, item.task)):
        required = _width_required(item.grid_size)
        divergence_met = item.diverged_runs == 0
        width_met = item.robustness_width >= required
        if item.default_within_tuned is None or item.best_baseline_loss is None:
            default_cell = "no baseline in these results"
        else:
            ratio = item.default_loss / item.best_baseline_loss if item.best_baseline_loss > 0 else math.inf
            default_cell = (
                f"{'met' if item.default_within_tuned else 'not met'}: {_default_cell(item)} "
                f"vs {_number(item.best_baseline_loss)} ({item.best_baseline}), ratio {_number(ratio)}"
            )
        rows.append(
            [
                item.method,
                item.task,
                f"{'met' if divergence_met else 'not met'}: {item.diverged_runs}/{item.runs} "
                f"({_percent(item.divergence_rate)})",
                f"{'met' if width_met else 'not met'}: {item.robustness_width}/{item.grid_size} "
                f"(needs {required})",
                default_cell,
            ]
        )
    grids = {item.grid_size for item in present}
    note = []
    if grids != {TARGET_WIDTH[1]}:
        note = [
            "",
            f"These results have a grid of {', '.join(str(size) for size in sorted(grids))} lr(s), not "
            f"{TARGET_WIDTH[1]}: the verdicts are indicative only; run `--preset full` for the targets.",
        ]
    return [
        *lines,
        *_table(
            ["method", "task", "divergence 0%", "width", f"default within {DEFAULT_WITHIN_RATIO:g}x"], rows
        ),
        *note,
        "",
    ]


def overall_section(summary: Summary) -> list[str]:
    tasks = summary.tasks()
    methods = sorted({method for _, method in summary.methods})
    rows = []
    for method in methods:
        items = [summary.methods.get((task, method)) for task in tasks]
        present = [item for item in items if item is not None]
        runs = sum(item.runs for item in present)
        diverged = sum(item.diverged_runs for item in present)
        rows.append(
            [
                method,
                f"{diverged}/{runs} ({_percent(diverged / runs)})",
                *(f"{item.robustness_width}/{item.grid_size}" if item else "–" for item in items),
            ]
        )
    return [
        "## Overall: divergence and robustness width per method",
        "",
        *_table(["method", "divergence (all tasks)", *(f"width {task}" for task in tasks)], rows),
        "",
    ]


def _default_cell(item: MethodSummary) -> str:
    cell = f"{_number(item.default_loss)} @ {_lr(item.default_grid_lr)}"
    if item.default_grid_lr != item.default_lr:
        cell += f" (nearest grid lr to {_lr(item.default_lr)})"
    return cell


def task_section(summary: Summary, task: str, figures: Sequence[Path]) -> list[str]:
    items = summary.methods_of(task)
    grid = summary.grids[task]
    seeds = max(item.seeds for item in items)
    heldout_name = next((item.heldout_metric for item in items if item.heldout_metric), "held-out")
    rows = [
        [
            item.method,
            f"{item.diverged_runs}/{item.runs} ({_percent(item.divergence_rate)})",
            f"{item.robustness_width}/{item.grid_size}",
            f"{_number(item.tuned_best_loss)} @ {_lr(item.tuned_best_lr)}",
            _default_cell(item),
            _number(item.heldout_at_tuned_best),
            _number(item.median_steps_to_target).replace("diverged", "not reached"),
            _number(item.mean_events),
            _number(item.median_wall_time_s),
        ]
        for item in items
    ]
    lines = [
        f"## Task `{task}`",
        "",
        f"Grid: {len(grid)} initial lr(s) ({', '.join(_lr(lr) for lr in grid)}), {seeds} seed(s)."
        f" Width test: {_width_rule(summary, task)}.",
        "",
        *_table(
            [
                "method",
                "divergence",
                "width",
                "tuned best loss @ lr",
                "loss @ default lr",
                f"{heldout_name}{_heldout_direction(task)} @ tuned lr",
                "steps to target @ tuned lr",
                "events / run",
                "wall time / run (s)",
            ],
            rows,
        ),
        "",
    ]
    lines += [f"![{path.stem}]({path.as_posix()})" for path in figures]
    return [*lines, ""]


# --- figures ----------------------------------------------------------------------------


def _style(method: str, methods: Sequence[str], adaptive: bool) -> dict[str, Any]:
    palette = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    index = sorted(methods).index(method)
    color = palette(index % palette.N)
    if adaptive:
        return {"color": color, "linestyle": "-", "linewidth": 2.0}
    if method.startswith(PEER_PREFIXES):
        return {"color": color, "linestyle": ":", "linewidth": 1.8}
    return {"color": color, "linestyle": "--", "linewidth": 1.5}


def _legend_outside(axes: Any, n_entries: int) -> None:
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, ncol=1 if n_entries <= 18 else 2)


def _spans_decades(values: Sequence[float]) -> bool:
    positive = [value for value in values if value > 0 and math.isfinite(value)]
    return bool(positive) and max(positive) / min(positive) > 20


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _task_figures(task: str, summary: Summary, records: list[Mapping[str, Any]], out: Path) -> list[Path]:
    paths = [
        _loss_curves(task, summary, records, out / f"loss_curves_{task}.png"),
        _robustness(task, summary, out / f"robustness_{task}.png"),
        _divergence(task, summary, records, out / f"divergence_{task}.png"),
    ]
    traces = _traces(task, summary, records, out / f"traces_{task}.png")
    return paths + ([traces] if traces is not None else [])


def _median_curve(curves: list[list[float | None]]) -> list[float]:
    length = max(len(curve) for curve in curves)
    median = []
    for epoch in range(length):
        values = [curve[epoch] for curve in curves if epoch < len(curve) and curve[epoch] is not None]
        if not values:
            break
        median.append(statistics.median(values))
    return median


def _loss_curves(task: str, summary: Summary, records: list[Mapping[str, Any]], path: Path) -> Path:
    items = summary.methods_of(task)
    methods = [item.method for item in items]
    figure, axes = plt.subplots(figsize=(8, 4.8))
    plotted: list[float] = []
    for item in items:
        if item.tuned_best_lr is None:
            continue
        curves = [
            record["loss_curve"]
            for record in records
            if record["config"]["method"] == item.method
            and float(record["config"]["lr"]) == item.tuned_best_lr
        ]
        curve = _median_curve(curves)
        plotted += curve
        axes.plot(
            range(len(curve)),
            curve,
            label=f"{item.method} (lr {_lr(item.tuned_best_lr)})",
            **_style(item.method, methods, item.adaptive),
        )
    if _spans_decades(plotted):
        axes.set_yscale("log")
    axes.set_xlabel("epoch")
    axes.set_ylabel("training loss (full training set)")
    axes.set_title(f"{task}: training loss at each method's tuned best lr (median over seeds)")
    axes.grid(True, which="major", alpha=0.3)
    _legend_outside(axes, len(items))
    return _save(figure, path)


def _robustness(task: str, summary: Summary, path: Path) -> Path:
    items = summary.methods_of(task)
    methods = [item.method for item in items]
    finite = [
        loss for item in items for loss in item.median_final_loss.values() if math.isfinite(loss) and loss > 0
    ]
    top = max(finite) * 3 if finite else 1.0
    bottom = min(finite) / 2 if finite else 0.1
    figure, axes = plt.subplots(figsize=(8, 4.8))
    diverged_rows: dict[float, int] = {}
    for item in items:
        lrs = sorted(item.median_final_loss)
        losses = [item.median_final_loss[lr] for lr in lrs]
        style = _style(item.method, methods, item.adaptive)
        axes.plot(
            lrs,
            [loss if math.isfinite(loss) else math.nan for loss in losses],
            marker="o",
            markersize=4,
            label=f"{item.method} (width {item.robustness_width}/{item.grid_size})",
            **style,
        )
        for lr, loss in zip(lrs, losses, strict=True):
            if not math.isfinite(loss):
                # Stacked above the finite range, one row per method diverging at this lr,
                # so that crosses of several methods at one lr do not hide each other.
                height = top * DIVERGED_ROW_FACTOR ** diverged_rows.get(lr, 0)
                diverged_rows[lr] = diverged_rows.get(lr, 0) + 1
                axes.scatter([lr], [height], marker="x", s=60, color=style["color"], zorder=3)
    best = min(finite) if finite else None
    if best is not None:
        if task in summary.log_scale_tasks:
            threshold, rule = (
                best * 10**summary.width_log_decades,
                f"{summary.width_log_decades:g} decade above best",
            )
        else:
            threshold, rule = best * summary.width_ratio, f"{summary.width_ratio:g}x best"
        axes.axhline(
            threshold, color="black", linewidth=0.8, linestyle="-.", label=f"width threshold ({rule})"
        )
    if diverged_rows:
        axes.axhline(top, color="tab:red", linewidth=0.5, alpha=0.5)
        axes.annotate(
            "diverged (x)",
            xy=(0.01, top),
            xycoords=("axes fraction", "data"),
            va="bottom",
            fontsize=8,
            color="tab:red",
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_ylim(bottom, top * DIVERGED_ROW_FACTOR ** max([1, *diverged_rows.values()]))
    axes.set_xlabel("initial learning rate")
    axes.set_ylabel("final training loss (median over seeds)")
    axes.set_title(f"{task}: final loss versus initial learning rate")
    axes.grid(True, which="major", alpha=0.3)
    _legend_outside(axes, len(items) + 1)
    return _save(figure, path)


def _divergence(task: str, summary: Summary, records: list[Mapping[str, Any]], path: Path) -> Path:
    items = summary.methods_of(task)
    grid = summary.grids[task]
    shares = [[math.nan] * len(grid) for _ in items]
    labels = [[""] * len(grid) for _ in items]
    for row, item in enumerate(items):
        for column, lr in enumerate(grid):
            runs = [
                record
                for record in records
                if record["config"]["method"] == item.method and float(record["config"]["lr"]) == lr
            ]
            if runs:
                diverged = sum(not math.isfinite(final_loss(run)) for run in runs)
                shares[row][column] = diverged / len(runs)
                labels[row][column] = f"{diverged}/{len(runs)}"
    figure, axes = plt.subplots(figsize=(1.6 + 0.75 * len(grid), 1.2 + 0.38 * len(items)))
    image = axes.imshow(shares, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    for row in range(len(items)):
        for column in range(len(grid)):
            share = shares[row][column]
            axes.text(
                column,
                row,
                labels[row][column] or "–",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share > 0.6 else "black",
            )
    axes.set_xticks(range(len(grid)), [_lr(lr) for lr in grid], rotation=45 if len(grid) > 5 else 0)
    axes.set_yticks(range(len(items)), [item.method for item in items])
    axes.set_xlabel("initial learning rate")
    axes.set_title(f"{task}: diverged runs (seeds diverged / seeds)")
    figure.colorbar(image, ax=axes, label="share of seeds diverged", fraction=0.05)
    return _save(figure, path)


def _traces(task: str, summary: Summary, records: list[Mapping[str, Any]], path: Path) -> Path | None:
    adaptive = [item.method for item in summary.methods_of(task) if item.adaptive]
    shown = [method for method in adaptive if "_no_" not in method] or adaptive
    if not shown:
        return None
    grid = summary.grids[task]
    norm = LogNorm(vmin=min(grid), vmax=max(grid) if max(grid) > min(grid) else min(grid) * 10)
    colormap = plt.get_cmap("viridis")
    figure, axes = plt.subplots(
        2, len(shown), figsize=(5.5 * len(shown) + 1.5, 6.5), squeeze=False, sharex="col"
    )
    figure.subplots_adjust(wspace=0.3)  # room for the log-scale tick labels of the right column
    kinds_seen: set[str] = set()
    for column, method in enumerate(shown):
        runs = [record for record in records if record["config"]["method"] == method]
        first_seed = min(record["config"]["seed"] for record in runs)
        lr_axes, momentum_axes = axes[0][column], axes[1][column]
        for record in sorted(runs, key=lambda record: float(record["config"]["lr"])):
            if record["config"]["seed"] != first_seed:
                continue
            color = colormap(norm(float(record["config"]["lr"])))
            lrs = record["trace"]["lr"]
            steps = range(1, len(lrs) + 1)
            lr_axes.plot(steps, lrs, color=color, linewidth=1.2)
            momentum = record["trace"]["momentum"]
            momentum_axes.plot(
                steps,
                [math.nan if value is None else value for value in momentum],
                color=color,
                linewidth=1.2,
            )
            by_kind: dict[str, list[int]] = {}
            for step, kind in record["trace"]["events"]:
                if 1 <= step <= len(lrs):
                    by_kind.setdefault(kind, []).append(step)
            for kind, event_steps in by_kind.items():
                marker, marker_color = EVENT_MARKERS.get(kind, (".", "black"))
                lr_axes.scatter(
                    event_steps,
                    [lrs[step - 1] for step in event_steps],
                    marker=marker,
                    s=28,
                    facecolor=marker_color,
                    edgecolor="black",
                    linewidth=0.4,
                    zorder=3,
                )
                kinds_seen.add(kind)
        lr_axes.set_yscale("log")
        lr_axes.set_title(f"{task}: {method} (seed {first_seed})")
        lr_axes.set_ylabel("applied learning rate")
        momentum_axes.set_ylabel("momentum (Adam: beta1)")
        momentum_axes.set_xlabel("optimizer step")
        for each in (lr_axes, momentum_axes):
            each.grid(True, alpha=0.3)
    handles = [
        plt.Line2D(
            [],
            [],
            linestyle="",
            marker=EVENT_MARKERS.get(kind, (".", "black"))[0],
            markerfacecolor=EVENT_MARKERS.get(kind, (".", "black"))[1],
            markeredgecolor="black",
            markersize=7,
            label=kind,
        )
        for kind in sorted(kinds_seen)
    ]
    figure.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=colormap),
        ax=axes,
        label="initial learning rate",
        fraction=0.03,
        pad=0.02,
    )
    if handles:
        figure.legend(
            handles=handles,
            title="controller event (marked on the lr trace)",
            loc="upper center",
            bbox_to_anchor=(0.45, 0.0),
            ncol=len(handles),
            fontsize=9,
        )
    return _save(figure, path)
