"""Run the benchmark suite and print one table: `python -m benchmarks [--quick | --tiny] [--only NAME ...]`.

Each benchmark prints its figure with the ratio to its reference or limit. The
machine (CPU model, cores, memory, load average) is printed above the table,
because every figure depends on it. `--json PATH` also writes the rows and the
machine description. benchmarks/gpu_compute_scaling.py is not part of the
suite: it runs a study on a GPU machine and has its own command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import Result, format_table, machine

logger = logging.getLogger("benchmarks")

# Benchmark name -> module, in the order they run.
BENCHMARKS = {
    "data": "benchmarks.data_loader",
    "trainer": "benchmarks.trainer_throughput",
    "flops": "benchmarks.flops_model",
    "operator": "benchmarks.operator_fanout",
    "fit": "benchmarks.fit_bootstrap",
}


def run_suite(mode: str, only: list[str] | None = None) -> tuple[list[Result], dict[str, str]]:
    """Run the selected benchmarks in `mode`; return their rows and the error of each one that failed."""
    results: list[Result] = []
    failures: dict[str, str] = {}
    for name, module_name in BENCHMARKS.items():
        if only and name not in only:
            continue
        began = time.perf_counter()
        logger.info("benchmark %s (%s) started", name, mode)
        try:
            module = importlib.import_module(module_name)
            results += module.run(mode)
        except Exception as error:  # one failing benchmark must not hide the others' results
            failures[name] = f"{type(error).__name__}: {error}"
            logger.error("benchmark %s failed after %.1f s:\n%s", name, time.perf_counter() - began,
                         traceback.format_exc())
            continue
        logger.info("benchmark %s finished in %.1f s", name, time.perf_counter() - began)
    return results, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="mode",
                      help="smaller inputs and fewer repeats (minutes instead of tens of minutes)")
    size.add_argument("--tiny", action="store_const", const="tiny", dest="mode",
                      help="seconds-long smoke runs; the figures mean nothing")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--json", type=Path, help="also write the rows and the machine to this JSON file")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    mode = args.mode or "full"

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Library chatter (kopf's signal warning, botocore, numcodecs) would bury the suite's progress lines.
    for noisy in ("kopf", "aiohttp", "botocore", "aiobotocore", "s3fs", "numcodecs", "wxscale", "wxscale_operator"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    description = machine()
    began = time.perf_counter()
    results, failures = run_suite(mode, args.only)
    seconds = time.perf_counter() - began
    description["load_average_after"] = os.getloadavg()

    print(f"\nmachine: {description['cpu']}, {description['cores']} cores, {description['memory_gb']} GB; "
          f"torch {description['torch']} with {description['torch_threads']} threads; "
          f"load average {description['load_average'][0]:.1f} before, "
          f"{description['load_average_after'][0]:.1f} after; mode {mode}; {seconds:.0f} s\n")
    print(format_table(results))
    for name, error in failures.items():
        print(f"\nbenchmark {name} failed: {error}", file=sys.stderr)

    if args.json:
        args.json.write_text(json.dumps({"machine": description, "mode": mode, "seconds": seconds,
                                         "results": [row.to_dict() for row in results], "failures": failures},
                                        indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
