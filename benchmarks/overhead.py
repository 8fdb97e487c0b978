"""Cost of the wrapper: wall time per step and extra memory, wrapped over bare.

    python benchmarks/overhead.py [--sizes 10k 1M] [--optimizers sgd adam] [--threads 1]
                                  [--repeats 15] [--steps 100] [--warmup 10] [--batch-size 64]
                                  [--output results/overhead.json]

Model: an MLP of 4 Linear(width, width) layers with ReLU between them, width chosen so the
parameter count is close to each size; cross-entropy on one fixed random batch (no data
loading in the loop). Optimizers: SGD(lr=0.01, momentum=0.9) and Adam(lr=1e-3) with torch's
default options, bare and wrapped by ``adaptive_lr.wrap`` with default options; both are
called the same way, ``opt.step()``.

Method: torch.set_num_threads(--threads); --warmup steps of each; then --repeats repeats of
--steps steps each, bare and wrapped alternating (ABBA order) so that drift of the machine
hits both alike. Each repeat gives a time per training step (zero_grad + forward +
backward + step) and a time per optimizer step (``opt.step()`` alone, summed over the
repeat). Reported: median [min, max] over the repeats, and the ratio wrapped / bare
computed per pair of adjacent repeats, median [min, max].

Memory: the bytes of the tensors the wrapper owns (its descent buffers, plus Hessian-probe
vectors when the probe is on) over the parameter bytes, and the base optimizer's state
over the parameter bytes for comparison. Peak RSS delta (Linux, CPU only): in a fresh
process per configuration, the peak RSS over --warmup steps minus the RSS just before the
optimizer is built (model, batch and gradients already allocated). It counts the optimizer
state, the wrapper's buffers and the transient tensors of a step, as the allocator sees
them; a single fresh-process reading, so take it to about a MiB.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer

import adaptive_lr

DEPTH = 4
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "results" / "overhead.json"
OPTIMIZERS: dict[str, Callable[[Any], Optimizer]] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}
OPTIMIZER_NAMES = {"sgd": "SGD(momentum=0.9)", "adam": "Adam"}
METHODS = ("bare", "wrapped")


def parse_size(text: str) -> int:
    """'10k' -> 10_000, '1M' -> 1_000_000, '2500' -> 2500 (parameter count)."""
    scale = {"k": 10**3, "m": 10**6}.get(text[-1].lower(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 10k, 1M or 2500, got {text!r}") from None
    if value < DEPTH * 2:
        raise argparse.ArgumentTypeError(f"size must be at least {DEPTH * 2} parameters, got {text!r}")
    return value


def mlp(size: int) -> nn.Sequential:
    """DEPTH Linear(width, width) layers with ReLU between; DEPTH * (width^2 + width) ~ size."""
    width = max(1, round((size / DEPTH) ** 0.5))
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        layers.append(nn.Linear(width, width))
        if i < DEPTH - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def build(size: int, optimizer: str, method: str, batch_size: int, device: torch.device, seed: int):
    torch.manual_seed(seed)
    model = mlp(size).to(device)
    width = model[0].in_features
    inputs = torch.randn(batch_size, width, device=device)
    labels = torch.randint(0, width, (batch_size,), device=device)
    opt = OPTIMIZERS[optimizer](model.parameters())
    if method == "wrapped":
        opt = adaptive_lr.wrap(opt)
    return model, opt, inputs, labels


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(
    model: nn.Module, opt: Optimizer, inputs: Tensor, labels: Tensor, steps: int, device: torch.device
) -> tuple[float, float]:
    """Seconds per training step and per optimizer step, averaged over ``steps`` steps."""
    optimizer_seconds = 0.0
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        synchronize(device)
        before = time.perf_counter()
        opt.step()
        synchronize(device)
        optimizer_seconds += time.perf_counter() - before
    total = time.perf_counter() - start
    return total / steps, optimizer_seconds / steps


def tensor_bytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def wrapper_bytes(opt: adaptive_lr.AdaptiveOptimizer) -> int:
    """Bytes of the tensors the wrapper owns beyond the base optimizer's state."""
    return tensor_bytes(list(opt._trajectory.descent.values()) + list(opt._probe_vector.values()))


def state_bytes(opt: Optimizer) -> int:
    return tensor_bytes([v for s in opt.state.values() for v in s.values() if isinstance(v, Tensor)])


@dataclass
class Summary:
    median: float
    min: float
    max: float
    q1: float
    q3: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
        return cls(statistics.median(values), min(values), max(values), q1, q3)


def measure_config(size: int, optimizer: str, args: argparse.Namespace, device: torch.device) -> dict:
    setups = {m: build(size, optimizer, m, args.batch_size, device, args.seed) for m in METHODS}
    for method in METHODS:
        run_steps(*setups[method], args.warmup, device)
    times: dict[str, dict[str, list[float]]] = {
        m: {"training_step": [], "optimizer_step": []} for m in METHODS
    }
    events: Counter[str] = Counter()
    for repeat in range(args.repeats):
        # ABBA order: bare first on even repeats, wrapped first on odd ones.
        for method in METHODS if repeat % 2 == 0 else METHODS[::-1]:
            training, optimizer_only = run_steps(*setups[method], args.steps, device)
            times[method]["training_step"].append(training)
            times[method]["optimizer_step"].append(optimizer_only)
            if method == "wrapped":  # Outside the timed loop; the history keeps the last 1000 steps.
                events.update(r.event for r in list(setups[method][1].history)[-args.steps :] if r.event)
    model, wrapped = setups["wrapped"][0], setups["wrapped"][1]
    param_bytes = tensor_bytes(list(model.parameters()))
    result: dict[str, Any] = {
        "size": size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "width": model[0].in_features,
        "optimizer": optimizer,
        "parameter_bytes": param_bytes,
        "wrapper_bytes": wrapper_bytes(wrapped),
        "base_state_bytes": state_bytes(setups["bare"][1]),
        "wrapper_events_while_timed": dict(events),
        "seconds": times,
    }
    for measure in ("training_step", "optimizer_step"):
        bare, wrap = times["bare"][measure], times["wrapped"][measure]
        result[measure] = {
            "bare": asdict(Summary.of(bare)),
            "wrapped": asdict(Summary.of(wrap)),
            "ratio": asdict(Summary.of([w / b for w, b in zip(wrap, bare, strict=True)])),
        }
    return result


