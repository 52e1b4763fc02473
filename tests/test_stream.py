"""Tests of the streaming data path: blocks, shards, shuffling, prefetching, faults, cache, memory, convert, inspect."""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from conftest import REPO
from wxscale.cli import main as wxscale_main
from wxscale.data import DataBundle, StreamingBundle, build_datasets, build_streaming, load_trial_data
from wxscale.data.blocks import epoch_order, hand_over_boundary_windows, plan_block_reads, plan_blocks, rank_blocks
from wxscale.data.cache import ChunkCache
from wxscale.data.convert import ConvertOptions, convert
from wxscale.data.inspect import inspect_source
from wxscale.data.store import ChunkReadError, CorruptChunkError, MissingChunkError
from wxscale.data.stream import Prefetcher, StreamSource
from wxscale.data.windows import WindowLayout
from wxscale.errors import DataError
from wxscale.spec import DataSpec, StorageSpec

NCEP_PERIODS = {
    "train": {"start": "2013-01-01", "end": "2013-12-31T18:00"},
    "validation": {"start": "2014-01-01", "end": "2014-06-30T18:00"},
    "test": {"start": "2014-07-01", "end": "2014-12-31T18:00"},
}
# Small blocks, so that the NCEP year splits into many blocks: 1 MB of float32 is 188 steps of 25 x 53.
SMALL_BLOCKS = {"mode": "stream", "blockMB": 0.3, "memoryMB": 8, "prefetch": 3, "shuffleBlocks": 2}


def ncep_spec(source: str | Path, loader: dict | None = None, **fields) -> DataSpec:
    return DataSpec(source=str(source), **NCEP_PERIODS, history=2, loader={**SMALL_BLOCKS, **(loader or {})}, **fields)


@pytest.fixture(scope="module")
def ncep_zarr(tmp_path_factory, ncep_air: Path) -> Path:
    """The NCEP file as a zarr v3 store with chunks of 40 time steps (10 days)."""
    path = tmp_path_factory.mktemp("stores") / "ncep.zarr"
    convert(str(ncep_air), str(path), ConvertOptions(time_chunk=40))
    return path


def epoch_samples(bundle: StreamingBundle, epoch: int = 0, rank: int = 0, world_size: int = 1,
                  batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(bundle.train.batches(batch_size, epoch, rank, world_size, drop_last=False))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


# Blocks, shards and order ---------------------------------------------------------------


def test_blocks_aligned_and_cover_windows():
    layout = WindowLayout(history=3, history_interval=2, lead_steps=2)
    windows = np.arange(10, 400, 3)

    blocks = plan_blocks(windows, layout, block_steps=48)

    assert np.array_equal(np.concatenate([b.windows for b in blocks]), windows)
    for block in blocks:
        assert block.start % 48 == 0
        assert block.stop == block.start + 48
        assert block.windows.min() >= block.start
        assert block.windows.max() < block.stop
        assert block.read_start == block.windows.min() - layout.span_back
        assert block.read_stop == block.windows.max() + layout.lead_steps + 1


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_shards_disjoint_and_complete(world_size: int):
    for epoch in (0, 1):
        order = epoch_order(17, seed=5, epoch=epoch)
        shares = [set(rank_blocks(order, rank, world_size).tolist()) for rank in range(world_size)]
        assert set().union(*shares) == set(range(17))
        assert sum(len(share) for share in shares) == 17
        assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1


def test_epoch_order_seeded():
    assert np.array_equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))
    assert not np.array_equal(epoch_order(50, 3, 1), epoch_order(50, 3, 2))
    assert not np.array_equal(epoch_order(50, 3, 1), epoch_order(50, 4, 1))
    assert np.array_equal(epoch_order(50, 3, 1, shuffle=False), np.arange(50))


def test_ranks_train_on_disjoint_windows(ncep_zarr: Path):
    bundle = build_streaming(ncep_spec(ncep_zarr), seed=0)
    train = bundle.train
    assert len(train.blocks) >= 8

    for epoch in (0, 1):
        owned = [set() for _ in range(3)]
        windows = [set() for _ in range(3)]
        for rank in range(3):
            for block in train.rank_block_list(epoch, rank, 3):
                owned[rank].update(range(block.start, block.stop))
                windows[rank].update(train.rank_windows(block, rank, 3).tolist())
        assert not owned[0] & owned[1]
        assert not owned[0] & owned[2]
        assert not owned[1] & owned[2]
        assert set().union(*windows) == set(train.last_indices.tolist())
        assert sum(len(w) for w in windows) == len(train)


def test_loader_equal_batches_per_rank(ncep_zarr: Path):
    bundle = build_streaming(ncep_spec(ncep_zarr), seed=0)
    loaders = [bundle.train.loader(32, rank, 2) for rank in range(2)]
    expected = len(loaders[0])

    counts = []
    for loader in loaders:
        loader.set_epoch(1)
        counts.append(sum(1 for _ in loader))

    assert expected > 0
    assert counts == [expected, expected]


