"""End to end: the kopf operator against the kmock API emulator and a moto S3 server, over real HTTP.

Each test runs the real operator (kopf runtime, watch streams, the reconciler)
in a thread, in its own namespace. No training operator exists here, so the
tests play its part: they write job conditions, and the trainer's part: they
put result records into S3.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import boto3
import kopf
import pytest
from moto.server import ThreadedMotoServer

from kube_helpers import EVENTS, JOBS, STUDIES, FakeCluster, OperatorThread, wait_for
from wxscale.planner import Trial, plan
from wxscale.spec import ScalingStudy
from wxscale_operator.config import OperatorConfig
from wxscale_operator.handlers import register
from wxscale_operator.jobs import JobTarget, pytorchjob_manifest
from wxscale_operator.naming import TRIAL_LABEL, job_name

BUCKET = "studies"
NAMESPACES = ("finish", "failing", "retry", "restart", "suspend", "edit", "immutable", "delete", "invalid",
              "multinode", "cli", "conflict", "fanout")

# Planted law for the fake results: test loss = E + A / C^ALPHA, C = training FLOPs.
E, A, ALPHA = 0.1, 2000.0, 0.25


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    saved = {key: os.environ.get(key) for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                  "AWS_DEFAULT_REGION", "KUBECONFIG")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    client.create_bucket(Bucket=BUCKET)
    client.endpoint = f"http://{host}:{port}"
    yield client
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3) -> Iterator[FakeCluster]:
    fake = FakeCluster(namespaces=NAMESPACES).start()
    os.environ["KUBECONFIG"] = str(fake.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config.json"))
    yield fake
    fake.stop()


def small_fit():
    """The real fit with a small start grid and few resamples, so a test waits seconds, not minutes."""
    try:
        from wxscale.fit import StartGrid, fit_study
    except ImportError:
        return None
    return functools.partial(fit_study, n_boot=20, grid=StartGrid.small())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def operator_config(namespace: str, s3: Any) -> OperatorConfig:
    return OperatorConfig(namespaces=(namespace,), s3_endpoint=s3.endpoint, resync_seconds=1.0,
                          backoff_seconds=1.0, max_backoff_seconds=2.0, liveness_port=free_port(),
                          bind_address="127.0.0.1")


@pytest.fixture()
def start_operator(s3, cluster) -> Iterator[Any]:
    running: list[OperatorThread] = []

    def start(namespace: str, config: OperatorConfig | None = None) -> OperatorThread:
        thread = OperatorThread(config or operator_config(namespace, s3), fit=small_fit())
        running.append(thread.start())
        return thread

    yield start
    for thread in running:
        if thread.alive:
            thread.stop()


def study_document(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    document = {
        "apiVersion": "wxscale.io/v1alpha1", "kind": "ScalingStudy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "data": {"source": "synthetic", "synthetic": {"lat": 16, "lon": 32, "steps": 400},
                     "train": {"start": "2000-01-01", "end": "2000-02-28T18:00"},
                     "validation": {"start": "2000-03-01", "end": "2000-03-31T18:00"},
                     "test": {"start": "2000-04-01", "end": "2000-04-30T18:00"}},
            "model": {"depth": 1, "heads": 2, "embedDim": 32},
            "training": {"batchSize": 8, "budget": {"samples": 800}},
            "axes": [{"name": "size", "fields": ["model.depth", "model.heads"], "factors": [1, 2]},
                     {"field": "training.budget.samples", "values": [800, 1600]}],
            "maxConcurrentTrials": 2,
            "output": f"s3://{BUCKET}/{namespace}/{name}",
            "cluster": {"image": "localhost/wxscale:test", "resources": {"gpus": 1, "cpu": "4", "memory": "8Gi"},
                        "credentialsSecret": {"name": "s3-credentials"}},
        },
    }
    document["spec"].update(spec)
    return document


def trials_of(document: dict[str, Any]) -> dict[str, Trial]:
    return {trial.id: trial for trial in plan(ScalingStudy.model_validate(document))}


def planted_loss(trial: Trial) -> float:
    return E + A / trial.total_flops ** ALPHA


def result_record(study: str, trial: Trial) -> dict[str, Any]:
    """A result record with the fields the trainer writes that status and fit read."""
    loss = planted_loss(trial)
    return {
        "apiVersion": "wxscale.io/v1alpha1", "kind": "TrialResult", "study": study, "trial": trial.id,
        "index": trial.index, "state": "Succeeded", "error": None, "axisValues": trial.axis_values,
        "config": trial.config.dump(),
        "model": {"params": trial.params, "nonEmbeddingParams": trial.non_embedding_params},
        "training": {"steps": trial.steps, "samples": trial.samples, "flopsAnalytic": trial.total_flops,
                     "wallSeconds": 120.0},
        "evaluation": {"testLoss": loss, "variables": {"tracer": {"model": {"rmse": math.sqrt(loss)}}}},
    }


def put_json(s3: Any, key: str, document: dict[str, Any]) -> None:
    s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(document).encode())


def get_json(s3: Any, key: str) -> dict[str, Any]:
    return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def reconcile_once(reconciler: Any, namespace: str, name: str) -> None:
    """Run one reconcile pass of a study outside kopf, then close the reconciler's clients."""

    async def one_pass() -> None:
        try:
            await reconciler.reconcile(namespace, name)
        finally:
            await reconciler.close()

    asyncio.run(one_pass())


