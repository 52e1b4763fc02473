"""Train and evaluate one trial, then write its result record.

Read top to bottom: set up the process, build the data and the model, train
for the planned number of steps with periodic validation, evaluate on the test
split, measure inference, write the record.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from wxscale.data import build_datasets
from wxscale.flops import measure_flops, model_cost
from wxscale.metrics import latitude_weighted_mse_loss, latitude_weights
from wxscale.model import WeatherViT
from wxscale.spec import API_VERSION
from wxscale_trainer.evaluate import evaluate_test, inference_latency, mean_loss
from wxscale_trainer.runtime import Runtime, peak_rss_bytes
from wxscale_trainer.schedule import lr_multiplier
from wxscale_trainer.telemetry import Telemetry
from wxscale.trialspec import TrialSpec

logger = logging.getLogger(__name__)

LOG_EVERY = 25  # steps between progress lines


def autocast_for(precision: str, device: torch.device):
    """Return a context factory for the trial's precision (autocast for bf16/fp16)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def infinite(loader: DataLoader, sampler):
    """Yield batches forever, reshuffling each epoch (seeded by the sampler)."""
    epoch = 0
    while True:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def run_trial(trial: TrialSpec, runtime: Runtime, telemetry: Telemetry | None = None) -> dict[str, Any]:
    """Train and evaluate one trial; return its result record (on every rank).

    `telemetry` receives the metrics; without one, the metrics are only collected for the record.
    """
    config = trial.config
    training = config.training
    device = runtime.device
    telemetry = telemetry or Telemetry(trial.study, trial.trial, rank=runtime.rank, device=device)
    torch.manual_seed(training.seed)

    # Data: splits, normalisation statistics and climatology from the training period.
    tick = time.perf_counter()
    bundle = build_datasets(config.data, seed=training.seed)
    telemetry.record_data_source_read(bundle.values.nbytes, time.perf_counter() - tick)
    n_vars = len(bundle.variables)
    grid = tuple(bundle.grid)
    in_channels = config.data.history * n_vars
    weights = torch.as_tensor(latitude_weights(bundle.latitudes), dtype=torch.float32, device=device)

    per_rank_batch = training.batch_size // (runtime.world_size * training.grad_accumulation)
    if runtime.distributed:
        sampler = DistributedSampler(bundle.train, num_replicas=runtime.world_size, rank=runtime.rank,
                                     shuffle=True, seed=training.seed, drop_last=True)
    else:
        sampler = RandomSampler(bundle.train, generator=torch.Generator().manual_seed(training.seed))
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
                       activation_checkpointing=training.activation_checkpointing).to(device)
    cost = model_cost(config.model, grid, in_channels=in_channels, out_channels=n_vars,
                      activation_checkpointing=training.activation_checkpointing,
                      attention_backend=training.attention_backend)
    sample_x = bundle.train[0][0].unsqueeze(0)
    measured_per_sample = measure_flops(model, sample_x.to(device), backward=True) / sample_x.shape[0]

    if runtime.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        telemetry.attach_ddp(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.optimizer.lr,
                                  betas=(training.optimizer.beta1, training.optimizer.beta2),
                                  weight_decay=training.optimizer.weight_decay)
    autocast = autocast_for(training.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=training.precision == "fp16")

    logger.info("trial %s: %d params (%d non-embedding), grid %s, %d train / %d val / %d test samples, %d steps, "
                "%.3g FLOPs per sample", trial.trial, cost.params, cost.non_embedding_params, grid,
                len(bundle.train), len(bundle.validation), len(bundle.test), trial.steps, cost.flops_per_sample)
    telemetry.start(planned_steps=trial.steps, flops_per_sample=cost.flops_per_sample,
                    tokens_per_sample=cost.tokens_per_sample, precision=training.precision,
                    strategy=config.distributed.strategy, world_size=runtime.world_size)

    # Training loop.
    batches = infinite(train_loader, sampler)
    curve: list[dict[str, Any]] = []
    data_wait = compute = 0.0
    train_loss_sum, train_loss_count, last_train_loss = 0.0, 0, float("nan")
    started = time.perf_counter()
    for step in range(trial.steps):
        for group in optimizer.param_groups:
            group["lr"] = training.optimizer.lr * lr_multiplier(step, trial.steps, training.schedule)

        step_loss = 0.0
        step_data = step_forward_backward = 0.0
        step_bytes = 0
        for micro in range(training.grad_accumulation):
            tick = time.perf_counter()
            x, y, mask = next(batches)
            x, y, mask = x.to(device, non_blocking=True), y.to(device, non_blocking=True), mask.to(device)
            tock = time.perf_counter()
            step_data += tock - tick
            step_bytes += x.nbytes + y.nbytes + mask.nbytes

            # Only the last micro-batch all-reduces gradients under DDP.
            sync = contextlib.nullcontext() if (micro == training.grad_accumulation - 1 or not runtime.distributed) \
                else model.no_sync()
            with sync:
                with autocast():
                    prediction = model(x)
                loss = latitude_weighted_mse_loss(prediction.float(), y, weights, mask)
                scaler.scale(loss / training.grad_accumulation).backward()
            step_loss += loss.item() / training.grad_accumulation
            step_forward_backward += time.perf_counter() - tock

        tick = time.perf_counter()
        if training.optimizer.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), training.optimizer.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        # NOTE: on CUDA the optimizer's kernels run asynchronously; their time shows in the next step's phases.
        step_optimizer = time.perf_counter() - tick
        data_wait += step_data
        compute += step_forward_backward + step_optimizer

        if not math.isfinite(step_loss):
            from wxscale.errors import WxscaleError

            raise WxscaleError(f"training loss became {step_loss} at step {step + 1}; lower "
                               f"spec.training.optimizer.lr (now {training.optimizer.lr}) or use fp32")
        train_loss_sum += step_loss
        train_loss_count += 1
        last_train_loss = step_loss
        telemetry.record_step(samples=per_rank_batch * training.grad_accumulation, loss=step_loss,
                              data_seconds=step_data, forward_backward_seconds=step_forward_backward,
                              optimizer_seconds=step_optimizer, batch_bytes=step_bytes)

        # Validation along the way: the over/underfitting check.
        done = step + 1
        if done % training.eval_every == 0 or done == trial.steps:
            val_loss = mean_loss(model, val_loader, weights, device, autocast, max_batches=training.eval_batches)
            telemetry.record_validation(val_loss)
            point = {"step": done, "trainLoss": train_loss_sum / train_loss_count, "validationLoss": val_loss}
            curve.append(point)
            train_loss_sum, train_loss_count = 0.0, 0
            elapsed = time.perf_counter() - started
            samples_per_s = done * training.batch_size / elapsed
            logger.info("step %d/%d | train loss %.4f | val loss %.4f | %.1f samples/s | %.3g FLOP/s | "
                        "data wait %.1f %%", done, trial.steps, point["trainLoss"], val_loss, samples_per_s,
                        samples_per_s * cost.flops_per_sample, 100.0 * data_wait / max(elapsed, 1e-9))
        elif done % LOG_EVERY == 0:
            logger.debug("step %d/%d | loss %.4f", done, trial.steps, step_loss)
    wall = time.perf_counter() - started

    # Test evaluation (physical units) and inference measurements on the bare model.
    bare = model.module if isinstance(model, DistributedDataParallel) else model
    evaluation = evaluate_test(bare, bundle, test_loader, weights, device, autocast)
    inference = inference_latency(bare, sample_x, training.batch_size, device, autocast)

    samples = trial.steps * training.batch_size
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
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
            "finalTrainLoss": final_train,
            "finalValidationLoss": final_val,
            "generalizationGap": final_val - final_train,
            "curve": curve,
        },
        "inference": inference,
        "evaluation": evaluation,
        "telemetry": telemetry.final_record(),
    }
