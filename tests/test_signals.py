"""The measured signals: secant curvature, gradient cosine, norms, and their cost."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import adaptive_lr
from adaptive_lr import ControllerOptions, signals
from adaptive_lr.signals import GradientView, SampleLayout, Trajectory, measure, squared_norms


def quadratic(eigenvalues: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(eigenvalues) @ q.T
    x = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
    return a, x


def run_gd(a, x, lr, steps, **options):
    opt = adaptive_lr.wrap(torch.optim.SGD([x], lr=lr), ControllerOptions.all_off(**options))
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * x @ a @ x).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("seed", range(5))
def test_squared_norms_are_per_tensor_and_in_order_across_the_dot_and_foreach_paths(seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(70_000, generator=generator),  # large float32: torch.dot
        torch.randn(5, generator=generator),  # small: foreach norm
        torch.randn(300, 200, generator=generator).t(),  # large but not contiguous: foreach
        torch.randn(40_000, generator=generator, dtype=torch.float64),  # large float64: torch.dot
        torch.randn(50_000, generator=generator).to(torch.bfloat16),  # half precision: foreach
    ]
    exact = [float((t.double() ** 2).sum()) for t in tensors]
    got = squared_norms(tensors).tolist()
    # float32 accumulation of positive terms; the bfloat16 norm comes rounded to bfloat16
    # (as in clip_grad_norm_), squared: 2 x 2^-8.
    assert got[:4] == pytest.approx(exact[:4], rel=1e-5)
    assert got[4] == pytest.approx(exact[4], rel=2**-7)
    unordered = squared_norms(tensors, ordered=False)
    assert sorted(unordered.tolist()) == sorted(got)
    assert squared_norms(tensors[:1] + tensors[3:4]).tolist() == pytest.approx(
        exact[:1] + exact[3:4], rel=1e-5
    )


def test_gradient_norm_over_parameters_of_mixed_float_dtypes_matches_float64_within_their_rounding():
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    params = [nn.Parameter(torch.zeros(5, dtype=dtype)) for dtype in dtypes]
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(5, generator=g).to(p.dtype)
    opt = adaptive_lr.wrap(torch.optim.SGD(params, lr=0.1))
    opt.step()
    exact = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
    # Each tensor's norm comes in its own dtype, as in clip_grad_norm_: float16's 2^-11.
    assert opt.history[-1].grad_norm == pytest.approx(exact, rel=2**-10)


def test_grad_norm_and_group_norms_match_torch_clip_grad_norm():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    model(torch.randn(5, 4)).pow(2).sum().backward()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[1].parameters())}]
    view, trajectory = GradientView.collect(groups), Trajectory(SampleLayout(1.0, 1))
    signals, group_norms = measure(view, trajectory, trajectory.prepare(view), None)
    total = nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
    assert signals.grad_norm == pytest.approx(total, rel=1e-6)
    assert math.hypot(*group_norms) == pytest.approx(total, rel=1e-6)
    first = nn.utils.clip_grad_norm_(model[0].parameters(), float("inf")).item()
    assert group_norms[0] == pytest.approx(first, rel=1e-6)


def test_secant_curvature_is_exact_along_the_step_on_a_quadratic():
    """For f = x'Ax/2 and gradient descent, <g_{t-1} - g_t, d>/||d||^2 = d'Ad/d'd exactly."""
    a, x = quadratic(torch.logspace(-1, 1, 10, dtype=torch.float64))
    lr = 0.05
    before = x.detach().clone()
    opt = run_gd(a, x, lr, 2)
    step = before - (before - lr * (a @ before))  # the first descent step d
    rayleigh = (step @ a @ step / (step @ step)).item()
    assert opt.history[0].curvature is None  # no step taken yet: no secant
    assert opt.history[1].curvature == pytest.approx(rayleigh, rel=1e-10)


def test_grad_cosine_equals_the_successive_gradient_cosine_for_plain_sgd():
    a, x = quadratic(torch.logspace(-1, 1, 10, dtype=torch.float64))
    g0 = (a @ x).detach()
    g1 = (a @ (x.detach() - 0.3 * g0)).detach()
    opt = run_gd(a, x, 0.3, 2)
    expected = (g0 @ g1 / (g0.norm() * g1.norm())).item()
    assert opt.history[-1].grad_cosine == pytest.approx(expected, rel=1e-10)


