"""Cut samples out of a time series: which time steps feed each input and target.

A sample (window) ends at its last input step t. Its inputs are the `history`
steps t - (history - 1) * history_interval, ..., t - history_interval, t, and its
target is the step t + lead_steps. Windows are identified by the index of t.

A split keeps only the windows whose inputs and target all lie inside its time
range, so no window crosses a split boundary. The training split is then limited
to its first `temporalCoverage` span and subsampled to `datasetFraction`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from wxscale.errors import DataError
from wxscale.spec import DataSpec, TimeRange, add_duration, duration_hours

logger = logging.getLogger(__name__)

# A lead time on monthly data may differ from a whole number of months by this fraction of a month.
_MONTHLY_LEAD_TOLERANCE = 0.1


@dataclass(frozen=True)
class TimeStep:
    """The step between consecutive time steps of the data.

    `monthly` marks calendar-monthly data (e.g. monthly means at mid-month), whose
    step varies between 28 and 31 days; `hours` is then the mean step.
    """

    hours: float
    monthly: bool = False

    def describe(self) -> str:
        if self.monthly:
            return f"1 calendar month (mean {self.hours:.1f} h)"
        return f"{self.hours:g} h"


@dataclass(frozen=True)
class WindowLayout:
    """Offsets of a window's inputs and target, in time steps."""

    history: int
    history_interval: int
    lead_steps: int

    @property
    def span_back(self) -> int:
        """Steps from the first input to the last input."""
        return (self.history - 1) * self.history_interval

    @property
    def length(self) -> int:
        """Steps from the first input to the target, both included."""
        return self.span_back + self.lead_steps + 1

    def input_indices(self, last: np.ndarray) -> np.ndarray:
        """Return the input indices of windows ending at `last`, shape (N, history), oldest first."""
        offsets = self.history_interval * np.arange(self.history - 1, -1, -1)
        return np.asarray(last)[:, None] - offsets[None, :]

    def target_indices(self, last: np.ndarray) -> np.ndarray:
        return np.asarray(last) + self.lead_steps

    def touched_indices(self, last: np.ndarray) -> np.ndarray:
        """Return the sorted, unique time indices that the windows read (inputs and targets)."""
        if len(last) == 0:
            return np.zeros(0, dtype=np.int64)
        both = np.concatenate([self.input_indices(last).ravel(), self.target_indices(last)])
        return np.unique(both)


@dataclass(frozen=True)
class SplitWindows:
    """Last-input indices of the windows of each split, into the data's time axis."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    layout: WindowLayout
    step: TimeStep
    # Last valid time of the training period after temporal coverage (inclusive).
    train_end: pd.Timestamp

    def __getitem__(self, split: str) -> np.ndarray:
        return {"train": self.train, "validation": self.validation, "test": self.test}[split]


def to_timestamp(value: datetime | pd.Timestamp) -> pd.Timestamp:
    """Return a timezone-naive UTC timestamp, the form of the data's time axis."""
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp


def infer_step(times: pd.DatetimeIndex, source: str) -> TimeStep:
    """Return the data's time step; raises DataError when it is irregular.

    Regular means every step is equal. Calendar-monthly data also passes: steps of
    27.5 to 31.5 days where each time falls in the month after the previous one.
    Steps of that length are marked monthly, which relaxes the lead-time check.
    """
    if len(times) < 2:
        raise DataError(f"{source}: the data has {len(times)} time step(s); at least 2 are needed")

    times = pd.DatetimeIndex(times).as_unit("ns")
    steps = np.diff(times.asi8)
    if steps.min() <= 0:
        repeated = times[int(np.flatnonzero(steps <= 0)[0]) + 1]
        raise DataError(
            f"spec.data.leadTime cannot be converted to time steps: {source} repeats the time "
            f"{repeated:%Y-%m-%d %H:%M}; remove the duplicate time steps from the data"
        )
    days = steps / 8.64e13
    monthly_length = bool(days.min() >= 27.5 and days.max() <= 31.5)
    if steps.min() == steps.max():
        # A fixed step of about a month (e.g. 30.4375 d) also counts as monthly.
        return TimeStep(hours=float(steps[0]) / 3.6e12, monthly=monthly_length)

    months = times.year * 12 + times.month
    if monthly_length and np.all(np.diff(months) == 1):
        return TimeStep(hours=float(steps.mean()) / 3.6e12, monthly=True)

    first_irregular = int(np.flatnonzero(steps != steps[0])[0]) + 1
    raise DataError(
        f"spec.data.leadTime cannot be converted to time steps: the time step of {source} is irregular "
        f"(steps between {steps.min() / 3.6e12:g} h and {steps.max() / 3.6e12:g} h, the first that differs ends at "
        f"{times[first_irregular]:%Y-%m-%d %H:%M}); resample the data to a regular step"
    )


