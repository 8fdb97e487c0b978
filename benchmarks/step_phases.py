"""Where the wrapper's time goes in one optimizer step, phase by phase.

    python benchmarks/step_phases.py [--size 1M] [--depths 4 64] [--optimizer sgd]
                                     [--threads 2] [--calls 300] [--repeats 5]
                                     [--output results/step_phases.json]

On the MLPs of benchmarks/overhead.py (``--depths`` Linear layers, batch 256, gradients
from one real forward/backward), it times each phase of ``AdaptiveOptimizer.step`` called
on its own, as the wrapper calls it (under ``torch.no_grad``): collecting the gradients,
building the sampled blocks, measuring the signals (and, inside that, the exact gradient
norm and the secant's dot product), the controller's pure rule, the snapshot of the
sample before the inner step, the inner optimizer's step, and the secant's scalars after
it; then the whole wrapped step and the bare one, each fed fresh gradient tensors as after
``zero_grad(set_to_none=True)``. Each figure is the median [min, max] over ``--repeats``
of the mean over ``--calls`` calls, in microseconds. The phases do not add up exactly to
the whole step: timed alone, each finds its data in cache. So the rows "in the step: ..."
time the same calls inside whole wrapped steps (each call wrapped in a timer, the fresh
gradient copies not counted), and "in the step: the rest" is what lies around them: the
Python of ``step()`` itself, ``torch.optim``'s step hooks, the lr and momentum written
into the param groups and back. The spread is over repeats in
one process; from one process to the next the whole steps at 1M parameters moved by up to
1.8x on a 2-core machine (memory placement), so compare versions at a small ``--size`` or
over several runs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from adaptive_lr import controller as ctl
from adaptive_lr import wrapper
from adaptive_lr.distributed import RankReduction
from adaptive_lr.signals import GradientView, measure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import publish
from overhead import OPTIMIZERS, build, parse_size

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "results" / "step_phases.json"
BATCH = 256
WARMUP_STEPS = 5


def time_call(fn: Callable[[], object], calls: int, repeats: int) -> dict[str, float]:
    """Median, min and max over repeats of the mean time per call [us]."""
    with torch.no_grad():
        for _ in range(10):
            fn()
        means = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            means.append((time.perf_counter() - started) / calls * 1e6)
    return _spread(means)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def phases(size: int, depth: int, optimizer: str, calls: int, repeats: int) -> dict[str, Any]:
    """The model's size and the time of each phase of its wrapped step."""
    cpu = torch.device("cpu")
    model, opt, inputs, labels = build(size, depth, optimizer, "wrapped", BATCH, cpu, seed=0)
    _, bare, _, _ = build(size, depth, optimizer, "bare", BATCH, cpu, seed=0)
    params = list(model.parameters())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    for _ in range(WARMUP_STEPS):
        opt.step(closure)
    loss = closure()
    groups = opt.param_groups
    view = GradientView.collect(groups)
    trajectory = opt._trajectory
    sample = trajectory.prepare(view)
    signals, _ = measure(view, trajectory, sample, loss)
    context = opt._context()
    grads = [p.grad for p in params]
    bare_params = [p for g in bare.param_groups for p in g["params"]]
    for p, g in zip(bare_params, grads, strict=True):
        p.grad = g.clone()

    def fresh_grads(target: list[torch.Tensor]) -> None:
        for p, g in zip(target, grads, strict=True):
            p.grad = g.clone()

    def wrapped_step() -> None:
        fresh_grads(params)
        opt.step(loss=loss)

    def bare_step() -> None:
        fresh_grads(bare_params)
        bare.step()

    table = {
        "collect gradients": lambda: GradientView.collect(groups),
        "rank reduction": lambda: RankReduction.for_tensors(view.params, enabled=True),
        "sampled blocks and gradient": lambda: trajectory.prepare(view),
        "measure (one host sync)": lambda: measure(view, trajectory, sample, loss),
        "  exact gradient norm": lambda: trajectory.grad_norm_terms(view, sample),
        "  secant dot product": lambda: trajectory.grad_dot(sample),
        "controller rule": lambda: ctl.decide(signals, opt._controller_state, opt.options, context),
        "snapshot of the sample": lambda: trajectory.snapshot(sample),
        "inner optimizer step": lambda: opt.optimizer.step(),
        "secant scalars after": lambda: trajectory.finish(sample),
        "fresh gradient copies": lambda: fresh_grads(params),
        "whole wrapped step": wrapped_step,
        "whole bare step": bare_step,
    }
    timed = {name: time_call(fn, calls, repeats) for name, fn in table.items()}
    timed.update(in_step(opt, lambda: fresh_grads(params), loss, calls, repeats))
    return {
        "depth": depth,
        "tensors": len(params),
        "parameters": sum(p.numel() for p in params),
        "phases": timed,
    }


