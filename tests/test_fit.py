"""Scaling-law fits recover planted laws, and reject point sets that cannot pin one down."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wxscale.errors import WxscaleError
from wxscale.fit import (
    FIT_NAMES,
    FitError,
    StartGrid,
    compute_frontier,
    fit_chinchilla,
    fit_power_law,
    fit_study,
)

# The Chinchilla paper's fitted law (Hoffmann et al. 2022), planted here.
PLANTED = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def chinchilla_loss(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return PLANTED["E"] + PLANTED["A"] / n ** PLANTED["alpha"] + PLANTED["B"] / d ** PLANTED["beta"]


@pytest.fixture(scope="module")
def planted_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 7 x 7 grid of N in 1e6..1e9 and D in 1e8..1e11 with 2 % multiplicative noise on the loss."""
    n, d = np.meshgrid(np.logspace(6, 9, 7), np.logspace(8, 11, 7))
    n, d = n.ravel(), d.ravel()
    rng = np.random.default_rng(1)
    loss = chinchilla_loss(n, d) * (1.0 + 0.02 * rng.standard_normal(n.size))
    return n, d, loss


@pytest.fixture(scope="module")
def chinchilla_fit(planted_grid):
    n, d, loss = planted_grid
    return fit_chinchilla(n, d, loss, flops=6.0 * n * d, n_boot=100, grid=StartGrid.small(), seed=0)


def test_chinchilla_intervals_contain_planted(chinchilla_fit):
    for name, planted in PLANTED.items():
        estimate = chinchilla_fit.parameters[name]
        assert estimate.low is not None and estimate.high is not None, name
        assert estimate.low <= planted <= estimate.high, f"{name}: {planted} outside [{estimate.low}, {estimate.high}]"


def test_chinchilla_values_close_to_planted(chinchilla_fit, planted_grid):
    assert chinchilla_fit.converged, chinchilla_fit.message
    assert chinchilla_fit.value("E") == pytest.approx(PLANTED["E"], rel=0.05)
    assert chinchilla_fit.value("alpha") == pytest.approx(PLANTED["alpha"], abs=0.02)
    assert chinchilla_fit.value("beta") == pytest.approx(PLANTED["beta"], abs=0.03)

    # A and B trade off against their exponents, so they are looser; the predicted
    # loss over the grid is the tight check.
    assert chinchilla_fit.value("A") == pytest.approx(PLANTED["A"], rel=0.3)
    assert chinchilla_fit.value("B") == pytest.approx(PLANTED["B"], rel=0.4)
    n, d, _ = planted_grid
    relative_error = np.abs(chinchilla_fit.predict(n, d) / chinchilla_loss(n, d) - 1.0)
    assert relative_error.max() < 0.01


def test_chinchilla_reports_convergence(chinchilla_fit):
    assert chinchilla_fit.n_starts == 18
    assert chinchilla_fit.n_starts_converged == 18
    assert chinchilla_fit.gradient_norm < 1e-4
    assert "CONVERGENCE" in chinchilla_fit.message
    assert chinchilla_fit.n_bootstrap == 100
    assert chinchilla_fit.n_bootstrap_converged >= 95
    assert chinchilla_fit.n_points == 49


def test_compute_optimal_exponents_recovered(chinchilla_fit):
    optimal = chinchilla_fit.compute_optimal
    planted_a = PLANTED["beta"] / (PLANTED["alpha"] + PLANTED["beta"])
    planted_b = PLANTED["alpha"] / (PLANTED["alpha"] + PLANTED["beta"])
    assert optimal.a.low <= planted_a <= optimal.a.high
    assert optimal.b.low <= planted_b <= optimal.b.high
    assert optimal.a.value == pytest.approx(planted_a, abs=0.03)
    assert optimal.b.value == pytest.approx(planted_b, abs=0.03)
    assert optimal.a.value + optimal.b.value == pytest.approx(1.0)
    assert optimal.k == pytest.approx(6.0)


def test_compute_optimal_allocation_minimises_law(chinchilla_fit):
    optimal = chinchilla_fit.compute_optimal
    budget = 1e21
    n_opt, d_opt = optimal.allocate(budget)
    assert optimal.k * n_opt * d_opt == pytest.approx(budget, rel=1e-9)

    # Along the iso-FLOP line D = C / (k N), the fitted law is lowest at N_opt.
    candidates = n_opt * np.logspace(-1, 1, 401)
    losses = chinchilla_fit.predict(candidates, budget / (optimal.k * candidates))
    best = candidates[np.argmin(losses)]
    assert best == pytest.approx(n_opt, rel=0.02)