def jobs_in(cluster: FakeCluster, namespace: str) -> dict[str, dict[str, Any]]:
    return {job["metadata"]["name"]: job for job in cluster.list(JOBS, namespace)}


def status_of(cluster: FakeCluster, namespace: str, name: str) -> dict[str, Any]:
    return (cluster.get(STUDIES, namespace, name) or {}).get("status") or {}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def events_in(cluster: FakeCluster, namespace: str) -> list[str]:
    return [event["reason"] for event in cluster.list(EVENTS, namespace)]


def succeed(cluster: FakeCluster, s3: Any, namespace: str, study: str, job: dict[str, Any],
            trials: dict[str, Trial]) -> None:
    """Play trainer and training operator: write the result record, then mark the job Succeeded."""
    trial = trials[job["metadata"]["labels"][TRIAL_LABEL]]
    put_json(s3, f"{namespace}/{study}/trials/{trial.id}/result.json", result_record(study, trial))
    cluster.set_job_condition(namespace, job["metadata"]["name"], "Running")
    cluster.set_job_condition(namespace, job["metadata"]["name"], "Succeeded")


def fail(cluster: FakeCluster, s3: Any, namespace: str, study: str, job: dict[str, Any], error: str) -> None:
    """Play a trainer that raised: write error.json, then mark the job Failed."""
    trial_id = job["metadata"]["labels"][TRIAL_LABEL]
    put_json(s3, f"{namespace}/{study}/trials/{trial_id}/error.json",
             {"trial": trial_id, "state": "Failed", "error": error})
    cluster.set_job_condition(namespace, job["metadata"]["name"], "Failed", message="exit code 1")


# Tests --------------------------------------------------------------------------------


