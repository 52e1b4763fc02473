"""Prometheus metrics of the operator, served by `prometheus_client` on --metrics-port."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECONCILES = Counter("wxscale_operator_reconciles", "Reconcile passes of ScalingStudies, by result (ok, error).",
                     ["result"])
RECONCILE_SECONDS = Histogram("wxscale_operator_reconcile_seconds", "Duration of successful reconcile passes.",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
JOBS_CREATED = Counter("wxscale_operator_jobs_created", "PyTorchJobs created for trials.")
TRIALS_FINISHED = Counter("wxscale_operator_trials_finished", "Trials seen finishing, by state.", ["state"])
