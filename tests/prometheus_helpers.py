"""Test helpers: a real Prometheus and pushgateway on 127.0.0.1, and a study whose metrics Prometheus scraped.

The binaries come from Debian's `prometheus` and `prometheus-pushgateway`
packages (scripts/system-tools.sh installs them); tests that need one skip with
the reason when it is missing. Every process started here is stopped by its PID.

`scraped_study` is a session fixture: import it into a test module to use it.
It runs the whole path once. The operator runs against the Kubernetes API
emulator and a moto S3 server, a ScalingStudy is created, a real two-process
DDP trial runs on CPU with its metrics endpoints, and a Prometheus scrapes the
trainer ranks and the operator's metrics endpoint every second.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import REPO

SCRAPE_INTERVAL = "1s"
GPU_METRIC = re.compile(r"wxscale_trainer_(gpu|device_memory)_")


def binary(name: str) -> str:
    """Return the path of a Prometheus binary, or skip the test with the reason."""
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not found on PATH (Debian package prometheus or prometheus-pushgateway; "
                    "scripts/system-tools.sh installs them)")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_range(count: int) -> int:
    """Return a port P such that P .. P + count - 1 are free on 127.0.0.1 now."""
    for _ in range(50):
        base = free_port()
        sockets = []
        try:
            for offset in range(count):
                probe = socket.socket()
                sockets.append(probe)
                probe.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
    raise RuntimeError(f"no {count} consecutive free ports found on 127.0.0.1")


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def wait_until_ready(url: str, process: subprocess.Popen, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode} before it was ready")
        try:
            http_get(url, timeout=1.0)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"{name} was not ready at {url} after {timeout:.0f} s")


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process started by a test: SIGTERM to its PID, SIGKILL if it has not exited after `timeout`."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


class PromQLError(AssertionError):
    """Prometheus rejected a query."""


class PrometheusServer:
    """`prometheus` on 127.0.0.1 with a generated scrape config and its own storage folder."""

    def __init__(self, folder: Path, jobs: dict[str, list[str]]):
        self.folder = folder
        self.jobs = jobs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> PrometheusServer:
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                       "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}
                               for job, targets in self.jobs.items()],
        }
        config_path = self.folder / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        with open(self.folder / "prometheus.log", "wb") as log:
            self.process = subprocess.Popen(
                [binary("prometheus"), f"--config.file={config_path}", f"--storage.tsdb.path={self.folder / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=subprocess.DEVNULL, stderr=log)
        wait_until_ready(f"{self.url}/-/ready", self.process, "prometheus")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def api(self, path: str, **params: Any) -> Any:
        """Call the HTTP API; return `data`, or raise PromQLError with Prometheus's error."""
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            body = http_get(f"{self.url}/api/v1/{path}?{query}", timeout=10.0)
        except urllib.error.HTTPError as error:
            body = error.read()
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise PromQLError(f"{answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Evaluate an instant query (at `at`, Unix seconds, else now); return its series."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for(self, expr: str, timeout: float, description: str) -> float:
        """Poll `expr` until it returns a series; return the evaluation time that did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            at = time.time()
            if self.query(expr, at):
                return at
            time.sleep(0.5)
        raise AssertionError(f"Prometheus never returned {description} ({expr}) within {timeout:.0f} s")


class Pushgateway:
    """`prometheus-pushgateway` on 127.0.0.1, without persistence."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> Pushgateway:
        with open(self.folder / "pushgateway.log", "wb") as log:
            self.process = subprocess.Popen(
                [binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=subprocess.DEVNULL, stderr=log)
        wait_until_ready(f"{self.url}/-/ready", self.process, "prometheus-pushgateway")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def promtool_check_metrics(exposition: bytes) -> subprocess.CompletedProcess[str]:
    """Run `promtool check metrics` on an exposition; it exits non-zero and lists the names that break a rule."""
    return subprocess.run([binary("promtool"), "check", "metrics"], input=exposition.decode(), capture_output=True,
                          text=True, timeout=30)


# Dashboards ------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str

    @property
    def id(self) -> str:
        return f"{self.dashboard.removesuffix('.json')}:{self.panel}:{self.ref_id}"

    @property
    def needs_gpu(self) -> bool:
        return bool(GPU_METRIC.search(self.expr))

    @property
    def reads_operator(self) -> bool:
        return "wxscale_operator_" in self.expr


def panels(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield every panel of a dashboard, those inside collapsed rows too."""
    for panel in document.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []


def dashboard_queries(folder: Path) -> list[PanelQuery]:
    """Return the PromQL expression of every panel target of every dashboard JSON file in `folder`."""
    found = []
    for path in sorted(folder.glob("*.json")):
        document = json.loads(path.read_text())
        for panel in panels(document):
            for target in panel.get("targets") or []:
                found.append(PanelQuery(path.name, panel["title"], target["refId"], target["expr"]))
    return found


def grafana_to_promql(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana's variables in an expression as Grafana would before sending it to Prometheus.

    `variables` contains the dashboard variables (study, trial); $__rate_interval
    and $__range become fixed windows that cover a short trial scraped every second.
    """
    values = {"__rate_interval": "30s", "__range": "10m", "__interval": "1s", **variables}
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
    leftover = re.search(r"\$\{?\w+", expr)
    if leftover:
        raise AssertionError(f"unknown Grafana variable {leftover.group(0)} in {expr}")
    return expr


# The scraped study -----------------------------------------------------------------

NAMESPACE = "telemetry"
STUDY = "telemetry-test"
BUCKET = "telemetry"
STEPS = 300


def study_document() -> dict[str, Any]:
    """A tiny study of two trials (30 and 400 steps); on two GPUs the trials run there, else on CPU."""
    device = "cuda" if torch.cuda.device_count() >= 2 else "cpu"
    return {
        "apiVersion": "wxscale.io/v1alpha1", "kind": "ScalingStudy",
        "metadata": {"name": STUDY, "namespace": NAMESPACE},
        "spec": {
            "data": {"source": "synthetic", "synthetic": {"lat": 16, "lon": 32, "steps": 400},
                     "train": {"start": "2000-01-01", "end": "2000-02-28T18:00"},
                     "validation": {"start": "2000-03-01", "end": "2000-03-31T18:00"},
                     "test": {"start": "2000-04-01", "end": "2000-04-30T18:00"}},
            "model": {"patchSize": 4, "depth": 1, "heads": 2, "embedDim": 32},
            "training": {"batchSize": 8, "budget": {"steps": STEPS}, "evalEvery": 10, "evalBatches": 2,
                         "device": device, "numThreads": 1},
            "distributed": {"procsPerNode": 2},
            "axes": [{"field": "training.budget.steps", "values": [STEPS, 600]}],
            "maxConcurrentTrials": 2,
            "maxRetries": 1,
            "output": f"s3://{BUCKET}/{NAMESPACE}/{STUDY}",
            "cluster": {"resources": {"gpus": 1}},
        },
    }


@dataclass
class ScrapedStudy:
    """What the scraped_study fixture ran, and the times at which to query its series."""

    prometheus: PrometheusServer
    study: str
    trial: str
    record: dict[str, Any]
    trainer_time: float  # the trainer ranks were up and had done every step
    operator_time: float  # the operator had collected the trial's result

    @property
    def on_gpu(self) -> bool:
        return self.record["training"]["device"] == "cuda"

    def time_for(self, expr: str) -> float:
        return self.operator_time if "wxscale_operator_" in expr else self.trainer_time


def _run_trainer(trial_file: Path, output: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "wxscale_trainer", "--trial", str(trial_file), "--output", str(output),
               "--metrics-port", str(port), "--metrics-address", "127.0.0.1", "--metrics-linger", "8"]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as stream:
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=stream, stderr=subprocess.STDOUT)


def _stop_all(stops: list[Any]) -> None:
    while stops:
        stops.pop()()


@pytest.fixture(scope="module")
def scraped_study(tmp_path_factory) -> Iterator[ScrapedStudy]:
    """Run the operator, a DDP trial and Prometheus once per module (about 30 s on 2 CPU cores).

    Everything but Prometheus stops before the tests run: they query fixed times in its storage.
    """
    binary("prometheus")
    import boto3
    from moto.server import ThreadedMotoServer
    from prometheus_client import start_http_server

    from kube_helpers import JOBS, STUDIES, FakeCluster, OperatorThread, wait_for
    from wxscale.planner import plan
    from wxscale.spec import ScalingStudy
    from wxscale.trialspec import TrialSpec, trial_folder
    from wxscale_operator.config import OperatorConfig
    from wxscale_operator.naming import TRIAL_LABEL

    folder = tmp_path_factory.mktemp("telemetry")
    saved = {key: os.environ.get(key) for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                  "AWS_DEFAULT_REGION", "KUBECONFIG")}
    stops: list[Any] = []  # called in reverse order
    prometheus: PrometheusServer | None = None
    try:
        # The trial the trainer runs: the shorter one of the study's plan, long enough to span several scrapes.
        document = study_document()
        trials = plan(ScalingStudy.model_validate(document))
        trial = next(item for item in trials if item.steps == STEPS)
        other = next(item for item in trials if item.steps != STEPS)
        trial_file = folder / "trial.json"
        trial_file.write_text(json.dumps(TrialSpec.from_trial(STUDY, trial).to_dict()))

        # S3, the API emulator and the operator, whose metrics this process serves.
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1")
        s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        s3_server.start()
        stops.append(s3_server.stop)
        host, s3_port = s3_server.get_host_and_port()
        s3 = boto3.client("s3", endpoint_url=f"http://{host}:{s3_port}")
        s3.create_bucket(Bucket=BUCKET)

        cluster = FakeCluster(namespaces=(NAMESPACE,)).start()
        stops.append(cluster.stop)
        os.environ["KUBECONFIG"] = str(cluster.write_kubeconfig(folder / "kubeconfig.json"))
        config = OperatorConfig(namespaces=(NAMESPACE,), s3_endpoint=f"http://{host}:{s3_port}", resync_seconds=1.0,
                                backoff_seconds=1.0, max_backoff_seconds=2.0, liveness_port=free_port(),
                                bind_address="127.0.0.1")
        operator = OperatorThread(config, fit=lambda records: None).start()
        stops.append(operator.stop)
        operator_port = free_port()
        metrics_server, _ = start_http_server(operator_port, addr="127.0.0.1")
        stops.append(metrics_server.server_close)
        stops.append(metrics_server.shutdown)

        # Prometheus scrapes both trainer ranks (PORT and PORT + 1) and the operator.
        trainer_port = free_port_range(2)
        prometheus = PrometheusServer(folder, {
            "wxscale-trainer": [f"127.0.0.1:{trainer_port}", f"127.0.0.1:{trainer_port + 1}"],
            "wxscale-operator": [f"127.0.0.1:{operator_port}"],
        }).start()

        cluster.create(STUDIES, NAMESPACE, document)
        jobs = wait_for(lambda: len(found := cluster.list(JOBS, NAMESPACE)) == 2 and found, timeout=60,
                        what="the operator creating a PyTorchJob per trial")

        # The trainer, with its endpoints up until 8 s after the trial.
        log = folder / "trainer.log"
        trainer = _run_trainer(trial_file, folder / "output", trainer_port, log)
        stops.append(lambda: stop_process(trainer))
        try:
            trainer_time = prometheus.wait_for(f'count(wxscale_trainer_steps_total{{trial="{trial.id}"}} == {STEPS}) '
                                               f'== 2', timeout=180, description="both ranks at the last step")
        except AssertionError:
            stop_process(trainer)
            raise AssertionError(f"trainer log:\n{log.read_text()[-4000:]}") from None
        # A counter born in the last scrape (a collective's, on a fast trial) needs two samples for rate().
        time.sleep(3.0)
        trainer_time += 3.0
        assert len(prometheus.query('up{job="wxscale-trainer"} == 1', trainer_time)) == 2, "trainer endpoints down"
        assert trainer.wait(timeout=120) == 0, f"trainer failed:\n{log.read_text()[-4000:]}"
        result_path = folder / "output" / trial_folder(trial.id) / "result.json"
        record = json.loads(result_path.read_text())

        # The operator collects the result from S3 and retries the other trial after its job fails.
        s3.upload_file(str(result_path), BUCKET, f"{NAMESPACE}/{STUDY}/{trial_folder(trial.id)}/result.json")
        other_job = next(job for job in jobs if job["metadata"]["labels"][TRIAL_LABEL] == other.id)
        cluster.set_job_condition(NAMESPACE, other_job["metadata"]["name"], "Failed", message="exit code 1")
        operator_time = prometheus.wait_for(
            f'wxscale_operator_study_planned_gpu_seconds{{study="{STUDY}"}} '
            f'and on () wxscale_operator_jobs_retried_total > 0', timeout=60,
            description="the operator's metrics after the result and the retry")
    except BaseException:
        if prometheus is not None:
            prometheus.stop()
        raise
    finally:
        _stop_all(stops)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    try:
        yield ScrapedStudy(prometheus, STUDY, trial.id, record, trainer_time, operator_time)
    finally:
        prometheus.stop()
