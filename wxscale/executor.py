"""Run a study's trials on this machine as torchrun processes.

Each trial runs the same entry point a PyTorchJob pod runs (`python -m
wxscale_trainer`) under `torch.distributed.run`, so it gets the same
environment variables (RANK, WORLD_SIZE, MASTER_ADDR, ...). At most
`maxConcurrentTrials` run at once. A trial whose result record already
exists is not run again, which makes a re-run resume. Ctrl-C stops the
running trials and keeps everything finished.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from wxscale.planner import Trial
from wxscale.spec import ScalingStudy
from wxscale.status import build_status
from wxscale.storage import Location
from wxscale.trialspec import TrialSpec, trial_folder

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 20


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_commands(trial: Trial, trial_url: str, output_url: str, s3_endpoint: str | None) -> list[list[str]]:
    """Return one torchrun command per node of the trial, all on this machine.

    A single-node trial uses `--standalone`. Several nodes rendezvous through
    c10d on a free port of 127.0.0.1, each command with its own --node-rank,
    which is how a multi-node PyTorchJob's pods meet.
    """
    layout = trial.config.distributed
    trainer = ["-m", "wxscale_trainer", "--trial", trial_url, "--output", output_url]
    if s3_endpoint:
        trainer += ["--s3-endpoint", s3_endpoint]
    base = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={layout.procs_per_node}",
            "--max-restarts=0"]
    if layout.nodes == 1:
        return [base + ["--standalone", "--nnodes=1", *trainer]]
    port = free_port()
    return [
        base + [f"--nnodes={layout.nodes}", f"--node-rank={rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={trial.id}", *trainer]
        for rank in range(layout.nodes)
    ]


@dataclass
class TrialRun:
    """Bookkeeping of one trial in this run of the study."""

    trial: Trial
    state: str = "Pending"
    attempts: int = 0
    record: dict[str, Any] | None = None
    processes: list[subprocess.Popen] = field(default_factory=list)


class LocalExecutor:
    """Runs the trials of one study and keeps `status.json` current."""

    def __init__(self, study: ScalingStudy, trials: list[Trial], output: Location, log_folder: Path,
                 s3_endpoint: str | None = None, retry_failed: bool = False, progress: bool = True):
        self.study = study
        self.spec = study.spec
        self.output = output
        self.log_folder = log_folder
        self.s3_endpoint = s3_endpoint
        self.retry_failed = retry_failed
        self.progress = progress
        self.runs = {trial.id: TrialRun(trial) for trial in trials}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._previous_status: dict[str, Any] | None = None

    # Resume ------------------------------------------------------------------

    def load_finished(self) -> None:
        """Mark trials whose result record exists as finished, so they are not run again."""
        for run in self.runs.values():
            path = f"{trial_folder(run.trial.id)}/result.json"
            if not self.output.exists(path):
                continue
            record = self.output.read_json(path)
            if record.get("state") == "Failed" and self.retry_failed:
                logger.info("trial %s failed before; running it again (--retry-failed)", run.trial.id)
                continue
            run.record = record
            run.state = record.get("state", "Succeeded")
        finished = sum(1 for r in self.runs.values() if r.state in ("Succeeded", "Failed"))
        if finished:
            logger.info("resuming: %d of %d trials already finished in %s", finished, len(self.runs), self.output)

    # Status ------------------------------------------------------------------

    def status(self, fit: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._lock:
            states = {run.trial.id: run.state for run in self.runs.values()}
            records = {run.trial.id: run.record for run in self.runs.values() if run.record}
        status = build_status(
            [run.trial for run in self.runs.values()], states, records, fit=fit,
            previous=self._previous_status, max_failed=self.spec.max_failed_trials,
        )
        self._previous_status = status
        return status

    def failed_records(self) -> list[dict[str, Any]]:
        """Return the result records of failed trials, in trial order."""
        with self._lock:
            runs = sorted(self.runs.values(), key=lambda run: run.trial.index)
            return [run.record for run in runs if run.state == "Failed" and run.record]

    def write_status(self, fit: dict[str, Any] | None = None) -> dict[str, Any]:
        status = self.status(fit)
        self.output.write_json("status.json", {"apiVersion": self.study.api_version, "kind": self.study.kind,
                                               "metadata": {"name": self.study.metadata.name}, "status": status})
        return status

    # Running -----------------------------------------------------------------

    def _failed_count(self) -> int:
        return sum(1 for run in self.runs.values() if run.state == "Failed")

    def _launch(self, run: TrialRun) -> tuple[int, str]:
        """Run one attempt of a trial; return (exit code, tail of its log)."""
        trial = run.trial
        spec = TrialSpec.from_trial(self.study.metadata.name, trial)
        self.output.remove(f"{trial_folder(trial.id)}/error.json")
        trial_url = self.output.write_json(f"{trial_folder(trial.id)}/trial.json", spec.to_dict())

        env = dict(os.environ)
        world_here = trial.config.distributed.world_size
        env["WXSCALE_CPU_THREADS"] = str(max(1, (os.cpu_count() or 1) //
                                             (self.spec.max_concurrent_trials * world_here)))
        env.setdefault("PYTHONUNBUFFERED", "1")

        self.log_folder.mkdir(parents=True, exist_ok=True)
        log_path = self.log_folder / f"{trial.id}.log"
        with open(log_path, "ab") as log:
            log.write(f"\n=== attempt {run.attempts} of trial {trial.id} ===\n".encode())
            log.flush()
            processes = [
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                for command in torchrun_commands(trial, trial_url, self.output.url, self.s3_endpoint)
            ]
            with self._lock:
                run.processes = processes
            codes = [process.wait() for process in processes]
        with self._lock:
            run.processes = []
        code = next((c for c in codes if c != 0), 0)
        lines = log_path.read_text(errors="replace").splitlines()
        return code, "\n".join(lines[-LOG_TAIL_LINES:])

    def _run_trial(self, run: TrialRun) -> None:
        """Run a trial with retries; leave its final state and record on `run`."""
        retries = self.spec.max_retries
        error = ""
        while run.attempts <= retries and not self._stopping.is_set():
            run.attempts += 1
            with self._lock:
                run.state = "Running"
            code, tail = self._launch(run)
            if self._stopping.is_set():
                with self._lock:
                    run.state = "Pending"
                return
            result_path = f"{trial_folder(run.trial.id)}/result.json"
            if code == 0 and self.output.exists(result_path):
                record = self.output.read_json(result_path)
                record["attempts"] = run.attempts
                with self._lock:
                    run.record, run.state = record, "Succeeded"
                return
            error = self._error_message(run, code, tail)
            logger.warning("trial %s attempt %d/%d failed: %s", run.trial.id, run.attempts, retries + 1,
                           error.splitlines()[0] if error else f"exit code {code}")

        record = {
            "apiVersion": self.study.api_version, "kind": "TrialResult", "study": self.study.metadata.name,
            "trial": run.trial.id, "index": run.trial.index, "state": "Failed", "error": error,
            "attempts": run.attempts, "axisValues": run.trial.axis_values, "config": run.trial.config.dump(),
        }
        self.output.write_json(f"{trial_folder(run.trial.id)}/result.json", record)
        with self._lock:
            run.record, run.state = record, "Failed"

    def _error_message(self, run: TrialRun, code: int, tail: str) -> str:
        error_path = f"{trial_folder(run.trial.id)}/error.json"
        if self.output.exists(error_path):
            return self.output.read_json(error_path).get("error", "")
        return f"exit code {code}; last log lines ({self.log_folder / (run.trial.id + '.log')}):\n{tail}"

    def stop_running(self) -> None:
        """Terminate every running trial's process group (SIGTERM, then SIGKILL after 10 s)."""
        self._stopping.set()
        with self._lock:
            processes = [p for run in self.runs.values() for p in run.processes]
        for process in processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def run(self) -> dict[str, Any]:
        """Run every unfinished trial; return the final status (without fits)."""
        self.load_finished()
        todo = [run for run in self.runs.values() if run.state not in ("Succeeded", "Failed")]
        self.write_status()
        bar = tqdm(total=len(self.runs), initial=len(self.runs) - len(todo), unit="trial",
                   desc=self.study.metadata.name, disable=not self.progress, file=sys.stderr)
        pool = ThreadPoolExecutor(max_workers=self.spec.max_concurrent_trials, thread_name_prefix="trial")
        pending = list(todo)
        active: dict[Future, TrialRun] = {}
        try:
            while pending or active:
                while pending and len(active) < self.spec.max_concurrent_trials and not self._stopping.is_set():
                    run = pending.pop(0)
                    active[pool.submit(self._run_trial, run)] = run
                if not active:
                    break
                finished, _ = wait(active, return_when=FIRST_COMPLETED)
                for future in finished:
                    run = active.pop(future)
                    future.result()
                    bar.update(1)
                    bar.set_postfix_str(f"{run.trial.id} {run.state.lower()}")
                self.write_status()
                if self._failed_count() > self.spec.max_failed_trials and not self._stopping.is_set():
                    logger.error("%d trial(s) failed, more than maxFailedTrials=%d: stopping the study",
                                 self._failed_count(), self.spec.max_failed_trials)
                    self.stop_running()
                    pending.clear()
        except KeyboardInterrupt:
            logger.warning("interrupted: stopping running trials; finished results are kept in %s", self.output)
            self.stop_running()
            raise
        finally:
            pool.shutdown(wait=True)
            bar.close()
            self.write_status()
        return self.status()


def collect_records(output: Location) -> list[dict[str, Any]]:
    """Read every trial's result record under an output location."""
    records = []
    for relative in output.list_json("trials/*/result.json"):
        try:
            records.append(output.read_json(relative))
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("skipping unreadable result %s: %s", relative, error)
    return sorted(records, key=lambda r: r.get("index", 0))


def default_log_folder(output: Location) -> Path:
    """Local folder for trial logs: beside the results, or in a temp folder for s3:// outputs."""
    if output.is_local:
        return Path(output.url) / "logs"
    return Path(tempfile.gettempdir()) / "wxscale-logs" / output.url.replace("://", "_").replace("/", "_")