def test_study_runs_to_success_with_fit(cluster, s3, start_operator):
    namespace, name = "finish", "grid"
    start_operator(namespace)
    document = study_document(name, namespace)
    trials = trials_of(document)
    study = cluster.create(STUDIES, namespace, document)

    # Two jobs (maxConcurrentTrials), owned by the study, with a trial file each.
    jobs = wait_for(lambda: len(jobs_in(cluster, namespace)) == 2 and jobs_in(cluster, namespace), what="2 jobs")
    for job in jobs.values():
        owner = job["metadata"]["ownerReferences"][0]
        assert owner["uid"] == study["metadata"]["uid"]
        assert owner["controller"] is True
        assert owner["blockOwnerDeletion"] is True
        assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}
        trial_id = job["metadata"]["labels"][TRIAL_LABEL]
        assert job["metadata"]["name"] == job_name(name, trial_id)
        trial_file = get_json(s3, f"{namespace}/{name}/trials/{trial_id}/trial.json")
        assert trial_file["trial"] == trial_id
        assert trial_file["steps"] == trials[trial_id].steps
    status = wait_for(lambda: status_of(cluster, namespace, name).get("phase") == "Running"
                      and status_of(cluster, namespace, name), what="phase Running")
    assert status["trials"]["running"] == 2
    assert status["observedGeneration"] == 1
    assert condition(status, "SpecAccepted")["status"] == "True"

    # Finish jobs as they appear until every trial succeeded.
    finished: set[str] = set()
    while len(finished) < len(trials):
        todo = wait_for(lambda: {n: j for n, j in jobs_in(cluster, namespace).items() if n not in finished},
                        what="a new job")
        assert len(todo) <= 2
        for job_id, job in todo.items():
            succeed(cluster, s3, namespace, name, job, trials)
            finished.add(job_id)
    assert len(jobs_in(cluster, namespace)) == len(trials)

    status = wait_for(lambda: (s := status_of(cluster, namespace, name)).get("phase") == "Succeeded" and s,
                      what="phase Succeeded")
    assert status["trialsSucceeded"] == status["trialsTotal"] == 4
    assert status["progress"] == "4/4"
    assert condition(status, "Complete")["status"] == "True"
    assert condition(status, "Complete")["reason"] == "AllTrialsFinished"
    assert condition(status, "Complete")["observedGeneration"] == 1
    assert status["budget"]["flopsSpent"] == pytest.approx(sum(t.total_flops for t in trials.values()))
    assert status["budget"]["gpuHoursSpent"] == pytest.approx(4 * 120.0 / 3600, rel=1e-3)
    best = min(math.sqrt(planted_loss(t)) for t in trials.values())
    assert status["bestTestRMSE"] == pytest.approx(best)
    assert status["active"] == []

    if small_fit() is not None:
        status = wait_for(lambda: (s := status_of(cluster, namespace, name)).get("fit", {}).get("nSucceeded") == 4
                          and s, what="the fit of 4 trials")
        assert status["fittedExponent"] == pytest.approx(ALPHA, abs=0.02)
    reasons = events_in(cluster, namespace)
    created_messages = [event["message"] for event in cluster.list(EVENTS, namespace)
                        if event["reason"] == "TrialCreated"]
    assert 2 <= len(created_messages) <= 4  # one event per pass that created jobs
    for trial_id in trials:
        assert sum(trial_id in message for message in created_messages) == 1
    assert reasons.count("TrialSucceeded") == 4


def test_failures_past_budget_stop_running_jobs(cluster, s3, start_operator):
    namespace, name = "failing", "fragile"
    start_operator(namespace)
    cluster.create(STUDIES, namespace, study_document(name, namespace, maxConcurrentTrials=3, maxFailedTrials=0,
                                                      maxRetries=0))
    jobs = wait_for(lambda: len(jobs_in(cluster, namespace)) == 3 and jobs_in(cluster, namespace), what="3 jobs")
    broken, *others = sorted(jobs.values(), key=lambda job: job["metadata"]["name"])
    cluster.set_job_condition(namespace, others[0]["metadata"]["name"], "Running")
    fail(cluster, s3, namespace, name, broken, "RuntimeError: CUDA out of memory")

    status = wait_for(lambda: (s := status_of(cluster, namespace, name)).get("phase") == "Failed" and s,
                      what="phase Failed")
    assert condition(status, "Failed")["reason"] == "TooManyFailedTrials"
    assert status["trialsFailed"] == 1
    remaining = wait_for(lambda: (j := jobs_in(cluster, namespace)) and len(j) == 1 and j, what="jobs deleted")
    assert list(remaining) == [broken["metadata"]["name"]]

    trial_id = broken["metadata"]["labels"][TRIAL_LABEL]
    record = get_json(s3, f"{namespace}/{name}/trials/{trial_id}/result.json")
    assert record["state"] == "Failed"
    assert record["error"] == "RuntimeError: CUDA out of memory"
    failed_entry = next(r for r in status["results"] if r["trial"] == trial_id)
    assert failed_entry["error"] == "RuntimeError: CUDA out of memory"
    reasons = events_in(cluster, namespace)
    assert "TrialFailed" in reasons
    assert "StudyFailed" in reasons

    # Resync passes create nothing more and, with nothing changed, write nothing.
    version = cluster.get(STUDIES, namespace, name)["metadata"]["resourceVersion"]
    time.sleep(2.5)
    assert list(jobs_in(cluster, namespace)) == [broken["metadata"]["name"]]
    assert cluster.get(STUDIES, namespace, name)["metadata"]["resourceVersion"] == version


