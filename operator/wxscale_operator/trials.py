"""The trial state machine: from what is observed to what the operator does next.

`decide` is a pure function. It takes the planned trials, the study's
PyTorchJobs, the result records found in the output location and the jobs the
previous status listed as active, and returns each trial's state and the
actions to take. Nothing here calls the API or reads storage, so every rule is
tested directly.

Where a trial's state lives, so that an operator restart loses nothing:
  - finished trials: `trials/<id>/result.json` in the output location. The
    trainer writes it on success; the operator writes a record with state
    Failed when a trial fails for good (as the local executor does).
  - running trials: the PyTorchJob itself, labelled with study, trial and attempt.
  - the attempt of a trial whose job disappeared: `status.active` of the study.

Per trial, in this order:
  1. A result record exists: the trial is Succeeded or Failed, as its `state` field gives.
  2. The latest job (highest attempt) is running, restarting, created or
     suspended: Running.
  3. The latest job failed or succeeded without a result record, or the job
     status.active lists for the trial is gone: the attempt failed. With attempts left
     (attempt < maxRetries) the next attempt is created; otherwise the trial fails.
  4. Otherwise: Pending.
Past maxFailedTrials no job is created and every running job is deleted;
with spec.suspend no job is created and running jobs are suspended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wxscale.planner import Trial
from wxscale_operator.jobs import TERMINAL_PHASES, job_attempt, job_failure_message, job_phase
from wxscale_operator.naming import TRIAL_LABEL, job_name


@dataclass(frozen=True)
class Limits:
    """The spec fields that bound what the operator runs."""

    max_concurrent: int
    max_failed: int
    max_retries: int
    suspend: bool


@dataclass(frozen=True)
class Creation:
    trial: Trial
    attempt: int
    retry_of: str | None = None  # why the previous attempt failed, for retries


@dataclass(frozen=True)
class Failure:
    """A trial that failed for good; the operator writes its Failed record."""

    trial: Trial
    attempt: int
    message: str
    job: dict[str, Any] | None


@dataclass
class Decision:
    """Trial states and the actions of one reconcile pass."""

    states: dict[str, str] = field(default_factory=dict)
    create: list[Creation] = field(default_factory=list)
    delete: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # (job, reason)
    suspend: list[dict[str, Any]] = field(default_factory=list)
    resume: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    active: list[dict[str, Any]] = field(default_factory=list)  # {trial, job, attempt}
    study_failed: bool = False

    @property
    def failed_count(self) -> int:
        return sum(1 for state in self.states.values() if state == "Failed")


def _trial_of(job: dict[str, Any]) -> str | None:
    return ((job.get("metadata") or {}).get("labels") or {}).get(TRIAL_LABEL)


def latest_jobs(jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return each trial's job with the highest attempt."""
    latest: dict[str, dict[str, Any]] = {}
    for job in jobs:
        trial_id = _trial_of(job)
        if trial_id and (trial_id not in latest or job_attempt(job) > job_attempt(latest[trial_id])):
            latest[trial_id] = job
    return latest


def _is_suspended(job: dict[str, Any]) -> bool:
    return bool(((job.get("spec") or {}).get("runPolicy") or {}).get("suspend"))


def _job_name(job: dict[str, Any]) -> str:
    return (job.get("metadata") or {}).get("name", "")


def decide(study: str, trials: list[Trial], jobs: list[dict[str, Any]], records: dict[str, dict[str, Any]],
           previous_active: list[dict[str, Any]], limits: Limits) -> Decision:
    """Return trial states and actions; see the module docstring for the rules.

    `jobs` are the study's PyTorchJobs (already filtered by owner), `records` the
    result records by trial id, `previous_active` the `active` list of the last status.
    """
    decision = Decision()
    latest = latest_jobs(jobs)
    was_active = {entry["trial"]: entry for entry in previous_active if "trial" in entry}
    planned = {trial.id for trial in trials}
    running: list[tuple[Trial, dict[str, Any]]] = []
    retries: list[Creation] = []
    pending: list[Trial] = []
    kept_vanished: list[dict[str, Any]] = []

    def attempt_failed(trial: Trial, attempt: int, message: str, job: dict[str, Any] | None) -> None:
        if attempt < limits.max_retries:
            retries.append(Creation(trial, attempt + 1, retry_of=message))
            decision.states[trial.id] = "Pending"
        else:
            decision.failures.append(Failure(trial, attempt, message, job))
            decision.states[trial.id] = "Failed"

    for trial in trials:
        record = records.get(trial.id)
        if record and record.get("state") in ("Succeeded", "Failed"):
            decision.states[trial.id] = record["state"]
            continue

        job = latest.get(trial.id)
        entry = was_active.get(trial.id)
        if entry is not None and (job is None or int(entry.get("attempt", 0)) > job_attempt(job)):
            # The job status.active names is gone (older attempts may remain).
            before = len(retries)
            attempt_failed(trial, int(entry.get("attempt", 0)),
                           f"PyTorchJob {entry.get('job')} disappeared before it finished", None)
            if len(retries) > before:
                kept_vanished.append(entry)
            continue
        if job is None:
            decision.states[trial.id] = "Pending"
            pending.append(trial)
            continue

        phase = job_phase(job)
        attempt = job_attempt(job)
        if phase == "Succeeded":
            attempt_failed(trial, attempt, f"PyTorchJob {_job_name(job)} succeeded but wrote no result record "
                           f"trials/{trial.id}/result.json", job)
        elif phase == "Failed":
            attempt_failed(trial, attempt, job_failure_message(job) or f"PyTorchJob {_job_name(job)} failed", job)
        else:
            decision.states[trial.id] = "Running"
            running.append((trial, job))

    # Jobs of trials no longer in the plan (spec.axes or spec.points edited) are stopped.
    for job in jobs:
        if _trial_of(job) not in planned and job_phase(job) not in TERMINAL_PHASES:
            decision.delete.append((job, "TrialRetired"))

    decision.study_failed = decision.failed_count > limits.max_failed
    if decision.study_failed:
        # Stopped jobs are not failures: their trials go back to Pending.
        for trial, job in running:
            decision.delete.append((job, "StudyFailed"))
            decision.states[trial.id] = "Pending"
        return decision

    for trial, job in running:
        decision.active.append({"trial": trial.id, "job": _job_name(job), "attempt": job_attempt(job)})
        if limits.suspend and not _is_suspended(job):
            decision.suspend.append(job)
        elif not limits.suspend and _is_suspended(job):
            decision.resume.append(job)

    if limits.suspend:
        # A retry that cannot start now keeps its entry, so its attempt number is not lost.
        decision.active.extend(kept_vanished)
        return decision

    # Retries first (they take the slot their failed attempt held), then new trials in plan order.
    free = max(0, limits.max_concurrent - len(running))
    for creation in retries + [Creation(trial, 0) for trial in pending]:
        if free == 0:
            break
        decision.create.append(creation)
        decision.states[creation.trial.id] = "Running"
        decision.active.append({"trial": creation.trial.id, "job": job_name(study, creation.trial.id, creation.attempt),
                                "attempt": creation.attempt})
        free -= 1
    created = {creation.trial.id for creation in decision.create}
    decision.active.extend(entry for entry in kept_vanished if entry["trial"] not in created)
    return decision
