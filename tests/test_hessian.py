"""Specification of the curvature probe (adaptive_lr.hessian).

Each accuracy bound is a margin above the relative error of the top eigenvalue measured
on CPU with torch 2.13, quoted beside it; the accuracy tests print their errors with

    PYTHONPATH=. .venv/bin/python -m pytest -p no:cacheprovider tests/test_hessian.py -q -s -k accurate
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

from adaptive_lr.hessian import (
    SharpnessEstimate,
    autograd_hvp,
    closure_hvp,
    krylov_top_eigenvalue,
    lanczos_top_eigenvalue,
    top_eigenvalue,
)

# -- fixtures -----------------------------------------------------------------------


def spectrum_matrix(eigenvalues: Sequence[float], seed: int) -> Tensor:
    """``A = Q diag(eigenvalues) Q'`` with ``Q`` random orthogonal, in float64."""
    generator = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


class Quadratic:
    """``f(x) = 1/2 x'Ax`` over two parameters of different shapes, ``(n // 2, 1)`` and
    ``(n - n // 2,)``, so that the probes see a list of tensors rather than one vector."""

    def __init__(self, matrix: Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
        n = matrix.shape[0]
        generator = torch.Generator().manual_seed(1)
        flat = scale * torch.randn(n, generator=generator, dtype=torch.float64)
        self.matrix = matrix.to(dtype)
        self.params = [
            flat[: n // 2].reshape(-1, 1).to(dtype).requires_grad_(),
            flat[n // 2 :].to(dtype).requires_grad_(),
        ]

    def loss(self) -> Tensor:
        flat = torch.cat([p.reshape(-1) for p in self.params])
        return 0.5 * flat @ self.matrix @ flat

    def closure(self) -> Tensor:
        for p in self.params:
            p.grad = None
        loss = self.loss()
        loss.backward()
        return loss


def log_spaced_quadratic(dtype: torch.dtype, scale: float = 1.0) -> Quadratic:
    """20 eigenvalues log-spaced in [0.01, 10]: top 10, next 6.95 (a 30% gap)."""
    return Quadratic(spectrum_matrix(np.logspace(-2, 1, 20), seed=0), dtype, scale)


TOP_OF_LOG_SPACED = 10.0


def relative_error(estimate: float, exact: float) -> float:
    return abs(estimate - exact) / abs(exact)


def assert_accurate(estimate: float, exact: float, bound: float) -> None:
    """Assert ``|estimate - exact| / |exact| < bound``, printing the error for ``pytest -s``."""
    error = relative_error(estimate, exact)
    print(f"relative error {error:.1e} (bound {bound:.0e})")
    assert error < bound


class Network:
    """``nn.Sequential(Linear(4, 6), Tanh(), Linear(6, 3))``, cross-entropy, fixed batch."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
        self.inputs = torch.randn(32, 4, dtype=torch.float64).to(dtype)
        self.labels = torch.randint(0, 3, (32,))
        self.params = list(self.model.parameters())

    def loss(self) -> Tensor:
        return nn.functional.cross_entropy(self.model(self.inputs), self.labels)

    def closure(self) -> Tensor:
        self.model.zero_grad()
        loss = self.loss()
        loss.backward()
        return loss

    def full_hessian(self) -> np.ndarray:
        names = [name for name, _ in self.model.named_parameters()]
        shapes = [p.shape for p in self.params]

        def loss_of_flat(flat: Tensor) -> Tensor:
            pieces = torch.split(flat, [math.prod(shape) for shape in shapes])
            weights = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
            outputs = functional_call(self.model, weights, (self.inputs,))
            return nn.functional.cross_entropy(outputs, self.labels)

        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        return torch.autograd.functional.hessian(loss_of_flat, flat).numpy()


@pytest.fixture(scope="module")
def network_top_eigenvalue() -> float:
    hessian = Network().full_hessian()
    values, _ = scipy.sparse.linalg.eigsh(hessian, k=1, which="LA")
    return float(values[0])


def snapshot(params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor | None]]:
    values = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    return values, grads


def assert_unchanged(params: Sequence[Tensor], values: list[Tensor], grads: list[Tensor | None]) -> None:
    for p, value, grad in zip(params, values, grads, strict=True):
        assert torch.equal(p.detach(), value)
        if grad is None:
            assert p.grad is None
        else:
            assert p.grad is not None and torch.equal(p.grad, grad)


def network_with_stale_grads() -> Network:
    """A float32 network whose grads come from another batch, one of them ``None``."""
    network = Network(torch.float32)
    other = nn.functional.cross_entropy(network.model(-network.inputs), network.labels)
    other.backward()
    network.model[2].bias.grad = None
    return network


# -- accuracy on quadratics ---------------------------------------------------------


def test_autograd_power_iteration_is_accurate_on_quadratic_in_float32() -> None:
    quadratic = log_spaced_quadratic(torch.float32)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    estimate = top_eigenvalue(hvp, quadratic.params, iterations=100, tolerance=1e-6)
    assert estimate.converged
    assert_accurate(estimate.eigenvalue, TOP_OF_LOG_SPACED, 1e-5)  # measured 6.7e-7


def test_closure_power_iteration_is_accurate_on_quadratic_in_float32() -> None:
    quadratic = log_spaced_quadratic(torch.float32)
    hvp = closure_hvp(quadratic.closure, quadratic.params)
    estimate = top_eigenvalue(hvp, quadratic.params, iterations=100, tolerance=1e-6)
    assert estimate.converged
    assert_accurate(estimate.eigenvalue, TOP_OF_LOG_SPACED, 1e-4)  # measured 6.5e-6


def test_closure_power_iteration_stays_accurate_when_parameters_are_large() -> None:
    # ||x|| ~ 6600. A fixed step ||eps v|| = 1e-3 sinks into float32 rounding of x
    # (measured error 8e-3); a step relative to 1 + ||x|| does not.
    quadratic = log_spaced_quadratic(torch.float32, scale=1000.0)
    hvp = closure_hvp(quadratic.closure, quadratic.params)
    estimate = top_eigenvalue(hvp, quadratic.params, iterations=100, tolerance=1e-6)
    assert estimate.converged
    assert_accurate(estimate.eigenvalue, TOP_OF_LOG_SPACED, 1e-4)  # measured 7.3e-6


def test_lanczos_is_accurate_on_quadratic() -> None:
    quadratic = log_spaced_quadratic(torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    estimate = lanczos_top_eigenvalue(hvp, quadratic.params)
    assert estimate.converged
    assert_accurate(estimate.eigenvalue, TOP_OF_LOG_SPACED, 1e-10)  # measured 7.1e-16


def test_power_iteration_returns_negative_eigenvalue_when_it_dominates_in_magnitude() -> None:
    quadratic = Quadratic(spectrum_matrix([-5.0, 0.5, 1.0, 2.0], seed=3), torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    estimate = top_eigenvalue(hvp, quadratic.params, iterations=200, tolerance=1e-10)
    assert estimate.eigenvalue == pytest.approx(-5.0, rel=1e-6)


def test_lanczos_returns_largest_algebraic_eigenvalue_when_a_negative_one_dominates() -> None:
    quadratic = Quadratic(spectrum_matrix([-5.0, 0.5, 1.0, 2.0], seed=3), torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    estimate = lanczos_top_eigenvalue(hvp, quadratic.params)
    assert estimate.eigenvalue == pytest.approx(2.0, rel=1e-8)


@st.composite
def psd_spectra(draw: st.DrawFn, max_second_over_top: float = 1.0) -> list[float]:
    top = draw(st.floats(0.1, 100.0))
    rest = draw(st.lists(st.floats(0.0, max_second_over_top), min_size=1, max_size=7))
    return [top] + [top * fraction for fraction in rest]


@settings(deadline=None)
@given(
    eigenvalues=psd_spectra(),
    seed=st.integers(0, 2**16),
    iterations=st.integers(1, 30),
)
def test_power_iteration_eigenvalue_never_exceeds_true_top_eigenvalue_of_psd_quadratic(
    eigenvalues: list[float], seed: int, iterations: int
) -> None:
    quadratic = Quadratic(spectrum_matrix(eigenvalues, seed), torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    estimate = top_eigenvalue(hvp, quadratic.params, iterations=iterations)
    assert estimate.eigenvalue <= max(eigenvalues) * (1 + 1e-12)


@settings(deadline=None)
@given(eigenvalues=psd_spectra(max_second_over_top=0.8), seed=st.integers(0, 2**16))
def test_power_iteration_converges_within_tolerance_when_eigengap_is_at_least_20_percent(
    eigenvalues: list[float], seed: int
) -> None:
    # With r = lambda_2 / lambda_1 <= 0.8 the error at the stop is about
    # tolerance * r^2 / (1 - r^2) <= 1.8 * tolerance; 100x leaves room for the
    # pre-asymptotic phase.
    tolerance = 1e-8
    quadratic = Quadratic(spectrum_matrix(eigenvalues, seed), torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    estimate = top_eigenvalue(hvp, quadratic.params, iterations=1000, tolerance=tolerance)
    assert estimate.converged
    assert relative_error(estimate.eigenvalue, max(eigenvalues)) <= 100 * tolerance


# -- accuracy on a small network, against its full Hessian --------------------------


# The network's Hessian spectrum: top 0.620, next 0.498 (r = 0.80), most negative -0.352.


def test_autograd_power_iteration_is_accurate_on_network(network_top_eigenvalue: float) -> None:
    network = Network()
    hvp = autograd_hvp(network.loss, network.params)
    estimate = top_eigenvalue(hvp, network.params, iterations=300, tolerance=1e-8)
    assert estimate.converged
    assert_accurate(estimate.eigenvalue, network_top_eigenvalue, 1e-6)  # measured 1.5e-8


def test_closure_power_iteration_is_accurate_on_network(network_top_eigenvalue: float) -> None:
    network = Network()
    hvp = closure_hvp(network.closure, network.params)
    estimate = top_eigenvalue(hvp, network.params, iterations=300, tolerance=1e-8)
    assert estimate.converged
    # float64 with the float32-tuned default relative_step: the O(eps^2) truncation dominates.
    assert_accurate(estimate.eigenvalue, network_top_eigenvalue, 1e-4)  # measured 1.9e-6


def test_closure_power_iteration_is_accurate_on_network_in_float32(
    network_top_eigenvalue: float,
) -> None:
    network = Network(torch.float32)
    hvp = closure_hvp(network.closure, network.params)
    estimate = top_eigenvalue(hvp, network.params, iterations=300, tolerance=1e-6)
    assert estimate.converged
    assert_accurate(estimate.eigenvalue, network_top_eigenvalue, 1e-3)  # measured 1.3e-5


def test_lanczos_is_accurate_on_network(network_top_eigenvalue: float) -> None:
    network = Network()
    hvp = autograd_hvp(network.loss, network.params)
    estimate = lanczos_top_eigenvalue(hvp, network.params)
    assert estimate.converged
    assert_accurate(estimate.eigenvalue, network_top_eigenvalue, 1e-8)  # measured 1.8e-16


def test_closure_hvp_matches_autograd_hvp_on_network() -> None:
    network = Network()
    generator = torch.Generator().manual_seed(2)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in network.params]
    exact = torch.cat([h.reshape(-1) for h in autograd_hvp(network.loss, network.params)(vector)])
    approximate = closure_hvp(network.closure, network.params)(vector)
    approximate_flat = torch.cat([h.reshape(-1) for h in approximate])
    # measured 1.3e-6 relative
    assert torch.linalg.vector_norm(approximate_flat - exact) < 1e-4 * torch.linalg.vector_norm(exact)


def current_gradient(network: Network) -> list[Tensor]:
    network.closure()
    return [p.grad.detach().clone() for p in network.params]


def test_forward_closure_hvp_matches_autograd_hvp_on_network() -> None:
    network = Network()
    generator = torch.Generator().manual_seed(2)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in network.params]
    exact = torch.cat([h.reshape(-1) for h in autograd_hvp(network.loss, network.params)(vector)])
    hvp = closure_hvp(network.closure, network.params, gradient=current_gradient(network))
    approximate = torch.cat([h.reshape(-1) for h in hvp(vector)])
    # O(eps) truncation instead of O(eps^2): measured 1.1e-3 relative (central: 1.3e-6)
    assert torch.linalg.vector_norm(approximate - exact) < 3e-3 * torch.linalg.vector_norm(exact)


def test_forward_closure_power_iteration_is_accurate_on_quadratic_in_float32() -> None:
    quadratic = log_spaced_quadratic(torch.float32)
    quadratic.closure()
    gradient = [p.grad.detach().clone() for p in quadratic.params]
    hvp = closure_hvp(quadratic.closure, quadratic.params, gradient=gradient)
    estimate = top_eigenvalue(hvp, quadratic.params, iterations=100, tolerance=1e-6)
    assert estimate.converged
    assert_accurate(estimate.eigenvalue, TOP_OF_LOG_SPACED, 1e-4)  # measured 9.1e-6


def test_forward_closure_hvp_copies_the_gradient_it_is_given() -> None:
    network = Network()
    gradient = current_gradient(network)
    vector = [torch.ones_like(p) for p in network.params]
    first = closure_hvp(network.closure, network.params, gradient=gradient)
    expected = first(vector)
    for g in gradient:
        g.mul_(7.0)  # e.g. a DDP bucket the next backward writes into
    assert all(torch.equal(a, b) for a, b in zip(first(vector), expected, strict=True))


def test_forward_closure_hvp_rejects_a_gradient_shaped_unlike_the_params() -> None:
    network = Network()
    with pytest.raises(ValueError, match="gradient"):
        closure_hvp(network.closure, network.params, gradient=[torch.zeros(3)])


# -- cost and calling conventions ---------------------------------------------------


def test_autograd_hvp_runs_the_forward_pass_once_for_many_products() -> None:
    network = Network()
    calls = 0

    def counted_loss() -> Tensor:
        nonlocal calls
        calls += 1
        return network.loss()

    estimate = top_eigenvalue(autograd_hvp(counted_loss, network.params), network.params)
    assert estimate.iterations > 1
    assert calls == 1


def test_closure_hvp_calls_the_closure_twice_per_product() -> None:
    network = Network()
    calls = 0

    def counted_closure() -> Tensor:
        nonlocal calls
        calls += 1
        return network.closure()

    estimate = top_eigenvalue(closure_hvp(counted_closure, network.params), network.params)
    assert calls == 2 * estimate.iterations


def test_forward_closure_hvp_calls_the_closure_once_per_product() -> None:
    network = Network()
    gradient = current_gradient(network)
    calls = 0

    def counted_closure() -> Tensor:
        nonlocal calls
        calls += 1
        return network.closure()

    hvp = closure_hvp(counted_closure, network.params, gradient=gradient)
    estimate = top_eigenvalue(hvp, network.params)
    assert estimate.iterations > 1
    assert calls == estimate.iterations


@pytest.mark.parametrize("back_end", ["autograd", "closure"])
def test_probes_work_under_no_grad_as_inside_optimizer_step(back_end: str) -> None:
    network = Network()
    with torch.no_grad():
        if back_end == "autograd":
            hvp = autograd_hvp(network.loss, network.params)
        else:
            hvp = closure_hvp(network.closure, network.params)
        estimate = top_eigenvalue(hvp, network.params)
    assert math.isfinite(estimate.eigenvalue) and estimate.eigenvalue > 0


def test_autograd_hvp_gives_zero_for_parameters_the_loss_does_not_use() -> None:
    used = torch.tensor([1.0, 2.0], requires_grad=True)
    unused = torch.tensor([3.0], requires_grad=True)
    hvp = autograd_hvp(lambda: (used**2).sum(), [used, unused])
    product = hvp([torch.ones(2), torch.ones(1)])
    assert torch.equal(product[0], torch.tensor([2.0, 2.0]))
    assert torch.equal(product[1], torch.zeros(1))


def test_closure_hvp_of_zero_vector_is_zero() -> None:
    quadratic = log_spaced_quadratic(torch.float32)
    product = closure_hvp(quadratic.closure, quadratic.params)(
        [torch.zeros_like(p) for p in quadratic.params]
    )
    assert all(torch.equal(h, torch.zeros_like(h)) for h in product)


# -- closure_hvp leaves no trace ------------------------------------------------------


@pytest.mark.parametrize("differences", ["central", "forward"])
def test_closure_hvp_restores_parameters_and_grads_bit_for_bit(differences: str) -> None:
    network = network_with_stale_grads()
    values, grads = snapshot(network.params)
    assert network.model[2].bias.grad is None
    gradient = [torch.ones_like(p) for p in network.params] if differences == "forward" else None
    hvp = closure_hvp(network.closure, network.params, gradient=gradient)
    top_eigenvalue(hvp, network.params, iterations=5)
    assert_unchanged(network.params, values, grads)


def test_closure_hvp_puts_back_the_same_grad_tensor_objects() -> None:
    network = network_with_stale_grads()
    grad_objects = [p.grad for p in network.params]
    top_eigenvalue(closure_hvp(network.closure, network.params), network.params, iterations=2)
    assert all(p.grad is g for p, g in zip(network.params, grad_objects, strict=True))


def test_closure_hvp_restores_parameters_and_grads_when_the_closure_raises() -> None:
    network = network_with_stale_grads()
    values, grads = snapshot(network.params)
    calls = 0

    def failing_closure() -> Tensor:
        # Fails on the second call, with parameters shifted and fresh grads written.
        nonlocal calls
        calls += 1
        loss = network.closure()
        if calls == 2:
            raise RuntimeError("closure failed")
        return loss

    hvp = closure_hvp(failing_closure, network.params)
    with pytest.raises(RuntimeError, match="closure failed"):
        hvp([torch.ones_like(p) for p in network.params])
    assert calls == 2
    assert_unchanged(network.params, values, grads)


def test_closure_hvp_after_an_in_place_change_of_the_parameters_works_at_the_new_point() -> None:
    """Products of one closure_hvp reuse the saved point only while nothing wrote to it."""
    network = network_with_stale_grads()
    hvp = closure_hvp(network.closure, network.params)
    vector = [torch.ones_like(p) for p in network.params]
    hvp(vector)
    with torch.no_grad():
        network.params[0].add_(0.5)  # an optimizer step between two products
    values, grads = snapshot(network.params)
    product = hvp(vector)
    assert_unchanged(network.params, values, grads)  # the new point, not the saved one
    fresh = closure_hvp(network.closure, network.params)(vector)
    assert all(torch.equal(a, b) for a, b in zip(product, fresh, strict=True))


def test_closure_hvp_saves_the_point_once_per_run_of_products_and_again_after_a_write(monkeypatch) -> None:
    import adaptive_lr.hessian as hessian

    saves = 0
    original = hessian._SavedPoint.__init__

    def counted(self, params):
        nonlocal saves
        saves += 1
        original(self, params)

    monkeypatch.setattr(hessian._SavedPoint, "__init__", counted)
    network = network_with_stale_grads()
    hvp = closure_hvp(network.closure, network.params)
    vector = [torch.ones_like(p) for p in network.params]
    for _ in range(3):
        hvp(vector)
    assert saves == 1
    with torch.no_grad():
        network.params[1].mul_(0.5)
    hvp(vector)
    assert saves == 2
    network.params[0].grad = torch.zeros_like(network.params[0])  # another gradient tensor
    hvp(vector)
    assert saves == 3


def test_closure_hvp_restores_grads_the_closure_writes_into() -> None:
    """A closure that accumulates into the caller's gradient tensors (a buffer put back in
    .grad, as gradient-buffer setups do) still leaves their values as found."""
    network = network_with_stale_grads()
    values, grads = snapshot(network.params)
    buffers = [p.grad for p in network.params]

    def closure_into_buffers() -> Tensor:
        for p, buffer in zip(network.params, buffers, strict=True):
            if buffer is not None:
                buffer.zero_()
                p.grad = buffer
        loss = network.loss()
        loss.backward()
        return loss

    vector = [torch.ones_like(p) for p in network.params]
    product = closure_hvp(closure_into_buffers, network.params)(vector)
    assert_unchanged(network.params, values, grads)
    assert all(p.grad is b for p, b in zip(network.params, buffers, strict=True))
    expected = closure_hvp(network.closure, network.params)(vector)
    assert all(torch.equal(a, b) for a, b in zip(product, expected, strict=True))


@pytest.mark.parametrize("solver", [top_eigenvalue, krylov_top_eigenvalue])
def test_a_solver_rejects_a_zero_start_before_spending_a_product(solver: Callable[..., object]) -> None:
    quadratic = log_spaced_quadratic(torch.float64)
    exact = autograd_hvp(quadratic.loss, quadratic.params)
    products = 0

    def counted(vector: list[Tensor]) -> list[Tensor]:
        nonlocal products
        products += 1
        return exact(vector)

    with pytest.raises(ValueError, match="initial must be a nonzero vector"):
        solver(counted, quadratic.params, initial=[torch.zeros_like(p) for p in quadratic.params])
    assert products == 0


# -- the estimate -------------------------------------------------------------------


def test_top_eigenvalue_is_deterministic_with_the_default_generator() -> None:
    network = Network()
    hvp = autograd_hvp(network.loss, network.params)
    first = top_eigenvalue(hvp, network.params, iterations=5)
    second = top_eigenvalue(hvp, network.params, iterations=5)
    assert first.eigenvalue == second.eigenvalue


def test_estimate_vector_is_unit_norm_and_shaped_like_params() -> None:
    network = Network()
    hvp = autograd_hvp(network.loss, network.params)
    for iterations in (1, 7):
        estimate = top_eigenvalue(hvp, network.params, iterations=iterations)
        assert isinstance(estimate, SharpnessEstimate)
        assert [v.shape for v in estimate.vector] == [p.shape for p in network.params]
        norm = torch.linalg.vector_norm(torch.cat([v.reshape(-1) for v in estimate.vector]))
        assert norm.item() == pytest.approx(1.0, rel=1e-12)


def test_warm_start_from_previous_vector_needs_fewer_iterations() -> None:
    network = Network()
    hvp = autograd_hvp(network.loss, network.params)
    cold = top_eigenvalue(hvp, network.params, iterations=300, tolerance=1e-6)
    warm = top_eigenvalue(hvp, network.params, iterations=300, tolerance=1e-6, initial=cold.vector)
    assert cold.converged and warm.converged
    assert warm.iterations < cold.iterations
    assert warm.eigenvalue == pytest.approx(cold.eigenvalue, rel=1e-5)


def test_power_iteration_carried_across_calls_visits_the_same_iterates_as_one_call() -> None:
    """Each call returns its last iterate one product further (H v / ||H v||); started from
    it with the last estimate as `reference`, the next call goes on where the last stopped."""
    quadratic = log_spaced_quadratic(torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    tolerance = 1e-12
    whole = top_eigenvalue(hvp, quadratic.params, iterations=12, tolerance=tolerance)
    assert not whole.converged  # the split calls below must not stop early either
    estimate = top_eigenvalue(hvp, quadratic.params, iterations=1, tolerance=tolerance)
    quotients = [estimate.eigenvalue]
    for _ in range(11):
        estimate = top_eigenvalue(
            hvp,
            quadratic.params,
            iterations=1,
            tolerance=tolerance,
            initial=estimate.vector,
            reference=estimate.eigenvalue,
        )
        quotients.append(estimate.eigenvalue)
    assert estimate.eigenvalue == whole.eigenvalue
    assert all(torch.equal(a, b) for a, b in zip(estimate.vector, whole.vector, strict=True))
    assert quotients == sorted(quotients)  # a PSD matrix: the quotients rise to the top


def test_a_settled_iteration_carried_on_with_its_reference_stops_after_one_product() -> None:
    quadratic = log_spaced_quadratic(torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    settled = top_eigenvalue(hvp, quadratic.params, iterations=200, tolerance=1e-4)
    assert settled.converged
    again = top_eigenvalue(
        hvp, quadratic.params, tolerance=1e-4, initial=settled.vector, reference=settled.eigenvalue
    )
    assert again.converged and again.iterations == 1
    assert again.eigenvalue == pytest.approx(TOP_OF_LOG_SPACED, rel=1e-3)
    # Without the reference the same start needs a second product to compare with.
    alone = top_eigenvalue(hvp, quadratic.params, tolerance=1e-4, initial=settled.vector)
    assert alone.iterations == 2
    # A reference the first quotient does not match does not stop the iteration.
    off = top_eigenvalue(
        hvp, quadratic.params, tolerance=1e-4, initial=settled.vector, reference=2 * settled.eigenvalue
    )
    assert off.iterations >= 2


def test_the_returned_vector_is_the_last_product_normalised() -> None:
    quadratic = log_spaced_quadratic(torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    start = [torch.ones_like(p) for p in quadratic.params]
    estimate = top_eigenvalue(hvp, quadratic.params, iterations=1, initial=start)
    product = torch.cat([h.reshape(-1) for h in hvp(start)])
    expected = product / torch.linalg.vector_norm(product)
    returned = torch.cat([v.reshape(-1) for v in estimate.vector])
    torch.testing.assert_close(returned, expected, rtol=1e-12, atol=1e-15)
    # The eigenvalue is the quotient of the start vector, the iterate before it.
    ones = torch.ones(product.numel(), dtype=torch.float64)
    assert estimate.eigenvalue == pytest.approx((ones @ product).item() / ones.numel(), rel=1e-12)


def test_top_eigenvalue_reports_not_converged_when_iterations_run_out() -> None:
    quadratic = log_spaced_quadratic(torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    estimate = top_eigenvalue(hvp, quadratic.params, iterations=3, tolerance=1e-12)
    assert not estimate.converged
    assert estimate.iterations == 3


def test_lanczos_reports_not_converged_with_a_lower_bound_when_max_hvps_run_out() -> None:
    quadratic = log_spaced_quadratic(torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    estimate = lanczos_top_eigenvalue(hvp, quadratic.params, max_hvps=3)
    assert not estimate.converged
    assert estimate.iterations == 3
    assert 0 < estimate.eigenvalue <= TOP_OF_LOG_SPACED


# -- the Krylov solver ----------------------------------------------------------------


def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@settings(deadline=None)
@given(
    eigenvalues=psd_spectra(),
    seed=st.integers(0, 2**16),
    iterations=st.integers(1, 8),
)
def test_krylov_estimate_lies_between_the_power_estimate_of_the_same_products_and_the_top_eigenvalue(
    eigenvalues: list[float], seed: int, iterations: int
) -> None:
    # Tolerance 1e-14: neither solver may stop early, so both spend the same products
    # from the same (default) start; the Ritz value is the best quotient of their span.
    quadratic = Quadratic(spectrum_matrix(eigenvalues, seed), torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    power = top_eigenvalue(hvp, quadratic.params, iterations=iterations, tolerance=1e-14)
    krylov = krylov_top_eigenvalue(hvp, quadratic.params, iterations=iterations, tolerance=1e-14)
    top = max(eigenvalues)
    if not krylov.converged:  # a breakdown (invariant subspace) stops Krylov sooner
        assert krylov.iterations == power.iterations
    assert power.eigenvalue <= krylov.eigenvalue * (1 + 1e-9) + 1e-12 * top
    assert krylov.eigenvalue <= top * (1 + 1e-9)


def test_krylov_on_a_crowded_spectrum_gets_closer_in_20_products_than_power_iteration_in_100() -> None:
    # 200 eigenvalues log-spaced in [0.01, 1]: the top two differ by 2.3%, where power
    # iteration creeps and a Krylov space's Chebyshev polynomial does not (measured:
    # errors 6.2% / 0.04% in 6 / 20 products, power iteration 7.7% / 0.30% in 10 / 100).
    quadratic = Quadratic(spectrum_matrix(np.logspace(-2, 0, 200), seed=0), torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    for products, power_products in ((6, 10), (20, 100)):
        krylov = krylov_top_eigenvalue(hvp, quadratic.params, iterations=products, tolerance=1e-12)
        power = top_eigenvalue(hvp, quadratic.params, iterations=power_products, tolerance=1e-12)
        assert relative_error(krylov.eigenvalue, 1.0) < relative_error(power.eigenvalue, 1.0)
    many = krylov_top_eigenvalue(hvp, quadratic.params, iterations=60, tolerance=1e-10)
    assert_accurate(many.eigenvalue, 1.0, 1e-8)  # measured 2.9e-11


def test_krylov_stopping_after_one_product_returns_what_power_iteration_returns() -> None:
    quadratic = log_spaced_quadratic(torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    start = [torch.ones_like(p) for p in quadratic.params]
    krylov = krylov_top_eigenvalue(hvp, quadratic.params, iterations=1, initial=start)
    power = top_eigenvalue(hvp, quadratic.params, iterations=1, initial=start)
    assert krylov.eigenvalue == pytest.approx(power.eigenvalue, rel=1e-12)
    torch.testing.assert_close(flat(krylov.vector), flat(power.vector), rtol=1e-12, atol=1e-14)


def test_krylov_returns_the_ritz_vector_one_product_further() -> None:
    """The returned vector is H y / ||H y||, with y the top Ritz vector: on the log-spaced
    quadratic, the product of the returned vector's predecessor is checked directly by
    recovering y as the returned vector's image under H^-1."""
    quadratic = log_spaced_quadratic(torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    estimate = krylov_top_eigenvalue(hvp, quadratic.params, iterations=4, tolerance=1e-12)
    returned = flat(estimate.vector)
    y = torch.linalg.solve(quadratic.matrix, returned)  # y up to scale
    y = y / torch.linalg.vector_norm(y)
    # y is the Ritz vector: its Rayleigh quotient is the estimate.
    assert (y @ quadratic.matrix @ y).item() == pytest.approx(estimate.eigenvalue, rel=1e-10)
    assert torch.linalg.vector_norm(returned).item() == pytest.approx(1.0, rel=1e-12)


def test_krylov_stops_exactly_at_an_invariant_subspace() -> None:
    # Two distinct eigenvalues: any start's Krylov space has dimension 2.
    quadratic = Quadratic(spectrum_matrix([3.0, 1.0, 1.0, 1.0, 1.0, 1.0], seed=2), torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    estimate = krylov_top_eigenvalue(hvp, quadratic.params, iterations=10, tolerance=1e-14)
    assert estimate.converged and estimate.iterations == 2
    assert estimate.eigenvalue == pytest.approx(3.0, rel=1e-12)
    # The vector is the top eigenvector: its quotient is 3.
    vector = flat(estimate.vector)
    assert (vector @ quadratic.matrix @ vector).item() == pytest.approx(3.0, rel=1e-12)


def test_krylov_warm_start_with_its_reference_stops_after_one_product_where_it_has_settled() -> None:
    quadratic = log_spaced_quadratic(torch.float64)
    hvp = autograd_hvp(quadratic.loss, quadratic.params)
    settled = krylov_top_eigenvalue(hvp, quadratic.params, iterations=50, tolerance=1e-8)
    assert settled.converged
    assert_accurate(settled.eigenvalue, TOP_OF_LOG_SPACED, 1e-6)
    again = krylov_top_eigenvalue(
        hvp, quadratic.params, tolerance=1e-4, initial=settled.vector, reference=settled.eigenvalue
    )
    assert again.converged and again.iterations == 1
    off = krylov_top_eigenvalue(
        hvp, quadratic.params, tolerance=1e-4, initial=settled.vector, reference=2 * settled.eigenvalue
    )
    assert off.iterations >= 2


def test_closure_krylov_is_accurate_on_network_in_float32(network_top_eigenvalue: float) -> None:
    network = Network(torch.float32)
    hvp = closure_hvp(network.closure, network.params)
    estimate = krylov_top_eigenvalue(hvp, network.params, iterations=60, tolerance=1e-6)
    assert estimate.converged
    assert_accurate(estimate.eigenvalue, network_top_eigenvalue, 1e-3)  # measured 5.7e-6


def test_krylov_with_a_non_finite_product_returns_nan_and_a_finite_unit_vector() -> None:
    quadratic = log_spaced_quadratic(torch.float64)
    exact = autograd_hvp(quadratic.loss, quadratic.params)
    calls = 0

    def breaks_at_the_third(vector: list[Tensor]) -> list[Tensor]:
        nonlocal calls
        calls += 1
        product = exact(vector)
        return [torch.full_like(h, math.inf) for h in product] if calls == 3 else product

    estimate = krylov_top_eigenvalue(breaks_at_the_third, quadratic.params, iterations=5, tolerance=1e-12)
    assert math.isnan(estimate.eigenvalue) and not estimate.converged
    assert estimate.iterations == 3
    vector = flat(estimate.vector)
    assert torch.isfinite(vector).all()
    assert torch.linalg.vector_norm(vector).item() == pytest.approx(1.0, rel=1e-12)


def test_krylov_leaves_its_basis_intact_when_the_hvp_hands_back_its_input() -> None:
    quadratic = log_spaced_quadratic(torch.float64)
    estimate = krylov_top_eigenvalue(lambda vector: vector, quadratic.params)  # H = I
    assert estimate.converged and estimate.iterations == 1
    assert estimate.eigenvalue == pytest.approx(1.0, rel=1e-12)
    assert torch.linalg.vector_norm(flat(estimate.vector)).item() == pytest.approx(1.0, rel=1e-12)


# -- argument validation --------------------------------------------------------------


def _quadratic_hvp() -> tuple[Callable[[list[Tensor]], list[Tensor]], list[Tensor]]:
    quadratic = log_spaced_quadratic(torch.float64)
    return autograd_hvp(quadratic.loss, quadratic.params), quadratic.params


def _call_with_frozen_param() -> object:
    frozen = torch.ones(2)
    return closure_hvp(lambda: None, [frozen])


INVALID_CALLS: dict[str, tuple[Callable[[], object], str]] = {
    "iterations_zero": (
        lambda: top_eigenvalue(*_quadratic_hvp(), iterations=0),
        "iterations",
    ),
    "tolerance_zero": (
        lambda: top_eigenvalue(*_quadratic_hvp(), tolerance=0.0),
        "tolerance",
    ),
    "tolerance_nan": (
        lambda: top_eigenvalue(*_quadratic_hvp(), tolerance=math.nan),
        "tolerance",
    ),
    "reference_bool": (
        lambda: top_eigenvalue(
            *_quadratic_hvp(), initial=[torch.ones(10, 1), torch.ones(10)], reference=True
        ),
        "reference",
    ),
    "reference_nan": (
        lambda: top_eigenvalue(
            *_quadratic_hvp(), initial=[torch.ones(10, 1), torch.ones(10)], reference=math.nan
        ),
        "reference",
    ),
    "initial_misshapen": (
        lambda: top_eigenvalue(*_quadratic_hvp(), initial=[torch.ones(3)]),
        "initial",
    ),
    "krylov_iterations_zero": (
        lambda: krylov_top_eigenvalue(*_quadratic_hvp(), iterations=0),
        "iterations",
    ),
    "krylov_tolerance_nan": (
        lambda: krylov_top_eigenvalue(*_quadratic_hvp(), tolerance=math.nan),
        "tolerance",
    ),
    "krylov_reference_bool": (
        lambda: krylov_top_eigenvalue(
            *_quadratic_hvp(), initial=[torch.ones(10, 1), torch.ones(10)], reference=True
        ),
        "reference",
    ),
    "krylov_initial_misshapen": (
        lambda: krylov_top_eigenvalue(*_quadratic_hvp(), initial=[torch.ones(3)]),
        "initial",
    ),
    "relative_step_zero": (
        lambda: closure_hvp(lambda: None, _quadratic_hvp()[1], relative_step=0.0),
        "relative_step",
    ),
    "relative_step_negative": (
        lambda: closure_hvp(lambda: None, _quadratic_hvp()[1], relative_step=-1e-3),
        "relative_step",
    ),
    "params_empty": (lambda: autograd_hvp(lambda: torch.tensor(0.0), []), "params"),
    "params_not_requiring_grad": (_call_with_frozen_param, "params"),
    "loss_fn_not_scalar": (
        lambda: autograd_hvp(lambda: torch.ones(2, requires_grad=True), [torch.ones(2, requires_grad=True)]),
        "loss_fn",
    ),
    "vector_misshapen": (lambda: _quadratic_hvp()[0]([torch.ones(3)]), "vector"),
    "lanczos_tolerance_zero": (
        lambda: lanczos_top_eigenvalue(*_quadratic_hvp(), tolerance=0.0),
        "tolerance",
    ),
    "lanczos_max_hvps_zero": (
        lambda: lanczos_top_eigenvalue(*_quadratic_hvp(), max_hvps=0),
        "max_hvps",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_CALLS))
def test_invalid_argument_raises_value_error_naming_it(case: str) -> None:
    call, argument = INVALID_CALLS[case]
    with pytest.raises(ValueError, match=argument):
        call()
