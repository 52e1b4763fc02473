"""Read time ranges of a zarr store chunk by chunk, without xarray: fetch concurrently, decode in threads.

xarray reads the variables of a dataset one after the other, and each read
goes through zarr's indexing and codec pipeline on its event loop. For a store
whose chunks hold whole time steps (the layout `wxscale data convert` writes),
`ChunkReader` does the same work with less overhead:

1. the chunk keys of every variable of a time range are fetched together on
   zarr's event loop through the `ReliableStore`, so retries, timeouts, the
   chunk cache and missing-chunk errors apply as on the xarray path. Of an
   uncompressed chunk, only the bytes of the requested steps are fetched;
2. each chunk is decoded with numcodecs in a thread pool as soon as its bytes
   arrive. numcodecs' zstd decoder releases the GIL while it decompresses (the
   `with nogil` block of numcodecs/zstd.pyx), so decoding runs on several cores;
3. the decoded chunk is cut to the requested steps and the standardised grid
   (the same latitude and longitude indices as xarray's lazy indexing) and
   copied once into the output array.

`plan_chunk_reader` builds a reader only for layouts it reproduces exactly.
Those have chunks that span the whole grid, no shards, time in the stored
order, float data without scale factors, and codecs it decodes itself. The
codecs are bytes with zstd, gzip, blosc or no compression for zarr v3, and any
numcodecs compressor without filters for zarr v2. For everything else it
returns None, and the caller reads through xarray.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import xarray as xr
import zarr
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from wxscale.data.coords import as_slice, standardise_coordinates
from wxscale.data.store import CorruptChunkError, ReliableStore
from wxscale.errors import DataError

logger = logging.getLogger(__name__)

# Variables of the index probe; the prefix keeps them apart from any name a source uses.
_POSITION_PREFIX = "_wxscale_position_"

# Decoding threads shared by every reader of the process. zstd decoding runs outside the GIL,
# so more threads than cores only add switching.
DECODE_THREADS = max(2, min(8, os.cpu_count() or 2))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def decode_pool() -> ThreadPoolExecutor:
    """Return the process's thread pool for chunk decoding, created on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="wxscale-decode")
        return _pool


# Called on each piece of a read as (variable position, first row, last row + 1, piece).
Finish = Callable[[int, int, int, np.ndarray], None]


def _infinities_to_nan(v: int, first: int, last: int, target: np.ndarray) -> None:
    target[np.isinf(target)] = np.nan


@dataclass(frozen=True)
class VariableLayout:
    """Mapping of the chunks of one stored variable onto the standardised (time, lat, lon) grid."""

    name: str
    array: zarr.Array
    chunk_steps: int
    dtype: np.dtype  # of the stored values, with their byte order
    chunk_shape: tuple[int, ...]  # as stored
    to_standard: tuple[int, int, int]  # axes of the stored array in (time, lat, lon) order
    lat: slice | np.ndarray  # stored latitude indices of the standardised grid
    lon: slice | np.ndarray
    decode: Callable[[Any], Any] | None  # bytes -> decoded bytes; None for uncompressed chunks
    fill_value: Any  # zarr's value for a chunk that is not stored
    missing_values: tuple[float, ...]  # values that xarray's CF decoding turns into NaN

    def chunk_key(self, index: int) -> str:
        coords = [0, 0, 0]
        coords[self.to_standard[0]] = index
        return f"{self.array.path}/{self.array.metadata.encode_chunk_key(tuple(coords))}"


