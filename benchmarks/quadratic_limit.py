"""How close does an untuned start get to the best first-order method that knows the problem?

    python benchmarks/quadratic_limit.py [--kappas 10 100 1000 10000] [--dim 200]
                                         [--max-iters 20000] [--noise 0.01] [--noisy-iters 3000]
                                         [--seeds 0 1 2] [--output results/quadratic_limit.json]

Problem: f(x) = 1/2 x'Ax in --dim dimensions, A = Q diag(lambda) Q' with Q a random
orthogonal matrix (so no method is helped by the coordinate axes) and lambda log-spaced
in [mu, L] = [1/kappa, 1]; x0 standard normal. All in float64.

Deterministic table: iterations until f(x) <= 1e-6 f(x0) (median over --seeds; "-" if not
reached within --max-iters), and the gradient evaluations to get there (closure calls: the
probe rows also spend two per Hessian-vector product). Rows:
- gd_optimal: gradient descent with step 2/(L + mu);
- heavy_ball_optimal: Polyak's lr 4/(sqrt(L) + sqrt(mu))^2 and momentum
  ((sqrt(L) - sqrt(mu))/(sqrt(L) + sqrt(mu)))^2, as torch.optim.SGD with that momentum
  and dampening 0 (the same iteration); it needs L and mu, which no user knows;
- adam_best_grid: torch.optim.Adam, default betas, the best lr of a half-decade grid
  1e-4 ... 1 (the grid lr is in the row);
- adaptive_sgd: adaptive_lr.wrap(SGD(lr=1e-3, momentum=0.9)), default options, untuned;
- adaptive_sgd_probe: the same with the Hessian probe every 100 steps through the closure;
- adaptive_sgd_lower: the same with lower_momentum=True, curvature_range_decay=0.999;
- adaptive_sgd_probe_lower: both, the probe every 100 steps and the lower momentum (the
  probe's top eigenvalue bounds the curvature range from above);
- adaptive_sgd_full_batch: ControllerOptions.full_batch(), those two with a stability
  margin of 0.9, cap_approach 0.5, no cosine average (each step's cosine) and no update guard;
- adaptive_sgd_full_batch_krylov: the same with probe_solver="krylov" (the probe's top Ritz
  value over the same products instead of power iteration's quotient);
- adaptive_adam: adaptive_lr.wrap(Adam(lr=1e-3)), default options.
The rates printed next to gd_optimal and heavy_ball_optimal are the theoretical
(kappa - 1)/(kappa + 1) and (sqrt(kappa) - 1)/(sqrt(kappa) + 1) with the iteration counts
they predict for the 1e-6 reduction (of f, i.e. 1e-3 of the distance: n = log(1e-3)/log(rate)).

Noisy table: the gradient is A x + sigma * xi with xi standard normal, fresh every step
(sigma = --noise); --noisy-iters steps; reported: the mean of f over the last 10% of the
steps, median over --seeds, for the same methods (Adam at the deterministic table's best
lr) and heavy ball with the optimal fixed lr and momentum under the same noise.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer

import adaptive_lr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import command_line, write_json

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "results" / "quadratic_limit.json"
TARGET_REDUCTION = 1e-6
ADAM_GRID = tuple(10 ** (e / 2) for e in range(-8, 1))  # 1e-4 ... 1, half decades
UNTUNED_LR = 1e-3
PROBE_EVERY = 100
LOWER_MOMENTUM = {"lower_momentum": True, "curvature_range_decay": 0.999}
"""The adaptive_sgd_lower row: momentum from the curvature range alone (it may go below
the user's 0.9), over extremes that are forgotten slowly."""


@dataclass(frozen=True)
class Quadratic:
    """f(x) = 1/2 x'Ax with A = Q diag(eigenvalues) Q'."""

    matrix: torch.Tensor
    x0: torch.Tensor
    mu: float
    big_l: float

    @classmethod
    def make(cls, kappa: float, dim: int, seed: int) -> Quadratic:
        generator = torch.Generator().manual_seed(seed)
        eigenvalues = torch.logspace(-math.log10(kappa), 0.0, dim, dtype=torch.float64)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        matrix = q @ torch.diag(eigenvalues) @ q.T
        matrix = (matrix + matrix.T) / 2
        x0 = torch.randn(dim, generator=generator, dtype=torch.float64)
        return cls(matrix, x0, mu=1.0 / kappa, big_l=1.0)

    def value(self, x: torch.Tensor) -> float:
        return float(0.5 * x @ (self.matrix @ x))


def gd_optimal(problem: Quadratic) -> tuple[float, float]:
    """(lr, momentum) of gradient descent with the optimal fixed step."""
    return 2.0 / (problem.big_l + problem.mu), 0.0


def heavy_ball_optimal(problem: Quadratic) -> tuple[float, float]:
    """(lr, momentum) of Polyak's heavy ball tuned to L and mu."""
    root_l, root_mu = math.sqrt(problem.big_l), math.sqrt(problem.mu)
    return 4.0 / (root_l + root_mu) ** 2, ((root_l - root_mu) / (root_l + root_mu)) ** 2


OptimizerFactory = Callable[[list[torch.Tensor]], Optimizer]


def method_factories(adam_lr: float) -> dict[str, Callable[[Quadratic], OptimizerFactory]]:
    """Each method: problem -> (params -> optimizer). Only the references read the problem."""

    def fixed(rule: Callable[[Quadratic], tuple[float, float]]) -> Callable[[Quadratic], OptimizerFactory]:
        def factory(problem: Quadratic) -> OptimizerFactory:
            lr, momentum = rule(problem)
            return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)

        return factory

    return {
        "gd_optimal": fixed(gd_optimal),
        "heavy_ball_optimal": fixed(heavy_ball_optimal),
        "adam_best_grid": lambda _: lambda params: torch.optim.Adam(params, lr=adam_lr),
        "adaptive_sgd": lambda _: (
            lambda params: adaptive_lr.wrap(torch.optim.SGD(params, lr=UNTUNED_LR, momentum=0.9))
        ),
        "adaptive_sgd_probe": lambda _: (
            lambda params: adaptive_lr.wrap(
                torch.optim.SGD(params, lr=UNTUNED_LR, momentum=0.9), curvature_probe_every=PROBE_EVERY
            )
        ),
        "adaptive_sgd_lower": lambda _: (
            lambda params: adaptive_lr.wrap(
                torch.optim.SGD(params, lr=UNTUNED_LR, momentum=0.9), **LOWER_MOMENTUM
            )
        ),
        "adaptive_sgd_probe_lower": lambda _: (
            lambda params: adaptive_lr.wrap(
                torch.optim.SGD(params, lr=UNTUNED_LR, momentum=0.9),
                curvature_probe_every=PROBE_EVERY,
                **LOWER_MOMENTUM,
            )
        ),
        "adaptive_sgd_full_batch": lambda _: (
            lambda params: adaptive_lr.wrap(
                torch.optim.SGD(params, lr=UNTUNED_LR, momentum=0.9),
                adaptive_lr.ControllerOptions.full_batch(),
            )
        ),
        "adaptive_sgd_full_batch_krylov": lambda _: (
            lambda params: adaptive_lr.wrap(
                torch.optim.SGD(params, lr=UNTUNED_LR, momentum=0.9),
                adaptive_lr.ControllerOptions.full_batch(probe_solver="krylov"),
            )
        ),
        "adaptive_adam": lambda _: lambda params: adaptive_lr.wrap(torch.optim.Adam(params, lr=UNTUNED_LR)),
    }


