"""Efficiency figures of a trial: FLOPs utilization, step-time breakdown and memory bandwidth.

Definitions used in the result record:
  - MFU = model FLOP/s / (peak FLOP/s per process x processes), with model FLOPs the
    analytic forward + backward count (`flops_per_sample`). HFU uses the hardware
    FLOPs instead, which add the recomputation of activation checkpointing and of
    fused attention (`hardware_flops_per_sample`). Both count the whole model's
    parameters under every strategy: FLOPs follow the model, not the shard.
  - Memory traffic is estimated by counting the bytes of every operand and result
    of every operator in one forward and backward pass, plus the optimizer's reads
    and writes. It assumes no cache reuse, so it is an upper bound of DRAM traffic
    for the unfused operators that PyTorch's eager mode runs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from wxscale_trainer.distributed.strategy import Autocast

logger = logging.getLogger(__name__)

# AdamW reads the parameter, its gradient and both moments, and writes the parameter and both moments.
ADAMW_TENSOR_PASSES = 7


# FLOPs utilization -----------------------------------------------------------------


def flops_utilization(model_flops_per_second: float, hardware_flops_per_second: float,
                      peak_flops_per_process: float | None, processes: int) -> dict[str, float | None]:
    """Return {"mfu", "hfu"}: model and hardware FLOP/s over the peak of all processes (None without a peak)."""
    if not peak_flops_per_process:
        return {"mfu": None, "hfu": None}
    peak = peak_flops_per_process * processes
    return {"mfu": model_flops_per_second / peak, "hfu": hardware_flops_per_second / peak}


# Step time -------------------------------------------------------------------------


def step_time_breakdown(*, steps: int, data_seconds: float, forward_backward_seconds: float,
                        optimizer_seconds: float, communication_seconds: float | None,
                        bubble_fraction: float | None = None, pipeline_idle_seconds: float | None = None,
                        ) -> dict[str, Any]:
    """Return where the training steps of this rank spent their time.

    `communication_seconds` is the summed launch-to-completion time of the timed
    collectives. It overlaps the backward pass under DDP and FSDP, so it is not a
    share of the step. Under pipelining, `pipeline_idle_seconds` is the time the
    stage waited inside the schedule (transfers and bubble), and the bubble
    estimate is the schedule's idle fraction times the forward and backward time.
    """
    total = data_seconds + forward_backward_seconds + optimizer_seconds
    breakdown: dict[str, Any] = {
        "steps": steps,
        "meanStepSeconds": total / steps if steps else None,
        "dataSeconds": data_seconds,
        "forwardBackwardSeconds": forward_backward_seconds,
        "optimizerSeconds": optimizer_seconds,
        "communicationSeconds": communication_seconds,
        "dataFraction": data_seconds / total if total > 0 else None,
    }
    if bubble_fraction is not None:
        breakdown["bubbleFraction"] = bubble_fraction
        breakdown["bubbleSecondsEstimate"] = bubble_fraction * forward_backward_seconds
        breakdown["pipelineIdleSeconds"] = pipeline_idle_seconds
    return breakdown


# Memory traffic --------------------------------------------------------------------


class _TrafficCounter(TorchDispatchMode):
    """Sums the bytes of the tensor operands and results of every operator that is not a view."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not func.is_view:
            for value in tree_leaves((args, kwargs, result)):
                if isinstance(value, torch.Tensor):
                    self.bytes += value.numel() * value.element_size()
        return result


def measure_tensor_traffic(model: nn.Module, sample_input: torch.Tensor, autocast: Autocast) -> int:
    """Return the operand and result bytes of one forward and backward pass of the model on `sample_input`.

    The gradients are computed with torch.autograd.grad and returned, so the
    parameters' `.grad` stays untouched.
    """
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    with _TrafficCounter() as counter:
        with autocast():
            output = model(sample_input)
        torch.autograd.grad(output.float().sum(), parameters)
    return counter.bytes


def optimizer_traffic_bytes(parameters: int, bytes_per_element: int = 4) -> int:
    """Return the bytes an AdamW step reads and writes for `parameters` fp32 parameters."""
    return ADAMW_TENSOR_PASSES * parameters * bytes_per_element


# GPU memory bandwidth (NVML) ---------------------------------------------------------


class GpuMemoryBandwidth:
    """Achieved DRAM bandwidth of a CUDA device between `start()` and `stop()`, from NVML's GPU performance
    monitoring (GPM, Hopper and newer).

    Peak bandwidth = memory clock x bus width x 2 (double data rate) / 8. Achieved
    bandwidth = GPM's DRAM bandwidth utilization x peak. Everything degrades to
    None: no CUDA device, no `pynvml` (nvidia-ml-py), no GPM support.
    NOTE: written against nvidia-ml-py 13.615 and not yet run on a GPU.
    """

    def __init__(self, device: torch.device):
        self._nvml = None
        self._handle = None
        self._first = None
        self.reading: dict[str, Any] = {}
        if device.type != "cuda":
            return
        try:
            import pynvml
        except ImportError:
            logger.info("no NVML memory-bandwidth reading: the nvidia-ml-py package is not installed")
            return
        try:
            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            uuid = f"GPU-{torch.cuda.get_device_properties(index).uuid}"
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            self._nvml = pynvml
            clock_hz = pynvml.nvmlDeviceGetMaxClockInfo(self._handle, pynvml.NVML_CLOCK_MEM) * 1e6
            bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(self._handle)
            self.reading["peakBytesPerSecond"] = clock_hz * bus_bits * 2 / 8
            if not pynvml.nvmlGpmQueryDeviceSupport(self._handle).isSupportedDevice:
                logger.info("no DRAM bandwidth reading: this GPU does not support NVML GPM")
                self._handle = None
        except (pynvml.NVMLError, AttributeError, RuntimeError) as error:
            logger.info("no NVML memory-bandwidth reading: %s", error)
            self._handle = None

    def start(self) -> None:
        if self._handle is None:
            return
        try:
            self._first = self._nvml.nvmlGpmSampleAlloc()
            self._nvml.nvmlGpmSampleGet(self._handle, self._first)
        except self._nvml.NVMLError as error:
            logger.info("no DRAM bandwidth reading: GPM sample failed (%s)", error)
            self._first = None

    def stop(self) -> dict[str, Any]:
        """Return {"peakBytesPerSecond", "dramUtilization", "achievedBytesPerSecond"}, the keys that were read."""
        if self._first is None:
            return self.reading
        nvml = self._nvml
        second = nvml.nvmlGpmSampleAlloc()
        try:
            nvml.nvmlGpmSampleGet(self._handle, second)
            query = nvml.c_nvmlGpmMetricsGet_t()
            query.version = nvml.NVML_GPM_METRICS_GET_VERSION
            query.numMetrics = 1
            query.sample1 = self._first
            query.sample2 = second
            query.metrics[0].metricId = nvml.NVML_GPM_METRIC_DRAM_BW_UTIL
            nvml.nvmlGpmMetricsGet(query)
            utilization = query.metrics[0].value / 100.0  # GPM reports a percentage
            self.reading["dramUtilization"] = utilization
            if "peakBytesPerSecond" in self.reading:
                self.reading["achievedBytesPerSecond"] = utilization * self.reading["peakBytesPerSecond"]
        except nvml.NVMLError as error:
            logger.info("no DRAM bandwidth reading: GPM metrics failed (%s)", error)
        finally:
            nvml.nvmlGpmSampleFree(self._first)
            nvml.nvmlGpmSampleFree(second)
            self._first = None
        return self.reading
