"""Tests of the WeatherViT: shapes, padding, residual prediction, checkpointing, attention backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from wxscale.errors import WxscaleError
from wxscale.model import WeatherViT, check_attention_backend, supported_attention_backends
from wxscale.spec import ModelSpec

SMALL = ModelSpec(patch_size=4, depth=2, heads=2, embed_dim=32)


def make_model(spec: ModelSpec = SMALL, grid=(32, 64), in_channels=2, out_channels=1, seed=0, **options):
    torch.manual_seed(seed)
    return WeatherViT(spec, grid, in_channels, out_channels, **options)


def randomise_head(model: WeatherViT) -> None:
    """Give the zero-initialised head random weights so that the network's output shows."""
    torch.nn.init.normal_(model.head.weight, std=0.02)


@pytest.mark.parametrize(
    ("grid", "patch", "tokens"),
    [((32, 64), 4, 8 * 16), ((25, 53), 4, 7 * 14), ((25, 53), 8, 4 * 7), ((5, 3), 1, 15)],
)
def test_output_shape_and_padding(grid, patch, tokens):
    spec = SMALL.model_copy(update={"patch_size": patch})
    model = make_model(spec, grid=grid, in_channels=6, out_channels=3)
    x = torch.randn(2, 6, *grid)

    y = model(x)

    assert y.shape == (2, 3, *grid)
    assert model.num_tokens == tokens
    assert model.pos_embed.shape == (1, tokens, spec.embed_dim)
    assert torch.isfinite(y).all()


def test_padding_crops_back_to_grid():
    # Every output cell, including those in the last, partly padded patch row and column,
    # must depend on the input: perturb the south-east corner and look at its output.
    model = make_model(SMALL.model_copy(update={"patch_size": 8}), grid=(25, 53), in_channels=1, out_channels=1)
    randomise_head(model)
    model.eval()
    x = torch.randn(1, 1, 25, 53)
    changed = x.clone()
    changed[0, 0, -1, -1] += 5.0

    with torch.no_grad():
        difference = (model(changed) - model(x)).abs()

    assert difference[0, 0, -1, -1] > 1.0
    assert difference.shape == (1, 1, 25, 53)


def test_untrained_residual_model_is_persistence():
    model = make_model(in_channels=6, out_channels=2, grid=(25, 53))
    x = torch.randn(3, 6, 25, 53)

    y = model(x)

    torch.testing.assert_close(y, x[:, -2:])


def test_direct_model_is_not_persistence():
    model = make_model(in_channels=2, out_channels=1, residual=False)
    x = torch.randn(2, 2, 32, 64)

    y = model(x)

    assert not torch.allclose(y, x[:, -1:], atol=1e-2)


def test_residual_adds_last_input_step():
    model = make_model(in_channels=4, out_channels=2, grid=(16, 16))
    randomise_head(model)
    model.eval()
    x = torch.randn(2, 4, 16, 16)

    with torch.no_grad():
        residual_output = model(x)
        tokens = model.embed(x)
        for block in model.blocks:
            tokens = block(tokens)
        model.residual = False
        network_output = model.decode(tokens, x)

    torch.testing.assert_close(residual_output, network_output + x[:, 2:])


def test_residual_needs_whole_steps():
    with pytest.raises(ValueError, match="multiple of out_channels"):
        make_model(in_channels=3, out_channels=2)


def test_wrong_input_shape_is_rejected():
    model = make_model()
    with pytest.raises(ValueError, match=r"\(batch, 2, 32, 64\)"):
        model(torch.randn(2, 2, 32, 60))


def test_blocks_are_a_module_list():
    model = make_model(SMALL.model_copy(update={"depth": 5}))

    assert isinstance(model.blocks, torch.nn.ModuleList)
    assert len(model.blocks) == 5


def test_dropout_is_active_in_training_only():
    model = make_model(SMALL.model_copy(update={"dropout": 0.5}), residual=False)
    x = torch.randn(2, 2, 32, 64)

    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpointing_keeps_outputs_and_gradients(dropout):
    spec = SMALL.model_copy(update={"dropout": dropout, "depth": 3})
    plain = make_model(spec, residual=False)
    checkpointed = make_model(spec, residual=False, activation_checkpointing=True)
    partial = make_model(spec, residual=False, activation_checkpointing=True, checkpoint_blocks=[1])
    x = torch.randn(2, 2, 32, 64)

    results = []
    for model in (plain, checkpointed, partial):
        torch.manual_seed(1)  # the same dropout masks in every model
        y = model(x)
        y.square().mean().backward()
        results.append((y.detach(), [p.grad.clone() for p in model.parameters()]))

    reference_output, reference_grads = results[0]
    for output, grads in results[1:]:
        torch.testing.assert_close(output, reference_output)
        for grad, reference in zip(grads, reference_grads, strict=True):
            torch.testing.assert_close(grad, reference)


def test_checkpoint_blocks_outside_depth_are_rejected():
    with pytest.raises(ValueError, match=r"checkpoint_blocks \[2\]"):
        make_model(activation_checkpointing=True, checkpoint_blocks=[0, 2])


def test_checkpoint_blocks_need_the_flag():
    model = make_model(checkpoint_blocks=[0, 1])

    assert model.checkpointed == frozenset()


def test_attention_backends_agree_on_cpu():
    x = torch.randn(2, 2, 32, 64)
    outputs = {}
    for backend in ("auto", "flash", "math"):
        model = make_model(residual=False, attention_backend=backend)
        model.eval()
        with torch.no_grad():
            outputs[backend] = model(x)

    torch.testing.assert_close(outputs["flash"], outputs["math"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs["auto"], outputs["math"], atol=1e-5, rtol=1e-4)


def test_cpu_supports_flash_and_math():
    working = supported_attention_backends("cpu", torch.float32, head_dim=16)

    assert working == ["auto", "flash", "math"]


def test_efficient_backend_on_cpu_names_the_field():
    model = make_model(attention_backend="efficient")

    with pytest.raises(WxscaleError) as caught:
        model(torch.randn(1, 2, 32, 64))

    message = str(caught.value)
    assert "spec.training.attentionBackend" in message
    assert "'efficient'" in message
    assert "auto, flash, math" in message


def test_check_attention_backend():
    check_attention_backend("math", "cpu")
    check_attention_backend("auto", "cpu")
    with pytest.raises(WxscaleError, match="not supported on cpu with float32"):
        check_attention_backend("efficient", "cpu")


def test_unknown_attention_backend_is_rejected():
    with pytest.raises(WxscaleError, match="unknown backend 'cudnn'"):
        make_model(attention_backend="cudnn")


def test_residual_model_learns_ncep_batch(ncep_air):
    # Real data: fit one batch of 6 h NCEP air-temperature forecasts. The residual model
    # starts as persistence, so its loss must fall well below the persistence error.
    with xr.open_dataset(ncep_air) as dataset:
        air = dataset["air"].isel(time=slice(0, 40)).values.astype(np.float32)
    air = (air - air.mean()) / air.std()
    fields = torch.from_numpy(air)
    starts = torch.arange(0, 32, 4)
    x = torch.stack([fields[start : start + 2] for start in starts])  # history 2
    y = torch.stack([fields[start + 2 : start + 3] for start in starts])

    model = make_model(SMALL, grid=(25, 53), in_channels=2, out_channels=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    persistence = torch.mean((x[:, -1:] - y) ** 2).item()

    for _ in range(60):
        loss = torch.mean((model(x) - y) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert loss.item() < 0.5 * persistence
