"""Against a fixed schedule on the seed's deep network, where constant-lr SGD explodes."""

from __future__ import annotations

import pytest
import torch

import adaptive_lr
from adaptive_lr.seed import seed_data, seed_network, train

EPOCHS = 4


@pytest.mark.parametrize("lr", [1.0, 10.0])
def test_constant_lr_sgd_momentum_diverges_but_the_wrapped_one_trains(lr):
    inputs, labels = seed_data(2048, seed=0)
    bare_model = seed_network(init="he", generator_seed=0)
    bare = train(
        bare_model,
        torch.optim.SGD(bare_model.parameters(), lr=lr, momentum=0.9),
        inputs,
        labels,
        epochs=EPOCHS,
    )
    model = seed_network(init="he", generator_seed=0)
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    wrapped = train(model, opt, inputs, labels, epochs=EPOCHS)
    assert bare.diverged
    assert not wrapped.diverged
    assert wrapped.final_loss < 0.5 * wrapped.initial_loss
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_wrapped_run_is_deterministic_with_fixed_seeds():
    inputs, labels = seed_data(512, seed=1)
    results = []
    for _ in range(2):
        model = seed_network(init="he", generator_seed=3)
        opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9))
        results.append((train(model, opt, inputs, labels, epochs=2, seed=5), [r.lr for r in opt.history]))
    assert results[0] == results[1]


def test_wrapped_adam_at_a_large_lr_does_not_diverge_and_learns():
    inputs, labels = seed_data(2048, seed=0)
    model = seed_network(init="he", generator_seed=0)
    opt = adaptive_lr.wrap(torch.optim.Adam(model.parameters(), lr=1.0))
    result = train(model, opt, inputs, labels, epochs=EPOCHS)
    assert not result.diverged
    assert result.final_loss < 0.5 * result.initial_loss
