"""Cost of the wrapper: wall time per step and extra memory, wrapped over bare.

    python benchmarks/overhead.py [--sizes 10k 1M] [--depths 4] [--optimizers sgd adam]
                                  [--threads 1] [--repeats 15] [--large-repeats 5]
                                  [--steps 100] [--warmup 10] [--batch-size N]
                                  [--probe-every 100] [--control] [--clip] [--keep-denormals]
                                  [--output results/overhead.json]

Model: an MLP of --depths Linear(width, width) layers (2 tensors each) with ReLU between
them, width chosen so the parameter count is close to each size; cross-entropy on one
fixed random batch (no data loading in the loop); batch 64 below 1M parameters and 256
from 1M (--batch-size overrides). Optimizers: SGD(lr=0.01, momentum=0.9), Adam(lr=1e-3),
AdamW(lr=1e-3, weight_decay=0.01). Methods: bare; wrapped by ``adaptive_lr.wrap`` with
default options; and the probe mode, wrapped with the Hessian probe at its cadence
K = --probe-every (``curvature_probe_every``, 100 as in ``ControllerOptions.full_batch``).
The probe mode is timed at that cadence, over windows of K consecutive steps, each
holding exactly one probing step, so its time per step is the amortised cost itself and
each probe starts from an eigenvector K steps old, as in training: a warm probe stops
after one product where its first Rayleigh quotient is within ``probe_tolerance`` of the
last estimate, so probing at every step would find the iteration settled and understate
it. The probing step of each window and the products its probe spent are reported too.
The probe's first, cold call (from the gradient, up to twice ``probe_iterations``
products) falls in the warm-up.

Method: threads set by torch.set_num_threads(--threads) and the process pinned to that
many CPUs (Linux); --warmup steps of each method; then repeats (--repeats up to 1M
parameters, --large-repeats above) of --steps steps each (above 1M proportionally fewer,
at least 5; the probe mode: one window of K steps), the methods in forward then
backward order on alternate repeats so that drift of the machine hits all alike. Every
method is called as ``opt.step(closure)``. Each repeat gives a time per training step
(the whole call: zero_grad, forward, backward, step) and a time per optimizer step (that
minus the step's first closure call). Reported: median [min, max] over the repeats, and
the ratio to bare computed per repeat, median [min, max]. With --control, a second bare
copy of the model, built alike, is timed among them: its ratio to the first is what
placement in memory alone moves, and a table splits the training step of bare, wrapped
and that copy into forward/backward (the step's first closure call) and optimizer step.
With --clip, a reference is timed among them: the bare optimizer with
``torch.nn.utils.clip_grad_norm_(max_norm=1)`` before each step, the usual guard against
explosions, which reads every gradient for one exact norm as the wrapper does.

Denormals: flushed to zero (``torch.set_flush_denormal(True)``, before any intra-op thread
starts, so every thread inherits it) unless --keep-denormals. The wrapped SGD run raises
the lr multiplier far above bare SGD's fixed lr and memorizes the fixed batch: its logits
reach several hundred, a few percent of the softmax probabilities and of the last layers'
gradients become denormal floats, and the forward/backward passes slow down on them. That
is where the trajectory goes, not work the wrapper does; flushing them times both methods
on normal numbers. --keep-denormals measures it.

Memory: the bytes of the tensors the wrapper owns (on the sample: the descent, and the
weights where a layout has many distinct ones; plus Hessian-probe vectors in the probe
mode) over the parameter bytes, and the base optimizer's state over the parameter bytes
for comparison. Peak RSS delta (Linux, CPU only): in a fresh process per configuration,
the peak RSS over --warmup steps minus the RSS just before the optimizer is built
(model, batch and gradients already allocated). It counts the optimizer state, the
wrapper's buffers and the transient tensors of a step, as the allocator sees them; a
single fresh-process reading, so take it to about a MiB.
"""

from __future__ import annotations

