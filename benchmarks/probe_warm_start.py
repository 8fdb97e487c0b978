"""Does the Hessian probe's warm start pay off, and which solver reads closer? Fixed batch
against fresh minibatches.

    python benchmarks/probe_warm_start.py [--size 1M] [--optimizers sgd adamw]
                                          [--solvers power krylov]
                                          [--steps 1000] [--probe-every 100]
                                          [--batches 32] [--reference-hvps 40]
                                          [--threads 2] [--output results/probe_warm_start.json]

On the MLP of benchmarks/overhead.py (4 Linear layers, batch 256), wrapped with the probe
every --probe-every steps (``curvature_probe_every``, default options otherwise), it
trains --steps steps per optimizer, per data and per solver of --solvers
(``probe_solver``, which drives the run: its estimates set the lr bound): on one fixed
random batch, as overhead.py times it, and on a pool of --batches batches cycled in order
(inputs drawn once, labels from a fixed random linear teacher, so there is something to
learn), where each probe sees a batch the last probe did not. At every probing step,
before the wrapped step, it measures the top Hessian eigenvalue of that step's loss by
Lanczos (``lanczos_top_eigenvalue``, at most --reference-hvps products, through the same
closure), lets every other solver of --solvers probe the same point as the wrapper would
(carried on from its own last probe: ``shadow_probe``), then lets the wrapper's probe run
and records every estimate and the products each spent. So each run compares the
solvers at the same points, and the runs driven by different solvers show what each
does to the trajectory. Per run and solver it reports, over the warm probes (all but the
first, cold one): the median products per probe, and the median and largest relative
error of the estimate against the Lanczos reference. A warm probe whose start vector
still points along the top of the spectrum settles in one product and reads close to
the reference; one whose vector has turned away spends all of ``probe_iterations`` and
may read low. The reference counts as such where Lanczos converged (the table gives how
often).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from adaptive_lr import ControllerOptions
from adaptive_lr.hessian import SharpnessEstimate, closure_hvp, lanczos_top_eigenvalue
from adaptive_lr.options import PROBE_SOLVERS
from adaptive_lr.wrapper import probe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import publish
from overhead import OPTIMIZER_NAMES, OPTIMIZERS, build, parse_size

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "results" / "probe_warm_start.json"
BATCH = 256
TEACHER_CLASSES = 10
DATA = ("fixed", "pool")


def batches(inputs: Tensor, labels: Tensor, data: str, count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """The batches a run cycles through: the given one, or a pool labelled by a teacher."""
    if data == "fixed":
        return [(inputs, labels)]
    generator = torch.Generator().manual_seed(seed + 1)
    width = inputs.shape[1]
    teacher = torch.randn(width, TEACHER_CLASSES, generator=generator)
    pool = [torch.randn(BATCH, width, generator=generator) for _ in range(count)]
    return [(x, (x @ teacher).argmax(dim=1)) for x in pool]


def shadow_probe(
    solver: str,
    closure: Callable[[], Tensor],
    params: list[Tensor],
    options: ControllerOptions,
    carried: dict[str, tuple[list[Tensor], float | None]],
) -> SharpnessEstimate:
    """What the wrapper's probe with ``solver`` reads at this point (``wrapper.probe``),
    carried on from that solver's own last probe: its vector and last finite estimate."""
    vector, reference = carried.get(solver, (None, None))
    gradient = [p.grad for p in params]  # the closure has just run: finite and nonzero here
    estimate = probe(
        closure,
        params,
        options.replace(probe_solver=solver),
        gradient=gradient,
        vector=vector,
        reference=reference,
    )
    finite = math.isfinite(estimate.eigenvalue)
    carried[solver] = (estimate.vector, estimate.eigenvalue if finite else reference)
    return estimate


