"""Trainer: training samples/s of WeatherViT against the same architecture in plain PyTorch, and FLOP/s against matmul.

Both models train on the same random batches with the same loss, in one
process, in rounds where they take turns going first, so load changes on the
machine hit both alike. WeatherViT steps with the trainer's optimizer
(`wxscale_trainer.optimizer.build_optimizer`, fused AdamW); the reference with
`torch.optim.AdamW` as a user would write it. The reference's samples/s is
WeatherViT's divided by the median of the per-round speed ratios. The
reference is written with `nn.TransformerEncoder` and has the same shapes:
patch embedding by convolution, learned position embedding, pre-norm blocks
with GELU MLPs, final LayerNorm, linear head, un-patchify and the residual
connection to the last input step. Goal: WeatherViT no slower (ratio >= 1).

Achieved FLOP/s is samples/s times the analytic training FLOPs per sample
(`wxscale.flops.model_cost`), divided by the measured rate of a 1024 x 1024
float32 matmul in the same process with the same threads. Goal on CPU:
at least half of it for the quickstart study's largest model, which is read
from examples/quickstart.yaml and measured with the batch size and CPU threads
that `wxscale run` gives its trials on this machine. The note of that row
gives the share of the step spent in attention and the FLOP rate of PyTorch's
fused attention at the model's shapes. With small heads, attention is the part
of the step that runs furthest below the matmul rate.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import QuickstartModel, Result, quickstart_models, result
from wxscale.flops import model_cost
from wxscale.model import WeatherViT, mlp_hidden_dim, token_grid
from wxscale.spec import ModelSpec, OptimizerSpec
from wxscale_trainer.optimizer import build_optimizer

NAME = "trainer"

# A wider model on the quickstart's grid, where matmuls dominate the step.
WIDE = ModelSpec(patch_size=4, depth=4, heads=4, embed_dim=256)
TINY = ModelSpec(patch_size=8, depth=2, heads=2, embed_dim=32)
ROUNDS = {"tiny": 1, "quick": 6, "full": 12}
STEPS_PER_ROUND = {"tiny": 2, "quick": 3, "full": 4}


def configurations(mode: str) -> list[tuple[str, QuickstartModel, bool]]:
    """Return (label, model, whether the goal applies) for `mode`; every mode measures the quickstart's largest model."""
    largest = quickstart_models()[-1]
    if mode == "tiny":
        return [("tiny model", QuickstartModel(TINY, largest.grid, largest.in_channels, largest.out_channels, 4,
                                               largest.threads), False)]
    rows = [(f"quickstart largest ({largest.label}), {largest.threads} thread(s) as in `wxscale run`", largest, True)]
    cores = torch.get_num_threads()
    if mode == "full" and cores != largest.threads:
        rows.append((f"quickstart largest ({largest.label}), {cores} threads", QuickstartModel(
            largest.spec, largest.grid, largest.in_channels, largest.out_channels, largest.batch, cores), False))
    if mode == "full":
        wide = QuickstartModel(WIDE, largest.grid, largest.in_channels, largest.out_channels, 16, cores)
        rows.append((f"wide (depth 4, width 256), {cores} threads", wide, False))
    return rows


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` intra-op threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


def attention_flops(model: QuickstartModel) -> float:
    """Return the attention FLOPs of one training step of all blocks, as the analytic model counts them.

    Each of the products QK^T and AV is 2 * tokens**2 * width per sample, forward once and backward twice.
    """
    spec = model.spec
    rows, cols = token_grid(model.grid, spec.patch_size)
    tokens = rows * cols
    return 3 * 2 * (2 * tokens**2 * spec.embed_dim) * model.batch * spec.depth


def attention_seconds(model: QuickstartModel, repeats: int = 5) -> float:
    """Time PyTorch's fused attention, forward and backward, at the model's shapes; return seconds per training step."""
    spec = model.spec
    rows, cols = token_grid(model.grid, spec.patch_size)
    tokens, head_dim = rows * cols, spec.embed_dim // spec.heads
    qkv = torch.randn(model.batch, tokens, 3, spec.heads, head_dim, requires_grad=True)

    def one_pass() -> None:
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # the layout WeatherViT's attention uses
        F.scaled_dot_product_attention(query, key, value).sum().backward()

    one_pass()
    began = time.perf_counter()
    for _ in range(repeats):
        one_pass()
    return (time.perf_counter() - began) / repeats * spec.depth


def compare(label: str, model: QuickstartModel, goal: bool, rounds: int, steps: int) -> list[Result]:
    with torch_threads(model.threads):
        return _compare(label, model, goal, rounds, steps)


def _compare(label: str, model: QuickstartModel, goal: bool, rounds: int, steps: int) -> list[Result]:
    spec, batch = model.spec, model.batch
    torch.manual_seed(0)
    ours = WeatherViT(spec, grid=model.grid, in_channels=model.in_channels, out_channels=model.out_channels)
    reference = ReferenceViT(spec, model.grid, model.in_channels, model.out_channels)
    ours_parameters = sum(p.numel() for p in ours.parameters())
    reference_parameters = sum(p.numel() for p in reference.parameters())
    if ours_parameters != reference_parameters:
        raise AssertionError(f"parameter counts differ: {ours_parameters} and {reference_parameters}")
    x = torch.randn(batch, model.in_channels, *model.grid)
    y = torch.randn(batch, model.out_channels, *model.grid)
    optimizers = {id(ours): build_optimizer(ours.parameters(), OptimizerSpec(lr=1e-4)),
                  id(reference): torch.optim.AdamW(reference.parameters(), lr=1e-4)}

    # Warm-up, then rounds in which the two models take turns going first; the matmul rate is measured in
    # every round too. The speed ratio is the median of the per-round ratios, so a burst of load on the
    # machine during one round moves one ratio, not the result.
    for network in (ours, reference):
        train_steps(network, optimizers[id(network)], x, y, 2)
    ours_times, reference_times, rates, attention_times = [], [], [], []
    for index in range(rounds):
        order = (ours, reference) if index % 2 == 0 else (reference, ours)
        seconds = {id(network): train_steps(network, optimizers[id(network)], x, y, steps) for network in order}
        ours_times.append(seconds[id(ours)])
        reference_times.append(seconds[id(reference)])
        rates.append(matmul_rate())
        attention_times.append(attention_seconds(model))

    step_seconds = statistics.median(ours_times)
    ours_rate = batch / step_seconds
    ratio = statistics.median(theirs / own for theirs, own in zip(reference_times, ours_times))
    reference_rate = ours_rate / ratio
    spread = (max(ours_times) - min(ours_times)) / step_seconds if rounds > 1 else math.nan
    flops = model_cost(spec, model.grid, model.in_channels, model.out_channels).flops_per_sample
    achieved = ours_rate * flops
    matmul = statistics.median(rates)
    attention = statistics.median(attention_times)
    threads = model.threads
    return [
        result(NAME, f"samples/s, {label}", ours_rate, "samples/s", "nn.TransformerEncoder reference",
               reference_rate, ">= 1", f"batch {batch}, {ours_parameters:,} parameters, median of {rounds} paired "
               f"rounds of {steps} steps; round-to-round spread of WeatherViT {spread:.0%}"),
        result(NAME, f"achieved FLOP/s, {label}", achieved, "FLOP/s", f"fp32 1024^3 matmul, {threads} thread(s)",
               matmul, ">= 0.5" if goal else None,
               f"{flops:.3g} training FLOPs per sample (analytic); attention (fused SDPA, forward and backward, "
               f"head size {spec.embed_dim // spec.heads}) takes {attention / step_seconds:.0%} of the step and "
               f"runs at {attention_flops(model) / attention / matmul:.2f} of the matmul rate"),
    ]


def run(mode: str = "quick") -> list[Result]:
    """Run the trainer benchmarks of `mode` ('tiny', 'quick' or 'full')."""
    results: list[Result] = []
    for label, model, goal in configurations(mode):
        results += compare(label, model, goal, ROUNDS[mode], STEPS_PER_ROUND[mode])
    return results
