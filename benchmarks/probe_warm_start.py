"""Does the Hessian probe's warm start pay off? Fixed batch against fresh minibatches.

    python benchmarks/probe_warm_start.py [--size 1M] [--optimizers sgd adamw]
                                          [--steps 1000] [--probe-every 100]
                                          [--batches 32] [--reference-hvps 40]
                                          [--threads 2] [--output results/probe_warm_start.json]

On the MLP of benchmarks/overhead.py (4 Linear layers, batch 256), wrapped with the probe
every --probe-every steps (``curvature_probe_every``, default options otherwise), it
trains --steps steps twice per optimizer: on one fixed random batch, as overhead.py times
it, and on a pool of --batches batches cycled in order (inputs drawn once, labels from a
fixed random linear teacher, so there is something to learn), where each probe sees a
batch the last probe did not. At every probing step, before the wrapped step, it
measures the top Hessian eigenvalue of that step's loss by Lanczos
(``lanczos_top_eigenvalue``, at most --reference-hvps products, through the same closure),
then lets the probe run and records its estimate and the products it spent (closure
calls). Per run it reports, over the warm probes (all but the first, cold one): the
median products per probe, and the median and largest relative error of the probe's
estimate against the Lanczos reference. A warm probe whose start vector still points
along the top of the spectrum settles in one product and reads close to the reference;
one whose vector has turned away spends all of ``probe_iterations`` and may read low.
The reference counts as such where Lanczos converged (the table gives how often).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from adaptive_lr.hessian import closure_hvp, lanczos_top_eigenvalue

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


def run(size: int, optimizer: str, data: str, args: argparse.Namespace) -> dict[str, Any]:
    """One training run; the probe's estimate, products and reference at each probe."""
    model, opt, inputs, labels = build(
        size, 4, optimizer, "probe", BATCH, torch.device("cpu"), args.seed, args.probe_every
    )
    params = list(model.parameters())
    cycle = batches(inputs, labels, data, args.batches, args.seed)
    probes: list[dict[str, Any]] = []
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
        reference = None
        if probing:
            closure()  # the gradients the step will see, so the reference runs at its point
            reference = lanczos_top_eigenvalue(
                closure_hvp(closure, params), params, max_hvps=args.reference_hvps
            )
        calls = 0
        opt.step(closure)
        if probing:
            assert reference is not None
            probes.append(
                {
                    "step": step,
                    "estimate": opt.history[-1].sharpness,
                    "products": (calls - 1) / 2,
                    "reference": reference.eigenvalue,
                    "reference_converged": reference.converged,
                }
            )
    warm = probes[1:]
    errors = [
        abs(p["estimate"] - p["reference"]) / abs(p["reference"])
        for p in warm
        if p["estimate"] is not None and p["reference_converged"] and p["reference"] != 0
    ]
    return {
        "optimizer": optimizer,
        "data": data,
        "final_loss": opt.history[-1].loss,
        "probes": probes,
        "warm_products_median": statistics.median(p["products"] for p in warm) if warm else None,
        "warm_error_median": statistics.median(errors) if errors else None,
        "warm_error_max": max(errors) if errors else None,
        "references_converged": sum(p["reference_converged"] for p in warm),
        "warm_probes": len(warm),
    }


def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Warm probes (every {args.probe_every} steps, {args.steps} steps, all but the first probe): "
        "Hessian-vector products per probe, and the relative error of the probe's estimate "
        f"against Lanczos (at most {args.reference_hvps} products) at the same point, where "
        "Lanczos converged.",
        "",
        "| optimizer | data | products per probe (median) | error, median | error, largest "
        "| Lanczos converged | final loss |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {OPTIMIZER_NAMES[r['optimizer']]} | {r['data']} | {_cell(r['warm_products_median'], 'g')} "
            f"| {_cell(r['warm_error_median'], '.1%')} | {_cell(r['warm_error_max'], '.1%')} "
            f"| {r['references_converged']}/{r['warm_probes']} | {_cell(r['final_loss'], '.3g')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1M"))
    parser.add_argument("--optimizers", choices=sorted(OPTIMIZERS), nargs="+", default=["sgd", "adamw"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--probe-every", type=int, default=100)
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
            print(f"  {optimizer}, {data} batch(es) ...", file=sys.stderr, flush=True)
            results.append(run(args.size, optimizer, data, args))
    table = markdown(results, args)
    publish("probe_warm_start.py", argv, args.output, table, args.threads, size=args.size, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
