"""Process runtime: torchrun's environment, the device, threads and memory readings."""

from __future__ import annotations

import gc
import logging
import os
import resource
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Position of this process in the trial: rank, world size and device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(device_request: str = "auto", num_threads: int | None = None) -> Runtime:
    """Read torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...) and set up the process.

    With WORLD_SIZE > 1 the default process group is initialised: NCCL on CUDA,
    gloo on CPU. Without torchrun's variables the process runs alone.
    """
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    use_cuda = device_request == "cuda" or (device_request == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        from wxscale.errors import WxscaleError

        raise WxscaleError("spec.training.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Split the cores between the processes of this machine, so two ranks do not fight over them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        # WXSCALE_CPU_THREADS is set by `wxscale run` when several trials share the machine.
        shared = int(os.environ.get("WXSCALE_CPU_THREADS", "0"))
        threads = num_threads or shared or max(1, (os.cpu_count() or 1) // local_world)
        torch.set_num_threads(threads)

    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return Runtime(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def shutdown(runtime: Runtime) -> None:
    """Tear down the process group once the trial's models and optimizers are out of scope.

    DDP, FSDP and pipeline stages keep reference cycles to the process group, so a
    garbage collection frees them before the group goes. Without it and the barrier,
    gloo sometimes aborted at destruction ("terminate called without an active
    exception") on PyTorch 2.13.
    """
    if runtime.distributed and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def current_rss_bytes() -> int:
    """Resident set size of this process now, from /proc (Linux)."""
    try:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory over a block: CUDA max-allocated, or sampled host RSS on CPU.

    NOTE: on CPU the peak is sampled every millisecond, so a spike shorter than
    that can be missed; the figure is a lower bound.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = current_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
