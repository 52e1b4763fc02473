"""Rewrite a netCDF, GRIB or zarr source as a zarr store laid out for training.

The output has the standard layout of `wxscale.data.coords` (dimensions time,
lat, lon; latitude descending; longitude increasing), float32 variables, and
chunks that hold a run of whole time steps: (time_chunk, n_lat, n_lon), about
`chunk_mb` each. The streaming loader then reads windows of consecutive steps
with one request per chunk. Every chunk is written, even one that holds only
the fill value, so that a missing chunk always means a damaged store.

The source is read and written in slabs of whole chunks that fit in
`memory_mb`, so sources larger than memory convert with bounded memory.

Compression: zstd (level 1, the default) stores fewer bytes, and decoding
them costs CPU time on every epoch. Choose it when the bytes move over a
network (object storage), where they cost more than the decoding. Choose
`compression="none"` for local disks (NVMe) with room for the larger store,
where decoding would be the loader's bottleneck. `benchmarks/data_loader.py`
measures both layouts.
"""

from __future__ import annotations

import logging
import math
import time as clock
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr

from wxscale.data.coords import select_variables, standardise_coordinates
from wxscale.data.sources import split_location, open_location, storage_options_for
from wxscale.data.windows import infer_step
from wxscale.errors import DataError
from wxscale.spec import LoaderSpec, StorageSpec

logger = logging.getLogger(__name__)

# Minutes since the epoch as int64 represent every time step of a minute or longer exactly.
TIME_ENCODING = {"units": "minutes since 1970-01-01 00:00:00", "calendar": "proleptic_gregorian", "dtype": "int64"}


@dataclass(frozen=True)
class ConvertOptions:
    """Layout of the converted store."""

    variables: list[str] | None = None  # default every (time, lat, lon) variable
    time_chunk: int | None = None  # time steps per chunk; default from chunk_mb
    chunk_mb: float = 8.0  # target float32 size of one chunk when time_chunk is not given
    zarr_format: Literal[2, 3] = 3
    compression: Literal["zstd", "none"] = "zstd"
    memory_mb: float = 512.0  # bound on the slab read and written at once
    overwrite: bool = False


@dataclass(frozen=True)
class ConvertSummary:
    """The layout and size of the store that `convert` wrote."""

    destination: str
    variables: list[str]
    steps: int
    grid: tuple[int, int]
    time_chunk: int
    chunks_per_variable: int
    float32_bytes: int
    seconds: float


