"""Operator: time and Kubernetes API calls to fan a study of 10, 100 and 1,000 trials out into PyTorchJobs.

The real operator (`wxscale_operator`, kopf, default settings such as
`--create-concurrency 16`) runs in a thread of the benchmark process. It talks
over HTTP on 127.0.0.1 to the kmock API emulator of the test suite
(tests/kube_helpers.py) and to a moto S3 server for the output location, each
in its own process. A study whose axis has N seeds and maxConcurrentTrials N
is created, and the clock runs from that request until the emulator has
served the Nth PyTorchJob creation. The emulator counts every request that is
not the benchmark's own, watch streams included.

Goals: O(1) API calls per trial, so the calls per trial stay flat from 10 to
1,000 trials (the limit used is 10 per trial), and 1,000 trials fanned out in
under 60 s.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import multiprocessing.context
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from benchmarks.common import Result, free_port, moto_server, result

logger = logging.getLogger(__name__)

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
    load the emulator that the operator is talking to. The figures live in
    shared memory: the emulator process writes them, the benchmark reads them.
    Times are time.perf_counter() values, which on Linux read CLOCK_MONOTONIC,
    one clock for every process of the machine.
    """

    METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE", "OTHER")

    def __init__(self, context: multiprocessing.context.BaseContext) -> None:
        self._counts = context.Array("q", len(self.METHODS), lock=False)
        self._jobs_created = context.Value("q", 0, lock=False)
        self._last_job_created = context.Value("d", 0.0, lock=False)
        # Time the emulator spent handling the counted requests, watches left out.
        self._handler_seconds = context.Value("d", 0.0, lock=False)
        self._lock = context.Lock()

    def add(self, method: str, path: str, seconds: float) -> None:
        index = self.METHODS.index(method) if method in self.METHODS else len(self.METHODS) - 1
        with self._lock:
            self._counts[index] += 1
            self._handler_seconds.value += seconds
            if method == "POST" and path.endswith("/pytorchjobs"):
                self._jobs_created.value += 1
                self._last_job_created.value = time.perf_counter()

    @property
    def jobs_created(self) -> int:
        return self._jobs_created.value

    @property
    def last_job_created(self) -> float:
        return self._last_job_created.value

    @property
    def handler_seconds(self) -> float:
        return self._handler_seconds.value

    def snapshot(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter({method: count for method, count in zip(self.METHODS, self._counts) if count})


def serve_counting_emulator(namespaces: tuple[str, ...], counter: RequestCounter, connection: Any) -> None:
    """Run the test suite's emulator with request counting until the benchmark sends 'stop' (emulator process)."""
    sys.path.insert(0, str(REPO / "tests"))
    import kube_helpers

    class CountingEmulator(kube_helpers.ApiEmulator):
        async def _handle(self, request):  # type: ignore[override]
            began = time.perf_counter()
            response = await super()._handle(request)
            agent = request.headers.get("User-Agent", "") if request.headers else ""
            if not agent.startswith("Python-urllib"):
                method = str(request.method.value if hasattr(request.method, "value") else request.method)
                watch = str((request.params or {}).get("watch", "")).lower() == "true"
                counter.add(method.upper(), request.url.path, 0.0 if watch else time.perf_counter() - began)
            return response

    cluster = kube_helpers.FakeCluster(namespaces=namespaces, emulator_class=CountingEmulator).start()
    try:
        connection.send(cluster.url)
        connection.recv()  # any message, or EOF when the benchmark is gone, stops the emulator
    except EOFError:
        pass
    finally:
        cluster.stop()


@contextlib.contextmanager
def counting_cluster(namespaces: tuple[str, ...]) -> Iterator[tuple[Any, Any, RequestCounter]]:
    """Start the emulator in its own process, as a real API server is; yield a client, kube_helpers and the counter.

    In one process the emulator and the operator would share the GIL, and the
    emulator's CPU time would count as the operator's.
    """
    sys.path.insert(0, str(REPO / "tests"))
    import kube_helpers

    context = multiprocessing.get_context("spawn")
    counter = RequestCounter(context)
    ours, theirs = context.Pipe()
    process = context.Process(target=serve_counting_emulator, args=(namespaces, counter, theirs),
                              name="kmock-emulator", daemon=True)
    process.start()
    try:
        if not ours.poll(60):
            raise RuntimeError(f"the API emulator process (PID {process.pid}) sent no URL within 60 s")
        url = ours.recv()
        yield kube_helpers.ClusterClient(url), kube_helpers, counter
    finally:
        with contextlib.suppress(OSError):
            ours.send("stop")
        process.join(timeout=30)
        if process.is_alive():
            logger.warning("the API emulator process (PID %d) did not stop within 30 s; terminating it", process.pid)
            process.terminate()
            process.join(timeout=10)


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
            timeout: float, namespace: str | None = None, **settings: Any) -> dict[str, Any]:
    """Run the operator on a fresh namespace, create a study of `trials` trials, wait for its jobs.

    `settings` replace OperatorConfig defaults, e.g. create_concurrency=4.
    """
    from wxscale_operator.config import OperatorConfig

    namespace = namespace or f"fanout-{trials}"
    config = OperatorConfig(namespaces=(namespace,), s3_endpoint=endpoint, resync_seconds=30.0,
                            backoff_seconds=1.0, max_backoff_seconds=2.0, liveness_port=free_port(),
                            metrics_port=free_port(), bind_address="127.0.0.1", **settings)
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
    results: list[Result] = []
    with moto_server() as endpoint:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        namespaces = tuple(f"fanout-{size}" for size in sizes)
        with counting_cluster(namespaces) as (cluster, helpers, counter):
            os.environ["KUBECONFIG"] = str(cluster.write_kubeconfig(Path(tempfile_dir()) / "kubeconfig.json"))
            for size in sizes:
                figures = fan_out(cluster, helpers, counter, endpoint, size, timeout=max(120.0, size * 0.5))
                calls = sum(figures["calls"].values())
                by_method = ", ".join(f"{method} {count}" for method, count in sorted(figures["calls"].items()))
                results.append(result(NAME, f"fan-out time, {size} trials", figures["seconds"], "s", "limit",
                                      FANOUT_LIMIT_SECONDS, "<= 1" if size == 1000 else None,
                                      f"{figures['seconds'] / size * 1000:.0f} ms per trial, of which the "
                                      f"emulator's request handling {figures['emulator_seconds'] / size * 1000:.1f} ms"))
                results.append(result(NAME, f"API calls per trial, {size} trials", calls / size, "calls", "limit",
                                      CALLS_PER_TRIAL_LIMIT, "<= 1", f"{calls} calls: {by_method}"))
    return results


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="wxscale-bench-kube-")

