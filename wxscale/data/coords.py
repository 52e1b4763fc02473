"""Detect the time, latitude and longitude axes of a dataset and rename them to `time`, `lat`, `lon`.

Files name their axes in many ways: CF attributes (`standard_name`, `axis`,
`units: degrees_north`), common names (`lat`, `latitude`, `valid_time`) and
producer-specific names (`TIME`, `FNOCY`, `FNOCX` in the US Navy FNOC files).
`standardise_coordinates` scores every 1-D variable against each axis, renames
the winners and puts the grid in one layout:

- `time` increasing, as datetime64[ns];
- `lat` descending (north to south);
- `lon` increasing, wrapped into [0, 360) with duplicates after wrapping dropped.
  A regional grid that crosses the 0° meridian (e.g. the British Isles, 10°W..2°E)
  keeps its columns contiguous instead: its longitudes run continuously from
  below 0 (-10..2), so that the array has no seam in the middle.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import xarray as xr

from wxscale.errors import DataError

logger = logging.getLogger(__name__)

_TIME_NAMES = {"time", "valid_time", "time_index", "times", "date", "datetime", "t"}
_LAT_NAMES = {"lat", "latitude", "lats", "nav_lat", "fnocy", "grid_yt"}
_LON_NAMES = {"lon", "longitude", "lons", "long", "nav_lon", "fnocx", "grid_xt"}
_LAT_UNITS = {"degrees_north", "degree_north", "degrees_n", "degree_n", "degreesn", "degreen"}
_LON_UNITS = {"degrees_east", "degree_east", "degrees_e", "degree_e", "degreese", "degreee"}

# "hours since 1940-01-01 00:00 (proleptic_gregorian)": CF units with an optional calendar in brackets.
_TIME_UNITS_RE = re.compile(r"^\s*(\w+\s+since\s+[^(]+?)\s*(?:\((\w+)\))?\s*$", re.IGNORECASE)


def _raw_attr(variable: xr.DataArray, name: str) -> str:
    """Return an attribute, or the encoding entry that xarray moved it to when decoding, as stripped text."""
    return str(variable.attrs.get(name, variable.encoding.get(name, ""))).strip()


def _attr(variable: xr.DataArray, name: str) -> str:
    return _raw_attr(variable, name).lower()


# The scores rank CF attributes above names and names above dtype; only their order matters.
def _time_score(name: str, variable: xr.DataArray, dataset: xr.Dataset) -> int:
    score = 0
    if _attr(variable, "standard_name") == "time":
        score += 8
    if _attr(variable, "axis") == "t":
        score += 4
    if name.lower() in _TIME_NAMES:
        score += 4
    if np.issubdtype(variable.dtype, np.datetime64) or variable.dtype == object:
        score += 2
    if " since " in _attr(variable, "units") or (score and " since " in _dataset_time_units(dataset, name).lower()):
        score += 2
    return score


def _lat_score(name: str, variable: xr.DataArray) -> int:
    score = 0
    if _attr(variable, "standard_name") == "latitude":
        score += 8
    if _attr(variable, "units") in _LAT_UNITS:
        score += 6
    if _attr(variable, "axis") == "y":
        score += 2
    if name.lower() in _LAT_NAMES:
        score += 4
    return score


def _lon_score(name: str, variable: xr.DataArray) -> int:
    score = 0
    if _attr(variable, "standard_name") == "longitude":
        score += 8
    if _attr(variable, "units") in _LON_UNITS:
        score += 6
    if _attr(variable, "axis") == "x":
        score += 2
    if name.lower() in _LON_NAMES:
        score += 4
    return score


def _dataset_time_units(dataset: xr.Dataset, name: str) -> str:
    """Units of a numeric time axis stored on the dataset, e.g. the ERA5 zarr's `time_units` attribute."""
    for key in (f"{name}_units", "time_units"):
        if key in dataset.attrs:
            return str(dataset.attrs[key])
    return ""


