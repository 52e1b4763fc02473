"""Shared pieces of the benchmarks: the result row, the machine description, timing and a moto S3 server.

Every benchmark module has `run(mode) -> list[Result]`, with mode 'tiny' (a
seconds-long smoke run for the tests), 'quick' or 'full'. A Result carries the
measured value and its reference (a rival implementation, a physical limit or
a goal), and the ratio between the two, so that numbers from noisy machines
stay comparable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

logger = logging.getLogger(__name__)

MODES = ("tiny", "quick", "full")


@dataclass
class Result:
    """One measured figure and its ratio to a reference or a limit.

    `ratio` is value / reference. `goal` states what the ratio should be (e.g.
    '>= 0.8'), and `met` whether it is; both are None for figures without a goal.
    """

    benchmark: str
    metric: str
    value: float
    unit: str
    reference: str
    reference_value: float | None
    goal: str | None = None
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference_value in (None, 0):
            return None
        return self.value / self.reference_value

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def check_goal(ratio: float | None, goal: str | None) -> bool | None:
    """Return whether `ratio` meets a goal written as '>= x' or '<= x'; None when either is missing."""
    if ratio is None or goal is None:
        return None
    operator, bound = goal.split()
    return ratio >= float(bound) if operator == ">=" else ratio <= float(bound)


def result(benchmark: str, metric: str, value: float, unit: str, reference: str, reference_value: float | None,
           goal: str | None = None, note: str = "") -> Result:
    """Return a Result with `met` computed from the goal."""
    row = Result(benchmark, metric, value, unit, reference, reference_value, goal, None, note)
    row.met = check_goal(row.ratio, goal)
    return row


def median_seconds(function: Callable[[], Any], repeats: int) -> float:
    """Return the median wall time of `repeats` calls of `function`, in seconds."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    """Return the CPU model, core count, memory, load and software versions of this machine."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_gb = None
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                memory_gb = int(line.split()[1]) / 1024**2
                break
    import torch

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(memory_gb, 1) if memory_gb else None,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Run a moto S3 server in its own process on 127.0.0.1; yield its endpoint URL; stop it by PID.

    A separate process keeps the server's CPU time out of the measured process,
    as a real object store would. Credentials for it go into the environment.
    """
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited with code {process.returncode}")
            time.sleep(0.1)
        else:
            raise RuntimeError(f"moto server did not listen on {endpoint} within 60 s")
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def format_number(value: float | None, unit: str = "") -> str:
    """Return a compact number: 3 significant digits, with the unit."""
    if value is None:
        return "-"
    text = f"{value:.3g}" if abs(value) < 1e5 else f"{value:.3e}"
    return f"{text} {unit}".strip()


def format_table(results: list[Result]) -> str:
    """Return the results as a Markdown table: figure, reference, ratio and goal."""
    header = "| benchmark | metric | value | reference | ratio | goal | met | note |"
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results:
        reference = row.reference
        if row.reference_value is not None:
            reference += f" ({format_number(row.reference_value, row.unit)})"
        met = {True: "yes", False: "**no**", None: ""}[row.met]
        ratio = "-" if row.ratio is None else f"{row.ratio:.3g}"
        lines.append(f"| {row.benchmark} | {row.metric} | {format_number(row.value, row.unit)} | {reference} | "
                     f"{ratio} | {row.goal or ''} | {met} | {row.note} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class QuickstartModel:
    """One distinct model of the quickstart study, with the shapes and CPU threads its trials train with."""

    spec: Any  # wxscale.spec.ModelSpec
    grid: tuple[int, int]
    in_channels: int
    out_channels: int
    batch: int
    threads: int

    @property
    def label(self) -> str:
        return f"depth {self.spec.depth}, heads {self.spec.heads}, width {self.spec.embed_dim}"


def quickstart_models() -> list[QuickstartModel]:
    """Plan examples/quickstart.yaml and return its distinct models, smallest first.

    `threads` is what `wxscale run` gives each trial on this machine: the cores
    divided by the trials that run at once (spec.maxConcurrentTrials).
    """
    from pathlib import Path

    from wxscale.planner import plan
    from wxscale.study import load_study

    study = load_study(Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml")
    models: dict[str, QuickstartModel] = {}
    for trial in plan(study):
        config = trial.config
        variables = len(trial.variables)
        threads = max(1, (os.cpu_count() or 1) // (study.spec.max_concurrent_trials * config.distributed.world_size))
        models.setdefault(config.model.model_dump_json(), QuickstartModel(
            spec=config.model, grid=tuple(trial.grid), in_channels=config.data.history * variables,
            out_channels=variables, batch=config.training.batch_size, threads=threads))
    return sorted(models.values(), key=lambda model: model.spec.depth * model.spec.embed_dim**2)
