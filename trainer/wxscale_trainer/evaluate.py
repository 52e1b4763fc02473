"""Evaluation: validation loss during training, test metrics and inference latency after it."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from wxscale.metrics import evaluate_forecast, latitude_weighted_mse_loss
from wxscale_trainer.runtime import PeakMemory


@torch.no_grad()
def mean_loss(model, loader: DataLoader, weights: torch.Tensor, device: torch.device, autocast,
              max_batches: int | None = None) -> float:
    """Latitude-weighted MSE on normalised fields, averaged over samples."""
    model.eval()
    total, count = 0.0, 0
    for i, (x, y, mask) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        with autocast():
            prediction = model(x)
        loss = latitude_weighted_mse_loss(prediction.float(), y, weights, mask)
        total += loss.item() * x.shape[0]
        count += x.shape[0]
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def predict_test(model, loader: DataLoader, device: torch.device, autocast) -> np.ndarray:
    """Run the model over the test split in order; returns normalised predictions (N, V, H, W)."""
    model.eval()
    outputs = []
    for x, _, _ in loader:
        with autocast():
            outputs.append(model(x.to(device)).float().cpu().numpy())
    model.train()
    return np.concatenate(outputs, axis=0)


def evaluate_test(model, bundle, loader: DataLoader, weights: torch.Tensor, device: torch.device,
                  autocast) -> dict[str, Any]:
    """Test-split metrics per variable in physical units for the model, persistence and climatology.

    The test loss (normalised, latitude-weighted MSE) is what the scaling laws fit.
    """
    test_loss = mean_loss(model, loader, weights, device, autocast)
    normalised = predict_test(model, loader, device, autocast)

    # Back to physical units with the training-period statistics.
    mean = bundle.mean[None, :, None, None]
    std = bundle.std[None, :, None, None]
    forecast = normalised * std + mean

    arrays = bundle.test_arrays()
    truth = arrays.targets
    mask = np.isfinite(truth)
    baselines = {
        "model": forecast,
        "persistence": arrays.forecast_inputs_last,
        "climatology": arrays.climatology,
    }

    scores = {
        label: evaluate_forecast(prediction, truth, arrays.climatology, bundle.latitudes, mask=mask,
                                 variables=bundle.variables)
        for label, prediction in baselines.items()
    }
    variables = {}
    for name in bundle.variables:
        variables[name] = {"units": bundle.units.get(name, "")}
        for label in baselines:
            variables[name][label] = scores[label][name]
    return {"testLoss": test_loss, "leadTimeHours": bundle.lead_time_hours, "variables": variables}


@torch.no_grad()
def inference_latency(model, sample: torch.Tensor, batch_size: int, device: torch.device, autocast,
                      warmup: int = 3, repeats: int = 10) -> dict[str, Any]:
    """Median wall time in ms of one forecast at batch 1 and at the training batch size, after warm-up."""
    model.eval()
    result: dict[str, Any] = {"batchSize": batch_size}
    peak = 0
    for label, batch in (("latencyMsBatch1", 1), ("latencyMsBatch", batch_size)):
        x = sample[:1].to(device).repeat(batch, *([1] * (sample.dim() - 1)))
        with PeakMemory(device) as memory:
            timings = []
            for i in range(warmup + repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                with autocast():
                    model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    timings.append((time.perf_counter() - start) * 1000.0)
        result[label] = statistics.median(timings)
        peak = max(peak, memory.peak_bytes)
    result["peakMemoryBytes"] = peak
    model.train()
    return result
