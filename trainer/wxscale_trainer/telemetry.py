"""Prometheus metrics of one trainer process: progress, compute, memory, I/O and communication.

Every process of a trial owns one `Telemetry`, with its own registry. The
training loop reports to it (`record_step`, `record_validation`, ...), and
Prometheus reads it from an HTTP endpoint when `serve` was called
(`--metrics-port`). Every series carries the labels study, trial, rank and
node, whose values are bounded by the study's trials and processes.

Short trials can end between two scrapes, so the final values also leave the
process in two other ways: `final_record` returns them for the trial's result
record (always), and `push` sends them to a Prometheus pushgateway
(`--pushgateway URL`). docs/telemetry.md lists every metric.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry, Counter, Gauge, Info, push_to_gateway, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from wxscale.errors import WxscaleError
from wxscale_trainer.gpu import NvmlCollector, known_gpu_peak
from wxscale_trainer.runtime import current_rss_bytes, peak_rss_bytes

logger = logging.getLogger(__name__)

LABELS = ("study", "trial", "rank", "node")
STEP_PHASES = ("data_wait", "forward_backward", "optimizer")
# Bounded values of the `kind` label of the communication metrics.
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "send", "recv")
THROUGHPUT_WINDOW_STEPS = 20  # steps averaged by the samples/s, tokens/s, FLOP/s and MFU gauges
PUSHGATEWAY_JOB = "wxscale_trainer"

_measured_matmul_rates: dict[tuple[torch.dtype, int, int], float] = {}


def measure_cpu_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 1024, min_seconds: float = 0.25) -> float:
    """Measure this process's CPU matmul rate in FLOP/s, once per (dtype, threads, size); later calls reuse it.

    A (size x size) @ (size x size) product costs 2 * size**3 FLOPs. The rate is
    taken over at least `min_seconds` and three products, after one warm-up product.
    """
    key = (dtype, torch.get_num_threads(), size)
    if key in _measured_matmul_rates:
        return _measured_matmul_rates[key]

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)

    products = 0
    started = time.perf_counter()
    elapsed = 0.0
    while products < 3 or elapsed < min_seconds:
        torch.mm(a, b)
        products += 1
        elapsed = time.perf_counter() - started

    rate = 2.0 * size**3 * products / elapsed
    _measured_matmul_rates[key] = rate
    logger.info("measured CPU matmul rate: %.3g FLOP/s (%s, %d threads, %d products of %dx%d in %.2f s)", rate,
                dtype, key[1], products, size, size, elapsed)
    return rate


def peak_flops_for(device: torch.device, precision: str, override: float | None = None) -> tuple[float | None, str]:
    """Return the peak FLOP/s that MFU divides by, and where it came from.

    The first that applies wins: `override` (--peak-flops), then for CUDA the
    table of known GPUs (None when the GPU is not in it), then for CPU a matmul
    rate measured at the trial's precision. A measured rate is what the CPU
    reaches, not its theoretical peak, so CPU MFU reads higher than a
    data-sheet figure would give.
    """
    if override is not None:
        return override, "override"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = known_gpu_peak(name, precision)
        if peak is None:
            logger.warning("no known peak FLOP/s for %s at %s; MFU is left out (set --peak-flops)", name, precision)
            return None, f"unknown GPU {name}"
        return peak, f"table ({name}, {precision})"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return measure_cpu_matmul_flops(dtype), f"measured CPU matmul ({precision})"


def default_node_name() -> str:
    """Return NODE_NAME (set from the pod's spec.nodeName in cluster jobs), else the host name."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


class _MemoryCollector(Collector):
    """Collector of host RSS, and of CUDA allocator memory on a CUDA device, read at every scrape."""

    def __init__(self, device: torch.device, label_values: list[str]):
        self._device = device
        self._label_values = label_values

    def _gauge(self, name: str, documentation: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, documentation, labels=list(LABELS))
        family.add_metric(self._label_values, value)
        return family

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield self._gauge("wxscale_trainer_host_memory_rss_bytes", "Resident set size of the process.",
                          float(current_rss_bytes()))
        yield self._gauge("wxscale_trainer_host_memory_peak_rss_bytes", "Peak resident set size of the process.",
                          float(peak_rss_bytes()))
        if self._device.type != "cuda":
            return
        # NOTE: inference measurement resets the CUDA peak statistics, so after it the peaks cover inference only.
        readings = (
            ("allocated", "Device memory held by tensors (CUDA caching allocator).",
             torch.cuda.memory_allocated),
            ("reserved", "Device memory reserved by the CUDA caching allocator.", torch.cuda.memory_reserved),
            ("peak_allocated", "Peak device memory held by tensors.", torch.cuda.max_memory_allocated),
            ("peak_reserved", "Peak device memory reserved by the CUDA caching allocator.",
             torch.cuda.max_memory_reserved),
        )
        for name, documentation, reading in readings:
            yield self._gauge(f"wxscale_trainer_device_memory_{name}_bytes", documentation,
                              float(reading(self._device)))


class Telemetry:
    """The Prometheus metrics of one trainer process, labelled with its study, trial, rank and node."""

    def __init__(self, study: str, trial: str, rank: int = 0, node: str | None = None,
                 device: torch.device | None = None, peak_flops: float | None = None):
        """`peak_flops` (FLOP/s of this process's device) replaces the table or the measured CPU rate in MFU."""
        self.device = device or torch.device("cpu")
        self._peak_override = peak_flops
        self.labels = {"study": study, "trial": trial, "rank": str(rank), "node": node or default_node_name()}
        self.registry = CollectorRegistry()
        self._server = None
        self.port: int | None = None
        self.peak_flops: float | None = None
        self._flops_per_sample = 0.0
        self._tokens_per_sample = 0
        self._window: deque[tuple[int, float]] = deque(maxlen=THROUGHPUT_WINDOW_STEPS)

        def counter(name: str, documentation: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, documentation, LABELS + extra, registry=self.registry)

        # Gauges get their series at the first value, so that no reading shows 0 before it exists.
        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, LABELS, registry=self.registry)

        self._info = Info("wxscale_trainer", "The trial's device, precision and process layout.",
                          LABELS, registry=self.registry).labels(**self.labels)

        # Progress.
        self._steps = counter("wxscale_trainer_steps", "Optimizer steps this process has done.").labels(
            **self.labels)
        self._step = gauge("wxscale_trainer_step", "Optimizer steps of the trial done, those before a resume too.")
        self._planned_steps = gauge("wxscale_trainer_planned_steps", "Optimizer steps the trial plans.")
        self._samples = counter("wxscale_trainer_samples", "Training samples this process has seen.").labels(
            **self.labels)
        self._tokens = counter("wxscale_trainer_tokens", "Training tokens (patches) this process has seen.").labels(
            **self.labels)
        self._train_loss = gauge("wxscale_trainer_train_loss",
                                 "Training loss of the last step (latitude-weighted MSE, normalised fields).")
        self._validation_loss = gauge("wxscale_trainer_validation_loss",
                                      "Validation loss of the last evaluation (latitude-weighted MSE, normalised).")

        # Compute.
        self._flops = counter("wxscale_trainer_flops", "Model FLOPs done by this process (forward + backward, "
                                                       "analytic count, without recomputation).").labels(**self.labels)
        self._flops_rate = gauge("wxscale_trainer_flops_per_second",
                                 f"Model FLOP/s over the last {THROUGHPUT_WINDOW_STEPS} steps.")
        self._peak = gauge("wxscale_trainer_peak_flops_per_second",
                           "Peak FLOP/s of the device that MFU divides by (GPU table, measured CPU matmul or "
                           "--peak-flops).")
        self._mfu = gauge("wxscale_trainer_model_flops_utilization_ratio",
                          f"Model FLOP/s over peak FLOP/s, over the last {THROUGHPUT_WINDOW_STEPS} steps.")
        self._samples_rate = gauge("wxscale_trainer_samples_per_second",
                                   f"Training samples/s of this process over the last {THROUGHPUT_WINDOW_STEPS} steps.")
        self._tokens_rate = gauge("wxscale_trainer_tokens_per_second",
                                  f"Training tokens/s of this process over the last {THROUGHPUT_WINDOW_STEPS} steps.")
        phases = counter("wxscale_trainer_step_phase_seconds",
                         "Time in each phase of the training steps: data_wait, forward_backward, optimizer.",
                         ("phase",))
        self._phase = {phase: phases.labels(**self.labels, phase=phase) for phase in STEP_PHASES}

        # I/O.
        self._source_bytes = counter("wxscale_trainer_data_source_read_bytes",
                                     "Bytes read from the data source.").labels(**self.labels)
        self._source_seconds = counter("wxscale_trainer_data_source_read_seconds",
                                       "Time spent reading the data source.").labels(**self.labels)
        self._loader_bytes = counter("wxscale_trainer_data_loader_bytes",
                                     "Bytes of training batches the data loader delivered.").labels(**self.labels)
        self._checkpoint_bytes = counter("wxscale_trainer_checkpoint_written_bytes",
                                         "Bytes of checkpoints written.").labels(**self.labels)
        self._checkpoint_seconds = counter("wxscale_trainer_checkpoint_write_seconds",
                                           "Time spent writing checkpoints.").labels(**self.labels)
        self._checkpoints = counter("wxscale_trainer_checkpoints", "Checkpoints written.").labels(**self.labels)

        # Communication.
        self._collective_bytes = counter("wxscale_trainer_collective_bytes",
                                         "Payload bytes of collectives, by kind.", ("kind",))
        self._collective_seconds = counter("wxscale_trainer_collective_seconds",
                                           "Time from the launch to the completion of collectives, by kind.",
                                           ("kind",))
        self._collectives = counter("wxscale_trainer_collectives", "Collectives completed, by kind.", ("kind",))

        # Readings taken at scrape time: host and CUDA memory, and the GPU through NVML when there is one.
        label_values = [self.labels[name] for name in LABELS]
        self.registry.register(_MemoryCollector(self.device, label_values))
        nvml = NvmlCollector.for_device(self.device, list(LABELS), label_values)
        if nvml is not None:
            self.registry.register(nvml)

    def _set(self, gauge: Gauge, value: float) -> None:
        gauge.labels(**self.labels).set(value)

    # Endpoint --------------------------------------------------------------------

    def serve(self, port: int, address: str = "0.0.0.0") -> int:
        """Serve /metrics on address:port (port 0 picks a free one); return the port."""
        try:
            self._server, _ = start_http_server(port, addr=address, registry=self.registry)
        except OSError as error:
            raise WxscaleError(f"--metrics-port {port}: cannot listen on {address}:{port} ({error}); choose a free "
                               "port, or omit --metrics-port to turn the endpoint off") from error
        self.port = self._server.server_port
        logger.info("metrics of rank %s at http://%s:%d/metrics", self.labels["rank"], address, self.port)
        return self.port

    def linger(self, seconds: float) -> None:
        """Keep the endpoint up for `seconds` more, so that Prometheus scrapes the final values."""
        if self._server is not None and seconds > 0:
            logger.info("keeping the metrics endpoint up for %.0f s", seconds)
            time.sleep(seconds)

    def close(self) -> None:
        """Stop the endpoint, if one runs."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # Reports from the training loop ----------------------------------------------

    def start(self, *, planned_steps: int, flops_per_sample: float, tokens_per_sample: int, precision: str,
              strategy: str, world_size: int) -> None:
        """Set what the trial plans and resolve the peak FLOP/s; on CPU this measures the matmul rate once."""
        self._flops_per_sample = float(flops_per_sample)
        self._tokens_per_sample = int(tokens_per_sample)
        self._set(self._planned_steps, planned_steps)

        self.peak_flops, source = peak_flops_for(self.device, precision, self._peak_override)
        if self.peak_flops is not None:
            self._set(self._peak, self.peak_flops)
            logger.info("MFU peak: %.3g FLOP/s from %s", self.peak_flops, source)

        info = {"device": self.device.type, "device_name": "cpu", "precision": precision, "strategy": strategy,
                "world_size": str(world_size)}
        if self.device.type == "cuda":
            # The UUID joins these series with the DCGM exporter's, which carry it in their UUID label.
            info["device_name"] = torch.cuda.get_device_name(self.device)
            info["gpu_uuid"] = f"GPU-{torch.cuda.get_device_properties(self.device).uuid}"
        self._info.info(info)

    def record_step(self, *, step: int, samples: int, loss: float, data_seconds: float,
                    forward_backward_seconds: float, optimizer_seconds: float, batch_bytes: int = 0) -> None:
        """Count one optimizer step of this process: the trial's step number after it, samples, loss, phase times.

        The rate gauges divide the samples of the last THROUGHPUT_WINDOW_STEPS steps
        by the time of their phases, so validation and logging between steps do not
        lower them.
        """
        self._steps.inc()
        self._set(self._step, step)
        self._samples.inc(samples)
        self._tokens.inc(samples * self._tokens_per_sample)
        self._flops.inc(samples * self._flops_per_sample)
        self._set(self._train_loss, loss)
        self._loader_bytes.inc(batch_bytes)
        self._phase["data_wait"].inc(data_seconds)
        self._phase["forward_backward"].inc(forward_backward_seconds)
        self._phase["optimizer"].inc(optimizer_seconds)

        self._window.append((samples, data_seconds + forward_backward_seconds + optimizer_seconds))
        window_seconds = sum(seconds for _, seconds in self._window)
        if window_seconds <= 0:
            return
        samples_per_second = sum(count for count, _ in self._window) / window_seconds
        flops_per_second = samples_per_second * self._flops_per_sample
        self._set(self._samples_rate, samples_per_second)
        self._set(self._tokens_rate, samples_per_second * self._tokens_per_sample)
        self._set(self._flops_rate, flops_per_second)
        if self.peak_flops:
            self._set(self._mfu, flops_per_second / self.peak_flops)

    def record_validation(self, loss: float) -> None:
        """Set the validation loss of the latest evaluation."""
        self._set(self._validation_loss, loss)

    def record_data_source_read(self, nbytes: int, seconds: float) -> None:
        """Count bytes read from the data source and the time it took."""
        self._source_bytes.inc(nbytes)
        self._source_seconds.inc(seconds)

    def record_checkpoint(self, nbytes: int, seconds: float) -> None:
        """Count one checkpoint written: its size and the time it took."""
        self._checkpoints.inc()
        self._checkpoint_bytes.inc(nbytes)
        self._checkpoint_seconds.inc(seconds)

    def record_collective(self, kind: str, nbytes: int, seconds: float) -> None:
        """Count one collective of this rank: `kind` from COLLECTIVE_KINDS, payload bytes, launch-to-completion time.

        Safe to call from communication threads and future callbacks.
        """
        if kind not in COLLECTIVE_KINDS:
            raise ValueError(f"unknown collective kind {kind!r}; expected one of {', '.join(COLLECTIVE_KINDS)}")
        labels = {**self.labels, "kind": kind}
        self._collectives.labels(**labels).inc()
        self._collective_bytes.labels(**labels).inc(nbytes)
        self._collective_seconds.labels(**labels).inc(seconds)

    # Final values ------------------------------------------------------------------

    def final_values(self) -> dict[str, float]:
        """Return every current sample of this process, keyed by metric name and its labels beyond LABELS.

        Keys read like the exposition format, e.g.
        'wxscale_trainer_step_phase_seconds_total{phase="data_wait"}'.
        """
        values: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                extra = {key: value for key, value in sample.labels.items() if key not in LABELS}
                if extra:
                    key = sample.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(extra.items())) + "}"
                else:
                    key = sample.name
                values[key] = float(sample.value)
        return values

    def final_record(self) -> dict[str, Any]:
        """Return the final values of every rank for the result record; a collective when the trial is distributed.

        Every rank must call it at the same point of the trial.
        """
        own = {"rank": int(self.labels["rank"]), "node": self.labels["node"], "metrics": self.final_values()}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, own)
            ranks = sorted(gathered, key=lambda entry: entry["rank"])
        else:
            ranks = [own]
        return {"ranks": ranks}

    def push(self, gateway: str, timeout: float = 10.0) -> bool:
        """Push the current values to a Prometheus pushgateway, grouped by study, trial and rank.

        Returns False, after logging a warning, when the push fails, so that a
        trial does not fail because its metrics could not be pushed.
        """
        grouping = {key: self.labels[key] for key in ("study", "trial", "rank")}
        try:
            push_to_gateway(gateway, job=PUSHGATEWAY_JOB, grouping_key=grouping, registry=self.registry,
                            timeout=timeout)
        except (OSError, ValueError) as error:  # connection and HTTP errors, or an invalid URL
            logger.warning("could not push the final metrics to the pushgateway %s: %s", gateway, error)
            return False
        logger.info("pushed the final metrics of rank %s to %s", self.labels["rank"], gateway)
        return True

