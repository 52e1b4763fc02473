"""The `wxscale` command: validate, plan, run and report scaling studies."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Sequence

from wxscale.errors import WxscaleError
from wxscale.logs import setup_logging

logger = logging.getLogger("wxscale")


def _load(path: str, data_override: str | None = None):
    from wxscale.study import load_study

    study = load_study(path)
    if data_override:
        study.spec.data.source = data_override
    return study


def cmd_validate(args: argparse.Namespace) -> int:
    """Check the schema and the axes, then open the data source's coordinates so a missing file,
    variable or an impossible lead time is reported before anything runs."""
    from wxscale.planner import plan

    study = _load(args.study, args.data)
    trials = plan(study)
    print(f"{args.study}: valid ScalingStudy {study.metadata.name!r} with {len(trials)} trial(s)")
    return 0


def _format_value(value) -> str:
    """Show large floats (FLOP budgets) in scientific notation and everything else as is."""
    if isinstance(value, float) and abs(value) >= 1e6:
        return f"{value:.3g}"
    return str(value)


def _format_plan(trials) -> str:
    header = f"{'#':>3}  {'trial':<13} {'params':>10} {'steps':>7} {'samples':>9} {'FLOPs':>10}  axis values"
    lines = [header, "-" * len(header)]
    for trial in trials:
        values = ", ".join(f"{k}={_format_value(v)}" for k, v in trial.axis_values.items())
        lines.append(f"{trial.index:>3}  {trial.id:<13} {trial.params:>10,} {trial.steps:>7} {trial.samples:>9} "
                     f"{trial.total_flops:>10.3g}  {values}")
    total = sum(t.total_flops for t in trials)
    lines.append(f"{len(trials)} trial(s), {total:.3g} training FLOPs planned in total")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from wxscale.planner import plan

    study = _load(args.study, args.data)
    trials = plan(study)
    if args.json:
        print(json.dumps([trial.to_dict() for trial in trials], indent=2))
    else:
        print(_format_plan(trials))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from wxscale.executor import LocalExecutor, default_log_folder
    from wxscale.planner import plan
    from wxscale.storage import Location

    study = _load(args.study, args.data)
    if args.max_concurrent:
        study.spec.max_concurrent_trials = args.max_concurrent
    output = Location(args.output or study.spec.output or f"runs/{study.metadata.name}", args.s3_endpoint)
    trials = plan(study)
    logger.info("study %s: %d trial(s), %.3g training FLOPs planned; results in %s", study.metadata.name,
                len(trials), sum(t.total_flops for t in trials), output)
    output.write_json("study.json", study.dump())

    executor = LocalExecutor(study, trials, output, default_log_folder(output), s3_endpoint=args.s3_endpoint,
                             retry_failed=args.retry_failed, progress=not args.no_progress)
    # Trials run in sessions of their own, so a signal to this process does not reach them. SIGTERM (kill,
    # a job scheduler) takes the path of Ctrl-C, which stops the running trials before the process exits.
    terminated = []

    def on_terminate(signum: int, frame: object) -> None:
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_terminate)
    try:
        status = executor.run()
    except KeyboardInterrupt:
        reason = "terminated" if terminated else "interrupted"
        print(f"\n{reason}; finished trials are kept in {output}. Run the same command again to resume.",
              file=sys.stderr)
        return 128 + (terminated[0] if terminated else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)

    if not args.no_report:
        _report(output, study.metadata.name, executor)
        status = executor.status()
    for record in executor.failed_records():
        first_line = (record.get("error") or "no error message").strip().splitlines()[0]
        print(f"trial {record['trial']} failed after {record.get('attempts', 1)} attempt(s): {first_line}",
              file=sys.stderr)
    print(f"study {study.metadata.name}: {status['phase']} "
          f"({status['trials']['succeeded']} succeeded, {status['trials']['failed']} failed of {status['trialsTotal']})")
    return 0 if status["phase"] == "Succeeded" else 1


def _report(output, study_name: str, executor=None) -> None:
    """Fit scaling laws, write the report and (with an executor) the status with the fit."""
    from wxscale.executor import collect_records
    from wxscale.fit import fit_study
    from wxscale.report import format_table, write_report

    records = collect_records(output)
    fits = fit_study([r for r in records if r.get("state") == "Succeeded"])
    if executor is not None:
        executor.write_status(fit=fits)
    if output.is_local:
        path = write_report(records, Path(output.url), study_name, fits=fits)
    else:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="wxscale-report-"))
        path = write_report(records, folder, study_name, fits=fits)
        for file in folder.rglob("*"):
            if file.is_file():
                output.write_bytes(str(file.relative_to(folder)), file.read_bytes())
    print(format_table(records))
    print(f"report: {path}")


def cmd_report(args: argparse.Namespace) -> int:
    from wxscale.storage import Location

    output = Location(args.output, args.s3_endpoint)
    if not output.exists("trials"):
        raise WxscaleError(f"no trial results under {output}; pass the folder that `wxscale run --output` wrote")
    name = "study"
    if output.exists("study.json"):
        name = output.read_json("study.json").get("metadata", {}).get("name", name)
    _report(output, name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wxscale", description="Scaling-law studies for ViT weather models.")
    parser.add_argument("--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check a study file and list every error")
    validate.add_argument("study", help="ScalingStudy YAML file")
    validate.add_argument("--data", help="override spec.data.source (a path or URL)")
    validate.set_defaults(handler=cmd_validate)

    plan = commands.add_parser("plan", help="list the trials, their configs and predicted FLOPs; runs nothing")
    plan.add_argument("study", help="ScalingStudy YAML file")
    plan.add_argument("--data", help="override spec.data.source (a path or URL)")
    plan.add_argument("--json", action="store_true", help="print the resolved trials as JSON")
    plan.set_defaults(handler=cmd_plan)

    run = commands.add_parser("run", help="run every trial locally with torchrun, then fit and report")
    run.add_argument("study", help="ScalingStudy YAML file")
    run.add_argument("--output", "-o", help="results folder or s3:// prefix (default spec.output or runs/NAME)")
    run.add_argument("--data", help="override spec.data.source (a path or URL)")
    run.add_argument("--max-concurrent", type=int, help="override spec.maxConcurrentTrials")
    run.add_argument("--retry-failed", action="store_true", help="run trials that failed in an earlier run again")
    run.add_argument("--no-report", action="store_true", help="skip fitting and the report at the end")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument("--s3-endpoint", help="S3 endpoint URL of an s3:// --output (default AWS_ENDPOINT_URL); the "
                     "data's endpoint is spec.data.storage.endpointUrl")
    run.set_defaults(handler=cmd_run)

    report = commands.add_parser("report", help="fit scaling laws and write report.md, plots and trials.csv")
    report.add_argument("output", help="results folder or s3:// prefix written by `wxscale run`")
    report.add_argument("--s3-endpoint", help="S3 endpoint URL (default AWS_ENDPOINT_URL)")
    report.set_defaults(handler=cmd_report)

    from wxscale.cli_data import add_data_commands

    add_data_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.handler(args)
    except WxscaleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
