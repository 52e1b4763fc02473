"""Training-state checkpoints with torch.distributed.checkpoint (DCP), and resuming from them.

Layout under the trial's output folder (a local folder or an s3:// prefix):

    checkpoints/step-00000040/.metadata      DCP metadata, written by rank 0
    checkpoints/step-00000040/__0_0.distcp   DCP data, one file per rank (shards under FSDP)
    checkpoints/step-00000040/trainer.json   the loop's state, written last by rank 0

`trainer.json` marks a checkpoint complete. A folder without it (a process
killed while writing) is never resumed from, and it is deleted when the trial
writes a newer checkpoint. A restarted trial resumes from the newest complete
checkpoint: weights, optimizer, gradient scale, each rank's random number
generator state and the position in the data order, so that its loss
trajectory continues the interrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.utils.data import DistributedSampler

from wxscale.spec import CheckpointSpec
from wxscale.storage import Location
from wxscale_trainer.runtime import Runtime

logger = logging.getLogger(__name__)

CHECKPOINTS_FOLDER = "checkpoints"
MARKER = "trainer.json"
_STEP_FOLDER = re.compile(r"step-(\d+)$")


def step_folder(step: int) -> str:
    """Return the folder name of the checkpoint after `step` optimizer steps."""
    return f"step-{step:08d}"


def storage_bytes(location: Location) -> int:
    """Return the bytes stored under a location (all files below it), 0 when it does not exist."""
    if not location.fs.exists(location.url):
        return 0
    return int(location.fs.du(location.url, total=True))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group, which is what a one-process trial intends."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


class Checkpointer:
    """Writes, finds, loads and prunes the checkpoints of one trial; `save` and `load` are collectives.

    `trial_location` is the trial's output folder. `on_write(nbytes, seconds)`,
    when given, receives each completed checkpoint, e.g. the trainer's metrics.
    """

    def __init__(self, trial_location: Location, spec: CheckpointSpec, runtime: Runtime,
                 on_write: Callable[[int, float], None] | None = None):
        self.location = trial_location.child(CHECKPOINTS_FOLDER)
        self.spec = spec
        self.runtime = runtime
        self.on_write = on_write
        self.written: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        self.load_seconds: float | None = None

    # Finding ------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        """Return the steps of the complete checkpoints, oldest first."""
        steps = []
        for path in self.location.list_json(f"step-*/{MARKER}"):
            match = _STEP_FOLDER.search(path.rsplit("/", 1)[0])
            if match:
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """Return the step of the newest complete checkpoint, or None when there is none."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def due(self, step: int, last_step: int) -> bool:
        """Return whether the spec requests a checkpoint after `step` of `last_step` optimizer steps."""
        if step == last_step and self.spec.final:
            return True
        every = self.spec.every_steps
        return every is not None and step % every == 0 and step < last_step

    # Writing ------------------------------------------------------------------------

    def _writer(self, url: str) -> dcp.StorageWriter:
        if self.location.is_local:
            return dcp.FileSystemWriter(url)
        # NOTE: PyTorch 2.13 keeps its fsspec writer in a private module; it takes the fsspec storage
        # options (the S3 endpoint, credentials) as keyword arguments.
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(url, **self.location.fs.storage_options)

    def _reader(self, url: str) -> dcp.StorageReader:
        if self.location.is_local:
            return dcp.FileSystemReader(url)
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(url, **self.location.fs.storage_options)

    def save(self, step: int, state: dict[str, Any], trainer_state: dict[str, Any]) -> dict[str, Any]:
        """Write the checkpoint after `step`: `state` through DCP on every rank, then `trainer_state` as the marker.

        Returns {"step", "bytes", "seconds"}: the checkpoint's size and the wall time
        from the start of the write on this rank until every rank has finished.
        """
        folder = step_folder(step)
        url = self.location.path(folder)
        started = time.perf_counter()

        # A folder of the same step can remain from an attempt killed while writing it.
        if self.runtime.is_main and self.location.exists(folder):
            self.location.fs.rm(url, recursive=True)
        _barrier()

        with _single_process_quiet():
            dcp.save({**state, "rng": _rng_state(self.runtime.rank)}, storage_writer=self._writer(url),
                     no_dist=not _distributed())
        _barrier()
        if self.runtime.is_main:
            self.location.write_json(f"{folder}/{MARKER}", {"step": step, **trainer_state})
        _barrier()
        seconds = time.perf_counter() - started

        nbytes = storage_bytes(self.location.child(folder)) if self.runtime.is_main else 0
        entry = {"step": step, "bytes": nbytes, "seconds": seconds}
        self.written.append(entry)
        if self.on_write is not None:
            self.on_write(nbytes, seconds)
        if self.runtime.is_main:
            logger.info("checkpoint at step %d: %.3g MB in %.2f s, %s", step, nbytes / 1e6, seconds, url)
            self._prune(keep_newest=self.spec.keep)
        return entry

    def _prune(self, keep_newest: int) -> None:
        """Delete all but the newest `keep_newest` complete checkpoints, and the incomplete folders below them."""
        complete = self.complete_steps()
        kept = set(complete[-keep_newest:])
        oldest_kept = min(kept) if kept else None
        for path in self.location.fs.glob(self.location.path("step-*")):
            match = _STEP_FOLDER.search(path.rstrip("/"))
            if not match:
                continue
            step = int(match.group(1))
            stale = step in complete and step not in kept
            abandoned = step not in complete and oldest_kept is not None and step < oldest_kept
            if stale or abandoned:
                self.location.fs.rm(path, recursive=True)
                logger.debug("deleted checkpoint folder %s", path)

    # Loading ------------------------------------------------------------------------

    def load(self, step: int, state: dict[str, Any]) -> dict[str, Any]:
        """Fill `state` in place from the checkpoint after `step`, restore this rank's random number generators,
        and return the loop's state from the marker.
        """
        folder = step_folder(step)
        started = time.perf_counter()
        rng = _rng_state(self.runtime.rank)
        with _single_process_quiet():
            dcp.load({**state, "rng": rng}, storage_reader=self._reader(self.location.path(folder)),
                     no_dist=not _distributed())
        _restore_rng(rng, self.runtime.rank)
        trainer_state = self.location.read_json(f"{folder}/{MARKER}")
        self.resumed_from = step
        self.load_seconds = time.perf_counter() - started
        logger.info("resumed from the checkpoint at step %d (%s) in %.2f s", step, self.location.path(folder),
                    self.load_seconds)
        return trainer_state

    def summary(self) -> dict[str, Any]:
        """Return the checkpoint figures of the result record."""
        written = self.written
        return {
            "location": self.location.url,
            "written": len(written),
            "lastStep": written[-1]["step"] if written else None,
            "lastBytes": written[-1]["bytes"] if written else None,
            "bytesWritten": sum(entry["bytes"] for entry in written),
            "writeSeconds": sum(entry["seconds"] for entry in written),
            "meanWriteSeconds": sum(entry["seconds"] for entry in written) / len(written) if written else None,
            "storedBytes": storage_bytes(self.location) if self.runtime.is_main else None,
            "resumedFromStep": self.resumed_from,
            "loadSeconds": self.load_seconds,
        }