def test_window_sharding_when_few_blocks(ncep_zarr: Path):
    bundle = build_streaming(ncep_spec(ncep_zarr, loader={"blockMB": 64, "memoryMB": 1024}), seed=0)
    train = bundle.train
    assert len(train.blocks) < 4

    shares = [set() for _ in range(4)]
    for rank in range(4):
        for block in train.rank_block_list(0, rank, 4):
            shares[rank].update(train.rank_windows(block, rank, 4).tolist())

    assert set().union(*shares) == set(train.last_indices.tolist())
    assert sum(len(share) for share in shares) == len(train)


def test_shuffle_deterministic_by_seed_and_epoch(ncep_zarr: Path):
    bundle = build_streaming(ncep_spec(ncep_zarr), seed=7)
    first, _ = epoch_samples(bundle, epoch=0)
    again, _ = epoch_samples(bundle, epoch=0)
    other, _ = epoch_samples(bundle, epoch=1)

    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # The same windows in another order: compare the sorted per-sample sums.
    assert torch.allclose(first.sum(dim=(1, 2, 3)).sort().values, other.sum(dim=(1, 2, 3)).sort().values)


def test_skip_resumes_mid_epoch(ncep_zarr: Path):
    bundle = build_streaming(ncep_spec(ncep_zarr), seed=1)
    full = list(bundle.train.batches(16, epoch=2))
    resumed = list(bundle.train.batches(16, epoch=2, skip_samples=16 * 30))

    assert len(resumed) == len(full) - 30
    for expected, got in zip(full[30:], resumed):
        assert torch.equal(expected[0], got[0])


def test_hand_over_keeps_windows_per_rank():
    layout = WindowLayout(history=3, history_interval=2, lead_steps=2)
    blocks = plan_blocks(np.arange(10, 400, 3), layout, block_steps=48)
    order = [blocks[int(i)] for i in epoch_order(len(blocks), seed=2, epoch=0)]

    moved = hand_over_boundary_windows(order, layout)

    assert [b.index for b in moved] == [b.index for b in order]
    assert np.array_equal(np.sort(np.concatenate([b.windows for b in moved])), np.arange(10, 400, 3))
    position = {block.index: i for i, block in enumerate(moved)}
    for block in moved:
        assert len(block.windows) > 0
        assert block.read_start == block.windows.min() - layout.span_back
        assert block.read_stop == block.windows.max() + layout.lead_steps + 1
        # Only the block read later of two neighbours reads across their boundary.
        for neighbour in moved:
            if neighbour.stop == block.start and block.read_start < block.start:
                assert position[neighbour.index] < position[block.index]
            if neighbour.start == block.stop and block.read_stop > block.stop:
                assert position[neighbour.index] < position[block.index]


def test_block_reads_share_halos_within_budget():
    layout = WindowLayout(history=2, history_interval=1, lead_steps=1)
    blocks = plan_blocks(np.arange(1, 479), layout, block_steps=48)
    order = hand_over_boundary_windows([blocks[int(i)] for i in epoch_order(len(blocks), 0, 0)], layout)

    shared = plan_block_reads(order, step_bytes=100, budget_bytes=1e9)
    fetched = [step for plan in shared for step in range(*plan.read)]
    assert sorted(fetched) == list(range(0, 480))  # every step once
    kept = [halo for plan in shared for halo in plan.keep]
    assert sorted(kept) == sorted(halo for plan in shared for halo in plan.shared)

    alone = plan_block_reads(order, step_bytes=100, budget_bytes=0)
    assert all(plan.shared == () and plan.keep == () for plan in alone)
    assert [plan.read for plan in alone] == [(b.read_start, b.read_stop) for b in order]


