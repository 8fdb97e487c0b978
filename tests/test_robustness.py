"""Whole-step properties under hostile gradients: bounds hold, nothing becomes non-finite."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import adaptive_lr
from adaptive_lr import ControllerOptions

NORMS = st.one_of(
    st.sampled_from([0.0, 1e-30, 1e-8, 1.0, 1e8, 1e30, math.inf, -math.inf, math.nan]),
    st.floats(1e-3, 1e3),
)
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
}


@given(
    norms=st.lists(NORMS, min_size=1, max_size=25),
    name=st.sampled_from(sorted(OPTIMIZERS)),
    min_momentum=st.floats(0.0, 0.5),
    max_momentum=st.floats(0.6, 0.99),
    max_lr_multiplier=st.floats(1.0, 100.0),
    seed=st.integers(0, 10),
)
def test_multiplier_and_momentum_stay_in_bounds_and_parameters_finite_for_any_gradient_norms(
    norms, name, min_momentum, max_momentum, max_lr_multiplier, seed
):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.Parameter(torch.randn(6, generator=g))
    options = ControllerOptions(
        min_momentum=min_momentum, max_momentum=max_momentum, max_lr_multiplier=max_lr_multiplier
    )
    opt = adaptive_lr.wrap(OPTIMIZERS[name]([x]), options)
    for norm in norms:
        direction = torch.randn(6, generator=g)
        x.grad = direction / direction.norm() * norm if math.isfinite(norm) else direction * norm
        opt.step()
        record = opt.history[-1]
        assert options.min_lr_multiplier <= record.lr_multiplier <= options.max_lr_multiplier
        assert record.momentum is None or min_momentum <= record.momentum <= max_momentum
        assert torch.isfinite(x).all()
        for state in opt.state.values():
            assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))


@given(scale_exponent=st.integers(-20, 20), seed=st.integers(0, 5))
def test_scaling_the_loss_leaves_adam_decisions_unchanged(scale_exponent, seed):
    """Adam ignores the gradient's scale, and so do the controller's decisions over it."""
    scale = 2.0**scale_exponent

    def run(c):
        g = torch.Generator().manual_seed(seed)
        target = torch.randn(8, generator=g)
        x = torch.nn.Parameter(torch.zeros(8))
        opt = adaptive_lr.wrap(torch.optim.Adam([x], lr=0.1, eps=1e-30))
        for _ in range(15):
            opt.zero_grad()
            (c * ((x - target) ** 2).sum()).backward()
            opt.step()
        return opt.history

    plain, scaled = run(1.0), run(scale)
    assert [r.event for r in plain] == [r.event for r in scaled]
    for a, b in zip(plain, scaled, strict=True):
        assert math.isclose(a.lr_multiplier, b.lr_multiplier, rel_tol=1e-4)
        assert math.isclose(a.momentum, b.momentum, rel_tol=1e-4)
        assert math.isclose(a.clip_coef, b.clip_coef, rel_tol=1e-4)
