"""Data loader: read rate of one training epoch against fsspec reading the same chunks, and the data wait of a step.

The store is a synthetic field (smooth waves plus noise, float32) written as
netCDF and converted with `wxscale data convert` (chunks of whole time steps),
once with zstd (the default layout) and once uncompressed. Three measurements:

1. local disk: the loader's epoch (shuffled, batches of 32, history 2) against
   `fsspec.cat` of every chunk the epoch's blocks read. The rate of both is the
   stored bytes of those chunks, counted once, divided by the wall time, so any
   chunk the loader reads twice counts against it. Goal: loader >= 80 % of the
   raw rate, for each store. `cat` does not decode, so for the zstd store a
   second reference is the rate of decoding the same chunks, already in memory,
   with the loader's decoding threads: the limit of any loader that must decode;
2. the same from a moto S3 server on 127.0.0.1 (its own process);
3. the data-wait fraction of training steps of a fixed ViT fed by the
   streaming loader (zstd store): time in `next(batches)` / step time. Goal:
   < 5 %. The step time with batches already in memory is the reference for
   the slowdown that the loader's threads cause by sharing the cores.

NOTE: on the 2-core machine the loader's reader and decoding threads, zarr's
event loop and the moto server share the cores with the measured work. These
rates are therefore lower bounds of what the loader does with spare cores.
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
from wxscale.data.chunks import DECODE_THREADS, VariableLayout, decode_pool
from wxscale.data.convert import ConvertOptions, convert
from wxscale.data.stream import StreamingBundle, build_streaming
from wxscale.spec import DataSpec, ModelSpec

logger = logging.getLogger(__name__)

NAME = "data"

# (time steps, lat, lon, variables) of the synthetic store per mode.
SIZES = {"tiny": (240, 24, 48, 1), "quick": (730, 96, 192, 2), "full": (1460, 96, 192, 2)}
REPEATS = {"tiny": 1, "quick": 3, "full": 7}  # epochs of 0.1 to 0.5 s: the median of several is steadier
TRAIN_STEPS = {"tiny": 3, "quick": 20, "full": 60}
BATCH = 32

# Suffix of the row names per store; the zstd store is the default layout of `wxscale data convert`.
STORE_LABELS = {"zstd": "", "none": ", uncompressed store"}

# The data-wait measurement: 12 x 24 tokens of width 128 on the 96 x 192 grid, batches of 8.
WAIT_MODEL = ModelSpec(patch_size=8, depth=2, heads=4, embed_dim=128)
WAIT_BATCH = 8


def write_store(folder: Path, mode: str) -> dict[str, Path]:
    """Write the synthetic source as netCDF and convert it; return the zarr stores by compression ('zstd', 'none')."""
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
    stores = {}
    for compression in ("zstd", "none"):
        stores[compression] = folder / f"store-{compression}.zarr"
        convert(str(source), str(stores[compression]), ConvertOptions(compression=compression))
    source.unlink()
    return stores


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


def epoch_chunks(bundle: StreamingBundle) -> list[tuple[str, VariableLayout]]:
    """Return the keys of the chunks that one epoch of the training blocks reads, each once, with their layout."""
    train = bundle.train
    steps = sorted({step for block in train.blocks for step in range(block.read_start, block.read_stop)})
    chunks = {}
    for layout in train.source.chunk_reader.layouts:
        for index in sorted({step // layout.chunk_steps for step in steps}):
            chunks[layout.chunk_key(index)] = layout
    return list(chunks.items())


def chunk_paths(bundle: StreamingBundle, root: str) -> list[str]:
    """Return the paths under `root` of the chunks that `epoch_chunks` lists."""
    return [f"{root}/{key}" for key, _ in epoch_chunks(bundle)]


def decode_seconds(bundle: StreamingBundle, fs: Any, root: str) -> float | None:
    """Return the time to decode the epoch's chunks, fetched beforehand, with the loader's decoding threads.

    Returns None for an uncompressed store, where nothing is decoded.
    """
    chunks = epoch_chunks(bundle)
    if not any(layout.decode for _, layout in chunks):
        return None
    fetched = fs.cat([f"{root}/{key}" for key, _ in chunks])
    jobs = [(layout.decode, fetched[f"{root}/{key}"]) for key, layout in chunks]
    pool = decode_pool()
    began = time.perf_counter()
    list(pool.map(lambda job: job[0](job[1]), jobs))
    return time.perf_counter() - began


def read_rates(bundle: StreamingBundle, fs: Any, root: str, repeats: int) -> dict[str, float]:
    """Return the raw, decode and loader times of one epoch's chunks, and the epoch's sizes.

    raw: `fs.cat` of the chunks. decode: decoding the same chunks held in memory
    (None for an uncompressed store). loader: the epoch's batches.
    """
    paths = chunk_paths(bundle, root)
    stored_bytes = sum(fs.size(path) for path in paths)
    samples = {"count": 0}
    train = bundle.train

    def raw() -> None:
        fs.cat(paths)

    def epoch() -> None:
        samples["count"] = sum(len(batch[0]) for batch in train.batches(BATCH, epoch=1))

    times: dict[str, list[float]] = {"raw": [], "decode": [], "loader": []}
    for _ in range(repeats):  # interleaved, so that changes of the machine's load hit all three alike
        times["raw"].append(median_seconds(raw, 1))
        decoded = decode_seconds(bundle, fs, root)
        if decoded is not None:
            times["decode"].append(decoded)
        times["loader"].append(median_seconds(epoch, 1))
    return {
        "stored_bytes": stored_bytes,
        "raw_seconds": float(np.median(times["raw"])),
        "decode_seconds": float(np.median(times["decode"])) if times["decode"] else None,
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
    rows = [result(NAME, f"loader epoch read rate, {where}", loader_rate, "MB/s", "fsspec cat of the same chunks",
                   raw_rate, ">= 0.8", note)]
    if figures["decode_seconds"] is not None:
        decode_rate = megabytes / figures["decode_seconds"]
        # A loader that fetched and then decoded each chunk on one core could not beat 1 / (1/cat + 1/decode).
        serial = 1.0 / (1.0 / raw_rate + 1.0 / decode_rate)
        rows.append(result(
            NAME, f"loader epoch read rate, {where}", loader_rate, "MB/s",
            f"zstd decode of the same chunks in memory, {DECODE_THREADS} threads", decode_rate, None,
            f"cat then decode in sequence: {serial:.0f} MB/s",
        ))
    return rows


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
    import fsspec

    results: list[Result] = []
    steps = SIZES[mode][0]
    with tempfile.TemporaryDirectory(prefix="wxscale-bench-data-") as folder:
        stores = write_store(Path(folder), mode)

        # Local disk.
        fs = fsspec.filesystem("file")
        for compression, store in stores.items():
            local = build_streaming(spec_for(str(store), steps), seed=0)
            figures = read_rates(local, fs, str(store), REPEATS[mode])
            results += rate_results(f"local disk{STORE_LABELS[compression]}", figures)

        # Data wait of training steps fed by the loader. Blocks of 8 MB make the loader read while the steps
        # run, as it does on a store with many more blocks than this one.
        spec = spec_for(str(stores["zstd"]), steps)
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
            for compression, store in stores.items():
                key = f"bench/{store.name}"
                s3.put(str(store), key, recursive=True)
                remote = build_streaming(spec_for(f"s3://{key}", steps, endpoint), seed=0)
                figures = read_rates(remote, s3, key, REPEATS[mode])
                results += rate_results(f"moto S3 on 127.0.0.1{STORE_LABELS[compression]}", figures)
    return results
