"""Tests of the verification metrics against values worked out by hand on 2 x 3 grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr

from wxscale.metrics import (
    acc,
    bias,
    evaluate_forecast,
    latitude_weighted_mse_loss,
    latitude_weights,
    mae,
    mse,
    rmse,
)

# Two latitude rows, 0N and 60N: cos = 1 and 0.5, mean 0.75, so w = [4/3, 2/3].
LAT = np.array([0.0, 60.0])
W = np.array([4 / 3, 2 / 3])


def grid(row0, row1):
    """A (lat=2, lon=3) field with the given rows; a scalar fills the row."""
    return np.array([np.broadcast_to(row0, 3), np.broadcast_to(row1, 3)], dtype=float)


def test_latitude_weights_by_hand():
    np.testing.assert_allclose(latitude_weights(LAT), W)
    # cos(-60), cos(0), cos(60) = 0.5, 1, 0.5; mean 2/3.
    np.testing.assert_allclose(latitude_weights([-60.0, 0.0, 60.0]), [0.75, 1.5, 0.75])


def test_latitude_weights_average_one():
    weights = latitude_weights(np.linspace(-90, 90, 181))

    assert weights.mean() == pytest.approx(1.0)
    assert weights[0] == pytest.approx(0.0, abs=1e-12)


def test_latitude_weights_reject_invalid_latitudes():
    with pytest.raises(ValueError, match=r"\[-90, 90\]"):
        latitude_weights([0.0, 95.0])


def test_weighted_spatial_mean_by_hand():
    # One time step, errors 1 on the 0N row and 2 on the 60N row.
    # Weighted MSE = (4/3 * 3 * 1 + 2/3 * 3 * 4) / (4/3 * 3 + 2/3 * 3) = (4 + 8) / 6 = 2,
    # where an unweighted mean would give (3 * 1 + 3 * 4) / 6 = 2.5.
    truth = np.zeros((1, 2, 3))
    forecast = grid(1.0, 2.0)[None]

    assert mse(forecast, truth, W) == pytest.approx(2.0)
    # MAE = (4/3 * 3 * 1 + 2/3 * 3 * 2) / 6 = (4 + 4) / 6 = 4/3.
    assert mae(forecast, truth, W) == pytest.approx(4 / 3)


def test_bias_by_hand():
    # Errors +1 on the 0N row and -2 on the 60N row: 4/3 * 3 * 1 + 2/3 * 3 * (-2) = 4 - 4 = 0.
    # Unweighted it would be (3 - 6) / 6 = -0.5.
    forecast = grid(1.0, -2.0)[None]
    truth = np.zeros((1, 2, 3))

    assert bias(forecast, truth, W) == pytest.approx(0.0)
    # Two steps: the second is 1 everywhere, so bias = (0 + 1) / 2.
    forecast_two = np.stack([grid(1.0, -2.0), grid(1.0, 1.0)])
    assert bias(forecast_two, np.zeros((2, 2, 3)), W) == pytest.approx(0.5)


def test_rmse_takes_root_after_time_mean():
    # Step 0: errors 1 (0N) and 2 (60N), spatial MSE 2 (see above). Step 1: no error, MSE 0.
    # RMSE = sqrt((2 + 0) / 2) = 1, while the mean of per-step RMSEs is (sqrt(2) + 0) / 2 ~ 0.707.
    forecast = np.stack([grid(1.0, 2.0), grid(0.0, 0.0)])
    truth = np.zeros((2, 2, 3))

    assert mse(forecast, truth, W) == pytest.approx(1.0)
    assert rmse(forecast, truth, W) == pytest.approx(1.0)
    assert rmse(forecast, truth, W) != pytest.approx(math.sqrt(2) / 2)


def test_mask_excludes_cells_and_renormalises():
    # The cell (60N, first longitude) is invalid and has a large error of 10.
    # Sum of w e^2 over valid cells = 4/3 * (1 + 1 + 1) + 2/3 * (4 + 4) = 4 + 16/3 = 28/3.
    # Sum of w over valid cells = 4/3 * 3 + 2/3 * 2 = 16/3.  MSE = (28/3) / (16/3) = 1.75.
    forecast = grid(1.0, [10.0, 2.0, 2.0])[None]
    truth = np.zeros((1, 2, 3))
    mask = np.array([[True, True, True], [False, True, True]])

    assert mse(forecast, truth, W, mask) == pytest.approx(1.75)
    # MAE = (4/3 * 3 * 1 + 2/3 * 2 * 2) / (16/3) = (4 + 8/3) / (16/3) = 1.25.
    assert mae(forecast, truth, W, mask) == pytest.approx(1.25)


def test_nan_cells_are_masked():
    forecast = grid(1.0, [10.0, 2.0, 2.0])[None]
    truth = np.zeros((1, 2, 3))
    truth[0, 1, 0] = np.nan

    assert mse(forecast, truth, W) == pytest.approx(1.75)


def test_time_step_without_valid_cells_is_skipped():
    # Step 1 is entirely NaN, so the time mean is over step 0 alone.
    forecast = np.stack([grid(1.0, 2.0), grid(5.0, 5.0)])
    truth = np.zeros((2, 2, 3))
    truth[1] = np.nan

    assert mse(forecast, truth, W) == pytest.approx(2.0)
    assert math.isnan(mse(forecast[1:], truth[1:], W))


def test_metrics_per_variable():
    # Variable 0: errors 1 and 2 by row (MSE 2); variable 1: error 3 everywhere (MSE 9).
    forecast = np.stack([grid(1.0, 2.0), grid(3.0, 3.0)])[None]  # (time=1, var=2, lat, lon)
    truth = np.zeros_like(forecast)

    np.testing.assert_allclose(mse(forecast, truth, W), [2.0, 9.0])
    np.testing.assert_allclose(rmse(forecast, truth, W), [math.sqrt(2.0), 3.0])


def test_acc_perfect_and_negated():
    truth = np.stack([grid([3.0, 1.0, 2.0], [0.0, 5.0, 1.0]), grid([1.0, 1.0, 4.0], [2.0, 0.0, 3.0])])
    climatology = grid(1.5, [1.0, 2.0, 0.5])

    assert acc(truth, truth, climatology, W) == pytest.approx(1.0)
    negated = 2 * climatology - truth  # forecast anomaly = -(truth anomaly)
    assert acc(negated, truth, climatology, W) == pytest.approx(-1.0)


def test_acc_by_hand():
    # Climatology 0, so anomalies are the fields. f' is 1 at (0N, lon 0); o' is 1 there and at (60N, lon 1).
    # Covariance = 4/3 * 1 * 1 = 4/3; sum w f'^2 = 4/3; sum w o'^2 = 4/3 + 2/3 = 2.
    # ACC = (4/3) / sqrt(4/3 * 2) = sqrt(2/3) ~ 0.8165.
    forecast = grid([1.0, 0.0, 0.0], 0.0)[None]
    truth = grid([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])[None]

    assert acc(forecast, truth, np.zeros((2, 3)), W) == pytest.approx(math.sqrt(2 / 3))


def test_acc_anomalies_are_not_centred():
    # o' = +1 on 0N and -1 on 60N; f' = o' + 1 = 2 and 0. Centred anomalies would correlate
    # perfectly (ACC 1). Uncentred: covariance = 4/3 * 3 * 2 = 8; sum w f'^2 = 4/3 * 3 * 4 = 16;
    # sum w o'^2 = 4/3 * 3 + 2/3 * 3 = 6; ACC = 8 / sqrt(96) ~ 0.8165.
    truth = grid(1.0, -1.0)[None]
    forecast = grid(2.0, 0.0)[None]

    assert acc(forecast, truth, np.zeros((2, 3)), W) == pytest.approx(8 / math.sqrt(96))


def test_acc_time_mean():
    # A perfect step (1) and a negated step (-1) average to 0.
    truth_step = grid([3.0, 1.0, 2.0], [0.0, 5.0, 1.0])
    truth = np.stack([truth_step, truth_step])
    forecast = np.stack([truth_step, -truth_step])

    assert acc(forecast, truth, np.zeros((2, 3)), W) == pytest.approx(0.0)


def test_acc_with_mask():
    # Mask out the one cell where the forecast anomaly has the wrong sign: what is left is perfect.
    truth = grid([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])[None]
    forecast = truth.copy()
    forecast[0, 1, 2] = -7.0
    mask = np.ones((2, 3), dtype=bool)
    mask[1, 2] = False

    assert acc(forecast, truth, np.zeros((2, 3)), W) < 0.9
    assert acc(forecast, truth, np.zeros((2, 3)), W, mask) == pytest.approx(1.0)


def test_evaluate_forecast_names_variables():
    truth = np.stack([np.stack([grid(1.0, 2.0), grid(0.0, 1.0)])] * 2)  # (time=2, var=2, lat, lon)
    forecast = truth + np.array([1.0, -3.0])[None, :, None, None]
    climatology = np.zeros((2, 2, 3))

    result = evaluate_forecast(forecast, truth, climatology, LAT, variables=["t2m", "msl"])

    assert list(result) == ["t2m", "msl"]
    assert set(result["t2m"]) == {"rmse", "mae", "mse", "bias", "acc"}
    assert result["t2m"]["rmse"] == pytest.approx(1.0)
    assert result["msl"]["mse"] == pytest.approx(9.0)
    assert result["msl"]["bias"] == pytest.approx(-3.0)
    assert result["msl"]["mae"] == pytest.approx(3.0)


def test_evaluate_forecast_one_variable_with_mask():
    forecast = grid(1.0, [10.0, 2.0, 2.0])[None]
    truth = np.zeros((1, 2, 3))
    mask = np.array([[True, True, True], [False, True, True]])

    result = evaluate_forecast(forecast, truth, np.zeros((2, 3)), LAT, mask=mask)

    assert list(result) == ["variable_0"]
    assert result["variable_0"]["mse"] == pytest.approx(1.75)
    assert result["variable_0"]["rmse"] == pytest.approx(math.sqrt(1.75))


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shapes differ"):
        mse(np.zeros((1, 2, 3)), np.zeros((1, 2, 4)), W)
    with pytest.raises(ValueError, match="one per latitude"):
        mse(np.zeros((1, 2, 3)), np.zeros((1, 2, 3)), np.ones(3))


def test_loss_matches_numpy_by_hand():
    # Errors 1 (0N) and 2 (60N): weighted MSE 2, as in the numpy case.
    pred = torch.tensor(grid(1.0, 2.0))[None, None]
    target = torch.zeros_like(pred)

    loss = latitude_weighted_mse_loss(pred, target, torch.tensor(W))

    assert loss.item() == pytest.approx(2.0)


def test_loss_mask_and_nan_target():
    # The cell with a NaN target (error 10) and the masked cell both drop out.
    pred = torch.tensor(grid(1.0, [10.0, 2.0, 2.0]), requires_grad=True)
    target = torch.zeros(1, 1, 2, 3, dtype=torch.float64)
    target[0, 0, 1, 0] = float("nan")
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 1] = False  # a second invalid cell, error 1 at (0N, lon 1)

    loss = latitude_weighted_mse_loss(pred[None, None], target, torch.tensor(W), mask)
    loss.backward()

    # Valid: two cells of error 1 at 0N and two of error 2 at 60N.
    # (4/3 * 2 * 1 + 2/3 * 2 * 4) / (4/3 * 2 + 2/3 * 2) = (8/3 + 16/3) / 4 = 2.
    assert loss.item() == pytest.approx(2.0)
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[1, 0] == 0
    assert pred.grad[0, 1] == 0
    # d loss / d pred at (0N, lon 0) = 2 * w * e / sum w = 2 * 4/3 * 1 / 4 = 2/3.
    assert pred.grad[0, 0].item() == pytest.approx(2 / 3)


def test_loss_without_valid_cells_is_zero():
    pred = torch.ones(1, 1, 2, 3, requires_grad=True)
    target = torch.full((1, 1, 2, 3), float("nan"))

    loss = latitude_weighted_mse_loss(pred, target, torch.tensor(W, dtype=torch.float32))
    loss.backward()

    assert loss.item() == 0.0
    assert torch.isfinite(pred.grad).all()


def test_persistence_on_ncep_matches_xarray(ncep_air):
    # Real data: score the 6 h persistence forecast with these metrics and with xarray's
    # weighted mean, an independent implementation of the same formula.
    with xr.open_dataset(ncep_air) as dataset:
        air = dataset["air"].isel(time=slice(0, 41)).astype(np.float64).load()
    forecast, truth = air.values[:-1], air.values[1:]
    climatology = air.values.mean(axis=0)

    result = evaluate_forecast(forecast, truth, climatology, air["lat"].values, variables=["air"])["air"]

    error = xr.DataArray(forecast - truth, dims=air.dims)
    cosine = xr.DataArray(np.cos(np.deg2rad(air["lat"].values.astype(np.float64))), dims="lat")
    expected = math.sqrt(float((error**2).weighted(cosine).mean(("lat", "lon")).mean("time")))
    assert result["rmse"] == pytest.approx(expected, rel=1e-9)
    assert 0.3 < result["rmse"] < 5.0  # kelvin: the size of 6 h changes of near-surface temperature
    assert 0.5 < result["acc"] < 1.0


def test_loss_upcasts_bfloat16():
    pred = torch.tensor(grid(1.0, 2.0), dtype=torch.bfloat16)[None, None].requires_grad_()
    target = torch.zeros(1, 1, 2, 3, dtype=torch.bfloat16)

    loss = latitude_weighted_mse_loss(pred, target, torch.tensor(W))
    loss.backward()

    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2.0)
    assert pred.grad.dtype == torch.bfloat16
