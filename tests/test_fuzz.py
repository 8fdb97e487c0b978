"""Property-based fuzzing of the whole step: models, optimizers, options and faults at random.

Invariants after every step: no parameter and no optimizer-state tensor is non-finite;
the multiplier and the momentum stay within their bounds; and a state_dict saved at the
end loads into a fresh wrapper and saves back identically.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import adaptive_lr
from adaptive_lr import ControllerOptions

MODELS = {
    "linear": lambda: nn.Linear(6, 3),
    "mlp": lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)),
    "deep_tanh": lambda: nn.Sequential(
        *[m for _ in range(4) for m in (nn.Linear(6, 6), nn.Tanh())], nn.Linear(6, 3)
    ),
    "conv": lambda: nn.Sequential(
        nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(16, 3)
    ),
    "two_groups": lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)),
}
OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.1),
    "sgd_momentum": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9),
    "nesterov": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda groups: torch.optim.Adam(groups, lr=0.01),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.01),
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, lr=0.01, momentum=0.5),
    "adagrad": lambda groups: torch.optim.Adagrad(groups, lr=0.1),
}
FAULTS = ("none", "nan_grad", "inf_grad", "nan_loss", "huge_grad", "zero_grad", "no_grad")

OPTIONS = st.fixed_dictionaries(
    {
        "growth_rate": st.floats(0.0, 0.5),
        "recovery_deadband": st.floats(0.0, 0.5),
        "cap_approach": st.floats(0.0, 1.0),
        "spike_threshold": st.floats(0.5, 6.0),
        "spike_backoff": st.floats(0.5, 1.0),  # at least skip_backoff (default 0.5)
        "stability_margin": st.floats(0.1, 1.0),
        "max_update_ratio": st.floats(1e-3, 1.0),
        "sample_fraction": st.floats(0.05, 1.0),
        "min_sample_size": st.integers(1, 64),
        "min_momentum": st.floats(0.0, 0.5),
        "max_momentum": st.floats(0.6, 0.99),
        "max_lr_multiplier": st.floats(1.0, 1e4),
        "restore_after_event": st.booleans(),
        "spike_guard": st.booleans(),
        "curvature_governor": st.booleans(),
        "recovery": st.booleans(),
        "momentum_control": st.booleans(),
        "update_guard": st.booleans(),
        "track_successive_cosine": st.booleans(),
    }
)


def _groups(model_name: str, model: nn.Module) -> list[dict]:
    params = list(model.parameters())
    if model_name == "two_groups":
        return [{"params": params[:2]}, {"params": params[2:], "lr": 0.02}]
    return [{"params": params}]


def _finite(model: nn.Module, opt: torch.optim.Optimizer) -> bool:
    tensors = list(model.parameters())
    tensors += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model_name=st.sampled_from(sorted(MODELS)),
    optimizer_name=st.sampled_from(sorted(OPTIMIZERS)),
    options=OPTIONS,
    faults=st.lists(st.sampled_from(FAULTS), min_size=1, max_size=12),
    seed=st.integers(0, 100),
)
def test_any_model_optimizer_options_and_faults_keep_parameters_finite_bounds_and_an_exact_round_trip(
    model_name, optimizer_name, options, faults, seed
):
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    groups = _groups(model_name, model)
    options = ControllerOptions(**options)
    opt = adaptive_lr.wrap(OPTIMIZERS[optimizer_name](groups), options)
    generator = torch.Generator().manual_seed(seed)
    for fault in faults:
        x = torch.randn(8, 6, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if fault != "no_grad":
            loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if fault in ("nan_grad", "inf_grad") and grads:
            grads[seed % len(grads)].view(-1)[0] = math.nan if fault == "nan_grad" else math.inf
        elif fault == "huge_grad":
            for g in grads:
                g.mul_(1e12)
        elif fault == "zero_grad":
            for g in grads:
                g.zero_()
        opt.step(loss=torch.tensor(math.nan) if fault == "nan_loss" else loss.detach())
        assert _finite(model, opt)
        if opt.history:
            record = opt.history[-1]
            assert options.min_lr_multiplier <= record.lr_multiplier <= options.max_lr_multiplier
            if record.momentum is not None and record.momentum_controlled:
                assert options.min_momentum <= record.momentum <= options.max_momentum
    saved = opt.state_dict()
    fresh = adaptive_lr.wrap(OPTIMIZERS[optimizer_name](_groups(model_name, model)), options)
    fresh.load_state_dict(saved)
    assert _equal(fresh.state_dict(), saved)


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b