def run(
    problem: Quadratic,
    make_optimizer: OptimizerFactory,
    *,
    iterations: int,
    noise: float = 0.0,
    noise_seed: int = 0,
    stop_at: float | None = None,
    evaluations: list[int] | None = None,
) -> list[float]:
    """f(x_t) for t = 0, 1, ... (stopping early once f <= stop_at).

    With a list as ``evaluations``, it receives the number of gradient evaluations
    (closure calls, the Hessian probe's included) made before each x_t.
    """
    x = problem.x0.clone().requires_grad_(True)
    optimizer = make_optimizer([x])
    generator = torch.Generator().manual_seed(noise_seed)
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        with torch.enable_grad():
            loss = 0.5 * x @ (problem.matrix @ x)
            loss.backward()
        if noise:
            x.grad.add_(torch.randn(x.shape, generator=generator, dtype=x.dtype), alpha=noise)
        return loss

    values = [problem.value(x.detach())]
    if evaluations is not None:
        evaluations[:] = [0]
    for _ in range(iterations):
        optimizer.step(closure)
        value = problem.value(x.detach())
        values.append(value)
        if evaluations is not None:
            evaluations.append(calls)
        if not math.isfinite(value) or (stop_at is not None and value <= stop_at):
            break
    return values


def iterations_to_target(values: list[float], target: float) -> int | None:
    for index, value in enumerate(values):
        if value <= target:
            return index
    return None