# Same samples as the in-memory path ---------------------------------------------------------


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_stream_matches_memory_with_exact_stats(tmp_path: Path, ncep_air: Path, zarr_format: int):
    store = tmp_path / "ncep.zarr"
    convert(str(ncep_air), str(store), ConvertOptions(time_chunk=48, zarr_format=zarr_format))
    spec = ncep_spec(store, loader={"statsSteps": 100_000})

    memory = build_datasets(spec, seed=0)
    streamed = build_streaming(spec, seed=0)
    streamed.train.shuffle = False
    x, y = epoch_samples(streamed)

    np.testing.assert_allclose(streamed.mean, memory.mean, rtol=1e-7)
    np.testing.assert_allclose(streamed.std, memory.std, rtol=1e-7)
    assert len(x) == len(memory.train)
    for index in (0, 1, 500, len(memory.train) - 1):
        expected_x, expected_y, _ = memory.train[index]
        torch.testing.assert_close(x[index], expected_x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[index], expected_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(streamed.test_arrays().climatology, memory.test_arrays().climatology, rtol=1e-5)
    np.testing.assert_array_equal(streamed.test_arrays().targets, memory.test_arrays().targets)


# Direct chunk reads, without xarray -----------------------------------------------------------------


def xarray_read(source: StreamSource, start: int, stop: int) -> np.ndarray:
    """Read [start, stop) of `source` through xarray instead of its chunk reader."""
    reader, source.chunk_reader = source.chunk_reader, None
    try:
        return source.read(start, stop)
    finally:
        source.chunk_reader = reader


@pytest.mark.parametrize("zarr_format,compression", [(2, "zstd"), (3, "zstd"), (2, "none"), (3, "none")])
def test_chunk_reader_matches_xarray(tmp_path: Path, ncep_air: Path, zarr_format: int, compression: str):
    store = tmp_path / "ncep.zarr"
    convert(str(ncep_air), str(store), ConvertOptions(time_chunk=48, zarr_format=zarr_format, compression=compression))
    source = StreamSource.from_spec(ncep_spec(store))

    assert source.chunk_reader is not None
    for start, stop in [(0, 48), (47, 49), (100, 300), (2900, 2920)]:
        direct = source.read(start, stop)
        assert direct.dtype == np.float32
        np.testing.assert_array_equal(direct, xarray_read(source, start, stop))


def test_uncompressed_partial_chunk_read_by_range(tmp_path: Path, ncep_air: Path):
    store = tmp_path / "ncep.zarr"
    convert(str(ncep_air), str(store), ConvertOptions(time_chunk=48, compression="none"))
    source = StreamSource.from_spec(ncep_spec(store))
    counters = source.raw.store.counters

    before = counters.bytes_read
    values = source.read(47, 50)  # the last step of chunk 0 and two of chunk 1

    assert counters.bytes_read - before == 3 * 25 * 53 * 4
    np.testing.assert_array_equal(values, xarray_read(source, 47, 50))


def test_chunk_reader_standardises_like_xarray(tmp_path: Path):
    # Ascending latitudes, longitudes from -180 (rolled to 0..360), float64 with a -9999 fill value,
    # a variable stored as (lat, lon, time), an infinity, and a regional crop.
    times = pd.date_range("2000-01-01", periods=40, freq="6h")
    lat, lon = np.linspace(-80.0, 80.0, 9), np.arange(-180.0, 180.0, 20.0)
    rng = np.random.default_rng(1)
    t = rng.standard_normal((40, 9, 18)) + 280.0
    t[3, 4, 12], t[7, 6, 13], t[9, 5, 11] = -9999.0, np.inf, np.nan  # all three inside the crop
    u = rng.standard_normal((9, 18, 40))
    dataset = xr.Dataset({"t": (("time", "lat", "lon"), t), "u": (("lat", "lon", "time"), u)},
                         coords={"time": times, "lat": lat, "lon": lon})
    store = tmp_path / "odd.zarr"
    dataset.to_zarr(store, zarr_format=2, consolidated=True, encoding={
        "t": {"chunks": (8, 9, 18), "_FillValue": -9999.0},
        "u": {"chunks": (9, 18, 16)},
    })
    spec = DataSpec(source=str(store), history=2, region={"latMin": -40, "latMax": 60, "lonMin": 20, "lonMax": 200},
                    train={"start": "2000-01-01", "end": "2000-01-06T18:00"},
                    validation={"start": "2000-01-07", "end": "2000-01-08T18:00"},
                    test={"start": "2000-01-09", "end": "2000-01-10T18:00"})
    source = StreamSource.from_spec(spec)

    assert source.chunk_reader is not None
    assert source.chunk_reader.layouts[1].to_standard == (2, 0, 1)
    for start, stop in [(0, 40), (5, 11), (15, 17), (39, 40)]:
        np.testing.assert_array_equal(source.read(start, stop), xarray_read(source, start, stop))
    values = source.read(0, 40)
    assert [int(np.isnan(values[step, 0]).sum()) for step in (3, 7, 9)] == [1, 1, 1]
    assert not (values == -9999.0).any()
    assert not np.isinf(values).any()


def test_epoch_identical_with_and_without_chunk_reader(ncep_zarr: Path):
    bundle = build_streaming(ncep_spec(ncep_zarr), seed=3)
    assert bundle.source.chunk_reader is not None
    direct = list(bundle.train.batches(16, epoch=1, drop_last=False))
    bundle.source.chunk_reader = None
    through_xarray = list(bundle.train.batches(16, epoch=1, drop_last=False))

    assert len(direct) == len(through_xarray)
    for got, expected in zip(direct, through_xarray):
        for got_tensor, expected_tensor in zip(got, expected):
            assert torch.equal(got_tensor, expected_tensor)


def test_epoch_windows_normalised_exactly(ncep_zarr: Path):
    bundle = build_streaming(ncep_spec(ncep_zarr), seed=0)
    train = bundle.train
    train.shuffle = False
    x, y = epoch_samples(bundle)
    layout = train.layout
    mean = bundle.mean.astype(np.float32)[:, None, None]
    std = bundle.std.astype(np.float32)[:, None, None]

    # Unshuffled, the samples follow the windows in time order.
    for index in (0, 39, 40, 41, 200, len(x) - 1):
        last = int(train.last_indices[index])
        raw = bundle.source.read(last - layout.span_back, last + layout.lead_steps + 1)
        inputs = (raw[layout.input_indices(np.array([layout.span_back]))[0]] - mean) / std
        target = (raw[-1] - mean) / std
        assert torch.equal(x[index], torch.from_numpy(np.nan_to_num(inputs, nan=0.0).reshape(x.shape[1:])))
        assert torch.equal(y[index], torch.from_numpy(np.nan_to_num(target, nan=0.0)))


def test_epoch_reads_each_chunk_once(ncep_zarr: Path):
    bundle = build_streaming(ncep_spec(ncep_zarr), seed=0)
    train = bundle.train
    counters = bundle.source.raw.store.counters
    steps = {step for block in train.blocks for step in range(block.read_start, block.read_stop)}
    chunks = len({step // 40 for step in steps})

    for epoch in (0, 1):
        before = counters.requests
        epoch_samples(bundle, epoch=epoch)
        assert counters.requests - before == chunks

    # Without room to keep halo steps, blocks fetch their neighbours' chunks again.
    train.halo_budget_bytes = 0
    before = counters.requests
    epoch_samples(bundle, epoch=0)
    assert counters.requests - before > chunks


def test_stream_netcdf_with_region_and_coarsen(ncep_air: Path):
    spec = ncep_spec(ncep_air, loader={"statsSteps": 100_000}, coarsen=2,
                     region={"latMin": 30, "latMax": 60, "lonMin": 230, "lonMax": 300})

    memory = build_datasets(spec, seed=0)
    streamed = build_streaming(spec, seed=0)
    streamed.train.shuffle = False
    x, _ = epoch_samples(streamed)

    assert streamed.grid == memory.grid
    np.testing.assert_allclose(streamed.latitudes, memory.latitudes)
    torch.testing.assert_close(x[10], memory.train[10][0], rtol=1e-5, atol=1e-5)


def test_statistics_from_training_period_only(tmp_path: Path, ncep_air: Path):
    # Shift validation and test by +1000 K: statistics that saw them would move far from ~280 K.
    dataset = xr.open_dataset(ncep_air)
    shifted = dataset["air"].astype("float32").where(dataset["time"] < np.datetime64("2014-01-01"),
                                                     dataset["air"].astype("float32") + 1000.0)
    path = tmp_path / "shifted.nc"
    dataset.assign(air=shifted).to_netcdf(path)

    for stats_steps in (64, 100_000):
        bundle = build_streaming(ncep_spec(path, loader={"statsSteps": stats_steps}), seed=0)
        assert 250 < bundle.mean[0] < 300
        assert bundle.std[0] < 40
        climatology = bundle.test_arrays().climatology
        assert np.nanmax(climatology) < 330


def test_estimated_stats_spread_over_period(ncep_zarr: Path):
    estimate = build_streaming(ncep_spec(ncep_zarr, loader={"statsSteps": 400}), seed=0)
    exact = build_streaming(ncep_spec(ncep_zarr, loader={"statsSteps": 100_000}), seed=0)

    assert estimate.statistics_steps < exact.statistics_steps
    assert abs(estimate.mean[0] - exact.mean[0]) < 1.0
    assert abs(estimate.std[0] - exact.std[0]) / exact.std[0] < 0.1


def test_load_trial_data_modes(ncep_zarr: Path):
    auto_small = load_trial_data(ncep_spec(ncep_zarr, loader={"mode": "auto"}), seed=0)
    auto_large = load_trial_data(ncep_spec(ncep_zarr, loader={"mode": "auto", "streamAboveMB": 1}), seed=0)
    memory = load_trial_data(ncep_spec(ncep_zarr, loader={"mode": "memory", "streamAboveMB": 1}), seed=0)

    assert isinstance(auto_small, DataBundle)
    assert not auto_small.streaming
    assert isinstance(auto_large, StreamingBundle)
    assert auto_large.streaming
    assert isinstance(memory, DataBundle)
    assert auto_large.loaded_bytes > 0
    x, y, mask = auto_large.train[3]
    assert x.shape == (2, 25, 53)
    assert y.shape == (1, 25, 53)
    assert mask.shape == (1, 25, 53)


# Prefetcher ------------------------------------------------------------------------------------


def test_prefetcher_order_and_bound():
    depth = 3
    started, consumed = [], []
    lock = threading.Lock()
    ahead = []

    def read(item: int) -> int:
        with lock:
            started.append(item)
            ahead.append(len(started) - len(consumed))
        time.sleep(0.002 * ((item * 7) % 5))
        return item * item

    prefetcher = Prefetcher(read, range(40), workers=4, depth=depth, timeout_seconds=10)
    results = []
    for item, value in prefetcher:
        results.append((item, value))
        with lock:
            consumed.append(item)
        time.sleep(0.001)
    prefetcher.close()

    assert results == [(i, i * i) for i in range(40)]
    assert max(ahead) <= depth


def test_prefetcher_reraises_read_error():
    def read(item: int) -> int:
        if item == 3:
            raise DataError("block 3 is bad")
        return item

    prefetcher = Prefetcher(read, range(6), workers=2, depth=2, timeout_seconds=10)
    with pytest.raises(DataError, match="block 3 is bad"):
        list(prefetcher)
    prefetcher.close()


def test_prefetcher_times_out():
    never = threading.Event()
    prefetcher = Prefetcher(lambda item: never.wait(), [1, 2], workers=1, depth=1, timeout_seconds=0.3,
                            describe=lambda item: f"block {item}")
    began = time.monotonic()
    with pytest.raises(DataError, match="timed out after 0.3 s waiting for block 1"):
        list(prefetcher)
    prefetcher.close()
    never.set()
    assert time.monotonic() - began < 5


# Missing and corrupt chunks -----------------------------------------------------------------------


@pytest.fixture
def damaged_store(tmp_path: Path, ncep_zarr: Path) -> Path:
    path = tmp_path / "damaged.zarr"
    shutil.copytree(ncep_zarr, path)
    return path


def test_missing_chunk_names_key(damaged_store: Path):
    (damaged_store / "air" / "c" / "5" / "0" / "0").unlink()
    spec = ncep_spec(damaged_store, loader={"statsSteps": 100_000})

    with pytest.raises(MissingChunkError, match=r"chunk 'air/c/5/0/0' is missing") as error:
        build_streaming(spec, seed=0)
    assert error.value.key == "air/c/5/0/0"
    with pytest.raises(MissingChunkError, match=r"air/c/5/0/0"):
        build_datasets(spec, seed=0)


def test_missing_chunk_fill_policy(damaged_store: Path):
    (damaged_store / "air" / "c" / "5" / "0" / "0").unlink()
    spec = ncep_spec(damaged_store, loader={"missingChunks": "fill", "statsSteps": 100_000})

    bundle = build_streaming(spec, seed=0)

    assert bundle.nan_cells["air"] == 40 * 25 * 53


def test_corrupt_chunk_names_key(damaged_store: Path):
    (damaged_store / "air" / "c" / "30" / "0" / "0").write_bytes(b"not zstd" * 64)
    spec = ncep_spec(damaged_store, loader={"statsSteps": 64})
    bundle = build_streaming(spec, seed=0)  # the statistics sample does not read chunk 30

    with pytest.raises(CorruptChunkError, match=r"chunk 'air/c/30/0/0' of .* is corrupt") as error:
        epoch_samples(bundle)
    assert error.value.key == "air/c/30/0/0"


# S3 through moto, with injected faults ----------------------------------------------------------------


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of moto that fails GETs of chosen keys.

    `fail(fragment, times, kind)` makes the next `times` GETs whose path contains
    `fragment` fail: '503' returns HTTP 503 SlowDown, 'reset' closes the
    connection without a response, 'hang' sends nothing for 30 s. `hits` counts the GETs
    per fragment, failed or not.
    """

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.rules: list[list] = []
        self.hits: dict[str, int] = {}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None

                # Injected faults.
                if self.command == "GET":
                    for rule in proxy.rules:
                        if rule[0] not in self.path:
                            continue
                        proxy.hits[rule[0]] = proxy.hits.get(rule[0], 0) + 1
                        if rule[1] == 0:
                            continue
                        rule[1] -= 1
                        if rule[2] == "503":
                            payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                                       b"<Message>Please reduce your request rate.</Message></Error>")
                            self.send_response(503)
                            self.send_header("Content-Length", str(len(payload)))
                            self.end_headers()
                            self.wfile.write(payload)
                            return
                        if rule[2] == "reset":
                            self.close_connection = True
                            self.connection.close()
                            return
                        time.sleep(30)  # 'hang'
                        return

                # Everything else goes to moto unchanged.
                upstream_connection = http.client.HTTPConnection(host, int(port), timeout=60)
                upstream_connection.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                response = upstream_connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream_connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def fail(self, fragment: str, times: int, kind: str) -> None:
        self.rules.append([fragment, times, kind])
        self.hits[fragment] = 0

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_store(moto_endpoint: str, ncep_zarr: Path, tmp_path: Path, monkeypatch) -> str:
    """The NCEP zarr store in a fresh bucket; returns its s3:// URL."""
    s3fs = pytest.importorskip("s3fs")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": moto_endpoint},
                           skip_instance_cache=True)
    bucket = f"wx-{tmp_path.name.lower().replace('_', '-')}"[:60]
    fs.mkdir(bucket)
    fs.put(str(ncep_zarr), f"{bucket}/ncep.zarr", recursive=True)
    return f"s3://{bucket}/ncep.zarr"


@pytest.fixture
def proxy(moto_endpoint: str):
    fault_proxy = FaultProxy(moto_endpoint)
    yield fault_proxy
    fault_proxy.stop()


def s3_spec(url: str, endpoint: str, **loader) -> DataSpec:
    return ncep_spec(url, loader={"retryBackoffSeconds": 0.05, "statsSteps": 100_000, **loader},
                     storage={"endpointUrl": endpoint})


@pytest.mark.parametrize("kind", ["503", "reset"])
def test_s3_transient_fault_retried(s3_store: str, proxy: FaultProxy, ncep_zarr: Path, kind: str, caplog):
    proxy.fail("ncep.zarr/air/c/3/0/0", times=2, kind=kind)
    caplog.set_level(logging.WARNING, logger="wxscale.data.store")

    streamed = build_streaming(s3_spec(s3_store, proxy.url), seed=0)
    local = build_streaming(ncep_spec(ncep_zarr, loader={"statsSteps": 100_000}), seed=0)

    assert proxy.hits["ncep.zarr/air/c/3/0/0"] == 3
    assert "retry 1 of 4" in caplog.text
    if kind == "503":
        assert "retry 2 of 4" in caplog.text
    # NOTE: aiohttp itself repeats a request once when a reused keep-alive connection drops, so after a reset
    # ReliableStore may see one failure, not two.
    assert "'air/c/3/0/0'" in caplog.text
    np.testing.assert_allclose(streamed.mean, local.mean, rtol=1e-12)


def test_s3_persistent_fault_fails_with_key(s3_store: str, proxy: FaultProxy):
    proxy.fail("ncep.zarr/air/c/3/0/0", times=100, kind="503")

    with pytest.raises(ChunkReadError, match=r"'air/c/3/0/0' .* failed after 3 attempts") as error:
        build_streaming(s3_spec(s3_store, proxy.url, retries=2), seed=0)
    assert error.value.key == "air/c/3/0/0"


def test_s3_hanging_request_times_out(s3_store: str, proxy: FaultProxy):
    proxy.fail("ncep.zarr/air/c/3/0/0", times=100, kind="hang")
    began = time.monotonic()

    with pytest.raises(ChunkReadError, match=r"'air/c/3/0/0' .* no response within 0.5 s"):
        build_streaming(s3_spec(s3_store, proxy.url, retries=1, timeoutSeconds=0.5), seed=0)
    assert time.monotonic() - began < 20


def test_s3_missing_chunk_names_key(s3_store: str, moto_endpoint: str):
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": moto_endpoint},
                           skip_instance_cache=True)
    fs.rm(s3_store.removeprefix("s3://") + "/air/c/7/0/0")

    with pytest.raises(MissingChunkError, match=r"chunk 'air/c/7/0/0' is missing from s3://"):
        build_streaming(s3_spec(s3_store, moto_endpoint), seed=0)


def test_chunk_cache_serves_repeated_reads(s3_store: str, proxy: FaultProxy, tmp_path: Path):
    proxy.fail("ncep.zarr/air/c/", times=0, kind="503")  # counts chunk GETs, fails none
    spec = s3_spec(s3_store, proxy.url, cacheDir=str(tmp_path / "cache"))

    first = build_streaming(spec, seed=0)
    epoch_samples(first)
    fetched = proxy.hits["ncep.zarr/air/c/"]
    second = build_streaming(spec, seed=0)
    x_second, _ = epoch_samples(second)

    assert fetched == 73  # every chunk of the two years (2920 steps / 40), once
    assert proxy.hits["ncep.zarr/air/c/"] == fetched
    assert second.source.raw.store.counters.cache_hits > 0
    assert torch.equal(x_second, epoch_samples(first)[0])


def test_chunk_cache_evicts_least_recently_used(tmp_path: Path):
    cache = ChunkCache(tmp_path, "s3://bucket/store.zarr", limit_bytes=3000)
    for key in ("t/c/0", "t/c/1", "t/c/2"):
        assert cache.put(key, bytes(1000))
    assert cache.get("t/c/0") is not None  # now the most recently used

    assert cache.put("t/c/3", bytes(1500))

    assert cache.size_bytes <= 3000
    on_disk = sum(path.stat().st_size for path in cache.folder.rglob("*") if path.is_file())
    assert on_disk == cache.size_bytes
    assert cache.get("t/c/1") is None  # the two least recently used
    assert cache.get("t/c/2") is None
    assert cache.get("t/c/0") is not None
    assert cache.get("t/c/3") is not None
    assert cache.evictions == 2
    assert not cache.put("t/c/4", bytes(3001))  # larger than the limit: not cached, nothing evicted
    assert cache.get("t/c/0") is not None


def test_chunk_cache_limit_counts_entries_found_at_start(tmp_path: Path):
    first = ChunkCache(tmp_path, "s3://bucket/store.zarr", limit_bytes=2500)
    first.put("t/c/0", bytes(1000))
    first.put("t/c/1", bytes(1000))

    second = ChunkCache(tmp_path, "s3://bucket/store.zarr", limit_bytes=2500)
    assert second.size_bytes == 2000
    second.put("t/c/2", bytes(1000))

    assert second.size_bytes == 2000
    assert sum(path.stat().st_size for path in second.folder.rglob("*") if path.is_file()) == 2000


# Memory ---------------------------------------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np, pandas as pd, xarray as xr
    from wxscale.data import build_streaming
    from wxscale.spec import DataSpec

    store, memory_mb = sys.argv[1], float(sys.argv[2])
    steps, lat, lon = 6000, 96, 96
    times = pd.date_range("2000-01-01", periods=steps, freq="6h")
    rng = np.random.default_rng(0)
    for start in range(0, steps, 600):
        part = xr.Dataset(
            {"t": (("time", "lat", "lon"), rng.standard_normal((600, lat, lon), dtype=np.float32))},
            coords={"time": times[start:start + 600], "lat": np.linspace(89, -89, lat),
                    "lon": np.arange(lon) * 360.0 / lon})
        encoding = {"t": {"chunks": (16, lat, lon), "compressors": None}} if start == 0 else None
        if start == 0:
            part.to_zarr(store, mode="w", encoding=encoding, consolidated=False)
        else:
            part.to_zarr(store, append_dim="time", consolidated=False)
    store_mb = steps * lat * lon * 4 / 1e6

    spec = DataSpec(source=store, history=2,
                    train={"start": "2000-01-01", "end": "2003-12-31T18:00"},
                    validation={"start": "2004-01-01", "end": "2004-01-10T18:00"},
                    test={"start": "2004-01-11", "end": "2004-01-20T18:00"},
                    loader={"mode": "stream", "memoryMB": memory_mb, "statsSteps": 64})
    bundle = build_streaming(spec, seed=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    samples = 0
    for x, y, mask in bundle.train.batches(32, epoch=0):
        samples += len(x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"store_mb": store_mb, "peak_before_mb": before, "peak_after_mb": after,
                      "samples": samples, "train": len(bundle.train)}))
    """
)


def test_epoch_peak_memory_bounded(tmp_path: Path):
    memory_mb = 24
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "big.zarr"), str(memory_mb)],
                            capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    growth = report["peak_after_mb"] - report["peak_before_mb"]
    assert report["store_mb"] > 8 * memory_mb
    assert report["samples"] > 0.95 * report["train"]
    # The epoch reads every training byte, and the peak grows by a few memory budgets at most.
    assert growth < 4 * memory_mb, report


def test_statistics_sample_warns_few_pieces(tmp_path: Path, ncep_air: Path, ncep_zarr: Path, caplog):
    long_chunks = tmp_path / "long.zarr"
    convert(str(ncep_air), str(long_chunks), ConvertOptions(time_chunk=1500))
    caplog.set_level(logging.INFO, logger="wxscale.data.stream")

    # Eighteen months of training in chunks of about a year: a sample of 1,000 steps is one chunk.
    spec = DataSpec(source=str(long_chunks), history=2, train={"start": "2013-01-01", "end": "2014-06-30T18:00"},
                    validation={"start": "2014-07-01", "end": "2014-09-30T18:00"},
                    test={"start": "2014-10-01", "end": "2014-12-31T18:00"},
                    loader={**SMALL_BLOCKS, "statsSteps": 1000, "blockMB": 64, "memoryMB": 256})
    build_streaming(spec, seed=0)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any(message.startswith("the statistics sample is 1 piece(s) of 1500 steps") for message in warnings)
    assert "in 1 piece(s) between 2013-01-01 00:00 and" in caplog.text

    caplog.clear()
    build_streaming(ncep_spec(ncep_zarr, loader={"statsSteps": 1000}), seed=0)
    assert not [record for record in caplog.records if record.levelname == "WARNING"]
    assert "in 25 piece(s) between" in caplog.text


# Convert, inspect and the CLI ------------------------------------------------------------------------------


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_convert_layout_and_values(tmp_path: Path, ncep_air: Path, zarr_format: int):
    store = tmp_path / "out.zarr"

    summary = convert(str(ncep_air), str(store), ConvertOptions(chunk_mb=0.1, zarr_format=zarr_format,
                                                                memory_mb=1))

    converted = xr.open_dataset(store, engine="zarr")
    original = xr.open_dataset(ncep_air)
    assert converted["air"].dims == ("time", "lat", "lon")
    assert converted["air"].dtype == np.float32
    assert converted["air"].encoding["chunks"] == (summary.time_chunk, 25, 53)
    assert summary.time_chunk == int(0.1e6 // (25 * 53 * 4))
    np.testing.assert_allclose(converted["air"].values, original["air"].values, rtol=1e-6)
    np.testing.assert_array_equal(converted["time"].values, original["time"].values)
    assert converted["lat"].values[0] > converted["lat"].values[-1]


def test_convert_refuses_existing_destination(tmp_path: Path, ncep_air: Path):
    store = tmp_path / "out.zarr"
    convert(str(ncep_air), str(store), ConvertOptions(time_chunk=100))

    with pytest.raises(DataError, match="already exists; .* --overwrite"):
        convert(str(ncep_air), str(store), ConvertOptions(time_chunk=100))
    convert(str(ncep_air), str(store), ConvertOptions(time_chunk=50, overwrite=True))
    assert xr.open_dataset(store, engine="zarr")["air"].encoding["chunks"][0] == 50


def test_convert_unknown_variable_names_option(tmp_path: Path, ncep_air: Path):
    with pytest.raises(DataError) as caught:
        convert(str(ncep_air), str(tmp_path / "out.zarr"), ConvertOptions(variables=["airr"]))
    assert str(caught.value).startswith("--variables: variable 'airr' not found")


def test_convert_warns_irregular_step(tmp_path: Path, caplog):
    times = pd.to_datetime(["2000-01-01T00", "2000-01-01T06", "2000-01-01T13", "2000-01-01T19"])
    source = xr.Dataset({"t": (("time", "lat", "lon"), np.ones((4, 3, 4), np.float32))},
                        coords={"time": times, "lat": [10.0, 0.0, -10.0], "lon": [0.0, 90.0, 180.0, 270.0]})
    source.to_netcdf(tmp_path / "irregular.nc")
    caplog.set_level(logging.WARNING, logger="wxscale.data.convert")

    summary = convert(str(tmp_path / "irregular.nc"), str(tmp_path / "out.zarr"))

    assert summary.steps == 4
    (warning,) = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert "is irregular (steps between 6 h and 7 h" in warning
    assert "spec.data.leadTime" not in warning


def test_convert_to_s3_then_inspect(moto_endpoint: str, ncep_air: Path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    import s3fs

    s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": moto_endpoint},
                      skip_instance_cache=True).mkdir("converted")
    storage = StorageSpec(endpoint_url=moto_endpoint)

    convert(str(ncep_air), "s3://converted/ncep.zarr", ConvertOptions(time_chunk=120), storage)
    report = inspect_source("s3://converted/ncep.zarr", storage, seconds=0.5)

    assert report.format == "zarr"
    assert report.steps == 2920
    assert report.step == "6 h"
    assert (report.n_lat, report.n_lon) == (25, 53)
    assert report.time_chunk_steps == 120
    assert report.rate is not None and report.rate.steps > 0
    assert report.rate.stored_bytes > 0


def test_cli_data_convert_and_inspect(tmp_path: Path, ncep_air: Path, capsys):
    store = tmp_path / "cli.zarr"

    assert wxscale_main(["data", "convert", str(ncep_air), str(store), "--time-chunk", "73",
                         "--zarr-format", "2"]) == 0
    assert "chunks of 73 steps (40 per variable)" in capsys.readouterr().out
    assert wxscale_main(["data", "inspect", str(store), "--seconds", "0.2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["time_chunk_steps"] == 73
    assert report["variables"][0]["name"] == "air"
    assert report["rate"]["steps_per_second"] > 0

    assert wxscale_main(["data", "inspect", str(store), "--no-measure"]) == 0
    text = capsys.readouterr().out
    assert "2013-01-01 00:00 .. 2014-12-31 18:00, 2920 steps, step 6 h" in text
    assert "air [degK]: float32, chunks (73, 25, 53)" in text


def test_cli_inspect_missing_source(tmp_path: Path, capsys):
    assert wxscale_main(["data", "inspect", str(tmp_path / "absent.zarr")]) == 2
    assert "URL: " in capsys.readouterr().err


# The trainer ----------------------------------------------------------------------------------------------------


def test_trainer_streams_training_split(ncep_zarr: Path):
    from wxscale.spec import TrialConfig
    from wxscale.trialspec import TrialSpec
    from wxscale_trainer.runtime import Runtime
    from wxscale_trainer.train import run_trial

    config = TrialConfig.model_validate({
        "data": {"source": str(ncep_zarr), "history": 2, **NCEP_PERIODS, "loader": SMALL_BLOCKS},
        "model": {"depth": 1, "heads": 2, "embedDim": 16},
        "training": {"batchSize": 8, "budget": {"steps": 4}, "evalEvery": 4, "evalBatches": 1},
    })

    record = run_trial(TrialSpec("stream", "t0", 0, {}, config, 4), Runtime(0, 0, 1, torch.device("cpu")))

    assert record["state"] == "Succeeded"
    assert record["data"]["trainSamples"] == 1458
    assert record["data"]["loader"] == "stream"
    assert record["training"]["steps"] == 4
    assert np.isfinite(record["evaluation"]["testLoss"])
    assert 0.0 <= record["training"]["dataWaitFraction"] < 1.0
