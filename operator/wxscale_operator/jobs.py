"""Trial -> Kubeflow PyTorchJob (kubeflow.org/v1), and reading a job's state back.

One trial runs as one PyTorchJob: a `Master` replica, plus `Worker` replicas
for a trial on several nodes, each running `procsPerNode` processes. The
container runs the same command as the local executor, torchrun around
`wxscale_trainer`. The training operator sets the PET_* variables (node rank,
master address and port) that torchrun reads. The node and process counts are
also given as flags, so the command is complete when read on its own.
NOTE: the training operator v1 documentation says it sets PET_NODE_RANK,
PET_MASTER_ADDR and PET_MASTER_PORT when nprocPerNode is given. No test here
runs a training operator to confirm it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from wxscale.planner import Trial
from wxscale.spec import API_VERSION, KIND, ClusterSpec
from wxscale_operator.kube import PYTORCHJOBS
from wxscale_operator.naming import ATTEMPT_LABEL, job_labels, job_name

CONTAINER_NAME = "pytorch"  # the training operator looks for a container of this name
GPU_RESOURCE = "nvidia.com/gpu"

# Kubeflow v1 job condition types, and the phase a job is in when several are True.
JOB_PHASES = ("Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
TERMINAL_PHASES = ("Succeeded", "Failed")

# The Secret named by spec.cluster.credentialsSecret contains these keys.
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_CREDENTIAL_KEYS = ("AWS_SESSION_TOKEN",)


@dataclass(frozen=True)
class JobTarget:
    """Namespace and owner of a study's jobs, and the output location their trainers read and write."""

    study: str
    namespace: str
    study_uid: str
    output_url: str
    s3_endpoint: str | None = None


def gpus_per_replica(trial: Trial, cluster: ClusterSpec) -> int:
    """GPUs each replica requests: 0 on CPU studies, else at least one per process.

    `cluster.resources.gpus` > 0 marks a GPU study; a replica then requests
    max(gpus, procsPerNode), so `distributed.procsPerNode` can be an axis
    (GPUs per node) while `gpus` can reserve whole nodes.
    """
    if cluster.resources.gpus == 0:
        return 0
    return max(cluster.resources.gpus, trial.config.distributed.procs_per_node)


def gpus_per_trial(trial: Trial, cluster: ClusterSpec) -> int:
    return gpus_per_replica(trial, cluster) * trial.config.distributed.nodes


