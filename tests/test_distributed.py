"""Distributed trials on CPU with gloo: DDP, FSDP2 and pipelining against a single process.

Two parts:
  - This file doubles as a torchrun worker (`python -m torch.distributed.run
    --nproc-per-node=2 tests/test_distributed.py OUT.json`). Every rank trains
    the same model with each strategy next to a single-process reference on the
    whole batch, and rank 0 writes the differences in loss, gradients and weights,
    and of a checkpoint round trip, to OUT.json.
  - A study run with `wxscale run`: one process, two nodes of one process each
    (c10d rendezvous on 127.0.0.1, as the local executor launches them), FSDP2 in
    bf16 with activation checkpointing, and a 1F1B pipeline. Its records are
    checked against the one-process trial.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

if __name__ != "__main__":
    from conftest import REPO

# (case, distributed settings) run by the worker on 2 processes.
CASES = {
    "ddp": {"strategy": "ddp"},
    "fsdp": {"strategy": "fsdp"},
    "fsdp-keep-gathered": {"strategy": "fsdp", "reshardAfterForward": False},
    "pipeline-gpipe": {"strategy": "pipeline", "pipelineSchedule": "gpipe", "microbatches": 2},
    "pipeline-1f1b": {"strategy": "pipeline", "pipelineSchedule": "1f1b", "microbatches": 4},
}
BATCH = 8  # global batch of each micro-batch; two micro-batches per optimizer step
ACCUMULATION = 2
STEPS = 2
GRID = (16, 32)


# Worker (runs under torchrun) ------------------------------------------------------


def _worker(out_path: str) -> None:
    import contextlib
    import gc
    import tempfile

    import torch
    import torch.distributed as dist

    from wxscale.metrics import latitude_weighted_mse_loss
    from wxscale.model import WeatherViT
    from wxscale.spec import CheckpointSpec, ModelSpec, OptimizerSpec, TrialConfig
    from wxscale.storage import Location
    from wxscale_trainer.checkpoint import Checkpointer
    from wxscale_trainer.distributed import CommunicationMeter, build_strategy
    from wxscale_trainer.optimizer import build_optimizer
    from wxscale_trainer.runtime import init_runtime, shutdown

    runtime = init_runtime("cpu", num_threads=1)
    rank = runtime.rank
    model_spec = ModelSpec(depth=2, heads=2, embed_dim=32, patch_size=4)
    weights = torch.linspace(0.5, 1.0, GRID[0])

    def loss_function(prediction, target, mask):
        return latitude_weighted_mse_loss(prediction, target, weights, mask)

    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(BATCH, 2, *GRID, generator=generator), torch.randn(BATCH, 1, *GRID, generator=generator))
               for _ in range(STEPS * ACCUMULATION)]
    mask = torch.ones(BATCH, 1, *GRID)
    # A shared checkpoint folder: rank 0 picks it, every rank writes into it.
    folder = [tempfile.mkdtemp(prefix="wxscale-dist-") if rank == 0 else None]
    dist.broadcast_object_list(folder)

    def new_model() -> WeatherViT:
        torch.manual_seed(0)
        model = WeatherViT(model_spec, GRID, in_channels=2, out_channels=1)
        # The residual model starts with a zero head, which gives the blocks zero gradients; a random
        # head makes every gradient count.
        with torch.no_grad():
            torch.manual_seed(1)
            model.head.weight.normal_(std=0.02)
        return model

    def config_for(layout: dict[str, Any]) -> TrialConfig:
        return TrialConfig.model_validate({
            "data": {"source": "synthetic", "train": {"start": "2000-01-01", "end": "2000-02-01"},
                     "validation": {"start": "2000-02-02", "end": "2000-02-10"},
                     "test": {"start": "2000-02-11", "end": "2000-02-20"}},
            "model": model_spec.dump(),
            "training": {"batchSize": BATCH * ACCUMULATION, "gradAccumulation": ACCUMULATION},
            "distributed": {"procsPerNode": runtime.world_size, **layout},
        })

    def new_strategy(layout: dict[str, Any]):
        meter = CommunicationMeter()
        strategy = build_strategy(new_model(), config_for(layout), runtime, meter, contextlib.nullcontext,
                                  loss_function)
        # The trainer's optimizer (fused AdamW on CPU), also over DTensor shards and pipeline stages.
        optimizer = build_optimizer(strategy.module.parameters(), OptimizerSpec(lr=1e-2))
        return strategy, optimizer, meter

    def share(tensor: torch.Tensor, data_parallel: bool) -> torch.Tensor:
        """Return this rank's part of a batch under data parallelism, else the whole batch."""
        if not data_parallel:
            return tensor
        part = BATCH // runtime.world_size
        return tensor[rank * part:(rank + 1) * part]

    def train_step(strategy, optimizer, step: int, data_parallel: bool) -> float:
        losses = []
        for micro in range(ACCUMULATION):
            x, y = batches[step * ACCUMULATION + micro]
            loss = strategy.forward_backward(share(x, data_parallel), share(y, data_parallel),
                                             share(mask, data_parallel), sync=micro == ACCUMULATION - 1,
                                             loss_scale=1.0 / ACCUMULATION)
            losses.append(strategy.mean_over_ranks(loss))
        return sum(losses) / ACCUMULATION

    def full_gradients(strategy) -> dict[str, torch.Tensor]:
        gradients = {}
        for name, parameter in strategy.module.named_parameters():
            gradient = parameter.grad
            gradients[name.removeprefix("module.")] = gradient.full_tensor() if hasattr(gradient, "full_tensor") \
                else gradient
        return gradients

    def max_relative(mine: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
        worst = 0.0
        for name, tensor in mine.items():
            scale = reference[name].abs().max().item() + 1e-12
            worst = max(worst, (tensor - reference[name]).abs().max().item() / scale)
        return worst

    results: dict[str, Any] = {}
    for case, layout in CASES.items():
        data_parallel = layout["strategy"] != "pipeline"
        reference = new_model()
        reference_optimizer = build_optimizer(reference.parameters(), OptimizerSpec(lr=1e-2))
        strategy, optimizer, meter = new_strategy(layout)
        checkpointer = Checkpointer(Location(f"{folder[0]}/{case}"), CheckpointSpec(), runtime)
        entry: dict[str, Any] = {"loss": [], "referenceLoss": [], "gradientDifference": []}

        for step in range(STEPS):
            entry["loss"].append(train_step(strategy, optimizer, step, data_parallel))
            reference_loss = 0.0
            for micro in range(ACCUMULATION):
                x, y = batches[step * ACCUMULATION + micro]
                loss = loss_function(reference(x), y, mask)
                (loss / ACCUMULATION).backward()
                reference_loss += loss.item() / ACCUMULATION
            entry["referenceLoss"].append(reference_loss)

            reference_gradients = {name: p.grad for name, p in reference.named_parameters()}
            entry["gradientDifference"].append(max_relative(full_gradients(strategy), reference_gradients))
            strategy.optimizer_step(optimizer, grad_clip=1.0)
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
            reference_optimizer.step()
            reference_optimizer.zero_grad(set_to_none=True)
            if step == 0:
                checkpointer.save(1, strategy.checkpoint_state(optimizer), {"scaler": strategy.scaler.state_dict()})

        trained = strategy.full_model().state_dict()
        entry["weightDifference"] = max_relative(trained, reference.state_dict())
        entry["communication"] = meter.totals()
        entry["localParams"] = strategy.local_parameter_count()

        # Resume: a fresh model loads the checkpoint after step 1 and trains step 2 again.
        del strategy, optimizer
        gc.collect()
        strategy, optimizer, _ = new_strategy(layout)
        state = strategy.checkpoint_state(optimizer)
        checkpointer.load(1, state)
        strategy.load_checkpoint_state(optimizer, state)
        train_step(strategy, optimizer, 1, data_parallel)
        strategy.optimizer_step(optimizer, grad_clip=1.0)
        entry["resumedWeightDifference"] = max_relative(strategy.full_model().state_dict(), trained)
        results[case] = entry

        strategy.close()
        del strategy, optimizer, reference, reference_optimizer
        gc.collect()

    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    shutdown(runtime)


if __name__ == "__main__":
    _worker(sys.argv[1])
    sys.exit(0)


# Strategies against one process ------------------------------------------------------


def _torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("worker") / "results.json"
    finished = _torchrun(str(Path(__file__)), str(out))
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "terminate called" not in finished.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_loss_matches_one_process(worker_results, case):
    entry = worker_results[case]
    assert len(entry["loss"]) == STEPS
    for loss, reference in zip(entry["loss"], entry["referenceLoss"]):
        assert loss == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_one_process(worker_results, case):
    # Relative to the largest gradient of each tensor; fp32 sums in another order differ by ~1e-6.
    assert max(worker_results[case]["gradientDifference"]) < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_weights_match_after_steps(worker_results, case):
    assert worker_results[case]["weightDifference"] < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_round_trip(worker_results, case):
    assert worker_results[case]["resumedWeightDifference"] < 1e-6


def test_communication_is_metered(worker_results):
    assert set(worker_results["ddp"]["communication"]) == {"all_reduce"}
    assert set(worker_results["fsdp"]["communication"]) == {"all_gather", "reduce_scatter"}
    assert set(worker_results["pipeline-gpipe"]["communication"]) == {"send", "recv"}
    # Without resharding, the backward pass reuses the forward pass's gathered blocks.
    gathers = worker_results["fsdp"]["communication"]["all_gather"]["calls"]
    kept = worker_results["fsdp-keep-gathered"]["communication"]["all_gather"]["calls"]
    assert kept < gathers
    # gloo completes collectives, so every DDP and FSDP collective has a time.
    assert worker_results["ddp"]["communication"]["all_reduce"]["seconds"] > 0
    assert worker_results["pipeline-gpipe"]["communication"]["send"]["seconds"] is None


def test_shards_and_stages_hold_part_of_the_model(worker_results):
    whole = worker_results["ddp"]["localParams"]
    assert worker_results["fsdp"]["localParams"] < whole
    assert worker_results["pipeline-1f1b"]["localParams"] < whole


# A study through `wxscale run` ------------------------------------------------------------


POINTS = {
    "one-process": {"distributed.procsPerNode": 1},
    "two-nodes": {"distributed.nodes": 2},
    "fsdp-bf16": {"distributed.procsPerNode": 2, "distributed.strategy": "fsdp", "training.precision": "bf16",
                  "training.activationCheckpointing": True},
    "pipeline": {"distributed.procsPerNode": 2, "distributed.strategy": "pipeline",
                 "distributed.pipelineSchedule": "1f1b", "distributed.microbatches": 2},
}


def distributed_study() -> dict:
    """A study of seconds-long trials on a 16 x 32 synthetic grid, one trial per POINTS entry."""
    return {
        "apiVersion": "wxscale.io/v1alpha1",
        "kind": "ScalingStudy",
        "metadata": {"name": "distributed"},
        "spec": {
            "data": {
                "source": "synthetic",
                "synthetic": {"lat": GRID[0], "lon": GRID[1], "steps": 240},
                "train": {"start": "2000-01-01", "end": "2000-01-31"},
                "validation": {"start": "2000-02-01", "end": "2000-02-15"},
                "test": {"start": "2000-02-16", "end": "2000-02-29"},
            },
            "model": {"depth": 2, "heads": 2, "embedDim": 32},
            "training": {"batchSize": 8, "budget": {"steps": 8}, "evalEvery": 4, "evalBatches": 2,
                         "device": "cpu", "numThreads": 1, "checkpoint": {"everySteps": 4}},
            "points": list(POINTS.values()),
            "maxConcurrentTrials": 1,
        },
    }


@pytest.fixture(scope="module")
def study_records(tmp_path_factory) -> dict[str, dict]:
    import yaml

    folder = tmp_path_factory.mktemp("study")
    study = folder / "distributed.yaml"
    study.write_text(yaml.safe_dump(distributed_study()))
    out = folder / "out"
    finished = subprocess.run([sys.executable, "-m", "wxscale", "run", str(study), "--output", str(out),
                               "--no-progress"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    for log in (out / "logs").glob("*.log"):
        assert "terminate called" not in log.read_text(), f"process-group teardown aborted in {log}"

    # The planner numbers the trials in the order of spec.points.
    records = {record["index"]: record for record in
               (json.loads(path.read_text()) for path in out.glob("trials/*/result.json"))}
    by_point: dict[str, Any] = {name: records[index] for index, name in enumerate(POINTS)}
    by_point["_out"] = out
    return by_point


def test_two_nodes_rendezvous_and_match_one_process(study_records):
    two, one = study_records["two-nodes"], study_records["one-process"]
    assert two["state"] == "Succeeded"
    assert two["training"]["processes"] == 2
    assert two["training"]["parallelism"]["nodes"] == 2
    assert two["training"]["steps"] == one["training"]["steps"]
    # Both see the same global batches, so the curves agree up to the order of fp32 sums.
    for mine, reference in zip(two["training"]["curve"], one["training"]["curve"]):
        assert mine["step"] == reference["step"]
        assert mine["trainLoss"] == pytest.approx(reference["trainLoss"], rel=1e-4)
        assert mine["validationLoss"] == pytest.approx(reference["validationLoss"], rel=1e-4)
    assert two["evaluation"]["testLoss"] == pytest.approx(one["evaluation"]["testLoss"], rel=1e-4)


def test_two_nodes_meter_all_reduce(study_records):
    communication = study_records["two-nodes"]["training"]["communication"]
    assert [entry["rank"] for entry in communication["ranks"]] == [0, 1]
    assert communication["byKind"]["all_reduce"]["bytes"] > 0
    assert communication["bytesPerStepPerRank"] > 0
    assert study_records["one-process"]["training"]["communication"]["bytes"] == 0


def test_fsdp_counts_whole_model(study_records):
    fsdp, one = study_records["fsdp-bf16"], study_records["one-process"]
    assert fsdp["state"] == "Succeeded"
    # FLOPs follow the whole model; only the stored parameters are a shard.
    assert fsdp["model"]["params"] == one["model"]["params"]
    assert fsdp["training"]["flopsPerSample"] == one["training"]["flopsPerSample"]
    assert fsdp["training"]["parallelism"]["localParams"] < fsdp["model"]["params"]
    # Activation checkpointing recomputes the blocks' forward pass: hardware FLOPs exceed model FLOPs.
    assert fsdp["training"]["hardwareFlops"] > one["training"]["hardwareFlops"]
    assert fsdp["training"]["hfu"] > fsdp["training"]["mfu"]


def test_fsdp_bf16_tracks_fp32(study_records):
    fsdp, one = study_records["fsdp-bf16"], study_records["one-process"]
    assert fsdp["evaluation"]["testLoss"] == pytest.approx(one["evaluation"]["testLoss"], rel=0.05)


def test_pipeline_trial_records_bubble(study_records):
    pipeline = study_records["pipeline"]
    assert pipeline["state"] == "Succeeded"
    step_time = pipeline["training"]["stepTime"]
    assert step_time["bubbleFraction"] == pytest.approx(1 / 3)  # (2 - 1) / (2 + 2 - 1)
    assert step_time["pipelineIdleSeconds"] >= 0
    assert pipeline["training"]["parallelism"]["pipelineStages"] == 2
    assert pipeline["evaluation"]["testLoss"] == pytest.approx(study_records["one-process"]["evaluation"]["testLoss"],
                                                               rel=1e-3)


def test_trials_record_checkpoints_and_storage(study_records):
    for name in POINTS:
        training = study_records[name]["training"]
        assert training["checkpoint"]["written"] == 2, name  # steps 4 and 8
        assert training["checkpoint"]["lastBytes"] > 0, name
        assert training["storageBytes"] >= training["checkpoint"]["lastBytes"], name


def test_report_draws_scaling_plots(study_records):
    plots = study_records["_out"] / "plots"
    assert (plots / "throughput_vs_processes.png").exists()
    assert (plots / "communication_by_parallelism.png").exists()
