"""Regression check for benchmarks/quadratic_limit.py: one kappa, one seed, a few hundred steps.

The full table (four kappas, three seeds, the noisy version) is the benchmark; this keeps
its deterministic kappa-100 cell from sliding back unnoticed.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import adaptive_lr

KAPPA = 100.0
DIM = 200
SEED = 0
MAX_ITERS = 600


def _load_benchmark() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "quadratic_limit.py"
    spec = importlib.util.spec_from_file_location("quadratic_limit", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load_benchmark()


def _iterations(bench: ModuleType, make: object, kappa: float = KAPPA) -> int | None:
    problem = bench.Quadratic.make(kappa, DIM, SEED)
    target = bench.TARGET_REDUCTION * problem.value(problem.x0)
    values = bench.run(problem, make, iterations=MAX_ITERS, stop_at=target)
    return bench.iterations_to_target(values, target)


def test_problem_has_the_stated_spectrum(bench: ModuleType) -> None:
    problem = bench.Quadratic.make(KAPPA, DIM, SEED)
    eigenvalues = torch.linalg.eigvalsh(problem.matrix)
    assert eigenvalues.min().item() == pytest.approx(1 / KAPPA, rel=1e-9)
    assert eigenvalues.max().item() == pytest.approx(1.0, rel=1e-9)


def test_references_match_their_theoretical_rates(bench: ModuleType) -> None:
    problem = bench.Quadratic.make(KAPPA, DIM, SEED)
    gd = _iterations(bench, bench.method_factories(1e-3)["gd_optimal"](problem))
    heavy_ball = _iterations(bench, bench.method_factories(1e-3)["heavy_ball_optimal"](problem))
    assert gd is not None and heavy_ball is not None
    # GD's rate is (kappa-1)/(kappa+1) on the slowest mode: about 345 steps for f / 1e6
    # from a start spread over all modes, fewer since the slow mode holds 1/200 of f(x0).
    assert 200 < gd <= math.ceil(bench.theoretical_iterations((KAPPA - 1) / (KAPPA + 1)))
    # Heavy ball is faster by about sqrt(kappa) / 2 on this problem.
    assert heavy_ball < gd / 4


def test_untuned_adaptive_sgd_is_never_slower_than_optimal_gradient_descent(bench: ModuleType) -> None:
    problem = bench.Quadratic.make(KAPPA, DIM, SEED)
    gd = _iterations(bench, bench.method_factories(1e-3)["gd_optimal"](problem))
    adaptive = _iterations(
        bench,
        lambda params: adaptive_lr.wrap(torch.optim.SGD(params, lr=bench.UNTUNED_LR, momentum=0.9)),
    )
    assert gd is not None
    assert adaptive is not None, f"adaptive_lr did not reach 1e-6 f(x0) in {MAX_ITERS} steps"
    assert adaptive <= gd


def test_full_batch_options_beat_the_defaults_and_stay_within_1_5x_of_optimal_heavy_ball(
    bench: ModuleType,
) -> None:
    problem = bench.Quadratic.make(KAPPA, DIM, SEED)
    heavy_ball = _iterations(bench, bench.method_factories(1e-3)["heavy_ball_optimal"](problem))
    default = _iterations(bench, bench.method_factories(1e-3)["adaptive_sgd"](problem))
    full_batch = _iterations(bench, bench.method_factories(1e-3)["adaptive_sgd_full_batch"](problem))
    assert heavy_ball is not None and default is not None and full_batch is not None
    # measured 48 against 148 (defaults) and 52 (optimal heavy ball)
    assert full_batch <= 0.8 * default
    assert full_batch <= 1.5 * heavy_ball


def test_full_batch_options_beat_optimal_gradient_descent_and_stay_within_1_5x_of_heavy_ball_at_kappa_10(
    bench: ModuleType,
) -> None:
    """At kappa 10 the untuned start costs most: on seeds 0 and 1 optimal GD needs only
    28 and 26 steps and optimal heavy ball 13 and 12 (measured: full_batch 17 on both; with a
    cosine average over two steps it took 18 and 19)."""
    for seed in (0, 1):
        problem = bench.Quadratic.make(10.0, DIM, seed)
        target = bench.TARGET_REDUCTION * problem.value(problem.x0)
        counts = {}
        for name in ("gd_optimal", "heavy_ball_optimal", "adaptive_sgd_full_batch"):
            make = bench.method_factories(1e-3)[name](problem)
            values = bench.run(problem, make, iterations=MAX_ITERS, stop_at=target)
            counts[name] = bench.iterations_to_target(values, target)
        assert None not in counts.values()
        assert counts["adaptive_sgd_full_batch"] < counts["gd_optimal"]
        assert counts["adaptive_sgd_full_batch"] <= 1.5 * counts["heavy_ball_optimal"], seed


def test_gradient_evaluations_count_one_per_step_and_two_per_probe_product(bench: ModuleType) -> None:
    from adaptive_lr.wrapper import COLD_PROBE_FACTOR

    problem = bench.Quadratic.make(KAPPA, DIM, SEED)
    factories = bench.method_factories(1e-3)
    evaluations: list[int] = []
    values = bench.run(
        problem, factories["heavy_ball_optimal"](problem), iterations=20, evaluations=evaluations
    )
    assert evaluations == list(range(len(values)))
    values = bench.run(
        problem, factories["adaptive_sgd_full_batch"](problem), iterations=120, evaluations=evaluations
    )
    steps = [b - a for a, b in itertools.pairwise(evaluations)]
    products = adaptive_lr.ControllerOptions.full_batch().probe_iterations
    # probe steps (0 and 100): the step's own call and two per product; the others: one
    assert 3 <= steps[0] <= 1 + 2 * COLD_PROBE_FACTOR * products and steps[0] % 2 == 1
    assert 3 <= steps[100] <= 1 + 2 * products
    assert set(steps[1:100] + steps[101:]) == {1}