def cpu_cores(quantity: str) -> float:
    """Parse a Kubernetes CPU quantity ('2', '1.5', '500m') into cores."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)(m?)\s*", str(quantity))
    if not match:
        raise ValueError(f"invalid CPU quantity {quantity!r}: use cores ('2', '0.5') or millicores ('500m')")
    value = float(match.group(1))
    return value / 1000 if match.group(2) else value


def trainer_command(trial: Trial, trial_url: str, output_url: str, s3_endpoint: str | None) -> list[str]:
    """Return the container command: torchrun around the trainer, as the local executor runs it."""
    layout = trial.config.distributed
    command = ["python", "-m", "torch.distributed.run", f"--nnodes={layout.nodes}",
               f"--nproc-per-node={layout.procs_per_node}", "--max-restarts=0",
               "-m", "wxscale_trainer", "--trial", trial_url, "--output", output_url]
    if s3_endpoint:
        command += ["--s3-endpoint", s3_endpoint]
    return command


def _environment(trial: Trial, cluster: ClusterSpec, target: JobTarget) -> list[dict[str, Any]]:
    """Container environment. Credentials are references to the Secret, never values."""
    layout = trial.config.distributed
    # os.cpu_count() in a pod counts the node's cores, not the CPU limit, so the limit is split between processes.
    threads = max(1, int(cpu_cores(cluster.resources.cpu) // layout.procs_per_node))
    env: list[dict[str, Any]] = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "WXSCALE_STUDY", "value": target.study},
        {"name": "WXSCALE_TRIAL", "value": trial.id},
        {"name": "WXSCALE_CPU_THREADS", "value": str(threads)},
        {"name": "WXSCALE_METRICS_PORT", "value": str(cluster.metrics_port)},
    ]
    if target.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": target.s3_endpoint})
    secret = cluster.credentials_secret
    if secret is not None:
        for key in CREDENTIAL_KEYS + OPTIONAL_CREDENTIAL_KEYS:
            reference: dict[str, Any] = {"name": secret.name, "key": key}
            if key in OPTIONAL_CREDENTIAL_KEYS:
                reference["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": reference}})
    return env


def _resources(trial: Trial, cluster: ClusterSpec) -> dict[str, Any]:
    # Requests equal limits: the pods get the Guaranteed QoS class and are evicted last.
    amounts: dict[str, Any] = {"cpu": cluster.resources.cpu, "memory": cluster.resources.memory}
    gpus = gpus_per_replica(trial, cluster)
    if gpus:
        amounts[GPU_RESOURCE] = gpus
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod_template(trial: Trial, cluster: ClusterSpec, target: JobTarget, trial_url: str,
                  labels: dict[str, str]) -> dict[str, Any]:
    container = {
        "name": CONTAINER_NAME,
        "image": cluster.image,
        "imagePullPolicy": cluster.image_pull_policy,
        "command": trainer_command(trial, trial_url, target.output_url, target.s3_endpoint),
        "env": _environment(trial, cluster, target),
        "resources": _resources(trial, cluster),
        "ports": [{"name": "metrics", "containerPort": cluster.metrics_port, "protocol": "TCP"}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        # PyTorch data-loader workers exchange batches through shared memory; the default 64 MiB is too small.
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if cluster.node_selector:
        pod["nodeSelector"] = dict(cluster.node_selector)
    if cluster.tolerations:
        pod["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in cluster.tolerations]
    if cluster.priority_class_name:
        pod["priorityClassName"] = cluster.priority_class_name
    if cluster.service_account_name:
        pod["serviceAccountName"] = cluster.service_account_name
    return {"metadata": {"labels": dict(labels)}, "spec": pod}


def pytorchjob_manifest(trial: Trial, attempt: int, cluster: ClusterSpec, target: JobTarget, trial_url: str,
                        suspend: bool = False) -> dict[str, Any]:
    """Return the PyTorchJob of one attempt of a trial.

    The job is owned by the study (controller, blockOwnerDeletion), so deleting
    the study garbage-collects it. With restartPolicy ExitCode, replica pods
    restart on exit codes 128-255 (signals such as an OOM kill or a preemption)
    up to `backoffLimit` times. Exit codes 1-127 (the trainer's own errors) fail
    the job at once.
    """
    labels = job_labels(target.study, trial.id, attempt)
    template = _pod_template(trial, cluster, target, trial_url, labels)
    replicas = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": template}}
    if trial.config.distributed.nodes > 1:
        replicas["Worker"] = {"replicas": trial.config.distributed.nodes - 1, "restartPolicy": "ExitCode",
                              "template": template}
    return {
        "apiVersion": PYTORCHJOBS.api_version,
        "kind": PYTORCHJOBS.kind,
        "metadata": {
            "name": job_name(target.study, trial.id, attempt),
            "namespace": target.namespace,
            "labels": labels,
            "annotations": {"wxscale.io/trial-url": trial_url, "wxscale.io/output": target.output_url},
            "ownerReferences": [{
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": target.study,
                "uid": target.study_uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }],
        },
        "spec": {
            "nprocPerNode": str(trial.config.distributed.procs_per_node),
            "runPolicy": {
                "backoffLimit": cluster.backoff_limit,
                # Pods still running when the job ends (workers after a master failure) are deleted;
                # finished pods stay, with their logs, until the job's TTL.
                "cleanPodPolicy": "Running",
                "ttlSecondsAfterFinished": cluster.ttl_seconds_after_finished,
                "suspend": suspend,
            },
            "pytorchReplicaSpecs": replicas,
        },
    }


# Reading jobs ------------------------------------------------------------------------


def _true_conditions(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    conditions = (job.get("status") or {}).get("conditions") or []
    return {c.get("type"): c for c in conditions if c.get("status") == "True"}


def job_phase(job: dict[str, Any]) -> str:
    """Return one of JOB_PHASES from the job's conditions; a job without conditions is Created.

    Succeeded and Failed win over the others, since the training operator leaves
    earlier conditions in place. A job whose spec requests suspension counts as
    Suspended before its condition arrives.
    """
    true = _true_conditions(job)
    for phase in ("Succeeded", "Failed"):
        if phase in true:
            return phase
    if "Suspended" in true or ((job.get("spec") or {}).get("runPolicy") or {}).get("suspend"):
        return "Suspended"
    for phase in ("Restarting", "Running"):
        if phase in true:
            return phase
    return "Created"


def job_failure_message(job: dict[str, Any]) -> str:
    """Return the reason and message of the job's Failed condition, or ''."""
    condition = _true_conditions(job).get("Failed")
    if not condition:
        return ""
    return ": ".join(part for part in (condition.get("reason"), condition.get("message")) if part)


def job_seconds(job: dict[str, Any]) -> float | None:
    """Seconds from the job's startTime to its completionTime (or lastReconcileTime), if known."""
    status = job.get("status") or {}
    start = status.get("startTime")
    end = status.get("completionTime") or status.get("lastReconcileTime")
    if not start or not end:
        return None
    try:
        seconds = (datetime.fromisoformat(end.replace("Z", "+00:00")) -
                   datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
    except ValueError:
        return None
    return max(seconds, 0.0)


def job_attempt(job: dict[str, Any]) -> int:
    """Return the attempt number from the job's label (0 when absent)."""
    value = ((job.get("metadata") or {}).get("labels") or {}).get(ATTEMPT_LABEL, "0")
    return int(value) if str(value).isdigit() else 0


def owner_uid(job: dict[str, Any]) -> str | None:
    """Return the uid of the job's controlling ScalingStudy, or None."""
    for reference in (job.get("metadata") or {}).get("ownerReferences") or []:
        if reference.get("kind") == KIND and reference.get("controller"):
            return reference.get("uid")
    return None