def _find_axis(dataset: xr.Dataset, axis: str, excluded_dims: set[str]) -> tuple[str, str]:
    """Return (variable name, dimension name) of the best-scoring 1-D variable for `axis`."""
    best: tuple[int, str, str] | None = None
    for name, variable in dataset.variables.items():
        name = str(name)
        if variable.ndim != 1 or variable.dims[0] in excluded_dims:
            continue
        if axis == "time":
            score = _time_score(name, dataset[name], dataset)
        elif axis == "lat":
            score = _lat_score(name, dataset[name])
        else:
            score = _lon_score(name, dataset[name])
        if score == 0:
            continue

        # A dimension coordinate (name == dimension) wins a tie over an auxiliary 1-D variable.
        dimension = str(variable.dims[0])
        score = 2 * score + (name == dimension)
        if best is None or score > best[0]:
            best = (score, name, dimension)

    if best is None:
        hints = {
            "time": "name it 'time' or give it CF units such as 'hours since 2000-01-01'",
            "lat": "name it 'lat' or 'latitude', or give it units 'degrees_north'",
            "lon": "name it 'lon' or 'longitude', or give it units 'degrees_east'",
        }
        described = ", ".join(f"{name}{tuple(v.dims)}" for name, v in dataset.variables.items() if v.ndim == 1)
        raise DataError(f"no {axis} coordinate found among the 1-D variables [{described or 'none'}]; {hints[axis]}")
    return best[1], best[2]


def time_dimension(dataset: xr.Dataset) -> str:
    """Return the name of the time dimension of a dataset as stored, before `standardise_coordinates` renames it."""
    return _find_axis(dataset, "time", set())[1]


def decode_times(variable: xr.DataArray, dataset: xr.Dataset, source: str) -> pd.DatetimeIndex:
    """Return the time axis as a DatetimeIndex, decoding numeric CF times ('hours since ...') when needed."""
    values = variable.values
    if np.issubdtype(values.dtype, np.datetime64):
        return pd.DatetimeIndex(values).as_unit("ns")

    if values.dtype == object:
        return _cftime_to_datetimeindex(values, str(variable.name), source)

    units = _raw_attr(variable, "units") or _dataset_time_units(dataset, str(variable.name))
    match = _TIME_UNITS_RE.match(units)
    if not match:
        raise DataError(
            f"{source}: time coordinate {variable.name!r} is numeric without CF units "
            f"(got units {units!r}); add a 'units' attribute such as 'hours since 1970-01-01'"
        )
    calendar = match.group(2) or _attr(variable, "calendar") or "standard"
    decoded = xr.coding.times.decode_cf_datetime(values, match.group(1), calendar=calendar)
    if np.asarray(decoded).dtype == object:
        return _cftime_to_datetimeindex(np.asarray(decoded), str(variable.name), source)
    return pd.DatetimeIndex(decoded).as_unit("ns")


def _cftime_to_datetimeindex(values: np.ndarray, name: str, source: str) -> pd.DatetimeIndex:
    """Convert cftime dates (non-standard calendars) to the standard calendar, or raise DataError."""
    calendar = getattr(values[0], "calendar", "unknown") if len(values) else "unknown"
    try:
        index = xr.CFTimeIndex(values).to_datetimeindex(unsafe=True, time_unit="ns")
    except (TypeError, ValueError) as error:
        raise DataError(
            f"{source}: time coordinate {name!r} uses the {calendar} calendar and cannot be converted to "
            f"the standard calendar ({error}); convert the file to a standard or proleptic_gregorian calendar"
        ) from error
    logger.warning(
        "%s: converted time coordinate %r from the %s calendar to the standard calendar", source, name, calendar
    )
    return index


