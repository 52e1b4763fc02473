"""FLOPs model: the analytic training FLOPs of `wxscale.flops` against FlopCounterMode, across the quickstart sizes.

The model sizes are those of examples/quickstart.yaml: depth and heads x1,
x2, x4 and x8 from depth 1 and heads 1, width 64, on a 32 x 64 grid with
history 2 and patch 4. For each, the analytic count
`model_cost(...).hardware_flops_per_sample` is compared with `measure_flops`,
which runs one forward and backward pass under PyTorch's FlopCounterMode. Both count matmuls only, so the goal is equality: a ratio
of 1 within 1 %. The training FLOPs that compute budgets use
(`flops_per_sample`, without the attention recompute of fused kernels) are
listed in the note.
"""

from __future__ import annotations

import torch

from benchmarks.common import Result, result
from wxscale.flops import measure_flops, model_cost
from wxscale.model import WeatherViT
from wxscale.spec import ModelSpec

NAME = "flops"

GRID = (32, 64)
IN_CHANNELS, OUT_CHANNELS = 2, 1
FACTORS = {"tiny": (1, 2), "quick": (1, 2, 4, 8), "full": (1, 2, 4, 8)}


def run(mode: str = "quick") -> list[Result]:
    """Compare analytic and counted FLOPs for the quickstart sizes of `mode`."""
    results = []
    for factor in FACTORS[mode]:
        spec = ModelSpec(patch_size=4, depth=factor, heads=factor, embed_dim=64)
        torch.manual_seed(0)
        model = WeatherViT(spec, grid=GRID, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS)
        batch = 2
        counted = measure_flops(model, torch.randn(batch, IN_CHANNELS, *GRID), backward=True) / batch
        cost = model_cost(spec, GRID, IN_CHANNELS, OUT_CHANNELS)
        note = (f"{cost.params:,} parameters; training FLOPs per sample {cost.flops_per_sample:.4g} "
                f"(= {cost.flops_per_sample / counted:.4f} of counted)")
        results.append(result(NAME, f"analytic FLOPs per sample, depth {factor} heads {factor}",
                              float(cost.hardware_flops_per_sample), "FLOP", "FlopCounterMode", counted,
                              None, note))
        row = results[-1]
        row.goal = "within 1 %"
        row.met = row.ratio is not None and abs(row.ratio - 1.0) <= 0.01
    return results