def test_retry_then_vanished_job_fails_trial(cluster, s3, start_operator):
    namespace, name = "retry", "flaky"
    start_operator(namespace)
    cluster.create(STUDIES, namespace, study_document(name, namespace, maxConcurrentTrials=1, maxFailedTrials=4,
                                                      maxRetries=1, axes=[]))
    first = wait_for(lambda: list(jobs_in(cluster, namespace).values()), what="the first job")[0]
    trial_id = first["metadata"]["labels"][TRIAL_LABEL]
    fail(cluster, s3, namespace, name, first, "ValueError: loss is NaN")

    retry_name = job_name(name, trial_id, 1)
    retry = wait_for(lambda: cluster.get(JOBS, namespace, retry_name), what="the retry job")
    assert retry["metadata"]["labels"]["wxscale.io/attempt"] == "1"
    assert "TrialRetrying" in events_in(cluster, namespace)
    wait_for(lambda: any(a["job"] == retry_name for a in status_of(cluster, namespace, name).get("active") or []),
             what="the retry in status.active")

    # The retry disappears (deleted by hand): its attempt was the last one, so the trial fails.
    cluster.delete(JOBS, namespace, retry_name)
    status = wait_for(lambda: (s := status_of(cluster, namespace, name)).get("trialsFailed") == 1 and s,
                      what="the trial failed")
    assert status["phase"] == "Succeeded"  # every trial finished, within maxFailedTrials
    record = get_json(s3, f"{namespace}/{name}/trials/{trial_id}/result.json")
    assert "disappeared" in record["error"]
    assert record["attempts"] == 2
    assert cluster.get(JOBS, namespace, job_name(name, trial_id, 2)) is None


def test_restart_neither_duplicates_jobs_nor_loses_results(cluster, s3, start_operator):
    namespace, name = "restart", "durable"
    operator = start_operator(namespace)
    document = study_document(name, namespace)
    trials = trials_of(document)
    cluster.create(STUDIES, namespace, document)
    jobs = wait_for(lambda: len(jobs_in(cluster, namespace)) == 2 and jobs_in(cluster, namespace), what="2 jobs")
    first, second = sorted(jobs)
    succeed(cluster, s3, namespace, name, jobs[first], trials)
    wait_for(lambda: status_of(cluster, namespace, name).get("trialsSucceeded") == 1, what="1 trial succeeded")
    wait_for(lambda: len(jobs_in(cluster, namespace)) == 3, what="a third job")
    operator.stop()

    # While the operator is down, a job finishes.
    succeed(cluster, s3, namespace, name, jobs[second], trials)
    before = set(jobs_in(cluster, namespace))

    start_operator(namespace)
    status = wait_for(lambda: (s := status_of(cluster, namespace, name)).get("trialsSucceeded") == 2 and s,
                      what="2 trials succeeded after the restart")
    jobs_now = jobs_in(cluster, namespace)
    assert len(jobs_now) == 4  # 2 finished + 2 running, none twice
    assert before <= set(jobs_now)
    assert len({job["metadata"]["labels"][TRIAL_LABEL] for job in jobs_now.values()}) == 4
    assert status["trials"]["running"] == 2
    assert {r["trial"] for r in status["results"] if r["state"] == "Succeeded"} == {
        jobs[first]["metadata"]["labels"][TRIAL_LABEL], jobs[second]["metadata"]["labels"][TRIAL_LABEL]}
    version = cluster.get(STUDIES, namespace, name)["metadata"]["resourceVersion"]
    time.sleep(2.5)  # a few resync passes
    assert set(jobs_in(cluster, namespace)) == set(jobs_now)
    assert cluster.get(STUDIES, namespace, name)["metadata"]["resourceVersion"] == version
    assert events_in(cluster, namespace).count("TrialSucceeded") == 2


