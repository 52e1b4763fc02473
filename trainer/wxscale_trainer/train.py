"""Train and evaluate one trial, then write its result record.

Read top to bottom: set up the process, build the data and the model, train
for the planned number of steps with periodic validation, evaluate on the test
split, measure inference, write the record.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from wxscale.data import load_trial_data
from wxscale.designs import cooldown_steps
from wxscale.flops import measure_flops, model_cost
from wxscale.metrics import latitude_weighted_mse_loss, latitude_weights
from wxscale.model import WeatherViT
from wxscale.spec import API_VERSION
from wxscale.storage import Location
from wxscale_trainer.checkpoint import Checkpointer, ResumableSampler, endless_batches, storage_bytes
from wxscale_trainer.distributed import CommunicationMeter, build_strategy
from wxscale_trainer.distributed.comm import gather_communication, gather_ranks
from wxscale_trainer.distributed.efficiency import (
    GpuMemoryBandwidth,
    flops_utilization,
    measure_tensor_traffic,
    optimizer_traffic_bytes,
    step_time_breakdown,
)
from wxscale_trainer.evaluate import evaluate_test, inference_latency, mean_loss
from wxscale_trainer.optimizer import build_optimizer
from wxscale_trainer.runtime import Runtime, peak_rss_bytes
from wxscale_trainer.schedule import lr_multiplier
from wxscale_trainer.telemetry import Telemetry
from wxscale.trialspec import TrialSpec, trial_folder

logger = logging.getLogger(__name__)

LOG_EVERY = 25  # steps between progress lines


def autocast_for(precision: str, device: torch.device):
    """Return a context factory for the trial's precision (autocast for bf16/fp16)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def cooldown_branch(strategy, optimizer: torch.optim.Optimizer, batches, *, start: int, length: int, training,
                    accumulation: int, device: torch.device, evaluate) -> dict[str, Any]:
    """Train the cool-down of a run of `length` steps from step `start`, evaluate it, then restore step `start`.

    The branch follows lr_multiplier(step, length, schedule): the constant_cooldown schedule of a
    run of `length` steps, so its evaluation replaces a separate run of that length (Hägele et al. 2024, "Scaling Laws
    and Compute-Optimal Training Beyond Fixed Training Durations"). `evaluate()` returns the
    evaluation entries of the point. The branch consumes batches of the run's data order.
    """
    saved = copy.deepcopy(strategy.checkpoint_state(optimizer))
    saved_scaler = copy.deepcopy(strategy.scaler.state_dict())
    for step in range(start, length):
        for group in optimizer.param_groups:
            group["lr"] = training.optimizer.lr * lr_multiplier(step, length, training.schedule)
        for micro in range(accumulation):
            x, y, mask = (tensor.to(device, non_blocking=True) for tensor in next(batches))
            strategy.forward_backward(x, y, mask, sync=micro == accumulation - 1, loss_scale=1.0 / accumulation)
        strategy.optimizer_step(optimizer, training.optimizer.grad_clip)

    point = {"steps": length, "samples": length * training.batch_size, "cooldownSteps": length - start,
             **evaluate()}
    strategy.load_checkpoint_state(optimizer, saved)
    strategy.scaler.load_state_dict(saved_scaler)
    return point


