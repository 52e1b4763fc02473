"""The study's status: one shape for the local `status.json` and the custom resource.

It follows the Kubernetes API conventions: `conditions` with type, status,
reason, message, lastTransitionTime and observedGeneration; a `phase` for
printer columns; counts by trial state; a bounded list of per-trial results;
the scaling-law fits; and a budget ledger of FLOPs and GPU-hours planned vs spent.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Iterable

from wxscale.planner import Trial

# Per-trial summaries kept in status. The custom resource lives in etcd, whose
# objects are limited to about 1.5 MiB; 200 summaries of ~400 bytes fit easily.
MAX_TRIAL_SUMMARIES = 200

TRIAL_STATES = ("Pending", "Running", "Succeeded", "Failed")


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def make_condition(previous: list[dict[str, Any]], type_: str, status: bool, reason: str, message: str,
               generation: int | None) -> dict[str, Any]:
    """Build a condition, keeping lastTransitionTime when the status did not change."""
    value = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    changed = old is None or old.get("status") != value
    condition = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now() if changed else old.get("lastTransitionTime", now()),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def best_rmse(record: dict[str, Any]) -> float | None:
    """Return the model's test RMSE averaged over variables, or None."""
    variables = (record.get("evaluation") or {}).get("variables") or {}
    values = [v["model"]["rmse"] for v in variables.values() if v.get("model", {}).get("rmse") is not None]
    return sum(values) / len(values) if values else None


