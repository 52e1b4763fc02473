"""Run the compute-scaling study on one GPU machine and print a table of its efficiency figures.

    python benchmarks/gpu_compute_scaling.py --output runs/gpu-compute-scaling

The study is examples/compute-scaling.yaml with a model sized for a GPU and
these trials, each on the built-in synthetic source:
  - precision fp32 / bf16 / fp16, each with activation checkpointing off and on;
  - attention backend flash / efficient / math, in bf16;
  - a batch of 128 as 2 accumulated micro-batches of 64, in bf16;
  - with 2 or more GPUs: DDP and FSDP on 2 processes, and a 2-stage 1F1B pipeline, in bf16.
Processes on one GPU are not tried: NCCL needs one device per process.

The whole run is sized to finish in under 10 minutes on one H100-class GPU;
`--budget-minutes` stops it earlier. `--device cpu --tiny` runs a small version on
CPU, which checks the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "compute-scaling.yaml"


def build_study(device: str, gpus: int, tiny: bool) -> dict[str, Any]:
    """Return the example study with the model, data and trials of this benchmark."""
    study = yaml.safe_load(EXAMPLE.read_text())
    study["metadata"]["name"] = "gpu-compute-scaling"
    spec = study["spec"]
    if not tiny:
        # 2 x 2 patches of the example's 32 x 64 grid give 512 tokens; the synthetic data stay as quick to generate.
        spec["model"].update({"patchSize": 2, "depth": 8, "heads": 8, "embedDim": 512})
        spec["training"].update({"batchSize": 64, "budget": {"steps": 150}, "evalEvery": 50})
    spec["training"]["device"] = device
    spec["training"]["checkpoint"] = {"everySteps": None, "final": True}
    spec.pop("axes")

    points: list[dict[str, Any]] = []
    for precision in ("fp32", "bf16", "fp16"):
        for checkpointing in (False, True):
            points.append({"training.precision": precision, "training.activationCheckpointing": checkpointing})
    backends = ("flash", "efficient", "math") if device == "cuda" else ("flash", "math")
    for backend in backends:
        points.append({"training.precision": "bf16", "training.attentionBackend": backend})
    batch = spec["training"]["batchSize"]
    points.append({"training.precision": "bf16", "training.batchSize": 2 * batch, "training.microBatchSize": batch})
    if gpus >= 2:
        for strategy in ("ddp", "fsdp"):
            points.append({"training.precision": "bf16", "distributed.procsPerNode": 2,
                           "distributed.strategy": strategy})
        points.append({"training.precision": "bf16", "distributed.procsPerNode": 2,
                       "distributed.strategy": "pipeline", "distributed.pipelineSchedule": "1f1b",
                       "distributed.microbatches": 4})
    spec["points"] = points
    spec["maxFailedTrials"] = len(points)  # an unsupported attention backend fails its trial, not the run
    spec["maxRetries"] = 0
    return study


def count_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def number(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return f"{value * scale:.{digits}g}"


def table(records: list[dict[str, Any]]) -> str:
    """Return a fixed-width table: settings, throughput, MFU, HFU, memory, loss, communication and checkpoint."""
    header = ["#", "precision", "ckpt", "attention", "batch", "layout", "samples/s", "MFU", "HFU", "peak GiB",
              "test loss", "comm MiB/step", "ckpt MB", "state"]
    rows = [header]
    for record in sorted(records, key=lambda r: r.get("index", 0)):
        config = record.get("config", {})
        training, layout = config.get("training", {}), config.get("distributed", {})
        result = record.get("training") or {}
        rows.append([
            str(record.get("index")),
            training.get("precision", "-"),
            "on" if training.get("activationCheckpointing") else "off",
            training.get("attentionBackend", "-"),
            str(training.get("batchSize", "-")),
            f"{layout.get('strategy', '-')} {layout.get('nodes', 1)}x{layout.get('procsPerNode', 1)}",
            number(result.get("samplesPerSecond"), digits=4),
            number(result.get("mfu")),
            number(result.get("hfu")),
            number(result.get("peakMemoryBytes"), 2.0**-30),
            number((record.get("evaluation") or {}).get("testLoss"), digits=4),
            number((result.get("communication") or {}).get("bytesPerStepPerRank"), 2.0**-20),
            number((result.get("checkpoint") or {}).get("lastBytes"), 1e-6),
            record.get("state", "-") if record.get("state") == "Succeeded" else
            f"{record.get('state')}: {str(record.get('error', ''))[:60]}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/gpu-compute-scaling", help="results folder (default %(default)s)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="device of every trial")
    parser.add_argument("--tiny", action="store_true", help="keep the example's small model and data (CPU check)")
    parser.add_argument("--budget-minutes", type=float, default=10.0,
                        help="stop the study after this many minutes (default %(default)s)")
    args = parser.parse_args(argv)

    gpus = count_gpus()
    if args.device == "cuda" and gpus == 0:
        print("error: no CUDA device is visible; run on a GPU machine, or pass --device cpu --tiny", file=sys.stderr)
        return 2
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    study_path = output / "study.yaml"
    study_path.write_text(yaml.safe_dump(build_study(args.device, gpus, args.tiny), sort_keys=False))

    started = time.monotonic()
    command = [sys.executable, "-m", "wxscale", "run", str(study_path), "--output", str(output), "--no-progress",
               "--no-report"]
    try:
        finished = subprocess.run(command, cwd=REPO, timeout=args.budget_minutes * 60)
        code = finished.returncode
    except subprocess.TimeoutExpired:
        print(f"stopped after the budget of {args.budget_minutes:g} minutes; the table lists the finished trials")
        code = 124
    wall = time.monotonic() - started

    records = [json.loads(path.read_text()) for path in output.glob("trials/*/result.json")]
    device = "cpu"
    if args.device == "cuda":
        import torch

        device = f"{gpus} x {torch.cuda.get_device_name(0)}"
    print(f"\ncompute-scaling benchmark on {device}: {len(records)} trials in {wall / 60:.1f} min, results in {output}")
    print(table(records))
    return code


if __name__ == "__main__":
    sys.exit(main())