import argparse
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
from adaptive_lr.options import PROBE_SOLVERS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import command_line, write_json

DEPTH = 4
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "results" / "overhead.json"
OPTIMIZERS: dict[str, Callable[[Any], Optimizer]] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
}
OPTIMIZER_NAMES = {"sgd": "SGD(momentum=0.9)", "adam": "Adam", "adamw": "AdamW"}
METHODS = ("bare", "wrapped", "probe")
"""bare: the torch optimizer; wrapped: adaptive_lr.wrap with default options; probe: the
same with the Hessian probe every K = --probe-every steps, timed over windows of K steps."""
CONTROL = "bare_twin"
"""With --control: a second bare copy of the model and optimizer, built alike. Its ratio to
the first is what placement in memory alone moves; the split of each training step into
the forward/backward (the step's first closure call) and the optimizer step shows where
the wrapped step's extra time lies."""
CLIP = "clip"
"""With --clip, a reference: the bare optimizer with ``torch.nn.utils.clip_grad_norm_``
(max_norm=1) between the backward pass and each step, what a user pays for the usual
guard against explosions: one exact gradient norm and a multiply of every gradient."""
LARGE = 10**6
"""From this size on, the per-size defaults: batch 256 and fewer steps per repeat."""
PROBE_EVERY = 100
"""The probe mode's default cadence, ``curvature_probe_every`` of ``full_batch()``."""


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


def mlp(size: int, depth: int = DEPTH) -> nn.Sequential:
    """depth Linear(width, width) layers with ReLU between; depth * (width^2 + width) ~ size."""
    width = max(1, round((size / depth) ** 0.5))
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ClippedSteps:
    """The ``clip`` reference: ``step(closure)`` runs the closure, clips the gradients'
    global norm to ``max_norm`` with ``torch.nn.utils.clip_grad_norm_``, then steps."""

    def __init__(self, optimizer: Optimizer, max_norm: float = 1.0) -> None:
        self.optimizer = optimizer
        self.max_norm = max_norm
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        with torch.enable_grad():
            loss = closure()
        nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        return loss


def make_optimizer(
    model: nn.Module,
    optimizer: str,
    method: str,
    probe_every: int = PROBE_EVERY,
    probe_solver: str = "power",
) -> Optimizer | ClippedSteps:
    opt = OPTIMIZERS[optimizer](model.parameters())
    if method == "wrapped":
        return adaptive_lr.wrap(opt)
    if method == "probe":
        return adaptive_lr.wrap(opt, curvature_probe_every=probe_every, probe_solver=probe_solver)
    if method == CLIP:
        return ClippedSteps(opt)
    return opt


def build(
    size: int,
    depth: int,
    optimizer: str,
    method: str,
    batch_size: int,
    device: torch.device,
    seed: int,
    probe_every: int = PROBE_EVERY,
    probe_solver: str = "power",
):
    torch.manual_seed(seed)
    model = mlp(size, depth).to(device)
    width = model[0].in_features
    inputs = torch.randn(batch_size, width, device=device)
    labels = torch.randint(0, width, (batch_size,), device=device)
    return model, make_optimizer(model, optimizer, method, probe_every, probe_solver), inputs, labels


def batch_size_for(size: int, args: argparse.Namespace) -> int:
    return args.batch_size or (256 if size >= LARGE else 64)


def repeats_for(size: int, args: argparse.Namespace) -> int:
    return args.repeats if size <= LARGE else args.large_repeats


def steps_for(size: int, args: argparse.Namespace) -> int:
    """--steps up to 1M parameters, then proportionally fewer (at least 5)."""
    return args.steps if size <= LARGE else max(5, round(args.steps * LARGE / size))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Steps:
    """Per step of a run: the whole ``opt.step(closure)`` call and its first closure call
    (zero_grad, forward, backward) [s], and how many closure calls it made."""

    training: list[float]
    first_call: list[float]
    closure_calls: list[int]

    def means(self) -> tuple[float, float]:
        """Seconds per training step and per optimizer step alone (training step minus its
        first closure call, so a probe's extra forward/backward passes count as optimizer
        work)."""
        total = sum(self.training)
        return total / len(self.training), (total - sum(self.first_call)) / len(self.training)


