"""Trainer entry point: `python -m wxscale_trainer --trial URL --output URL`.

This is the command every trial runs, locally under torchrun and in a
PyTorchJob pod alike. Both torchrun and the Kubeflow training operator set
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Rank 0 writes the result record
to `OUTPUT/trials/<trial>/result.json`; a failure writes a record with
state Failed and the error, then exits non-zero. With --metrics-port every
process serves Prometheus metrics (docs/telemetry.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from wxscale.errors import WxscaleError
from wxscale.logs import setup_logging
from wxscale.storage import Location
from wxscale_trainer.runtime import init_runtime, shutdown
from wxscale.trialspec import TrialSpec, trial_folder

logger = logging.getLogger("wxscale_trainer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wxscale-train", description="Train and evaluate one wxscale trial.")
    parser.add_argument("--trial", required=True,
                        help="path or URL of the trial file (TrialSpec JSON) written by `wxscale run` or the operator")
    parser.add_argument("--output", required=True, help="study output location (folder or s3:// prefix)")
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    metrics = parser.add_argument_group("metrics (see docs/telemetry.md)")
    metrics.add_argument("--metrics-port", type=int, default=os.environ.get("WXSCALE_METRICS_PORT"), metavar="PORT",
                         help="serve Prometheus metrics on this port plus LOCAL_RANK (default $WXSCALE_METRICS_PORT; "
                              "unset: no endpoint)")
    metrics.add_argument("--metrics-address", default="0.0.0.0", metavar="ADDRESS",
                         help="address the metrics endpoint listens on (default 0.0.0.0)")
    metrics.add_argument("--metrics-linger", type=float, default=0.0, metavar="SECONDS",
                         help="keep the metrics endpoint up this many seconds after the trial, so that Prometheus "
                              "scrapes the final values (default 0)")
    metrics.add_argument("--pushgateway", default=os.environ.get("WXSCALE_PUSHGATEWAY"), metavar="URL",
                         help="push the final metrics to this Prometheus pushgateway (default $WXSCALE_PUSHGATEWAY)")
    metrics.add_argument("--peak-flops", type=float, default=os.environ.get("WXSCALE_PEAK_FLOPS"), metavar="FLOPS",
                         help="peak FLOP/s of one process's device for MFU (default $WXSCALE_PEAK_FLOPS, else the "
                              "table of known GPUs, or a measured matmul rate on CPU)")
    args = parser.parse_args(argv)
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        parser.error(f"--metrics-port {args.metrics_port} is not a port number; use 1-65535")
    return args


def _load_trial(url: str, endpoint: str | None) -> TrialSpec:
    folder, _, name = url.rpartition("/")
    return TrialSpec.from_dict(Location(folder or ".", endpoint).read_json(name))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    from wxscale_trainer.telemetry import Telemetry  # Heavy imports after argument parsing keep --help fast.
    from wxscale_trainer.train import run_trial

    trial = _load_trial(args.trial, args.s3_endpoint)
    output = Location(args.output, args.s3_endpoint)
    runtime = init_runtime(trial.config.training.device, trial.config.training.num_threads)
    logger.info("trial %s of study %s: rank %d of %d on %s", trial.trial, trial.study, runtime.rank,
                runtime.world_size, runtime.device)
    telemetry = Telemetry(trial.study, trial.trial, rank=runtime.rank, device=runtime.device,
                          peak_flops=args.peak_flops)
    try:
        if args.metrics_port is not None:
            telemetry.serve(args.metrics_port + runtime.local_rank, args.metrics_address)
        record = run_trial(trial, runtime, telemetry, output=output)
    except Exception as error:  # Recorded for the study, then re-raised as a non-zero exit.
        message = str(error) if isinstance(error, WxscaleError) else f"{type(error).__name__}: {error}"
        logger.error("trial %s failed: %s", trial.trial, message)
        logger.debug("%s", traceback.format_exc())
        if runtime.is_main:
            output.write_json(f"{trial_folder(trial.trial)}/error.json",
                              {"trial": trial.trial, "state": "Failed", "error": message})
        _finish_telemetry(telemetry, args)
        # No barrier here: the other ranks may be blocked in a collective; torchrun stops them.
        return 1

    if runtime.is_main:
        path = output.write_json(f"{trial_folder(trial.trial)}/result.json", record)
        logger.info("trial %s finished: test loss %.4f, %.1f samples/s; result at %s", trial.trial,
                    record["evaluation"]["testLoss"], record["training"]["samplesPerSecond"], path)
    _finish_telemetry(telemetry, args)
    shutdown(runtime)
    return 0


def _finish_telemetry(telemetry, args: argparse.Namespace) -> None:
    """Push the final metrics if a pushgateway is set, keep the endpoint up for the linger time, then stop it."""
    if args.pushgateway:
        telemetry.push(args.pushgateway)
    telemetry.linger(args.metrics_linger)
    telemetry.close()


if __name__ == "__main__":
    sys.exit(main())
