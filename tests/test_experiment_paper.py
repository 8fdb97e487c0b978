"""The write-up is generated from records: every placeholder filled, nothing typed by hand."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from adaptive_lr.options import ControllerOptions
from experiments.paper import PAPERS, build_paper
from experiments.runner import RUNS_FILE

FIXTURE = Path(__file__).parent / "fixtures" / "runs_small.jsonl"


@pytest.fixture(scope="module")
def paper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("paper")
    results = root / "results"
    results.mkdir()
    shutil.copy(FIXTURE, results / RUNS_FILE)
    return build_paper(results, preset="quick", out=root / "paper.md")


def test_every_placeholder_of_the_template_is_filled(paper: Path) -> None:
    assert not re.search(r"\{\{.*?\}\}", paper.read_text())


def test_every_controller_option_and_its_default_is_in_the_paper(paper: Path) -> None:
    text = paper.read_text()
    for name, default in ControllerOptions().to_dict().items():
        assert f"| `{name}` | `{default!r}` |" in text


def test_tables_and_figures_of_the_tasks_in_the_records_are_included(paper: Path) -> None:
    text = paper.read_text()
    assert "robustness_seed_he.png" in text
    assert (paper.parent / "generated" / "robustness_seed_he.png").exists()
    assert "_(no results for task char_transformer" in text  # not in the fixture: said, not hidden


def test_the_template_cites_only_keys_of_the_bibliography() -> None:
    cited = set(re.findall(r"@([a-z0-9]+)", (PAPERS / "paper.template.md").read_text()))
    defined = set(re.findall(r"@\w+\{([a-z0-9]+),", (PAPERS / "references.bib").read_text()))
    assert cited and cited <= defined


def test_optional_sections_say_how_to_produce_them_when_absent(paper: Path) -> None:
    text = paper.read_text()
    assert (
        "_(not in this build: run `python -m experiments run --config experiments/configs/targets_all.toml"
        in text
    )
    assert "_(not in this build: run `python benchmarks/quadratic_limit.py`" in text
    assert "_(not in this build: run `python benchmarks/overhead.py" in text


def test_optional_sections_are_filled_from_their_results(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(FIXTURE, results / RUNS_FILE)
    benchmarks = tmp_path / "bench"
    benchmarks.mkdir()
    for name in (
        "quadratic_limit",
        "overhead",
        "overhead_large",
        "overhead_tensors",
        "overhead_krylov",
        "probe_warm_start",
    ):
        payload = {
            "command": f"python benchmarks/{name}.py --x",
            "machine": {"torch": "t"},
            "markdown": f"| {name} |",
        }
        (benchmarks / f"{name}.json").write_text(json.dumps(payload))
    out = build_paper(
        results, preset="quick", out=tmp_path / "paper.md", targets_results=results, benchmarks=benchmarks
    )
    text = out.read_text()
    assert "not in this build" not in text
    assert "| quadratic_limit |" in text and "| overhead |" in text
    assert "written by `python benchmarks/overhead.py --x`" in text
    # The targets section of the second grid: its table header and the records' path.
    assert text.count("| method | task | divergence 0% | width | default within 1.1x |") == 2
    assert f"From `{results / RUNS_FILE}`" in text
