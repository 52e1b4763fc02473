"""Operator settings, from the command line (see wxscale_operator.main)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorConfig:
    """Settings shared by the handlers and the reconciler."""

    namespaces: tuple[str, ...] = ()  # empty: every namespace
    s3_endpoint: str | None = None  # endpoint of the output buckets, passed on to trainers too
    default_output: str | None = None  # output root for studies without spec.output: ROOT/<namespace>/<name>
    resync_seconds: float = 30.0  # how often every study is reconciled even without events
    fit_bootstrap: int = 200  # bootstrap resamples of the scaling-law fits (wxscale.fit)
    backoff_seconds: float = 10.0  # first wait after a failed reconcile; doubles per failure
    max_backoff_seconds: float = 300.0
    # PyTorchJobs (with their trial files) created, or deleted, at the same time within one reconcile pass.
    # 16 stays far below kube-apiserver's default --max-mutating-requests-inflight of 200.
    create_concurrency: int = 16
    metrics_port: int = 9090
    liveness_port: int = 8080
    bind_address: str = "0.0.0.0"

    def __post_init__(self) -> None:
        if self.create_concurrency < 1:
            raise ValueError(f"create_concurrency must be at least 1, got {self.create_concurrency}: "
                             "set --create-concurrency to 1 or more")
