"""Fully sharded data parallel training with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each transformer block is one FSDP unit and the root module (embeddings, final
norm and head) another, so at most one block's full parameters are gathered at
a time beyond the root's. Under bf16 or fp16 the parameters are gathered in
that precision and the gradients are reduce-scattered in fp32, with autocast
around the forward pass as in the other strategies.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ContextManager

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from wxscale_trainer.distributed.comm import MeteredAllGather, MeteredReduceScatter
from wxscale_trainer.distributed.strategy import Strategy, all_reduce_mean

logger = logging.getLogger(__name__)

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FSDPStrategy(Strategy):
    """FSDP2 over every process, one unit per block plus the root, with metered all-gathers and reduce-scatters."""

    name = "fsdp"

    def __init__(self, model: nn.Module, *args, reshard_after_forward: bool = True, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        # A parameter-free copy of the architecture, filled with the gathered weights by full_model().
        self._template = copy.deepcopy(model).to("meta")

        param_dtype = _HALF.get(self.precision)
        block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        # The root leaves its inputs in fp32, so the residual connection adds the fp32 input fields.
        root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                           cast_forward_inputs=False)
        for block in model.blocks:
            fully_shard(block, mp_policy=block_policy, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mp_policy=root_policy, reshard_after_forward=reshard_after_forward)
        self.module = model

        for unit in model.modules():
            if isinstance(unit, FSDPModule):
                unit.set_custom_all_gather(MeteredAllGather(self.meter))
                unit.set_custom_reduce_scatter(MeteredReduceScatter(self.meter))

        # Each rank sees only its gradient shards, so the fp16 overflow check is all-reduced across ranks.
        self.scaler = ShardedGradScaler(self.device.type, enabled=self.precision == "fp16")
        logger.info("FSDP2: %d blocks sharded over %d processes, parameters gathered in %s, gradients reduced in "
                    "fp32, reshard after forward: %s", len(model.blocks), self.runtime.world_size,
                    str(param_dtype or torch.float32).removeprefix("torch."), reshard_after_forward)

    def sync_context(self, sync: bool) -> ContextManager:
        # Without sync the unsharded gradients accumulate locally and are reduce-scattered with a later micro-batch.
        self.module.set_requires_gradient_sync(sync)
        return super().sync_context(sync)

    def mean_over_ranks(self, value: float) -> float:
        return all_reduce_mean(value, self.device)

    def full_model(self) -> nn.Module:
        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
        replica = copy.deepcopy(self._template).to_empty(device=self.device)
        replica.load_state_dict(state)
        return replica

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "reshardAfterForward": self.reshard_after_forward}
