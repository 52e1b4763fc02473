"""Operator: time and Kubernetes API calls to fan a study of 10, 100 and 1,000 trials out into PyTorchJobs.

The real operator (`wxscale_operator`, kopf) runs in a thread against the kmock
API emulator of the test suite (tests/kube_helpers.py), over HTTP on
127.0.0.1, with a moto S3 server (its own process) for the output location.
A study whose axis has N seeds and maxConcurrentTrials N is created, and the
clock runs until N PyTorchJobs exist. The emulator counts every request that
is not the benchmark's own polling, watch streams included.

Goals: O(1) API calls per trial, so the calls per trial stay flat from 10 to
1,000 trials (the limit used is 10 per trial), and 1,000 trials fanned out in
under 60 s.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from benchmarks.common import Result, free_port, moto_server, result

NAME = "operator"
REPO = Path(__file__).resolve().parents[1]
SIZES = {"tiny": (5,), "quick": (10, 100), "full": (10, 100, 1000)}
CALLS_PER_TRIAL_LIMIT = 10.0
FANOUT_LIMIT_SECONDS = 60.0
BUCKET = "fanout"


class RequestCounter:
    """Requests the emulator served, by method, without those of the benchmark's own HTTP client.

    It also counts PyTorchJob creations and keeps the time of the latest, so the
    benchmark waits for the jobs without listing them over HTTP, which would
    load the emulator that the operator is talking to.
    """

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.jobs_created = 0
        self.last_job_created = 0.0
        self.handler_seconds = 0.0  # time the emulator spent handling the counted requests, watches left out
        self._lock = threading.Lock()

    def add(self, method: str, path: str, seconds: float) -> None:
        with self._lock:
            self.counts[method] += 1
            self.handler_seconds += seconds
            if method == "POST" and path.endswith("/pytorchjobs"):
                self.jobs_created += 1
                self.last_job_created = time.perf_counter()

    def snapshot(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(self.counts)


@contextlib.contextmanager
def counting_cluster(namespaces: tuple[str, ...], counter: RequestCounter) -> Iterator[Any]:
    """Start the test suite's FakeCluster with an emulator that counts requests; stop it on exit."""
    sys.path.insert(0, str(REPO / "tests"))
    import kube_helpers

    base = kube_helpers.ApiEmulator

    class CountingEmulator(base):
        async def _handle(self, request):  # type: ignore[override]
            began = time.perf_counter()
            response = await super()._handle(request)
            agent = request.headers.get("User-Agent", "") if request.headers else ""
            if not agent.startswith("Python-urllib"):
                method = str(request.method.value if hasattr(request.method, "value") else request.method)
                watch = str((request.params or {}).get("watch", "")).lower() == "true"
                counter.add(method.upper(), request.url.path, 0.0 if watch else time.perf_counter() - began)
            return response

    kube_helpers.ApiEmulator = CountingEmulator
    cluster = kube_helpers.FakeCluster(namespaces=namespaces)
    try:
        cluster.start()
        yield cluster, kube_helpers
    finally:
        kube_helpers.ApiEmulator = base
        cluster.stop()


def study_document(name: str, namespace: str, trials: int) -> dict[str, Any]:
    return {
        "apiVersion": "wxscale.io/v1alpha1",
        "kind": "ScalingStudy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "data": {"source": "synthetic", "synthetic": {"lat": 16, "lon": 32, "steps": 400},
                     "train": {"start": "2000-01-01", "end": "2000-02-28T18:00"},
                     "validation": {"start": "2000-03-01", "end": "2000-03-31T18:00"},
                     "test": {"start": "2000-04-01", "end": "2000-04-30T18:00"}},
            "model": {"depth": 1, "heads": 2, "embedDim": 32},
            "training": {"batchSize": 8, "budget": {"samples": 800}},
            "axes": [{"field": "training.seed", "values": list(range(trials))}],
            "maxConcurrentTrials": trials,
            "output": f"s3://{BUCKET}/{namespace}/{name}",
            "cluster": {"image": "localhost/wxscale:bench", "resources": {"gpus": 1, "cpu": "4", "memory": "8Gi"}},
        },
    }


def fan_out(cluster: Any, helpers: Any, counter: RequestCounter, endpoint: str, trials: int,
            timeout: float) -> dict[str, Any]:
    """Run the operator on a fresh namespace, create a study of `trials` trials, wait for its jobs."""
    from wxscale_operator.config import OperatorConfig

    namespace = f"fanout-{trials}"
    config = OperatorConfig(namespaces=(namespace,), s3_endpoint=endpoint, resync_seconds=30.0,
                            backoff_seconds=1.0, max_backoff_seconds=2.0, liveness_port=free_port(),
                            metrics_port=free_port(), bind_address="127.0.0.1")
    operator = helpers.OperatorThread(config, fit=lambda records: None).start()
    try:
        time.sleep(1.0)  # let the watches settle, so their start-up requests are not counted
        before = counter.snapshot()
        handler_before = counter.handler_seconds
        created_before = counter.jobs_created
        began = time.perf_counter()
        cluster.create(helpers.STUDIES, namespace, study_document(f"study{trials}", namespace, trials))
        helpers.wait_for(lambda: counter.jobs_created - created_before >= trials, timeout=timeout, interval=0.1,
                         what=f"{trials} PyTorchJobs")
        seconds = counter.last_job_created - began
        # Let the pass that created the last jobs write its status before counting.
        time.sleep(1.0)
        calls = counter.snapshot() - before
        handler_seconds = counter.handler_seconds - handler_before
        listed = len(cluster.list(helpers.JOBS, namespace))
        if listed != trials:
            raise AssertionError(f"{listed} PyTorchJobs exist in {namespace}, expected {trials}")
    finally:
        operator.stop()
    return {"seconds": seconds, "calls": calls, "emulator_seconds": handler_seconds}


def run(mode: str = "quick") -> list[Result]:
    """Fan out studies of the sizes of `mode`; one result row for time and one for API calls per size."""
    sizes = SIZES[mode]

    # The operator's first reconcile imports the planner and with it torch and xarray, several seconds once per
    # process. Planning a small study here first keeps that start-up cost out of the fan-out times.
    from wxscale.planner import plan
    from wxscale.spec import ScalingStudy

    plan(ScalingStudy.model_validate(study_document("warm-up", "default", 2)))

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    counter = RequestCounter()
    results: list[Result] = []
    with moto_server() as endpoint:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        namespaces = tuple(f"fanout-{size}" for size in sizes)
        with counting_cluster(namespaces, counter) as (cluster, helpers):
            os.environ["KUBECONFIG"] = str(cluster.write_kubeconfig(Path(tempfile_dir()) / "kubeconfig.json"))
            for size in sizes:
                figures = fan_out(cluster, helpers, counter, endpoint, size, timeout=max(120.0, size * 0.5))
                calls = sum(figures["calls"].values())
                by_method = ", ".join(f"{method} {count}" for method, count in sorted(figures["calls"].items()))
                results.append(result(NAME, f"fan-out time, {size} trials", figures["seconds"], "s", "limit",
                                      FANOUT_LIMIT_SECONDS, "<= 1" if size == 1000 else None,
                                      f"{figures['seconds'] / size * 1000:.0f} ms per trial, of which the "
                                      f"emulator's request handling {figures['emulator_seconds'] / size * 1000:.0f} ms"))
                results.append(result(NAME, f"API calls per trial, {size} trials", calls / size, "calls", "limit",
                                      CALLS_PER_TRIAL_LIMIT, "<= 1", f"{calls} calls: {by_method}"))
    return results


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="wxscale-bench-kube-")

