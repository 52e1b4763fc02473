"""Communication accounting: bytes, calls and time of each rank's collectives, by kind.

Each process owns one `CommunicationMeter`. The strategies feed it from the
places where their collectives start:
  - DDP: a communication hook that all-reduces each gradient bucket
    (`DistributedDataParallel.register_comm_hook`);
  - FSDP2: custom all-gather and reduce-scatter objects
    (`FSDPModule.set_custom_all_gather` / `set_custom_reduce_scatter`);
  - pipelining: the send and receive operations a stage hands to its schedule
    (bytes and calls only, see `MeteredPipelineStage` in pipeline.py).

Bytes follow the nccl-tests convention: the size of the whole buffer on one
rank, that is the all-reduce tensor, the all-gather output, the reduce-scatter
input and the sent or received tensor. Time runs from the launch of a
collective to the completion of its future, so it includes waiting for the
slowest rank and can overlap computation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

# NOTE: PyTorch 2.13 defines the custom-communication interfaces of FSDP2 in a private module; the
# FSDPModule methods that take them (set_custom_all_gather, set_custom_reduce_scatter) are public.
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

logger = logging.getLogger(__name__)

# The `kind` values, shared with the trainer's Prometheus metrics.
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "recv")

Sink = Callable[[str, int, float], None]


@dataclass
class CollectiveTotals:
    """Totals of one kind of collective on one rank."""

    calls: int = 0
    bytes: int = 0
    seconds: float | None = 0.0  # None where the time is not measured (pipeline send and receive)


class CommunicationMeter:
    """Per-kind totals of this rank's collectives; safe to update from communication threads and future callbacks.

    `sink(kind, nbytes, seconds)`, when given, receives every timed collective as
    well, e.g. the trainer's Prometheus metrics.
    """

    def __init__(self, sink: Sink | None = None):
        self._sink = sink
        self._lock = threading.Lock()
        self._totals: dict[str, CollectiveTotals] = {}

    def record(self, kind: str, nbytes: int, seconds: float | None) -> None:
        """Count one collective of `kind` with its payload bytes and launch-to-completion seconds (None: not timed)."""
        if kind not in COLLECTIVE_KINDS:
            raise ValueError(f"unknown collective kind {kind!r}; expected one of {', '.join(COLLECTIVE_KINDS)}")
        with self._lock:
            totals = self._totals.setdefault(kind, CollectiveTotals(seconds=0.0 if seconds is not None else None))
            totals.calls += 1
            totals.bytes += int(nbytes)
            if seconds is not None:
                totals.seconds = (totals.seconds or 0.0) + seconds
        if self._sink is not None and seconds is not None:
            self._sink(kind, int(nbytes), seconds)

    def record_work(self, kind: str, nbytes: int, work: dist.Work | None, started: float) -> None:
        """Count a collective launched at `started` (time.perf_counter): now if it ran synchronously (`work`
        is None), else when its future completes.
        """
        if work is None:
            self.record(kind, nbytes, time.perf_counter() - started)
            return
        # NOTE: on NCCL the future can complete before the transfer has finished on the device, so the
        # time recorded there is a lower bound.
        work.get_future().add_done_callback(lambda _: self.record(kind, nbytes, time.perf_counter() - started))

    def totals(self) -> dict[str, dict[str, Any]]:
        """Return {kind: {"calls", "bytes", "seconds"}} of this rank, in COLLECTIVE_KINDS order."""
        with self._lock:
            return {kind: asdict(self._totals[kind]) for kind in COLLECTIVE_KINDS if kind in self._totals}

    def timed_seconds(self) -> float | None:
        """Return the summed time of the timed collectives of this rank; None when only untimed ones ran."""
        with self._lock:
            timed = [totals.seconds for totals in self._totals.values() if totals.seconds is not None]
            if self._totals and not timed:
                return None
            return sum(timed)

    def total_bytes(self) -> int:
        with self._lock:
            return sum(totals.bytes for totals in self._totals.values())


def tensor_bytes(tensors: Sequence[torch.Tensor] | torch.Tensor) -> int:
    """Return the summed size in bytes of one tensor or a sequence of tensors."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


# DDP -----------------------------------------------------------------------------


def metered_allreduce_hook(meter: CommunicationMeter) -> Callable[[Any, dist.GradBucket], torch.futures.Future]:
    """Return a DDP communication hook that averages each gradient bucket, as DDP's default does, and meters it."""

    # The parameters stay unannotated: DDP compares the annotation of `bucket` with dist.GradBucket, and
    # `from __future__ import annotations` would turn it into a string that fails the comparison.
    def hook(state, bucket):
        gradients = bucket.buffer()
        nbytes = tensor_bytes(gradients)
        started = time.perf_counter()
        gradients.div_(dist.get_world_size())  # divided before the sum, so the all-reduce yields the mean
        future = dist.all_reduce(gradients, async_op=True).get_future()

        def finished(done: torch.futures.Future) -> torch.Tensor:
            meter.record("all_reduce", nbytes, time.perf_counter() - started)
            return done.value()[0]

        return future.then(finished)

    return hook


# FSDP2 ---------------------------------------------------------------------------


class MeteredAllGather(AllGather):
    """FSDP2 all-gather of parameter shards through `all_gather_single`, metered."""

    def __init__(self, meter: CommunicationMeter):
        self.meter = meter

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> dist.Work | None:
        started = time.perf_counter()
        work = dist.all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)
        self.meter.record_work("all_gather", tensor_bytes(output_tensor), work if async_op else None, started)
        return work


class MeteredReduceScatter(ReduceScatter):
    """FSDP2 reduce-scatter of gradients through `reduce_scatter_single`, metered."""

    def __init__(self, meter: CommunicationMeter):
        self.meter = meter

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: Any, async_op: bool = False) -> dist.Work | None:
        started = time.perf_counter()
        work = dist.reduce_scatter_single(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        self.meter.record_work("reduce_scatter", tensor_bytes(input_tensor), work if async_op else None, started)
        return work


# All ranks -----------------------------------------------------------------------


def gather_ranks(own: dict[str, Any]) -> list[dict[str, Any]]:
    """Return every rank's `own` mapping, ordered by its "rank" key.

    With an initialised process group this is a collective, so every rank must call it at the same point.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, own)
        return sorted(gathered, key=lambda entry: entry["rank"])
    return [own]


def gather_communication(meter: CommunicationMeter, rank: int, steps: int) -> dict[str, Any]:
    """Return every rank's totals and their sums by kind for the result record; a collective (see gather_ranks).

    `steps` (the optimizer steps metered) gives the bytes per step.
    """
    ranks = gather_ranks({"rank": rank, "collectives": meter.totals()})

    by_kind: dict[str, dict[str, Any]] = {}
    for entry in ranks:
        for kind, totals in entry["collectives"].items():
            summed = by_kind.setdefault(kind, {"calls": 0, "bytes": 0, "seconds": 0.0})
            summed["calls"] += totals["calls"]
            summed["bytes"] += totals["bytes"]
            summed["seconds"] = None if totals["seconds"] is None or summed["seconds"] is None \
                else summed["seconds"] + totals["seconds"]
    total = sum(entry["bytes"] for entry in by_kind.values())
    return {
        "bytes": total,
        "bytesPerStepPerRank": total / max(steps, 1) / len(ranks),
        "byKind": by_kind,
        "ranks": ranks,
    }