@given(
    top=st.floats(1.0, 100.0),
    spread=st.floats(1.0, 1e3),
    lr_fraction=st.floats(0.05, 1.9),
    seed=st.integers(0, 100),
)
def test_secant_curvature_lies_within_the_spectrum_of_a_quadratic(top, spread, lr_fraction, seed):
    eigenvalues = torch.logspace(math.log10(top / spread), math.log10(top), 8, dtype=torch.float64)
    a, x = quadratic(eigenvalues, seed)
    reference = _curvature_samples(a, x.detach().clone(), lr_fraction / top)
    opt = run_gd(a, x, lr_fraction / top, 6, curvature_decay=0.0)  # no smoothing: raw samples
    samples = [r.curvature for r in opt.history][1:]
    lowest, highest = eigenvalues.min().item(), eigenvalues.max().item()
    assert all(lowest * (1 - 1e-9) <= s <= highest * (1 + 1e-9) for s in samples)
    assert samples == pytest.approx(reference[:5], rel=1e-8)


def _curvature_samples(a, start, lr, steps=6):
    """Independent reference: the Rayleigh quotient of each gradient-descent step."""
    x, samples = start, []
    for _ in range(steps):
        step = lr * (a @ x)
        samples.append((step @ a @ step / (step @ step)).item())
        x = x - step
    return samples


def test_secant_curvature_finds_the_top_eigenvalue_once_the_lr_is_unstable():
    """Beyond the stability bound the top mode grows, the steps align with it, and the
    secant estimate reads lambda_max: instability reveals itself to the governor."""
    eigenvalues = torch.logspace(-1, 1, 20, dtype=torch.float64)
    a, x = quadratic(eigenvalues)
    opt = adaptive_lr.wrap(
        torch.optim.SGD([x], lr=2.2 / 10.0), ControllerOptions.all_off(curvature_decay=0.0)
    )
    for _ in range(60):
        opt.zero_grad()
        (0.5 * x @ a @ x).backward()
        opt.step()
    assert opt._controller_state.curvature == pytest.approx(10.0, rel=1e-2)


def test_governor_on_stops_the_divergence_that_the_unstable_lr_causes():
    eigenvalues = torch.logspace(-1, 1, 20, dtype=torch.float64)
    a, x = quadratic(eigenvalues)
    f0 = (0.5 * x @ a @ x).item()
    opt = adaptive_lr.wrap(torch.optim.SGD([x], lr=3.0 / 10.0))
    for _ in range(200):
        opt.zero_grad()
        (0.5 * x @ a @ x).backward()
        opt.step()
    assert (0.5 * x @ a @ x).item() < 1e-3 * f0
    lr_used = opt.history[-1].lr
    assert lr_used * 10.0 < 2.0  # inside the plain-GD stability bound


def test_each_step_makes_exactly_one_host_sync_after_the_first(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    x = torch.randn(16, 4)

    def step():
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    step()
    step()
    calls = []
    original_tolist, original_item = torch.Tensor.tolist, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append("tolist") or original_tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append("item") or original_item(t))
    for _ in range(3):
        step()
    assert calls == ["tolist"] * 3


@given(position=st.integers(0, 10_000), numel=st.integers(1, 10**7), fraction=st.floats(1e-4, 1.0))
def test_sampled_block_lies_inside_the_tensor_and_covers_small_tensors_whole(position, numel, fraction):
    layout = SampleLayout(fraction=fraction, min_size=4096)
    offset, length = layout.block(position, numel)
    assert offset >= 0 and offset + length <= numel
    assert length == min(numel, max(4096, math.ceil(fraction * numel)))
    assert layout.block(position, numel) == (offset, length)  # a function of its arguments


def test_sampled_signals_estimate_the_exact_ones_on_a_large_quadratic():
    """Default sampling (1/16 of each large tensor) against every coordinate, same run."""
    g = torch.Generator().manual_seed(0)
    curvatures = torch.rand(3, 100_000, generator=g, dtype=torch.float64) * 9 + 1
    start = torch.randn(3, 100_000, generator=g, dtype=torch.float64)

    def run(fraction):
        x = nn.Parameter(start.clone())
        opt = adaptive_lr.wrap(
            torch.optim.SGD([x], lr=0.15, momentum=0.5),
            ControllerOptions.all_off(sample_fraction=fraction, curvature_decay=0.0),
        )
        for _ in range(8):
            opt.zero_grad()
            (0.5 * (curvatures * x * x).sum()).backward()
            opt.step()
        return opt.history

    exact, sampled = run(1.0), run(1 / 16)
    for a, b in list(zip(exact, sampled, strict=True))[1:]:
        assert b.curvature == pytest.approx(a.curvature, rel=0.05)
        assert b.grad_cosine == pytest.approx(a.grad_cosine, abs=0.02)
        assert b.grad_norm == a.grad_norm  # the norm is always exact


