"""Trainer: training samples/s of WeatherViT against the same architecture in plain PyTorch, and FLOP/s against matmul.

Both models train on the same random batches with the same loss and AdamW,
in one process, in rounds where they take turns going first, so load changes
on the machine hit both alike. The reference's samples/s is WeatherViT's
divided by the median of the per-round speed ratios. The reference is written with `nn.TransformerEncoder` and has the
same shapes: patch embedding by convolution, learned position embedding,
pre-norm blocks with GELU MLPs, final LayerNorm, linear head, un-patchify and
the residual connection to the last input step. Goal: WeatherViT no slower
(ratio >= 1; a ratio within the rounds' spread counts as equal only in the note).

Achieved FLOP/s is samples/s times the analytic training FLOPs per sample
(`wxscale.flops.model_cost`), divided by the measured rate of a 1024 x 1024
float32 matmul in the same process with the same threads. Goal on CPU: at
least half of it for the largest model of the quickstart study.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import Result, result
from wxscale.flops import model_cost
from wxscale.model import WeatherViT, mlp_hidden_dim, token_grid
from wxscale.spec import ModelSpec

NAME = "trainer"

# (label, model, batch) measured per mode. The quickstart's largest model: depth 8, heads 8, width 64.
QUICKSTART_LARGEST = ModelSpec(patch_size=4, depth=8, heads=8, embed_dim=64)
WIDE = ModelSpec(patch_size=4, depth=4, heads=4, embed_dim=256)
GRID = (32, 64)
IN_CHANNELS, OUT_CHANNELS = 2, 1  # history 2 of one variable, as in the quickstart
CONFIGS = {
    "tiny": [("quickstart largest (depth 8, width 64)", ModelSpec(patch_size=8, depth=2, heads=2, embed_dim=32), 4)],
    "quick": [("quickstart largest (depth 8, width 64)", QUICKSTART_LARGEST, 16)],
    "full": [("quickstart largest (depth 8, width 64)", QUICKSTART_LARGEST, 16),
             ("wide (depth 4, width 256)", WIDE, 16)],
}
ROUNDS = {"tiny": 1, "quick": 6, "full": 12}
STEPS_PER_ROUND = {"tiny": 2, "quick": 3, "full": 4}


class ReferenceViT(nn.Module):
    """The WeatherViT architecture written plainly with `nn.TransformerEncoder`, for comparison."""

    def __init__(self, spec: ModelSpec, grid: tuple[int, int], in_channels: int, out_channels: int):
        super().__init__()
        self.grid = grid
        self.patch = spec.patch_size
        self.out_channels = out_channels
        self.rows, self.cols = token_grid(grid, spec.patch_size)
        self.patch_embed = nn.Conv2d(in_channels, spec.embed_dim, spec.patch_size, spec.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.rows * self.cols, spec.embed_dim))
        layer = nn.TransformerEncoderLayer(spec.embed_dim, spec.heads, dim_feedforward=mlp_hidden_dim(spec),
                                           dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, spec.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(spec.embed_dim)
        self.head = nn.Linear(spec.embed_dim, spec.patch_size**2 * out_channels)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        p = self.patch
        padded = F.pad(x, (0, self.cols * p - self.grid[1], 0, self.rows * p - self.grid[0]))
        tokens = self.patch_embed(padded).flatten(2).transpose(1, 2) + self.pos_embed
        tokens = self.norm(self.encoder(tokens))
        values = self.head(tokens).view(batch, self.rows, self.cols, self.out_channels, p, p)
        fields = values.permute(0, 3, 1, 4, 2, 5).reshape(batch, self.out_channels, self.rows * p, self.cols * p)
        return fields[:, :, : self.grid[0], : self.grid[1]] + x[:, -self.out_channels :]


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                steps: int) -> float:
    """Run `steps` training steps (forward, MSE, backward, AdamW); return the seconds per step."""
    began = time.perf_counter()
    for _ in range(steps):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - began) / steps


def matmul_rate(size: int = 1024, seconds: float = 0.3) -> float:
    """Return the float32 matmul rate of this process in FLOP/s: 2 * size**3 per product, best of 3 runs."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        products, began = 0, time.perf_counter()
        while products < 2 or time.perf_counter() - began < seconds / 3:
            torch.mm(a, b)
            products += 1
        best = max(best, 2.0 * size**3 * products / (time.perf_counter() - began))
    return best


def compare(label: str, spec: ModelSpec, batch: int, rounds: int, steps: int) -> list[Result]:
    torch.manual_seed(0)
    ours = WeatherViT(spec, grid=GRID, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS)
    reference = ReferenceViT(spec, GRID, IN_CHANNELS, OUT_CHANNELS)
    ours_parameters = sum(p.numel() for p in ours.parameters())
    reference_parameters = sum(p.numel() for p in reference.parameters())
    if ours_parameters != reference_parameters:
        raise AssertionError(f"parameter counts differ: {ours_parameters} and {reference_parameters}")
    x = torch.randn(batch, IN_CHANNELS, *GRID)
    y = torch.randn(batch, OUT_CHANNELS, *GRID)
    optimizers = {id(model): torch.optim.AdamW(model.parameters(), lr=1e-4) for model in (ours, reference)}

    # Warm-up, then rounds in which the two models take turns going first; the matmul rate is measured in
    # every round too. The speed ratio is the median of the per-round ratios, so a burst of load on the
    # machine during one round moves one ratio, not the result.
    for model in (ours, reference):
        train_steps(model, optimizers[id(model)], x, y, 2)
    ours_times, reference_times, rates = [], [], []
    for index in range(rounds):
        order = (ours, reference) if index % 2 == 0 else (reference, ours)
        seconds = {id(model): train_steps(model, optimizers[id(model)], x, y, steps) for model in order}
        ours_times.append(seconds[id(ours)])
        reference_times.append(seconds[id(reference)])
        rates.append(matmul_rate())

    ours_rate = batch / statistics.median(ours_times)
    ratio = statistics.median(theirs / own for theirs, own in zip(reference_times, ours_times))
    reference_rate = ours_rate / ratio
    spread = (max(ours_times) - min(ours_times)) / statistics.median(ours_times) if rounds > 1 else math.nan
    flops = model_cost(spec, GRID, IN_CHANNELS, OUT_CHANNELS).flops_per_sample
    achieved = ours_rate * flops
    matmul = statistics.median(rates)
    threads = torch.get_num_threads()
    return [
        result(NAME, f"samples/s, {label}", ours_rate, "samples/s", "nn.TransformerEncoder reference",
               reference_rate, ">= 1", f"batch {batch}, {ours_parameters:,} parameters, median of {rounds} paired "
               f"rounds of {steps} steps; round-to-round spread of WeatherViT {spread:.0%}"),
        result(NAME, f"achieved FLOP/s, {label}", achieved, "FLOP/s", f"fp32 1024^3 matmul, {threads} threads",
               matmul, ">= 0.5" if spec == QUICKSTART_LARGEST else None,
               f"{flops:.3g} training FLOPs per sample (analytic)"),
    ]


def run(mode: str = "quick") -> list[Result]:
    """Run the trainer benchmarks of `mode` ('tiny', 'quick' or 'full')."""
    results: list[Result] = []
    for label, spec, batch in CONFIGS[mode]:
        results += compare(label if mode != "tiny" else "tiny model", spec, batch, ROUNDS[mode], STEPS_PER_ROUND[mode])
    return results