def test_suspend_and_resume(cluster, s3, start_operator):
    namespace, name = "suspend", "paused"
    start_operator(namespace)
    cluster.create(STUDIES, namespace, study_document(name, namespace))
    jobs = wait_for(lambda: len(jobs_in(cluster, namespace)) == 2 and jobs_in(cluster, namespace), what="2 jobs")

    cluster.patch(STUDIES, namespace, name, {"spec": {"suspend": True}})
    wait_for(lambda: all(j["spec"]["runPolicy"]["suspend"] for j in jobs_in(cluster, namespace).values()),
             what="jobs suspended")
    status = wait_for(lambda: (s := status_of(cluster, namespace, name)).get("phase") == "Suspended" and s,
                      what="phase Suspended")
    assert condition(status, "Suspended")["status"] == "True"
    assert condition(status, "Suspended")["observedGeneration"] == 2

    # A finished job frees a slot, but a suspended study starts nothing.
    trials = trials_of(study_document(name, namespace))
    done = next(iter(jobs.values()))
    succeed(cluster, s3, namespace, name, done, trials)
    wait_for(lambda: status_of(cluster, namespace, name).get("trialsSucceeded") == 1, what="1 trial succeeded")
    time.sleep(2.5)
    assert len(jobs_in(cluster, namespace)) == 2

    cluster.patch(STUDIES, namespace, name, {"spec": {"suspend": False}})
    wait_for(lambda: len(jobs_in(cluster, namespace)) == 3, what="a new job after resuming")
    wait_for(lambda: not any(j["spec"]["runPolicy"]["suspend"] for n, j in jobs_in(cluster, namespace).items()
                             if n != done["metadata"]["name"]), what="unfinished jobs resumed")
    assert {"JobSuspended", "JobResumed"} <= set(events_in(cluster, namespace))


def test_axes_edit_adds_and_retires_trials(cluster, s3, start_operator):
    namespace, name = "edit", "growing"
    start_operator(namespace)
    document = study_document(name, namespace, maxConcurrentTrials=4,
                              axes=[{"field": "training.budget.samples", "values": [800, 1600]}])
    cluster.create(STUDIES, namespace, document)
    jobs = wait_for(lambda: len(jobs_in(cluster, namespace)) == 2 and jobs_in(cluster, namespace), what="2 jobs")
    old_trials = trials_of(document)

    edited = {"axes": [{"field": "training.budget.samples", "values": [800, 2400]}]}
    cluster.patch(STUDIES, namespace, name, {"spec": edited})
    document["spec"].update(edited)
    new_trials = trials_of(document)
    kept, added = set(old_trials) & set(new_trials), set(new_trials) - set(old_trials)
    retired = set(old_trials) - set(new_trials)
    assert len(kept) == len(added) == len(retired) == 1

    def trial_ids() -> set[str]:
        return {job["metadata"]["labels"][TRIAL_LABEL] for job in jobs_in(cluster, namespace).values()}

    wait_for(lambda: trial_ids() == kept | added, what="the retired job deleted and the new one created")
    status = wait_for(lambda: (s := status_of(cluster, namespace, name)).get("observedGeneration") == 2 and s,
                      what="observedGeneration 2")
    assert status["trialsTotal"] == 2
    assert "JobDeleted" in events_in(cluster, namespace)
    assert next(iter(kept)) in {job["metadata"]["labels"][TRIAL_LABEL] for job in jobs.values()}


