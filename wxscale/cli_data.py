"""The `wxscale data` commands: inspect a source, and convert one into a training-friendly zarr store."""

from __future__ import annotations

import argparse
import json

from wxscale.spec import LoaderSpec, StorageSpec


def _storage(args: argparse.Namespace) -> StorageSpec:
    return StorageSpec(endpoint_url=args.s3_endpoint, anonymous=getattr(args, "anonymous", False))


def _loader(args: argparse.Namespace) -> LoaderSpec:
    return LoaderSpec(timeout_seconds=args.timeout, retries=args.retries)


def _add_request_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for each storage request before retrying it (default 30)")
    parser.add_argument("--retries", type=int, default=2,
                        help="retries of a failed or timed-out storage request (default 2)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from wxscale.data.inspect import format_report, inspect_source

    report = inspect_source(args.url, _storage(args), seconds=args.seconds, workers=args.workers,
                            measure=not args.no_measure, loader=_loader(args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(format_report(report))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from wxscale.data.convert import ConvertOptions, convert

    variables = [name.strip() for name in args.variables.split(",") if name.strip()] if args.variables else None
    options = ConvertOptions(
        variables=variables,
        time_chunk=args.time_chunk,
        chunk_mb=args.chunk_mb,
        zarr_format=args.zarr_format,
        compression=args.compression,
        memory_mb=args.memory_mb,
        overwrite=args.overwrite,
    )
    summary = convert(args.src, args.dst, options, _storage(args), _loader(args))
    print(f"wrote {summary.destination}: {', '.join(summary.variables)}, {summary.steps} steps on a "
          f"{summary.grid[0]} x {summary.grid[1]} grid, chunks of {summary.time_chunk} steps "
          f"({summary.chunks_per_variable} per variable), {summary.float32_bytes / 1e6:.1f} MB as float32, "
          f"in {summary.seconds:.1f} s")
    return 0


def add_data_commands(commands: argparse._SubParsersAction) -> None:
    """Add `wxscale data inspect` and `wxscale data convert` to the top-level subcommands."""
    data = commands.add_parser("data", help="inspect a data source or convert it for training")
    actions = data.add_subparsers(dest="data_command", required=True)

    inspect = actions.add_parser(
        "inspect", help="print variables, grid, time span and step, chunking, and the read rate from here")
    inspect.add_argument("url", help="netCDF file or zarr store: a local path, file:// or s3:// URL")
    inspect.add_argument("--seconds", type=float, default=3.0,
                         help="how long to read for the rate estimate, in seconds (default 3)")
    inspect.add_argument("--workers", type=int, default=2, help="reader threads for the rate estimate (default 2)")
    inspect.add_argument("--no-measure", action="store_true", help="read metadata only, no rate estimate")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--s3-endpoint", help="S3 endpoint URL (default AWS_ENDPOINT_URL)")
    inspect.add_argument("--anonymous", action="store_true", help="read a public bucket without credentials")
    _add_request_options(inspect)
    inspect.set_defaults(handler=cmd_inspect)

    convert = actions.add_parser(
        "convert", help="rewrite a netCDF, GRIB or zarr source as zarr with chunks of whole time steps")
    convert.add_argument("src", help="source: netCDF, GRIB (needs cfgrib) or zarr; a path, file:// or s3:// URL")
    convert.add_argument("dst", help="destination zarr store: a local path or s3:// URL")
    convert.add_argument("--variables", help="comma-separated variables to keep (default every (time, lat, lon) one)")
    convert.add_argument("--time-chunk", type=int, help="time steps per chunk (default from --chunk-mb)")
    convert.add_argument("--chunk-mb", type=float, default=8.0,
                         help="target size of one chunk in MB as float32 when --time-chunk is not given (default 8)")
    convert.add_argument("--zarr-format", type=int, choices=(2, 3), default=3, help="zarr format (default 3)")
    convert.add_argument("--compression", choices=("zstd", "none"), default="zstd",
                         help="chunk compression (default zstd): zstd for object storage, where bytes cost "
                              "more than decoding; none for local NVMe, where decoding limits the loader")
    convert.add_argument("--memory-mb", type=float, default=512.0,
                         help="memory for the slab read and written at once, in MB (default 512)")
    convert.add_argument("--overwrite", action="store_true", help="replace DST when it exists")
    convert.add_argument("--s3-endpoint", help="S3 endpoint URL of SRC and DST (default AWS_ENDPOINT_URL)")
    _add_request_options(convert)
    convert.set_defaults(handler=cmd_convert)
