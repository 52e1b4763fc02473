"""Smoke tests of the benchmark suite: every benchmark runs in its tiny mode and returns well-formed rows.

The figures of a tiny run mean nothing, so nothing here checks them against a goal.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from pathlib import Path

import pytest

from conftest import REPO

# The suite is a folder of the repository, not an installed package: `python -m benchmarks` runs from the root.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.__main__ import BENCHMARKS, main  # noqa: E402


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_runs_tiny(name: str):
    rows = importlib.import_module(BENCHMARKS[name]).run("tiny")

    assert rows
    for row in rows:
        assert row.benchmark == name
        assert math.isfinite(row.value), row
        assert row.value >= 0, row
        assert row.reference
        if row.reference_value is not None:
            assert row.reference_value > 0, row
            assert row.ratio == pytest.approx(row.value / row.reference_value)
        if row.goal is not None:
            assert row.met in (True, False), row


def test_suite_command_prints_table_and_json(tmp_path: Path, capsys):
    output = tmp_path / "results.json"

    assert main(["--tiny", "--only", "flops", "fit", "--json", str(output), "--log-level", "WARNING"]) == 0

    printed = capsys.readouterr().out
    assert "| benchmark | metric | value | reference | ratio | goal | met | note |" in printed
    assert "machine: " in printed
    written = json.loads(output.read_text())
    assert {row["benchmark"] for row in written["results"]} == {"flops", "fit"}
    assert written["machine"]["cores"] >= 1
    assert written["failures"] == {}


def test_quickstart_models_cover_plan():
    from benchmarks.common import quickstart_models
    from wxscale.planner import plan
    from wxscale.study import load_study

    study = load_study(REPO / "examples" / "quickstart.yaml")
    planned = {trial.config.model.model_dump_json() for trial in plan(study)}
    models = quickstart_models()

    assert {model.spec.model_dump_json() for model in models} == planned
    sizes = [model.spec.depth * model.spec.embed_dim**2 for model in models]
    assert sizes == sorted(sizes)
    for model in models:
        assert model.batch == study.spec.training.batch_size
        assert model.threads == max(1, (os.cpu_count() or 1) // study.spec.max_concurrent_trials)
