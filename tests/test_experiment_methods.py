"""The method registry and the runner's hooks: every method trains, schedule-free methods
are evaluated in eval mode, the plateau scheduler sees the epoch loss, the gradient hook
runs between backward and the update, and clipping methods bound the gradient norm."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from experiments.config import RunSpec
from experiments.methods import CLIP_NORM, METHODS, Setup
from experiments.runner import run_one, train_step
from experiments.tasks import TASKS, Problem, Task

TINY_TASK = "tiny_regression"
STEPS_PER_EPOCH = 3
Probe = Callable[[str], None]


def _tiny_problem(seed: int, probe: Probe = lambda event: None) -> Problem:
    """A 4-8-2 tanh regression on 12 points, 3 minibatches per epoch; ``probe`` is told of
    every minibatch loss and every evaluation."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(12, 4, generator=generator)
    targets = torch.randn(12, 2, generator=generator)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    def epoch_batches() -> Iterator[Tensor]:
        yield from torch.randperm(12, generator=generator).split(12 // STEPS_PER_EPOCH)

    def batch_loss(batch: Tensor) -> Tensor:
        probe("batch_loss")
        return F.mse_loss(model(inputs[batch]), targets[batch])

    def full_loss() -> float:
        with torch.no_grad():
            return F.mse_loss(model(inputs), targets).item()

    def training_loss() -> float:
        probe("training_loss")
        return full_loss()

    def heldout_metric() -> float:
        probe("heldout_metric")
        return full_loss()

    return Problem(model, STEPS_PER_EPOCH, epoch_batches, batch_loss, training_loss, heldout_metric)


def _register_tiny_task(
    monkeypatch: pytest.MonkeyPatch, problems: list[Problem], probe: Probe = lambda event: None
) -> None:
    def build(seed: int) -> Problem:
        problems.append(_tiny_problem(seed, probe))
        return problems[-1]

    monkeypatch.setitem(TASKS, TINY_TASK, Task(TINY_TASK, "tiny regression", 0.0, "mse", False, build))


def _capture_setups(
    monkeypatch: pytest.MonkeyPatch, name: str, setups: list[Setup], instrument: Callable[[Setup], None]
) -> None:
    """Replace the method's builder by one that records (and instruments) every Setup."""
    method = METHODS[name]

    def build(*args: Any, **kwargs: Any) -> Setup:
        setup = method.build(*args, **kwargs)
        instrument(setup)
        setups.append(setup)
        return setup

    monkeypatch.setitem(METHODS, name, dataclasses.replace(method, build=build))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_takes_three_steps_with_finite_parameters(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    problems: list[Problem] = []
    _register_tiny_task(monkeypatch, problems)
    assert METHODS[name].missing_requirement() is None
    record = run_one(RunSpec(TINY_TASK, name, 0.01, 0, 1))
    assert record["status"] == "ok"
    assert record["steps"] == STEPS_PER_EPOCH
    assert record["diverged"] is False
    assert all(torch.isfinite(p).all() for p in problems[0].model.parameters())


def test_every_method_has_a_one_line_description() -> None:
    assert all(method.description and "\n" not in method.description for method in METHODS.values())


@pytest.mark.parametrize("name", ["schedule_free_sgd", "schedule_free_adamw"])
def test_schedule_free_methods_are_evaluated_in_eval_mode_and_trained_in_train_mode(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    setups: list[Setup] = []

    def probe(event: str) -> None:
        calls.append(event)
        train_mode = setups[0].optimizer.param_groups[0]["train_mode"]
        assert train_mode is (event == "batch_loss"), f"{event} in train_mode={train_mode}"

    def spy_on_modes(setup: Setup) -> None:
        for mode in ("eval", "train"):
            original = getattr(setup.optimizer, mode)

            def spy(original: Callable[[], None] = original, mode: str = mode) -> None:
                calls.append(mode)
                original()

            setattr(setup.optimizer, mode, spy)

    _register_tiny_task(monkeypatch, [], probe)
    _capture_setups(monkeypatch, name, setups, spy_on_modes)
    run_one(RunSpec(TINY_TASK, name, 0.01, 0, 1))
    evaluate = ["eval", "training_loss", "train"]
    assert calls == [
        *evaluate,
        *["batch_loss"] * STEPS_PER_EPOCH,
        *evaluate,
        "eval",
        "heldout_metric",
        "train",
    ]


def test_plateau_scheduler_is_stepped_once_per_epoch_with_the_epoch_training_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics: list[float] = []

    def spy_on_plateau(setup: Setup) -> None:
        assert setup.epoch_scheduler is not None
        original = setup.epoch_scheduler.step

        def step(metric: float) -> None:
            metrics.append(metric)
            original(metric)

        setup.epoch_scheduler.step = step  # type: ignore[method-assign]

    _register_tiny_task(monkeypatch, [])
    _capture_setups(monkeypatch, "sgd_plateau", [], spy_on_plateau)
    record = run_one(RunSpec(TINY_TASK, "sgd_plateau", 0.01, 0, 4))
    assert metrics == record["loss_curve"][1:]
    assert len(metrics) == 4


def test_gradient_hook_runs_after_backward_and_before_the_optimizer_update() -> None:
    problem = _tiny_problem(0)
    params = list(problem.model.parameters())
    events: list[str] = []
    params[0].register_hook(lambda grad: events.append("backward"))

    def hook() -> None:
        events.append("gradient_hook")
        assert all(p.grad is not None for p in params)
        assert all(torch.equal(p, before) for p, before in zip(params, snapshot, strict=True))

    setup = Setup(torch.optim.SGD(params, lr=0.1), gradient_hook=hook)
    setup.optimizer.register_step_post_hook(lambda *_: events.append("update done"))
    for batch in problem.epoch_batches():
        snapshot = [p.detach().clone() for p in params]
        train_step(setup, functools.partial(problem.batch_loss, batch))
    assert events == ["backward", "gradient_hook", "update done"] * STEPS_PER_EPOCH
    assert not all(torch.equal(p, before) for p, before in zip(params, snapshot, strict=True))


def _global_grad_norm(params: list[Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()


def _fixed_bound(norms_before_clipping: list[float]) -> float:
    return CLIP_NORM


def _autoclip_bound(norms_before_clipping: list[float]) -> float:
    # AutoClip (the autoclip package): the 10th percentile of the previous steps' norms.
    previous = norms_before_clipping[:-1]
    return torch.quantile(torch.tensor(previous), 0.1).item() if previous else float("inf")


@pytest.mark.parametrize(
    ("name", "bound"),
    [
        ("sgd_clip", _fixed_bound),
        ("sgd_clip_cosine", _fixed_bound),
        ("autoclip", _autoclip_bound),
    ],
)
def test_clip_methods_keep_the_gradient_norm_at_step_time_within_the_clip_value(
    name: str, bound: Callable[[list[float]], float]
) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    params = list(model.parameters())
    setup = METHODS[name].build(params, 0.01, total_steps=40, callback=lambda record: None)
    assert setup.gradient_hook is not None
    clip = setup.gradient_hook
    before: list[float] = []
    at_step: list[tuple[float, float]] = []

    def measured_hook() -> None:
        before.append(_global_grad_norm(params))
        clip()

    setup.gradient_hook = measured_hook
    # SGD leaves p.grad untouched, so after the update it is the gradient the step used.
    setup.optimizer.register_step_post_hook(
        lambda *_: at_step.append((_global_grad_norm(params), bound(before)))
    )
    for step in range(40):
        scale = 10.0 ** (step % 4)  # norms spanning three decades, most well above 1
        inputs = scale * torch.randn(8, 4)
        train_step(setup, lambda inputs=inputs: model(inputs).square().mean())
    assert max(before) > 10 * CLIP_NORM
    assert all(norm <= limit * (1 + 1e-5) for norm, limit in at_step)
    assert sum(norm < before_norm * 0.99 for (norm, _), before_norm in zip(at_step, before, strict=True)) > 10


def test_zclip_clips_a_gradient_spike_after_its_warmup() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    params = list(model.parameters())
    setup = METHODS["zclip"].build(params, 0.001, total_steps=31, callback=lambda record: None)
    norms: list[float] = []
    setup.optimizer.register_step_post_hook(lambda *_: norms.append(_global_grad_norm(params)))
    for step in range(31):
        scale = 1000.0 if step == 30 else 1.0
        inputs = scale * torch.randn(8, 4)
        train_step(setup, lambda inputs=inputs: model(inputs).square().mean())
    typical = sorted(norms[:30])[15]
    assert norms[-1] < 10 * typical
