"""Normalisation statistics and climatology, both computed from training data only.

Using only the training period keeps the validation and test periods unseen: a
climatology or a mean taken over the test years would leak their information into
the model inputs and into the climatology baseline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from wxscale.errors import DataError

logger = logging.getLogger(__name__)

# Mean length of a year in days, the period of the day-of-year axis.
_YEAR_DAYS = 365.25


@dataclass(frozen=True)
class NormalisationStats:
    """Per-variable mean and standard deviation, shape (V,), in physical units."""

    mean: np.ndarray
    std: np.ndarray


def normalisation_stats(values: np.ndarray, time_indices: np.ndarray, variables: list[str]) -> NormalisationStats:
    """Return the NaN-aware mean and (population) standard deviation of each variable.

    `values` has shape (T, V, H, W); only the steps in `time_indices` count. A
    variable with zero spread gets std 1 so that normalising it does not divide by zero.
    Raises DataError when a variable has no finite value in those steps.
    """
    means = np.zeros(len(variables))
    stds = np.ones(len(variables))
    for v, name in enumerate(variables):
        sample = values[time_indices, v]
        if not np.isfinite(sample).any():
            raise DataError(
                f"variable {name!r} has no finite value in the {len(time_indices)} training time steps; "
                "check the variable, the training period and the data's missing values"
            )
        means[v] = np.nanmean(sample, dtype=np.float64)
        spread = float(np.nanstd(sample, dtype=np.float64))
        if spread > 0:
            stds[v] = spread
        else:
            logger.warning("variable %s is constant (%g) over the training steps; using std 1", name, means[v])
    return NormalisationStats(mean=means, std=stds)


class RunningMoments:
    """Per-variable count, mean and sum of squared deviations of streamed fields, NaN skipped.

    Blocks are merged with the pairwise update of Chan, Golub and LeVeque (1979):
    for parts a and b, mean = mean_a + (mean_b - mean_a) * n_b / n, and
    M2 = M2_a + M2_b + (mean_b - mean_a)^2 * n_a * n_b / n. The result equals the
    mean and population variance of all values together, up to float64 rounding.
    """

    def __init__(self, n_variables: int):
        self.count = np.zeros(n_variables, dtype=np.int64)
        self.mean = np.zeros(n_variables, dtype=np.float64)
        self.m2 = np.zeros(n_variables, dtype=np.float64)
        self.steps = 0

    def update(self, values: np.ndarray) -> None:
        """Add fields `values` of shape (T, V, H, W)."""
        self.steps += len(values)
        for v in range(values.shape[1]):
            block = values[:, v]
            finite = block[np.isfinite(block)].astype(np.float64)
            n_b = finite.size
            if n_b == 0:
                continue
            mean_b = float(finite.mean())
            m2_b = float(np.square(finite - mean_b).sum())
            n_a = int(self.count[v])
            n = n_a + n_b
            delta = mean_b - self.mean[v]
            self.mean[v] += delta * n_b / n
            self.m2[v] += m2_b + delta * delta * n_a * n_b / n
            self.count[v] = n

    def result(self, variables: list[str]) -> NormalisationStats:
        """Return the statistics like `normalisation_stats`; raises DataError for a variable without finite values."""
        stds = np.ones(len(variables))
        for v, name in enumerate(variables):
            if self.count[v] == 0:
                raise DataError(
                    f"variable {name!r} has no finite value in the {self.steps} training time steps read; "
                    "check the variable, the training period and the data's missing values"
                )
            spread = float(np.sqrt(self.m2[v] / self.count[v]))
            if spread > 0:
                stds[v] = spread
            else:
                logger.warning("variable %s is constant (%g) over the training steps; using std 1", name, self.mean[v])
        return NormalisationStats(mean=self.mean.copy(), std=stds)


def day_of_year(times: pd.DatetimeIndex) -> np.ndarray:
    """Return the day of year from 0 (1 January) as float, the position on the seasonal cycle."""
    return np.asarray(times.day_of_year, dtype=np.float64) - 1.0


class Climatology:
    """A smoothed climatology by (day of year, hour of day), estimated from training time steps.

    The climatology at day d and hour h is the mean of all training steps at hour
    h whose day of year is within `window_days` of d (circular, period 365.25 d).
    This boxcar smoothing lets one or two years of data give a usable climatology.
    With `by_hour` False (build_datasets sets it for steps of a day or more) the
    hour is ignored. Where no training step shares the hour (e.g. test times at an
    hour the training data never has), the window takes all hours. Where even that
    is empty, the climatology is the mean of all training steps. Cells without any
    finite value stay NaN.
    """

    def __init__(self, values: np.ndarray, times: pd.DatetimeIndex, by_hour: bool, window_days: float = 15.0):
        """Accumulate per-(day, hour) sums of `values` (T, V, H, W) at `times` (T steps of training data)."""
        self.by_hour = by_hour
        self.window_days = window_days
        self.shape = values.shape[1:]

        # Sums and counts of finite values per (day, hour) bin; float64 sums keep precision.
        self.bin_days = np.zeros(0, dtype=np.float64)
        self.bin_hours = np.zeros(0, dtype=np.int64)
        self.sums = np.zeros((0, *self.shape), dtype=np.float64)
        self.counts = np.zeros((0, *self.shape), dtype=np.int32)
        self._bins: dict[tuple[float, int], int] = {}
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self.add(values, times)

        if len(times):
            logger.info(
                "climatology from %d training steps: %d (day, hour) bins, window +-%g days",
                len(times),
                len(self.bin_days),
                window_days,
            )

    @classmethod
    def empty(cls, shape: tuple[int, ...], by_hour: bool, window_days: float = 15.0) -> Climatology:
        """Return a climatology without steps, of fields of `shape` (V, H, W), to fill with `add`."""
        return cls(np.zeros((0, *shape), dtype=np.float32), pd.DatetimeIndex([]), by_hour, window_days)

    def add(self, values: np.ndarray, times: pd.DatetimeIndex) -> None:
        """Add the fields `values` (T, V, H, W) at `times` to the per-(day, hour) sums."""
        if len(times) != len(values):
            raise ValueError(f"got {len(values)} fields but {len(times)} times")
        if len(times) == 0:
            return
        times = pd.DatetimeIndex(times)
        days = np.floor(day_of_year(times))
        hours = np.asarray(times.hour if self.by_hour else np.zeros(len(times)), dtype=np.int64)

        # Bin index of each step; keys not seen before get new bins at the end.
        bins = np.empty(len(times), dtype=np.int64)
        new_keys = []
        for i, key in enumerate(zip(days.tolist(), hours.tolist())):
            if key not in self._bins:
                self._bins[key] = len(self._bins)
                new_keys.append(key)
            bins[i] = self._bins[key]
        if new_keys:
            added = np.asarray(new_keys, dtype=np.float64)
            self.bin_days = np.concatenate([self.bin_days, added[:, 0]])
            self.bin_hours = np.concatenate([self.bin_hours, added[:, 1].astype(np.int64)])
            self.sums = np.concatenate([self.sums, np.zeros((len(new_keys), *self.shape), dtype=np.float64)])
            self.counts = np.concatenate([self.counts, np.zeros((len(new_keys), *self.shape), dtype=np.int32)])

        for i, field in enumerate(values):
            finite = np.isfinite(field)
            self.sums[bins[i]] += np.where(finite, field, 0.0)
            self.counts[bins[i]] += finite
        self._cache.clear()

    def _mean(self, selected: np.ndarray) -> np.ndarray:
        counts = self.counts[selected].sum(axis=0)
        sums = self.sums[selected].sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)

    def _field_for_key(self, day: int, hour: int) -> np.ndarray:
        key = (day, hour)
        if key not in self._cache:
            distance = np.abs(self.bin_days - day) % _YEAR_DAYS
            near = np.minimum(distance, _YEAR_DAYS - distance) <= self.window_days
            selected = near & (self.bin_hours == hour)
            if not selected.any():
                selected = near
            if not selected.any():
                logger.debug(
                    "no training step within %g days of day %d; using all training steps", self.window_days, day
                )
                selected = np.ones(len(self.bin_days), dtype=bool)
            self._cache[key] = self._mean(selected)
        return self._cache[key]

    def field(self, time: pd.Timestamp) -> np.ndarray:
        """Return the climatology at `time`, shape (V, H, W), float32."""
        stamp = pd.Timestamp(time)
        hour = stamp.hour if self.by_hour else 0
        return self._field_for_key(stamp.day_of_year - 1, hour)

    def fields(self, times: pd.DatetimeIndex | np.ndarray) -> np.ndarray:
        """Return the climatology at each of `times`, shape (N, V, H, W), float32."""
        index = pd.DatetimeIndex(times)
        output = np.empty((len(index), *self.shape), dtype=np.float32)
        for i, stamp in enumerate(index):
            output[i] = self.field(stamp)
        return output
