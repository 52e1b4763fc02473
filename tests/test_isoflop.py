"""Compute-optimal analysis on losses generated from a known L(N, D): approaches 2 and 3, checks, report."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from wxscale.fit import Estimate, StartGrid, fit_chinchilla, fit_study
from wxscale.isoflop import (
    Approach2,
    agreement,
    analyse_compute_optimal,
    compute_points,
    fit_isoflop_profiles,
    group_by_budget,
    interpolate_log_log,
    per_variable_fits,
)
from wxscale.planner import GridInfo, Trial, plan
from wxscale.report import write_report
from wxscale.status import build_status
from wxscale.study import parse_study

from test_spec import minimal

# The planted law L(N, D) = E + A / N^alpha + B / D^beta. B puts the optimum at about 20
# tokens per parameter at N = 5e4 (128 tokens per sample), where the design centres its sizes.
ALPHA, BETA, E, A = 0.35, 0.30, 0.02, 1.0
B = ALPHA * A * 5e4**-ALPHA * (20 * 5e4 / 128) ** BETA / BETA
PLANTED_A = BETA / (ALPHA + BETA)
PLANTED_B = ALPHA / (ALPHA + BETA)
BUDGETS = [float(budget) for budget in np.geomspace(1e11, 1e13, 5)]
SHAPES = [(2, 32), (2, 48), (3, 48), (3, 64), (4, 64), (4, 96), (6, 96), (6, 128), (8, 128), (8, 192), (12, 192)]


def fixed_grid(_data) -> GridInfo:
    return GridInfo(n_lat=32, n_lon=64, variables=("tracer",), step_hours=6.0)


def planted_loss(params, samples):
    return E + A / np.asarray(params, dtype=float) ** ALPHA + B / np.asarray(samples, dtype=float) ** BETA


def design_trials(kind: str = "isoflop") -> list[Trial]:
    document = minimal()
    document["spec"]["data"]["history"] = 2
    document["spec"]["model"] = {"patchSize": 4}
    document["spec"]["training"] = {"batchSize": 8}
    if kind == "compute_ladder":
        # The budgets span 100x, so the first branches start within 1 % of the longest runs.
        document["spec"]["training"]["schedule"] = {"kind": "constant_cooldown", "warmupFraction": 0.002}
    document["spec"]["design"] = {
        "kind": kind,
        "budgets": BUDGETS,
        "sizes": {"name": "size", "values": [{"model.depth": depth, "model.embedDim": width, "model.heads": 4}
                                             for depth, width in SHAPES]},
        "sizesPerBudget": 5,
    }
    return plan(parse_study(document), fixed_grid)


def planted_records(trials: list[Trial], noise: float = 0.01, seed: int = 1, worse_variable: bool = False):
    """Result records of the trials with test losses from the planted law times log-normal noise.

    With `worse_variable`, each point also carries a second variable whose MSE grows with compute.
    """
    rng = np.random.default_rng(seed)

    def evaluation(samples: int, flops: float, params: int) -> dict:
        loss = float(planted_loss(params, samples)) * math.exp(rng.normal(0.0, noise))
        variables = {"tracer": {"model": {"mse": 4.0 * loss}}}
        if worse_variable:
            variables["ozone"] = {"model": {"mse": 1e-3 * (flops / 1e11) ** 0.2 * math.exp(rng.normal(0.0, noise))}}
        return {"testLoss": loss, "leadTimeHours": 6.0, "variables": variables}

    records = []
    for trial in trials:
        batch = trial.config.training.batch_size
        ladder = []
        for length in trial.config.training.ladder_steps or []:
            samples = length * batch
            flops = trial.flops_per_sample * samples
            ladder.append({"steps": length, "samples": samples, "flopsAnalytic": flops,
                           "evaluation": evaluation(samples, flops, trial.non_embedding_params)})
        flops = trial.flops_per_sample * trial.samples
        records.append({
            "state": "Succeeded",
            "trial": trial.id,
            "index": trial.index,
            "axisValues": trial.axis_values,
            "model": {"params": trial.params, "nonEmbeddingParams": trial.non_embedding_params},
            "training": {"samples": trial.samples, "flopsAnalytic": flops, "ladder": ladder},
            "evaluation": evaluation(trial.samples, flops, trial.non_embedding_params),
        })
    return records


@pytest.fixture(scope="module")
def records():
    return planted_records(design_trials())


@pytest.fixture(scope="module")
def analysis(records):
    return analyse_compute_optimal(records, n_boot=200, grid=StartGrid.small())


def true_optimum(flops: float, k: float) -> tuple[float, float, float]:
    """Return (N_opt, D_opt, L_opt) of the planted law at C = k N D."""
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    params = g * (flops / k) ** PLANTED_A
    samples = (flops / k) ** PLANTED_B / g
    return params, samples, float(planted_loss(params, samples))


def contains(entry: dict, value: float) -> bool:
    return entry["low"] <= value <= entry["high"]


# Recovery of the planted law ----------------------------------------------------


def test_profiles_match_design_budgets(analysis):
    budgets = analysis["budgets"]
    assert len(budgets) == len(BUDGETS)
    for found, planned in zip(budgets, BUDGETS):
        assert abs(found / planned - 1) <= 0.01


def test_approach2_recovers_planted_exponents(analysis):
    second = analysis["exponents"]["approach2"]
    assert contains(second["a"], PLANTED_A), second["a"]
    assert contains(second["b"], PLANTED_B), second["b"]


def test_approach3_recovers_planted_exponents(analysis):
    third = analysis["exponents"]["approach3"]
    assert contains(third["alpha"], ALPHA), third["alpha"]
    assert contains(third["beta"], BETA), third["beta"]
    assert contains(third["a"], PLANTED_A), third["a"]
    assert contains(third["b"], PLANTED_B), third["b"]


def test_extrapolation_to_ten_times_within_interval(analysis):
    k = analysis["approach3"]["computeOptimal"]["k"]["value"]
    entry = next(e for e in analysis["extrapolation"] if e["factor"] == pytest.approx(10.0))
    assert entry["extrapolation"] is True
    params, samples, loss = true_optimum(entry["flops"], k)
    assert contains(entry["approach3"]["loss"], loss), (entry["approach3"]["loss"], loss)
    assert contains(entry["approach3"]["params"], params), (entry["approach3"]["params"], params)
    assert contains(entry["approach3"]["samples"], samples), (entry["approach3"]["samples"], samples)


def test_approaches_agree(analysis):
    assert analysis["agreement"]["a"]["intervalsOverlap"] is True
    assert analysis["agreement"]["b"]["intervalsOverlap"] is True
    assert analysis["agreement"]["agree"] is True
    assert analysis["agreement"]["warning"] is None


def test_recommendation_at_next_budget(analysis):
    recommendation = analysis["recommendation"]
    assert recommendation["flops"] == pytest.approx(analysis["budgets"][-1] ** 2 / analysis["budgets"][-2])
    assert recommendation["method"] == "approach 3"
    k = analysis["approach3"]["computeOptimal"]["k"]["value"]
    params, _, _ = true_optimum(recommendation["flops"], k)
    assert contains(recommendation["params"], params)


def test_held_out_budget_predicted(analysis):
    held_out = analysis["heldOut"]
    assert held_out["budget"] == pytest.approx(analysis["budgets"][-1])
    assert len(held_out["fittedOn"]) == len(BUDGETS) - 1
    assert held_out["meanAbsoluteRelativeError"] < 0.03
    assert held_out["maxAbsoluteRelativeError"] < 0.05


def test_grid_bias_is_small_for_centred_sizes(analysis):
    assert abs(analysis["gridBias"]["exponentError"]) < 0.05


def test_single_variable_skips_per_variable_fits(analysis):
    assert "one output variable" in analysis["perVariable"]["note"]


def test_analysis_is_json(analysis):
    assert json.loads(json.dumps(analysis, allow_nan=False))["nTrials"] == len(BUDGETS) * 5


# Compute ladder -----------------------------------------------------------------


def test_ladder_points_fit_with_bootstrap_by_trial():
    trials = design_trials("compute_ladder")
    records = planted_records(trials)
    points, _ = compute_points(records)
    assert len(points) == len(BUDGETS) * 5
    assert len({point.trial for point in points}) == len(trials) < len(points)

    analysis = analyse_compute_optimal(records, n_boot=200, grid=StartGrid.small())
    assert analysis["design"] == "compute_ladder"
    assert analysis["nTrials"] == len(trials)
    third = analysis["exponents"]["approach3"]
    assert contains(third["alpha"], ALPHA)
    assert contains(third["beta"], BETA)
    assert contains(analysis["exponents"]["approach2"]["a"], PLANTED_A)


def test_group_bootstrap_keeps_trial_points_together():
    """Points repeated three times within their trial give the intervals of the points taken once."""
    rng = np.random.default_rng(0)
    params = np.repeat([2e4, 5e4, 1e5, 2e5], 3)
    samples = np.tile([5e3, 2e4, 8e4], 4)
    loss = planted_loss(params, samples) * np.exp(rng.normal(0, 0.01, len(params)))
    options = {"n_boot": 40, "grid": StartGrid.small(), "seed": 3}

    once = fit_chinchilla(params, samples, loss, **options)
    labels = np.repeat(np.arange(len(params)), 3)
    grouped = fit_chinchilla(params[labels], samples[labels], loss[labels], groups=labels.tolist(), **options)
    ungrouped = fit_chinchilla(params[labels], samples[labels], loss[labels], **options)

    for name in ("alpha", "beta"):
        assert grouped.parameters[name].low == pytest.approx(once.parameters[name].low, rel=1e-3)
        assert grouped.parameters[name].high == pytest.approx(once.parameters[name].high, rel=1e-3)
    width = lambda fit: fit.parameters["beta"].high - fit.parameters["beta"].low  # noqa: E731
    assert width(ungrouped) < width(grouped)


# Building blocks ----------------------------------------------------------------


def test_group_by_budget_splits_beyond_tolerance():
    groups = group_by_budget([1.00e12, 3.0e12, 1.004e12, 0.998e12 * 1.03, 3.05e12, 1e13])
    assert [sorted(group.tolist()) for group in groups] == [[0, 2, 3], [1, 4], [5]]


def test_interpolate_log_log_extends_end_segments():
    xs, ys = np.array([1.0, 10.0, 100.0]), np.array([2.0, 20.0, 100.0])
    assert interpolate_log_log(10.0, xs, ys) == pytest.approx(20.0)
    assert interpolate_log_log(0.1, xs, ys) == pytest.approx(0.2)
    assert interpolate_log_log(1000.0, xs, ys) == pytest.approx(500.0)


def exact_parabola_records(centre_params: list[float], budgets: list[float], sizes: list[float]) -> list[dict]:
    """Records whose loss is exactly 0.1 + 0.02 (ln N - ln centre)^2 at each budget, with 1000 FLOPs per parameter."""
    records = []
    for budget, centre in zip(budgets, centre_params):
        for params in sizes:
            samples = budget / (1000.0 * params)
            records.append({
                "state": "Succeeded", "trial": f"{budget:g}-{params:g}",
                "model": {"params": params, "nonEmbeddingParams": params},
                "training": {"samples": samples, "flopsAnalytic": budget},
                "evaluation": {"testLoss": 0.1 + 0.02 * math.log(params / centre) ** 2},
            })
    return records


def test_exact_parabola_minimum_and_power_law():
    budgets = [1e12, 1e13, 1e14]
    centres = [1e4 * (budget / 1e12) ** 0.5 for budget in budgets]
    sizes = [3e3, 1e4, 3e4, 1e5, 3e5, 1e6]
    points, _ = compute_points(exact_parabola_records(centres, budgets, sizes))
    approach2 = fit_isoflop_profiles(points, n_boot=50)
    for profile, centre in zip(approach2.profiles, centres):
        assert profile.n_opt.value == pytest.approx(centre, rel=1e-9)
        assert profile.n_opt.high == pytest.approx(centre, rel=1e-9)  # no residual, no spread
        assert profile.d_opt.value == pytest.approx(profile.budget / (1000.0 * centre), rel=1e-9)
    assert approach2.a.value == pytest.approx(0.5, abs=1e-9)
    assert approach2.b.value == pytest.approx(0.5, abs=1e-9)


def test_minimum_outside_sizes_is_flagged():
    budgets = [1e12, 1e13, 1e14]
    records = exact_parabola_records([1e3, 1e3, 1e3], budgets, [3e4, 1e5, 3e5, 1e6])
    analysis = analyse_compute_optimal(records, n_boot=0, grid=StartGrid.small())
    positions = [profile["position"] for profile in analysis["approach2"]["profiles"]]
    assert all(position < -1 for position in positions)
    assert analysis["offCentreBudgets"] == pytest.approx(budgets)
    assert any("outside the trained sizes" in note for note in analysis["notes"])


def test_fewer_than_three_sizes_is_a_note():
    records = exact_parabola_records([1e4], [1e12], [1e4, 3e4])
    fits = fit_study(records, n_boot=0, grid=StartGrid.small())
    assert "at least 3 model sizes" in fits["computeOptimal"]["note"]


def test_agreement_warns_on_disjoint_intervals():
    second = Approach2([], a=Estimate(0.7, 0.65, 0.75), b=Estimate(0.3, 0.25, 0.35), log_g_n=0.0, log_g_d=0.0,
                       confidence=0.95, n_bootstrap=100, n_bootstrap_used=100)
    third = SimpleNamespace(compute_optimal=SimpleNamespace(a=Estimate(0.5, 0.45, 0.55), b=Estimate(0.5, 0.45, 0.55)))
    result = agreement(second, third)
    assert result["agree"] is False
    assert result["a"]["intervalsOverlap"] is False
    assert "N_opt exponent a: approach 2 gives 0.7 [0.65, 0.75], approach 3 gives 0.5 [0.45, 0.55]" in result["warning"]


def test_agreement_unchecked_without_intervals():
    second = Approach2([], a=Estimate(0.5), b=Estimate(0.5), log_g_n=0.0, log_g_d=0.0, confidence=0.95,
                       n_bootstrap=0, n_bootstrap_used=0)
    third = SimpleNamespace(compute_optimal=SimpleNamespace(a=Estimate(0.5, 0.4, 0.6), b=Estimate(0.5, 0.4, 0.6)))
    assert agreement(second, third)["agree"] is None


def test_variable_getting_worse_is_flagged():
    records = planted_records(design_trials(), worse_variable=True)
    points, _ = compute_points(records)
    entries = per_variable_fits(points, n_boot=0, confidence=0.95, seed=0, grid=StartGrid.small())
    by_name = {entry["variable"]: entry for entry in entries}
    assert set(by_name) == {"tracer", "ozone"}
    assert by_name["tracer"]["worseAtBudgets"] == []
    assert len(by_name["ozone"]["worseAtBudgets"]) == len(BUDGETS) - 1
    assert by_name["tracer"]["approach2"]["a"]["value"] == pytest.approx(PLANTED_A, abs=0.15)


# Report and status --------------------------------------------------------------


# Matplotlib warns when a legend has nothing to show; a panel without data must not draw one.
@pytest.mark.filterwarnings("error::UserWarning")
def test_report_shows_curves_and_recommendation(tmp_path, records, analysis):
    path = write_report(records, tmp_path, "planted", fits={"computeOptimal": analysis})
    text = path.read_text()
    assert "## Compute-optimal allocation" in text
    assert "**Recommendation** for the next budget" in text
    assert "### Agreement of approaches 2 and 3" in text
    assert "not measurements" in text
    for name in ("isoflop_profiles.png", "compute_optimal.png", "extrapolation_fan.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0
        assert f"plots/{name}" in text


def test_status_carries_exponents_recommendation_and_agreement(analysis):
    status = build_status([], {}, {}, fit={"computeOptimal": analysis})
    summary = status["computeOptimal"]
    assert summary["exponents"]["a"]["approach2"] == analysis["exponents"]["approach2"]["a"]
    assert summary["exponents"]["beta"] == analysis["exponents"]["approach3"]["beta"]
    assert summary["recommendation"]["params"]["value"] > 0
    assert summary["agreement"] == {"agree": True, "warning": None}


def test_status_without_profiles_has_no_summary():
    status = build_status([], {}, {}, fit={"computeOptimal": {"note": "no profiles"}})
    assert "computeOptimal" not in status


def test_ledger_counts_cooldown_branches():
    trial = design_trials("compute_ladder")[0]
    record = {"state": "Succeeded", "training": {"flopsAnalytic": 1e12, "flopsCooldownBranches": 1e11}}
    status = build_status([trial], {trial.id: "Succeeded"}, {trial.id: record})
    assert status["budget"]["flopsSpent"] == pytest.approx(1.1e12)