def time_chunk_for(n_lat: int, n_lon: int, options: ConvertOptions) -> int:
    """Return the time steps per chunk: `options.time_chunk`, or as many as fit `chunk_mb` (at least 1)."""
    if options.time_chunk is not None:
        if options.time_chunk < 1:
            raise DataError(f"--time-chunk: must be at least 1, got {options.time_chunk}")
        return options.time_chunk
    step_bytes = n_lat * n_lon * 4
    return max(1, int(options.chunk_mb * 1e6 // step_bytes))


def _encoding(dataset: xr.Dataset, time_chunk: int, options: ConvertOptions) -> dict[str, dict[str, Any]]:
    encoding: dict[str, dict[str, Any]] = {"time": dict(TIME_ENCODING)}
    for name in dataset.data_vars:
        entry: dict[str, Any] = {
            "chunks": (time_chunk, dataset.sizes["lat"], dataset.sizes["lon"]),
            "dtype": "float32",
            "_FillValue": np.float32(np.nan),
        }
        if options.compression == "none":
            entry["compressors"] = None
        elif options.zarr_format == 3:
            entry["compressors"] = [{"name": "zstd", "configuration": {"level": 1}}]
        else:
            import numcodecs

            entry["compressors"] = [numcodecs.Zstd(level=1)]
        encoding[str(name)] = entry
    return encoding


def _clean(dataset: xr.Dataset) -> xr.Dataset:
    """Drop the source's encoding (chunks, scale factors, compressors) so that only the new layout applies."""
    dataset = dataset.copy()
    for variable in dataset.variables.values():
        variable.encoding = {}
    return dataset


def convert(
    source: str,
    destination: str,
    options: ConvertOptions = ConvertOptions(),
    storage: StorageSpec | None = None,
    loader: LoaderSpec | None = None,
) -> ConvertSummary:
    """Write `source` to `destination` (local path or s3:// URL) as a training-friendly zarr store.

    `storage` gives the S3 endpoint of both locations. Raises DataError when the
    source cannot be read, a variable is missing, or the destination exists and
    `options.overwrite` is False.
    """
    began = clock.perf_counter()
    storage = storage or StorageSpec()
    protocol, path = split_location(destination, field="DST")
    target: Any = path if protocol == "file" else destination
    target_options = storage_options_for(storage) if protocol == "s3" else None
    _check_destination(destination, protocol, path, target_options, options.overwrite)

    raw = open_location(source, storage, loader or LoaderSpec(), field="SRC")
    dataset = standardise_coordinates(raw.dataset, source)
    dataset = select_variables(dataset, options.variables, source, field="--variables")
    variables = [str(name) for name in dataset.data_vars]
    n_times, n_lat, n_lon = dataset.sizes["time"], dataset.sizes["lat"], dataset.sizes["lon"]

    try:
        infer_step(pd.DatetimeIndex(dataset["time"].values), source)
    except DataError as error:
        # Converting is still useful (inspection, evaluation), but no study can train on the store as it is.
        detail = str(error).removeprefix("spec.data.leadTime cannot be converted to time steps: ")
        logger.warning("%s; the converted store keeps these time steps, so a study can train on it only after "
                       "resampling", detail)

    time_chunk = min(time_chunk_for(n_lat, n_lon, options), n_times)
    step_bytes = len(variables) * n_lat * n_lon * 4
    # A slab of whole chunks, so every append starts on a chunk boundary.
    slab_chunks = max(1, int(options.memory_mb * 1e6 // (time_chunk * step_bytes)))
    slab_steps = min(slab_chunks * time_chunk, n_times)
    logger.info(
        "converting %s: variables %s, %d steps, %d x %d grid; chunks of %d steps (%.1f MB float32 per variable), "
        "slabs of %d steps",
        source,
        ", ".join(variables),
        n_times,
        n_lat,
        n_lon,
        time_chunk,
        time_chunk * n_lat * n_lon * 4 / 1e6,
        slab_steps,
    )

    encoding = _encoding(dataset, time_chunk, options)
    for start in range(0, n_times, slab_steps):
        stop = min(start + slab_steps, n_times)
        slab = _clean(dataset.isel(time=slice(start, stop)))
        for name in variables:
            slab[name] = slab[name].astype(np.float32)
        slab = slab.load()

        kwargs: dict[str, Any] = {
            "zarr_format": options.zarr_format,
            "consolidated": True,
            "write_empty_chunks": True,
            "storage_options": target_options,
        }
        with warnings.catch_warnings():
            # zarr 3 warns that consolidated metadata is not part of the v3 specification; xarray reads it.
            warnings.filterwarnings("ignore", message=".*Consolidated metadata is currently not part.*")
            if start == 0:
                slab.to_zarr(target, mode="w", encoding=encoding, **kwargs)
            else:
                slab.to_zarr(target, append_dim="time", **kwargs)
        logger.info("wrote steps %d..%d of %d to %s", start, stop - 1, n_times, destination)

    summary = ConvertSummary(
        destination=destination,
        variables=sorted(variables),
        steps=n_times,
        grid=(n_lat, n_lon),
        time_chunk=time_chunk,
        chunks_per_variable=math.ceil(n_times / time_chunk),
        float32_bytes=n_times * step_bytes,
        seconds=clock.perf_counter() - began,
    )
    logger.info(
        "converted %s to %s in %.1f s (%.1f MB float32)",
        source,
        destination,
        summary.seconds,
        summary.float32_bytes / 1e6,
    )
    return summary


def _check_destination(
    destination: str, protocol: str, path: str, options: dict[str, Any] | None, overwrite: bool
) -> None:
    import fsspec

    fs = fsspec.filesystem(protocol, **(options or {}))
    if fs.exists(path) and not overwrite:
        raise DataError(f"DST: {destination} already exists; choose another destination or pass --overwrite")
