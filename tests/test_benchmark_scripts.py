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
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("one_thread")
def test_probe_warm_start_sets_each_probe_beside_lanczos_at_the_same_point(tmp_path: Path) -> None:
    output = tmp_path / "warm.json"
    argv = ["--size", "2k", "--optimizers", "sgd", "--steps", "12", "--probe-every", "4"]
    argv += ["--batches", "3", "--reference-hvps", "12", "--threads", "1", "--output", str(output)]
    assert _load("probe_warm_start").main(argv) == 0
    payload = json.loads(output.read_text())
    assert [(r["optimizer"], r["data"], r["driver"]) for r in payload["results"]] == [
        ("sgd", data, driver) for data in ("fixed", "pool") for driver in ("power", "krylov")
    ]
    for result in payload["results"]:
        assert [p["step"] for p in result["probes"]] == [0, 4, 8]
        assert result["warm_probes"] == 2
        for probe in result["probes"]:
            assert set(probe["readings"]) == {"power", "krylov"}  # both read at the same point
        for probe in result["probes"][1:]:  # warm: one to probe_iterations products
            for reading in probe["readings"].values():
                assert reading["products"] in (1, 2, 3) and reading["estimate"] is not None
        assert result["probes"][0]["readings"][result["driver"]]["products"] > 0
        assert set(result["solvers"]) == {"power", "krylov"}
    assert payload["markdown"].count("\n| SGD(momentum=0.9) |") == 8


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("solver", ["power", "krylov"])
def test_a_shadow_probe_reads_what_the_wrapper_probe_of_that_solver_reads(solver: str) -> None:
    """The side probe mirrors the wrapper's: cold from the gradient with twice the
    products, then carried on from its own vector and its last finite estimate."""
    warm_start = _load("probe_warm_start")
    model, opt, inputs, labels = _load("overhead").build(
        2000, 2, "sgd", "probe", 8, torch.device("cpu"), seed=0, probe_every=1, probe_solver=solver
    )
    params = list(model.parameters())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    carried: dict = {}
    for _ in range(3):
        closure()
        shadow = warm_start.shadow_probe(solver, closure, params, opt.options, carried)
        opt.step(closure)
        assert shadow.eigenvalue == opt.history[-1].sharpness


def test_probe_warm_start_pool_is_labelled_by_one_teacher_and_the_fixed_data_is_the_batch() -> None:
    warm_start = _load("probe_warm_start")
    inputs, labels = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    (fixed,) = warm_start.batches(inputs, labels, "fixed", 5, seed=0)
    assert fixed[0] is inputs and fixed[1] is labels
    pool = warm_start.batches(inputs, labels, "pool", 5, seed=0)
    again = warm_start.batches(inputs, labels, "pool", 5, seed=0)
    assert len(pool) == 5 and all(x.shape == (warm_start.BATCH, 6) for x, _ in pool)
    assert all(
        torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(pool, again, strict=True)
    )
    # One linear teacher labels every batch: a least-squares linear fit of all of them
    # recovers most labels (0.86 here), where it recovers few of random labels.
    stacked = torch.cat([x for x, _ in pool])
    targets = torch.cat([y for _, y in pool])
    assert int(targets.max()) < warm_start.TEACHER_CLASSES and len(set(targets.tolist())) > 1

    def linear_fit_accuracy(y: torch.Tensor) -> float:
        one_hot = torch.nn.functional.one_hot(y, warm_start.TEACHER_CLASSES).float()
        solution = torch.linalg.lstsq(stacked, one_hot).solution
        return (stacked @ solution).argmax(dim=1).eq(y).float().mean().item()

    shuffled = targets[torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))]
    assert linear_fit_accuracy(targets) > 0.7 > 0.4 > linear_fit_accuracy(shuffled)


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
        in_step = ("inner optimizer step", "the rest", "whole step (timed)")
        expected |= {f"in the step: {name}" for name in in_step}
        assert expected <= set(phases)
        assert all(t["min"] <= t["median"] <= t["max"] and t["min"] > 0 for t in phases.values())
    assert payload["markdown"].count("\n| ") == len(payload["results"][0]["phases"]) + 1