def test_descent_buffers_hold_only_the_sample():
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 8))
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    model(torch.randn(4, 512)).sum().backward()
    opt.step()
    held = {p: b.numel() for p, b in opt._trajectory.descent.items()}
    assert held[model[0].weight] == math.ceil(512 * 512 / 16)
    assert held[model[0].bias] == 512  # small tensors whole
    assert sum(held.values()) < 0.1 * sum(p.numel() for p in model.parameters())
    # Two runs of equal weights (the whole bias, the sampled weight): the weights are
    # scalars and d is all it keeps (the sampled gradient is a copy made each step).
    assert sum(t.numel() for t in opt._trajectory.held_tensors()) == sum(held.values())
    small = nn.Linear(16, 4)
    small_opt = adaptive_lr.wrap(torch.optim.SGD(small.parameters(), lr=0.01))
    small(torch.randn(2, 16)).sum().backward()
    small_opt.step()
    assert sum(t.numel() for t in small_opt._trajectory.held_tensors()) == 16 * 4 + 4


def test_successive_gradient_cosine_is_reported_when_tracked_and_matches_the_gradients():
    a, x = quadratic(torch.logspace(-1, 1, 10, dtype=torch.float64))
    opt = adaptive_lr.wrap(
        torch.optim.SGD([x], lr=0.05, momentum=0.9),
        ControllerOptions.all_off(track_successive_cosine=True),
    )
    grads = []
    for _ in range(4):
        opt.zero_grad()
        (0.5 * x @ a @ x).backward()
        grads.append(x.grad.detach().clone())
        opt.step()
    for t in range(2, 4):
        g0, g1 = grads[t - 1], grads[t]
        expected = (g0 @ g1 / (g0.norm() * g1.norm())).item()
        assert opt.history[t].successive_grad_cosine == pytest.approx(expected, rel=1e-10)


def test_successive_gradient_cosine_costs_no_buffer_by_default():
    a, x = quadratic(torch.logspace(-1, 1, 10, dtype=torch.float64))
    opt = run_gd(a, x, 0.05, 3)
    assert not opt._trajectory.last_grad
    assert all(r.successive_grad_cosine is None for r in opt.history)


def _secant_history(params, loss_fn, steps=3, **options):
    opt = adaptive_lr.wrap(
        torch.optim.SGD(params, lr=0.05),
        ControllerOptions.all_off(sample_fraction=1.0, min_sample_size=1, **options),
    )
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return opt.history


def test_secant_signals_of_a_channels_last_model_equal_those_of_its_contiguous_copy():
    torch.manual_seed(0)
    contiguous = nn.Conv2d(3, 8, 3)
    channels_last = nn.Conv2d(3, 8, 3)
    channels_last.load_state_dict(contiguous.state_dict())
    channels_last.to(memory_format=torch.channels_last)
    assert not channels_last.weight.is_contiguous()
    images = torch.randn(4, 3, 8, 8)

    def history(model):
        return _secant_history(list(model.parameters()), lambda: model(images).pow(2).mean())

    expected, got = history(contiguous), history(channels_last)
    for a, b in list(zip(expected, got, strict=True))[1:]:
        assert b.curvature is not None and b.curvature > 0.0
        assert b.curvature == pytest.approx(a.curvature, rel=1e-5)
        assert b.grad_cosine == pytest.approx(a.grad_cosine, rel=1e-5)


def test_secant_curvature_is_exact_over_parameters_of_float32_and_float64():
    """Two working dtypes: two flat segments, whose sums add up to the exact secant."""
    eigenvalues = torch.logspace(-1, 1, 10, dtype=torch.float64)
    a, x = quadratic(eigenvalues)
    x32 = nn.Parameter(x.detach()[:4].float().clone())
    x64 = nn.Parameter(x.detach()[4:].clone())

    def loss():
        joined = torch.cat([x32.double(), x64])
        return 0.5 * joined @ a @ joined

    start = torch.cat([x32.detach().double(), x64.detach()])
    history = _secant_history([x32, x64], loss, steps=2)
    step = 0.05 * (a @ start)  # the first descent step d (float32 rounding on x32's part)
    rayleigh = (step @ a @ step / (step @ step)).item()
    assert history[1].curvature == pytest.approx(rayleigh, rel=1e-5)


def test_secant_restarts_cleanly_when_parameters_stop_and_start_getting_gradients():
    a, x = quadratic(torch.logspace(-1, 1, 10, dtype=torch.float64))
    y = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = adaptive_lr.wrap(
        torch.optim.SGD([x, y], lr=0.05),
        ControllerOptions.all_off(sample_fraction=1.0, min_sample_size=1),
    )
    for with_y in (True, True, False, False, True, True):
        opt.zero_grad()
        loss = 0.5 * x @ a @ x + (0.5 * (y * y).sum() if with_y else 0.0)
        loss.backward()
        before = x.detach().clone()
        opt.step()
        d = before - x.detach()
        # On x alone the secant is the Rayleigh quotient of the step; y's curvature is 1.
        assert opt._trajectory.descent[x].tolist() == pytest.approx(d.tolist(), rel=1e-12)
    for record in list(opt.history)[1:]:
        assert record.curvature is not None
        assert 0.1 - 1e-9 <= record.curvature <= 10.0 + 1e-9