def test_chinchilla_to_dict_is_json(chinchilla_fit):
    result = json.loads(json.dumps(chinchilla_fit.to_dict()))
    assert set(result["parameters"]) == {"E", "A", "B", "alpha", "beta"}
    assert set(result["parameters"]["alpha"]) == {"value", "low", "high"}
    for key in ("converged", "message", "nPoints", "nBootstrap", "nBootstrapConverged", "confidence"):
        assert key in result, key
    assert result["confidence"] == 0.95
    assert set(result["computeOptimal"]) >= {"a", "b", "G", "k"}


def test_power_law_recovers_offset():
    x = np.logspace(5, 8, 13)
    planted = {"E": 0.05, "A": 12.0, "alpha": 0.3}
    rng = np.random.default_rng(7)
    loss = (planted["E"] + planted["A"] / x ** planted["alpha"]) * (1.0 + 0.02 * rng.standard_normal(x.size))

    fit = fit_power_law(x, loss, n_boot=100, grid=StartGrid.small(), seed=0)

    assert fit.converged, fit.message
    for name, value in planted.items():
        estimate = fit.parameters[name]
        assert estimate.low <= value <= estimate.high, f"{name}: {value} outside [{estimate.low}, {estimate.high}]"
    assert fit.value("E") == pytest.approx(planted["E"], rel=0.2)
    assert fit.value("alpha") == pytest.approx(planted["alpha"], abs=0.03)
    assert fit.value("A") == pytest.approx(planted["A"], rel=0.3)


def test_power_law_without_noise_is_exact():
    x = np.logspace(3, 7, 9)
    loss = 0.2 + 5.0 / x**0.5
    fit = fit_power_law(x, loss, n_boot=0)
    assert fit.value("E") == pytest.approx(0.2, rel=1e-3)
    assert fit.value("A") == pytest.approx(5.0, rel=1e-2)
    assert fit.value("alpha") == pytest.approx(0.5, rel=1e-3)
    assert fit.parameters["E"].low is None
    assert fit.n_starts == 45


def test_too_few_points_raises():
    x = [1e6, 1e6, 2e6, 2e6, 2e6]
    loss = [1.0, 1.1, 0.9, 0.8, 0.85]
    expected = "loss vs parameters needs at least 4 trials with distinct parameter counts; got 2"
    with pytest.raises(FitError, match=expected):
        fit_power_law(x, loss, x_name="parameter counts", description="loss vs parameters")


def test_fit_error_is_user_error():
    assert issubclass(FitError, WxscaleError)


def test_chinchilla_single_sample_count_raises():
    n = np.logspace(6, 9, 8)
    d = np.full(8, 1e9)
    with pytest.raises(FitError, match="at least 2 distinct sample counts; got 1"):
        fit_chinchilla(n, d, chinchilla_loss(n, d), n_boot=0)


def test_chinchilla_too_few_pairs_raises():
    n = np.array([1e6, 1e7, 1e8, 1e6, 1e7])
    d = np.array([1e9, 1e9, 1e9, 1e10, 1e10])
    with pytest.raises(FitError, match=r"at least 6 trials with distinct .* pairs; got 5"):
        fit_chinchilla(n, d, chinchilla_loss(n, d), n_boot=0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_loss_raises(bad):
    x = np.logspace(5, 8, 6)
    loss = 0.1 + 1.0 / x**0.3
    loss[2] = bad
    with pytest.raises(FitError, match="loss must be positive and finite.*at index 2"):
        fit_power_law(x, loss, n_boot=0)


def test_invalid_confidence_raises():
    x = np.logspace(5, 8, 6)
    with pytest.raises(FitError, match="confidence must lie strictly between 0 and 1"):
        fit_power_law(x, 0.1 + 1.0 / x**0.3, n_boot=0, confidence=95)


def test_bootstrap_counts_skipped_resamples():
    # With exactly 4 distinct points, most resamples repeat a point. They then have fewer
    # than the 4 distinct x that a 3-parameter fit needs, and are skipped without failing.
    x = np.array([1e5, 1e6, 1e7, 1e8])
    loss = 0.05 + 12.0 / x**0.3
    fit = fit_power_law(x, loss, n_boot=50, grid=StartGrid.small(), seed=3)
    assert fit.n_bootstrap == 50
    assert 0 < fit.n_bootstrap_converged < 50


def test_bootstrap_is_seeded():
    x = np.logspace(5, 8, 10)
    rng = np.random.default_rng(0)
    loss = (0.05 + 12.0 / x**0.3) * (1.0 + 0.02 * rng.standard_normal(x.size))
    first = fit_power_law(x, loss, n_boot=30, grid=StartGrid.small(), seed=5).to_dict()
    again = fit_power_law(x, loss, n_boot=30, grid=StartGrid.small(), seed=5).to_dict()
    other = fit_power_law(x, loss, n_boot=30, grid=StartGrid.small(), seed=6).to_dict()
    assert first == again
    assert first["parameters"]["alpha"]["low"] != other["parameters"]["alpha"]["low"]


def test_compute_frontier_is_lower_envelope():
    flops = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0]
    loss = [0.9, 0.8, 0.7, 0.75, 0.5, 0.6]
    assert compute_frontier(flops, loss).tolist() == [0, 2, 4]