def run(size: int, optimizer: str, data: str, driver: str, args: argparse.Namespace) -> dict[str, Any]:
    """One training run driven by the ``driver`` solver's probe; at each probe, the
    Lanczos reference and what every solver of --solvers reads at that point."""
    model, opt, inputs, labels = build(
        size, 4, optimizer, "probe", BATCH, torch.device("cpu"), args.seed, args.probe_every, driver
    )
    params = list(model.parameters())
    cycle = batches(inputs, labels, data, args.batches, args.seed)
    probes: list[dict[str, Any]] = []
    carried: dict[str, tuple[list[Tensor], float | None]] = {}
    for step in range(args.steps):
        x, y = cycle[step % len(cycle)]
        calls = 0

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            nonlocal calls
            calls += 1
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        probing = opt._probe_due()
        readings: dict[str, dict[str, Any]] = {}
        reference = None
        if probing:
            closure()  # the gradients the step will see, so the reference runs at its point
            reference = lanczos_top_eigenvalue(
                closure_hvp(closure, params), params, max_hvps=args.reference_hvps
            )
            for solver in args.solvers:
                if solver != driver:  # leaves parameters and gradients as they were
                    shadow = shadow_probe(solver, closure, params, opt.options, carried)
                    readings[solver] = {"estimate": shadow.eigenvalue, "products": shadow.iterations}
        calls = 0
        opt.step(closure)
        if probing:
            assert reference is not None
            readings[driver] = {"estimate": opt.history[-1].sharpness, "products": (calls - 1) / 2}
            probes.append(
                {
                    "step": step,
                    "readings": readings,
                    "reference": reference.eigenvalue,
                    "reference_converged": reference.converged,
                }
            )
    warm = probes[1:]
    return {
        "optimizer": optimizer,
        "data": data,
        "driver": driver,
        "final_loss": opt.history[-1].loss,
        "probes": probes,
        "solvers": {solver: summary(warm, solver) for solver in args.solvers},
        "references_converged": sum(p["reference_converged"] for p in warm),
        "warm_probes": len(warm),
    }


def summary(warm: list[dict[str, Any]], solver: str) -> dict[str, float | None]:
    """Products per warm probe (median) and the relative error against the reference
    (median, largest), where the reference converged."""
    readings = [(p["readings"][solver], p) for p in warm]
    errors = [
        abs(r["estimate"] - p["reference"]) / abs(p["reference"])
        for r, p in readings
        if r["estimate"] is not None
        and math.isfinite(r["estimate"])
        and p["reference_converged"]
        and p["reference"] != 0
    ]
    return {
        "warm_products_median": statistics.median(r["products"] for r, _ in readings) if readings else None,
        "warm_error_median": statistics.median(errors) if errors else None,
        "warm_error_max": max(errors) if errors else None,
    }


def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Warm probes (every {args.probe_every} steps, {args.steps} steps, all but the first probe): "
        "Hessian-vector products per probe, and the relative error of the probe's estimate "
        f"against Lanczos (at most {args.reference_hvps} products) at the same point, where "
        "Lanczos converged. Each run is driven by one probe_solver (its estimates set the "
        "lr bound); at each of its probes every solver reads the same point, the others "
        "each carried on from their own last probe.",
        "",
        "| optimizer | data | run driven by | solver read | products per probe (median) "
        "| error, median | error, largest | Lanczos converged | final loss |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for solver, s in r["solvers"].items():
            lines.append(
                f"| {OPTIMIZER_NAMES[r['optimizer']]} | {r['data']} | {r['driver']} | {solver} "
                f"| {_cell(s['warm_products_median'], 'g')} | {_cell(s['warm_error_median'], '.1%')} "
                f"| {_cell(s['warm_error_max'], '.1%')} | {r['references_converged']}/{r['warm_probes']} "
                f"| {_cell(r['final_loss'], '.3g')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1M"))
    parser.add_argument("--optimizers", choices=sorted(OPTIMIZERS), nargs="+", default=["sgd", "adamw"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--probe-every", type=int, default=100)
    parser.add_argument(
        "--solvers", choices=PROBE_SOLVERS, nargs="+", default=list(PROBE_SOLVERS), help="probe_solver values"
    )
    parser.add_argument("--batches", type=int, default=32, help="batches in the pool")
    parser.add_argument("--reference-hvps", type=int, default=40, help="most Lanczos products")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    for name in ("steps", "probe_every", "batches", "reference_hvps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    torch.set_num_threads(args.threads)
    results = []
    for optimizer in args.optimizers:
        for data in DATA:
            for solver in args.solvers:
                print(f"  {optimizer}, {data} batch(es), {solver} ...", file=sys.stderr, flush=True)
                results.append(run(args.size, optimizer, data, solver, args))
    table = markdown(results, args)
    publish("probe_warm_start.py", argv, args.output, table, args.threads, size=args.size, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