@pytest.mark.usefixtures("one_thread")
def test_step_phases_times_each_call_inside_the_step_and_then_undoes_its_timers() -> None:
    import torch

    import adaptive_lr
    from adaptive_lr import controller, signals, wrapper

    step_phases = _load("step_phases")
    model = torch.nn.Linear(8, 3)
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    originals = (wrapper.measure, controller.decide, signals.GradientView.__dict__["collect"])

    def step() -> None:
        opt.zero_grad()
        model(torch.ones(2, 8)).sum().backward()
        opt.step()

    spent: Counter[str] = Counter()
    with step_phases._timers(opt, spent):
        for _ in range(3):
            step()
    # the calls the step makes were timed
    assert {"measure (one host sync)", "controller rule", "inner optimizer step", "record"} <= set(spent)
    assert all(seconds > 0 for seconds in spent.values())
    # nothing is left patched: the same objects, no instance attributes over the methods
    assert (wrapper.measure, controller.decide, signals.GradientView.__dict__["collect"]) == originals
    assert "step" not in vars(opt.optimizer) and "_record" not in vars(opt)
    assert "prepare" not in vars(opt._trajectory)
    spent.clear()
    step()
    assert not spent


@pytest.fixture
def kept_affinity() -> Iterator[None]:
    """overhead.py pins its process to --threads CPUs; give the test process its CPUs back."""
    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    yield
    if saved is not None:
        os.sched_setaffinity(0, saved)


@pytest.mark.usefixtures("one_thread", "kept_affinity")
def test_overhead_clip_times_clip_grad_norm_before_each_bare_step(tmp_path: Path, capsys) -> None:
    overhead = _load("overhead")
    output = tmp_path / "overhead.json"
    argv = ["--sizes", "2k", "--optimizers", "sgd", "--repeats", "2", "--steps", "2", "--warmup", "1"]
    clipped = []
    original = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *args, **kwargs):  # records the norm the reference clips to
        clipped.append(max_norm)
        return original(params, max_norm, *args, **kwargs)

    with mock.patch.object(torch.nn.utils, "clip_grad_norm_", clip):
        overhead.main([*argv, "--probe-every", "3", "--no-rss", "--clip", "--output", str(output)])
    (result,) = json.loads(output.read_text())["results"]
    # warm-up 1, then 2 repeats of 2 steps: one clip per step of the reference, none elsewhere
    assert clipped == [1.0] * 5
    assert result["training_step"]["clip_ratio"]["median"] > 0
    assert result["optimizer_step"]["clip"]["min"] > 0
    assert "| training step: clip / bare |" in capsys.readouterr().out


def test_clipped_steps_clip_the_gradients_global_norm_before_the_step() -> None:
    overhead = _load("overhead")
    weight = torch.nn.Parameter(torch.zeros(2))
    opt = overhead.ClippedSteps(torch.optim.SGD([weight], lr=1.0), max_norm=1.0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (weight * torch.tensor([3.0, 4.0])).sum()  # gradient (3, 4), norm 5
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(weight.detach(), torch.tensor([-0.6, -0.8]))


@pytest.mark.usefixtures("one_thread", "kept_affinity")
def test_overhead_control_times_a_second_bare_copy_and_splits_the_steps(tmp_path: Path, capsys) -> None:
    output = tmp_path / "overhead.json"
    argv = ["--sizes", "2k", "--optimizers", "sgd", "--repeats", "2", "--steps", "2", "--warmup", "1"]
    _load("overhead").main([*argv, "--no-rss", "--control", "--output", str(output)])
    (result,) = json.loads(output.read_text())["results"]
    assert result["training_step"]["bare_twin_ratio"]["median"] > 0
    assert set(result["forward_backward"]) == {"bare", "wrapped", "bare_twin"}
    assert set(result["denormal_softmax_fraction"]) == {"bare", "wrapped", "bare_twin"}
    assert all(0.0 <= f <= 1.0 for f in result["denormal_softmax_fraction"].values())
    for method, summary in result["forward_backward"].items():  # a part of its training step
        assert summary["min"] > 0 and summary["max"] < result["training_step"][method]["max"]
    assert "| training step: bare_twin / bare |" in capsys.readouterr().out


@pytest.mark.usefixtures("one_thread", "kept_affinity")
@pytest.mark.parametrize("keep", [False, True])
def test_overhead_flushes_denormals_only_while_it_runs_unless_told_to_keep_them(tmp_path: Path, keep) -> None:
    output = tmp_path / "overhead.json"
    flushed_inside = []
    original = torch.optim.SGD.step

    def step(self, *args, **kwargs):  # records whether a denormal survives a product mid-run
        flushed_inside.append((torch.tensor(1e-39) * torch.tensor(1.0)).item() == 0.0)
        return original(self, *args, **kwargs)

    argv = ["--sizes", "2k", "--optimizers", "sgd", "--repeats", "2", "--steps", "2", "--warmup", "1"]
    with mock.patch.object(torch.optim.SGD, "step", step):
        _load("overhead").main(
            [*argv, "--no-rss", *(["--keep-denormals"] if keep else []), "--output", str(output)]
        )
    assert json.loads(output.read_text())["machine"]["flush_denormal"] is (not keep)
    assert flushed_inside and all(f is (not keep) for f in flushed_inside)
    assert (torch.tensor(1e-39) * torch.tensor(1.0)).item() != 0.0  # the process is left as it was


def test_denormal_softmax_fraction_counts_the_probabilities_float32_holds_as_denormals() -> None:
    overhead = _load("overhead")
    model = torch.nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[92.0, 0.0], [0.0, 0.0], [1.0, 0.0], [-200.0, 0.0]]))
    # logits (92, 0, 1, -200): probabilities 1, e^-92 ~ 1e-40 and e^-91 ~ 3e-40 (denormal
    # in float32, whose smallest normal is 1.2e-38) and e^-292 (a zero in float32).
    assert overhead.denormal_softmax_fraction(model, torch.tensor([[1.0, 0.0]])) == 0.5
    assert overhead.denormal_softmax_fraction(model, torch.tensor([[0.0, 1.0]])) == 0.0


