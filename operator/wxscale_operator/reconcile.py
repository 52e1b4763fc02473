"""One reconcile pass of a ScalingStudy: observe, decide, act, write status.

The pass is level-based: it reads the study, its PyTorchJobs and the result
records in the output location, calls `wxscale_operator.trials.decide` for
the actions, takes them, and writes the status. Running it twice in a row changes nothing
the second time, so every trigger (study change, job event, resync loop) can run it.

Passes for one study never overlap (a lock per study), and a request that
arrives while a pass waits for the lock is folded into that pass. A pass that
fails (API or storage error) makes the study wait before the next one:
`backoff_seconds`, doubling per failure up to `max_backoff_seconds`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, TypeVar

from pydantic import ValidationError

from wxscale.errors import StudyError, WxscaleError, describe_validation_error
from wxscale.planner import Trial, plan
from wxscale.spec import API_VERSION, KIND, ScalingStudy
from wxscale.status import build_status, make_condition, now
from wxscale.storage import Location
from wxscale.trialspec import TrialSpec, trial_folder
from wxscale_operator import metrics
from wxscale_operator.config import OperatorConfig
from wxscale_operator.jobs import JobTarget, gpus_per_trial, job_seconds, owner_uid, pytorchjob_manifest
from wxscale_operator.kube import EVENTS, PYTORCHJOBS, SCALINGSTUDIES, ApiError, KubeClient
from wxscale_operator.naming import MANAGED_BY, STUDY_LABEL, job_name
from wxscale_operator.trials import Creation, Decision, Failure, Limits, decide

logger = logging.getLogger(__name__)

Item = TypeVar("Item")

# The API server rejects Event messages longer than 1 KiB.
MAX_EVENT_MESSAGE = 1024

# Status fields compared to decide whether a status patch is needed (updatedAt always changes).
_VOLATILE_STATUS_FIELDS = ("updatedAt",)


def spec_fingerprint(study: ScalingStudy) -> str:
    """Return a hash of spec.data and spec.model, the fields finished results depend on."""
    document = {"data": study.spec.data.dump(), "model": study.spec.model.dump()}
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class SpecRejected(Exception):
    """A study the operator cannot run as written; `reason` is the SpecAccepted condition's reason."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        self.message = message
        super().__init__(message)


def event_manifest(study: dict[str, Any], kind: str, reason: str, message: str) -> dict[str, Any]:
    """Return a core/v1 Event about the study (`kind` is Normal or Warning)."""
    metadata = study["metadata"]
    timestamp = now()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{metadata['name']}.", "namespace": metadata["namespace"]},
        "involvedObject": {"apiVersion": study.get("apiVersion", API_VERSION), "kind": KIND,
                           "name": metadata["name"], "namespace": metadata["namespace"], "uid": metadata.get("uid"),
                           "resourceVersion": metadata.get("resourceVersion")},
        "type": kind,
        "reason": reason,
        "message": message[:MAX_EVENT_MESSAGE],
        "source": {"component": MANAGED_BY},
        "reportingComponent": MANAGED_BY,
        "firstTimestamp": timestamp,
        "lastTimestamp": timestamp,
        "count": 1,
    }


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """Return the JSON merge patch (RFC 7386) from the old status to the new one, or None when nothing changed.

    The patch contains only the members that changed, so a pass that changes one
    counter does not resend the per-trial lists. Members that the new status
    lacks or sets to null become null, which deletes them. A list that changed is
    sent whole, because a merge patch replaces lists. `updatedAt` is sent with
    every patch but never causes one.
    """
    patch = _merge_patch(old, new)
    for key in _VOLATILE_STATUS_FIELDS:
        patch.pop(key, None)
    if not patch:
        return None
    for key in _VOLATILE_STATUS_FIELDS:
        if key in new:
            patch[key] = new[key]
    return patch