def run_steps(
    model: nn.Module,
    opt: Optimizer | ClippedSteps,
    inputs: Tensor,
    labels: Tensor,
    steps: int,
    device: torch.device,
) -> Steps:
    """Time ``steps`` training steps, each called as ``opt.step(closure)`` (the probe needs
    the closure)."""
    first_call = 0.0
    calls = 0

    def closure() -> Tensor:
        nonlocal first_call, calls
        started = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        synchronize(device)
        if calls == 0:
            first_call = time.perf_counter() - started
        calls += 1
        return loss

    timed = Steps([], [], [])
    synchronize(device)
    for _ in range(steps):
        calls = 0
        started = time.perf_counter()
        opt.step(closure)
        synchronize(device)
        timed.training.append(time.perf_counter() - started)
        timed.first_call.append(first_call)
        timed.closure_calls.append(calls)
    return timed


def tensor_bytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def wrapper_bytes(opt: adaptive_lr.AdaptiveOptimizer) -> int:
    """Bytes of the tensors the wrapper owns beyond the base optimizer's state."""
    return tensor_bytes(opt._trajectory.held_tensors() + list(opt._probe_vector.values()))


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


def measure_config(
    size: int, depth: int, optimizer: str, args: argparse.Namespace, device: torch.device
) -> dict:
    batch_size, steps = batch_size_for(size, args), steps_for(size, args)
    methods = METHODS + ((CONTROL,) if args.control else ()) + ((CLIP,) if args.clip else ())
    setups = {
        m: build(
            size, depth, optimizer, m, batch_size, device, args.seed, args.probe_every, args.probe_solver
        )
        for m in methods
    }
    for method in methods:
        run_steps(*setups[method], args.warmup, device)
    times: dict[str, dict[str, list[float]]] = {
        m: {"training_step": [], "optimizer_step": []} for m in methods
    }
    probing: dict[str, list[float]] = {"training_step": [], "optimizer_step": [], "products": []}
    events: Counter[str] = Counter()
    repeats = repeats_for(size, args)
    for repeat in range(repeats):
        # ABBA order: the methods forward on even repeats and backward on odd ones.
        for method in methods if repeat % 2 == 0 else methods[::-1]:
            # The probe mode: a window of K steps, which holds exactly one probing step.
            count = args.probe_every if method == "probe" else steps
            timed = run_steps(*setups[method], count, device)
            training, optimizer_only = timed.means()
            times[method]["training_step"].append(training)
            times[method]["optimizer_step"].append(optimizer_only)
            if method == "probe":
                (k,) = [i for i, c in enumerate(timed.closure_calls) if c > 1]
                probing["training_step"].append(timed.training[k])
                probing["optimizer_step"].append(timed.training[k] - timed.first_call[k])
                probing["products"].append((timed.closure_calls[k] - 1) / 2)  # two calls each
            if method == "wrapped":  # Outside the timed loop; the history keeps the last 1000 steps.
                events.update(r.event for r in list(setups[method][1].history)[-steps:] if r.event)
    model = setups["wrapped"][0]
    param_bytes = tensor_bytes(list(model.parameters()))
    result: dict[str, Any] = {
        "size": size,
        "depth": depth,
        "tensors": len(list(model.parameters())),
        "parameters": sum(p.numel() for p in model.parameters()),
        "width": model[0].in_features,
        "batch_size": batch_size,
        "steps_per_repeat": steps,
        "optimizer": optimizer,
        "parameter_bytes": param_bytes,
        "wrapper_bytes": wrapper_bytes(setups["wrapped"][1]),
        "probe_wrapper_bytes": wrapper_bytes(setups["probe"][1]),
        "base_state_bytes": state_bytes(setups["bare"][1]),
        "wrapper_events_while_timed": dict(events),
        "seconds": times,
        "probing_step": probing,
    }
    for measure in ("training_step", "optimizer_step"):
        bare = times["bare"][measure]
        result[measure] = {"bare": asdict(Summary.of(bare))}
        for method in methods[1:]:
            mine = times[method][measure]
            result[measure][method] = asdict(Summary.of(mine))
            result[measure][f"{method}_ratio"] = asdict(
                Summary.of([w / b for w, b in zip(mine, bare, strict=True)])
            )
        result[measure]["probing_step"] = asdict(Summary.of(probing[measure]))
    result["probe_products"] = asdict(Summary.of(probing["products"]))
    if args.control:
        result["denormal_softmax_fraction"] = {
            m: denormal_softmax_fraction(setups[m][0], setups[m][2]) for m in methods if m != "probe"
        }
    result["forward_backward"] = {
        m: asdict(
            Summary.of(
                [t - o for t, o in zip(times[m]["training_step"], times[m]["optimizer_step"], strict=True)]
            )
        )
        for m in methods
        if m != "probe"
    }
    return result