def best_adam_lr(kappa: float, dim: int, seed: int, max_iters: int) -> tuple[float, int | None]:
    """The grid lr with the fewest iterations to the target (ties: the smaller final f)."""
    problem = Quadratic.make(kappa, dim, seed)
    target = TARGET_REDUCTION * problem.value(problem.x0)
    best: tuple[float, int | None, float] | None = None
    for lr in ADAM_GRID:
        values = run(
            problem, lambda p, lr=lr: torch.optim.Adam(p, lr=lr), iterations=max_iters, stop_at=target
        )
        count = iterations_to_target(values, target)
        key = (count if count is not None else math.inf, values[-1])
        if best is None or key < ((best[1] if best[1] is not None else math.inf), best[2]):
            best = (lr, count, values[-1])
    assert best is not None
    return best[0], best[1]


def theoretical_iterations(rate: float) -> float:
    """Iterations for a 1e-3 distance reduction (1e-6 in f) at a linear rate."""
    return math.log(math.sqrt(TARGET_REDUCTION)) / math.log(rate) if rate > 0 else 0.0


def deterministic_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for kappa in args.kappas:
        adam_lr, _ = best_adam_lr(kappa, args.dim, args.seeds[0], args.max_iters)
        for name, factory in method_factories(adam_lr).items():
            counts: list[int | None] = []
            evaluation_counts: list[int | None] = []
            started = time.perf_counter()
            for seed in args.seeds:
                problem = Quadratic.make(kappa, args.dim, seed)
                target = TARGET_REDUCTION * problem.value(problem.x0)
                evaluations: list[int] = []
                values = run(
                    problem,
                    factory(problem),
                    iterations=args.max_iters,
                    stop_at=target,
                    evaluations=evaluations,
                )
                count = iterations_to_target(values, target)
                counts.append(count)
                evaluation_counts.append(None if count is None else evaluations[count])
            reached = [c for c in counts if c is not None]
            complete = len(reached) == len(counts)
            median = statistics.median(reached) if complete else None
            rows.append(
                {
                    "kappa": kappa,
                    "method": name,
                    "iterations": counts,
                    "median_iterations": median,
                    "gradient_evaluations": evaluation_counts,
                    "median_gradient_evaluations": (
                        statistics.median(e for e in evaluation_counts if e is not None) if complete else None
                    ),
                    "adam_lr": adam_lr if name == "adam_best_grid" else None,
                    "wall_time_s": round(time.perf_counter() - started, 3),
                }
            )
            print(f"  kappa {kappa:g} {name}: {counts}", file=sys.stderr)
    return rows


