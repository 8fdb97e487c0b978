"""Specification of adaptive_lr.options: every option validated once, at construction.

Unknown names raise TypeError, wrong types raise TypeError, out-of-range values raise
ValueError; every message names the option concerned.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from typing import Any

import pytest

from adaptive_lr.options import COMPONENTS, ControllerOptions

NAN = math.nan
INF = math.inf


# (option, value outside its documented range). Every numeric option appears at least once;
# `test_out_of_range_table_covers_every_numeric_option` keeps it that way.
OUT_OF_RANGE: list[tuple[str, Any]] = [
    ("initial_lr_multiplier", 0.0),
    ("initial_lr_multiplier", -1.0),
    ("initial_lr_multiplier", NAN),
    ("initial_lr_multiplier", INF),
    ("min_lr_multiplier", 0.0),
    ("min_lr_multiplier", -1e-6),
    ("min_lr_multiplier", NAN),
    ("min_lr_multiplier", INF),
    ("max_lr_multiplier", 1e-7),  # below the default min_lr_multiplier
    ("max_lr_multiplier", NAN),
    ("max_lr_multiplier", INF),
    ("growth_rate", -0.01),
    ("growth_rate", 1.01),
    ("growth_rate", NAN),
    ("growth_rate", INF),
    ("recovery_deadband", -0.01),
    ("recovery_deadband", 1.0),
    ("recovery_deadband", NAN),
    ("cap_approach", -0.01),
    ("cap_approach", 1.01),
    ("cap_approach", NAN),
    ("cooldown_steps", -1),
    ("norm_decay", -0.01),
    ("norm_decay", 1.0),
    ("norm_decay", NAN),
    ("norm_decay", INF),
    ("spike_threshold", 0.0),
    ("spike_threshold", -3.0),
    ("spike_threshold", NAN),
    ("spike_threshold", INF),
    ("min_log_std", -0.01),
    ("min_log_std", NAN),
    ("min_log_std", INF),
    ("warmup_steps", 0),
    ("spike_backoff", 0.0),
    ("spike_backoff", 1.01),
    ("spike_backoff", NAN),
    ("spike_backoff", INF),
    ("skip_backoff", 0.0),
    ("skip_backoff", 1.01),
    ("skip_backoff", NAN),
    ("skip_backoff", INF),
    ("max_update_ratio", 0.0),
    ("max_update_ratio", -0.05),
    ("max_update_ratio", NAN),
    ("max_update_ratio", INF),
    ("sample_fraction", 0.0),
    ("sample_fraction", 1.5),
    ("sample_fraction", NAN),
    ("min_sample_size", 0),
    ("anneal_factor", 0.0),
    ("anneal_factor", 1.5),
    ("anneal_window", 0),
    ("anneal_tolerance", 0.0),
    ("max_grad_norm", 0.0),
    ("max_grad_norm", -1.0),
    ("max_grad_norm", NAN),
    ("max_grad_norm", INF),
    ("curvature_decay", -0.01),
    ("curvature_decay", 1.0),
    ("curvature_decay", NAN),
    ("curvature_decay", INF),
    ("stability_margin", 0.0),
    ("stability_margin", 1.01),
    ("stability_margin", NAN),
    ("stability_margin", INF),
    ("curvature_probe_every", -1),
    ("probe_iterations", 0),
    ("probe_tolerance", 0.0),
    ("probe_tolerance", NAN),
    ("probe_solver", "lanczos"),  # not one of PROBE_SOLVERS
    ("probe_solver", "Power"),
    ("curvature_range_decay", 1.0),
    ("curvature_range_decay", -0.1),
    ("min_momentum", -0.01),
    ("min_momentum", 1.0),
    ("min_momentum", NAN),
    ("min_momentum", INF),
    ("max_momentum", -0.01),  # below the default min_momentum
    ("max_momentum", 1.0),
    ("max_momentum", NAN),
    ("max_momentum", INF),
    ("cosine_decay", -0.01),
    ("cosine_decay", 1.0),
    ("cosine_decay", NAN),
    ("cosine_decay", INF),
    ("history_size", 0),
]

# (option, value of the wrong type).
WRONG_TYPE: list[tuple[str, Any]] = [
    ("growth_rate", "0.05"),
    ("growth_rate", True),
    ("max_grad_norm", False),
    ("max_grad_norm", "1.0"),
    ("cooldown_steps", 10.0),
    ("warmup_steps", 1.5),
    ("history_size", None),
    ("probe_solver", 1),
    ("probe_solver", None),
    ("spike_guard", 1),
    ("recovery", "yes"),
    ("preconditioned", 0),
]


def names_option(name: str) -> str:
    """A pytest.raises pattern matching a message that names `name` as a whole word."""
    return rf"\b{re.escape(name)}\b"


def valued_options() -> set[str]:
    """The options that are not flags: numbers, and the probe's solver by name."""
    return {f.name for f in fields(ControllerOptions) if "bool" not in str(f.type)}


def test_defaults_validate() -> None:
    options = ControllerOptions()
    assert ControllerOptions(**options.to_dict()) == options