# fit_study on trial records ------------------------------------------------------


def make_record(index: int, n: float, d: float, loss: float | None, state: str = "Succeeded") -> dict:
    """A TrialResult record with the fields the fits read; C = 6 N D."""
    record = {
        "kind": "TrialResult",
        "trial": f"t-{index:04d}",
        "index": index,
        "state": state,
        "error": None if state == "Succeeded" else "trainer exited with code 1",
        "model": {"params": int(n * 1.05), "nonEmbeddingParams": int(n)},
        "training": {"samples": int(d), "flopsAnalytic": 6.0 * n * d},
        "evaluation": {"testLoss": loss},
    }
    if state != "Succeeded":
        record["evaluation"] = None
    return record


def test_fit_study_grid_runs_every_fit():
    rng = np.random.default_rng(2)
    records = []
    for n in np.logspace(6, 9, 5):
        for d in np.logspace(8, 11, 5):
            loss = float(chinchilla_loss(n, d) * (1.0 + 0.01 * rng.standard_normal()))
            records.append(make_record(len(records), n, d, loss))
    records.append(make_record(len(records), 1e7, 1e9, None, state="Failed"))

    summary = fit_study(records, n_boot=20, grid=StartGrid.small())

    assert summary["nTrials"] == 26
    assert summary["nSucceeded"] == 25
    assert summary["paramsField"] == "model.nonEmbeddingParams"
    for name in FIT_NAMES:
        assert "note" not in summary[name], f"{name}: {summary[name].get('note')}"
    assert summary["lossVsParams"]["subset"] == "trials with training.samples = 1e+11"
    assert len(summary["lossVsParams"]["trials"]) == 5
    assert summary["lossVsParamsAndSamples"]["nPoints"] == 25
    assert summary["lossVsParamsAndSamples"]["computeOptimal"]["k"]["value"] == pytest.approx(6.0, rel=1e-6)
    alpha = summary["lossVsParamsAndSamples"]["parameters"]["alpha"]["value"]
    assert alpha == pytest.approx(PLANTED["alpha"], abs=0.03)
    json.dumps(summary)


def test_fit_study_notes_unsupported_fits():
    # Only N varies, over 3 values: no fit has enough points, and the 2-D form needs D to vary.
    records = [make_record(i, n, 1e9, float(chinchilla_loss(n, 1e9))) for i, n in enumerate([1e6, 1e7, 1e8])]

    summary = fit_study(records, n_boot=10, grid=StartGrid.small())

    assert summary["lossVsParams"] == {
        "note": "loss vs parameters needs at least 4 trials with distinct parameter counts; got 3"
    }
    expected = "loss vs samples needs at least 4 trials with distinct sample counts; got 1"
    assert summary["lossVsSamples"]["note"] == expected
    assert "at least 2 distinct sample counts" in summary["lossVsParamsAndSamples"]["note"]
    assert "loss vs FLOPs needs at least 4" in summary["lossVsFlops"]["note"]


def test_fit_study_falls_back_to_total_params():
    records = [make_record(i, n, 1e9, float(chinchilla_loss(n, 1e9))) for i, n in enumerate(np.logspace(6, 9, 5))]
    del records[0]["model"]["nonEmbeddingParams"]
    summary = fit_study(records, n_boot=0, grid=StartGrid.small())
    assert summary["paramsField"] == "model.params"
    assert summary["lossVsParams"]["inputs"] == ["model.params"]


def test_parameters_at_bound_flagged():
    from wxscale.fit import Estimate, ScalingFit

    fit = ScalingFit(
        formula="L = E + A / x^alpha", inputs=("x",),
        parameters={"E": Estimate(1e-17, 1e-17, 1e-16), "A": Estimate(10.0, 5.0, 20.0),
                    "alpha": Estimate(0.3, 0.1, 10.0)},
        converged=True, message="", gradient_norm=0.0, objective=0.0, n_points=5, n_starts=1,
        n_starts_converged=1, n_bootstrap=0, n_bootstrap_converged=0, confidence=0.95,
    )
    assert fit.parameters_at_bound() == ["E", "alpha"]
    assert fit.to_dict()["atBound"] == ["E", "alpha"]