def rss_probe(size: int, optimizer: str, method: str, args: dict) -> int | None:
    """In a fresh process: peak RSS growth [bytes] from building the optimizer and stepping.

    The peak is reset (``/proc/self/clear_refs``) once the model, the batch and the
    gradients exist, so the import of torch does not hide it; Linux only (None elsewhere).
    """
    torch.set_num_threads(args["threads"])
    device = torch.device("cpu")
    model, _, inputs, labels = build(size, optimizer, "bare", args["batch_size"], device, args["seed"])
    F.cross_entropy(model(inputs), labels).backward()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Resets VmHWM (the peak RSS) to the current RSS.
        before = _proc_status_bytes("VmRSS")
    except OSError:
        return None
    opt = OPTIMIZERS[optimizer](model.parameters())
    if method == "wrapped":
        opt = adaptive_lr.wrap(opt)
    run_steps(model, opt, inputs, labels, args["warmup"], device)
    return _proc_status_bytes("VmHWM") - before


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # Reported in kB.
    raise OSError(f"{key} not in /proc/self/status")


def machine_info(threads: int, device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "adaptive_lr": adaptive_lr.__version__,
        "threads": threads,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_size(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10**6 else f"{n / 1e3:.1f}k"


def spread(summary: dict, scale: float = 1.0, digits: int = 3) -> str:
    return (
        f"{summary['median'] * scale:.{digits}f} "
        f"[{summary['min'] * scale:.{digits}f}, {summary['max'] * scale:.{digits}f}]"
    )


def format_tables(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Time per step, ms: median [min, max] over {args.repeats} repeats of {args.steps} steps "
        f"(batch {args.batch_size}, {args.threads} thread(s)); ratio = wrapped / bare per adjacent pair.",
        "",
        "| params | optimizer | measured | bare (ms) | wrapped (ms) | wrapped / bare |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in results:
        for measure, label in (("training_step", "training step"), ("optimizer_step", "opt.step() alone")):
            m = r[measure]
            lines.append(
                f"| {format_size(r['parameters'])} | {OPTIMIZER_NAMES[r['optimizer']]} | {label} "
                f"| {spread(m['bare'], 1e3)} | {spread(m['wrapped'], 1e3)} | {spread(m['ratio'], digits=2)} |"
            )
    lines += [
        "",
        "Memory: bytes of tensors held, relative to the parameter bytes; peak RSS growth over "
        f"{args.warmup} steps in a fresh process.",
        "",
        "| params | optimizer | parameters (MiB) | base optimizer state / params "
        "| extra buffers / params | peak RSS Δ bare (MiB) | peak RSS Δ wrapped (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rss = r.get("peak_rss_delta_bytes")
        bare_rss = f"{rss['bare'] / 2**20:.1f}" if rss else "n/a"
        wrapped_rss = f"{rss['wrapped'] / 2**20:.1f}" if rss else "n/a"
        lines.append(
            f"| {format_size(r['parameters'])} | {OPTIMIZER_NAMES[r['optimizer']]} "
            f"| {r['parameter_bytes'] / 2**20:.2f} | {r['base_state_bytes'] / r['parameter_bytes']:.2f} "
            f"| {r['wrapper_bytes'] / r['parameter_bytes']:.2f} | {bare_rss} | {wrapped_rss} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--optimizers", choices=sorted(OPTIMIZERS), nargs="+", default=["sgd", "adam"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100, help="steps per repeat")
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS probes (one process each)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results")
    args = parser.parse_args(argv)
    for name in ("threads", "repeats", "steps", "warmup", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    start = time.perf_counter()
    results = []
    for size in args.sizes:
        for optimizer in args.optimizers:
            print(f"timing {format_size(size)} {optimizer} ...", file=sys.stderr, flush=True)
            results.append(measure_config(size, optimizer, args, device))
    if not args.no_rss and device.type == "cpu":
        probe_args = {k: getattr(args, k) for k in ("threads", "batch_size", "seed", "warmup")}
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            for r in results:
                print(f"peak RSS {format_size(r['size'])} {r['optimizer']} ...", file=sys.stderr, flush=True)
                r["peak_rss_delta_bytes"] = {
                    m: pool.apply(rss_probe, (r["size"], r["optimizer"], m, probe_args)) for m in METHODS
                }
    seconds = time.perf_counter() - start
    tables = format_tables(results, args)
    command = "python benchmarks/overhead.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    print(tables)
    print()
    print(
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} thread(s), device {device}. Command: `{command}`. Wall time: {seconds:.0f} s. "
        f"Load average (1 min) before/after: {load_before[0]:.2f}/{os.getloadavg()[0]:.2f}."
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine_info(args.threads, device),
        "command": command,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "wall_seconds": seconds,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
    }
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