def test_changed_data_is_reported_and_changes_nothing(cluster, s3, start_operator):
    namespace, name = "immutable", "fixed"
    start_operator(namespace)
    document = study_document(name, namespace)
    cluster.create(STUDIES, namespace, document)
    wait_for(lambda: status_of(cluster, namespace, name).get("specFingerprint"), what="the spec accepted")
    jobs = set(wait_for(lambda: jobs_in(cluster, namespace), what="jobs"))

    # The emulator has no CEL, like a cluster where the rule was bypassed.
    cluster.patch(STUDIES, namespace, name, {"spec": {"data": {"coarsen": 2}}})
    status = wait_for(lambda: (s := status_of(cluster, namespace, name)).get("observedGeneration") == 2 and s,
                      what="observedGeneration 2")
    accepted = condition(status, "SpecAccepted")
    assert accepted["status"] == "False"
    assert accepted["reason"] == "ImmutableFieldChanged"
    assert "spec.data or spec.model changed" in accepted["message"]
    assert status["phase"] == "Running"
    time.sleep(2)
    assert set(jobs_in(cluster, namespace)) == jobs

    cluster.patch(STUDIES, namespace, name, {"spec": {"data": {"coarsen": 1}}})
    wait_for(lambda: condition(status_of(cluster, namespace, name), "SpecAccepted").get("status") == "True",
             what="the spec accepted again")


def test_invalid_spec_fails_with_reason(cluster, s3, start_operator):
    namespace, name = "invalid", "typo"
    start_operator(namespace)
    cluster.create(STUDIES, namespace, study_document(name, namespace, axes=[
        {"field": "model.depht", "values": [1, 2]}]))
    status = wait_for(lambda: (s := status_of(cluster, namespace, name)).get("phase") == "Failed" and s,
                      what="phase Failed")
    accepted = condition(status, "SpecAccepted")
    assert accepted["reason"] == "InvalidSpec"
    assert "model.depht" in accepted["message"]
    assert condition(status, "Failed")["reason"] == "InvalidSpec"
    assert jobs_in(cluster, namespace) == {}


def test_multi_node_trial_gets_workers(cluster, s3, start_operator):
    namespace, name = "multinode", "wide"
    start_operator(namespace)
    cluster.create(STUDIES, namespace, study_document(name, namespace, axes=[],
                                                      distributed={"nodes": 2, "procsPerNode": 2}))
    job = wait_for(lambda: list(jobs_in(cluster, namespace).values()), what="a job")[0]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "2"
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert status_of(cluster, namespace, name).get("budget", {}).get("gpusAllocated") in (None, 0, 4)
    wait_for(lambda: status_of(cluster, namespace, name).get("budget", {}).get("gpusAllocated") == 4,
             what="4 GPUs allocated")


def test_deleted_study_is_forgotten(cluster, s3, start_operator):
    namespace, name = "delete", "gone"
    start_operator(namespace)
    cluster.create(STUDIES, namespace, study_document(name, namespace))
    wait_for(lambda: len(jobs_in(cluster, namespace)) == 2, what="2 jobs")
    study = cluster.get(STUDIES, namespace, name)
    assert not study["metadata"].get("finalizers")  # deletion does not wait for the operator

    cluster.delete(STUDIES, namespace, name)
    assert cluster.get(STUDIES, namespace, name) is None
    assert len(cluster.collect_garbage(namespace)) == 2  # every job is owned by the study
    time.sleep(2.5)  # resync passes and job-deletion events
    assert jobs_in(cluster, namespace) == {}


