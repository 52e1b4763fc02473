"""Describe a data source: variables, grid, time axis, chunking, and the read rate it delivers from here.

`inspect_source` opens the source lazily, reads its metadata, and then reads
consecutive chunk-aligned blocks for a few seconds through the streaming
loader's reader (`StreamSource`), to measure how many time steps per second
arrive from this machine. A training sample needs one new time step when
windows are read in order, so steps per second estimate samples per second.
"""

from __future__ import annotations

import logging
import math
import time as clock
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from wxscale.data.coords import select_variables, standardise_coordinates, time_dimension
from wxscale.data.sources import open_location
from wxscale.data.stream import Prefetcher, StreamSource
from wxscale.data.windows import infer_step
from wxscale.errors import DataError
from wxscale.spec import LoaderSpec, StorageSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariableInfo:
    """One (time, lat, lon) variable as stored."""

    name: str
    dtype: str
    units: str
    chunks: tuple[int, ...] | None  # in stored dimension order, None when unchunked
    dims: tuple[str, ...]
    chunk_mb: float | None  # uncompressed size of one chunk
    compressors: str


@dataclass(frozen=True)
class ReadRate:
    """A measured read: time steps and float32 bytes per second through `StreamSource`."""

    steps: int
    seconds: float
    workers: int
    stored_bytes: int | None  # bytes fetched from the store (compressed), zarr only

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else math.inf


@dataclass
class SourceReport:
    """Everything `wxscale data inspect` prints."""

    url: str
    format: str
    variables: list[VariableInfo]
    n_lat: int
    n_lon: int
    lat_range: tuple[float, float]
    lon_range: tuple[float, float]
    resolution: tuple[float, float]  # degrees (lat, lon), median spacing
    first_time: str
    last_time: str
    steps: int
    step: str  # e.g. '6 h', or a sentence when irregular
    time_chunk_steps: int
    float32_bytes: int
    step_bytes: int
    rate: ReadRate | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.rate is not None:
            data["rate"]["steps_per_second"] = self.rate.steps_per_second
            data["rate"]["float32_mb_per_second"] = self.rate.steps_per_second * self.step_bytes / 1e6
        return data


def _variable_info(raw: Any, name: str) -> VariableInfo:
    variable = raw[name]
    encoding = variable.encoding
    chunks = encoding.get("shards") or encoding.get("chunks") or encoding.get("chunksizes")
    chunks = tuple(int(size) for size in chunks) if chunks else None
    itemsize = np.dtype(encoding.get("dtype", variable.dtype)).itemsize
    chunk_mb = float(np.prod(chunks)) * itemsize / 1e6 if chunks else None
    codecs = encoding.get("compressors") or ((encoding["compressor"],) if encoding.get("compressor") else ())
    if not codecs and encoding.get("zlib"):
        codecs = (f"zlib level {encoding.get('complevel', 4)}",)
    return VariableInfo(
        name=name,
        dtype=str(encoding.get("dtype", variable.dtype)),
        units=str(variable.attrs.get("units", "")),
        chunks=chunks,
        dims=tuple(str(dim) for dim in variable.dims),
        chunk_mb=chunk_mb,
        compressors=", ".join(str(codec) for codec in codecs) or "none",
    )