def trial_summary(trial: Trial, state: str, record: dict[str, Any] | None,
                  details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summarize one trial; `details` (e.g. the operator's job name and attempt) are added as they are."""
    summary: dict[str, Any] = {
        "trial": trial.id,
        "index": trial.index,
        "state": state,
        "axisValues": {k: (v if not isinstance(v, dict) else str(v)) for k, v in trial.axis_values.items()},
        "params": trial.params,
        "plannedFlops": trial.total_flops,
    }
    if record:
        training = record.get("training") or {}
        evaluation = record.get("evaluation") or {}
        summary.update(
            samples=training.get("samples"),
            flops=training.get("flopsAnalytic"),
            wallSeconds=training.get("wallSeconds"),
            testLoss=evaluation.get("testLoss"),
            testRMSE=best_rmse(record),
        )
        if record.get("error"):
            summary["error"] = str(record["error"])[:300]
    if details:
        summary.update(details)
    return summary


def build_status(
    trials: Iterable[Trial],
    states: dict[str, str],
    records: dict[str, dict[str, Any]],
    fit: dict[str, Any] | None = None,
    previous: dict[str, Any] | None = None,
    generation: int | None = None,
    max_failed: int = 0,
    suspended: bool = False,
    gpus_per_trial: dict[str, int] | None = None,
    details: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Aggregate trial states, results and fits into a status document.

    `states` maps trial id to one of TRIAL_STATES (missing ids count as Pending).
    `records` maps trial id to its result record (succeeded or failed trials).
    `gpus_per_trial` maps trial id to the GPUs it requests (all replicas), for the budget ledger.
    `details` maps trial id to extra fields of its summary in `results`.
    """
    trials = list(trials)
    previous = previous or {}
    counts = {state.lower(): 0 for state in TRIAL_STATES}
    for trial in trials:
        counts[states.get(trial.id, "Pending").lower()] += 1
    total = len(trials)

    # Phase and conditions. Failure wins over completion: a study past its
    # failure budget has failed even if the remaining trials finished.
    failed_study = counts["failed"] > max_failed
    done = counts["succeeded"] + counts["failed"] == total
    if failed_study:
        phase = "Failed"
    elif done:
        phase = "Succeeded"
    elif suspended:
        phase = "Suspended"
    elif counts["running"] or counts["succeeded"] or counts["failed"]:
        phase = "Running"
    else:
        phase = "Pending"

    old_conditions = previous.get("conditions") or []
    progress = f"{counts['succeeded']}/{total} trials succeeded, {counts['failed']} failed, {counts['running']} running"
    conditions = [
        make_condition(old_conditions, "Running", phase == "Running", "TrialsRunning" if phase == "Running" else
                   {"Failed": "StudyFailed", "Succeeded": "AllTrialsFinished", "Suspended": "Suspended",
                    "Pending": "Waiting"}[phase], progress, generation),
        make_condition(old_conditions, "Complete", phase == "Succeeded",
                   "AllTrialsFinished" if phase == "Succeeded" else "TrialsRemaining", progress, generation),
        make_condition(old_conditions, "Failed", failed_study,
                   "TooManyFailedTrials" if failed_study else "WithinFailureBudget",
                   f"{counts['failed']} failed trial(s), maxFailedTrials is {max_failed}", generation),
        make_condition(old_conditions, "Suspended", suspended, "SpecSuspended" if suspended else "NotSuspended",
                   "spec.suspend is true" if suspended else "spec.suspend is false", generation),
    ]

    details = details or {}
    summaries = [trial_summary(t, states.get(t.id, "Pending"), records.get(t.id), details.get(t.id)) for t in trials]
    finished = [s for s in summaries if s["state"] in ("Succeeded", "Failed")]
    others = [s for s in summaries if s["state"] not in ("Succeeded", "Failed")]
    kept = (finished + others)[:MAX_TRIAL_SUMMARIES]

    rmses = [s["testRMSE"] for s in summaries if s.get("testRMSE") is not None and math.isfinite(s["testRMSE"])]
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions,
        "trials": {"total": total, **counts},
        "trialsSucceeded": counts["succeeded"],
        "trialsTotal": total,
        "trialsFailed": counts["failed"],
        "progress": f"{counts['succeeded']}/{total}",
        "bestTestRMSE": min(rmses) if rmses else None,
        "results": kept,
        "resultsTruncated": len(summaries) > MAX_TRIAL_SUMMARIES,
        "budget": _ledger(trials, states, records, gpus_per_trial or {}),
        "updatedAt": now(),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    if fit is not None:
        status["fit"] = fit
        exponent = ((fit.get("lossVsFlops") or {}).get("parameters") or {}).get("alpha", {}).get("value")
        status["fittedExponent"] = exponent
        compute_optimal = compute_optimal_summary(fit.get("computeOptimal"))
        if compute_optimal is not None:
            status["computeOptimal"] = compute_optimal
    return status


def compute_optimal_summary(analysis: dict[str, Any] | None) -> dict[str, Any] | None:
    """Condense `wxscale.isoflop.analyse_compute_optimal` for the status: exponents, recommendation, agreement.

    Returns None when the analysis is missing or is a note (the study has no IsoFLOP profiles).
    Estimates keep their value and interval: {"value", "low", "high"}.
    """
    if not analysis or "note" in analysis:
        return None
    exponents = analysis.get("exponents") or {}
    second = exponents.get("approach2") or {}
    third = exponents.get("approach3") or {}
    recommendation = analysis.get("recommendation") or {}
    agreement = analysis.get("agreement") or {}
    return {
        "exponents": {
            "a": {"approach2": second.get("a"), "approach3": third.get("a")},
            "b": {"approach2": second.get("b"), "approach3": third.get("b")},
            "alpha": third.get("alpha"),
            "beta": third.get("beta"),
        },
        "recommendation": {key: recommendation.get(key) for key in ("flops", "method", "params", "samples", "loss")},
        "agreement": {"agree": agreement.get("agree"), "warning": agreement.get("warning")},
    }


def _ledger(trials: list[Trial], states: dict[str, str], records: dict[str, dict[str, Any]],
            gpus_per_trial: dict[str, int]) -> dict[str, Any]:
    """FLOPs and GPU-hours planned for all trials vs spent by finished ones.

    GPU-hours spent = sum over finished trials of GPUs x wallSeconds / 3600. The
    planned GPU-hours are an estimate: hours spent, plus the planned FLOPs of the
    unfinished GPU trials / R, where R = sum(FLOPs) / sum(GPU-seconds) over the
    finished GPU trials (the measured FLOP rate per GPU, assumed the same at every
    GPU count). It is None until one GPU trial finished.
    """
    planned_flops = sum(t.total_flops for t in trials)
    spent_flops = 0.0
    spent_gpu_seconds = 0.0
    rate_flops, rate_gpu_seconds = 0.0, 0.0
    allocated = 0
    unfinished: list[Trial] = []
    for trial in trials:
        record = records.get(trial.id) or {}
        training = record.get("training") or {}
        flops = (training.get("flopsAnalytic") or 0.0) + (training.get("flopsCooldownBranches") or 0.0)
        gpus = gpus_per_trial.get(trial.id, 0)
        gpu_seconds = gpus * (training.get("wallSeconds") or 0.0)
        spent_flops += flops
        spent_gpu_seconds += gpu_seconds
        if flops and gpu_seconds:
            rate_flops += flops
            rate_gpu_seconds += gpu_seconds
        state = states.get(trial.id, "Pending")
        if state == "Running":
            allocated += gpus
        if state not in ("Succeeded", "Failed"):
            unfinished.append(trial)

    planned_gpu_hours = None
    if rate_gpu_seconds > 0:
        flops_per_gpu_second = rate_flops / rate_gpu_seconds
        remaining = sum(t.total_flops for t in unfinished if gpus_per_trial.get(t.id, 0)) / flops_per_gpu_second
        planned_gpu_hours = round((spent_gpu_seconds + remaining) / 3600.0, 4)
    return {
        "flopsPlanned": planned_flops,
        "flopsSpent": spent_flops,
        "gpuHoursSpent": round(spent_gpu_seconds / 3600.0, 4),
        "gpuHoursPlanned": planned_gpu_hours,
        "gpusAllocated": allocated,
    }
