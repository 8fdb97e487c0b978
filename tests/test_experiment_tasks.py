"""The experiment tasks added for issue 3, item 2: built deterministically, trainable, with
finite held-out metrics; the RNN task explodes under bare SGD at a large lr; the repaired
seed LSTM takes the input shape and labels the seed meant."""

import itertools
import math

import pytest
import torch

from experiments.tasks import TASKS, SeedLSTM, lstm_data, stdlib_corpus

NEW_TASKS = ["seed_lstm", "rnn_long_range", "digits_cnn", "char_transformer"]
ADAM_LR = {"seed_lstm": 1e-2, "rnn_long_range": 1e-3, "digits_cnn": 1e-2, "char_transformer": 3e-3}


pytestmark = pytest.mark.usefixtures("one_thread")


def _sgd_gradient_norms(lr: float, steps: int) -> list[float]:
    """Global gradient norms of `rnn_long_range` (seed 0) over `steps` steps of bare SGD."""
    problem = TASKS["rnn_long_range"].build(0)
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=lr)
    norms = []
    for batch in itertools.islice(problem.epoch_batches(), steps):
        optimizer.zero_grad()
        problem.batch_loss(batch).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(problem.model.parameters(), math.inf).item())
        optimizer.step()
    return norms


@pytest.mark.parametrize("name", NEW_TASKS)
def test_task_builds_the_same_first_batch_and_initial_loss_for_a_seed(name: str) -> None:
    first, second = TASKS[name].build(0), TASKS[name].build(0)
    batch = next(first.epoch_batches())
    assert torch.equal(batch, next(second.epoch_batches()))
    assert first.batch_loss(batch).item() == second.batch_loss(batch).item()
    assert first.training_loss() == second.training_loss()


@pytest.mark.parametrize("name", NEW_TASKS)
def test_another_seed_changes_the_initialisation_but_not_the_data(name: str) -> None:
    zero, one = TASKS[name].build(0), TASKS[name].build(1)
    assert zero.heldout_metric() != one.heldout_metric()
    weights = [(a, b) for a, b in zip(zero.model.parameters(), one.model.parameters(), strict=True)]
    assert not all(torch.equal(a, b) for a, b in weights)


@pytest.mark.parametrize("name", NEW_TASKS)
def test_training_loss_decreases_under_adam_within_thirty_steps(name: str) -> None:
    problem = TASKS[name].build(0)
    optimizer = torch.optim.Adam(problem.model.parameters(), ADAM_LR[name])
    before = problem.training_loss()
    batches = itertools.chain.from_iterable(problem.epoch_batches() for _ in range(30))
    for batch in itertools.islice(batches, 30):
        optimizer.zero_grad()
        problem.batch_loss(batch).backward()
        optimizer.step()
    assert problem.training_loss() < 0.9 * before


@pytest.mark.parametrize("name", NEW_TASKS)
def test_heldout_metric_at_initialisation_is_finite(name: str) -> None:
    assert math.isfinite(TASKS[name].build(0).heldout_metric())


def test_rnn_long_range_gradient_norm_explodes_under_bare_sgd_at_lr_1() -> None:
    # Measured (seed 0): the gradient norm goes 12, 67, 1.2e4, 1.0e4, 5.6e5, 3.6e7 over the
    # first six steps at lr 1, while at lr 0.01 it only falls, from 12 to below 4.
    norms = _sgd_gradient_norms(lr=1.0, steps=6)
    assert not all(math.isfinite(norm) for norm in norms) or max(norms) > 1e4 * norms[0]


def test_rnn_long_range_gradient_norm_never_exceeds_its_initial_value_under_bare_sgd_at_lr_0_01() -> None:
    norms = _sgd_gradient_norms(lr=0.01, steps=10)
    assert max(norms) <= norms[0]


def test_rnn_long_range_recurrent_matrices_start_with_every_singular_value_above_1() -> None:
    rnn = TASKS["rnn_long_range"].build(0).model.rnn
    for layer in range(rnn.num_layers):
        singular_values = torch.linalg.svdvals(getattr(rnn, f"weight_hh_l{layer}"))
        assert singular_values.min().item() > 1.0


def test_seed_lstm_maps_sequences_of_8_steps_of_3_numbers_to_3_logits() -> None:
    inputs, labels = lstm_data(5)
    assert inputs.shape == (5, 8, 3)
    assert labels.dtype == torch.int64
    assert set(labels.tolist()) <= {0, 1, 2}
    assert SeedLSTM()(inputs).shape == (5, 3)


def test_seed_lstm_takes_the_seeds_two_three_number_lists_as_sequences() -> None:
    # The seed's x = [[1, 2, 3], [4, 5, 6]], read as one sequence of two 3-number steps.
    logits = SeedLSTM()(torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]))
    assert logits.shape == (1, 3)


def test_seed_lstm_classes_are_balanced_within_5_percent() -> None:
    _, labels = lstm_data(3072)
    fractions = torch.bincount(labels, minlength=3).float() / len(labels)
    assert torch.allclose(fractions, torch.full((3,), 1 / 3), atol=0.05)


def test_char_transformer_corpus_is_200k_characters_of_python_source() -> None:
    corpus = stdlib_corpus()
    assert len(corpus) == 200_000
    assert corpus.startswith('"""Bisection algorithms."""')


def test_char_transformer_prediction_does_not_see_later_characters() -> None:
    problem = TASKS["char_transformer"].build(0)
    tokens = next(problem.epoch_batches())[:1, :-1]
    changed = tokens.clone()
    changed[0, 40:] = (changed[0, 40:] + 1) % problem.model.readout.out_features
    with torch.no_grad():
        assert torch.allclose(problem.model(tokens)[0, :40], problem.model(changed)[0, :40], atol=1e-5)
