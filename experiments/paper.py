"""The write-up: ``papers/paper.template.md`` filled in from a results folder.

``python -m experiments paper --results DIR --preset quick`` writes ``papers/paper.md`` and
its tables and figures under ``papers/generated/``. The template holds the prose; every
number comes from a placeholder filled from code or records, never typed by hand:

- ``{{options}}``: every controller option, its default and its documentation, read from
  `adaptive_lr.ControllerOptions`;
- ``{{protocol}}``: the grid (tasks, methods, learning rates, seeds, epochs) of the preset;
- ``{{tasks}}`` and ``{{methods}}``: the registries' descriptions;
- ``{{targets}}``, ``{{overall}}`` and ``{{task:NAME}}``: the report's tables and figures;
- ``{{provenance}}``: the commands, the results file, the machine and the code version;
- optional sections, each from its own results (a note saying how to produce it when
  absent): ``{{targets_full}}``, the targets and widths of a second grid (the
  ``targets_all`` config over every task, 11 lrs x 3 seeds); ``{{quadratic_limit}}``,
  ``{{overhead}}``, ``{{overhead_large}}``, ``{{overhead_tensors}}``,
  ``{{overhead_krylov}}`` and ``{{probe_warm_start}}``, the tables the benchmarks wrote
  into their JSON files.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from dataclasses import fields
from pathlib import Path

import torch

import adaptive_lr
from adaptive_lr.options import ControllerOptions
from experiments import config
from experiments.methods import METHODS
from experiments.report import build_report, overall_section, targets_section, task_section
from experiments.runner import RUNS_FILE, read_records
from experiments.summary import summarize
from experiments.tasks import TASKS

PAPERS = Path(__file__).resolve().parent.parent / "papers"
TARGETS_COMMAND = (
    "python -m experiments run --config experiments/configs/targets_all.toml --results results/targets_all "
    "--workers 2"
)
BENCHMARK_COMMANDS = {
    "quadratic_limit": "python benchmarks/quadratic_limit.py",
    "overhead": "python benchmarks/overhead.py --sizes 10k 1M 10M --optimizers sgd adamw --threads 2",
    "overhead_large": (
        "python benchmarks/overhead.py --sizes 50M --optimizers sgd adamw --threads 2 --large-repeats 5 "
        "--warmup 2 --no-rss --output results/overhead_large.json"
    ),
    "overhead_tensors": (
        "python benchmarks/overhead.py --sizes 1M --depths 4 64 --optimizers sgd adamw --threads 2 --no-rss "
        "--repeats 9 --output results/overhead_tensors.json"
    ),
    "overhead_krylov": (
        "python benchmarks/overhead.py --sizes 1M 10M --optimizers sgd adamw --threads 2 "
        "--probe-solver krylov --output results/overhead_krylov.json"
    ),
    "probe_warm_start": "python benchmarks/probe_warm_start.py",
}
PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+(?::[a-z0-9_]+)?)\s*\}\}")


def build_paper(
    results: Path,
    *,
    preset: str = "quick",
    template: Path | None = None,
    out: Path | None = None,
    targets_results: Path | None = None,
    benchmarks: Path | None = None,
) -> Path:
    """Render the template with the records of ``results``; return the paper's path.

    ``targets_results``: a results folder of the ``targets_all`` grid; ``benchmarks``: the
    folder holding ``quadratic_limit.json`` and ``overhead.json``. Either may be None or
    missing, and its sections then say how to produce it.
    """
    template = PAPERS / "paper.template.md" if template is None else template
    out = PAPERS / "paper.md" if out is None else out
    generated = out.parent / "generated"
    files = build_report(results, generated)
    summary = summarize(read_records(results))
    figures = {
        task: [path.relative_to(out.parent) for path in files.figures if path.stem.endswith("_" + task)]
        for task in summary.tasks()
    }
    grid = config.load(config.preset_path(preset))
    values = {
        "options": _options_table(),
        "protocol": _protocol(grid, preset),
        "tasks": _registry_table(
            "task", {name: task.description for name, task in TASKS.items()}, grid, "tasks"
        ),
        "methods": _registry_table(
            "method", {name: method.description for name, method in METHODS.items()}, grid, "methods"
        ),
        "targets": "\n".join(targets_section(summary)),
        "overall": "\n".join(overall_section(summary)),
        "provenance": _provenance(results, preset),
        "targets_full": _targets_full(targets_results),
    }
    for name, command in BENCHMARK_COMMANDS.items():
        values[name] = _benchmark_table(None if benchmarks is None else benchmarks / f"{name}.json", command)
    for task in summary.tasks():
        values[f"task:{task}"] = "\n".join(task_section(summary, task, figures[task]))

    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            if key.startswith("task:"):
                return f"_(no results for task {key[5:]} in this results folder)_"
            raise KeyError(f"unknown placeholder {{{{{key}}}}} in {template}")
        return values[key]

    out.write_text(PLACEHOLDER.sub(fill, template.read_text()))
    return out


def _targets_full(results: Path | None) -> str:
    if results is None or not (results / RUNS_FILE).exists():
        return f"_(not in this build: run `{TARGETS_COMMAND}`, then `make paper-full`)_"
    summary = summarize(read_records(results))
    return "\n".join(
        [
            f"From `{results / RUNS_FILE}` (`{TARGETS_COMMAND}`).",
            "",
            *targets_section(summary),
            "",
            *overall_section(summary),
        ]
    )


def _benchmark_table(path: Path | None, command: str) -> str:
    if path is None or not path.exists():
        return f"_(not in this build: run `{command}`, then `make paper-full`)_"
    payload = json.loads(path.read_text())
    machine = payload.get("machine", {})
    where = ", ".join(
        f"{key} {value}" for key, value in machine.items() if key in ("cpu", "platform", "torch")
    )
    return "\n".join(
        [
            f"From `{path.name}`, written by `{payload.get('command', command)}` ({where}).",
            "",
            payload["markdown"],
        ]
    )


def _options_table() -> str:
    docs = _option_docs()
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for f in fields(ControllerOptions):
        lines.append(f"| `{f.name}` | `{f.default!r}` | {docs.get(f.name, '')} |")
    return "\n".join(lines)


def _option_docs() -> dict[str, str]:
    """Each option's documentation, joined from the class docstring's indented entries."""
    docs: dict[str, str] = {}
    current: list[str] = []
    for line in (ControllerOptions.__doc__ or "").splitlines():
        entry = re.match(r"\s{8}([a-z_]+(?:, [a-z_]+)?): (.*)", line)
        if entry:
            current = [entry.group(2)]
            for name in entry.group(1).split(", "):
                docs[name] = current  # type: ignore[assignment]
        elif line.startswith(" " * 12) and current:
            current.append(line.strip())
        else:
            current = []
    return {name: " ".join(parts).replace("|", "/") for name, parts in docs.items()}  # type: ignore[arg-type]


def _protocol(grid: dict, preset: str) -> str:
    specs = config.expand(grid)
    lrs = sorted({spec.lr for spec in specs})
    seeds = sorted({spec.seed for spec in specs})
    epochs = ", ".join(f"{task}: {n}" for task, n in grid["epochs"].items())
    return "\n".join(
        [
            f"- preset `{preset}` (`experiments/configs/{preset}.toml`): {len(specs)} runs;",
            f"- initial learning rates: {', '.join(f'{lr:.3g}' for lr in lrs)};",
            f"- seeds: {', '.join(map(str, seeds))};",
            f"- epochs per task: {epochs}.",
        ]
    )


def _registry_table(kind: str, descriptions: dict[str, str], grid: dict, key: str) -> str:
    used = grid["grid"][key]
    lines = [f"| {kind} | description |", "|---|---|"]
    lines += [f"| `{name}` | {descriptions[name].replace('|', '/')} |" for name in used]
    return "\n".join(lines)


def _provenance(results: Path, preset: str) -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return "\n".join(
        [
            f"- regenerate: `make paper` (runs `python -m experiments run --preset {preset}`, then "
            f"`python -m experiments paper --results {results} --preset {preset}`);",
            f"- records: `{results / RUNS_FILE}`;",
            f"- code: adaptive_lr {adaptive_lr.__version__}, git {commit}; torch {torch.__version__}; "
            f"Python {platform.python_version()};",
            f"- machine: {platform.platform()}, {_cpu_count()} CPU(s).",
        ]
    )


def _cpu_count() -> int:
    return os.cpu_count() or 1
