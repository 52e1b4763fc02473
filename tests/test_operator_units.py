"""Pure parts of the operator: naming, trial -> PyTorchJob, job states, the trial state machine, status."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from wxscale.crd import to_json_schema
from wxscale.planner import GridInfo, Trial, plan
from wxscale.spec import ClusterSpec, ScalingStudy
from wxscale.status import build_status
from wxscale.storage import Location
from wxscale_operator.config import OperatorConfig
from wxscale_operator.kube import ApiError
from wxscale_operator.jobs import (
    JobTarget, cpu_cores, gpus_per_replica, job_failure_message, job_phase, job_seconds, pytorchjob_manifest,
)
from wxscale_operator.naming import MAX_JOB_NAME, is_dns_label, job_name
from wxscale_operator.reconcile import (Reconciler, created_event_message, event_manifest, index_ranges,
                                        spec_fingerprint, status_patch)
from wxscale_operator.trials import Creation, Limits, decide

KUBERNETES_VERSION = "1.30.0"
UID = "5f0c6a8e-4a8e-4a43-9d55-0d3b4c2f1a00"


def make_study(**spec_overrides: Any) -> ScalingStudy:
    spec: dict[str, Any] = {
        "data": {"source": "synthetic",
                 "train": {"start": "2000-01-01", "end": "2000-09-30T18:00"},
                 "validation": {"start": "2000-10-01", "end": "2000-11-15T18:00"},
                 "test": {"start": "2000-11-16", "end": "2000-12-31T18:00"}},
        "model": {"depth": 1, "heads": 2, "embedDim": 64},
        "training": {"batchSize": 16, "budget": {"samples": 1600}},
        "axes": [{"name": "size", "fields": ["model.depth", "model.heads"], "factors": [1, 2, 4]}],
        "output": "s3://studies/unit",
        "cluster": {"resources": {"gpus": 1, "cpu": "8", "memory": "32Gi"},
                    "nodeSelector": {"nvidia.com/gpu.product": "H100"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "priorityClassName": "research", "serviceAccountName": "trainer",
                    "credentialsSecret": {"name": "s3-credentials"}},
    }
    for key, value in spec_overrides.items():
        spec[key] = value
    return ScalingStudy.model_validate({"apiVersion": "wxscale.io/v1alpha1", "kind": "ScalingStudy",
                                        "metadata": {"name": "unit"}, "spec": spec})


def plan_study(study: ScalingStudy) -> list[Trial]:
    return plan(study, grid_resolver=lambda data: GridInfo(32, 64, ("tracer",), 6.0))


TARGET = JobTarget(study="unit", namespace="research", study_uid=UID, output_url="s3://studies/unit",
                   s3_endpoint="http://minio.storage:9000")


def manifest_for(study: ScalingStudy, trial: Trial, attempt: int = 0, **kwargs: Any) -> dict[str, Any]:
    return pytorchjob_manifest(trial, attempt, study.spec.cluster, TARGET,
                               f"s3://studies/unit/trials/{trial.id}/trial.json", **kwargs)


@pytest.fixture(scope="module")
def kubeflow_schema(shared_schemas: Path) -> dict[str, Any]:
    path = shared_schemas / "kubeflow.org_pytorchjobs.yaml"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    document = yaml.safe_load(path.read_text())
    version = next(v for v in document["spec"]["versions"] if v["name"] == "v1")
    schema = to_json_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"]["enum"] = ["kubeflow.org/v1"]
    schema["properties"]["kind"]["enum"] = ["PyTorchJob"]
    return schema


# Naming ------------------------------------------------------------------------------


@pytest.mark.parametrize("study", ["unit", "a" * 40, "9lives", "x" * 39 + "9"])
@pytest.mark.parametrize("attempt", [0, 1, 10])
def test_job_name_is_short_dns_label(study, attempt):
    name = job_name(study, "t-0123456789", attempt)
    assert len(name) <= MAX_JOB_NAME
    assert is_dns_label(name)
    assert is_dns_label(f"{name}-worker-4095")


def test_job_name_is_deterministic_and_distinct():
    assert job_name("unit", "t-0123456789") == "unit-0123456789"
    assert job_name("unit", "t-0123456789", 2) == "unit-0123456789-r2"
    assert job_name("unit", "t-0123456789") == job_name("unit", "t-0123456789")
    long_a, long_b = "a" * 39 + "b", "a" * 39 + "c"
    assert job_name(long_a, "t-0123456789") != job_name(long_b, "t-0123456789")
    assert job_name("unit", "t-0123456789") != job_name("unit", "t-9876543210")


# Manifest ----------------------------------------------------------------------------


def test_single_node_manifest():
    study = make_study()
    trial = plan_study(study)[0]
    job = manifest_for(study, trial)
    assert job["metadata"]["name"] == job_name("unit", trial.id)
    assert job["metadata"]["labels"]["wxscale.io/study"] == "unit"
    assert job["metadata"]["labels"]["wxscale.io/trial"] == trial.id
    assert job["metadata"]["labels"]["wxscale.io/attempt"] == "0"
    owner = job["metadata"]["ownerReferences"][0]
    assert owner == {"apiVersion": "wxscale.io/v1alpha1", "kind": "ScalingStudy", "name": "unit", "uid": UID,
                     "controller": True, "blockOwnerDeletion": True}
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master"}
    assert replicas["Master"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "1"
    assert job["spec"]["runPolicy"] == {"backoffLimit": 2, "cleanPodPolicy": "Running",
                                        "ttlSecondsAfterFinished": 86400, "suspend": False}


def test_multi_node_manifest_has_workers_and_gpus():
    study = make_study(distributed={"nodes": 3, "procsPerNode": 4}, training={"batchSize": 24,
                                                                            "budget": {"samples": 2400}})
    trial = plan_study(study)[0]
    job = manifest_for(study, trial)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] == 2
    assert job["spec"]["nprocPerNode"] == "4"
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    # One GPU per process at least: procsPerNode (4) wins over resources.gpus (1).
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert "--nnodes=3" in container["command"]
    assert "--nproc-per-node=4" in container["command"]
    env = {item["name"]: item for item in container["env"]}
    assert env["WXSCALE_CPU_THREADS"]["value"] == "2"  # 8 CPUs / 4 processes


def test_pod_template_settings_and_command():
    study = make_study()
    trial = plan_study(study)[0]
    job = manifest_for(study, trial)
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch"
    assert container["image"] == study.spec.cluster.image
    assert container["command"][:3] == ["python", "-m", "torch.distributed.run"]
    trainer = container["command"][container["command"].index("wxscale_trainer") - 1:]
    assert trainer == ["-m", "wxscale_trainer", "--trial", f"s3://studies/unit/trials/{trial.id}/trial.json",
                       "--output", "s3://studies/unit", "--s3-endpoint", "http://minio.storage:9000"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "research"
    assert pod["serviceAccountName"] == "trainer"


def test_credentials_come_from_secret_references_only():
    study = make_study()
    trial = plan_study(study)[0]
    job = manifest_for(study, trial)
    env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    by_name = {item["name"]: item for item in env}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in by_name[key]
        assert by_name[key]["valueFrom"] == {"secretKeyRef": {"name": "s3-credentials", "key": key}}
    assert by_name["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert by_name["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.storage:9000"


def test_cpu_study_requests_no_gpu():
    study = make_study(cluster={"resources": {"gpus": 0}})
    trial = plan_study(study)[0]
    job = manifest_for(study, trial)
    limits = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits
    assert gpus_per_replica(trial, study.spec.cluster) == 0
    env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    assert not any(item["name"].startswith("AWS_ACCESS") for item in env)


@pytest.mark.parametrize("quantity, cores", [("2", 2.0), ("1.5", 1.5), ("500m", 0.5)])
def test_cpu_cores(quantity, cores):
    assert cpu_cores(quantity) == cores


def test_cpu_cores_rejects_garbage():
    with pytest.raises(ValueError, match="invalid CPU quantity"):
        cpu_cores("two")


def test_manifests_validate_against_kubeflow_crd(kubeflow_schema):
    layouts = [{"nodes": 1, "procsPerNode": 1}, {"nodes": 2, "procsPerNode": 2}, {"nodes": 4, "procsPerNode": 8}]
    for layout in layouts:
        world = layout["nodes"] * layout["procsPerNode"]
        for cluster in ({}, make_study().spec.cluster.dump()):
            study = make_study(distributed=layout, training={"batchSize": 16 * world, "budget": {"steps": 10}},
                               cluster=cluster)
            for trial in plan_study(study):
                for suspend in (False, True):
                    job = manifest_for(study, trial, attempt=1, suspend=suspend)
                    jsonschema.validate(job, kubeflow_schema, cls=jsonschema.Draft7Validator)


def test_kubeflow_schema_catches_a_misspelled_field(kubeflow_schema):
    study = make_study()
    job = manifest_for(study, plan_study(study)[0])
    job["spec"]["runPolicy"]["backofLimit"] = 3
    with pytest.raises(jsonschema.ValidationError, match="backofLimit"):
        jsonschema.validate(job, kubeflow_schema)


def test_pod_templates_validate_as_pods():
    study = make_study(distributed={"nodes": 2, "procsPerNode": 2}, training={"batchSize": 16,
                                                                            "budget": {"steps": 10}})
    job = manifest_for(study, plan_study(study)[0])
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        template = replica["template"]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "trial-pod", "namespace": "research", **template["metadata"]},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_event_validates_as_event():
    body = {"apiVersion": "wxscale.io/v1alpha1", "kind": "ScalingStudy",
            "metadata": {"name": "unit", "namespace": "research", "uid": UID, "resourceVersion": "7"}}
    event = event_manifest(body, "Warning", "TrialFailed", "x" * 5000)
    event["metadata"]["name"] = "unit.abcde"  # the API server makes it from generateName
    kubernetes_validate.validate(event, KUBERNETES_VERSION, strict=True)
    assert len(event["message"]) == 1024
    assert event["involvedObject"]["uid"] == UID


# Job states --------------------------------------------------------------------------


def conditions(*types: str) -> dict[str, Any]:
    return {"status": {"conditions": [{"type": t, "status": "True", "reason": f"Job{t}", "message": f"job {t}"}
                                      for t in types]}}


@pytest.mark.parametrize("job, phase", [
    ({}, "Created"),
    (conditions("Created"), "Created"),
    (conditions("Created", "Running"), "Running"),
    (conditions("Created", "Running", "Restarting"), "Restarting"),
    (conditions("Created", "Running", "Succeeded"), "Succeeded"),
    (conditions("Created", "Running", "Failed"), "Failed"),
    (conditions("Created", "Suspended"), "Suspended"),
    ({"spec": {"runPolicy": {"suspend": True}}, **conditions("Created", "Running")}, "Suspended"),
])
def test_job_phase(job, phase):
    assert job_phase(job) == phase


def test_job_failure_message_and_seconds():
    job = conditions("Created", "Failed")
    job["status"].update(startTime="2026-01-01T00:00:00Z", completionTime="2026-01-01T01:30:00Z")
    assert job_failure_message(job) == "JobFailed: job Failed"
    assert job_seconds(job) == 5400.0
    assert job_seconds({}) is None


# Trial state machine --------------------------------------------------------------------


def job_of(study: str, trial: Trial, attempt: int = 0, *states: str) -> dict[str, Any]:
    job = manifest_for(make_study(), trial, attempt)
    job["metadata"]["name"] = job_name(study, trial.id, attempt)
    job.update(conditions(*states) if states else {})
    return job


LIMITS = Limits(max_concurrent=2, max_failed=0, max_retries=1, suspend=False)


@pytest.fixture(scope="module")
def trials() -> list[Trial]:
    return plan_study(make_study(axes=[{"name": "size", "fields": ["model.depth", "model.heads"],
                                        "factors": [1, 2, 4, 8]}]))


def test_decide_creates_up_to_max_concurrent(trials):
    decision = decide("unit", trials, [], {}, [], LIMITS)
    assert [c.trial.id for c in decision.create] == [trials[0].id, trials[1].id]
    assert all(c.attempt == 0 for c in decision.create)
    assert [entry["trial"] for entry in decision.active] == [trials[0].id, trials[1].id]
    assert decision.states[trials[2].id] == "Pending"


def test_decide_counts_running_jobs_against_the_limit(trials):
    jobs = [job_of("unit", trials[0], 0, "Created", "Running")]
    decision = decide("unit", trials, jobs, {}, [], LIMITS)
    assert [c.trial.id for c in decision.create] == [trials[1].id]
    assert decision.states[trials[0].id] == "Running"


def test_decide_finished_trials_come_from_records(trials):
    records = {trials[0].id: {"state": "Succeeded"}, trials[1].id: {"state": "Succeeded"}}
    jobs = [job_of("unit", trials[0], 0, "Succeeded")]
    decision = decide("unit", trials, jobs, records, [], LIMITS)
    assert decision.states[trials[0].id] == "Succeeded"
    assert [c.trial.id for c in decision.create] == [trials[2].id, trials[3].id]
    assert decision.failures == []


def test_decide_retries_failed_job(trials):
    jobs = [job_of("unit", trials[0], 0, "Failed")]
    decision = decide("unit", trials, jobs, {}, [], LIMITS)
    first = decision.create[0]
    assert (first.trial.id, first.attempt) == (trials[0].id, 1)
    assert "Failed" in first.retry_of
    assert decision.failures == []


def test_decide_fails_a_trial_after_its_last_attempt(trials):
    jobs = [job_of("unit", trials[0], 0, "Failed"), job_of("unit", trials[0], 1, "Failed")]
    decision = decide("unit", trials, jobs, {}, [], Limits(2, 1, 1, False))
    assert decision.states[trials[0].id] == "Failed"
    assert [(f.trial.id, f.attempt) for f in decision.failures] == [(trials[0].id, 1)]
    assert not decision.study_failed


def test_decide_success_without_record_is_a_failed_attempt(trials):
    jobs = [job_of("unit", trials[0], 1, "Succeeded")]
    decision = decide("unit", trials, jobs, {}, [], LIMITS)
    assert decision.failures[0].message.endswith(f"trials/{trials[0].id}/result.json")


def test_decide_vanished_job_is_retried_then_failed(trials):
    active = [{"trial": trials[0].id, "job": job_name("unit", trials[0].id), "attempt": 0}]
    decision = decide("unit", trials, [], {}, active, LIMITS)
    assert (decision.create[0].trial.id, decision.create[0].attempt) == (trials[0].id, 1)
    assert "disappeared" in decision.create[0].retry_of

    active = [{"trial": trials[0].id, "job": job_name("unit", trials[0].id, 1), "attempt": 1}]
    decision = decide("unit", trials, [], {}, active, Limits(2, 5, 1, False))
    assert decision.states[trials[0].id] == "Failed"
    assert "disappeared" in decision.failures[0].message


def test_decide_vanished_retry_is_not_recreated(trials):
    jobs = [job_of("unit", trials[0], 0, "Failed")]
    active = [{"trial": trials[0].id, "job": job_name("unit", trials[0].id, 1), "attempt": 1}]
    decision = decide("unit", trials, jobs, {}, active, LIMITS)
    assert decision.states[trials[0].id] == "Failed"
    assert trials[0].id not in {c.trial.id for c in decision.create}


def test_decide_past_max_failed_deletes_running_jobs(trials):
    jobs = [job_of("unit", trials[0], 1, "Failed"), job_of("unit", trials[1], 0, "Running"),
            job_of("unit", trials[2], 0, "Created")]
    decision = decide("unit", trials, jobs, {}, [], LIMITS)
    assert decision.study_failed
    assert decision.create == []
    assert sorted(job["metadata"]["name"] for job, reason in decision.delete if reason == "StudyFailed") == sorted(
        [job_name("unit", trials[1].id), job_name("unit", trials[2].id)])
    assert decision.states[trials[1].id] == "Pending"
    assert decision.active == []


def test_decide_suspend_stops_creation_and_suspends_jobs(trials):
    jobs = [job_of("unit", trials[0], 0, "Running")]
    decision = decide("unit", trials, jobs, {}, [], Limits(2, 0, 1, True))
    assert decision.create == []
    assert [job["metadata"]["name"] for job in decision.suspend] == [job_name("unit", trials[0].id)]

    jobs[0]["spec"]["runPolicy"]["suspend"] = True
    decision = decide("unit", trials, jobs, {}, [], LIMITS)
    assert [job["metadata"]["name"] for job in decision.resume] == [job_name("unit", trials[0].id)]
    assert len(decision.create) == 1


def test_decide_retires_jobs_of_trials_no_longer_planned(trials):
    stale = job_of("unit", trials[3], 0, "Running")
    finished = job_of("unit", trials[2], 0, "Succeeded")
    decision = decide("unit", trials[:2], [stale, finished], {}, [], LIMITS)
    assert [(job["metadata"]["name"], reason) for job, reason in decision.delete] == [
        (job_name("unit", trials[3].id), "TrialRetired")]


def test_decide_is_stable_when_nothing_changed(trials):
    first = decide("unit", trials, [], {}, [], LIMITS)
    jobs = [job_of("unit", c.trial, c.attempt, "Running") for c in first.create]
    second = decide("unit", trials, jobs, {}, first.active, LIMITS)
    assert second.create == []
    assert second.delete == []
    assert second.failures == []
    assert second.active == first.active


# Status ------------------------------------------------------------------------------


def test_status_patch_skips_unchanged_and_deletes_removed_fields():
    old = {"phase": "Running", "updatedAt": "2026-01-01T00:00:00Z", "fittedExponent": 0.2}
    assert status_patch(old, {"phase": "Running", "updatedAt": "2026-01-01T00:01:00Z",
                              "fittedExponent": 0.2}) is None
    # A null member equals an absent one: the merge patch that wrote it deleted it.
    assert status_patch(old, {**old, "bestTestRMSE": None, "updatedAt": "2026-01-01T00:03:00Z"}) is None
    patch = status_patch(old, {"phase": "Succeeded", "updatedAt": "2026-01-01T00:02:00Z"})
    assert patch == {"phase": "Succeeded", "updatedAt": "2026-01-01T00:02:00Z", "fittedExponent": None}


def test_status_patch_sends_only_changed_members():
    active = [{"trial": f"t-{i:010x}", "job": f"unit-{i:010x}", "attempt": 0} for i in range(1000)]
    old = {"phase": "Running", "updatedAt": "2026-01-01T00:00:00Z", "active": active,
           "trials": {"total": 1000, "running": 1000, "succeeded": 0}, "budget": {"flopsSpent": 0.0, "note": "x"}}
    new = copy.deepcopy(old)
    new.update(updatedAt="2026-01-01T00:01:00Z", trials={"total": 1000, "running": 999, "succeeded": 1},
               budget={"flopsSpent": 5.0})
    patch = status_patch(old, new)
    assert patch == {"trials": {"running": 999, "succeeded": 1}, "budget": {"flopsSpent": 5.0, "note": None},
                     "updatedAt": "2026-01-01T00:01:00Z"}
    new["active"] = active[1:]
    assert status_patch(old, new)["active"] == active[1:]  # a merge patch replaces a list whole


def test_index_ranges():
    assert index_ranges([7, 0, 1, 2, 5, 8, 2]) == "0-2, 5, 7-8"
    assert index_ranges([3]) == "3"
    assert index_ranges([]) == ""


def test_created_event_names_count_and_trials(trials):
    one = created_event_message([(trials[0], "unit-a")])
    assert one == f"created PyTorchJob unit-a for trial {trials[0].id} (1 node(s) x 1 process(es))"

    many = created_event_message([(trials[2], "unit-c"), (trials[0], "unit-a"), (trials[1], "unit-b")])
    assert many.startswith("created 3 PyTorchJobs for the trials with plan index 0-2: ")
    assert many.index("unit-a") < many.index("unit-b") < many.index("unit-c")
    assert trials[0].id in many


def test_created_event_fits_the_message_limit(many_trials):
    created = [(many_trials[i % len(many_trials)], f"unit-job-{i:04d}") for i in range(1000)]
    message = created_event_message(created)
    assert len(message) <= 1024
    assert message.startswith("created 1000 PyTorchJobs for the trials with plan index 0-19: ")
    listed = message.count("unit-job-")
    assert listed > 5
    assert message.endswith(f", and {1000 - listed} more")


def test_created_event_shortens_scattered_indices(many_trials):
    scattered = [trial for trial in many_trials if trial.index % 2 == 0]
    created = [(trial, f"unit-{trial.index}") for trial in scattered]
    message = created_event_message(created)
    assert "plan index 0, 2, 4, 6" in message
    assert "unit-0 (" in message

    class Spread:  # a trial stand-in with a large plan index, for indices that need many characters
        def __init__(self, index: int):
            self.index, self.id = index, f"t-{index:010x}"

    wide = [(Spread(index), f"unit-{index}") for index in range(0, 4000, 2)]
    message = created_event_message(wide)
    assert len(message) <= 1024
    assert ", ...: " in message
    assert "unit-0 (t-0000000000)" in message
    assert message.endswith(f"and {2000 - message.count('unit-')} more")


class RecordingClient:
    """An API client stand-in that records creates: the most in flight at once, names, and 409s for `existing`."""

    def __init__(self, existing: set[str] = frozenset(), failing: set[str] = frozenset()):
        self.existing, self.failing = set(existing), set(failing)
        self.in_flight = self.max_in_flight = 0
        self.created: list[str] = []
        self.events: list[dict[str, Any]] = []

    async def create(self, resource: Any, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        if body["kind"] == "Event":
            self.events.append(body)
            return body
        name = body["metadata"]["name"]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            if name in self.failing:
                raise ApiError(500, "InternalError", "etcd timeout", "POST", "/pytorchjobs")
            if name in self.existing:
                raise ApiError(409, "AlreadyExists", f"{name} exists", "POST", "/pytorchjobs")
            self.created.append(name)
            return body
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        pass


def create_jobs(client: RecordingClient, trials: list[Trial], tmp_path: Path, limit: int) -> None:
    """Run the creation step of one pass for `trials` against `client`, writing trial files under tmp_path."""
    study = make_study()
    reconciler = Reconciler(client=client, config=OperatorConfig(create_concurrency=limit))
    body = {"apiVersion": "wxscale.io/v1alpha1", "kind": "ScalingStudy",
            "metadata": {"name": "unit", "namespace": "research", "uid": UID}, "spec": {}}

    async def run() -> None:
        try:
            await reconciler._create_jobs(body, study, TARGET, Location(tmp_path), [Creation(t, 0) for t in trials])
        finally:
            await reconciler.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def many_trials() -> list[Trial]:
    return plan_study(make_study(axes=[{"field": "training.seed", "values": list(range(20))}]))


def test_job_creation_respects_concurrency_limit(many_trials, tmp_path):
    client = RecordingClient()
    create_jobs(client, many_trials, tmp_path, limit=3)
    assert client.max_in_flight == 3
    assert sorted(client.created) == sorted(job_name("unit", t.id) for t in many_trials)
    assert len(client.events) == 1
    assert client.events[0]["reason"] == "TrialCreated"
    assert client.events[0]["message"].startswith("created 20 PyTorchJobs for the trials with plan index 0-19")
    for trial in many_trials:
        assert (tmp_path / "trials" / trial.id / "trial.json").exists()


def test_job_creation_treats_conflict_as_existing(many_trials, tmp_path):
    existing = {job_name("unit", t.id) for t in many_trials[:8]}
    client = RecordingClient(existing=existing)
    create_jobs(client, many_trials, tmp_path, limit=4)
    assert set(client.created) == {job_name("unit", t.id) for t in many_trials[8:]}
    assert len(client.created) == 12
    assert client.events[0]["message"].startswith("created 12 PyTorchJobs for the trials with plan index 8-19")


def test_job_creation_stops_after_a_failure(many_trials, tmp_path):
    failing = {job_name("unit", many_trials[1].id)}
    client = RecordingClient(failing=failing)
    with pytest.raises(ApiError, match="etcd timeout"):
        create_jobs(client, many_trials, tmp_path, limit=2)
    # After the failure only the creation already in flight finishes, and no other starts.
    assert len(client.created) < len(many_trials) - 1
    assert len(client.created) <= 3
    assert len(client.events) == 1  # the jobs created before the failure are reported
    assert client.events[0]["message"].count("unit-") == len(client.created)


def test_spec_fingerprint_tracks_only_data_and_model():
    study = make_study()
    same = make_study(axes=[], maxConcurrentTrials=5)
    other = make_study(model={"depth": 1, "heads": 2, "embedDim": 128})
    assert spec_fingerprint(study) == spec_fingerprint(same)
    assert spec_fingerprint(study) != spec_fingerprint(other)


def test_status_aggregates_counts_and_ledger(trials):
    records = {
        trials[0].id: {"trial": trials[0].id, "state": "Succeeded",
                       "training": {"flopsAnalytic": 2e12, "wallSeconds": 3600.0, "samples": 1600},
                       "evaluation": {"testLoss": 0.4, "variables": {"tracer": {"model": {"rmse": 2.0}}}}},
        trials[1].id: {"trial": trials[1].id, "state": "Failed", "error": "boom",
                       "training": {"wallSeconds": 1800.0}},
    }
    states = {trials[0].id: "Succeeded", trials[1].id: "Failed", trials[2].id: "Running"}
    gpus = {trial.id: 4 for trial in trials}
    status = build_status(trials, states, records, max_failed=1, gpus_per_trial=gpus, generation=2)
    assert status["trials"] == {"total": 4, "pending": 1, "running": 1, "succeeded": 1, "failed": 1}
    assert status["progress"] == "1/4"
    assert status["bestTestRMSE"] == 2.0
    assert status["phase"] == "Running"
    budget = status["budget"]
    assert budget["flopsSpent"] == 2e12
    assert budget["gpuHoursSpent"] == 4 * 1.5  # (3600 + 1800) s x 4 GPUs
    assert budget["gpusAllocated"] == 4
    # Remaining FLOPs (trials 2 and 3) at the measured 2e12 FLOPs per 4 GPU-hours.
    rate = 2e12 / (4 * 3600.0)
    expected = (4 * 5400.0 + (trials[2].total_flops + trials[3].total_flops) / rate) / 3600.0
    assert budget["gpuHoursPlanned"] == pytest.approx(expected, rel=1e-3)
    assert budget["flopsPlanned"] == pytest.approx(sum(t.total_flops for t in trials))


def test_status_fails_past_max_failed(trials):
    states = {trials[0].id: "Failed", trials[1].id: "Failed"}
    status = build_status(trials, states, {}, max_failed=1)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert status["phase"] == "Failed"
    assert failed["status"] == "True"
    assert failed["reason"] == "TooManyFailedTrials"


def test_status_results_are_bounded():
    study = make_study(points=[{"training.seed": seed} for seed in range(205)])
    many = plan_study(study)
    status = build_status(many, {}, {})
    assert len(status["results"]) == 200
    assert status["resultsTruncated"] is True
    assert len(json.dumps(status)) < 200_000


# Spec acceptance ------------------------------------------------------------------------


def study_body(**spec_overrides: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(make_study(**spec_overrides).dump()))
    body["metadata"].update(namespace="research", uid=UID)
    return body


def test_accept_resolves_output_from_spec_or_default():
    from wxscale_operator.config import OperatorConfig
    from wxscale_operator.reconcile import Reconciler

    reconciler = Reconciler(client=None, config=OperatorConfig(default_output="s3://root/studies/"))
    _, output, _ = reconciler._accept(study_body(), "research")
    assert output.url == "s3://studies/unit"
    _, output, _ = reconciler._accept(study_body(output=None), "research")
    assert output.url == "s3://root/studies/research/unit"


@pytest.mark.parametrize("output, reason", [(None, "OutputMissing"), ("runs/unit", "OutputNotShared"),
                                            ("file:///data/unit", "OutputNotShared")])
def test_accept_rejects_unshared_output(output, reason):
    from wxscale_operator.config import OperatorConfig
    from wxscale_operator.reconcile import Reconciler, SpecRejected

    reconciler = Reconciler(client=None, config=OperatorConfig())
    with pytest.raises(SpecRejected) as rejected:
        reconciler._accept(study_body(output=output), "research")
    assert rejected.value.reason == reason
    assert "s3://bucket/studies/unit" in rejected.value.message


def test_accept_rejects_changed_data():
    from wxscale_operator.config import OperatorConfig
    from wxscale_operator.reconcile import Reconciler, SpecRejected

    reconciler = Reconciler(client=None, config=OperatorConfig())
    body = study_body()
    body["status"] = {"specFingerprint": spec_fingerprint(make_study(model={"depth": 3, "heads": 2,
                                                                           "embedDim": 64}))}
    with pytest.raises(SpecRejected) as rejected:
        reconciler._accept(body, "research")
    assert rejected.value.reason == "ImmutableFieldChanged"
