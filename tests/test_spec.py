"""Study files: parsing, validation messages and the quickstart examples."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wxscale.errors import StudyError
from wxscale.spec import add_duration, duration_hours, parse_duration
from wxscale.study import load_study, parse_study

from conftest import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def minimal() -> dict:
    return {
        "apiVersion": "wxscale.io/v1alpha1",
        "kind": "ScalingStudy",
        "metadata": {"name": "tiny"},
        "spec": {
            "data": {
                "source": "synthetic",
                "train": {"start": "2000-01-01", "end": "2000-06-30"},
                "validation": {"start": "2000-07-01", "end": "2000-08-31"},
                "test": {"start": "2000-09-01", "end": "2000-12-31"},
            },
        },
    }


def problems_of(document: dict) -> list[str]:
    with pytest.raises(StudyError) as caught:
        parse_study(document, "study.yaml")
    return caught.value.problems


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_validate(path: Path):
    study = load_study(path)
    assert study.metadata.name


def test_minimal_defaults():
    study = parse_study(minimal())
    assert study.spec.model.depth == 4
    assert study.spec.training.budget.steps == 200
    assert study.spec.data.lead_time == "6h"


def test_unknown_field_named_with_path():
    document = minimal()
    document["spec"]["model"] = {"depht": 4}
    assert problems_of(document) == [
        "spec.model.depht: unknown field; remove it or check its spelling (fields are camelCase), got 4"
    ]


def test_all_errors_reported_at_once():
    document = minimal()
    document["spec"]["model"] = {"depth": 0, "embedDim": 100, "heads": 3}
    document["spec"]["training"] = {"batchSize": -1}
    problems = problems_of(document)
    assert any(p.startswith("spec.model.depth:") and "got 0" in p for p in problems)
    assert any(p.startswith("spec.training.batchSize:") and "got -1" in p for p in problems)


def test_heads_must_divide_width():
    document = minimal()
    document["spec"]["model"] = {"embedDim": 100, "heads": 3}
    (problem,) = problems_of(document)
    assert problem.startswith("spec.model:")
    assert "embedDim=100 heads=3" in problem


def test_overlapping_periods_rejected():
    document = minimal()
    document["spec"]["data"]["test"] = {"start": "2000-08-01", "end": "2000-12-31"}
    (problem,) = problems_of(document)
    assert "validation and test periods overlap" in problem


def test_axis_value_error_names_axis():
    document = minimal()
    document["spec"]["axes"] = [
        {"field": "model.embedDim", "values": [64, 128]},
        {"field": "model.depth", "values": [0, 2]},
    ]
    problems = problems_of(document)
    assert problems == ["spec.axes[1].values[0]: model.depth: Input should be greater than or equal to 1, got 0"]


def test_axis_unknown_field_lists_siblings():
    document = minimal()
    document["spec"]["axes"] = [{"field": "model.dept", "values": [1, 2]}]
    (problem,) = problems_of(document)
    assert problem.startswith("spec.axes[0]: unknown field 'model.dept'")
    assert "depth" in problem


def test_budget_needs_exactly_one():
    document = minimal()
    document["spec"]["training"] = {"budget": {"steps": 10, "samples": 100}}
    (problem,) = problems_of(document)
    assert "exactly one of steps, samples or flops" in problem


def test_bad_duration_message():
    document = minimal()
    document["spec"]["data"]["leadTime"] = "six hours"
    (problem,) = problems_of(document)
    assert problem.startswith("spec.data.leadTime:")
    assert "'6h'" in problem


def test_durations():
    assert parse_duration("6h") == (6.0, "h")
    assert duration_hours("2d") == 48.0
    assert duration_hours("1w") == 168.0
    with pytest.raises(ValueError):
        duration_hours("1mo")
    import pandas as pd

    assert add_duration(pd.Timestamp("2013-01-31"), "1mo") == pd.Timestamp("2013-02-28")
    assert add_duration(pd.Timestamp("2013-01-01"), "1y") == pd.Timestamp("2014-01-01")


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(StudyError, match="file not found"):
        load_study(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    with pytest.raises(StudyError, match="invalid YAML"):
        load_study(bad)


def test_validate_cli_exit_codes(tmp_path: Path):
    good = subprocess.run([sys.executable, "-m", "wxscale", "validate", str(REPO / "examples/quickstart.yaml")],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "16 trial(s)" in good.stdout

    document = copy.deepcopy(minimal())
    document["spec"]["model"] = {"depth": 0}
    document["spec"]["axes"] = [{"field": "model.heads", "values": [3]}]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(document))
    bad = subprocess.run([sys.executable, "-m", "wxscale", "validate", str(path)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "spec.model.depth" in bad.stderr


def test_reference_doc_matches_model():
    generated = subprocess.run([sys.executable, str(REPO / "scripts/study_reference.py")], capture_output=True,
                               text=True, check=True).stdout
    assert (REPO / "docs/study.md").read_text() == generated, (
        "docs/study.md is stale: run `python scripts/study_reference.py > docs/study.md`"
    )


def test_heads_hint_lists_divisors():
    document = minimal()
    document["spec"]["model"] = {"embedDim": 64, "heads": 3}
    (problem,) = problems_of(document)
    assert "use heads in [1, 2, 4, 8, 16, 32, 64]" in problem