def normalise_longitudes(longitudes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (order, values): the column order and new longitudes of a grid after wrapping.

    Longitudes are wrapped into [0, 360), sorted, and columns that land on an
    already present longitude are dropped (the first in file order is kept).
    When the grid is regional and its gap is not at 0°, the columns are rolled so
    that the gap lies at the edges and the western part gets values below 0.
    """
    wrapped = np.mod(np.round(np.asarray(longitudes, dtype=np.float64), 9), 360.0)
    wrapped[wrapped >= 360.0] -= 360.0
    values, order = np.unique(wrapped, return_index=True)
    if len(values) < 3:
        return order, values

    # Gap i lies between values[i] and values[i+1], and the last gap wraps across 0°.
    gaps = np.append(np.diff(values), values[0] + 360.0 - values[-1])
    largest = int(np.argmax(gaps))
    interior_hole = largest != len(values) - 1 and gaps[largest] > 1.5 * float(np.median(gaps))
    if interior_hole:
        split = largest + 1
        order = np.concatenate([order[split:], order[:split]])
        values = np.concatenate([values[split:] - 360.0, values[:split]])
    return order, values


def as_slice(indices: np.ndarray) -> slice | np.ndarray:
    """Return `indices` as a slice when they are evenly spaced (e.g. 0..n-1 or reversed), else unchanged.

    A lazily opened store reads a slice with one request per chunk, and an index
    array through the much slower orthogonal indexing path.
    """
    indices = np.asarray(indices)
    if len(indices) < 2:
        return slice(int(indices[0]), int(indices[0]) + 1) if len(indices) == 1 else indices
    steps = np.diff(indices)
    if steps[0] == 0 or not np.all(steps == steps[0]):
        return indices
    step = int(steps[0])
    stop = int(indices[-1]) + step
    return slice(int(indices[0]), stop if stop >= 0 else None, step)


def standardise_coordinates(dataset: xr.Dataset, source: str) -> xr.Dataset:
    """Return `dataset` with dimensions renamed to time/lat/lon and the grid in the standard layout."""
    try:
        time_name, time_dim = _find_axis(dataset, "time", set())
        lat_name, lat_dim = _find_axis(dataset, "lat", {time_dim})
        lon_name, lon_dim = _find_axis(dataset, "lon", {time_dim, lat_dim})
    except DataError as error:
        raise DataError(f"{source}: {error}") from None
    logger.debug(
        "%s: time=%s(%s) lat=%s(%s) lon=%s(%s)", source, time_name, time_dim, lat_name, lat_dim, lon_name, lon_dim
    )

    times = decode_times(dataset[time_name], dataset, source)
    latitudes = np.asarray(dataset[lat_name].values, dtype=np.float64)
    longitudes = np.asarray(dataset[lon_name].values, dtype=np.float64)

    # Drop the original axis variables (and any others named like the targets) before renaming.
    clashing = {time_name, lat_name, lon_name} | ({"time", "lat", "lon"} & set(dataset.variables))
    dataset = dataset.drop_vars([name for name in clashing if name in dataset.variables])
    renames = {old: new for old, new in ((time_dim, "time"), (lat_dim, "lat"), (lon_dim, "lon")) if old != new}
    dataset = dataset.rename_dims(renames)
    dataset = dataset.assign_coords(time=times.values, lat=latitudes, lon=longitudes)
    dataset["lat"].attrs.update(units="degrees_north", standard_name="latitude")
    dataset["lon"].attrs.update(units="degrees_east", standard_name="longitude")

    # Sort time increasing. The time-step check later rejects duplicate times.
    if not times.is_monotonic_increasing:
        dataset = dataset.isel(time=np.argsort(times.values, kind="stable"))

    # Sort latitude north to south.
    lat_order = np.argsort(-latitudes, kind="stable")
    if not np.array_equal(lat_order, np.arange(len(latitudes))):
        dataset = dataset.isel(lat=as_slice(lat_order))

    # Wrap and sort longitude, drop duplicates, and keep a regional grid free of a seam.
    lon_order, lon_values = normalise_longitudes(longitudes)
    if len(lon_order) < len(longitudes):
        logger.info(
            "%s: dropped %d longitude columns that repeat others after wrapping to [0, 360)",
            source,
            len(longitudes) - len(lon_order),
        )
    dataset = dataset.isel(lon=as_slice(lon_order)).assign_coords(lon=lon_values)
    dataset["lon"].attrs.update(units="degrees_east", standard_name="longitude")
    return dataset


def select_variables(dataset: xr.Dataset, requested: list[str] | None, source: str,
                     field: str = "spec.data.variables") -> xr.Dataset:
    """Keep the requested variables, or every data variable on a (time, lat, lon) grid, as (time, lat, lon).

    `field` names the setting of `requested` in error messages.
    """
    grid_dims = {"time", "lat", "lon"}
    on_grid = [str(name) for name, variable in dataset.data_vars.items() if set(variable.dims) == grid_dims]
    listing = ", ".join(f"{name}{tuple(v.dims)}" for name, v in dataset.data_vars.items()) or "none"

    if requested is None:
        if not on_grid:
            raise DataError(
                f"{source}: no data variable has exactly the dimensions (time, lat, lon); variables found: {listing}"
            )
        names = on_grid
    else:
        names = list(requested)
        for name in names:
            if name not in dataset.data_vars:
                raise DataError(
                    f"{field}: variable {name!r} not found in {source}; available variables: {listing}"
                )
            if set(dataset[name].dims) != grid_dims:
                raise DataError(
                    f"{field}: variable {name!r} in {source} has dimensions "
                    f"{tuple(dataset[name].dims)}, expected (time, lat, lon); select a single level or "
                    "member of it in a preprocessed file"
                )

    selected = dataset[names]
    return selected.transpose("time", "lat", "lon")