@contextlib.contextmanager
def _timers(opt: wrapper.AdaptiveOptimizer, spent: Counter[str]) -> Iterator[None]:
    """Wrap the calls of ``opt.step`` in timers adding seconds to ``spent``; undo on exit."""

    def timer(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started

        return timed

    trajectory = opt._trajectory
    patches = [  # (owner, attribute, name in the table)
        (GradientView, "collect", "collect gradients"),
        (RankReduction, "for_tensors", "rank reduction"),
        (trajectory, "prepare", "sampled blocks and gradient"),
        (wrapper, "measure", "measure (one host sync)"),
        (opt, "_context", "context"),
        (ctl, "decide", "controller rule"),
        (trajectory, "snapshot", "snapshot of the sample"),
        (opt.optimizer, "step", "inner optimizer step"),
        (trajectory, "finish", "secant scalars after"),
        (opt, "_record", "record"),
    ]
    saved = [(owner, attribute, owner.__dict__.get(attribute)) for owner, attribute, _ in patches]
    try:
        for owner, attribute, name in patches:
            setattr(owner, attribute, timer(name, getattr(owner, attribute)))
        yield
    finally:
        for owner, attribute, original in saved:
            if original is None:
                delattr(owner, attribute)  # an instance attribute over the class's method
            else:
                setattr(owner, attribute, original)


def in_step(
    opt: wrapper.AdaptiveOptimizer, fresh: Callable[[], None], loss: torch.Tensor, calls: int, repeats: int
) -> dict[str, dict[str, float]]:
    """The calls of whole wrapped steps, each timed where the step makes it [us per step]."""
    per_repeat: dict[str, list[float]] = {}
    for repeat in range(repeats + 1):  # the first, a warm-up
        spent: Counter[str] = Counter()
        total = 0.0
        with _timers(opt, spent):
            for _ in range(calls):
                fresh()
                started = time.perf_counter()
                opt.step(loss=loss)
                total += time.perf_counter() - started
        if repeat == 0:
            continue
        rows = {**spent, "the rest": total - sum(spent.values()), "whole step (timed)": total}
        for name, seconds in rows.items():
            per_repeat.setdefault(f"in the step: {name}", []).append(seconds / calls * 1e6)
    return {name: _spread(values) for name, values in per_repeat.items()}


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    names = list(results[0]["phases"])
    header = " | ".join(f"{r['parameters'] / 1e6:.2f}M, {r['tensors']} tensors" for r in results)
    lines = [
        f"Microseconds per call, median [min, max] over {args.repeats} repeats of {args.calls} "
        f"calls; {args.optimizer}, {args.threads} thread(s). The whole steps include copying "
        "in fresh gradients (row 'fresh gradient copies').",
        "",
        f"| phase | {header} |",
        "|---|" + "---:|" * len(results),
    ]
    for name in names:
        cells = []
        for r in results:
            t = r["phases"][name]
            cells.append(f"{t['median']:.1f} [{t['min']:.1f}, {t['max']:.1f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1M"))
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 64])
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for depth in args.depths:
        results.append(phases(args.size, depth, args.optimizer, args.calls, args.repeats))
        print(f"  depth {depth} done", file=sys.stderr)
    publish("step_phases.py", argv, args.output, markdown(results, args), args.threads, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