def test_out_of_range_table_covers_every_option_but_the_flags() -> None:
    assert {name for name, _ in OUT_OF_RANGE} == valued_options()


@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE)
def test_out_of_range_option_raises_value_error_naming_it(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=names_option(name)):
        ControllerOptions(**{name: value})


@pytest.mark.parametrize(("name", "value"), WRONG_TYPE)
def test_wrong_type_raises_type_error_naming_the_option(name: str, value: Any) -> None:
    with pytest.raises(TypeError, match=names_option(name)):
        ControllerOptions(**{name: value})


def test_int_is_accepted_for_a_float_option() -> None:
    assert ControllerOptions(max_lr_multiplier=10).max_lr_multiplier == 10


def test_optional_options_accept_none() -> None:
    options = ControllerOptions(max_grad_norm=None, preconditioned=None)
    assert options.max_grad_norm is None
    assert options.preconditioned is None


def test_unknown_keyword_in_from_kwargs_raises_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match=names_option("learning_rate")):
        ControllerOptions.from_kwargs(learning_rate=0.1)


def test_from_kwargs_builds_the_same_options_as_the_constructor() -> None:
    assert ControllerOptions.from_kwargs(growth_rate=0.1) == ControllerOptions(growth_rate=0.1)


def test_replace_changes_only_the_named_option() -> None:
    options = ControllerOptions().replace(spike_threshold=4.0)
    assert options.spike_threshold == 4.0
    assert options == ControllerOptions(spike_threshold=4.0)


def test_replace_validates_the_new_value() -> None:
    with pytest.raises(ValueError, match=names_option("spike_backoff")):
        ControllerOptions().replace(spike_backoff=2.0)


def test_replace_rejects_an_unknown_name() -> None:
    with pytest.raises(TypeError, match=names_option("spike_treshold")):
        ControllerOptions().replace(spike_treshold=4.0)


def test_component_flags_are_every_bool_option_but_telemetry_experimental_and_distributed_ones() -> None:
    bool_options = {f.name for f in fields(ControllerOptions) if str(f.type) == "bool"}
    assert bool_options == {
        *COMPONENTS,
        "track_successive_cosine",
        "anneal",
        "sync_ranks",
        "restore_after_event",
        "lower_momentum",  # variants of a component's rule, not components
    }


@pytest.mark.parametrize("flag", COMPONENTS)
def test_all_off_switches_off_every_component(flag: str) -> None:
    assert getattr(ControllerOptions(), flag) is True
    assert getattr(ControllerOptions.all_off(), flag) is False


def test_all_off_keeps_other_changes() -> None:
    options = ControllerOptions.all_off(recovery=True, growth_rate=0.2)
    assert options.recovery is True
    assert options.growth_rate == 0.2
    assert options.spike_guard is False


def test_all_off_validates_other_changes() -> None:
    with pytest.raises(ValueError, match=names_option("growth_rate")):
        ControllerOptions.all_off(growth_rate=-1.0)


@pytest.mark.parametrize(
    "bounds",
    [
        {"initial_lr_multiplier": 0.5, "min_lr_multiplier": 0.6},
        {"initial_lr_multiplier": 20.0, "max_lr_multiplier": 10.0},
    ],
    ids=["below_min", "above_max"],
)
def test_initial_lr_multiplier_outside_the_multiplier_bounds_raises(bounds: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=names_option("initial_lr_multiplier")):
        ControllerOptions(**bounds)


def test_initial_lr_multiplier_at_a_bound_is_valid() -> None:
    options = ControllerOptions(initial_lr_multiplier=10.0, max_lr_multiplier=10.0)
    assert options.initial_lr_multiplier == options.max_lr_multiplier


def test_skip_backoff_above_spike_backoff_raises_naming_both() -> None:
    """A non-finite gradient is the largest spike: it must never cut the lr less."""
    with pytest.raises(ValueError, match=r"skip_backoff.*spike_backoff"):
        ControllerOptions(spike_backoff=0.5, skip_backoff=0.7)


@pytest.mark.parametrize("name", [f.name for f in fields(ControllerOptions)])
def test_every_option_is_documented_in_the_class_docstring(name: str) -> None:
    assert re.search(rf"\b{name}[:,]", ControllerOptions.__doc__ or "")


def test_full_batch_sets_its_documented_settings_and_takes_overrides() -> None:
    options = ControllerOptions.full_batch()
    assert options.curvature_probe_every == 100
    assert options.lower_momentum is True
    assert options.curvature_range_decay == 0.999
    assert options.stability_margin == 0.9
    assert options.cap_approach == 0.5
    assert options.cosine_decay == 0.0  # deterministic: each step's cosine is exact
    assert options.update_guard is False  # the probe bounds the first step
    assert all(getattr(options, name) for name in COMPONENTS if name != "update_guard")
    assert ControllerOptions.full_batch(curvature_probe_every=10).curvature_probe_every == 10
    with pytest.raises(ValueError, match="stability_margin"):
        ControllerOptions.full_batch(stability_margin=1.5)
