"""Parameter and FLOP counts of the WeatherViT, analytic and measured.

Conventions:
  - A matmul of (m x k) by (k x n) costs 2*m*n*k FLOPs (one multiply and one add per
    term). Only matmuls are counted: the Linear layers, the patch-embedding conv and the
    two attention products. LayerNorm, GELU, softmax, bias adds and residual adds are
    left out, as torch.utils.flop_counter.FlopCounterMode leaves them out.
  - Backward costs 2x the forward of each matmul (the input gradient and the weight
    gradient each cost one forward), except for the patch embedding: its input is data,
    so autograd computes only its weight gradient (1x).
  - Counts are per sample. A sample is one (in_channels, lat, lon) input; its tokens are
    the patches of the padded grid.

``model_cost`` gives three totals. ``forward_flops_per_sample`` is one forward pass.
``flops_per_sample`` adds one backward pass and is the training cost used for compute
budgets. It equals 3x forward minus the forward FLOPs of the patch embedding.
``hardware_flops_per_sample`` adds the work that is done again: blocks recomputed by
activation checkpointing, and the QK^T product that fused attention kernels recompute
in their backward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from wxscale.model import AttentionBackend, mlp_hidden_dim, token_grid
from wxscale.spec import ModelSpec

logger = logging.getLogger(__name__)

# Modules whose parameters count as embeddings: the patch embedding and the position
# embedding map fields to tokens, the head maps tokens back to fields. They play the part
# of a language model's token embedding, position embedding and unembedding.
EMBEDDING_MODULES = ("patch_embed", "pos_embed", "head")


@dataclass(frozen=True)
class ModelCost:
    """Size and per-sample training cost of one WeatherViT configuration."""

    params: int
    non_embedding_params: int
    tokens_per_sample: int
    forward_flops_per_sample: int
    flops_per_sample: int
    hardware_flops_per_sample: int


@dataclass(frozen=True)
class ForwardFlops:
    """Forward matmul FLOPs of one sample, by layer kind (each summed over all blocks)."""

    patch_embed: int
    qkv: int
    attention: int
    proj: int
    mlp_fc1: int
    mlp_fc2: int
    head: int

    @property
    def total(self) -> int:
        return self.patch_embed + self.qkv + self.attention + self.proj + self.mlp_fc1 + self.mlp_fc2 + self.head


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (total, non_embedding) parameter counts of a WeatherViT.

    Non-embedding parameters exclude the modules in EMBEDDING_MODULES. A module that is
    absent, as in a pipeline stage, counts as zero. A DDP wrapper is unwrapped through its
    ``module`` attribute.
    """
    model = getattr(model, "module", model)
    total = sum(parameter.numel() for parameter in model.parameters())

    embedding = 0
    for name in EMBEDDING_MODULES:
        part = getattr(model, name, None)
        if part is None:
            continue  # a pipeline stage without this module
        if isinstance(part, nn.Parameter):
            embedding += part.numel()
        else:
            embedding += sum(parameter.numel() for parameter in part.parameters())
    return total, total - embedding


def param_count(model_spec: ModelSpec, grid: tuple[int, int], in_channels: int, out_channels: int) -> int:
    """Return the parameter count of WeatherViT(model_spec, grid, in_channels, out_channels)."""
    total, _ = _param_counts(model_spec, grid, in_channels, out_channels)
    return total


def _param_counts(
    model_spec: ModelSpec, grid: tuple[int, int], in_channels: int, out_channels: int
) -> tuple[int, int]:
    dim = model_spec.embed_dim
    hidden = mlp_hidden_dim(model_spec)
    patch_area = model_spec.patch_size**2
    rows, cols = token_grid(grid, model_spec.patch_size)

    # Weights plus biases of each layer; a LayerNorm has a weight and a bias of width dim.
    patch_embed = in_channels * patch_area * dim + dim
    pos_embed = rows * cols * dim
    block = (
        2 * dim  # norm1
        + dim * 3 * dim + 3 * dim  # fused qkv
        + dim * dim + dim  # output projection
        + 2 * dim  # norm2
        + dim * hidden + hidden  # fc1
        + hidden * dim + dim  # fc2
    )
    final_norm = 2 * dim
    head = dim * patch_area * out_channels + patch_area * out_channels

    non_embedding = model_spec.depth * block + final_norm
    return non_embedding + patch_embed + pos_embed + head, non_embedding


