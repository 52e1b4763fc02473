"""Prometheus metrics of the operator, served by `prometheus_client` on --metrics-port.

Counters count what this operator process did since it started: reconcile
passes, PyTorchJobs created, failed and retried, trials finished and result
records collected. Gauges describe the studies it tracks: studies by phase,
each study's trials by state, and its GPU time spent and planned. They come
from the status the latest reconcile pass wrote (`observe_study`) and vanish
when the study is deleted (`forget_study`), so the study label stays bounded
by the studies that exist.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from wxscale.status import TRIAL_STATES

STUDY_PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")

RECONCILES = Counter("wxscale_operator_reconciles", "Reconcile passes of ScalingStudies, by result (ok, error).",
                     ["result"])
RECONCILE_SECONDS = Histogram("wxscale_operator_reconcile_duration_seconds", "Duration of successful reconcile passes.",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
JOBS_CREATED = Counter("wxscale_operator_jobs_created", "PyTorchJobs created for trials, retries included.")
JOBS_FAILED = Counter("wxscale_operator_jobs_failed", "Trial attempts whose PyTorchJob failed, succeeded without a "
                                                      "result record, or disappeared.")
JOBS_RETRIED = Counter("wxscale_operator_jobs_retried", "PyTorchJobs created to retry a failed attempt.")
TRIALS_FINISHED = Counter("wxscale_operator_trials_finished", "Trials seen finishing, by state.", ["state"])
RESULTS_COLLECTED = Counter("wxscale_operator_results_collected",
                            "Trial result records read from study output locations.")

# Series at zero from the start, so that rates and dashboards work before the first event.
for _result in ("ok", "error"):
    RECONCILES.labels(result=_result)
for _state in ("Succeeded", "Failed"):
    TRIALS_FINISHED.labels(state=_state)


@dataclass(frozen=True)
class _StudySnapshot:
    phase: str
    trials: dict[str, int]  # by state in TRIAL_STATES
    spent_gpu_seconds: float
    planned_gpu_seconds: float | None


class StudyCollector(Collector):
    """Gauges of the tracked studies, built at scrape time from the latest status of each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._studies: dict[tuple[str, str], _StudySnapshot] = {}

    def observe(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        trials = status.get("trials") or {}
        budget = status.get("budget") or {}
        planned_hours = budget.get("gpuHoursPlanned")
        snapshot = _StudySnapshot(
            phase=str(status.get("phase") or "Pending"),
            trials={state: int(trials.get(state.lower()) or 0) for state in TRIAL_STATES},
            spent_gpu_seconds=float(budget.get("gpuHoursSpent") or 0.0) * 3600.0,
            planned_gpu_seconds=None if planned_hours is None else float(planned_hours) * 3600.0,
        )
        with self._lock:
            self._studies[(namespace, name)] = snapshot

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._studies.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            studies = sorted(self._studies.items())

        by_phase = GaugeMetricFamily("wxscale_operator_studies", "Tracked ScalingStudies, by phase.",
                                     labels=["phase"])
        for phase in STUDY_PHASES:
            by_phase.add_metric([phase], sum(1 for _, study in studies if study.phase == phase))
        yield by_phase

        phase = GaugeMetricFamily("wxscale_operator_study_phase", "1 for the study's current phase, 0 for the others.",
                                  labels=["namespace", "study", "phase"])
        trials = GaugeMetricFamily("wxscale_operator_study_trials", "Trials of a study, by state.",
                                   labels=["namespace", "study", "state"])
        spent = GaugeMetricFamily("wxscale_operator_study_spent_gpu_seconds",
                                  "GPU time the study's finished trials used (GPUs x wall time).",
                                  labels=["namespace", "study"])
        planned = GaugeMetricFamily("wxscale_operator_study_planned_gpu_seconds",
                                    "GPU time the whole study is estimated to need: spent plus the remaining FLOPs at "
                                    "the FLOP rate of the finished trials. Absent until a GPU trial has finished.",
                                    labels=["namespace", "study"])
        for (namespace, name), study in studies:
            for value in STUDY_PHASES:
                phase.add_metric([namespace, name, value], 1.0 if study.phase == value else 0.0)
            for state, count in study.trials.items():
                trials.add_metric([namespace, name, state], count)
            spent.add_metric([namespace, name], study.spent_gpu_seconds)
            if study.planned_gpu_seconds is not None:
                planned.add_metric([namespace, name], study.planned_gpu_seconds)
        yield from (phase, trials, spent, planned)


STUDIES = StudyCollector()
REGISTRY.register(STUDIES)


def observe_study(namespace: str, name: str, status: dict[str, Any]) -> None:
    """Update the gauges of one study from the status a reconcile pass wrote (see wxscale.status.build_status)."""
    STUDIES.observe(namespace, name, status)


def forget_study(namespace: str, name: str) -> None:
    """Remove a deleted study's gauges."""
    STUDIES.forget(namespace, name)