def measure_read_rate(source: StreamSource, seconds: float, workers: int = 2, block_mb: float = 64.0) -> ReadRate:
    """Read consecutive chunk-aligned blocks from the start for about `seconds` (at least one block)."""
    chunk_steps = source.time_chunk_steps()
    chunk_bytes = chunk_steps * source.step_bytes
    block_steps = chunk_steps * max(1, int(block_mb * 1e6 // chunk_bytes)) if chunk_bytes <= block_mb * 1e6 else max(
        1, int(block_mb * 1e6 // source.step_bytes)
    )
    n_times = len(source.times)
    spans = [(start, min(start + block_steps, n_times)) for start in range(0, n_times, block_steps)]
    store = source.raw.store
    fetched_before = store.counters.bytes_read if store is not None else 0

    began = clock.perf_counter()
    steps = 0
    prefetcher = Prefetcher(lambda span: source.read(*span), spans, workers, 2 * workers, source.policy.timeout_seconds)
    try:
        for (start, stop), _ in prefetcher:
            steps += stop - start
            if clock.perf_counter() - began >= seconds:
                break
    finally:
        prefetcher.close()
    elapsed = clock.perf_counter() - began

    stored = store.counters.bytes_read - fetched_before if store is not None else None
    return ReadRate(steps=steps, seconds=elapsed, workers=workers, stored_bytes=stored)


def inspect_source(
    url: str, storage: StorageSpec | None = None, seconds: float = 3.0, workers: int = 2, measure: bool = True,
    loader: LoaderSpec | None = None,
) -> SourceReport:
    """Describe the netCDF file or zarr store at `url` and, with `measure`, its read rate from here.

    `loader` gives the timeout and retries of each storage request. Raises
    DataError when the source cannot be opened or has no (time, lat, lon) variable.
    """
    raw = open_location(url, storage or StorageSpec(), loader or LoaderSpec(), field="URL")
    dataset = standardise_coordinates(raw.dataset, url)
    dataset = select_variables(dataset, None, url)
    names = [str(name) for name in dataset.data_vars]
    source = StreamSource(dataset, raw, url)

    times = source.times
    notes = []
    try:
        step = infer_step(times, url).describe()
    except DataError as error:
        step = "irregular"
        notes.append(str(error))
    latitudes, longitudes = dataset["lat"].values, dataset["lon"].values
    resolution = (
        float(np.median(np.abs(np.diff(latitudes)))) if len(latitudes) > 1 else math.nan,
        float(np.median(np.abs(np.diff(longitudes)))) if len(longitudes) > 1 else math.nan,
    )
    time_dim = time_dimension(raw.dataset)
    chunk_steps = source.time_chunk_steps()
    if chunk_steps * source.step_bytes > 256e6:
        notes.append(
            f"one time chunk holds {chunk_steps} steps ({chunk_steps * source.step_bytes / 1e6:.0f} MB as float32); "
            "rewrite the store with `wxscale data convert` for smaller chunks of whole time steps"
        )
    if raw.format == "zarr":
        spatial = [info for info in (_variable_info(raw.dataset, name) for name in names) if info.chunks]
        for info in spatial:
            time_axis = info.dims.index(time_dim)
            if any(size < extent for i, (size, extent) in enumerate(zip(info.chunks, raw.dataset[info.name].shape))
                   if i != time_axis):
                notes.append(f"{info.name} is chunked in space too; each time step needs several requests")

    report = SourceReport(
        url=url,
        format=raw.format,
        variables=[_variable_info(raw.dataset, name) for name in names],
        n_lat=len(latitudes),
        n_lon=len(longitudes),
        lat_range=(float(latitudes.min()), float(latitudes.max())),
        lon_range=(float(longitudes.min()), float(longitudes.max())),
        resolution=resolution,
        first_time=f"{times[0]:%Y-%m-%d %H:%M}",
        last_time=f"{times[-1]:%Y-%m-%d %H:%M}",
        steps=len(times),
        step=step,
        time_chunk_steps=chunk_steps,
        float32_bytes=len(times) * source.step_bytes,
        step_bytes=source.step_bytes,
        notes=notes,
    )
    if measure:
        report.rate = measure_read_rate(source, seconds, workers)
    return report


def format_report(report: SourceReport) -> str:
    """Return the report as the text `wxscale data inspect` prints."""
    lines = [
        f"source:     {report.url} ({report.format})",
        f"grid:       {report.n_lat} x {report.n_lon}, lat {report.lat_range[0]:g}..{report.lat_range[1]:g}, "
        f"lon {report.lon_range[0]:g}..{report.lon_range[1]:g}, spacing {report.resolution[0]:g} x "
        f"{report.resolution[1]:g} deg",
        f"time:       {report.first_time} .. {report.last_time}, {report.steps} steps, step {report.step}",
        f"size:       {report.float32_bytes / 1e6:.1f} MB as float32 ({report.step_bytes / 1e6:.3f} MB per step)",
        f"time chunk: {report.time_chunk_steps} step(s) per chunk",
        "variables:",
    ]
    for info in report.variables:
        if info.chunks is None:
            chunks = "unchunked"
        else:
            chunks = f"chunks {info.chunks} over {info.dims} ({info.chunk_mb:.2f} MB)"
        units = f" [{info.units}]" if info.units else ""
        lines.append(f"  {info.name}{units}: {info.dtype}, {chunks}, compressors {info.compressors}")
    if report.rate is not None:
        rate = report.rate
        per_second = rate.steps_per_second
        line = (
            f"read rate:  about {per_second:,.0f} samples/s ({per_second * report.step_bytes / 1e6:,.1f} MB/s of "
            f"float32 fields; {rate.steps} steps in {rate.seconds:.2f} s with {rate.workers} reader threads"
        )
        if rate.stored_bytes is not None and rate.seconds > 0:
            line += f", {rate.stored_bytes / rate.seconds / 1e6:,.1f} MB/s fetched from the store"
        lines.append(line + ")")
        lines.append("            (one sample per time step read; an estimate from this machine and network)")
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


__all__ = ["SourceReport", "VariableInfo", "ReadRate", "format_report", "inspect_source", "measure_read_rate"]