@pytest.mark.usefixtures("one_thread")
def test_a_window_of_k_steps_of_the_probe_mode_holds_exactly_one_probing_step() -> None:
    overhead = _load("overhead")
    cpu = torch.device("cpu")
    model, opt, inputs, labels = overhead.build(2000, 2, "sgd", "probe", 8, cpu, seed=0, probe_every=4)
    first = overhead.run_steps(model, opt, inputs, labels, 3, cpu)  # steps 0-2: the cold probe at 0
    assert first.closure_calls[0] > 1 and first.closure_calls[1:] == [1, 1]
    for _ in range(3):  # any 4 consecutive steps hold one multiple of 4
        window = overhead.run_steps(model, opt, inputs, labels, 4, cpu)
        probing = [c for c in window.closure_calls if c > 1]
        assert len(probing) == 1 and probing[0] % 2 == 1  # the step's call, then two per product
        training, optimizer_only = window.means()
        assert 0 < optimizer_only < training
        assert all(f < t for f, t in zip(window.first_call, window.training, strict=True))


@pytest.mark.usefixtures("one_thread")
def test_the_probe_mode_runs_the_probe_solver_it_is_given() -> None:
    overhead = _load("overhead")
    cpu = torch.device("cpu")
    for solver in ("power", "krylov"):
        model, opt, inputs, labels = overhead.build(
            2000, 2, "sgd", "probe", 8, cpu, seed=0, probe_every=4, probe_solver=solver
        )
        assert opt.options.probe_solver == solver and opt.options.curvature_probe_every == 4
        steps = overhead.run_steps(model, opt, inputs, labels, 1, cpu)
        assert steps.closure_calls[0] > 1 and opt.history[-1].sharpness is not None
    with pytest.raises(SystemExit):
        overhead.parse_args(["--probe-solver", "lanczos"])


@pytest.mark.usefixtures("one_thread", "kept_affinity")
def test_overhead_reports_ratios_and_memory_for_every_configuration(tmp_path: Path) -> None:
    output = tmp_path / "overhead.json"
    argv = ["--sizes", "2k", "--optimizers", "sgd", "adamw", "--repeats", "2", "--steps", "2"]
    _load("overhead").main(
        [*argv, "--warmup", "1", "--probe-every", "5", "--no-rss", "--output", str(output)]
    )
    payload = json.loads(output.read_text())
    assert [r["optimizer"] for r in payload["results"]] == ["sgd", "adamw"]
    for result in payload["results"]:
        for measured in ("training_step", "optimizer_step"):
            ratios = result[measured]
            assert ratios["wrapped_ratio"]["median"] > 0 and ratios["probe_ratio"]["median"] > 0
            # The probing step is one of its window's steps, which the window's mean spreads.
            assert ratios["probing_step"]["max"] > ratios["probe"]["min"]
        assert result["wrapper_bytes"] > 0 and result["probe_wrapper_bytes"] > result["wrapper_bytes"]
        assert 1 <= result["probe_products"]["min"] <= result["probe_products"]["max"] <= 3
