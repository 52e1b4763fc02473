"""Planner: grid products, linked and scaled axes, explicit points, budgets and ids."""

from __future__ import annotations

import pytest

from wxscale.spec import ScalingStudy
from wxscale.planner import GridInfo, expand, plan, training_steps
from wxscale.study import load_study, parse_study

from conftest import REPO
from test_spec import minimal


def fixed_grid(_data) -> GridInfo:
    return GridInfo(n_lat=32, n_lon=64, variables=("tracer",), step_hours=6.0)


def test_grid_product_holds_other_fields():
    document = minimal()
    document["spec"]["model"] = {"embedDim": 64, "depth": 3}
    document["spec"]["axes"] = [
        {"field": "model.embedDim", "values": [32, 64, 128]},
        {"field": "data.datasetFraction", "values": [0.25, 1.0]},
    ]
    trials, problems = expand(parse_study(document))
    assert problems == []
    assert len(trials) == 6
    assert {c.model.embed_dim for _, c in trials} == {32, 64, 128}
    assert {c.model.depth for _, c in trials} == {3}
    assert {c.data.dataset_fraction for _, c in trials} == {0.25, 1.0}


def test_scaled_axis_multiplies_base():
    document = minimal()
    document["spec"]["model"] = {"depth": 2, "heads": 2, "embedDim": 64}
    document["spec"]["axes"] = [{"name": "size", "fields": ["model.depth", "model.heads"], "factors": [1, 2, 4]}]
    trials, _ = expand(parse_study(document))
    assert [(c.model.depth, c.model.heads) for _, c in trials] == [(2, 2), (4, 4), (8, 8)]
    assert [values["size"] for values, _ in trials] == [1, 2, 4]


def test_linked_values_and_points():
    document = minimal()
    document["spec"]["axes"] = [{"name": "shape", "values": [{"model.depth": 2, "model.heads": 2},
                                                            {"model.depth": 6, "model.heads": 8}]}]
    trials, _ = expand(parse_study(document))
    assert [(c.model.depth, c.model.heads) for _, c in trials] == [(2, 2), (6, 8)]

    document["spec"]["points"] = [{"data.history": 1}, {"data.history": 4, "data.historyInterval": 4}]
    trials, _ = expand(parse_study(document))
    assert [(c.data.history, c.data.history_interval) for _, c in trials] == [(1, 1), (4, 4)]


def test_duplicate_configs_collapse():
    document = minimal()
    document["spec"]["model"] = {"depth": 4}
    document["spec"]["axes"] = [{"field": "model.depth", "values": [4, 4, 2]}]
    trials, _ = expand(parse_study(document))
    assert len(trials) == 2


def test_trial_ids_stable_and_distinct():
    study = load_study(REPO / "examples/quickstart.yaml")
    first = [t.id for t in plan(study, grid_resolver=fixed_grid)]
    second = [t.id for t in plan(study, grid_resolver=fixed_grid)]
    assert first == second
    assert len(set(first)) == len(first)
    assert all(i.startswith("t-") and len(i) == 12 for i in first)


def test_budget_resolution():
    document = minimal()
    document["spec"]["training"] = {"batchSize": 16, "budget": {"samples": 100}}
    (_, config), = expand(parse_study(document))[0]
    assert training_steps(config, flops_per_sample=1e6) == 7  # ceil(100 / 16)

    document["spec"]["training"] = {"batchSize": 10, "budget": {"flops": 1e9}}
    (_, config), = expand(parse_study(document))[0]
    assert training_steps(config, flops_per_sample=1e6) == 100  # 1e9 / (1e6 * 10)


def test_plan_attaches_costs():
    study = load_study(REPO / "examples/quickstart.yaml")
    trials = plan(study, grid_resolver=fixed_grid)
    by_size = sorted(trials, key=lambda t: t.params)
    assert by_size[0].params < by_size[-1].params
    for trial in trials:
        assert trial.total_flops == pytest.approx(trial.flops_per_sample * trial.samples)
        assert trial.samples == trial.steps * trial.config.training.batch_size
        assert trial.grid == (32, 64)


def test_batch_must_divide_processes():
    document = minimal()
    document["spec"]["training"] = {"batchSize": 15}
    document["spec"]["axes"] = [{"field": "distributed.procsPerNode", "values": [1, 2]}]
    study = ScalingStudy.model_validate(document)  # parse_study would raise on the axis problem
    _, problems = expand(study)
    assert any("spec.axes[0].values[1]" in p and "batchSize (15)" in p for p in problems)


def test_lead_time_must_match_step():
    from wxscale.errors import StudyError

    document = minimal()
    document["spec"]["data"]["leadTime"] = "5h"
    with pytest.raises(StudyError) as caught:
        plan(parse_study(document), grid_resolver=fixed_grid)
    (problem,) = caught.value.problems
    assert problem.startswith("spec.data.leadTime: '5h' (5 h) is not a multiple of the data step 6 h")

    document["spec"]["data"]["leadTime"] = "12h"
    assert len(plan(parse_study(document), grid_resolver=fixed_grid)) == 1


def _grid_spanning(first: str, last: str):
    from datetime import datetime

    def resolve(_data) -> GridInfo:
        return GridInfo(32, 64, ("tracer",), 6.0, time_start=datetime.fromisoformat(first),
                        time_end=datetime.fromisoformat(last))

    return resolve


def test_split_outside_data_warns(caplog):
    document = minimal()
    with caplog.at_level("WARNING", logger="wxscale.planner"):
        plan(parse_study(document), grid_resolver=_grid_spanning("2000-01-01T00:00", "2000-10-31T18:00"))
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith("spec.data.test: 2000-09-01 00:00..2000-12-31 00:00 reaches outside the data")
    assert "2000-01-01 00:00..2000-10-31 18:00" in warnings[0]


def test_split_inside_data_silent(caplog):
    with caplog.at_level("WARNING", logger="wxscale.planner"):
        plan(parse_study(minimal()), grid_resolver=_grid_spanning("2000-01-01T00:00", "2000-12-31T18:00"))
    assert [record for record in caplog.records if record.levelname == "WARNING"] == []


def test_split_outside_data_rejected(caplog):
    from wxscale.errors import StudyError

    document = minimal()
    # Training ends after the data does, but its one month of temporal coverage lies inside the data, so only
    # validation and test, which start after the data ends, have no samples.
    document["spec"]["data"]["temporalCoverage"] = "1mo"
    with caplog.at_level("WARNING", logger="wxscale.planner"), pytest.raises(StudyError) as caught:
        plan(parse_study(document), grid_resolver=_grid_spanning("2000-01-01T00:00", "2000-03-31T18:00"))

    problems = caught.value.problems
    assert [problem.split(":")[0] for problem in problems] == ["spec.data.validation", "spec.data.test"]
    assert problems[0].startswith("spec.data.validation: 2000-07-01 00:00..2000-08-31 00:00 lies outside the data, "
                                  "which covers 2000-01-01 00:00..2000-03-31 18:00")
    assert [record for record in caplog.records if record.levelname == "WARNING"] == []
