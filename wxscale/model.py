"""A Vision Transformer that maps input fields on a (lat, lon) grid to the fields one lead time later.

Shapes: input (batch, in_channels, lat, lon) -> output (batch, out_channels, lat, lon).

Input channels are the history steps times the variables, ordered oldest step first and
variable-minor: channel ``step * variables + variable``. The last input step is therefore
``x[:, -out_channels:]``, the channels that the residual connection adds to the output.

The network, top to bottom:
  1. zero-pad the end of the lat and lon axes to a multiple of the patch size;
  2. patch embedding, a Conv2d with kernel = stride = patch size, one token per patch;
  3. add a learned position embedding;
  4. ``depth`` pre-norm transformer blocks (LayerNorm -> self-attention -> residual,
     LayerNorm -> GELU MLP -> residual), kept in ``model.blocks`` so that a pipeline
     split can cut between blocks;
  5. a final LayerNorm and a linear head to patch_size^2 * out_channels values per token;
  6. un-patchify, crop the padding away and add the last input step (residual prediction).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from wxscale.errors import WxscaleError
from wxscale.spec import ModelSpec

logger = logging.getLogger(__name__)

AttentionBackend = Literal["auto", "flash", "efficient", "math"]

# "auto" leaves the choice to PyTorch, which tries the fused kernels before math.
_SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}

# Standard deviation of the truncated-normal initialisation of Linear weights and the
# position embedding.
_INIT_STD = 0.02


def mlp_hidden_dim(spec: ModelSpec) -> int:
    """Return the MLP hidden width, round(mlp_ratio * embed_dim), at least 1."""
    return max(1, round(spec.mlp_ratio * spec.embed_dim))


def token_grid(grid: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Return the token grid (ceil(lat / patch), ceil(lon / patch)) after padding."""
    lat, lon = grid
    return math.ceil(lat / patch_size), math.ceil(lon / patch_size)