class ChunkReader:
    """Reader of time ranges of a zarr store's variables into (T, V, H, W) float32 arrays, chunk by chunk."""

    def __init__(self, store: ReliableStore, layouts: list[VariableLayout], label: str):
        self.store = store
        self.layouts = layouts
        self.label = label

    def chunk_keys(self, start: int, stop: int) -> list[str]:
        """Return the keys of every chunk that contains a step of [start, stop), variable by variable."""
        keys = []
        for layout in self.layouts:
            for index in range(start // layout.chunk_steps, (stop - 1) // layout.chunk_steps + 1):
                keys.append(layout.chunk_key(index))
        return keys

    def read_into(self, output: np.ndarray, start: int, stop: int, finish: Finish | None = None) -> None:
        """Write time steps [start, stop) of every variable into `output`, a (stop - start, V, H, W) array.

        `finish(v, first, last, target)` runs on each piece `target` =
        `output[first:last, v]` as soon as it is written, in a decoding thread,
        while its values are still in the CPU cache. By default infinite values
        become NaN, as missing values.

        Raises MissingChunkError, ChunkReadError (from the store, after its
        retries) or CorruptChunkError, each with the chunk's key.
        """
        tasks = []
        for v, layout in enumerate(self.layouts):
            for index in range(start // layout.chunk_steps, (stop - 1) // layout.chunk_steps + 1):
                tasks.append((v, layout, index))
        sync(self._fetch_and_decode(output, start, stop, tasks, finish or _infinities_to_nan))

    async def _fetch_and_decode(self, output: np.ndarray, start: int, stop: int,
                                tasks: list[tuple[int, VariableLayout, int]], finish: Finish) -> None:
        loop = asyncio.get_running_loop()
        pool = decode_pool()
        prototype = default_buffer_prototype()

        async def one(v: int, layout: VariableLayout, index: int) -> None:
            key = layout.chunk_key(index)
            rows = self._rows_to_fetch(layout, index, start, stop)
            byte_range = None
            if rows is not None:
                row_bytes = layout.dtype.itemsize * math.prod(layout.chunk_shape[1:])
                byte_range = RangeByteRequest(rows[0] * row_bytes, rows[1] * row_bytes)
            buffer = await self.store.get(key, prototype, byte_range)
            data = None if buffer is None else buffer.as_numpy_array()
            await loop.run_in_executor(pool, self._place, output, start, stop, v, layout, index, key, data, rows,
                                       finish)

        # A plain gather returns at the first error while the other tasks still write into `output`,
        # which the caller may reuse. With return_exceptions it waits for every task.
        results = await asyncio.gather(*(one(*task) for task in tasks), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _rows_to_fetch(self, layout: VariableLayout, index: int, start: int, stop: int) -> tuple[int, int] | None:
        """Return the rows [first, last) of chunk `index` to fetch as a byte range, or None to fetch it whole.

        Only uncompressed chunks stored time first can be cut by bytes. With a
        chunk cache, chunks are fetched whole so that the cache can keep them.
        """
        if layout.decode is not None or layout.to_standard[0] != 0 or self.store.cache is not None:
            return None
        first = index * layout.chunk_steps
        begin, end = max(start, first) - first, min(stop, first + layout.chunk_steps) - first
        if begin == 0 and end == layout.chunk_steps:
            return None
        return begin, end

    def _place(self, output: np.ndarray, start: int, stop: int, v: int, layout: VariableLayout, index: int,
               key: str, data: np.ndarray | None, rows: tuple[int, int] | None, finish: Finish) -> None:
        """Decode one chunk, or rows [first, last) of it, and copy its steps within [start, stop) into `output[:, v]`."""
        first = index * layout.chunk_steps
        begin, end = max(start, first), min(stop, first + layout.chunk_steps)
        shape = layout.chunk_shape
        if rows is not None:
            shape = (rows[1] - rows[0], *shape[1:])
            first += rows[0]
        if data is None:  # only under missingChunks: fill; the store raises MissingChunkError otherwise
            values = np.full(shape, layout.fill_value, dtype=layout.dtype)
        else:
            try:
                decoded = data if layout.decode is None else layout.decode(data)
                values = np.frombuffer(decoded, dtype=layout.dtype).reshape(shape)
            except (RuntimeError, ValueError, TypeError) as error:
                raise CorruptChunkError(
                    f"chunk {key!r} of {self.label} is corrupt: it does not decode ({type(error).__name__}: "
                    f"{error}); rewrite the store or restore the chunk",
                    key,
                ) from error
        values = values.transpose(layout.to_standard)[begin - first : end - first]
        values = values[:, layout.lat][:, :, layout.lon]
        target = output[begin - start : end - start, v]
        np.copyto(target, values, casting="same_kind")
        if layout.missing_values:
            # xarray compares the stored values with the fill value before any conversion to float32.
            target[np.isin(values, layout.missing_values)] = np.nan
        finish(v, begin - start, end - start, target)


def _position_probe(raw: xr.Dataset, label: str) -> xr.Dataset:
    """Return the coordinates of `raw` with an integer position variable per dimension, standardised.

    `standardise_coordinates` reorders and renames the probe as it does the
    source, so each position variable ends with the stored index of every
    standardised row, column and time step.
    """
    probe = raw.drop_vars([name for name, variable in raw.variables.items() if variable.ndim != 1])
    for dim, size in raw.sizes.items():
        probe[f"{_POSITION_PREFIX}{dim}"] = ((dim,), np.arange(size))
    return standardise_coordinates(probe, label)


def _stored_indices(coordinates: np.ndarray, probe_values: np.ndarray, positions: np.ndarray) -> np.ndarray | None:
    """Return the stored indices of `coordinates`, or None when the probe's values repeat or lack one of them."""
    lookup: dict[float, int] = {}
    for i, value in enumerate(probe_values.tolist()):
        if value in lookup:
            return None
        lookup[value] = i
    try:
        return positions[[lookup[value] for value in coordinates.tolist()]]
    except KeyError:
        return None


def _decoder(array: zarr.Array) -> tuple[bool, Callable[[Any], Any] | None, np.dtype | None]:
    """Return (supported, decode, stored dtype) of an array's codecs."""
    import numcodecs
    from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec

    metadata = array.metadata
    if isinstance(metadata, zarr.core.metadata.ArrayV2Metadata):
        if metadata.filters or metadata.order != "C":
            return False, None, None
        dtype = np.dtype(array.dtype)
        compressor = metadata.compressor
        return True, (None if compressor is None else compressor.decode), dtype

    codecs = list(metadata.codecs)
    if not codecs or not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
        return False, None, None
    endian = getattr(codecs[0].endian, "value", codecs[0].endian)
    dtype = np.dtype(array.dtype).newbyteorder(">" if endian == "big" else "<")
    if len(codecs) == 1:
        return True, None, dtype
    codec = codecs[1]
    if isinstance(codec, ZstdCodec):
        return True, numcodecs.Zstd(level=codec.level).decode, dtype
    if isinstance(codec, GzipCodec):
        return True, numcodecs.GZip(level=codec.level).decode, dtype
    if isinstance(codec, BloscCodec):
        return True, numcodecs.Blosc().decode, dtype
    return False, None, None


def plan_chunk_reader(dataset: xr.Dataset, raw: xr.Dataset, store: ReliableStore | None,
                      label: str) -> ChunkReader | None:
    """Return a ChunkReader of `dataset` (standardised, cropped, from `raw`), or None when it needs xarray.

    The reason for None is logged at debug level, or as a warning when the
    index probe fails, which would be a bug.
    """
    def unsupported(reason: str) -> None:
        logger.debug("%s: reading through xarray, because %s", label, reason)

    if store is None:
        return unsupported("the source is not a zarr store")
    try:
        probe = _position_probe(raw, label)
    except (DataError, KeyError, ValueError) as error:
        # The source itself was standardised already, so this is unexpected; xarray still reads it correctly.
        logger.warning("%s: reading through xarray, because the index probe failed: %s", label, error)
        return None
    stored_dim = {}
    for name, variable in probe.data_vars.items():
        if str(name).startswith(_POSITION_PREFIX) and variable.dims[0] in ("time", "lat", "lon"):
            stored_dim[variable.dims[0]] = str(name).removeprefix(_POSITION_PREFIX)

    time_positions = np.asarray(probe[f"{_POSITION_PREFIX}{stored_dim['time']}"].values)
    in_order = np.array_equal(time_positions, np.arange(len(time_positions)))
    if len(time_positions) != dataset.sizes["time"] or not in_order:
        return unsupported("its time steps are not stored in increasing order")
    indices = {}
    for axis in ("lat", "lon"):
        found = _stored_indices(np.asarray(dataset[axis].values), np.asarray(probe[axis].values),
                                np.asarray(probe[f"{_POSITION_PREFIX}{stored_dim[axis]}"].values))
        if found is None:
            return unsupported(f"its {axis} values do not map one to one onto the stored ones")
        indices[axis] = as_slice(found)

    layouts = []
    for name in dataset.data_vars:
        variable = raw[name]
        encoding = variable.encoding
        if "scale_factor" in encoding or "add_offset" in encoding:
            return unsupported(f"variable {name!r} has a scale factor or offset")
        array = zarr.open_array(store, path=str(name), mode="r")
        if not np.issubdtype(np.dtype(array.dtype), np.floating):
            return unsupported(f"variable {name!r} is stored as {array.dtype}")
        if array.shards is not None:
            return unsupported(f"variable {name!r} is sharded")
        supported, decode, dtype = _decoder(array)
        if not supported:
            return unsupported(f"the codecs of variable {name!r} are not handled here")
        order = tuple(variable.dims.index(stored_dim[axis]) for axis in ("time", "lat", "lon"))
        if any(size < extent for axis, (size, extent) in enumerate(zip(array.chunks, array.shape))
               if axis != order[0]):
            return unsupported(f"the chunks of variable {name!r} do not span the whole grid")
        missing = []
        for attribute in ("_FillValue", "missing_value"):
            for value in np.atleast_1d(encoding.get(attribute, [])):
                if not np.isnan(value):
                    missing.append(float(value))
        layouts.append(VariableLayout(
            name=str(name),
            array=array,
            chunk_steps=array.chunks[order[0]],
            dtype=dtype,
            chunk_shape=tuple(array.chunks),
            to_standard=order,
            lat=indices["lat"],
            lon=indices["lon"],
            decode=decode,
            # zarr 3 reads a chunk that is not stored as 0 when a v2 array has no fill value.
            fill_value=0 if array.fill_value is None else array.fill_value,
            missing_values=tuple(missing),
        ))
    logger.debug("%s: reading chunks directly (%d variables)", label, len(layouts))
    return ChunkReader(store, layouts, label)
