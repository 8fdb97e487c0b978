"""The experiments framework: a tiny grid end to end, resume, skipped peers, record schema."""

import json
import shutil
from pathlib import Path

import pytest

from adaptive_lr.controller import EVENTS
from experiments import cli, config
from experiments.config import RunSpec
from experiments.methods import METHODS, Method
from experiments.runner import RUNS_FILE, read_records, run_grid

TINY_CONFIG = {
    "grid": {
        "tasks": ["seed_he"],
        "methods": ["sgd_momentum", "adaptive_sgd"],
        "lrs": [0.01, 1.0],
        "seeds": [0],
    },
    "epochs": {"seed_he": 1},
}


def _run(specs: list[RunSpec], results: Path) -> tuple:
    lines: list[str] = []
    summary = run_grid(specs, results, workers=1, progress=False, log=lines.append)
    return summary, lines


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("tiny")
    _run(config.expand(TINY_CONFIG), results)
    return results


@pytest.fixture
def tiny_copy(tiny_results: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_results, tmp_path / "results"))


def test_tiny_grid_writes_one_ok_record_per_run(tiny_results: Path) -> None:
    records = read_records(tiny_results)
    expected = {spec.run_id for spec in config.expand(TINY_CONFIG)}
    assert len(expected) == 4
    assert [record["status"] for record in records] == ["ok"] * 4
    assert {record["id"] for record in records} == expected


def test_rerun_skips_finished_runs_and_appends_no_lines(tiny_copy: Path) -> None:
    before = (tiny_copy / RUNS_FILE).read_text()
    summary, lines = _run(config.expand(TINY_CONFIG), tiny_copy)
    assert (tiny_copy / RUNS_FILE).read_text() == before
    assert summary.ran == []
    assert len(summary.already_done) == 4
    assert any("skipped 4 run(s) already in" in line for line in lines)


def test_rerun_with_a_larger_grid_runs_only_the_new_points(tiny_copy: Path) -> None:
    grid = {**TINY_CONFIG, "grid": {**TINY_CONFIG["grid"], "seeds": [0, 1]}}
    summary, _ = _run(config.expand(grid), tiny_copy)
    assert len(summary.ran) == 4
    assert len(summary.already_done) == 4
    assert len(read_records(tiny_copy)) == 8


def _register_missing_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a method whose package is missing must not be built")

    peer = Method(
        "missing_peer", "a peer whose package is absent", build, requires="no_such_package_adaptive_lr"
    )
    monkeypatch.setitem(METHODS, peer.name, peer)


def test_method_whose_package_is_missing_is_reported_and_skipped_not_crashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register_missing_peer(monkeypatch)
    spec = RunSpec("noisy_quadratic", "missing_peer", 0.1, 0, 1)
    summary, lines = _run([spec], tmp_path)
    assert spec.run_id in summary.unavailable
    assert summary.failed == {}
    assert any("skipped method missing_peer" in line and "not installed" in line for line in lines)
    [record] = read_records(tmp_path)
    assert record["status"] == "skipped"
    assert record["id"] == spec.run_id
    assert "no_such_package_adaptive_lr" in record["reason"]


def test_skipped_record_is_written_once_across_reruns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register_missing_peer(monkeypatch)
    spec = RunSpec("noisy_quadratic", "missing_peer", 0.1, 0, 1)
    _run([spec], tmp_path)
    _run([spec], tmp_path)
    assert [record["status"] for record in read_records(tmp_path)] == ["skipped"]


def test_record_fields_are_present_and_typed(tiny_results: Path) -> None:
    records = {record["id"]: record for record in read_records(tiny_results)}
    for record in records.values():
        spec = record["config"]
        assert set(spec) >= {"task", "method", "lr", "seed", "epochs", "steps_per_epoch", "target_loss"}
        assert isinstance(record["loss_curve"], list)
        assert isinstance(record["diverged"], bool)
        assert isinstance(record["steps"], int)
        assert isinstance(record["wall_time_s"], float)
        assert record["heldout_metric"] == "accuracy"
        assert record["steps_to_target"] is None or isinstance(record["steps_to_target"], int)
        assert len(record["trace"]["lr"]) == record["steps"]
        if record["diverged"]:
            assert record["final_training_loss"] is None
            assert record["heldout_value"] is None
        else:
            assert len(record["loss_curve"]) == spec["epochs"] + 1
            assert isinstance(record["final_training_loss"], float)
            assert 0.0 <= record["heldout_value"] <= 1.0
        if spec["method"].startswith("adaptive"):
            assert set(record["events"]) == set(EVENTS)
            assert all(isinstance(count, int) for count in record["events"].values())
        else:
            assert record["events"] is None


def test_constant_lr_sgd_diverges_at_lr_1_on_the_seed_network(tiny_results: Path) -> None:
    records = {record["id"]: record for record in read_records(tiny_results)}
    assert records[RunSpec("seed_he", "sgd_momentum", 1.0, 0, 1).run_id]["diverged"] is True
    assert records[RunSpec("seed_he", "sgd_momentum", 0.01, 0, 1).run_id]["diverged"] is False


def test_parallel_workers_write_the_same_results_as_inline(tmp_path: Path, tiny_results: Path) -> None:
    specs = config.expand(TINY_CONFIG)
    run_grid(specs, tmp_path, workers=2, progress=False, log=lambda line: None)

    def finals(results: Path) -> dict:
        return {record["id"]: record["final_training_loss"] for record in read_records(results)}

    assert finals(tmp_path) == finals(tiny_results)


@pytest.mark.parametrize("preset", config.PRESETS)
def test_presets_expand_to_registered_tasks_and_methods(preset: str) -> None:
    specs = config.expand(config.load(config.preset_path(preset)))
    assert specs
    assert len({spec.run_id for spec in specs}) == len(specs)


def test_full_preset_lr_grid_is_eleven_half_decades_from_1e_4_to_10() -> None:
    lrs = config.learning_rates(config.load(config.preset_path("full"))["grid"]["lrs"])
    assert lrs == [1e-4, 3.16228e-4, 1e-3, 3.16228e-3, 0.01, 0.0316228, 0.1, 0.316228, 1.0, 3.16228, 10.0]


def test_unknown_method_in_a_config_is_rejected_with_the_known_names() -> None:
    bad = {**TINY_CONFIG, "grid": {**TINY_CONFIG["grid"], "methods": ["sgd_momentun"]}}
    with pytest.raises(ValueError, match="sgd_momentun"):
        config.expand(bad)


def test_every_component_has_an_ablation_method() -> None:
    from adaptive_lr.options import COMPONENTS

    assert all(f"adaptive_sgd_no_{component}" in METHODS for component in COMPONENTS)


def test_cli_runs_a_config_file_and_prints_the_counts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(
        '[grid]\ntasks = ["noisy_quadratic"]\nmethods = ["adam"]\nlrs = [0.1]\nseeds = [0]\n'
        "[epochs]\nnoisy_quadratic = 1\n"
    )
    status = cli.main(["run", "--config", str(path), "--results", str(tmp_path / "out"), "--no-progress"])
    assert status == 0
    assert "1 ran, 0 already done" in capsys.readouterr().out
    [line] = (tmp_path / "out" / RUNS_FILE).read_text().splitlines()
    assert json.loads(line)["config"]["method"] == "adam"