def _without_nulls(value: Any) -> Any:
    # A merge patch deletes object members set to null; lists are stored as sent.
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    return value


def _merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Return the members of `new` that differ from `old`, recursing into objects; removed members are null."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if value is None:
            if before is not None:
                patch[key] = None
        elif isinstance(value, dict) and isinstance(before, dict):
            changes = _merge_patch(before, value)
            if changes:
                patch[key] = changes
        elif _without_nulls(value) != before:
            patch[key] = _without_nulls(value)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def created_event_message(created: list[tuple[Trial, str]]) -> str:
    """Return the TrialCreated message for the jobs one pass created: the count, plan indices and job names.

    Job names are listed in plan order until the next one would make the message
    longer than MAX_EVENT_MESSAGE; the rest are counted.
    """
    if len(created) == 1:
        trial, name = created[0]
        layout = trial.config.distributed
        return (f"created PyTorchJob {name} for trial {trial.id} ({layout.nodes} node(s) x "
                f"{layout.procs_per_node} process(es))")

    ordered = sorted(created, key=lambda pair: pair[0].index)
    ranges = index_ranges(trial.index for trial, _ in ordered)
    if len(ranges) > MAX_EVENT_MESSAGE // 4:
        # Scattered indices (retries between new trials) would crowd out the job names.
        ranges = ranges[:ranges.rfind(", ", 0, MAX_EVENT_MESSAGE // 4)] + ", ..."
    head = f"created {len(created)} PyTorchJobs for the trials with plan index {ranges}: "

    names: list[str] = []
    for position, (trial, name) in enumerate(ordered):
        entry = f"{name} ({trial.id})"
        remaining = len(ordered) - position - 1
        suffix = f", and {remaining} more" if remaining else ""
        if len(head + ", ".join(names + [entry]) + suffix) > MAX_EVENT_MESSAGE:
            break
        names.append(entry)
    unlisted = len(ordered) - len(names)
    return head + ", ".join(names) + (f", and {unlisted} more" if unlisted else "")


def index_ranges(indices: Iterable[int]) -> str:
    """Write sorted integers as ranges, e.g. [0, 1, 2, 5, 7, 8] as '0-2, 5, 7-8'."""
    parts: list[str] = []
    start = previous = None
    for index in sorted(set(indices)):
        if start is None:
            start = previous = index
        elif index == previous + 1:
            previous = index
        else:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = previous = index
    if start is not None:
        parts.append(str(start) if start == previous else f"{start}-{previous}")
    return ", ".join(parts)


@dataclass
class _StudyMemory:
    """Per-study state kept in memory by uid; all of it can be rebuilt from the cluster and storage."""

    plan_key: tuple[int, str] | None = None
    trials: list[Trial] | None = None
    written_study_json: int | None = None
    records: dict[str, dict[str, Any]] | None = None
    fit_key: str | None = None
    fit: dict[str, Any] | None = None
    fit_task: asyncio.Task | None = None


class Reconciler:
    """Reconciles ScalingStudies; `request` is what the kopf handlers call."""

    def __init__(self, client: KubeClient, config: OperatorConfig,
                 fit: Callable[[list[dict[str, Any]]], dict[str, Any] | None] | None = None):
        self.client = client
        self.config = config
        self._fit = fit
        self._memory: dict[str, _StudyMemory] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._requested: Counter[tuple[str, str]] = Counter()
        self._covered: dict[tuple[str, str], int] = {}
        self._failures: Counter[tuple[str, str]] = Counter()
        self._retry_at: dict[tuple[str, str], float] = {}
        self._known: set[tuple[str, str]] = set()
        self._storage_pool: ThreadPoolExecutor | None = None

    @property
    def tracked(self) -> int:
        """Number of studies the resync loop visits."""
        return len(self._known)

    def track(self, namespace: str, name: str) -> None:
        """Add a study to the periodic resync."""
        self._known.add((namespace, name))

    async def resync_forever(self) -> None:
        """Reconcile every tracked study every `resync_seconds`, concurrently, until cancelled."""
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            studies = sorted(self._known)
            await asyncio.gather(*(self.request(namespace, name, "resync") for namespace, name in studies))

    # Scheduling ----------------------------------------------------------------------

    async def request(self, namespace: str, name: str, trigger: str) -> None:
        """Reconcile a study soon; return when a pass that saw this request has finished.

        A pass starting after the request covers it, so requests that pile up while
        a pass runs cost one more pass, not one each. During a backoff the request
        is dropped, and the resync loop requests the study again later.
        """
        key = (namespace, name)
        if time.monotonic() < self._retry_at.get(key, 0.0):
            logger.debug("study %s/%s: %s ignored, waiting after a failed pass", namespace, name, trigger)
            return
        self._requested[key] += 1
        ticket = self._requested[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if self._covered.get(key, 0) >= ticket:
                return
            self._covered[key] = self._requested[key]
            started = time.monotonic()
            try:
                await self.reconcile(namespace, name)
            except Exception as error:  # Every failure backs off; unexpected ones are logged with the traceback.
                self._failures[key] += 1
                delay = min(self.config.max_backoff_seconds,
                            self.config.backoff_seconds * 2 ** (self._failures[key] - 1))
                self._retry_at[key] = time.monotonic() + delay
                metrics.RECONCILES.labels(result="error").inc()
                expected = isinstance(error, (ApiError, OSError, WxscaleError))
                logger.log(logging.WARNING if expected else logging.ERROR,
                           "study %s/%s: reconcile after %s failed (%s); next try in %.0f s", namespace, name,
                           trigger, error, delay, exc_info=not expected)
                return
            self._failures.pop(key, None)
            self._retry_at.pop(key, None)
            metrics.RECONCILES.labels(result="ok").inc()
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)

    async def close(self) -> None:
        """Close the API client and stop the storage threads."""
        await self.client.close()
        if self._storage_pool is not None:
            self._storage_pool.shutdown(wait=False, cancel_futures=True)
            self._storage_pool = None

    def forget(self, namespace: str, name: str, uid: str | None) -> None:
        """Drop the in-memory state of a deleted study."""
        key = (namespace, name)
        self._known.discard(key)
        metrics.forget_study(namespace, name)
        for table in (self._locks, self._requested, self._covered, self._failures, self._retry_at):
            table.pop(key, None)
        if uid:
            self._memory.pop(uid, None)

    # One pass ------------------------------------------------------------------------

    async def reconcile(self, namespace: str, name: str) -> None:
        """Observe the study, its jobs and results; create, stop or suspend jobs; write status."""
        try:
            body = await self.client.get(SCALINGSTUDIES, namespace, name)
        except ApiError as error:
            if error.not_found:
                logger.info("study %s/%s is gone; nothing to reconcile", namespace, name)
                return
            raise
        metadata = body.get("metadata") or {}
        if metadata.get("deletionTimestamp"):
            return  # the garbage collector deletes the jobs through their owner references
        uid = metadata.get("uid", "")
        generation = metadata.get("generation")
        previous = body.get("status") or {}
        memory = self._memory.setdefault(uid, _StudyMemory())

        try:
            study, output, fingerprint = self._accept(body, namespace)
            trials = await self._plan(memory, study, uid, generation)
        except SpecRejected as rejection:
            await self._write_status(body, self._rejected_status(previous, generation, rejection))
            return

        target = JobTarget(study=name, namespace=namespace, study_uid=uid, output_url=output.url,
                           s3_endpoint=self.config.s3_endpoint)
        if memory.written_study_json != generation:
            await asyncio.to_thread(output.write_json, "study.json", study.dump())
            memory.written_study_json = generation

        # Jobs first, then results: a job that succeeded wrote its result before it ended.
        jobs = await self._study_jobs(namespace, name, uid)
        records = await self._load_records(memory, output, trials)
        limits = Limits(max_concurrent=study.spec.max_concurrent_trials, max_failed=study.spec.max_failed_trials,
                        max_retries=study.spec.max_retries, suspend=study.spec.suspend)
        decision = decide(name, trials, jobs, records, previous.get("active") or [], limits)

        await self._record_failures(body, study, output, decision.failures, records)
        await self._stop_jobs(body, namespace, decision)
        await self._set_suspension(body, namespace, decision)
        await self._create_jobs(body, study, target, output, decision.create)

        fit = self._fit_records(memory, records, namespace, name)
        status = build_status(
            trials, decision.states, records, fit=fit, previous=previous, generation=generation,
            max_failed=study.spec.max_failed_trials, suspended=study.spec.suspend,
            gpus_per_trial={trial.id: gpus_per_trial(trial, study.spec.cluster) for trial in trials},
            details={entry["trial"]: {"job": entry["job"], "attempt": entry["attempt"]} for entry in decision.active},
        )
        status["conditions"].append(make_condition(previous.get("conditions") or [], "SpecAccepted", True, "Accepted",
                                                   f"{len(trials)} trial(s) planned", generation))
        status.update(active=decision.active, output=output.url, specFingerprint=fingerprint)
        await self._post_transitions(body, previous, status, decision)
        await self._write_status(body, status)

    # Spec ----------------------------------------------------------------------------

    def _accept(self, body: dict[str, Any], namespace: str) -> tuple[ScalingStudy, Location, str]:
        """Validate the study, check the immutable fields and resolve the output location."""
        name = body["metadata"]["name"]
        document = {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in body}
        try:
            study = ScalingStudy.model_validate(document)
        except ValidationError as error:
            problems = describe_validation_error(error)
            raise SpecRejected("InvalidSpec", "; ".join(problems)) from error

        fingerprint = spec_fingerprint(study)
        accepted = (body.get("status") or {}).get("specFingerprint")
        if accepted and accepted != fingerprint:
            raise SpecRejected(
                "ImmutableFieldChanged",
                "spec.data or spec.model changed after the study started, so new trials would not be comparable "
                "with finished ones. Restore the previous values, or create a new ScalingStudy for the new ones. "
                "No job is created or stopped until then.")

        url = study.spec.output
        if not url and self.config.default_output:
            url = f"{self.config.default_output.rstrip('/')}/{namespace}/{name}"
        if not url:
            raise SpecRejected("OutputMissing", "spec.output is missing and the operator has no --default-output: "
                                                "set spec.output to an object-storage URL, e.g. s3://bucket/studies/"
                                                f"{name}")
        if "://" not in url or url.startswith("file://"):
            raise SpecRejected("OutputNotShared", f"spec.output {url!r} is a local path, which trainer pods and the "
                                                  "operator do not share; use an object-storage URL such as "
                                                  f"s3://bucket/studies/{name}")
        return study, Location(url, self.config.s3_endpoint), fingerprint

    async def _plan(self, memory: _StudyMemory, study: ScalingStudy, uid: str, generation: int | None) -> list[Trial]:
        """Plan the trials once per generation (planning may open the data source)."""
        key = (generation or 0, spec_fingerprint(study) + json.dumps(study.spec.dump(), sort_keys=True))
        if memory.plan_key == key and memory.trials is not None:
            return memory.trials
        try:
            trials = await asyncio.to_thread(plan, study)
        except StudyError as error:
            raise SpecRejected("InvalidSpec", "; ".join(error.problems)) from error
        except WxscaleError as error:  # e.g. a data source that cannot be opened for its grid size
            raise SpecRejected("PlanFailed", str(error)) from error
        memory.plan_key, memory.trials = key, trials
        logger.info("study %s (uid %s): %d trial(s) planned, %.3g training FLOPs", study.metadata.name, uid,
                    len(trials), sum(t.total_flops for t in trials))
        return trials

    def _rejected_status(self, previous: dict[str, Any], generation: int | None,
                         rejection: SpecRejected) -> dict[str, Any]:
        """Return the status of a study whose spec was not accepted.

        A study that never ran fails until its spec is fixed. A study that ran
        keeps its previous status with SpecAccepted False: its jobs are left alone,
        and no job is created or stopped until the spec is fixed.
        """
        conditions = previous.get("conditions") or []
        accepted = make_condition(conditions, "SpecAccepted", False, rejection.reason, rejection.message, generation)
        if previous.get("phase") and previous.get("specFingerprint"):
            status = dict(previous)
            status["conditions"] = [c for c in conditions if c.get("type") != "SpecAccepted"] + [accepted]
            status["observedGeneration"] = generation
            status["updatedAt"] = now()
            return status

        status = build_status([], {}, {}, previous=previous, generation=generation)
        status["phase"] = "Failed"
        status["conditions"] = [
            make_condition(conditions, "Running", False, rejection.reason, rejection.message, generation),
            make_condition(conditions, "Complete", False, rejection.reason, rejection.message, generation),
            make_condition(conditions, "Failed", True, rejection.reason, rejection.message, generation),
            make_condition(conditions, "Suspended", False, "NotSuspended", "", generation),
            accepted,
        ]
        status["active"] = previous.get("active") or []
        return status

    # Observation ---------------------------------------------------------------------

    async def _study_jobs(self, namespace: str, name: str, uid: str) -> list[dict[str, Any]]:
        """List the study's PyTorchJobs: its label and, as controller owner, its uid."""
        jobs = await self.client.list(PYTORCHJOBS, namespace, labels={STUDY_LABEL: name})
        own = [job for job in jobs if owner_uid(job) == uid and not job["metadata"].get("deletionTimestamp")]
        if len(own) < len(jobs):
            logger.info("study %s/%s: ignoring %d job(s) of an earlier study of the same name or being deleted",
                        namespace, name, len(jobs) - len(own))
        return own

    async def _load_records(self, memory: _StudyMemory, output: Location,
                            trials: list[Trial]) -> dict[str, dict[str, Any]]:
        """Return the result records of the planned trials, reading only those not read before."""
        if memory.records is None:
            memory.records = {}

        def read_new() -> dict[str, dict[str, Any]]:
            # s3fs caches listings, and the trainers write behind its back. One recursive
            # listing of trials/ costs one request per 1000 keys; a glob would list every folder.
            output.fs.invalidate_cache()
            found = {path.rstrip("/").split("/")[-2] for path in output.fs.find(output.path("trials"))
                     if path.endswith("/result.json")}
            planned = {trial.id for trial in trials}
            new = {}
            for trial_id in sorted((found & planned) - set(memory.records)):
                new[trial_id] = output.read_json(f"{trial_folder(trial_id)}/result.json")
            return new

        new_records = await asyncio.to_thread(read_new)
        metrics.RESULTS_COLLECTED.inc(len(new_records))
        memory.records.update(new_records)
        return {trial.id: memory.records[trial.id] for trial in trials if trial.id in memory.records}

    # Actions -------------------------------------------------------------------------

    async def _record_failures(self, body: dict[str, Any], study: ScalingStudy, output: Location,
                               failures: list[Failure], records: dict[str, dict[str, Any]]) -> None:
        """Write a Failed record for each trial that failed for good, with the trainer's error if it left one."""
        for failure in failures:
            trial = failure.trial
            message = await asyncio.to_thread(_trainer_error, output, trial.id) or failure.message
            record: dict[str, Any] = {
                "apiVersion": study.api_version, "kind": "TrialResult", "study": study.metadata.name,
                "trial": trial.id, "index": trial.index, "state": "Failed", "error": message,
                "attempts": failure.attempt + 1, "axisValues": trial.axis_values, "config": trial.config.dump(),
            }
            seconds = job_seconds(failure.job) if failure.job else None
            if seconds is not None:
                record["training"] = {"wallSeconds": seconds}
            await asyncio.to_thread(output.write_json, f"{trial_folder(trial.id)}/result.json", record)
            records[trial.id] = record
            metrics.TRIALS_FINISHED.labels(state="Failed").inc()
            metrics.JOBS_FAILED.inc()
            logger.warning("study %s: trial %s failed after %d attempt(s): %s", study.metadata.name, trial.id,
                           failure.attempt + 1, message)
            await self._event(body, "Warning", "TrialFailed",
                       f"trial {trial.id} failed after {failure.attempt + 1} attempt(s): {message[:300]}")

    async def _stop_jobs(self, body: dict[str, Any], namespace: str, decision: Decision) -> None:
        """Delete the jobs of retired trials and every running job of a failed study, some at the same time.

        At most `create_concurrency` deletions run at once.
        """

        async def stop(entry: tuple[dict[str, Any], str]) -> None:
            job, reason = entry
            name = job["metadata"]["name"]
            deleted = await self.client.delete(PYTORCHJOBS, namespace, name)
            if deleted:
                logger.info("study %s/%s: deleted PyTorchJob %s (%s)", namespace, body["metadata"]["name"], name,
                            reason)
                await self._event(body, "Normal", "JobDeleted", f"deleted PyTorchJob {name}: {reason}")

        await self._run_bounded(decision.delete, stop)

    async def _set_suspension(self, body: dict[str, Any], namespace: str, decision: Decision) -> None:
        """Suspend or resume running jobs through runPolicy.suspend, following spec.suspend."""
        for jobs, suspend in ((decision.suspend, True), (decision.resume, False)):
            for job in jobs:
                name = job["metadata"]["name"]
                try:
                    await self.client.patch(PYTORCHJOBS, namespace, name, {"spec": {"runPolicy": {"suspend": suspend}}})
                except ApiError as error:
                    if not error.not_found:
                        raise
                    continue
                verb = "suspended" if suspend else "resumed"
                logger.info("study %s/%s: %s PyTorchJob %s", namespace, body["metadata"]["name"], verb, name)
                await self._event(body, "Normal", "JobSuspended" if suspend else "JobResumed",
                                  f"{verb} PyTorchJob {name}")

    async def _run_bounded(self, items: list[Item], action: Callable[[Item], Awaitable[Any]]) -> None:
        """Run `action` on every item, at most `create_concurrency` at a time, in list order.

        After the first failure no further item starts. The items in flight
        finish, then the first error is raised.
        """
        pending = iter(items)
        errors: list[Exception] = []

        async def worker() -> None:
            # The workers share one iterator, so each item is taken by exactly one of them.
            for item in pending:
                if errors:
                    return
                try:
                    await action(item)
                except Exception as error:  # re-raised below, once the other workers stopped
                    errors.append(error)
                    return

        workers = min(self.config.create_concurrency, len(items))
        await asyncio.gather(*(worker() for _ in range(workers)))
        if errors:
            raise errors[0]

    async def _create_jobs(self, body: dict[str, Any], study: ScalingStudy, target: JobTarget, output: Location,
                           creations: list[Creation]) -> None:
        """Create the pass's PyTorchJobs with bounded concurrency, then post one TrialCreated event for them.

        The event names the jobs that were created even when a creation failed
        and the pass raises. Retries get their own TrialRetrying event each,
        with the reason the previous attempt failed.
        """
        if not creations:
            return
        created: list[tuple[Trial, str]] = []
        retried: list[str] = []
        existing: list[str] = []
        started = time.monotonic()

        async def create(creation: Creation) -> None:
            name = await self._create_job(body, study, target, output, creation)
            if name is None:
                existing.append(job_name(target.study, creation.trial.id, creation.attempt))
            elif creation.retry_of:
                retried.append(name)
            else:
                created.append((creation.trial, name))

        try:
            await self._run_bounded(creations, create)
        finally:
            logger.info("study %s/%s: created %d PyTorchJob(s) for new trials and %d for retries in %.2f s, "
                        "%d already existed, %d of %d planned creations done (at most %d at a time)",
                        target.namespace, target.study, len(created), len(retried), time.monotonic() - started,
                        len(existing), len(created) + len(retried) + len(existing), len(creations),
                        self.config.create_concurrency)
            if created:
                await self._event(body, "Normal", "TrialCreated", created_event_message(created))

    async def _create_job(self, body: dict[str, Any], study: ScalingStudy, target: JobTarget, output: Location,
                          creation: Creation) -> str | None:
        """Write the attempt's trial file, then create its PyTorchJob; return its name, or None after a 409.

        A 409 means the job exists already (deterministic names), e.g. after an
        operator restart or a listing that missed it, so it counts as success.
        """
        trial, attempt = creation.trial, creation.attempt
        name = job_name(target.study, trial.id, attempt)
        spec = TrialSpec.from_trial(target.study, trial)

        def write_trial_file() -> str:
            if attempt:
                output.remove(f"{trial_folder(trial.id)}/error.json")  # the last attempt's error is stale now
            return output.write_json(f"{trial_folder(trial.id)}/trial.json", spec.to_dict())

        trial_url = await asyncio.get_running_loop().run_in_executor(self._storage_threads(), write_trial_file)
        manifest = pytorchjob_manifest(trial, attempt, study.spec.cluster, target, trial_url)
        try:
            await self.client.create(PYTORCHJOBS, target.namespace, manifest)
        except ApiError as error:
            if error.conflict:
                # Counted in the pass's summary line, so that a restart mid-fan-out logs one line, not one per job.
                logger.debug("study %s/%s: PyTorchJob %s already exists", target.namespace, target.study, name)
                return None
            raise
        metrics.JOBS_CREATED.inc()
        if creation.retry_of:
            metrics.JOBS_FAILED.inc()
            metrics.JOBS_RETRIED.inc()
            logger.warning("study %s/%s: trial %s attempt %d failed (%s); created PyTorchJob %s", target.namespace,
                           target.study, trial.id, attempt - 1, creation.retry_of, name)
            await self._event(body, "Warning", "TrialRetrying", f"trial {trial.id} attempt {attempt - 1} failed: "
                       f"{creation.retry_of[:200]}; created PyTorchJob {name} (attempt {attempt})")
        else:
            layout = trial.config.distributed
            logger.debug("study %s/%s: created PyTorchJob %s for trial %s (%d node(s) x %d process(es))",
                         target.namespace, target.study, name, trial.id, layout.nodes, layout.procs_per_node)
        return name

    def _storage_threads(self) -> ThreadPoolExecutor:
        """Return the threads that write trial files, one per concurrent creation.

        A pool of its own keeps long fits in the default executor from delaying job creation.
        """
        if self._storage_pool is None:
            self._storage_pool = ThreadPoolExecutor(max_workers=self.config.create_concurrency,
                                                    thread_name_prefix="wxscale-storage")
        return self._storage_pool

    async def _event(self, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """Post an Event on the study; a failure is logged and does not stop the pass."""
        namespace = body["metadata"]["namespace"]
        try:
            await self.client.create(EVENTS, namespace, event_manifest(body, kind, reason, message))
        except ApiError as error:
            logger.warning("study %s/%s: could not post event %s: %s", namespace, body["metadata"]["name"], reason,
                           error)

    # Fit and status ------------------------------------------------------------------

    def _fit_records(self, memory: _StudyMemory, records: dict[str, dict[str, Any]], namespace: str,
                     name: str) -> dict[str, Any] | None:
        """Return the latest fit, and start fitting again when the set of succeeded trials changed.

        The fit can take a minute, so it runs in a worker thread as a background
        task and job tracking goes on meanwhile. When it finishes, it requests
        another pass, which writes it to the status. One fit runs per study at a time.
        """
        succeeded = [records[key] for key in sorted(records) if records[key].get("state") == "Succeeded"]
        key = ",".join(record.get("trial", "") for record in succeeded)
        if key == memory.fit_key or (memory.fit_task is not None and not memory.fit_task.done()):
            return memory.fit
        if not succeeded:
            memory.fit, memory.fit_key = None, key
            return None
        fit_function = self._fit or default_fit(self.config.fit_bootstrap)

        async def fit_in_background() -> None:
            started = time.monotonic()
            result = await asyncio.to_thread(fit_function, succeeded)
            memory.fit, memory.fit_key = result, key
            logger.info("study %s/%s: fitted scaling laws to %d succeeded trial(s) in %.1f s", namespace, name,
                        len(succeeded), time.monotonic() - started)
            await self.request(namespace, name, "fit finished")

        memory.fit_task = asyncio.create_task(fit_in_background(), name=f"fit {namespace}/{name}")
        return memory.fit

    async def _post_transitions(self, body: dict[str, Any], previous: dict[str, Any], status: dict[str, Any],
                          decision: Decision) -> None:
        """Post TrialSucceeded for trials that the previous status did not list as succeeded, and StudyFailed."""
        before = {entry.get("trial"): entry.get("state") for entry in previous.get("results") or []}
        for entry in status["results"]:
            if entry["state"] == "Succeeded" and before.get(entry["trial"]) != "Succeeded":
                rmse = entry.get("testRMSE")
                metrics.TRIALS_FINISHED.labels(state="Succeeded").inc()
                await self._event(body, "Normal", "TrialSucceeded", f"trial {entry['trial']} succeeded: test loss "
                           f"{entry.get('testLoss')}, test RMSE {rmse}")
        if status["phase"] == "Failed" and previous.get("phase") != "Failed":
            stopped = sum(1 for _, reason in decision.delete if reason == "StudyFailed")
            message = (f"{decision.failed_count} trial(s) failed, more than maxFailedTrials="
                       f"{body['spec'].get('maxFailedTrials', 0)}; deleted {stopped} running PyTorchJob(s)")
            logger.error("study %s/%s failed: %s", body["metadata"].get("namespace"), body["metadata"]["name"],
                         message)
            await self._event(body, "Warning", "StudyFailed", message)

    async def _write_status(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        """Merge-patch the status subresource when it changed."""
        metrics.observe_study(body["metadata"]["namespace"], body["metadata"]["name"], status)
        patch = status_patch(body.get("status") or {}, status)
        if patch is None:
            return
        metadata = body["metadata"]
        await self.client.patch(SCALINGSTUDIES, metadata["namespace"], metadata["name"], {"status": patch},
                                subresource="status")


def _trainer_error(output: Location, trial_id: str) -> str | None:
    """Return the error the trainer recorded in trials/<id>/error.json, if any."""
    path = f"{trial_folder(trial_id)}/error.json"
    if not output.exists(path):
        return None
    return str(output.read_json(path).get("error") or "") or None


def default_fit(n_boot: int) -> Callable[[list[dict[str, Any]]], dict[str, Any] | None]:
    """Return wxscale.fit.fit_study with `n_boot` resamples, or a stand-in when the module is missing."""

    def fit(records: list[dict[str, Any]]) -> dict[str, Any] | None:
        try:
            from wxscale.fit import fit_study
        except ImportError as error:
            logger.warning("scaling-law fit skipped: %s", error)
            return None
        try:
            return fit_study(records, n_boot=n_boot)
        except Exception as error:  # A fit bug must not stop job tracking, so the error goes into the status.
            logger.exception("scaling-law fit failed")
            return {"note": f"fit failed: {type(error).__name__}: {error}"}

    return fit

