"""Data parallel training with DistributedDataParallel: a model replica per process, gradients all-reduced."""

from __future__ import annotations

import contextlib
import logging
from typing import ContextManager

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from wxscale_trainer.distributed.comm import metered_allreduce_hook
from wxscale_trainer.distributed.strategy import Strategy, all_reduce_mean

logger = logging.getLogger(__name__)


class DDPStrategy(Strategy):
    """DDP with a communication hook that meters each gradient bucket's all-reduce."""

    name = "ddp"

    def __init__(self, model: nn.Module, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.module = DistributedDataParallel(model, device_ids=device_ids)
        # One hook per DDP model: PyTorch rejects a second register_comm_hook call.
        self.module.register_comm_hook(state=None, hook=metered_allreduce_hook(self.meter))

    def sync_context(self, sync: bool) -> ContextManager:
        # no_sync keeps the gradients local, so only the last micro-batch of a step all-reduces them.
        return contextlib.nullcontext() if sync else self.module.no_sync()

    def mean_over_ranks(self, value: float) -> float:
        return all_reduce_mean(value, self.device)

    def full_model(self) -> nn.Module:
        return self.module.module