def test_group_norms_and_descent_are_exact_when_sampled_and_whole_parameters_interleave_in_groups():
    """Whole parameters are laid out first in the flat sample, by group; every gradient
    norm and every parameter's sampled descent still lands in the right place."""
    torch.manual_seed(0)
    first, second = nn.Linear(200, 100), nn.Linear(100, 50)  # weights sampled, biases whole
    groups = [
        {"params": [first.weight, second.bias]},
        {"params": [first.bias, second.weight], "lr": 0.05},
    ]
    opt = adaptive_lr.wrap(torch.optim.SGD(groups, lr=0.1, momentum=0.9))
    inputs = torch.randn(8, 200)
    for _ in range(3):
        opt.zero_grad()
        second(torch.tanh(first(inputs))).pow(2).mean().backward()
        expected = [
            math.sqrt(sum(float(p.grad.double().square().sum()) for p in group["params"])) for group in groups
        ]
        before = {p: p.detach().clone() for group in groups for p in group["params"]}
        opt.step()
        assert opt.history[-1].group_grad_norms == pytest.approx(expected, rel=1e-6)
        for p, old in before.items():
            offset, length, _ = opt._trajectory.blocks[p]
            block = slice(offset, offset + length)
            assert torch.equal(opt._trajectory.descent[p], (old - p.detach()).view(-1)[block])
    assert opt._trajectory.blocks[second.weight][1] < second.weight.numel()  # sampled


@pytest.mark.parametrize("numel", [20_000, 100], ids=["sampled", "whole"])
def test_a_gradient_whose_squared_norm_overflows_float32_is_skipped_like_a_non_finite_one(numel):
    """Adagrad's sum of squares would overflow on it: the step is skipped, nothing moves."""
    x = nn.Parameter(torch.ones(numel))
    opt = adaptive_lr.wrap(torch.optim.Adagrad([x], lr=0.1))
    x.grad = torch.full((numel,), 1e19)  # each square 1e38; their sum is past float32's 3.4e38
    opt.step()
    assert opt.history[-1].event == "skip"
    assert opt.history[-1].grad_norm == math.inf
    assert torch.equal(x.detach(), torch.ones(numel))
    assert torch.equal(opt.state[x]["sum"], torch.zeros(numel))


def test_many_distinct_sampling_weights_are_kept_as_one_vector_the_size_of_the_sample():
    # Each layer's sampled block has its own weight numel / 4096: more runs than are worth
    # a multiply each, so the weights are one per-coordinate vector beside d.
    model = nn.Sequential(*[nn.Linear(64 + 8 * i, 72 + 8 * i, bias=False) for i in range(12)])
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.01))
    x = torch.randn(4, 64)
    for layer in model:
        x = layer(x)
    x.sum().backward()
    opt.step()
    sampled = sum(b.numel() for b in opt._trajectory.descent.values())
    assert len({p.numel() for p in model.parameters()}) > signals._MAX_WEIGHT_PIECES
    assert sum(t.numel() for t in opt._trajectory.held_tensors()) == 2 * sampled


@pytest.mark.parametrize("track_successive_cosine", [False, True])
def test_weights_applied_per_run_as_scalars_give_bit_for_bit_the_per_coordinate_vectors_results(
    monkeypatch, track_successive_cosine
):
    def run(max_pieces: int) -> tuple[list, list[torch.Tensor]]:
        monkeypatch.setattr(signals, "_MAX_WEIGHT_PIECES", max_pieces)
        torch.manual_seed(0)
        # Weights 1 (biases, the small layer), 300 * 64 / 4096 and 300 * 300 / 5625.
        model = nn.Sequential(
            nn.Linear(64, 300), nn.Tanh(), nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 5)
        )
        opt = adaptive_lr.wrap(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            track_successive_cosine=track_successive_cosine,
        )
        x, y = torch.randn(32, 64), torch.randint(0, 5, (32,))
        for _ in range(8):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        pieces = [len(s.pieces) for s in opt._trajectory._segments]
        held = [s.weights is not None for s in opt._trajectory._segments]
        assert pieces == [3] and held == [max_pieces < 3]
        records = [
            (r.lr_multiplier, r.momentum, r.curvature, r.grad_cosine, r.successive_grad_cosine)
            for r in opt.history
        ]
        return records, [p.detach().clone() for p in model.parameters()]

    scalars, vector = run(8), run(0)
    assert scalars[0] == vector[0]
    assert all(torch.equal(a, b) for a, b in zip(scalars[1], vector[1], strict=True))
