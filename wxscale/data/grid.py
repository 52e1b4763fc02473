"""Regional crop and block-mean coarsening of a standardised (time, lat, lon) dataset.

Both work on datasets from `wxscale.data.sources.open_source`: latitude descending,
longitude increasing (see `wxscale.data.coords`). Cropping only selects indices, so
it stays lazy. Coarsening reads and averages the values, so it is meant for loaded
data or for a dataset of coordinates only (as `grid_info` uses it).
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from wxscale.data.coords import as_slice
from wxscale.errors import DataError
from wxscale.spec import Region


def region_longitude_indices(longitudes: np.ndarray, region: Region) -> tuple[np.ndarray, np.ndarray]:
    """Return (indices, values) of the columns inside the region's longitude range, west to east.

    The region may use either convention (0..360 or -180..180) and may cross 0°
    (lonMin 350, lonMax 10, or lonMin -10, lonMax 10). The returned values increase
    continuously from the western edge. A box that crosses 0° therefore gets values
    below 0 on its western side, e.g. -10..10.
    """
    width = region.lon_max - region.lon_min
    if width >= 360.0:
        return np.arange(len(longitudes)), np.asarray(longitudes, dtype=np.float64)

    west = region.lon_min % 360.0
    width = width % 360.0
    offsets = np.mod(np.asarray(longitudes, dtype=np.float64) - west, 360.0)
    inside = np.flatnonzero(offsets <= width + 1e-9)
    order = inside[np.argsort(offsets[inside], kind="stable")]

    values = west + offsets[order]
    if values.size and values.max() >= 360.0:
        values = values - 360.0
    return order, values


def crop_region(dataset: xr.Dataset, region: Region | None) -> xr.Dataset:
    """Return the part of `dataset` inside `region`, edges included, or `dataset` itself when region is None.

    Raises DataError naming spec.data.region when the box contains no grid point.
    """
    if region is None:
        return dataset

    latitudes = dataset["lat"].values
    lat_indices = np.flatnonzero((latitudes >= region.lat_min) & (latitudes <= region.lat_max))
    lon_indices, lon_values = region_longitude_indices(dataset["lon"].values, region)

    if lat_indices.size == 0 or lon_indices.size == 0:
        longitudes = dataset["lon"].values
        raise DataError(
            f"spec.data.region: the box lat {region.lat_min}..{region.lat_max}, "
            f"lon {region.lon_min}..{region.lon_max} contains no grid point; the data covers "
            f"lat {latitudes.min():g}..{latitudes.max():g}, lon {longitudes.min():g}..{longitudes.max():g}"
        )

    cropped = dataset.isel(lat=as_slice(lat_indices), lon=as_slice(lon_indices))
    cropped = cropped.assign_coords(lon=lon_values)
    cropped["lon"].attrs.update(dataset["lon"].attrs)
    return cropped


def coarsen(dataset: xr.Dataset, factor: int) -> xr.Dataset:
    """Average blocks of factor x factor grid points; rows and columns that do not fill a block are dropped.

    The mean skips NaN, so a block is NaN only when all its cells are. Coordinates
    become the block means of the cell coordinates.
    """
    if factor == 1:
        return dataset
    n_lat, n_lon = dataset.sizes["lat"], dataset.sizes["lon"]
    if n_lat < factor or n_lon < factor:
        raise DataError(
            f"spec.data.coarsen: factor {factor} is larger than the grid ({n_lat} x {n_lon}); "
            f"use at most {min(n_lat, n_lon)}"
        )
    coarse = dataset.coarsen(lat=factor, lon=factor, boundary="trim").mean(keep_attrs=True)
    for name in ("lat", "lon"):
        coarse[name].attrs.update(dataset[name].attrs)
    return coarse


def coarsen_values(values: np.ndarray, factor: int) -> np.ndarray:
    """Average blocks of factor x factor cells of fields (..., lat, lon) like `coarsen`, on a plain array.

    Rows and columns that do not fill a block are dropped and the mean skips NaN,
    so the result matches `coarsen` of the same fields up to float32 rounding.
    """
    if factor == 1:
        return values
    n_lat, n_lon = values.shape[-2] // factor, values.shape[-1] // factor
    trimmed = values[..., : n_lat * factor, : n_lon * factor]
    blocks = trimmed.reshape(*values.shape[:-2], n_lat, factor, n_lon, factor)
    with warnings.catch_warnings():
        # A block of only NaN cells is NaN, which is what the warning is about.
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.nanmean(blocks, axis=(-3, -1)).astype(values.dtype, copy=False)
