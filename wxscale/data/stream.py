"""Stream the training split from storage in chunk-aligned blocks, for data larger than memory.

`load_trial_data` picks the data path of a trial from `spec.data.loader`:
`build_datasets` (every used time step in memory) or `build_streaming`.

The streaming path, per epoch and rank:

1. the training windows are grouped into blocks of whole time chunks of the
   store (`wxscale.data.blocks`). The blocks are permuted by (seed, epoch), and
   each rank takes its share, so ranks own disjoint chunks. Windows on the
   boundary of two of a rank's blocks go to the block read later, which copies
   the steps it needs from the earlier one instead of fetching its chunk again;
2. `Prefetcher` threads read the rank's blocks in that order, at most
   `loader.prefetch` blocks ahead of training (the bounded queue), and
   normalise each block once. A zarr store whose chunks hold whole time steps
   is read chunk by chunk with `wxscale.data.chunks.ChunkReader`, other
   sources through xarray;
3. the windows of `loader.shuffleBlocks` consecutive blocks are permuted
   together and copied into batches.

Memory: at most `prefetch` blocks are being read or wait in the queue, and
`shuffleBlocks` blocks are being cut into batches. A block being read also
holds its fetched chunk bytes, and halo steps kept for neighbouring blocks
take up to one block. Blocks are sized so that prefetch + shuffleBlocks +
workers + 2 of them fit in `loader.memoryMB`.

NOTE: a block with missing (NaN) cells also holds a mask of one byte per
cell, a quarter of its float32 size, which the sizing does not count.

Normalisation statistics and the climatology come from the training period
only. They are estimated from about `loader.statsSteps` of its time steps,
read as whole time chunks spread evenly over the period; when the period has
no more steps than that, every step is read and the statistics are exact.
Validation and test splits are loaded into memory, because the test
evaluation needs all of its fields at once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time as clock
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr
import zarr

from wxscale.data.blocks import (
    Block,
    BlockRead,
    block_steps_for,
    epoch_order,
    halo_overhead,
    hand_over_boundary_windows,
    plan_block_reads,
    plan_blocks,
    rank_blocks,
    shuffle_group,
)
from wxscale.data.chunks import ChunkReader, Finish, plan_chunk_reader
from wxscale.data.coords import time_dimension
from wxscale.data.dataset import BundleMethods, WindowDataset, _apply_nan_policy, _describe, build_datasets
from wxscale.data.grid import coarsen, coarsen_values, crop_region
from wxscale.data.sources import RawSource, open_source_and_raw
from wxscale.data.stats import Climatology, NormalisationStats, RunningMoments
from wxscale.data.store import (
    DECODE_ERRORS,
    ChunkReadError,
    CorruptChunkError,
    ReadPolicy,
    find_corrupt_chunk,
    is_transient,
    time_chunk_keys,
)
from wxscale.data.windows import WindowLayout, build_splits, to_timestamp
from wxscale.errors import DataError
from wxscale.spec import DataSpec, LoaderSpec

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class StreamSource:
    """A source opened lazily, standardised and cropped, that reads time ranges as (T, V, H, W) float32 arrays.

    Arrays are coarsened by `spec.data.coarsen`, and infinities become NaN, as in
    `build_datasets`. A zarr store reads through a `ReliableStore`, which retries
    each request, and with a `ChunkReader` when its layout allows (else through
    xarray, as `chunk_reader = None` forces). netCDF reads are retried here as a whole.
    """

    def __init__(self, dataset: xr.Dataset, raw: RawSource, label: str, factor: int = 1,
                 policy: ReadPolicy | None = None):
        """Wrap `dataset`, standardised (and cropped) from `raw`, coarsened by `factor` on read."""
        self.dataset = dataset
        self.raw = raw
        self.label = label
        self.variables = [str(name) for name in self.dataset.data_vars]
        self.times = pd.DatetimeIndex(self.dataset["time"].values)
        self.factor = factor
        self.policy = policy or ReadPolicy()
        self.units = {name: str(self.dataset[name].attrs.get("units", "")) for name in self.variables}

        # Coarsened coordinates: the same operation on a dataset of coordinates only.
        grid = xr.Dataset(coords={"lat": self.dataset["lat"], "lon": self.dataset["lon"]})
        grid = coarsen(grid, self.factor)
        self.latitudes = np.asarray(grid["lat"].values, dtype=np.float64)
        self.longitudes = np.asarray(grid["lon"].values, dtype=np.float64)

        self._lock = threading.Lock()
        self._arrays: dict[str, tuple[zarr.Array, int]] | None = None  # zarr array and time axis per variable
        self.decoded_bytes = 0  # float32 bytes read before coarsening
        # Reads whole chunks without xarray when the store's layout allows; None reads through xarray.
        self.chunk_reader: ChunkReader | None = plan_chunk_reader(self.dataset, raw.dataset, raw.store, label)

    @classmethod
    def from_spec(cls, data: DataSpec, opened: tuple[xr.Dataset, RawSource] | None = None) -> StreamSource:
        """Open `data.source` (or take the `open_source_and_raw` result `opened`) and crop it to `data.region`."""
        dataset, raw = opened or open_source_and_raw(data)
        policy = ReadPolicy.from_loader(data.loader)
        return cls(crop_region(dataset, data.region), raw, data.source, data.coarsen, policy)

    @property
    def step_bytes(self) -> int:
        """float32 bytes of one time step of all variables, after cropping and before coarsening."""
        return len(self.variables) * self.dataset.sizes["lat"] * self.dataset.sizes["lon"] * 4

    @property
    def shape(self) -> tuple[int, int, int]:
        """(V, H, W) of the arrays `read` returns."""
        return len(self.variables), len(self.latitudes), len(self.longitudes)

    def time_chunk_steps(self) -> int:
        """Return the time steps per stored chunk (per shard for sharded zarr), 1 for unchunked files.

        Variables with different time chunks align to their least common multiple
        when it is at most 4x the largest chunk, and to the largest chunk otherwise.
        """
        time_dim = time_dimension(self.raw.dataset)
        sizes = []
        for name in self.variables:
            variable = self.raw.dataset[name]
            encoding = variable.encoding
            shape = encoding.get("shards") or encoding.get("chunks") or encoding.get("chunksizes")
            if not shape or time_dim not in variable.dims:
                continue
            sizes.append(int(shape[variable.dims.index(time_dim)]))
        if not sizes:
            return 1
        common = math.lcm(*sizes)
        return common if common <= 4 * max(sizes) else max(sizes)

    def read(self, start: int, stop: int, out: np.ndarray | None = None, finish: Finish | None = None) -> np.ndarray:
        """Return time steps [start, stop) as a (T, V, H, W) float32 array in physical units.

        With `out`, an array of that shape, the steps are written into it and it
        is returned. Infinities become NaN, unless `finish` is given: then
        `finish(v, first, last, piece)` runs on pieces `out[first:last, v]` that
        together cover the output once, possibly in other threads, and must
        treat infinities as missing itself.

        Raises ChunkReadError (with the chunk's key) for a zarr chunk that is
        missing, does not decode or cannot be fetched, and DataError for a
        netCDF range that cannot be read after the retries.
        """
        policy = self.policy
        for attempt in range(policy.retries + 1):
            try:
                return self._read_once(start, stop, out, finish)
            except ChunkReadError:
                raise  # the store has retried this request already
            except DECODE_ERRORS as error:
                self._raise_decode_error(start, stop, error)
            except OSError as error:
                if not is_transient(error) or attempt == policy.retries:
                    raise DataError(
                        f"reading time steps {self.describe_span(start, stop)} of {self.label} failed after "
                        f"{attempt + 1} attempt(s): {type(error).__name__}: {error}"
                    ) from error
                delay = policy.delay(attempt)
                logger.warning(
                    "reading time steps %s of %s failed (%s: %s); retry %d of %d in %.2f s",
                    self.describe_span(start, stop),
                    self.label,
                    type(error).__name__,
                    error,
                    attempt + 1,
                    policy.retries,
                    delay,
                )
                clock.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    def _read_once(self, start: int, stop: int, out: np.ndarray | None, finish: Finish | None) -> np.ndarray:
        if self.chunk_reader is not None and self.factor == 1:
            output = out if out is not None else np.empty((stop - start, *self.shape), dtype=np.float32)
            self.chunk_reader.read_into(output, start, stop, finish)
        else:
            if self.chunk_reader is not None:
                output = self._read_coarsened_chunks(start, stop)
            else:
                output = self._read_xarray(start, stop)
            if out is not None:
                out[...] = output
                output = out
            if finish is not None:
                for v in range(output.shape[1]):
                    finish(v, 0, stop - start, output[:, v])
        with self._lock:
            self.decoded_bytes += (stop - start) * self.step_bytes
        return output

    def _read_xarray(self, start: int, stop: int) -> np.ndarray:
        subset = self.dataset.isel(time=slice(start, stop))
        output = np.empty((stop - start, *self.shape), dtype=np.float32)
        store = self.raw.store
        staging = store.staged(self._chunk_keys(start, stop)) if store is not None else contextlib.nullcontext()
        with staging:
            for v, name in enumerate(self.variables):
                values = np.asarray(subset[name].values, dtype=np.float32)
                output[:, v] = coarsen_values(values, self.factor)
        output[np.isinf(output)] = np.nan  # infinities count as missing, like NaN
        return output

    def _read_coarsened_chunks(self, start: int, stop: int) -> np.ndarray:
        n_lat, n_lon = self.dataset.sizes["lat"], self.dataset.sizes["lon"]
        values = np.empty((stop - start, len(self.variables), n_lat, n_lon), dtype=np.float32)
        # Infinities become NaN after coarsening, as on the xarray path, where the mean of a cell with one is inf.
        self.chunk_reader.read_into(values, start, stop, finish=lambda *piece: None)
        output = np.empty((stop - start, *self.shape), dtype=np.float32)
        for v in range(len(self.variables)):
            output[:, v] = coarsen_values(values[:, v], self.factor)
        output[np.isinf(output)] = np.nan
        return output

    def _chunk_keys(self, start: int, stop: int) -> list[str]:
        """Return the zarr chunk keys of every variable in time steps [start, stop), for `ReliableStore.staged`."""
        if self._arrays is None:
            time_dim = time_dimension(self.raw.dataset)
            self._arrays = {}
            for name in self.variables:
                array = zarr.open_array(self.raw.store, path=name, mode="r")
                self._arrays[name] = (array, self.raw.dataset[name].dims.index(time_dim))
        keys = []
        for array, time_axis in self._arrays.values():
            keys += time_chunk_keys(array, time_axis, start, stop)
        return keys

    def _raise_decode_error(self, start: int, stop: int, error: Exception) -> None:
        store = self.raw.store
        if store is not None:
            time_dim = time_dimension(self.raw.dataset)
            for name in self.variables:
                axis = self.raw.dataset[name].dims.index(time_dim)
                key = find_corrupt_chunk(store, name, axis, start, stop)
                if key is not None:
                    raise CorruptChunkError(
                        f"chunk {key!r} of {self.label} is corrupt: it does not decode ({type(error).__name__}: "
                        f"{error}); rewrite the store or restore the chunk",
                        key,
                    ) from error
        span = self.describe_span(start, stop)
        raise DataError(f"reading time steps {span} of {self.label} failed: {type(error).__name__}: {error}") from error

    def describe_span(self, start: int, stop: int) -> str:
        """Return time steps [start, stop) as 'first..last (date..date)' for messages."""
        last = min(stop, len(self.times)) - 1
        return f"{start}..{last} ({self.times[start]:%Y-%m-%d %H:%M}..{self.times[last]:%Y-%m-%d %H:%M})"


class Prefetcher:
    """Run `read` on `items` in daemon threads, at most `depth` items ahead of the consumer.

    Iterating yields (item, result) in the order of `items`, whatever order the
    threads finish in, so the output does not depend on thread timing. A read
    that raises re-raises in the consumer. A wait longer than `timeout_seconds`
    raises DataError. `close` stops the threads at their next item. A thread
    stuck in a read is a daemon and does not keep the process alive.
    """

    def __init__(
        self,
        read: Callable[[Any], Any],
        items: Sequence[Any],
        workers: int,
        depth: int,
        timeout_seconds: float,
        describe: Callable[[Any], str] = str,
    ):
        self._read = read
        self._items = list(items)
        self._timeout = timeout_seconds
        self._describe = describe
        self._results: dict[int, tuple[bool, Any]] = {}
        self._next = 0
        self._stopped = False
        self._condition = threading.Condition()
        self._slots = threading.Semaphore(max(1, depth))
        count = max(0, min(workers, len(self._items)))
        self._threads = [
            threading.Thread(target=self._work, name=f"wxscale-prefetch-{i}", daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            self._slots.acquire()
            with self._condition:
                if self._stopped or self._next >= len(self._items):
                    self._slots.release()
                    return
                position = self._next
                self._next += 1
            try:
                result: tuple[bool, Any] = (True, self._read(self._items[position]))
            except BaseException as error:  # handed to the consumer, which re-raises it
                result = (False, error)
            with self._condition:
                if self._stopped:
                    return  # closed while reading: the consumer has stopped, so the result is dropped
                self._results[position] = result
                self._condition.notify_all()

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for position, item in enumerate(self._items):
            deadline = clock.monotonic() + self._timeout
            with self._condition:
                while position not in self._results:
                    remaining = deadline - clock.monotonic()
                    if remaining <= 0:
                        raise DataError(
                            f"timed out after {self._timeout:g} s waiting for {self._describe(item)}; the storage "
                            "does not respond. Check it, or raise spec.data.loader.timeoutSeconds"
                        )
                    self._condition.wait(remaining)
                ok, value = self._results.pop(position)
            self._slots.release()
            if not ok:
                raise value
            yield item, value

    def close(self) -> None:
        """Stop the threads once their current read ends; results not yet consumed are dropped."""
        with self._condition:
            self._stopped = True
            self._results.clear()
        for _ in self._threads:
            self._slots.release()


def plan_block_steps(source: StreamSource, layout: WindowLayout, loader: LoaderSpec) -> tuple[int, int]:
    """Return (block_steps, chunk_steps): steps per block read and per stored time chunk.

    A block is about `loader.blockMB` of whole chunks, and at most the share of
    `loader.memoryMB` left for one of the prefetch + shuffleBlocks + workers + 1
    blocks in memory, the halo steps included.
    """
    chunk_steps = source.time_chunk_steps()
    step_bytes = source.step_bytes
    # Reads in flight hold their fetched chunk bytes and their decoded block at once. One more block's share
    # holds the halo steps that blocks keep for their neighbours (`plan_block_reads`).
    slots = loader.prefetch + loader.shuffle_blocks + loader.workers + 2
    halo_bytes = (layout.span_back + layout.lead_steps) * step_bytes
    max_bytes = max(step_bytes, loader.memory_mb * 1e6 / slots - halo_bytes)
    block_steps = block_steps_for(chunk_steps, step_bytes, loader.block_mb * 1e6, max_bytes)

    if chunk_steps * step_bytes > max_bytes:
        logger.warning(
            "%s: one time chunk (%d steps, %.1f MB as float32) is larger than the %.1f MB a block may use under "
            "spec.data.loader.memoryMB; blocks of %d steps are read instead, so each chunk is fetched several times. "
            "Rechunk the store with `wxscale data convert`",
            source.label,
            chunk_steps,
            chunk_steps * step_bytes / 1e6,
            max_bytes / 1e6,
            block_steps,
        )
    return block_steps, chunk_steps


@dataclass
class _BlockValues:
    """Normalised steps of a block read, missing cells set to 0; `valid` marks the others, None when all are valid."""

    values: np.ndarray  # (T, V, H, W) float32
    valid: np.ndarray | None


class StreamingWindows:
    """The windows of one split, read from storage block by block: sharded by rank, shuffled by seed and epoch.

    `len()` is the number of windows of all ranks together. `batches` yields one
    rank's batches of one epoch, and `loader` wraps it for a training loop.
    Indexing (`windows[i]`) reads that one window, for a shape probe, not for training.

    Sharding: rank r of R reads the blocks at positions r, r + R, ... of the
    epoch's permutation. When the split has fewer blocks than ranks, every rank
    reads every block and keeps every R-th window of it instead.
    """

    def __init__(
        self,
        source: StreamSource,
        windows: np.ndarray,
        layout: WindowLayout,
        mean: np.ndarray,
        std: np.ndarray,
        loader: LoaderSpec,
        block_steps: int,
        seed: int = 0,
        shuffle: bool = True,
        nan_policy: str = "mask",
        split: str = "train",
    ):
        self.source = source
        self.split = split
        self.last_indices = np.asarray(windows, dtype=np.int64)
        self.layout = layout
        self.loader_spec = loader
        self.seed = seed
        self.shuffle = shuffle
        self.nan_policy = nan_policy
        self.blocks = plan_blocks(self.last_indices, layout, block_steps)
        self.block_steps = block_steps
        # Halo steps kept for blocks read later in the epoch take at most one block's share of loader.memoryMB.
        self.halo_budget_bytes = block_steps * source.step_bytes
        self._input_offsets = layout.input_indices(np.zeros(1, dtype=np.int64))[0]
        self._mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        self._std = np.asarray(std, dtype=np.float32)[:, None, None]
        # Each block waits up to one request timeout per attempt, plus one for the backoff.
        policy = source.policy
        self.wait_timeout = policy.timeout_seconds * (policy.retries + 2)

    def __len__(self) -> int:
        return len(self.last_indices)

    @property
    def times(self) -> pd.DatetimeIndex:
        return self.source.times

    @property
    def init_times(self) -> pd.DatetimeIndex:
        """Time of the last input step of each window."""
        return self.source.times[self.last_indices]

    @property
    def valid_times(self) -> pd.DatetimeIndex:
        """Time of each window's target."""
        return self.source.times[self.layout.target_indices(self.last_indices)]

    # Plan -----------------------------------------------------------------------------

    def window_sharding(self, world_size: int) -> bool:
        """Return True when ranks split the windows of each block instead of the blocks (fewer blocks than ranks)."""
        return world_size > 1 and len(self.blocks) < world_size

    def rank_block_list(self, epoch: int, rank: int = 0, world_size: int = 1) -> list[Block]:
        """Return the blocks `rank` reads in `epoch`, in reading order.

        When ranks own whole blocks, windows on the boundary of two blocks of the
        rank go to the one read later (`hand_over_boundary_windows`). When ranks
        split the windows of every block, the blocks stay as planned, so that the
        split stays the same for every epoch.
        """
        order = epoch_order(len(self.blocks), self.seed, epoch, self.shuffle)
        if self.window_sharding(world_size):
            return [self.blocks[int(p)] for p in order]
        blocks = [self.blocks[int(p)] for p in rank_blocks(order, rank, world_size)]
        return hand_over_boundary_windows(blocks, self.layout)

    def rank_windows(self, block: Block, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Return the windows of `block` that `rank` trains on."""
        if self.window_sharding(world_size):
            return block.windows[rank::world_size]
        return block.windows

    def windows_in_epoch(self, epoch: int, rank: int = 0, world_size: int = 1) -> int:
        """Return the number of windows `rank` reads in `epoch`."""
        blocks = self.rank_block_list(epoch, rank, world_size)
        return sum(len(self.rank_windows(block, rank, world_size)) for block in blocks)

    def batches_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Return the full batches that every rank has in every epoch: the same count for all ranks and epochs.

        A rank's share changes with the epoch's permutation, so the count comes
        from the smallest possible share: the len(blocks) // world_size blocks
        with the fewest windows, or every block's window count // world_size when
        the ranks split windows. Windows beyond it in an epoch are left out of that
        epoch only.
        """
        counts = sorted(len(block.windows) for block in self.blocks)
        if self.window_sharding(world_size):
            smallest_share = sum(count // world_size for count in counts)
        else:
            smallest_share = sum(counts[: len(counts) // world_size])
        return smallest_share // batch_size

    def _groups(self, epoch: int, rank: int, world_size: int) -> list[tuple[list[Block], list[tuple[int, int]]]]:
        """Return the epoch's shuffle groups: their blocks and their (slot, window) entries in training order."""
        blocks = self.rank_block_list(epoch, rank, world_size)
        size = self.loader_spec.shuffle_blocks
        groups = []
        for group_index, first in enumerate(range(0, len(blocks), size)):
            members = blocks[first : first + size]
            entries = [
                (slot, int(w)) for slot, block in enumerate(members) for w in self.rank_windows(block, rank, world_size)
            ]
            if self.shuffle:
                entries = shuffle_group(entries, self.seed, epoch, rank, group_index)
            groups.append((members, entries))
        return groups

    # Reading --------------------------------------------------------------------------

    def _describe(self, plan: BlockRead) -> str:
        block = plan.block
        span = self.source.describe_span(block.read_start, block.read_stop)
        return f"block {block.index} (time steps {span}) of {self.source.label}"

    def _read_normalised(self, start: int, stop: int, out: np.ndarray) -> np.ndarray | None:
        """Read steps [start, stop) into `out`, normalised, with missing cells set to 0.

        Returns the mask of valid cells, or None when all are valid. Missing cells
        are NaN or infinite before normalising. The arithmetic is the float32
        arithmetic of `WindowDataset`, done once per time step instead of once
        per window that uses the step, and in the decoding threads when the
        source has a chunk reader.
        """
        missing: list[tuple[int, int, int, np.ndarray]] = []
        lock = threading.Lock()

        def normalise(v: int, first: int, last: int, piece: np.ndarray) -> None:
            valid = np.isfinite(piece)
            piece -= self._mean[v]
            piece /= self._std[v]
            if not valid.all():
                piece[~valid] = 0.0
                with lock:
                    missing.append((v, first, last, valid))

        self.source.read(start, stop, out=out, finish=normalise)
        if not missing:
            return None
        valid = np.ones(out.shape, dtype=bool)
        for v, first, last, piece in missing:
            valid[first:last, v] = piece
        return valid

    def _read_block(self, plan: BlockRead) -> _BlockValues:
        """Read and normalise the steps of `plan.read`; the shared halo steps stay unset until `_receive`."""
        block = plan.block
        values = np.empty((block.read_steps, *self.source.shape), dtype=np.float32)
        low, high = plan.read[0] - block.read_start, plan.read[1] - block.read_start
        part_valid = self._read_normalised(plan.read[0], plan.read[1], values[low:high])
        valid = None
        if part_valid is not None:
            valid = np.ones(values.shape, dtype=bool)
            valid[low:high] = part_valid
        return _BlockValues(values, valid)

    def _receive(self, plan: BlockRead, read: _BlockValues, halo_copies: dict[tuple[int, int], _BlockValues]) -> None:
        """Complete a block read with the halos kept by earlier blocks, keep its own for later ones, check NaN."""
        block = plan.block
        for start, stop in plan.shared:
            piece = halo_copies.pop((start, stop))
            rows = slice(start - block.read_start, stop - block.read_start)
            read.values[rows] = piece.values
            if piece.valid is not None:
                if read.valid is None:
                    read.valid = np.ones(read.values.shape, dtype=bool)
                read.valid[rows] = piece.valid
            elif read.valid is not None:
                read.valid[rows] = True
        for start, stop in plan.keep:
            rows = slice(start - block.read_start, stop - block.read_start)
            valid = None if read.valid is None else read.valid[rows].copy()
            halo_copies[(start, stop)] = _BlockValues(read.values[rows].copy(), valid)

        if self.nan_policy == "error" and read.valid is not None:
            touched = self.layout.touched_indices(block.windows) - block.read_start
            for v, name in enumerate(self.source.variables):
                missing = int((~read.valid[touched, v]).sum())
                if missing:
                    raise DataError(
                        f"variable {name!r} has {missing} NaN cells in time steps "
                        f"{self.source.describe_span(block.read_start, block.read_stop)} that the samples use, and "
                        "spec.data.nanPolicy is 'error'; set nanPolicy: mask to leave them out of the loss and the "
                        "metrics, or fill them in the data"
                    )

    def _empty_batch(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n_vars, height, width = self.source.shape
        x = np.empty((size, self.layout.history, n_vars, height, width), dtype=np.float32)
        y = np.empty((size, n_vars, height, width), dtype=np.float32)
        mask = np.empty((size, n_vars, height, width), dtype=np.float32)
        return x, y, mask

    def _fill_row(self, batch: tuple[np.ndarray, ...], row: int, read: _BlockValues, local: int) -> None:
        """Copy the window whose last input is at `local` in a normalised block into row `row` of `batch`."""
        x, y, mask = batch
        for h, offset in enumerate(self._input_offsets):
            x[row, h] = read.values[local + offset]
        target = local + self.layout.lead_steps
        y[row] = read.values[target]
        if read.valid is None:
            mask[row] = 1.0
        else:
            mask[row] = read.valid[target]

    def _assemble(self, rows: list[tuple[_BlockValues, int]], size: int) -> Batch:
        """Return a batch of `size` rows holding the windows `rows`, (block values, last-input position) pairs."""
        batch = self._empty_batch(size)
        for row, (read, local) in enumerate(rows):
            self._fill_row(batch, row, read, local)
        return self._finish_batch(batch, len(rows))

    def _finish_batch(self, batch: tuple[np.ndarray, ...], size: int) -> Batch:
        x, y, mask = (array[:size] for array in batch)
        n_vars, height, width = self.source.shape
        return _to_tensors((x.reshape(size, self.layout.history * n_vars, height, width), y, mask))

    def __getitem__(self, index: int) -> Batch:
        last = int(self.last_indices[index])
        start, stop = last - self.layout.span_back, last + self.layout.lead_steps + 1
        values = np.empty((stop - start, *self.source.shape), dtype=np.float32)
        read = _BlockValues(values, self._read_normalised(start, stop, values))
        x, y, mask = self._assemble([(read, last - start)], 1)
        return x[0], y[0], mask[0]

    def batches(
        self,
        batch_size: int,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        skip_samples: int = 0,
        max_batches: int | None = None,
        drop_last: bool = True,
    ) -> Iterator[Batch]:
        """Yield the batches of `rank` in `epoch` as (x, y, mask) tensors.

        The first `skip_samples` samples of the epoch are left out, and blocks that
        hold only skipped samples are not read, so a resumed trial continues where
        it stopped. At most `max_batches` batches are yielded, counting the skipped
        ones. A batch can hold windows of two shuffle groups. With `drop_last` the
        final incomplete batch is dropped. Raises DataError when the epoch contains no
        complete batch, so that a training loop cannot wait forever.
        """
        groups = self._groups(epoch, rank, world_size)
        produced = skip_samples // batch_size
        limit = max_batches if max_batches is not None else None

        # Skip whole groups without reading them, then the first entries of the next group.
        skip = skip_samples
        while groups and skip >= len(groups[0][1]):
            skip -= len(groups[0][1])
            groups.pop(0)
        if groups and skip:
            groups[0] = (groups[0][0], groups[0][1][skip:])

        spec = self.loader_spec
        blocks = [block for members, _ in groups for block in members]
        plans = plan_block_reads(blocks, self.source.step_bytes, self.halo_budget_bytes)
        prefetcher = Prefetcher(
            self._read_block, plans, spec.workers, spec.prefetch, self.wait_timeout, self._describe
        )
        halo_copies: dict[tuple[int, int], _BlockValues] = {}
        rows: list[tuple[_BlockValues, int]] = []
        try:
            stream = iter(prefetcher)
            for members, entries in groups:
                if limit is not None and produced >= limit:
                    break
                group = []
                for plan, read in itertools.islice(stream, len(members)):
                    self._receive(plan, read, halo_copies)
                    group.append((plan.block, read))

                for slot, last in entries:
                    block, read = group[slot]
                    rows.append((read, last - block.read_start))
                    if len(rows) == batch_size:
                        yield self._assemble(rows, batch_size)
                        produced += 1
                        rows = []
                        if limit is not None and produced >= limit:
                            break
                del group
            if rows and not drop_last and (limit is None or produced < limit):
                yield self._assemble(rows, len(rows))
                produced += 1
        finally:
            prefetcher.close()

        if produced == 0:
            raise DataError(
                f"rank {rank} of {world_size} got {self.windows_in_epoch(epoch, rank, world_size)} {self.split} "
                f"samples in epoch {epoch}, fewer than one batch of {batch_size}; lower spec.training.batchSize or "
                "use fewer processes"
            )

    def loader(self, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = True) -> StreamLoader:
        """Return an iterable of `rank`'s batches, one epoch per iteration, with a sampler's `set_epoch`."""
        if self.window_sharding(world_size):
            logger.warning(
                "%s split: %d block(s) for %d ranks; every rank reads every block and keeps every %d-th window, "
                "so ranks read the same chunks. Use smaller time chunks or a smaller spec.data.loader.blockMB",
                self.split,
                len(self.blocks),
                world_size,
                world_size,
            )
        return StreamLoader(self, batch_size, rank, world_size, drop_last)


def _to_tensors(arrays: tuple[np.ndarray, ...]) -> Batch:
    x, y, mask = arrays
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)


class StreamLoader:
    """One rank's batches of a StreamingWindows split; each iteration is the epoch last given to `set_epoch`.

    With `drop_last` every epoch has `len(loader)` batches on every rank, so
    data-parallel ranks step together. `set_epoch` and `skip_next` have the
    meaning they have on the trainer's resumable sampler.
    """

    def __init__(self, windows: StreamingWindows, batch_size: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        self.windows = windows
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, samples: int) -> None:
        """Leave out the first `samples` samples of the next iteration only."""
        self._skip = samples

    def __iter__(self) -> Iterator[Batch]:
        skip, self._skip = self._skip, 0
        limit = len(self) if self.drop_last else None
        return self.windows.batches(self.batch_size, self.epoch, self.rank, self.world_size, skip_samples=skip,
                                    max_batches=limit, drop_last=self.drop_last)

    def __len__(self) -> int:
        if self.drop_last:
            return self.windows.batches_per_epoch(self.batch_size, self.world_size)
        count = self.windows.windows_in_epoch(self.epoch, self.rank, self.world_size)
        return math.ceil(count / self.batch_size)


# Statistics -----------------------------------------------------------------------------


# Minimum number of pieces of the training period that an estimated statistics sample should come from.
_MIN_STATISTICS_PIECES = 4


@dataclass
class TrainingStatistics:
    """Normalisation statistics and climatology of the training period, and how many steps they come from."""

    stats: NormalisationStats
    climatology: Climatology
    steps_read: int
    steps_total: int
    nan_cells: dict[str, int]
    ranges: list[tuple[int, int]]  # the time-step ranges [start, stop) read, in time order

    @property
    def exact(self) -> bool:
        return self.steps_read >= self.steps_total


def statistics_ranges(touched: np.ndarray, period: np.ndarray, piece_steps: int, n_times: int,
                      max_steps: int) -> list[tuple[int, int]]:
    """Return the aligned ranges [start, stop) of `piece_steps` steps that the statistics read, in time order.

    The candidates are the ranges that hold a touched or a period step. When
    they hold more than `max_steps` steps, about max_steps / piece_steps of them
    are taken, spread evenly, so the sample covers the seasonal cycle.
    """
    steps = np.union1d(touched, period)
    keys = np.unique(steps // piece_steps)
    ranges = [(int(k) * piece_steps, min(int(k + 1) * piece_steps, n_times)) for k in keys]
    total = sum(stop - start for start, stop in ranges)
    if total <= max_steps:
        return ranges
    count = max(1, math.ceil(max_steps / piece_steps))
    positions = np.unique(np.round(np.linspace(0, len(ranges) - 1, count)).astype(int))
    return [ranges[int(p)] for p in positions]


def estimate_training_statistics(
    source: StreamSource,
    touched: np.ndarray,
    period: np.ndarray,
    piece_steps: int,
    loader: LoaderSpec,
    by_hour: bool,
) -> TrainingStatistics:
    """Estimate mean, std and climatology from aligned pieces of the training period.

    `touched` are the time steps the training windows read (the statistics use
    them) and `period` every step of the training period (the climatology uses
    them), both as sorted indices. Pieces are one time chunk (or one block, when
    a chunk is larger than a block) and do not overlap, so a step counts at most
    once, and reading every piece gives the exact statistics.
    """
    ranges = statistics_ranges(touched, period, piece_steps, len(source.times), loader.stats_steps)
    moments = RunningMoments(len(source.variables))
    climatology = Climatology.empty(source.shape, by_hour=by_hour)
    nan_cells = dict.fromkeys(source.variables, 0)

    prefetcher = Prefetcher(
        lambda span: source.read(*span),
        ranges,
        loader.workers,
        loader.prefetch,
        source.policy.timeout_seconds * (source.policy.retries + 2),
        lambda span: f"time steps {source.describe_span(*span)} of {source.label}",
    )
    try:
        for (start, stop), values in prefetcher:
            steps = np.arange(start, stop)

            used = steps[np.isin(steps, touched)]
            moments.update(values[used - start])
            for v, name in enumerate(source.variables):
                nan_cells[name] += int(np.isnan(values[used - start, v]).sum())

            in_period = steps[np.isin(steps, period)]
            climatology.add(values[in_period - start], source.times[in_period])
    finally:
        prefetcher.close()

    return TrainingStatistics(
        stats=moments.result(source.variables),
        climatology=climatology,
        steps_read=moments.steps,
        steps_total=len(touched),
        nan_cells=nan_cells,
        ranges=ranges,
    )


# Bundle -------------------------------------------------------------------------------------


@dataclass
class StreamingBundle(BundleMethods):
    """The data of one trial whose training split streams from storage; validation and test are in memory.

    Same fields and methods as `DataBundle` except `values` and `times`, which
    only the in-memory splits have (`validation.values`, `test.values`).
    """

    train: StreamingWindows
    validation: WindowDataset
    test: WindowDataset
    variables: list[str]
    units: dict[str, str]
    latitudes: np.ndarray
    longitudes: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    step_hours: float
    lead_steps: int
    lead_time_hours: float
    history: int
    history_interval: int
    source_description: str
    climatology: Climatology
    statistics_steps: int  # training steps the statistics come from
    nan_cells: dict[str, int] = field(default_factory=dict)
    source: StreamSource | None = field(default=None, repr=False)

    streaming = True

    @property
    def loaded_bytes(self) -> int:
        """float32 bytes read so far: validation and test arrays, the statistics sample and training blocks."""
        return int(self.source.decoded_bytes) if self.source is not None else 0


def _load_split(source: StreamSource, name: str, windows: np.ndarray, layout: WindowLayout,
                stats: NormalisationStats, data: DataSpec) -> tuple[WindowDataset, dict[str, int]]:
    """Load the steps a validation or test split reads into memory; return its dataset and NaN counts."""
    touched = layout.touched_indices(windows)
    first, last = int(touched[0]), int(touched[-1])
    values = source.read(first, last + 1)
    nan_cells = _apply_nan_policy(values, touched - first, source.variables, data)
    times = source.times[first : last + 1]
    dataset = WindowDataset(name, values, times, windows - first, layout, stats.mean, stats.std)
    return dataset, nan_cells


def build_streaming(data: DataSpec, seed: int, opened: tuple[xr.Dataset, RawSource] | None = None) -> StreamingBundle:
    """Build the data of one trial with the training split streamed from `data.source`.

    `seed` selects the datasetFraction subset and seeds the shuffle. Each rank
    takes its share with `bundle.train.loader(batch_size, rank, world_size)`.
    `opened` is an `open_source_and_raw(data)` result to reuse. Raises DataError
    like `build_datasets`.
    """
    began = clock.perf_counter()
    source = StreamSource.from_spec(data, opened)
    splits = build_splits(data, source.times, seed, source.label)
    layout = splits.layout

    block_steps, chunk_steps = plan_block_steps(source, layout, data.loader)
    train_blocks = plan_blocks(splits.train, layout, block_steps)
    logger.info(
        "streaming %s: time chunks of %d steps, blocks of %d steps (%.1f MB float32), %d training blocks, "
        "at most %.2fx the owned chunks read with the halo",
        source.label,
        chunk_steps,
        block_steps,
        block_steps * source.step_bytes / 1e6,
        len(train_blocks),
        halo_overhead(block_steps, chunk_steps, layout),
    )

    # Statistics and climatology from the training period only.
    train_start = to_timestamp(data.train.start)
    period = np.flatnonzero((source.times >= train_start) & (source.times <= splits.train_end))
    touched = layout.touched_indices(splits.train)
    statistics = estimate_training_statistics(
        source, touched, period, min(chunk_steps, block_steps), data.loader, by_hour=splits.step.hours < 24.0
    )
    if statistics.exact:
        logger.info("normalisation statistics from all %d training steps", statistics.steps_read)
    else:
        first, last = statistics.ranges[0][0], statistics.ranges[-1][1] - 1
        logger.info(
            "normalisation statistics and climatology estimated from %d of %d training steps "
            "(spec.data.loader.statsSteps %d), in %d piece(s) between %s and %s",
            statistics.steps_read,
            statistics.steps_total,
            data.loader.stats_steps,
            len(statistics.ranges),
            f"{source.times[first]:%Y-%m-%d %H:%M}",
            f"{source.times[last]:%Y-%m-%d %H:%M}",
        )
        if len(statistics.ranges) < _MIN_STATISTICS_PIECES:
            logger.warning(
                "the statistics sample is %d piece(s) of %d steps, too few to spread over the training period "
                "and its seasons; rechunk the store with shorter time chunks (wxscale data convert --time-chunk) "
                "or raise spec.data.loader.statsSteps",
                len(statistics.ranges),
                min(chunk_steps, block_steps),
            )
    if data.nan_policy == "error" and any(statistics.nan_cells.values()):
        name = next(name for name, count in statistics.nan_cells.items() if count)
        raise DataError(
            f"variable {name!r} has {statistics.nan_cells[name]} NaN cells in the training steps read for the "
            "statistics, and spec.data.nanPolicy is 'error'; set nanPolicy: mask to leave them out of the loss and "
            "the metrics, or fill them in the data"
        )

    evaluation = {}
    nan_cells = dict(statistics.nan_cells)
    for name in ("validation", "test"):
        evaluation[name], counts = _load_split(source, name, splits[name], layout, statistics.stats, data)
        for variable, count in counts.items():
            nan_cells[variable] += count

    train = StreamingWindows(
        source,
        splits.train,
        layout,
        statistics.stats.mean,
        statistics.stats.std,
        data.loader,
        block_steps,
        seed=seed,
        nan_policy=data.nan_policy,
    )
    bundle = StreamingBundle(
        train=train,
        validation=evaluation["validation"],
        test=evaluation["test"],
        variables=source.variables,
        units=source.units,
        latitudes=source.latitudes,
        longitudes=source.longitudes,
        mean=statistics.stats.mean,
        std=statistics.stats.std,
        step_hours=splits.step.hours,
        lead_steps=layout.lead_steps,
        lead_time_hours=layout.lead_steps * splits.step.hours,
        history=layout.history,
        history_interval=layout.history_interval,
        source_description=_describe(data, source.variables, (len(source.latitudes), len(source.longitudes))),
        climatology=statistics.climatology,
        statistics_steps=statistics.steps_read,
        nan_cells=nan_cells,
        source=source,
    )
    logger.info(
        "data ready in %.2f s: train %d samples streamed, validation %d, test %d in memory; %s",
        clock.perf_counter() - began,
        len(bundle.train),
        len(bundle.validation),
        len(bundle.test),
        bundle.source_description,
    )
    return bundle


def training_period_bytes(dataset: xr.Dataset, data: DataSpec) -> int:
    """Return the float32 size of the training period of a standardised, cropped dataset."""
    times = pd.DatetimeIndex(dataset["time"].values)
    inside = (times >= to_timestamp(data.train.start)) & (times <= to_timestamp(data.train.end))
    step_bytes = len(dataset.data_vars) * dataset.sizes["lat"] * dataset.sizes["lon"] * 4
    return int(inside.sum()) * step_bytes


def load_trial_data(data: DataSpec, seed: int):
    """Return the data of one trial: a `DataBundle` in memory or a `StreamingBundle`, as `data.loader.mode` selects.

    'auto' streams when the training period is larger than `loader.streamAboveMB`
    as float32. The synthetic source is generated in memory in every mode.
    """
    loader = data.loader
    if data.is_synthetic:
        if loader.mode == "stream":
            logger.warning("spec.data.loader.mode is 'stream', but the synthetic source is generated in memory")
        return build_datasets(data, seed)
    if loader.mode == "memory":
        return build_datasets(data, seed)

    opened = open_source_and_raw(data)
    if loader.mode == "auto":
        size = training_period_bytes(crop_region(opened[0], data.region), data)
        if size <= loader.stream_above_mb * 1e6:
            logger.info("training period is %.1f MB as float32; loading it into memory", size / 1e6)
            return build_datasets(data, seed)
        logger.info(
            "training period is %.1f MB as float32, above spec.data.loader.streamAboveMB (%g); streaming it",
            size / 1e6,
            loader.stream_above_mb,
        )
    return build_streaming(data, seed, opened)


__all__ = [
    "Prefetcher",
    "StreamLoader",
    "StreamSource",
    "StreamingBundle",
    "StreamingWindows",
    "build_streaming",
    "load_trial_data",
]