def test_entry_point_serves_health_and_metrics(cluster, s3, tmp_path):
    """`wxscale-operator` as a process: liveness and metrics respond, and SIGTERM stops it."""
    metrics_port, liveness_port = free_port(), free_port()
    command = [sys.executable, "-m", "wxscale_operator", "--namespace", "cli", "--bind-address", "127.0.0.1",
               "--metrics-port", str(metrics_port), "--liveness-port", str(liveness_port),
               "--s3-endpoint", s3.endpoint, "--resync-seconds", "1"]
    log = (tmp_path / "operator.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        def get(port: int, path: str) -> bytes | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                    return response.read()
            except OSError:
                return None

        health = wait_for(lambda: get(liveness_port, "/healthz"), timeout=60, what="/healthz")
        assert json.loads(health)["studies"] == 0
        cluster.create(STUDIES, "cli", study_document("viacli", "cli", axes=[]))
        wait_for(lambda: jobs_in(cluster, "cli"), what="a job from the operator process")
        metrics = wait_for(lambda: (m := get(metrics_port, "/metrics")) and b"wxscale_operator_jobs_created_total 1.0"
                           in m and m, what="the jobs-created metric")
        assert b"wxscale_operator_reconciles_total" in metrics
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "operator.log").read_text()[-3000:]


def test_existing_job_name_is_not_an_error(cluster, s3):
    """A create that returns 409 (the job exists but the listing missed it) leaves the job as it is."""
    namespace, name = "conflict", "conflict"
    document = study_document(name, namespace, axes=[])
    study = cluster.create(STUDIES, namespace, document)
    trial = next(iter(trials_of(document).values()))
    target = JobTarget(study=name, namespace=namespace, study_uid=study["metadata"]["uid"],
                       output_url=document["spec"]["output"])
    existing = pytorchjob_manifest(trial, 0, ScalingStudy.model_validate(document).spec.cluster, target, "s3://x/y")
    existing["metadata"]["labels"] = {}  # invisible to the operator's label filter
    cluster.create(JOBS, namespace, existing)

    reconciler = register(kopf.OperatorRegistry(), operator_config(namespace, s3))

    reconcile_once(reconciler, namespace, name)
    jobs = jobs_in(cluster, namespace)
    assert list(jobs) == [existing["metadata"]["name"]]
    assert jobs[existing["metadata"]["name"]]["metadata"]["labels"] == {}
    assert status_of(cluster, namespace, name)["trials"]["running"] == 1
    cluster.delete(STUDIES, namespace, name)
    cluster.collect_garbage(namespace)


def test_fan_out_after_restart_creates_each_job_once(cluster, s3):
    """A pass that finds some of its jobs created by an earlier run (409) creates only the rest, 4 at a time."""
    namespace, name = "fanout", "wide"
    document = study_document(name, namespace, maxConcurrentTrials=12,
                              axes=[{"field": "training.seed", "values": list(range(12))}])
    study = cluster.create(STUDIES, namespace, document)
    trials = trials_of(document)
    target = JobTarget(study=name, namespace=namespace, study_uid=study["metadata"]["uid"],
                       output_url=document["spec"]["output"])
    cluster_spec = ScalingStudy.model_validate(document).spec.cluster
    # Jobs an operator created before it stopped, invisible to the listing of the next pass (no labels).
    earlier = sorted(trials.values(), key=lambda trial: trial.index)[:5]
    for trial in earlier:
        job = pytorchjob_manifest(trial, 0, cluster_spec, target, "s3://x/y")
        job["metadata"]["labels"] = {}
        cluster.create(JOBS, namespace, job)

    config = dataclasses.replace(operator_config(namespace, s3), create_concurrency=4)
    reconciler = register(kopf.OperatorRegistry(), config)

    reconcile_once(reconciler, namespace, name)
    jobs = jobs_in(cluster, namespace)
    assert len(jobs) == 12
    assert set(jobs) == {job_name(name, trial_id) for trial_id in trials}
    for trial in earlier:
        assert jobs[job_name(name, trial.id)]["metadata"]["labels"] == {}  # left as it was
    for trial_id in trials:
        assert get_json(s3, f"{namespace}/{name}/trials/{trial_id}/trial.json")["trial"] == trial_id
    created = [event["message"] for event in cluster.list(EVENTS, namespace) if event["reason"] == "TrialCreated"]
    assert len(created) == 1
    assert created[0].startswith("created 7 PyTorchJobs for the trials with plan index 5-11: ")
    assert status_of(cluster, namespace, name)["trials"]["running"] == 12
    cluster.delete(STUDIES, namespace, name)
    cluster.collect_garbage(namespace)