def _rng_state(rank: int) -> dict[str, torch.Tensor]:
    """Return this rank's generator states under keys of its own, so that no rank's state replaces another's."""
    state = {f"cpu.rank{rank}": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state[f"cuda.rank{rank}"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict[str, torch.Tensor], rank: int) -> None:
    torch.set_rng_state(state[f"cpu.rank{rank}"])
    if f"cuda.rank{rank}" in state:
        torch.cuda.set_rng_state(state[f"cuda.rank{rank}"])


# Data order --------------------------------------------------------------------------


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way through.

    The order of each epoch depends only on the seed and the epoch number, so a
    resumed trial that skips the batches it has already trained on sees the same
    samples in the same order as an uninterrupted one.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skip = 0

    def skip_next(self, samples: int) -> None:
        """Leave out the first `samples` indices of the next iteration only."""
        self._skip = samples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


def endless_batches(loader: torch.utils.data.DataLoader, sampler: ResumableSampler,
                    start_batch: int = 0) -> Iterator[Any]:
    """Yield the loader's batches forever, one epoch after the other, starting after `start_batch` batches.

    Epoch e uses `sampler.set_epoch(e)`, so batch n is the same whether the
    iteration started at 0 or resumed at n.
    """
    per_epoch = len(loader)
    epoch, offset = divmod(start_batch, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        if offset:
            sampler.skip_next(offset * loader.batch_size)
            offset = 0
        yield from loader
        epoch += 1
