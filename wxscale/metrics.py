"""Forecast verification metrics: RMSE, MAE, MSE, bias and ACC, plus the training loss.

Every metric first averages over space with latitude weights, then over time, in the
order that WeatherBench 2 uses:

    spatial mean at time t:  <x>_t = sum_ij w_i v_tij x_tij / sum_ij w_i v_tij
    time mean:               mean over t of <x>_t

where i indexes latitude, j longitude, w_i are the latitude weights and v_tij is 1 for a
valid cell and 0 otherwise. A cell is valid when the mask (if given) is True there and
forecast and truth (and the climatology, for ACC) are finite. Renormalising by
sum w v means that the weights of the valid cells average to 1 at every time step.
The mask broadcasts to the data by numpy rules, so (lat, lon) is one mask for all times.

Arrays are (time, lat, lon) for one variable or (time, var, lat, lon) for several. A
metric returns a float for the first and an array of shape (var,) for the second. Some
time steps have no defined statistic: those without a valid cell, and for ACC those with
a zero anomaly everywhere. They are left out of the time mean, and the result is NaN when
no time step remains.

``latitude_weighted_mse_loss`` is the training loss in torch with the same weighting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

METRICS = ("rmse", "mae", "mse", "bias", "acc")


def latitude_weights(lat_degrees: np.ndarray | Sequence[float]) -> np.ndarray:
    """Return w_i = cos(lat_i) / mean_k cos(lat_k), the latitude weights normalised to mean 1.

    On a regular latitude-longitude grid the cosine is approximately proportional to the
    area of a grid cell, so a weighted mean approximates an area mean.
    """
    lat = np.asarray(lat_degrees, dtype=np.float64)
    if lat.ndim != 1 or lat.size == 0:
        raise ValueError(f"latitudes must be a non-empty 1-D array, got shape {lat.shape}")
    if not np.all(np.isfinite(lat)) or np.any(np.abs(lat) > 90):
        raise ValueError(f"latitudes must be finite degrees in [-90, 90], got min {lat.min()} and max {lat.max()}")

    cosine = np.cos(np.deg2rad(lat))
    if cosine.mean() <= 0:
        raise ValueError("latitude weights are undefined when every latitude is a pole")
    return cosine / cosine.mean()


def mse(
    forecast: np.ndarray, truth: np.ndarray, weights: np.ndarray, mask: np.ndarray | None = None
) -> float | np.ndarray:
    """Return the mean squared error, MSE = mean_t <(f - o)^2>_t."""
    forecast, truth, valid = _prepare(forecast, truth, weights, mask)
    return _time_mean(_spatial_mean((forecast - truth) ** 2, valid, weights))


def rmse(
    forecast: np.ndarray, truth: np.ndarray, weights: np.ndarray, mask: np.ndarray | None = None
) -> float | np.ndarray:
    """Return the root mean squared error, RMSE = sqrt(mean_t <(f - o)^2>_t).

    The square root comes after the time mean, as in WeatherBench 2. The time mean of
    per-step RMSEs is a different number, and never larger.
    """
    return np.sqrt(mse(forecast, truth, weights, mask))


def mae(
    forecast: np.ndarray, truth: np.ndarray, weights: np.ndarray, mask: np.ndarray | None = None
) -> float | np.ndarray:
    """Return the mean absolute error, MAE = mean_t <|f - o|>_t."""
    forecast, truth, valid = _prepare(forecast, truth, weights, mask)
    return _time_mean(_spatial_mean(np.abs(forecast - truth), valid, weights))


def bias(
    forecast: np.ndarray, truth: np.ndarray, weights: np.ndarray, mask: np.ndarray | None = None
) -> float | np.ndarray:
    """Return the mean error, bias = mean_t <f - o>_t (positive when the forecast is too high)."""
    forecast, truth, valid = _prepare(forecast, truth, weights, mask)
    return _time_mean(_spatial_mean(forecast - truth, valid, weights))


def acc(
    forecast: np.ndarray,
    truth: np.ndarray,
    climatology: np.ndarray,
    weights: np.ndarray,
    mask: np.ndarray | None = None,
) -> float | np.ndarray:
    """Return the anomaly correlation coefficient, averaged over time.

    With anomalies f' = f - c and o' = o - c against the climatology c, per time step

        ACC_t = sum w v f' o' / sqrt(sum w v f'^2 * sum w v o'^2)

    summed over (lat, lon), and ACC = mean_t ACC_t. The anomalies are not centred: their
    spatial mean is not subtracted, as in WeatherBench 2. ``climatology`` must broadcast
    to the forecast, e.g. (lat, lon), (var, lat, lon), or the climatology of each valid
    time with the forecast's own shape.
    """
    forecast, truth, valid = _prepare(forecast, truth, weights, mask)
    climatology = np.broadcast_to(np.asarray(climatology, dtype=np.float64), forecast.shape)
    valid = valid & np.isfinite(climatology)

    climatology = np.where(valid, climatology, 0.0)
    forecast_anomaly = np.where(valid, forecast - climatology, 0.0)
    truth_anomaly = np.where(valid, truth - climatology, 0.0)
    w = _broadcast_weights(weights, forecast.ndim)

    covariance = np.sum(w * forecast_anomaly * truth_anomaly, axis=(-2, -1))
    forecast_variance = np.sum(w * forecast_anomaly**2, axis=(-2, -1))
    truth_variance = np.sum(w * truth_anomaly**2, axis=(-2, -1))
    denominator = np.sqrt(forecast_variance * truth_variance)

    per_time = np.full(denominator.shape, np.nan)
    np.divide(covariance, denominator, out=per_time, where=denominator > 0)
    return _time_mean(per_time)


def evaluate_forecast(
    forecast: np.ndarray,
    truth: np.ndarray,
    climatology: np.ndarray,
    lat: np.ndarray | Sequence[float],
    mask: np.ndarray | None = None,
    variables: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Return {variable: {metric: value}} for RMSE, MAE, MSE, bias and ACC.

    ``lat`` contains the latitudes in degrees, one per row of the grid. Forecast and truth
    are (time, lat, lon) or (time, var, lat, lon). ``variables`` names the variables and
    defaults to variable_0, variable_1, and so on.
    """
    forecast = np.asarray(forecast, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    climatology = np.asarray(climatology, dtype=np.float64)
    if forecast.ndim not in (3, 4):
        raise ValueError(f"arrays must be (time, lat, lon) or (time, var, lat, lon), got shape {forecast.shape}")
    if forecast.ndim == 3:
        # One variable: give every array a variable axis of length 1.
        forecast, truth = forecast[:, None], truth[:, None]
        climatology = climatology[:, None] if climatology.ndim == 3 else climatology
        mask = None if mask is None else _add_variable_axis(np.asarray(mask))

    count = forecast.shape[1]
    names = list(variables) if variables is not None else [f"variable_{index}" for index in range(count)]
    if len(names) != count:
        raise ValueError(f"got {len(names)} variable names for {count} variables: {names}")

    weights = latitude_weights(lat)
    values = {
        "rmse": rmse(forecast, truth, weights, mask),
        "mae": mae(forecast, truth, weights, mask),
        "mse": mse(forecast, truth, weights, mask),
        "bias": bias(forecast, truth, weights, mask),
        "acc": acc(forecast, truth, climatology, weights, mask),
    }
    return {name: {metric: float(values[metric][index]) for metric in METRICS} for index, name in enumerate(names)}


def latitude_weighted_mse_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the latitude-weighted MSE over all valid cells of a batch, a scalar tensor.

    loss = sum w_i v (pred - target)^2 / sum w_i v over (batch, channel, lat, lon)

    ``pred`` and ``target`` are (batch, channels, lat, lon), ``weights`` has shape (lat,)
    (e.g. from latitude_weights) and ``mask`` is a boolean tensor that broadcasts to
    ``pred``. Cells where the mask is False or the target is NaN get no weight and no
    gradient. The sums pool the whole batch, so a sample with more valid cells counts more.
    When every cell is valid the loss equals the batch mean of the per-sample weighted MSE.
    With no valid cell the loss is 0. Half-precision inputs are upcast to float32 so that
    the sums keep their precision under autocast.
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(
            "pred and target must both be (batch, channels, lat, lon), "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    dtype = torch.promote_types(pred.dtype, torch.float32)
    pred = pred.to(dtype)
    target = target.to(dtype)
    weights = torch.as_tensor(weights, dtype=dtype, device=pred.device)
    if weights.shape != (pred.shape[-2],):
        raise ValueError(f"weights must have shape ({pred.shape[-2]},), one per latitude, got {tuple(weights.shape)}")

    valid = torch.isfinite(target)
    if mask is not None:
        valid = valid & mask.to(device=pred.device, dtype=torch.bool)

    # Zero the invalid differences with where() rather than multiplying by 0, so a NaN
    # target cannot reach the gradient (NaN * 0 is NaN).
    difference = torch.where(valid, pred - torch.where(valid, target, 0.0), 0.0)
    cell_weights = weights.view(-1, 1) * valid

    total_weight = cell_weights.sum()
    loss = (cell_weights * difference**2).sum()
    return loss / total_weight.clamp_min(torch.finfo(pred.dtype).tiny)


def _prepare(
    forecast: np.ndarray, truth: np.ndarray, weights: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return forecast and truth as float64 arrays and the boolean array of valid cells."""
    forecast = np.asarray(forecast, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if forecast.shape != truth.shape:
        raise ValueError(f"forecast and truth shapes differ: {forecast.shape} and {truth.shape}")
    if forecast.ndim not in (3, 4):
        raise ValueError(f"arrays must be (time, lat, lon) or (time, var, lat, lon), got shape {forecast.shape}")
    weights = np.asarray(weights)
    if weights.shape != (forecast.shape[-2],):
        raise ValueError(
            f"weights must have shape ({forecast.shape[-2]},), one per latitude, got {weights.shape}; "
            "pass latitude_weights(lat)"
        )

    valid = np.isfinite(forecast) & np.isfinite(truth)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool:
            raise ValueError(f"mask must be boolean (True = valid cell), got dtype {mask.dtype}")
        valid = valid & np.broadcast_to(mask, forecast.shape)

    # Zero the invalid cells so that NaN and inf never enter the arithmetic.
    return np.where(valid, forecast, 0.0), np.where(valid, truth, 0.0), valid


def _broadcast_weights(weights: np.ndarray, ndim: int) -> np.ndarray:
    """Shape the (lat,) weights as (1, ..., lat, 1) to broadcast against an ndim array."""
    return np.asarray(weights, dtype=np.float64).reshape((1,) * (ndim - 2) + (-1, 1))


def _spatial_mean(values: np.ndarray, valid: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Return <x>_t = sum w v x / sum w v over (lat, lon); NaN where no cell is valid."""
    w = _broadcast_weights(weights, values.ndim) * valid
    total = np.sum(w * values, axis=(-2, -1))
    weight_sum = np.sum(w, axis=(-2, -1))

    mean = np.full(weight_sum.shape, np.nan)
    np.divide(total, weight_sum, out=mean, where=weight_sum > 0)
    return mean


def _time_mean(per_time: np.ndarray) -> float | np.ndarray:
    """Average over the time axis, leaving out NaN steps; a float for (time,), an array for (time, var)."""
    defined = np.isfinite(per_time)
    count = defined.sum(axis=0)
    total = np.where(defined, per_time, 0.0).sum(axis=0)

    mean = np.full(np.shape(count), np.nan)
    np.divide(total, count, out=mean, where=count > 0)
    if mean.ndim == 0:
        return float(mean)
    return mean


def _add_variable_axis(mask: np.ndarray) -> np.ndarray:
    """Insert a variable axis into a (time, lat, lon) mask; (lat, lon) masks broadcast as they are."""
    return mask[:, None] if mask.ndim == 3 else mask