def denormal_softmax_fraction(model: nn.Module, inputs: Tensor) -> float:
    """The share of the model's softmax probabilities on the batch that are denormal in
    float32, between 2^-149 and its smallest normal number (computed in float64, so that
    flushing does not hide them; smaller ones would be zeros, which cost nothing)."""
    with torch.no_grad():
        probabilities = torch.softmax(model(inputs).double(), dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    return ((probabilities >= 2.0**-149) & (probabilities < tiny)).double().mean().item()


def rss_probe(size: int, depth: int, optimizer: str, method: str, args: dict) -> int | None:
    """In a fresh process: peak RSS growth [bytes] from building the optimizer and stepping.

    The peak is reset (``/proc/self/clear_refs``) once the model, the batch and the
    gradients exist, so the import of torch does not hide it; Linux only (None elsewhere).
    """
    torch.set_num_threads(args["threads"])
    device = torch.device("cpu")
    model, _, inputs, labels = build(size, depth, optimizer, "bare", args["batch_size"], device, args["seed"])
    F.cross_entropy(model(inputs), labels).backward()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Resets VmHWM (the peak RSS) to the current RSS.
        before = _proc_status_bytes("VmRSS")
    except OSError:
        return None
    # The probe's memory does not depend on its cadence: the first step probes (a cold start).
    opt = make_optimizer(model, optimizer, method, probe_solver=args["probe_solver"])
    run_steps(model, opt, inputs, labels, args["warmup"], device)
    return _proc_status_bytes("VmHWM") - before


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # Reported in kB.
    raise OSError(f"{key} not in /proc/self/status")


def machine_info(threads: int, device: torch.device, flush_denormal: bool) -> dict:
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
        "flush_denormal": flush_denormal,
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
        f"Time per step, ms: median [min, max] over {args.repeats} repeats ({args.large_repeats} above "
        f"1M parameters; steps per repeat in the table; {args.threads} thread(s)); "
        "ratio = method / bare per repeat. wrapped: "
        f"default options; probe mode: curvature_probe_every={args.probe_every}, "
        f"probe_solver={args.probe_solver!r}, timed over "
        f"windows of {args.probe_every} steps (one probe each), so its time per step is amortised; "
        "probing step: the step of each window that runs the probe, and the Hessian-vector "
        "products that probe spent (two forward/backward passes each).",
        "",
        "| params | tensors | batch | optimizer | measured | bare (ms) | wrapped (ms) | wrapped / bare "
        "| probe mode / bare | probing step (ms) | products per probe |",
        "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for measure, label in (("training_step", "training step"), ("optimizer_step", "opt.step() alone")):
            m = r[measure]
            lines.append(
                f"| {format_size(r['parameters'])} | {r['tensors']} | {r['batch_size']} "
                f"| {OPTIMIZER_NAMES[r['optimizer']]} | {label} ({r['steps_per_repeat']} steps) "
                f"| {spread(m['bare'], 1e3)} | {spread(m['wrapped'], 1e3)} "
                f"| {spread(m['wrapped_ratio'], digits=2)} | {spread(m['probe_ratio'], digits=3)} "
                f"| {spread(m['probing_step'], 1e3)} | {spread(r['probe_products'], digits=1)} |"
            )
    lines += _comparison(
        results,
        CONTROL,
        f"Control: {CONTROL}, a second bare copy built alike, over the first (what placement "
        "in memory alone moves); each training step split into forward/backward (its first "
        "closure call) and the optimizer step, ms.",
        [
            "forward/backward: bare",
            "wrapped",
            CONTROL,
            "softmax probabilities denormal in float32 at the end: bare",
            "wrapped",
        ],
        lambda r: [
            spread(r["forward_backward"]["bare"], 1e3),
            spread(r["forward_backward"]["wrapped"], 1e3),
            spread(r["forward_backward"][CONTROL], 1e3),
            f"{r['denormal_softmax_fraction']['bare']:.2%}",
            f"{r['denormal_softmax_fraction']['wrapped']:.2%}",
        ],
    )
    lines += _comparison(
        results,
        CLIP,
        f"Reference: {CLIP}, the bare optimizer with torch.nn.utils.clip_grad_norm_(max_norm=1) "
        "before each step, against the wrapper's default mode; ratios to bare per repeat, and "
        "the optimizer step alone (with the clipping), ms.",
        ["opt.step() alone: bare", CLIP, "wrapped"],
        lambda r: [spread(r["optimizer_step"][m], 1e3) for m in ("bare", CLIP, "wrapped")],
    )
    lines += [
        "",
        "Memory: bytes of tensors held, relative to the parameter bytes; peak RSS growth over "
        f"{args.warmup} steps in a fresh process (probe: the first step probes, from the gradient).",
        "",
        "| params | tensors | optimizer | parameters (MiB) | base optimizer state / params "
        "| extra buffers / params: wrapped | probe | peak RSS Δ (MiB): bare | wrapped | probe |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rss = r.get("peak_rss_delta_bytes") or {}
        cells = [f"{rss[m] / 2**20:.1f}" if rss.get(m) is not None else "n/a" for m in METHODS]
        ratios = [
            r[key] / r["parameter_bytes"]
            for key in ("base_state_bytes", "wrapper_bytes", "probe_wrapper_bytes")
        ]
        lines.append(
            f"| {format_size(r['parameters'])} | {r['tensors']} | {OPTIMIZER_NAMES[r['optimizer']]} "
            f"| {r['parameter_bytes'] / 2**20:.2f} | {' | '.join(f'{x:.2f}' for x in ratios)} "
            f"| {' | '.join(cells)} |"
        )
    return "\n".join(lines)


def _comparison(
    results: list[dict],
    method: str,
    caption: str,
    headers: list[str],
    cells: Callable[[dict], list[str]],
) -> list[str]:
    """A table of `method`'s and the wrapper's training-step ratios to bare, and `cells`,
    for the configurations that timed `method` (none: no lines)."""
    rows = [r for r in results if method in r["training_step"]]
    if not rows:
        return []
    lines = [
        "",
        caption,
        "",
        f"| params | tensors | optimizer | training step: {method} / bare | wrapped / bare | "
        + " | ".join(headers)
        + " |",
        "|---:|---:|---|---:|---:|" + "---:|" * len(headers),
    ]
    for r in rows:
        m = r["training_step"]
        lines.append(
            f"| {format_size(r['parameters'])} | {r['tensors']} | {OPTIMIZER_NAMES[r['optimizer']]} "
            f"| {spread(m[f'{method}_ratio'], digits=3)} | {spread(m['wrapped_ratio'], digits=3)} | "
            + " | ".join(cells(r))
            + " |"
        )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument(
        "--depths", type=int, nargs="+", default=[DEPTH], help="Linear layers (2 tensors each) per model"
    )
    parser.add_argument("--optimizers", choices=sorted(OPTIMIZERS), nargs="+", default=["sgd", "adam"])
    parser.add_argument(
        "--probe-every", type=int, default=100, help="curvature_probe_every of the probe mode"
    )
    parser.add_argument(
        "--probe-solver", choices=PROBE_SOLVERS, default="power", help="probe_solver of the probe mode"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--large-repeats", type=int, default=5, help="repeats above 1M parameters")
    parser.add_argument("--steps", type=int, default=100, help="steps per repeat")
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: 64 below 1M parameters, 256 from 1M"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS probes (one process each)")
    parser.add_argument(
        "--control",
        action="store_true",
        help=f"also time {CONTROL}, a second bare copy, and split steps into forward/backward and step",
    )
    parser.add_argument(
        "--clip",
        action="store_true",
        help=f"also time {CLIP}: the bare optimizer with clip_grad_norm_ before each step",
    )
    parser.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush denormal floats to zero (see the module docstring)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results")
    args = parser.parse_args(argv)
    for name in (
        "threads",
        "repeats",
        "large_repeats",
        "steps",
        "warmup",
        "probe_every",
        "batch_size",
        "depths",
    ):
        value = getattr(args, name)
        if value is not None and min(value if isinstance(value, list) else [value]) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    # Before the first parallel region: the intra-op threads, created then, inherit it.
    flushed = not args.keep_denormals and torch.set_flush_denormal(True)
    try:
        run(args, device, flushed, argv)
    finally:
        if flushed:
            torch.set_flush_denormal(False)  # back to torch's default for the rest of the process


def run(args: argparse.Namespace, device: torch.device, flushed: bool, argv: Sequence[str] | None) -> None:
    torch.set_num_threads(args.threads)
    if hasattr(os, "sched_setaffinity"):
        # Pin the process (and the RSS probes it spawns) to the first --threads CPUs.
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))
    load_before = os.getloadavg()
    start = time.perf_counter()
    results = []
    for size in args.sizes:
        for depth in args.depths:
            for optimizer in args.optimizers:
                print(
                    f"timing {format_size(size)} depth {depth} {optimizer} ...", file=sys.stderr, flush=True
                )
                results.append(measure_config(size, depth, optimizer, args, device))
    if not args.no_rss and device.type == "cpu":
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            for r in results:
                probe_args = {
                    "threads": args.threads,
                    "seed": args.seed,
                    "warmup": args.warmup,
                    "batch_size": r["batch_size"],
                    "probe_solver": args.probe_solver,
                }
                print(f"peak RSS {format_size(r['size'])} {r['optimizer']} ...", file=sys.stderr, flush=True)
                r["peak_rss_delta_bytes"] = {
                    m: pool.apply(rss_probe, (r["size"], r["depth"], r["optimizer"], m, probe_args))
                    for m in METHODS
                }
    seconds = time.perf_counter() - start
    tables = format_tables(results, args)
    command = command_line("overhead.py", argv)
    print(tables)
    print()
    print(
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} thread(s), device {device}, denormals "
        f"{'flushed to zero' if flushed else 'kept'}. Command: `{command}`. Wall time: {seconds:.0f} s. "
        f"Load average (1 min) before/after: {load_before[0]:.2f}/{os.getloadavg()[0]:.2f}."
    )
    payload = {
        "machine": machine_info(args.threads, device, flushed),
        "command": command,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "wall_seconds": seconds,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
        "markdown": tables,
    }
    write_json(args.output, payload)


if __name__ == "__main__":
    main()