def lead_steps(lead_time: str, step: TimeStep) -> int:
    """Return the lead time in data steps; raises DataError when it is not a whole number of steps."""
    hours = duration_hours(lead_time)
    ratio = hours / step.hours
    steps = max(1, round(ratio))
    tolerance = _MONTHLY_LEAD_TOLERANCE if step.monthly else 1e-6
    if abs(ratio - steps) > tolerance:
        if step.monthly:
            hint = f"give about a whole number of months in days, e.g. '30d' or '{step.hours:g}h' for one month"
        else:
            examples = ", ".join(f"'{n * step.hours:g}h'" for n in (1, 2, 4))
            hint = f"use a multiple of the step, e.g. {examples}"
        raise DataError(
            f"spec.data.leadTime: {lead_time!r} ({hours:g} h) is not a multiple of the data step "
            f"{step.describe()}; {hint}"
        )
    return steps


def windows_in_range(
    times: pd.DatetimeIndex, layout: WindowLayout, start: pd.Timestamp, end: pd.Timestamp
) -> np.ndarray:
    """Return the last-input indices of every window whose inputs and target lie in [start, end]."""
    first = int(times.searchsorted(start, side="left"))
    stop = int(times.searchsorted(end, side="right"))  # one past the last step <= end
    # The first input must be at index >= first and the target at index < stop.
    lowest = first + layout.span_back
    highest = stop - 1 - layout.lead_steps
    if highest < lowest:
        return np.zeros(0, dtype=np.int64)
    return np.arange(lowest, highest + 1, dtype=np.int64)


def coverage_end(train: TimeRange, temporal_coverage: str | None) -> pd.Timestamp:
    """Return the last valid time (inclusive) of the training period after temporal coverage."""
    start, end = to_timestamp(train.start), to_timestamp(train.end)
    if temporal_coverage is None:
        return end
    covered = add_duration(start, temporal_coverage) - pd.Timedelta(1, "ns")
    if covered > end:
        logger.warning(
            "temporalCoverage %s is longer than the training period %s..%s; using the whole period",
            temporal_coverage,
            f"{start:%Y-%m-%d %H:%M}",
            f"{end:%Y-%m-%d %H:%M}",
        )
        return end
    return covered


def subsample(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Return a seeded random subset of round(fraction * N) windows (at least one), in time order.

    The subset is a prefix of one seeded permutation, so with the same seed a
    smaller fraction keeps a subset of the windows of a larger one.
    """
    if fraction >= 1.0 or len(indices) == 0:
        return indices
    keep = max(1, round(fraction * len(indices)))
    permutation = np.random.default_rng(seed).permutation(len(indices))
    return np.sort(indices[permutation[:keep]])


def build_splits(data: DataSpec, times: pd.DatetimeIndex, seed: int, source: str) -> SplitWindows:
    """Return the windows of the train, validation and test splits of `data` over `times`.

    Raises DataError when the time step is irregular, the lead time is not a whole
    number of steps, or a split ends up without a sample.
    """
    step = infer_step(times, source)
    layout = WindowLayout(data.history, data.history_interval, lead_steps(data.lead_time, step))
    train_end = coverage_end(data.train, data.temporal_coverage)

    ranges = {
        "train": (to_timestamp(data.train.start), train_end),
        "validation": (to_timestamp(data.validation.start), to_timestamp(data.validation.end)),
        "test": (to_timestamp(data.test.start), to_timestamp(data.test.end)),
    }
    found = {}
    for split, (start, end) in ranges.items():
        found[split] = windows_in_range(times, layout, start, end)
        if len(found[split]) == 0:
            raise DataError(
                f"spec.data.{split}: the {split} split has no samples in {start:%Y-%m-%d %H:%M}.."
                f"{end:%Y-%m-%d %H:%M}; each sample needs {layout.length} consecutive steps of "
                f"{step.describe()} (history {layout.history}, historyInterval {layout.history_interval}, "
                f"leadTime {data.lead_time}) inside the range, and the data covers "
                f"{times[0]:%Y-%m-%d %H:%M}..{times[-1]:%Y-%m-%d %H:%M}"
            )

    all_train = len(found["train"])
    found["train"] = subsample(found["train"], data.dataset_fraction, seed)
    logger.info(
        "windows: train %d (of %d, datasetFraction %g, training data up to %s), validation %d, test %d; "
        "step %s, lead %d steps, history %d x %d steps",
        len(found["train"]),
        all_train,
        data.dataset_fraction,
        f"{train_end:%Y-%m-%d %H:%M}",
        len(found["validation"]),
        len(found["test"]),
        step.describe(),
        layout.lead_steps,
        layout.history,
        layout.history_interval,
    )
    return SplitWindows(
        train=found["train"],
        validation=found["validation"],
        test=found["test"],
        layout=layout,
        step=step,
        train_end=train_end,
    )
