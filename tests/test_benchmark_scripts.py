"""The benchmark scripts run end to end on tiny models and write what they promise.

They are timed by hand, not here (timings in tests would be flaky and prove nothing):
these tests check the scripts' structure, so that a refactor of the wrapper cannot break
them unnoticed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("one_thread")
def test_step_phases_times_every_phase_of_the_wrapped_step_for_each_depth(tmp_path: Path) -> None:
    output = tmp_path / "phases.json"
    argv = ["--size", "2k", "--depths", "2", "6", "--calls", "3", "--repeats", "1", "--threads", "1"]
    assert _load("step_phases").main([*argv, "--output", str(output)]) == 0
    payload = json.loads(output.read_text())
    assert [r["tensors"] for r in payload["results"]] == [4, 12]
    for result in payload["results"]:
        phases = result["phases"]
        expected = {"whole wrapped step", "whole bare step", "controller rule", "  exact gradient norm"}
        assert expected <= set(phases)
        assert all(t["min"] <= t["median"] <= t["max"] and t["min"] > 0 for t in phases.values())
    assert payload["markdown"].count("\n| ") == len(payload["results"][0]["phases"]) + 1


@pytest.fixture
def kept_affinity() -> Iterator[None]:
    """overhead.py pins its process to --threads CPUs; give the test process its CPUs back."""
    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    yield
    if saved is not None:
        os.sched_setaffinity(0, saved)


@pytest.mark.usefixtures("one_thread", "kept_affinity")
def test_overhead_reports_ratios_and_memory_for_every_configuration(tmp_path: Path) -> None:
    output = tmp_path / "overhead.json"
    argv = ["--sizes", "2k", "--optimizers", "sgd", "adamw", "--repeats", "2", "--steps", "2"]
    _load("overhead").main([*argv, "--warmup", "1", "--no-rss", "--output", str(output)])
    payload = json.loads(output.read_text())
    assert [r["optimizer"] for r in payload["results"]] == ["sgd", "adamw"]
    for result in payload["results"]:
        for measured in ("training_step", "optimizer_step"):
            ratios = result[measured]
            assert ratios["wrapped_ratio"]["median"] > 0 and ratios["probe_amortised_ratio"]["median"] > 0
        assert result["wrapper_bytes"] > 0 and result["probe_wrapper_bytes"] > result["wrapper_bytes"]
