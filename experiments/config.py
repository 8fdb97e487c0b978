"""Grid configuration: TOML presets in ``experiments/configs/`` expanded into run specs.

A config has a ``[grid]`` table (``tasks``, ``methods``, ``seeds`` and ``lrs``, either a
list or ``{ from = ..., to = ..., points = ... }``, log-spaced inclusive) and an
``[epochs]`` table mapping every task to its number of epochs.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from experiments.methods import METHODS
from experiments.tasks import TASKS

CONFIG_DIR = Path(__file__).parent / "configs"
PRESETS = ("quick", "full")


@dataclass(frozen=True, order=True)
class RunSpec:
    """One run of the grid; its `run_id` is the resume key."""

    task: str
    method: str
    lr: float
    seed: int
    epochs: int

    @property
    def run_id(self) -> str:
        return f"{self.task}/{self.method}/lr={self.lr:.6g}/seed={self.seed}/epochs={self.epochs}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "method": self.method,
            "lr": self.lr,
            "seed": self.seed,
            "epochs": self.epochs,
        }


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    return CONFIG_DIR / f"{name}.toml"


def load(path: Path) -> dict[str, Any]:
    with open(path, "rb") as file:
        return tomllib.load(file)


def learning_rates(spec: Any) -> list[float]:
    """A list as given, or ``{from, to, points}`` log-spaced inclusive (rounded to 6 digits)."""
    if isinstance(spec, list):
        return [float(lr) for lr in spec]
    low, high, points = float(spec["from"]), float(spec["to"]), int(spec["points"])
    if points == 1:
        return [low]
    step = (math.log10(high) - math.log10(low)) / (points - 1)
    return [float(f"{10 ** (math.log10(low) + i * step):.6g}") for i in range(points)]


def expand(config: dict[str, Any]) -> list[RunSpec]:
    """Every (task, method, lr, seed) of the grid, validated against the registries."""
    grid, epochs = config["grid"], config["epochs"]
    for kind, names, registry in (("task", grid["tasks"], TASKS), ("method", grid["methods"], METHODS)):
        unknown = sorted(set(names) - set(registry))
        if unknown:
            raise ValueError(f"unknown {kind}(s) {unknown}; known: {sorted(registry)}")
    missing = sorted(set(grid["tasks"]) - set(epochs))
    if missing:
        raise ValueError(f"[epochs] has no entry for task(s) {missing}")
    return [
        RunSpec(task, method, lr, int(seed), int(epochs[task]))
        for task, method, lr, seed in itertools.product(
            grid["tasks"], grid["methods"], learning_rates(grid["lrs"]), grid["seeds"]
        )
    ]
