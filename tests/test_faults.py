"""Fault injection (experiments/faults.py): the wrapped run survives every fault.

Invariants for adaptive_lr.wrap(SGD) under each fault: the run completes, no parameter or
optimizer-state tensor is ever non-finite, and the final loss is within FACTOR of the
clean wrapped run. The same faults are checked to be real: they break bare SGD.
"""

from __future__ import annotations

import pytest

from experiments import faults

STEPS = 240
FACTOR = 3.0
"""Stated bound: final loss under a fault at most 3x the clean run's (measured: at most 2.3x)."""
SURVIVABLE = [f for f in faults.FAULTS if f not in ("clean", "sparse_grad")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clean() -> faults.Outcome:
    return faults.run("clean", "adaptive", steps=STEPS)


@pytest.mark.parametrize("fault", SURVIVABLE)
def test_wrapped_run_completes_finite_and_close_to_the_clean_run_under(
    fault: str, clean: faults.Outcome
) -> None:
    outcome = faults.run(fault, "adaptive", steps=STEPS)
    assert outcome.completed, outcome.error
    assert outcome.steps == STEPS
    assert outcome.nonfinite_at_step is None
    assert outcome.final_loss is not None and outcome.final_loss <= FACTOR * clean.final_loss


@pytest.mark.parametrize("fault", ["nan_grad", "inf_grad", "poisoned_batch", "loss_spike"])
def test_the_injected_fault_breaks_bare_sgd(fault: str) -> None:
    outcome = faults.run(fault, "sgd", steps=STEPS)
    assert outcome.nonfinite_at_step is not None


def test_sparse_gradients_are_a_clear_error_for_the_wrapper() -> None:
    outcome = faults.run("sparse_grad", "adaptive", steps=STEPS)
    assert not outcome.completed
    assert outcome.steps == 0
    assert outcome.error.startswith("ValueError: adaptive_lr does not support sparse gradients")


def test_table_lists_every_outcome_with_its_ratio_to_the_clean_run(clean: faults.Outcome) -> None:
    spiked = faults.Outcome("loss_spike", "adaptive", True, None, None, 2 * clean.final_loss, STEPS)
    text = faults.table([clean, spiked])
    assert "| loss_spike | adaptive | yes | never |" in text
    assert text.rstrip().endswith("| 2.00 |")


def test_unknown_fault_or_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="fault must be one of"):
        faults.run("gamma_rays", "adaptive")
    with pytest.raises(ValueError, match="method must be one of"):
        faults.run("clean", "lbfgs")
