"""Data loader: read rate of one training epoch against fsspec reading the same chunks, and the data wait of a step.

The store is a synthetic field (smooth waves plus noise, float32) written as
netCDF and converted with `wxscale data convert` (zstd, chunks of whole time
steps). Three measurements:

1. local disk: the loader's epoch (shuffled, batches of 32, history 2) against
   `fsspec.cat` of every chunk the epoch's blocks read. The rate of both is the
   stored (compressed) bytes of those chunks, counted once, divided by the wall
   time, so the loader's re-reads of halo chunks count against it.
   Goal: loader >= 80 % of the raw rate.
2. the same from a moto S3 server on 127.0.0.1 (its own process);
3. the data-wait fraction of training steps of a fixed ViT fed by the
   streaming loader: time in `next(batches)` / step time. Goal: < 5 %. The
   step time with batches already in memory is the reference for the
   slowdown that the loader's threads cause by sharing the cores.

NOTE: on the 2-core machine the loader's reader threads, zarr's event loop and
the moto server share the cores with the measured work, so these rates are
lower bounds of what the loader does on a machine with spare cores.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import xarray as xr

from benchmarks.common import Result, median_seconds, moto_server, result
from wxscale.data.convert import ConvertOptions, convert
from wxscale.data.stream import StreamingBundle, build_streaming
from wxscale.spec import DataSpec, ModelSpec

logger = logging.getLogger(__name__)

NAME = "data"

# (time steps, lat, lon, variables) of the synthetic store per mode.
SIZES = {"tiny": (240, 24, 48, 1), "quick": (730, 96, 192, 2), "full": (1460, 96, 192, 2)}
REPEATS = {"tiny": 1, "quick": 1, "full": 3}
TRAIN_STEPS = {"tiny": 3, "quick": 20, "full": 60}
BATCH = 32

# The data-wait measurement: 12 x 24 tokens of width 128 on the 96 x 192 grid, batches of 8.
WAIT_MODEL = ModelSpec(patch_size=8, depth=2, heads=4, embed_dim=128)
WAIT_BATCH = 8


def write_store(folder: Path, mode: str) -> Path:
    """Write the synthetic source as netCDF and convert it; return the zarr store's path."""
    steps, n_lat, n_lon, n_vars = SIZES[mode]
    times = pd.date_range("2000-01-01", periods=steps, freq="6h")
    lat = np.linspace(89.0, -89.0, n_lat)
    lon = np.arange(n_lon) * 360.0 / n_lon
    rng = np.random.default_rng(0)
    phase = np.arange(steps)[:, None, None] * 0.05
    y, x = np.meshgrid(np.radians(lat), np.radians(lon), indexing="ij")
    variables = {}
    for v in range(n_vars):
        waves = 10 * np.sin(3 * x[None] + phase * (v + 1)) * np.cos(2 * y[None]) + 280.0
        noise = rng.standard_normal((steps, n_lat, n_lon)).astype(np.float32)
        variables[f"var{v}"] = (("time", "lat", "lon"), (waves + noise).astype(np.float32), {"units": "K"})
    source = folder / "source.nc"
    xr.Dataset(variables, coords={"time": times, "lat": lat, "lon": lon}).to_netcdf(source)
    store = folder / "store.zarr"
    convert(str(source), str(store), ConvertOptions())
    source.unlink()
    return store


def spec_for(source: str, steps: int, endpoint: str | None = None) -> DataSpec:
    """Train on the first 90 % of the steps, validate and test on 5 % each."""
    times = pd.date_range("2000-01-01", periods=steps, freq="6h")
    train_end, validation_end = times[int(0.9 * steps) - 1], times[int(0.95 * steps) - 1]
    return DataSpec(
        source=source,
        history=2,
        train={"start": times[0], "end": train_end},
        validation={"start": train_end + pd.Timedelta(hours=6), "end": validation_end},
        test={"start": validation_end + pd.Timedelta(hours=6), "end": times[-1]},
        loader={"mode": "stream", "statsSteps": 64},
        storage={"endpointUrl": endpoint},
    )


def chunk_paths(bundle: StreamingBundle, root: str) -> list[str]:
    """Return the paths of the stored chunks that one epoch of the training blocks reads, each once."""
    train = bundle.train
    chunk_steps = train.source.time_chunk_steps()
    indices = sorted({step // chunk_steps for block in train.blocks
                      for step in range(block.read_start, block.read_stop)})
    paths = []
    for name in train.source.variables:
        array = train.source.raw.dataset[name]
        n_other = array.ndim - 1
        for index in indices:
            paths.append(f"{root}/{name}/c/{index}" + "/0" * n_other)
    return paths


def read_rates(bundle: StreamingBundle, fs: Any, paths: list[str], repeats: int) -> dict[str, float]:
    """Return the raw, decode and loader times of one epoch's chunks, and the epoch's sizes.

    raw: `fs.cat` of the chunks. decode: `StreamSource.read` of every block in
    order on one thread (fetch, decompress, float32), without windows or shuffling.
    loader: the epoch's batches.
    """
    stored_bytes = sum(fs.size(path) for path in paths)
    samples = {"count": 0}
    train = bundle.train

    def raw() -> None:
        fs.cat(paths)

    def decode() -> None:
        for block in train.blocks:
            train.source.read(block.read_start, block.read_stop)

    def epoch() -> None:
        samples["count"] = sum(len(batch[0]) for batch in train.batches(BATCH, epoch=1))

    times: dict[str, list[float]] = {"raw": [], "decode": [], "loader": []}
    for _ in range(repeats):  # interleaved, so that changes of the machine's load hit all three alike
        times["raw"].append(median_seconds(raw, 1))
        times["decode"].append(median_seconds(decode, 1))
        times["loader"].append(median_seconds(epoch, 1))
    return {
        "stored_bytes": stored_bytes,
        "raw_seconds": float(np.median(times["raw"])),
        "decode_seconds": float(np.median(times["decode"])),
        "loader_seconds": float(np.median(times["loader"])),
        "samples": samples["count"],
        "float32_bytes": samples["count"] * train.source.step_bytes,
    }


