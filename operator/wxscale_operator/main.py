"""`wxscale-operator`: run the ScalingStudy operator (kopf) with a metrics endpoint.

    wxscale-operator --namespace studies --s3-endpoint http://minio:9000
    wxscale-operator --all-namespaces --default-output s3://bucket/studies

The operator's own S3 credentials come from the standard AWS_* environment
variables; trainer pods get theirs from each study's spec.cluster.credentialsSecret.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from typing import Any, Callable, Sequence

import kopf
from prometheus_client import start_http_server

from wxscale.logs import setup_logging
from wxscale_operator.config import OperatorConfig
from wxscale_operator.handlers import register

logger = logging.getLogger("wxscale_operator")


def positive_int(text: str) -> int:
    """Parse an integer of at least 1 for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}: use a whole number such as 16") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small: use 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wxscale-operator",
                                     description="Run ScalingStudy trials as Kubeflow PyTorchJobs.")
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument("--namespace", "-n", action="append", dest="namespaces", metavar="NAMESPACE",
                       help="namespace to watch; repeat for several")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    parser.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL_S3"),
                        help="S3 endpoint URL of the output buckets, also passed to trainers "
                             "(default $AWS_ENDPOINT_URL_S3, else AWS)")
    parser.add_argument("--default-output", default=None,
                        help="output root for studies without spec.output; a study writes to ROOT/NAMESPACE/NAME")
    parser.add_argument("--resync-seconds", type=float, default=30.0,
                        help="seconds between periodic reconciles of each study (default 30)")
    parser.add_argument("--create-concurrency", type=positive_int, default=16,
                        help="PyTorchJobs a reconcile pass creates or deletes at the same time, each with its "
                             "trial file in S3 (default 16)")
    parser.add_argument("--fit-bootstrap", type=int, default=200,
                        help="bootstrap resamples for the scaling-law fit intervals (default 200)")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (default 9090)")
    parser.add_argument("--liveness-port", type=int, default=8080,
                        help="liveness endpoint port, served at /healthz (default 8080)")
    parser.add_argument("--bind-address", default="0.0.0.0",
                        help="address of the metrics and liveness servers (default 0.0.0.0)")
    parser.add_argument("--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING (default INFO)")
    return parser


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        namespaces=tuple(args.namespaces or ()),
        s3_endpoint=args.s3_endpoint or None,
        default_output=args.default_output,
        resync_seconds=args.resync_seconds,
        fit_bootstrap=args.fit_bootstrap,
        create_concurrency=args.create_concurrency,
        metrics_port=args.metrics_port,
        liveness_port=args.liveness_port,
        bind_address=args.bind_address,
    )


async def run_operator(config: OperatorConfig, stop_flag: threading.Event | None = None,
                       ready_flag: threading.Event | None = None,
                       fit: Callable[[list[dict[str, Any]]], dict[str, Any] | None] | None = None) -> None:
    """Run the operator until stopped (signal or `stop_flag`); serve /healthz on the liveness port.

    `fit` replaces the scaling-law fit (default: wxscale.fit.fit_study with --fit-bootstrap resamples).
    """
    registry = kopf.OperatorRegistry()
    register(registry, config, fit=fit)
    await kopf.operator(
        registry=registry,
        standalone=True,  # one replica (Deployment strategy Recreate): no peering objects needed
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        liveness_endpoint=f"http://{config.bind_address}:{config.liveness_port}/healthz",
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if logging.getLogger().level > logging.DEBUG:
        # kopf logs every handler success at INFO; the operator logs what it does itself.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    config = config_from_args(args)
    start_http_server(config.metrics_port, addr=config.bind_address)
    scope = ", ".join(config.namespaces) if config.namespaces else "all namespaces"
    logger.info("starting: watching %s; metrics on %s:%d, liveness on %s:%d/healthz", scope, config.bind_address,
                config.metrics_port, config.bind_address, config.liveness_port)
    asyncio.run(run_operator(config))
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
