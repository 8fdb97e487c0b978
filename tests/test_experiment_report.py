"""The report step of the experiments framework: metrics per (task, method) and the report.

tests/fixtures/runs_small.jsonl is a real tiny grid (seed_he, 3 epochs, seeds 0 and 1;
noisy_quadratic, 1 epoch, seed 0; sgd_momentum, adam, adaptive_sgd, adaptive_adam at lr
0.01, 0.1, 1) plus one "skipped" prodigy record; to stay small its numbers are rounded to
4 digits and its per-step traces cut to the first 24 steps.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from experiments.cli import main
from experiments.report import build_report
from experiments.runner import RUNS_FILE
from experiments.summary import default_lr, nearest_grid_lr, summarize

FIXTURE = Path(__file__).parent / "fixtures" / "runs_small.jsonl"
HALF_DECADES = [10.0**exponent for exponent in (-4, -3.5, -3, -2.5, -2, -1.5, -1, -0.5, 0, 0.5, 1)]


def run(task: str, method: str, lr: float, seed: int, loss: float | None, **extra: Any) -> dict[str, Any]:
    """A hand-made "ok" record; ``loss=None`` is a diverged run."""
    return {
        "id": f"{task}/{method}/lr={lr:.6g}/seed={seed}/epochs=1",
        "status": "ok",
        "config": {"task": task, "method": method, "lr": lr, "seed": seed, "epochs": 1},
        "loss_curve": [2.0, loss],
        "final_training_loss": loss,
        "heldout_metric": "accuracy",
        "heldout_value": extra.pop("heldout", None if loss is None else 0.5),
        "diverged": loss is None,
        "steps_to_target": extra.pop("steps_to_target", None),
        "wall_time_s": 1.0,
        "events": extra.pop("events", None),
        "trace": {"lr": [lr], "momentum": [0.9], "events": []},
        **extra,
    }


def grid(task: str, method: str, losses_by_lr: dict[float, list[float | None]]) -> list[dict[str, Any]]:
    """Records for one method: lr -> final loss of seeds 0, 1, 2, ... (None: diverged)."""
    return [
        run(task, method, lr, seed, loss)
        for lr, losses in losses_by_lr.items()
        for seed, loss in enumerate(losses)
    ]


# Medians over the three seeds: A = 2.0, 1.0, 1.4, inf; B = 1.6, 1.2, 3.0, 10. Best of all: 1.0.
METHOD_A = {0.001: [2.0, 2.0, 2.0], 0.01: [1.0, 0.9, 1.1], 0.1: [1.4, 1.3, None], 1.0: [None, 5.0, None]}
METHOD_B = {0.001: [1.6, 1.6, 1.6], 0.01: [1.2, 1.2, 1.2], 0.1: [3.0, 3.0, 3.0], 1.0: [10.0, 10.0, 10.0]}


def two_methods(task: str) -> list[dict[str, Any]]:
    return grid(task, "method_a", METHOD_A) + grid(task, "method_b", METHOD_B)


def test_divergence_rate_is_the_share_of_lr_seed_runs_that_diverged() -> None:
    summary = summarize(two_methods("task"))
    a, b = summary.methods[("task", "method_a")], summary.methods[("task", "method_b")]
    assert (a.diverged_runs, a.runs, a.divergence_rate) == (3, 12, 0.25)
    assert b.divergence_rate == 0.0


def test_median_final_loss_counts_diverged_seeds_as_infinite() -> None:
    medians = summarize(two_methods("task")).methods[("task", "method_a")].median_final_loss
    assert medians == {0.001: 2.0, 0.01: 1.0, 0.1: 1.4, 1.0: math.inf}


def test_robustness_width_counts_grid_lrs_within_1_5x_of_the_best_of_all_methods() -> None:
    summary = summarize(two_methods("task"))
    assert summary.methods[("task", "method_a")].robustness_width == 2  # 1.0 and 1.4 <= 1.5
    assert summary.methods[("task", "method_b")].robustness_width == 1  # 1.2 only; 1.6 > 1.5
    assert summary.methods[("task", "method_a")].grid_size == 4


def test_robustness_width_on_a_log_scale_task_allows_one_decade_above_the_best() -> None:
    summary = summarize(two_methods("noisy_quadratic"))
    assert summary.methods[("noisy_quadratic", "method_a")].robustness_width == 3  # inf never counts
    assert summary.methods[("noisy_quadratic", "method_b")].robustness_width == 4  # 10 <= 10 x 1.0


def test_log_scale_tasks_are_a_parameter() -> None:
    summary = summarize(two_methods("task"), log_scale_tasks={"task"})
    assert summary.methods[("task", "method_b")].robustness_width == 4


def test_tuned_best_is_the_lowest_median_and_its_lr() -> None:
    a = summarize(two_methods("task")).methods[("task", "method_a")]
    assert (a.tuned_best_loss, a.tuned_best_lr) == (1.0, 0.01)


def test_skipped_records_are_listed_and_not_counted() -> None:
    skipped = {
        "id": "task/prodigy/lr=0.01/seed=0/epochs=1",
        "status": "skipped",
        "config": {"task": "task", "method": "prodigy", "lr": 0.01, "seed": 0, "epochs": 1},
        "reason": "package providing 'prodigyopt' is not installed",
    }
    summary = summarize([*two_methods("task"), skipped])
    assert [(run.method, run.reason) for run in summary.skipped] == [("prodigy", skipped["reason"])]
    assert ("task", "prodigy") not in summary.methods
    assert summary.methods[("task", "method_a")].runs == 12


def test_a_skipped_run_later_run_for_real_counts_once() -> None:
    real = run("task", "prodigy", 0.01, 0, 0.5)
    skipped = {**real, "status": "skipped", "reason": "not installed"}
    summary = summarize([skipped, real])
    assert summary.skipped == []
    assert summary.methods[("task", "prodigy")].runs == 1


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("sgd_momentum", 0.01),
        ("sgd_cosine", 0.01),
        ("adam", 1e-3),
        ("adamw", 1e-3),
        ("adaptive_sgd", 0.01),
        ("adaptive_sgd_no_spike_guard", 0.01),
        ("adaptive_adam", 1e-3),
        ("prodigy", 1.0),
        ("dog", 1.0),
        ("an_unknown_method", 0.01),
    ],
)
def test_default_lr_mapping_picks_the_longest_matching_prefix(method: str, expected: float) -> None:
    assert default_lr(method)[0] == expected


def test_default_result_is_read_at_the_grid_lr_nearest_on_the_log_scale() -> None:
    assert nearest_grid_lr(1e-3, HALF_DECADES) == 1e-3
    assert nearest_grid_lr(1e-3, [0.01, 0.1, 1.0]) == 0.01
    assert nearest_grid_lr(0.0025, HALF_DECADES) == pytest.approx(10**-2.5)


def test_default_within_tuned_compares_with_the_best_fixed_schedule_baseline_not_peers() -> None:
    records = [
        *grid("task", "sgd_momentum", {0.01: [1.2], 0.1: [1.0]}),  # baseline, tuned best 1.0
        *grid("task", "prodigy", {0.01: [0.1], 0.1: [0.1]}),  # a peer: not a baseline
        *(
            run("task", "adaptive_sgd", lr, 0, loss, events={"spike": 1})
            for lr, loss in [(0.01, 1.05), (0.1, 2.0)]
        ),
        *(
            run("task", "adaptive_adam", lr, 0, loss, events={"spike": 0})
            for lr, loss in [(0.01, 1.2), (0.1, 1.0)]
        ),
    ]
    summary = summarize(records)
    adaptive_sgd = summary.methods[("task", "adaptive_sgd")]
    assert (adaptive_sgd.best_baseline, adaptive_sgd.best_baseline_loss) == ("sgd_momentum", 1.0)
    assert adaptive_sgd.default_within_tuned is True  # 1.05 at lr 0.01 <= 1.1 x 1.0
    assert summary.methods[("task", "adaptive_adam")].default_within_tuned is False  # 1.2 at 0.01 (for 1e-3)
    assert summary.methods[("task", "sgd_momentum")].default_within_tuned is None


def test_report_builds_markdown_summary_json_and_figures_from_the_fixture(tmp_path: Path) -> None:
    shutil.copy(FIXTURE, tmp_path / RUNS_FILE)
    files = build_report(tmp_path, tmp_path / "out")
    report = files.report.read_text()
    for heading in ("## Targets of the controller", "## Overall", "## Task `seed_he`", "## Skipped runs"):
        assert heading in report
    summary = json.loads(files.summary.read_text())
    assert {(item["task"], item["method"]) for item in summary["methods"]} == {
        (task, method)
        for task in ("seed_he", "noisy_quadratic")
        for method in ("sgd_momentum", "adam", "adaptive_sgd", "adaptive_adam")
    }
    assert sorted(path.name for path in files.figures) == sorted(
        f"{kind}_{task}.png"
        for kind in ("loss_curves", "robustness", "divergence", "traces")
        for task in ("seed_he", "noisy_quadratic")
    )
    for path in files.figures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({path.name})" in report


def test_report_table_numbers_come_from_the_records(tmp_path: Path) -> None:
    shutil.copy(FIXTURE, tmp_path / RUNS_FILE)
    report = build_report(tmp_path, tmp_path / "out").report.read_text()
    # seed_he, adam: lr 1 diverged on both seeds; medians 0.1536 at 0.01 (from 0.1661, 0.1412).
    row = next(line for line in report.splitlines() if line.startswith("| adam | 2/6 (33%) |"))
    assert "0.154 @ 0.01" in row


def test_report_command_writes_into_results_report_by_default(tmp_path: Path) -> None:
    shutil.copy(FIXTURE, tmp_path / RUNS_FILE)
    assert main(["report", "--results", str(tmp_path)]) == 0
    assert (tmp_path / "report" / "report.md").exists()
    assert (tmp_path / "report" / "summary.json").exists()
