"""NVIDIA GPU readings for the trainer's metrics: peak FLOP/s of known GPUs and NVML gauges.

Everything here degrades to "no reading" rather than a zero: without a CUDA
device, without the `nvidia-ml-py` package, without the NVML library or for a
query the driver does not support, the matching metric is left out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import torch
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

TFLOPS = 1e12

# Dense (no structured sparsity) peak FLOP/s per GPU, from NVIDIA's data sheets, by matmul precision.
# The first pattern that matches torch.cuda.get_device_name() wins, so longer names come first.
# NOTE: the V100 row is the SXM2 part; the PCIe card runs about 10 % lower. Override with --peak-flops.
KNOWN_GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H100.*PCIe", {"fp32": 51.2 * TFLOPS, "tf32": 378 * TFLOPS, "bf16": 756 * TFLOPS, "fp16": 756 * TFLOPS}),
    (r"H100|H800", {"fp32": 67 * TFLOPS, "tf32": 494.7 * TFLOPS, "bf16": 989.4 * TFLOPS, "fp16": 989.4 * TFLOPS}),
    (r"H200.*NVL", {"fp32": 60 * TFLOPS, "tf32": 417.5 * TFLOPS, "bf16": 835.5 * TFLOPS, "fp16": 835.5 * TFLOPS}),
    (r"H200", {"fp32": 67 * TFLOPS, "tf32": 494.7 * TFLOPS, "bf16": 989.4 * TFLOPS, "fp16": 989.4 * TFLOPS}),
    (r"A100|A800", {"fp32": 19.5 * TFLOPS, "tf32": 156 * TFLOPS, "bf16": 312 * TFLOPS, "fp16": 312 * TFLOPS}),
    (r"L40S", {"fp32": 91.6 * TFLOPS, "tf32": 183 * TFLOPS, "bf16": 362 * TFLOPS, "fp16": 362 * TFLOPS}),
    (r"\bL4\b", {"fp32": 30.3 * TFLOPS, "tf32": 60 * TFLOPS, "bf16": 121 * TFLOPS, "fp16": 121 * TFLOPS}),
    (r"\bA10\b", {"fp32": 31.2 * TFLOPS, "tf32": 62.5 * TFLOPS, "bf16": 125 * TFLOPS, "fp16": 125 * TFLOPS}),
    (r"V100", {"fp32": 15.7 * TFLOPS, "fp16": 125 * TFLOPS}),
    (r"\bT4\b", {"fp32": 8.1 * TFLOPS, "fp16": 65 * TFLOPS}),
)


def matmul_precision(precision: str) -> str:
    """Return the peak-table column for a trial precision: fp32 becomes tf32 when PyTorch allows TF32 matmuls."""
    if precision == "fp32":
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return precision


def known_gpu_peak(device_name: str, precision: str) -> float | None:
    """Return the dense peak FLOP/s of a GPU model at a trial precision (fp32, bf16, fp16), or None if unknown."""
    column = matmul_precision(precision)
    for pattern, peaks in KNOWN_GPU_PEAKS:
        if re.search(pattern, device_name):
            return peaks.get(column)
    return None


def _import_nvml() -> Any | None:
    try:
        import pynvml
    except ImportError:
        logger.info("GPU metrics off: the nvidia-ml-py package is not installed")
        return None
    return pynvml


class NvmlCollector(Collector):
    """Prometheus collector that reads one GPU through NVML at every scrape.

    Exported gauges: utilization, memory utilization, memory used and total,
    power, temperature and SM clock. Each is left out when the driver does not
    support its query. Memory utilization is the fraction of time device memory
    was read or written, NVML's closest reading to bandwidth utilization.
    """

    def __init__(self, nvml: Any, handle: Any, label_names: list[str], label_values: list[str]):
        self._nvml = nvml
        self._handle = handle
        self._label_names = label_names
        self._label_values = label_values

    @classmethod
    def for_device(cls, device: torch.device, label_names: list[str], label_values: list[str],
                   ) -> NvmlCollector | None:
        """Return a collector for a CUDA device, or None when NVML is unavailable or the device is not CUDA."""
        if device.type != "cuda":
            return None
        nvml = _import_nvml()
        if nvml is None:
            return None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            logger.warning("GPU metrics off: NVML did not initialise (%s)", error)
            return None

        # CUDA and NVML can number GPUs differently (CUDA_VISIBLE_DEVICES), so the device is found by its UUID.
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = f"GPU-{torch.cuda.get_device_properties(index).uuid}"
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
        except nvml.NVMLError as error:
            # NOTE: MIG instances have MIG- UUIDs, which this lookup misses; their parent GPU is read instead.
            logger.warning("NVML found no GPU with UUID %s (%s); reading NVML device %d instead", uuid, error, index)
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError as index_error:
                logger.warning("GPU metrics off: NVML has no device %d (%s)", index, index_error)
                return None
        return cls(nvml, handle, label_names, label_values)

    def _read(self, query, *args) -> Any | None:
        try:
            return query(self._handle, *args)
        except self._nvml.NVMLError as error:
            logger.debug("NVML %s failed: %s", query.__name__, error)
            return None

    def _gauge(self, name: str, documentation: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, documentation, labels=self._label_names)
        family.add_metric(self._label_values, value)
        return family

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._nvml
        rates = self._read(nvml.nvmlDeviceGetUtilizationRates)
        if rates is not None:
            yield self._gauge("wxscale_trainer_gpu_utilization_ratio",
                              "Fraction of the last sample period in which a kernel ran on the GPU (NVML).",
                              rates.gpu / 100.0)
            yield self._gauge("wxscale_trainer_gpu_memory_utilization_ratio",
                              "Fraction of the last sample period in which device memory was read or written (NVML).",
                              rates.memory / 100.0)

        memory = self._read(nvml.nvmlDeviceGetMemoryInfo)
        if memory is not None:
            yield self._gauge("wxscale_trainer_gpu_memory_used_bytes", "Device memory in use, all processes (NVML).",
                              float(memory.used))
            yield self._gauge("wxscale_trainer_gpu_memory_total_bytes", "Device memory installed (NVML).",
                              float(memory.total))

        milliwatts = self._read(nvml.nvmlDeviceGetPowerUsage)
        if milliwatts is not None:
            yield self._gauge("wxscale_trainer_gpu_power_watts", "Board power draw (NVML).", milliwatts / 1000.0)

        celsius = self._read(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)
        if celsius is not None:
            yield self._gauge("wxscale_trainer_gpu_temperature_celsius", "GPU die temperature (NVML).", float(celsius))

        megahertz = self._read(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM)
        if megahertz is not None:
            yield self._gauge("wxscale_trainer_gpu_sm_clock_hertz", "Streaming-multiprocessor clock (NVML).",
                              megahertz * 1e6)