def rate_results(where: str, figures: dict[str, float]) -> list[Result]:
    megabytes = figures["stored_bytes"] / 1e6
    raw_rate = megabytes / figures["raw_seconds"]
    loader_rate = megabytes / figures["loader_seconds"]
    samples_rate = figures["samples"] / figures["loader_seconds"]
    note = (f"{figures['samples']} samples, {samples_rate:.0f} samples/s, "
            f"{figures['float32_bytes'] / 1e6 / figures['loader_seconds']:.0f} MB/s of float32 fields; "
            f"{megabytes:.1f} MB stored")
    decode_rate = megabytes / figures["decode_seconds"]
    return [
        result(NAME, f"loader epoch read rate, {where}", loader_rate, "MB/s", "fsspec cat of the same chunks",
               raw_rate, ">= 0.8", note),
        result(NAME, f"loader epoch read rate, {where}", loader_rate, "MB/s", "block reads alone (1 thread)",
               decode_rate, None, "fetch + decompress + float32 of the blocks, without windows or shuffling"),
    ]


def endless(loader: Any) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield the loader's batches epoch after epoch, as the trainer does."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def data_wait(bundle: StreamingBundle, steps: int) -> dict[str, float]:
    """Train `steps` steps from the streaming loader and from batches in memory; return the time split."""
    from wxscale.metrics import latitude_weighted_mse_loss, latitude_weights
    from wxscale.model import WeatherViT

    torch.manual_seed(0)
    model = WeatherViT(WAIT_MODEL, grid=bundle.grid, in_channels=bundle.in_channels, out_channels=bundle.out_channels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    weights = torch.as_tensor(latitude_weights(bundle.latitudes), dtype=torch.float32)

    def step(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> None:
        loss = latitude_weighted_mse_loss(model(x), y, weights, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    loader = bundle.train.loader(WAIT_BATCH)
    batches = endless(loader)
    for _ in range(3):  # warm-up: the first steps allocate memory and build kernels, and read the first blocks
        batch = next(batches)
        step(*batch)
    in_memory = [tensor.clone() for tensor in batch]

    # Streamed and in-memory steps alternate, so that load changes on the machine hit both alike.
    wait = compute = memory = 0.0
    for _ in range(steps):
        began = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        step(*batch)
        stepped = time.perf_counter()
        step(*in_memory)
        wait += fetched - began
        compute += stepped - fetched
        memory += time.perf_counter() - stepped
    batches.close()
    memory_seconds = memory / steps
    return {"wait": wait, "compute": compute, "steps": steps, "memory_step": memory_seconds}


def run(mode: str = "quick") -> list[Result]:
    """Run the loader benchmarks of `mode` ('tiny', 'quick' or 'full')."""
    results: list[Result] = []
    steps = SIZES[mode][0]
    with tempfile.TemporaryDirectory(prefix="wxscale-bench-data-") as folder:
        store = write_store(Path(folder), mode)

        # Local disk.
        import fsspec

        local = build_streaming(spec_for(str(store), steps), seed=0)
        fs = fsspec.filesystem("file")
        figures = read_rates(local, fs, chunk_paths(local, str(store)), REPEATS[mode])
        results += rate_results("local disk", figures)

        # Data wait of training steps fed by the loader. Blocks of 8 MB make the loader read while the steps
        # run, as it does on a store with many more blocks than this one.
        spec = spec_for(str(store), steps)
        spec.loader.block_mb, spec.loader.shuffle_blocks = 8.0, 2
        split = data_wait(build_streaming(spec, seed=0), TRAIN_STEPS[mode])
        total = split["wait"] + split["compute"]
        results.append(result(NAME, "data wait / step time, streaming", split["wait"] / total, "", "limit",
                              0.05, "<= 1", f"{split['steps']} steps of {total / split['steps'] * 1000:.0f} ms, "
                              f"batch {WAIT_BATCH}, ViT depth 2 width 128 on {local.grid[0]}x{local.grid[1]}"))
        results.append(result(NAME, "step time, streaming vs batch in memory", total / split["steps"], "s",
                              "batch in memory", split["memory_step"], None,
                              "the loader's threads share the 2 cores with the step"))

        # moto S3 on 127.0.0.1.
        with moto_server() as endpoint:
            import s3fs

            s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
            s3.mkdir("bench")
            s3.put(str(store), "bench/store.zarr", recursive=True)
            remote = build_streaming(spec_for("s3://bench/store.zarr", steps, endpoint), seed=0)
            paths = chunk_paths(remote, "bench/store.zarr")
            figures = read_rates(remote, s3, paths, REPEATS[mode])
            results += rate_results("moto S3 on 127.0.0.1", figures)
    return results
