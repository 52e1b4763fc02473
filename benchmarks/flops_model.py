"""FLOPs model: the analytic training FLOPs of `wxscale.flops` against FlopCounterMode, across the quickstart sizes.

The model sizes are those of examples/quickstart.yaml, read by planning it
(`benchmarks.common.quickstart_models`). For each, the analytic count
`model_cost(...).hardware_flops_per_sample` is compared with `measure_flops`,
which runs one forward and backward pass under PyTorch's FlopCounterMode. Both count matmuls only, so the goal is equality: a ratio
of 1 within 1 %. The training FLOPs that compute budgets use
(`flops_per_sample`, without the attention recompute of fused kernels) are
listed in the note.
"""

from __future__ import annotations

import torch

from benchmarks.common import Result, quickstart_models, result
from wxscale.flops import measure_flops, model_cost
from wxscale.model import WeatherViT

NAME = "flops"


def run(mode: str = "quick") -> list[Result]:
    """Compare analytic and counted FLOPs for the quickstart sizes of `mode`."""
    results = []
    models = quickstart_models()
    for quickstart in models[:2] if mode == "tiny" else models:
        spec = quickstart.spec
        torch.manual_seed(0)
        model = WeatherViT(spec, grid=quickstart.grid, in_channels=quickstart.in_channels,
                           out_channels=quickstart.out_channels)
        batch = 2
        counted = measure_flops(model, torch.randn(batch, quickstart.in_channels, *quickstart.grid),
                                backward=True) / batch
        cost = model_cost(spec, quickstart.grid, quickstart.in_channels, quickstart.out_channels)
        note = (f"{cost.params:,} parameters; training FLOPs per sample {cost.flops_per_sample:.4g} "
                f"(= {cost.flops_per_sample / counted:.4f} of counted)")
        results.append(result(NAME, f"analytic FLOPs per sample, {quickstart.label}",
                              float(cost.hardware_flops_per_sample), "FLOP", "FlopCounterMode", counted,
                              None, note))
        row = results[-1]
        row.goal = "within 1 %"
        row.met = row.ratio is not None and abs(row.ratio - 1.0) <= 0.01
    return results