def noisy_table(args: argparse.Namespace, adam_lrs: dict[float, float]) -> list[dict[str, Any]]:
    rows = []
    tail = max(1, args.noisy_iters // 10)
    for kappa in args.kappas:
        for name, factory in method_factories(adam_lrs[kappa]).items():
            finals = []
            for seed in args.seeds:
                problem = Quadratic.make(kappa, args.dim, seed)
                values = run(
                    problem, factory(problem), iterations=args.noisy_iters, noise=args.noise, noise_seed=seed
                )
                finals.append(statistics.fmean(values[-tail:]) if len(values) > tail else math.inf)
            rows.append(
                {
                    "kappa": kappa,
                    "method": name,
                    "final_f": finals,
                    "median_final_f": statistics.median(finals),
                }
            )
            print(f"  noisy kappa {kappa:g} {name}: {statistics.median(finals):.3g}", file=sys.stderr)
    return rows


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(rows: list[dict[str, Any]], noisy: list[dict[str, Any]], args: argparse.Namespace) -> str:
    kappas = args.kappas
    methods = list(dict.fromkeys(row["method"] for row in rows))
    by = {(row["kappa"], row["method"]): row for row in rows}
    header = [
        "| method | " + " | ".join(f"kappa {k:g}" for k in kappas) + " |",
        "|---|" + "---:|" * len(kappas),
    ]
    lines = [
        f"Iterations to f <= 1e-6 f(x0), dim {args.dim}, median over seeds {args.seeds} "
        f"('-': not reached in {args.max_iters})",
        "",
        *header,
    ]
    for kappa_rate, name in (
        (lambda k: (k - 1) / (k + 1), "gd theory"),
        (lambda k: (math.sqrt(k) - 1) / (math.sqrt(k) + 1), "heavy ball theory"),
    ):
        cells = [f"{theoretical_iterations(kappa_rate(k)):.0f}" for k in kappas]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for method in methods:
        cells = []
        for kappa in kappas:
            row = by[(kappa, method)]
            cell = _count(row["median_iterations"])
            if method == "adam_best_grid":
                cell += f" (lr {row['adam_lr']:.2g})"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Gradient evaluations to the same target (closure calls: one per step, plus two per "
        "Hessian-vector product where the probe runs), median over seeds:",
        "",
        *header,
    ]
    for method in methods:
        cells = [_count(by[(kappa, method)]["median_gradient_evaluations"]) for kappa in kappas]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Ratio to heavy_ball_optimal (iterations):", "", *header]
    for method in methods:
        cells = []
        for kappa in kappas:
            mine, ref = (
                by[(kappa, method)]["median_iterations"],
                by[(kappa, "heavy_ball_optimal")]["median_iterations"],
            )
            cells.append("-" if mine is None or not ref else f"{mine / ref:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if noisy:
        nby = {(row["kappa"], row["method"]): row for row in noisy}
        lines += [
            "",
            f"Noisy gradients (sigma {args.noise:g} per coordinate): mean f over the last 10% of "
            f"{args.noisy_iters} steps, median over seeds",
            "",
            *header,
        ]
        for method in methods:
            cells = [f"{nby[(k, method)]['median_final_f']:.3g}" for k in kappas]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kappas", type=float, nargs="+", default=[10.0, 100.0, 1000.0, 10000.0])
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--max-iters", type=int, default=20000)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--noisy-iters", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = deterministic_table(args)
    adam_lrs = {row["kappa"]: row["adam_lr"] for row in rows if row["method"] == "adam_best_grid"}
    noisy = noisy_table(args, adam_lrs) if args.noise > 0 else []
    table = markdown(rows, noisy, args)
    print(table)
    payload = {
        "command": command_line("quadratic_limit.py", argv),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "threads": args.threads,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "deterministic": rows,
        "noisy": noisy,
        "markdown": table,
    }
    write_json(args.output, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