def supported_attention_backends(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Return the attention backends that run forward and backward on this device, dtype and head size.

    Each fixed backend is probed with a tiny attention call. "auto" is listed when any
    fixed backend works, because PyTorch then picks one of them.
    """
    working = []
    # The probe needs autograd even when the caller runs under no_grad or inference_mode.
    with torch.inference_mode(False), torch.enable_grad():
        query = torch.randn(1, 1, 4, head_dim, device=device, dtype=dtype, requires_grad=True)
        for name, backend in _SDPA_BACKENDS.items():
            try:
                # PyTorch warns once per rejected kernel before it raises; the error is enough here.
                with warnings.catch_warnings(), sdpa_kernel(backend):
                    warnings.simplefilter("ignore")
                    F.scaled_dot_product_attention(query, query, query).sum().backward()
            except RuntimeError:
                continue
            working.append(name)
    return (["auto"] if working else []) + working


def check_attention_backend(
    backend: str, device: torch.device | str, dtype: torch.dtype = torch.float32, head_dim: int = 64
) -> None:
    """Raise WxscaleError unless the attention backend runs on this device, dtype and head size.

    The trainer can call this before training starts. The model calls it too when an
    attention call fails, to turn PyTorch's error into one that names the spec field.
    """
    _require_known_backend(backend)
    working = supported_attention_backends(device, dtype, head_dim)
    if backend in working:
        return
    where = f"{torch.device(device).type} with {str(dtype).removeprefix('torch.')} and head dimension {head_dim}"
    raise WxscaleError(
        f"spec.training.attentionBackend: {backend!r} is not supported on {where}; "
        f"supported here: {', '.join(working) or 'none'}. Set attentionBackend to one of those "
        "('auto' lets PyTorch choose)"
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and PyTorch's scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, dropout: float, backend: AttentionBackend) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        # (B, L, 3D) -> three tensors of shape (B, heads, L, head_dim).
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)

        out = self._attend(query, key, value)

        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self.backend == "auto":
            return F.scaled_dot_product_attention(query, key, value)
        try:
            with sdpa_kernel(_SDPA_BACKENDS[self.backend]):
                return F.scaled_dot_product_attention(query, key, value)
        except RuntimeError:
            # Only an unsupported backend becomes a WxscaleError; any other failure propagates.
            check_attention_backend(self.backend, query.device, query.dtype, self.head_dim)
            raise


class MLP(nn.Module):
    """Two Linear layers with GELU between them, and dropout after each."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, spec: ModelSpec, backend: AttentionBackend) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.embed_dim)
        self.attn = SelfAttention(spec.embed_dim, spec.heads, spec.dropout, backend)
        self.norm2 = nn.LayerNorm(spec.embed_dim)
        self.mlp = MLP(spec.embed_dim, mlp_hidden_dim(spec), spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class WeatherViT(nn.Module):
    """A Vision Transformer from fields (B, in_channels, lat, lon) to forecasts (B, out_channels, lat, lon).

    Grids that do not divide by the patch size are zero-padded at the end of the lat and
    lon axes to the next multiple, and the output is cropped back to ``grid``. Padded
    cells contain zeros (the mean of normalised data) and cost tokens like any other cell.

    Residual prediction (``residual=True``, the default): the network predicts the change
    over one lead time, and the forward pass adds the last input step of each variable.
    At initialisation the output head is zero, so an untrained model is the persistence
    forecast, and training learns the tendency. In a 300-step trial on NCEP air temperature
    (6 h lead, history 2, depth 4, width 128), the residual model beat persistence and the
    direct model did not. Residual prediction requires that inputs and targets are
    normalised with the same per-variable statistics, and that in_channels is a multiple
    of out_channels. With ``residual=False`` the network predicts the fields directly.

    Activation checkpointing recomputes the forward pass of a block during the backward
    pass instead of keeping its activations. ``checkpoint_blocks`` selects the blocks by
    index and defaults to all of them.

    Inputs must be finite: fill masked or missing cells (e.g. with 0 after normalisation)
    before the call, because one NaN spreads to every token through attention.
    """

    def __init__(
        self,
        spec: ModelSpec,
        grid: tuple[int, int],
        in_channels: int,
        out_channels: int,
        *,
        residual: bool = True,
        activation_checkpointing: bool = False,
        checkpoint_blocks: Sequence[int] | None = None,
        attention_backend: AttentionBackend = "auto",
    ) -> None:
        super().__init__()
        _check_arguments(spec, grid, in_channels, out_channels, residual, attention_backend)

        self.spec = spec
        self.grid = (int(grid[0]), int(grid[1]))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.residual = residual
        self.attention_backend = attention_backend
        self.patch_size = spec.patch_size
        self.token_grid = token_grid(self.grid, spec.patch_size)
        self.num_tokens = self.token_grid[0] * self.token_grid[1]
        self.checkpointed = _checkpointed_blocks(spec.depth, activation_checkpointing, checkpoint_blocks)

        dim = spec.embed_dim
        patch = spec.patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        self.blocks = nn.ModuleList(Block(spec, attention_backend) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch * patch * out_channels)

        self._init_weights()

        padded = (self.token_grid[0] * patch, self.token_grid[1] * patch)
        logger.info(
            "WeatherViT: %d parameters, %d tokens (%dx%d patches of %dx%d cells), grid %dx%d padded to %dx%d, "
            "%d blocks of width %d, %d -> %d channels, residual=%s, attention=%s, checkpointed blocks=%s",
            sum(p.numel() for p in self.parameters()),
            self.num_tokens,
            *self.token_grid,
            patch,
            patch,
            *self.grid,
            *padded,
            spec.depth,
            dim,
            in_channels,
            out_channels,
            residual,
            attention_backend,
            sorted(self.checkpointed) or "none",
        )

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=_INIT_STD)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=_INIT_STD)
                nn.init.zeros_(module.bias)

        # A zero head makes the untrained residual model the persistence forecast.
        if self.residual:
            nn.init.zeros_(self.head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)

        tokens = self.embed(x)

        for index, block in enumerate(self.blocks):
            if index in self.checkpointed and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)

        return self.decode(tokens, x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pad, patchify and embed (B, in_channels, lat, lon) into tokens (B, num_tokens, embed_dim)."""
        patch = self.patch_size
        pad_lat = self.token_grid[0] * patch - self.grid[0]
        pad_lon = self.token_grid[1] * patch - self.grid[1]
        if pad_lat or pad_lon:
            # F.pad takes (lon start, lon end, lat start, lat end) for the last two dimensions.
            x = F.pad(x, (0, pad_lon, 0, pad_lat))

        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return tokens + self.pos_embed

    def decode(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Map tokens (B, num_tokens, embed_dim) to fields (B, out_channels, lat, lon).

        ``x`` is the model input. Its last step is added when the model predicts the
        residual.
        """
        # NOTE: the residual makes decode() need the model input as well as the tokens. A
        # pipeline split must therefore pass x on to its last stage.
        batch = tokens.shape[0]
        patch = self.patch_size
        rows, cols = self.token_grid

        values = self.head(self.norm(tokens))

        # Un-patchify: (B, rows*cols, C*p*p) -> (B, C, rows*p, cols*p), then crop the padding.
        values = values.view(batch, rows, cols, self.out_channels, patch, patch)
        fields = values.permute(0, 3, 1, 4, 2, 5).reshape(batch, self.out_channels, rows * patch, cols * patch)
        fields = fields[:, :, : self.grid[0], : self.grid[1]]

        if self.residual:
            fields = fields + x[:, -self.out_channels :]
        return fields

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, *self.grid)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"WeatherViT expects input of shape (batch, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(x.shape)}"
            )


def _check_arguments(
    spec: ModelSpec, grid: tuple[int, int], in_channels: int, out_channels: int, residual: bool, backend: str
) -> None:
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid must be (lat, lon) with both sizes >= 1, got {grid}")
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}")
    if residual and in_channels % out_channels != 0:
        raise ValueError(
            f"residual prediction needs in_channels (history x variables) to be a multiple of out_channels "
            f"(variables), got {in_channels} and {out_channels}"
        )
    _require_known_backend(backend)


def _require_known_backend(backend: str) -> None:
    if backend not in ("auto", *_SDPA_BACKENDS):
        raise WxscaleError(
            f"spec.training.attentionBackend: unknown backend {backend!r}; use auto, flash, efficient or math"
        )


def _checkpointed_blocks(depth: int, enabled: bool, blocks: Sequence[int] | None) -> frozenset[int]:
    if not enabled:
        return frozenset()
    if blocks is None:
        return frozenset(range(depth))
    outside = [index for index in blocks if not 0 <= index < depth]
    if outside:
        raise ValueError(f"checkpoint_blocks {outside} are outside the {depth} blocks (valid: 0..{depth - 1})")
    return frozenset(blocks)