def forward_flops(model_spec: ModelSpec, grid: tuple[int, int], in_channels: int, out_channels: int) -> ForwardFlops:
    """Return the forward matmul FLOPs of one sample, by layer kind."""
    dim = model_spec.embed_dim
    hidden = mlp_hidden_dim(model_spec)
    depth = model_spec.depth
    patch_area = model_spec.patch_size**2
    rows, cols = token_grid(grid, model_spec.patch_size)
    tokens = rows * cols

    return ForwardFlops(
        # Conv with kernel = stride = p is a matmul of (L x C_in*p^2) by (C_in*p^2 x D).
        patch_embed=2 * tokens * in_channels * patch_area * dim,
        # (L x D) by (D x 3D) per block.
        qkv=depth * 2 * tokens * dim * 3 * dim,
        # QK^T is (L x d_head) by (d_head x L) per head and AV is (L x L) by (L x d_head):
        # 2*L^2*d_head each, so 2 * 2 * L^2 * D over all heads.
        attention=depth * 2 * 2 * tokens * tokens * dim,
        # (L x D) by (D x D) per block.
        proj=depth * 2 * tokens * dim * dim,
        # (L x D) by (D x H) and (L x H) by (H x D) per block, H = mlp_ratio * D.
        mlp_fc1=depth * 2 * tokens * dim * hidden,
        mlp_fc2=depth * 2 * tokens * hidden * dim,
        # (L x D) by (D x p^2 * C_out).
        head=2 * tokens * dim * patch_area * out_channels,
    )


def model_cost(
    model_spec: ModelSpec,
    grid: tuple[int, int],
    in_channels: int,
    out_channels: int,
    activation_checkpointing: bool = False,
    *,
    checkpoint_blocks: Sequence[int] | None = None,
    attention_backend: AttentionBackend = "auto",
) -> ModelCost:
    """Return the size and per-sample training FLOPs of a WeatherViT configuration.

    ``activation_checkpointing`` and ``checkpoint_blocks`` take the meaning they have in
    WeatherViT and change only ``hardware_flops_per_sample``. So does
    ``attention_backend``: every backend except "math" is counted as a fused kernel.
    """
    params, non_embedding = _param_counts(model_spec, grid, in_channels, out_channels)
    rows, cols = token_grid(grid, model_spec.patch_size)
    tokens = rows * cols
    depth = model_spec.depth

    forward = forward_flops(model_spec, grid, in_channels, out_channels)

    # Backward: 2x forward for every matmul except the patch embedding, which computes
    # only its weight gradient (1x). For attention the 2x is the four products
    # dP = dO V^T, dV = P^T dO, dQ = dS K and dK = dS^T Q.
    backward = 2 * forward.total - forward.patch_embed
    training = forward.total + backward

    # Activation checkpointing runs each checkpointed block's forward again in backward.
    # PyTorch's non-reentrant checkpoint stops the recomputation once every tensor saved
    # for backward is back. The output of fc2 is not saved, so fc2 is skipped unless a
    # dropout after it has to redraw its mask (dropout > 0).
    # NOTE: this follows the early-stop default of torch.utils.checkpoint (checked with
    # PyTorch 2.13); with set_checkpoint_early_stop(False) fc2 is recomputed too.
    if activation_checkpointing:
        recomputed = depth if checkpoint_blocks is None else len(set(checkpoint_blocks))
    else:
        recomputed = 0
    per_block = (forward.qkv + forward.attention + forward.proj + forward.mlp_fc1) // depth
    if model_spec.dropout > 0:
        per_block += forward.mlp_fc2 // depth
    recompute = recomputed * per_block

    # Fused attention kernels (flash, memory-efficient) keep no L x L matrix, so their
    # backward recomputes QK^T: one more 2 * L^2 * D per block.
    # NOTE: "auto" is counted as fused. PyTorch picks a fused kernel for it whenever one
    # supports the device, dtype and head size, and falls back to math otherwise.
    if attention_backend != "math":
        recompute += depth * 2 * tokens * tokens * model_spec.embed_dim

    return ModelCost(
        params=params,
        non_embedding_params=non_embedding,
        tokens_per_sample=tokens,
        forward_flops_per_sample=forward.total,
        flops_per_sample=training,
        hardware_flops_per_sample=training + recompute,
    )


def _cpu_flash_forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode (PyTorch 2.13) has formulas for the CUDA attention kernels but not for
# the CPU flash kernel, which it would count as zero. These map the CPU kernel to the
# built-in attention counts.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
}


def measure_flops(model: nn.Module, sample_input: torch.Tensor, backward: bool = True) -> float:
    """Count the matmul FLOPs that one forward (and backward) pass of the model executes.

    The count covers the whole batch of ``sample_input``; divide by its batch size for a
    per-sample number. The backward pass computes the gradients of ``output.sum()`` with
    respect to the parameters and returns them without storing them, so ``.grad`` stays
    untouched. What runs is what gets counted: the model's attention backend and its
    activation checkpointing apply, so the result is comparable to
    ``hardware_flops_per_sample``.
    """
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]

    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        output = model(sample_input)
        if backward:
            torch.autograd.grad(output.sum(), parameters)

    total = counter.get_total_flops()
    logger.debug("measured %.4g FLOPs for a batch of %d (backward=%s)", total, sample_input.shape[0], backward)
    return float(total)
