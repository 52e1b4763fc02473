"""The efficiency axes and their accounting: settings, FLOPs, traffic, step time and the report's figures."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from wxscale.errors import WxscaleError
from wxscale.flops import model_cost
from wxscale.model import WeatherViT, check_attention_backend
from wxscale.plots import (
    plot_communication_by_parallelism,
    plot_cost_vs_accuracy_by_precision,
    plot_memory_vs_optimisation,
    plot_quality_vs_batch_size,
    plot_throughput_vs_nodes,
    plot_throughput_vs_processes,
    scaling_efficiency,
)
from wxscale.report import render_report
from wxscale.spec import ModelSpec, TrialConfig
from wxscale_trainer.distributed import CommunicationMeter, Strategy
from wxscale_trainer.distributed.efficiency import flops_utilization, measure_tensor_traffic, step_time_breakdown
from wxscale_trainer.distributed.pipeline import bubble_fraction, stage_blocks
from wxscale_trainer.runtime import Runtime

GRID = (16, 32)
SPEC = ModelSpec(depth=2, heads=2, embed_dim=32, patch_size=4)
DATA = {"source": "synthetic", "train": {"start": "2000-01-01", "end": "2000-02-01"},
        "validation": {"start": "2000-02-02", "end": "2000-02-10"},
        "test": {"start": "2000-02-11", "end": "2000-02-20"}}


def config(training: dict | None = None, distributed: dict | None = None, depth: int = 2) -> TrialConfig:
    return TrialConfig.model_validate({"data": DATA, "model": {**SPEC.dump(), "depth": depth},
                                       "training": training or {}, "distributed": distributed or {}})


# Settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("training", "distributed", "steps"), [
    ({"batchSize": 32, "microBatchSize": 8}, {}, 4),
    ({"batchSize": 32, "microBatchSize": 8}, {"procsPerNode": 2}, 2),
    ({"batchSize": 32, "microBatchSize": 4}, {"procsPerNode": 2, "strategy": "pipeline", "microbatches": 2}, 8),
    ({"batchSize": 32, "gradAccumulation": 2}, {"procsPerNode": 2}, 2),
])
def test_accumulation_keeps_global_batch(training, distributed, steps):
    assert config(training, distributed).accumulation_steps == steps


@pytest.mark.parametrize(("training", "distributed", "depth", "message"), [
    ({}, {"procsPerNode": 2, "strategy": "pipeline", "pipelineSchedule": "1f1b", "microbatches": 1}, 2,
     "distributed.microbatches (1) must be at least the number of pipeline stages (2, one per process)"),
    ({}, {"procsPerNode": 4, "strategy": "pipeline"}, 2, "model.depth is 2"),
    ({"batchSize": 16, "microBatchSize": 4, "gradAccumulation": 2}, {}, 2, "must stay 1"),
    ({"batchSize": 16, "microBatchSize": 3}, {}, 2, "microBatchSize (1 x 3 = 3)"),
    ({"batchSize": 12}, {"procsPerNode": 1, "strategy": "pipeline", "microbatches": 8}, 2,
     "distributed.microbatches (1 x 8 = 8)"),
    ({"activationCheckpointing": True, "activationCheckpointBlocks": [0, 5]}, {}, 2, "[5]"),
])
def test_invalid_layouts_name_the_field(training, distributed, depth, message):
    with pytest.raises(ValidationError) as raised:
        config(training, distributed, depth)
    assert message in " ".join(error["msg"] for error in raised.value.errors())


def test_unsupported_attention_backend_names_the_field():
    # The memory-efficient kernel has no CPU implementation in PyTorch 2.13.
    with pytest.raises(WxscaleError, match="spec.training.attentionBackend: 'efficient' is not supported on cpu"):
        check_attention_backend("efficient", "cpu")


# FLOPs and traffic ---------------------------------------------------------------------------


def test_checkpointing_adds_hardware_flops_only():
    plain = model_cost(SPEC, GRID, 2, 1, attention_backend="math")
    every = model_cost(SPEC, GRID, 2, 1, activation_checkpointing=True, attention_backend="math")
    first = model_cost(SPEC, GRID, 2, 1, activation_checkpointing=True, checkpoint_blocks=[0],
                       attention_backend="math")
    assert every.flops_per_sample == plain.flops_per_sample == first.flops_per_sample
    assert plain.hardware_flops_per_sample == plain.flops_per_sample
    assert every.hardware_flops_per_sample - plain.flops_per_sample == \
        2 * (first.hardware_flops_per_sample - plain.flops_per_sample)


def test_mfu_and_hfu():
    figures = flops_utilization(4e9, 5e9, peak_flops_per_process=1e10, processes=2)
    assert figures == {"mfu": pytest.approx(0.2), "hfu": pytest.approx(0.25)}
    assert flops_utilization(4e9, 5e9, None, 2) == {"mfu": None, "hfu": None}


def test_traffic_grows_with_batch_and_precision():
    torch.manual_seed(0)
    model = WeatherViT(SPEC, GRID, 2, 1)
    x = torch.randn(4, 2, *GRID)
    one = measure_tensor_traffic(model, x[:1], contextlib.nullcontext)
    four = measure_tensor_traffic(model, x, contextlib.nullcontext)
    half = measure_tensor_traffic(model, x, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert one < four < 4 * one  # the weights are read once per pass, whatever the batch
    assert half < four
    recomputing = WeatherViT(SPEC, GRID, 2, 1, activation_checkpointing=True)
    recomputing.load_state_dict(model.state_dict())
    assert measure_tensor_traffic(recomputing, x, contextlib.nullcontext) > four
    assert all(parameter.grad is None for parameter in model.parameters())


# Pipeline and step time --------------------------------------------------------------------------


@pytest.mark.parametrize(("stages", "microbatches", "fraction"), [(1, 4, 0.0), (2, 2, 1 / 3), (4, 8, 3 / 11)])
def test_bubble_fraction(stages, microbatches, fraction):
    assert bubble_fraction(stages, microbatches) == pytest.approx(fraction)


def test_stage_blocks_split_evenly():
    assert stage_blocks(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_blocks(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(WxscaleError, match="model.depth"):
        stage_blocks(2, 3)


def test_step_time_breakdown():
    breakdown = step_time_breakdown(steps=10, data_seconds=1.0, forward_backward_seconds=6.0, optimizer_seconds=1.0,
                                    communication_seconds=2.0, bubble_fraction=0.25, pipeline_idle_seconds=2.5)
    assert breakdown["meanStepSeconds"] == pytest.approx(0.8)
    assert breakdown["dataFraction"] == pytest.approx(0.125)
    assert breakdown["bubbleSecondsEstimate"] == pytest.approx(1.5)
    assert "bubbleFraction" not in step_time_breakdown(steps=1, data_seconds=0, forward_backward_seconds=1,
                                                       optimizer_seconds=0, communication_seconds=None)


# Precision in one process -----------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_step_trains(precision):
    torch.manual_seed(0)
    model = WeatherViT(SPEC, GRID, 2, 1)
    with torch.no_grad():
        model.head.weight.normal_(std=0.02)
    runtime = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext
    strategy = Strategy(model, runtime, CommunicationMeter(), autocast,
                        lambda prediction, target, mask: (prediction - target).square().mean(), precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(4, 2, *GRID), torch.zeros(4, 1, *GRID)
    first = strategy.forward_backward(x, y, torch.ones_like(y))
    strategy.optimizer_step(optimizer, grad_clip=1.0)
    second = strategy.forward_backward(x, y, torch.ones_like(y))
    assert strategy.scaler.is_enabled() == (precision == "fp16")
    assert second < first


# Report figures ----------------------------------------------------------------------------------


def record(index: int, processes: int, throughput: float, *, nodes: int = 1, precision: str = "fp32",
           checkpointing: bool = False, strategy: str = "ddp", batch: int = 16, loss: float = 0.1) -> dict:
    communicated = 1e6 if processes > 1 else 0
    return {
        "trial": f"t-{index}", "index": index, "state": "Succeeded",
        "config": {"training": {"precision": precision, "activationCheckpointing": checkpointing, "batchSize": batch},
                   "distributed": {"strategy": strategy, "nodes": nodes, "procsPerNode": processes // nodes}},
        "evaluation": {"testLoss": loss},
        "training": {
            "processes": processes, "samplesPerSecond": throughput, "wallSeconds": 960 / throughput,
            "peakMemoryBytes": 2**28 * (0.5 if checkpointing else 1.0), "steps": 10,
            "stepTime": {"steps": 10},
            "communication": {"bytes": communicated, "byKind": {"all_reduce": {"bytes": communicated, "seconds": 0.1}}
                              if processes > 1 else {}, "ranks": [{"rank": r} for r in range(processes)]},
        },
    }


def test_scaling_efficiency_pairs_one_process_trial():
    records = [record(0, 1, 100.0), record(1, 2, 150.0), record(2, 1, 80.0, precision="bf16"),
               record(3, 2, 160.0, precision="bf16"), record(4, 4, 200.0, precision="fp16")]
    efficiency = scaling_efficiency(records)
    assert efficiency["t-1"] == pytest.approx(0.75)
    assert efficiency["t-3"] == pytest.approx(1.0)
    assert "t-4" not in efficiency  # no fp16 trial with one process
    assert efficiency["t-0"] == pytest.approx(1.0)


def test_compute_figures_drawn_when_axes_vary(tmp_path: Path):
    records = [record(0, 1, 100.0), record(1, 2, 150.0), record(2, 2, 140.0, nodes=2),
               record(3, 1, 90.0, precision="bf16", checkpointing=True, loss=0.11),
               record(4, 2, 120.0, strategy="fsdp", batch=32, loss=0.12)]
    for draw in (plot_throughput_vs_processes, plot_throughput_vs_nodes, plot_memory_vs_optimisation,
                 plot_cost_vs_accuracy_by_precision, plot_quality_vs_batch_size, plot_communication_by_parallelism):
        path = draw(records, tmp_path)
        assert path is not None and path.stat().st_size > 0, draw.__name__


def test_compute_figures_skipped_when_axes_fixed(tmp_path: Path):
    records = [record(0, 1, 100.0), record(1, 1, 110.0, batch=16)]
    for draw in (plot_throughput_vs_processes, plot_throughput_vs_nodes, plot_memory_vs_optimisation,
                 plot_cost_vs_accuracy_by_precision, plot_quality_vs_batch_size, plot_communication_by_parallelism):
        assert draw(records, tmp_path) is None, draw.__name__


def test_report_lists_compute_table(tmp_path: Path):
    records = [record(0, 1, 100.0), record(1, 2, 150.0)]
    for entry in records:
        entry["training"]["parallelism"] = {"strategy": "ddp"}
    text = render_report(records, "compute", {}, {}, tmp_path)
    assert "## Compute and efficiency" in text
    assert "| 1 | `t-1` | ddp 1x2 | fp32 | off | 150 | 0.75 |" in text
    plain = copy.deepcopy(records)
    for entry in plain:
        del entry["training"]["parallelism"]
    assert "## Compute and efficiency" not in render_report(plain, "compute", {}, {}, tmp_path)