def run_trial(trial: TrialSpec, runtime: Runtime, telemetry: Telemetry | None = None,
              output: Location | None = None) -> dict[str, Any]:
    """Train and evaluate one trial; return its result record (on every rank).

    `telemetry` receives the metrics; without one, the metrics are only collected for the record.
    `output` is the study's output location: the trial's checkpoints go under it, and a restarted
    trial resumes from the newest one. Without it, no checkpoint is written or read.
    """
    config = trial.config
    training = config.training
    device = runtime.device
    telemetry = telemetry or Telemetry(trial.study, trial.trial, rank=runtime.rank, device=device)
    torch.manual_seed(training.seed)

    # Data: splits, normalisation statistics and climatology from the training period.
    tick = time.perf_counter()
    # Large stores stream the training split from storage (spec.data.loader); small ones load into memory.
    bundle = load_trial_data(config.data, seed=training.seed)
    telemetry.record_data_source_read(bundle.loaded_bytes, time.perf_counter() - tick)
    n_vars = len(bundle.variables)
    grid = tuple(bundle.grid)
    in_channels = config.data.history * n_vars
    weights = torch.as_tensor(latitude_weights(bundle.latitudes), dtype=torch.float32, device=device)

    # Data-parallel ranks each draw their part of every epoch's seeded order; pipeline stages read the same batches.
    accumulation = config.accumulation_steps
    data_parallel = 1 if config.distributed.strategy == "pipeline" else runtime.world_size
    per_rank_batch = training.batch_size // (data_parallel * accumulation)
    if bundle.streaming:
        # The streaming loader gives each rank disjoint blocks of the store and shuffles by seed and epoch itself.
        train_loader = sampler = bundle.train.loader(per_rank_batch, rank=runtime.rank % data_parallel,
                                                     world_size=data_parallel)
    else:
        sampler = ResumableSampler(bundle.train, num_replicas=data_parallel, rank=runtime.rank % data_parallel,
                                   shuffle=True, seed=training.seed, drop_last=True)
        train_loader = DataLoader(bundle.train, batch_size=per_rank_batch, sampler=sampler, drop_last=True)
    val_loader = DataLoader(bundle.validation, batch_size=per_rank_batch, shuffle=False)
    test_loader = DataLoader(bundle.test, batch_size=per_rank_batch, shuffle=False)
    if len(train_loader) == 0:
        from wxscale.errors import DataError

        raise DataError(
            f"the training split has {len(bundle.train)} samples, fewer than one batch per process "
            f"({per_rank_batch}); lower spec.training.batchSize or widen spec.data.train"
        )

    # Model, optimizer and the cost model.
    model = WeatherViT(config.model, grid=grid, in_channels=in_channels, out_channels=n_vars,
                       attention_backend=training.attention_backend,
                       activation_checkpointing=training.activation_checkpointing,
                       checkpoint_blocks=training.activation_checkpoint_blocks).to(device)
    cost = model_cost(config.model, grid, in_channels=in_channels, out_channels=n_vars,
                      activation_checkpointing=training.activation_checkpointing,
                      checkpoint_blocks=training.activation_checkpoint_blocks,
                      attention_backend=training.attention_backend)
    sample_x = bundle.train[0][0].unsqueeze(0)
    measured_per_sample = measure_flops(model, sample_x.to(device), backward=True) / sample_x.shape[0]
    autocast = autocast_for(training.precision, device)
    traffic_per_sample = measure_tensor_traffic(model, sample_x.repeat(per_rank_batch, 1, 1, 1).to(device),
                                                autocast) / per_rank_batch

    # Parallelism: the strategy wraps or splits the model; the meter counts its communication.
    meter = CommunicationMeter(sink=telemetry.record_collective)
    strategy = build_strategy(model, config, runtime, meter, autocast,
                              lambda prediction, target, mask: latitude_weighted_mse_loss(prediction, target,
                                                                                           weights, mask))
    optimizer = build_optimizer(strategy.module.parameters(), training.optimizer)

    logger.info("trial %s: %d params (%d non-embedding), grid %s, %d train / %d val / %d test samples, %d steps, "
                "%.3g FLOPs per sample", trial.trial, cost.params, cost.non_embedding_params, grid,
                len(bundle.train), len(bundle.validation), len(bundle.test), trial.steps, cost.flops_per_sample)
    telemetry.start(planned_steps=trial.steps, flops_per_sample=cost.flops_per_sample,
                    tokens_per_sample=cost.tokens_per_sample, precision=training.precision,
                    strategy=config.distributed.strategy, world_size=runtime.world_size)

    # Checkpoints: a restarted trial resumes from the newest complete one.
    checkpointer = None
    if output is not None:
        checkpointer = Checkpointer(output.child(trial_folder(trial.trial)), training.checkpoint, runtime,
                                    on_write=telemetry.record_checkpoint)
    resumed = None
    if checkpointer is not None and training.checkpoint.resume and checkpointer.latest_step() is not None:
        state = strategy.checkpoint_state(optimizer)
        resumed = checkpointer.load(checkpointer.latest_step(), state)
        strategy.load_checkpoint_state(optimizer, state)
        strategy.scaler.load_state_dict(resumed["scaler"])

    # Training loop.
    start_step = resumed["step"] if resumed else 0
    batches = endless_batches(train_loader, sampler, start_batch=start_step * accumulation)
    curve: list[dict[str, Any]] = resumed["curve"] if resumed else []
    data_wait = resumed["dataWaitSeconds"] if resumed else 0.0
    compute = resumed["computeSeconds"] if resumed else 0.0
    previous_wall = resumed["wallSeconds"] if resumed else 0.0
    train_loss_sum = resumed["trainLossSum"] if resumed else 0.0
    train_loss_count = resumed["trainLossCount"] if resumed else 0
    last_train_loss = float("nan")
    forward_backward_total = optimizer_total = 0.0  # this attempt's steps only, for the step-time breakdown
    bandwidth = GpuMemoryBandwidth(device)
    bandwidth.start()

    # Compute ladder: a branch for ladder length T starts where a run of T steps would begin its cool-down.
    ladder: list[dict[str, Any]] = resumed.get("ladder", []) if resumed else []
    branch_starts: dict[int, list[int]] = {}
    for length in training.ladder_steps or ():
        branch_start = length - cooldown_steps(length, training.schedule.cooldown_fraction)
        branch_starts.setdefault(branch_start, []).append(length)

    def evaluate_branch() -> dict[str, Any]:
        validation = mean_loss(strategy.evaluation_model(), val_loader, weights, device, autocast,
                               max_batches=training.eval_batches * data_parallel)
        test = evaluate_test(strategy.full_model(), bundle, test_loader, weights, device, autocast)
        return {"validationLoss": validation, "evaluation": test}

    started = time.perf_counter()
    for step in range(start_step, trial.steps):
        for length in branch_starts.get(step, []):
            tick = time.perf_counter()
            point = cooldown_branch(strategy, optimizer, batches, start=step, length=length, training=training,
                                    accumulation=accumulation, device=device, evaluate=evaluate_branch)
            point["flopsAnalytic"] = cost.flops_per_sample * point["samples"]
            ladder.append(point)
            logger.info("ladder point at %d steps: test loss %.4f (cool-down of %d steps from step %d)", length,
                        point["evaluation"]["testLoss"], point["cooldownSteps"], step)
            started += time.perf_counter() - tick  # the branch's time is not the run's: leave it out of wallSeconds
        for group in optimizer.param_groups:
            group["lr"] = training.optimizer.lr * lr_multiplier(step, trial.steps, training.schedule)

        step_loss = 0.0
        step_data = step_forward_backward = 0.0
        step_bytes = 0
        for micro in range(accumulation):
            tick = time.perf_counter()
            x, y, mask = next(batches)
            x, y, mask = x.to(device, non_blocking=True), y.to(device, non_blocking=True), mask.to(device)
            tock = time.perf_counter()
            step_data += tock - tick
            step_bytes += x.nbytes + y.nbytes + mask.nbytes

            # Only the last micro-batch of a step synchronises the gradients across processes.
            loss = strategy.forward_backward(x, y, mask, sync=micro == accumulation - 1,
                                             loss_scale=1.0 / accumulation)
            step_loss += loss / accumulation
            step_forward_backward += time.perf_counter() - tock

        tick = time.perf_counter()
        strategy.optimizer_step(optimizer, training.optimizer.grad_clip)
        # NOTE: on CUDA the optimizer's kernels run asynchronously; their time shows in the next step's phases.
        step_optimizer = time.perf_counter() - tick
        data_wait += step_data
        compute += step_forward_backward + step_optimizer
        forward_backward_total += step_forward_backward
        optimizer_total += step_optimizer

        if not math.isfinite(step_loss):
            from wxscale.errors import WxscaleError

            raise WxscaleError(f"training loss became {step_loss} at step {step + 1}; lower "
                               f"spec.training.optimizer.lr (now {training.optimizer.lr}) or use fp32")
        train_loss_sum += step_loss
        train_loss_count += 1
        last_train_loss = step_loss
        telemetry.record_step(step=step + 1, samples=per_rank_batch * accumulation, loss=step_loss,
                              data_seconds=step_data, forward_backward_seconds=step_forward_backward,
                              optimizer_seconds=step_optimizer, batch_bytes=step_bytes)

        # Validation along the way: the over/underfitting check.
        done = step + 1
        if done % training.eval_every == 0 or done == trial.steps:
            # Every rank evaluates the same samples; the batches are per-rank sized, so there are data_parallel
            # times more of them, and the validation set is the same whatever the number of processes.
            val_loss = mean_loss(strategy.evaluation_model(), val_loader, weights, device, autocast,
                                 max_batches=training.eval_batches * data_parallel)
            telemetry.record_validation(val_loss)
            # Each data-parallel rank trained on its own part of the batches; the curve shows their mean.
            train_loss = strategy.mean_over_ranks(train_loss_sum) / train_loss_count
            point = {"step": done, "trainLoss": train_loss, "validationLoss": val_loss}
            curve.append(point)
            train_loss_sum, train_loss_count = 0.0, 0
            elapsed = time.perf_counter() - started
            samples_per_s = (done - start_step) * training.batch_size / elapsed
            logger.info("step %d/%d | train loss %.4f | val loss %.4f | %.1f samples/s | %.3g FLOP/s | "
                        "data wait %.1f %%", done, trial.steps, point["trainLoss"], val_loss, samples_per_s,
                        samples_per_s * cost.flops_per_sample, 100.0 * data_wait / max(elapsed, 1e-9))
        elif done % LOG_EVERY == 0:
            logger.debug("step %d/%d | loss %.4f", done, trial.steps, step_loss)

        if checkpointer is not None and checkpointer.due(done, trial.steps):
            checkpointer.save(done, strategy.checkpoint_state(optimizer), {
                "curve": curve, "trainLossSum": strategy.mean_over_ranks(train_loss_sum),
                "trainLossCount": train_loss_count, "ladder": ladder,
                "dataWaitSeconds": data_wait, "computeSeconds": compute,
                "wallSeconds": previous_wall + time.perf_counter() - started,
                "scaler": strategy.scaler.state_dict(),
            })
    attempt_wall = time.perf_counter() - started
    wall = previous_wall + attempt_wall
    gpu_bandwidth = bandwidth.stop()

    # Test evaluation (physical units) and inference measurements on a whole model on every rank.
    bare = strategy.full_model()
    evaluation = evaluate_test(bare, bundle, test_loader, weights, device, autocast)
    inference = inference_latency(bare, sample_x, training.batch_size, device, autocast)

    samples = trial.steps * training.batch_size
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()

    # Efficiency of this attempt's steps: time per phase, communication, memory traffic, per-rank I/O.
    steps_run = trial.steps - start_step
    layout = strategy.layout()
    step_time = step_time_breakdown(
        steps=steps_run, data_seconds=data_wait - (resumed["dataWaitSeconds"] if resumed else 0.0),
        forward_backward_seconds=forward_backward_total, optimizer_seconds=optimizer_total,
        communication_seconds=meter.timed_seconds(), bubble_fraction=layout.get("bubbleFraction"),
        pipeline_idle_seconds=getattr(strategy, "idle_seconds", None))
    communication = gather_communication(meter, runtime.rank, steps_run)
    rank_samples = steps_run * per_rank_batch * accumulation
    traffic = (traffic_per_sample * rank_samples / layout.get("pipelineStages", 1)
               + optimizer_traffic_bytes(layout["localParams"]) * steps_run)
    ranks = gather_ranks({
        "rank": runtime.rank,
        "dataWaitSeconds": step_time["dataSeconds"],
        "dataWaitFraction": step_time["dataSeconds"] / attempt_wall if attempt_wall > 0 else None,
        "loaderBytesPerSecond": rank_samples * sum(tensor.nbytes for tensor in bundle.train[0])
        / max(step_time["dataSeconds"], 1e-9),
        "peakMemoryBytes": int(peak_memory),
        "localParams": layout["localParams"],
    })
    hardware_flops_per_second = cost.hardware_flops_per_sample * samples / wall
    final_val = curve[-1]["validationLoss"] if curve else float("nan")
    final_train = curve[-1]["trainLoss"] if curve else last_train_loss
    return {
        "apiVersion": API_VERSION,
        "kind": "TrialResult",
        "study": trial.study,
        "trial": trial.trial,
        "index": trial.index,
        "state": "Succeeded",
        "error": None,
        "axisValues": trial.axis_values,
        "config": config.dump(),
        "data": {
            "source": bundle.source_description,
            "synthetic": config.data.is_synthetic,
            "loader": "stream" if bundle.streaming else "memory",  # the path the training split took
            "variables": list(bundle.variables),
            "units": dict(bundle.units),
            "grid": list(grid),
            "trainSamples": len(bundle.train),
            "validationSamples": len(bundle.validation),
            "testSamples": len(bundle.test),
            "leadTimeHours": bundle.lead_time_hours,
            "normalization": {name: {"mean": float(bundle.mean[i]), "std": float(bundle.std[i])}
                              for i, name in enumerate(bundle.variables)},
        },
        "model": {
            "params": cost.params,
            "nonEmbeddingParams": cost.non_embedding_params,
            "embedDim": config.model.embed_dim,
            "depth": config.model.depth,
            "heads": config.model.heads,
            "patchSize": config.model.patch_size,
            "history": config.data.history,
            "tokensPerSample": cost.tokens_per_sample,
        },
        "training": {
            "steps": trial.steps,
            "samples": samples,
            "tokens": samples * cost.tokens_per_sample,
            "epochs": samples / max(len(bundle.train), 1),
            "flopsPerSample": cost.flops_per_sample,
            "flopsAnalytic": cost.flops_per_sample * samples,
            "flopsMeasured": measured_per_sample * samples,
            "hardwareFlops": cost.hardware_flops_per_sample * samples,
            "wallSeconds": wall,
            "samplesPerSecond": samples / wall,
            "flopsPerSecond": cost.flops_per_sample * samples / wall,
            "peakMemoryBytes": int(peak_memory),
            "dataWaitSeconds": data_wait,
            "computeSeconds": compute,
            "dataWaitFraction": data_wait / wall,
            "processes": runtime.world_size,
            "device": device.type,
            "tokensPerSecond": samples * cost.tokens_per_sample / wall,
            "hardwareFlopsPerSecond": hardware_flops_per_second,
            "peakFlopsPerSecondPerProcess": telemetry.peak_flops,
            **flops_utilization(cost.flops_per_sample * samples / wall, hardware_flops_per_second,
                                telemetry.peak_flops, runtime.world_size),
            "gradAccumulationSteps": accumulation,
            "microBatchSize": per_rank_batch,
            "parallelism": {"nodes": config.distributed.nodes, "procsPerNode": config.distributed.procs_per_node,
                            "dataParallel": data_parallel, **layout},
            "stepTime": step_time,
            "communication": communication,
            "memoryBandwidth": {
                "tensorTrafficBytesPerSample": traffic_per_sample,
                "estimatedBytesPerSecond": traffic / max(forward_backward_total + optimizer_total, 1e-9),
                **({"gpu": gpu_bandwidth} if gpu_bandwidth else {}),
            },
            "ranks": ranks,
            "checkpoint": checkpointer.summary() if checkpointer is not None else None,
            "storageBytes": storage_bytes(output.child(trial_folder(trial.trial))) if output is not None else None,
            "finalTrainLoss": final_train,
            "finalValidationLoss": final_val,
            "generalizationGap": final_val - final_train,
            "curve": curve,
            "ladder": ladder,
            "flopsCooldownBranches": cost.flops_per_sample * training.batch_size
            * sum(point["cooldownSteps"] for point in ladder),
        },
        "inference": inference,
        "evaluation": evaluation,
        "telemetry": telemetry.final_record(),
    }
