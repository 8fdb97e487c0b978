"""Command line: ``python -m experiments run --preset quick [--results DIR] [--workers N]``,
``python -m experiments report --results DIR [--out DIR]``,
``python -m experiments paper --results DIR [--preset quick] [--targets-results DIR]
[--benchmarks DIR]``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from experiments import config
from experiments.methods import METHODS
from experiments.runner import DEFAULT_RESULTS, RUNS_FILE, run_grid
from experiments.tasks import TASKS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a grid of task x method x lr x seed (resumable)")
    source = run.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", choices=config.PRESETS, default="quick", help="experiments/configs/<preset>.toml"
    )
    source.add_argument("--config", type=Path, help="a TOML config file instead of a preset")
    run.add_argument(
        "--results", type=Path, default=DEFAULT_RESULTS, help=f"results folder (default {DEFAULT_RESULTS})"
    )
    run.add_argument("--workers", type=int, default=1, help="worker processes; 1 runs inline (default 1)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    commands.add_parser("list", help="list the registered tasks and methods")
    report = commands.add_parser("report", help="results folder -> report.md, summary.json, figures")
    report.add_argument(
        "--results", type=Path, default=DEFAULT_RESULTS, help=f"results folder (default {DEFAULT_RESULTS})"
    )
    report.add_argument("--out", type=Path, help="output folder (default <results>/report)")
    paper = commands.add_parser("paper", help="results folder -> papers/paper.md (from the template)")
    paper.add_argument(
        "--results", type=Path, default=DEFAULT_RESULTS, help=f"results folder (default {DEFAULT_RESULTS})"
    )
    paper.add_argument("--preset", choices=config.PRESETS, default="quick", help="the preset that was run")
    paper.add_argument("--out", type=Path, help="the paper's path (default papers/paper.md)")
    paper.add_argument(
        "--targets-results", type=Path, help="results folder of the targets_all grid (optional section)"
    )
    paper.add_argument(
        "--benchmarks",
        type=Path,
        help="folder with quadratic_limit.json and overhead.json from benchmarks/ (optional sections)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        print("tasks:")
        for task in TASKS.values():
            print(f"  {task.name:36} {task.description}")
        print("methods:")
        for method in METHODS.values():
            note = f"  [needs {method.requires}]" if method.requires else ""
            print(f"  {method.name:36} {method.description}{note}")
        return 0
    if args.command == "paper":
        from experiments.paper import build_paper  # imports matplotlib, needed only here

        path = build_paper(
            args.results,
            preset=args.preset,
            out=args.out,
            targets_results=args.targets_results,
            benchmarks=args.benchmarks,
        )
        print(f"wrote {path}")
        return 0
    if args.command == "report":
        from experiments.report import build_report  # imports matplotlib, needed only here

        try:
            files = build_report(args.results, args.out)
        except FileNotFoundError as error:
            raise SystemExit(str(error)) from error
        print(f"wrote {files.report}, {files.summary} and {len(files.figures)} figure(s)")
        return 0
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    path = args.config or config.preset_path(args.preset)
    specs = config.expand(config.load(path))
    print(f"{path}: {len(specs)} run(s) in the grid")
    started = time.perf_counter()
    summary = run_grid(specs, args.results, workers=args.workers, progress=not args.no_progress)
    print(
        f"done in {time.perf_counter() - started:.1f} s: {len(summary.ran)} ran, "
        f"{len(summary.already_done)} already done, {len(summary.unavailable)} skipped (not installed), "
        f"{len(summary.failed)} failed; records in {args.results / RUNS_FILE}"
    )
    return 1 if summary.failed else 0
