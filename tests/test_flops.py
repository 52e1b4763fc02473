"""Tests of the analytic parameter and FLOP counts against the real module and FlopCounterMode."""

from __future__ import annotations

import pytest
import torch

from wxscale.flops import count_parameters, forward_flops, measure_flops, model_cost, param_count
from wxscale.model import WeatherViT
from wxscale.spec import ModelSpec

# (name, model spec fields, grid, in_channels = history x variables, out_channels = variables)
SHAPES = [
    # The quickstart study: depth and heads scaled 1x, 2x, 4x, history 2 of one variable.
    ("quickstart-1x", dict(depth=1, heads=2, embed_dim=64, patch_size=4), (32, 64), 2, 1),
    ("quickstart-2x", dict(depth=2, heads=4, embed_dim=64, patch_size=4), (32, 64), 2, 1),
    ("quickstart-4x", dict(depth=4, heads=8, embed_dim=64, patch_size=4), (32, 64), 2, 1),
    # NCEP grid (25 x 53) padded to multiples of 8 and 2.
    ("deep-wide-padded", dict(depth=8, heads=8, embed_dim=256, patch_size=8), (25, 53), 4, 1),
    ("fine-patch-padded", dict(depth=3, heads=3, embed_dim=96, patch_size=2, mlp_ratio=2.5), (25, 53), 1, 1),
    ("two-variables-dropout", dict(depth=2, heads=4, embed_dim=128, patch_size=4, dropout=0.1), (25, 53), 6, 2),
]
IDS = [shape[0] for shape in SHAPES]
BATCH = 2


def build(fields, grid, in_channels, out_channels, **options) -> tuple[ModelSpec, WeatherViT, torch.Tensor]:
    spec = ModelSpec(**fields)
    torch.manual_seed(0)
    model = WeatherViT(spec, grid, in_channels, out_channels, **options)
    return spec, model, torch.randn(BATCH, in_channels, *grid)


@pytest.mark.parametrize(("name", "fields", "grid", "in_channels", "out_channels"), SHAPES, ids=IDS)
def test_param_count_matches_module(name, fields, grid, in_channels, out_channels):
    spec, model, _ = build(fields, grid, in_channels, out_channels)
    total, non_embedding = count_parameters(model)
    cost = model_cost(spec, grid, in_channels, out_channels)

    assert param_count(spec, grid, in_channels, out_channels) == total
    assert cost.params == total
    assert cost.non_embedding_params == non_embedding


def test_non_embedding_params_by_module():
    # Non-embedding parameters are those of the blocks and the final norm.
    _, model, _ = build(dict(depth=2, heads=2, embed_dim=32, patch_size=4), (32, 64), 2, 1)
    expected = sum(p.numel() for p in model.blocks.parameters()) + sum(p.numel() for p in model.norm.parameters())

    _, non_embedding = count_parameters(model)

    assert non_embedding == expected


@pytest.mark.parametrize(("name", "fields", "grid", "in_channels", "out_channels"), SHAPES, ids=IDS)
def test_forward_flops_match_measured(name, fields, grid, in_channels, out_channels):
    spec, model, x = build(fields, grid, in_channels, out_channels)
    cost = model_cost(spec, grid, in_channels, out_channels)

    measured = measure_flops(model, x, backward=False) / BATCH

    assert measured == pytest.approx(cost.forward_flops_per_sample, rel=0.02)


@pytest.mark.parametrize(("name", "fields", "grid", "in_channels", "out_channels"), SHAPES, ids=IDS)
def test_training_flops_match_measured_math_attention(name, fields, grid, in_channels, out_channels):
    # The math backend runs attention as plain matmuls, so nothing is recomputed and the
    # measurement is the model's own forward + backward cost.
    spec, model, x = build(fields, grid, in_channels, out_channels, attention_backend="math")
    cost = model_cost(spec, grid, in_channels, out_channels, attention_backend="math")

    measured = measure_flops(model, x) / BATCH

    assert measured == pytest.approx(cost.flops_per_sample, rel=0.02)
    assert cost.hardware_flops_per_sample == cost.flops_per_sample


@pytest.mark.parametrize(("name", "fields", "grid", "in_channels", "out_channels"), SHAPES, ids=IDS)
@pytest.mark.parametrize("backend", ["auto", "flash", "math"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
def test_hardware_flops_match_measured(name, fields, grid, in_channels, out_channels, backend, checkpointing):
    spec, model, x = build(
        fields, grid, in_channels, out_channels, attention_backend=backend, activation_checkpointing=checkpointing
    )
    cost = model_cost(spec, grid, in_channels, out_channels, checkpointing, attention_backend=backend)

    measured = measure_flops(model, x) / BATCH

    assert measured == pytest.approx(cost.hardware_flops_per_sample, rel=0.02)


def test_partial_checkpointing_counts_selected_blocks():
    fields = dict(depth=4, heads=2, embed_dim=64, patch_size=4)
    spec, model, x = build(fields, (32, 64), 2, 1, activation_checkpointing=True, checkpoint_blocks=[0, 2])
    cost = model_cost(spec, (32, 64), 2, 1, True, checkpoint_blocks=[0, 2])
    everything = model_cost(spec, (32, 64), 2, 1, True)
    nothing = model_cost(spec, (32, 64), 2, 1, False)

    measured = measure_flops(model, x) / BATCH

    assert measured == pytest.approx(cost.hardware_flops_per_sample, rel=0.02)
    extra = cost.hardware_flops_per_sample - nothing.hardware_flops_per_sample
    assert extra * 2 == everything.hardware_flops_per_sample - nothing.hardware_flops_per_sample


def test_training_flops_formula():
    # Training = 3 x forward, less the patch embedding's input gradient, which is never computed.
    spec = ModelSpec(depth=2, heads=2, embed_dim=64, patch_size=4)
    parts = forward_flops(spec, (32, 64), 2, 1)
    cost = model_cost(spec, (32, 64), 2, 1)

    assert cost.forward_flops_per_sample == parts.total
    assert cost.flops_per_sample == 3 * parts.total - parts.patch_embed


def test_attention_flops_are_counted_on_cpu():
    # 4x the tokens must give 16x the attention FLOPs. The attention part of the measured
    # count is what is left after the analytic matmuls outside attention.
    fields = dict(depth=2, heads=2, embed_dim=64, patch_size=4)
    attention = {}
    for grid in [(16, 32), (32, 64)]:
        spec, model, x = build(fields, grid, 2, 1, attention_backend="flash")
        parts = forward_flops(spec, grid, 2, 1)
        measured = measure_flops(model, x, backward=False) / BATCH
        attention[grid] = measured - (parts.total - parts.attention)

    tokens = 8 * 16
    assert attention[(32, 64)] == 2 * 2 * 2 * tokens**2 * 64  # depth * 2 products * 2 * L^2 * D
    assert attention[(32, 64)] == 16 * attention[(16, 32)]


def test_measure_flops_leaves_gradients_alone():
    _, model, x = build(dict(depth=1, heads=2, embed_dim=32, patch_size=4), (32, 64), 2, 1)

    measure_flops(model, x)

    assert all(parameter.grad is None for parameter in model.parameters())
