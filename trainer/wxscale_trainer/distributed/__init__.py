"""Parallel training of one trial: data parallel (DDP), fully sharded (FSDP2) or pipelined.

`build_strategy` picks the strategy of a trial config. A trial of one process
runs the model whole whatever the strategy, so it is the baseline that the
scaling efficiency of the study's multi-process trials is measured against.
"""

from __future__ import annotations

import logging

from torch import nn

from wxscale.spec import TrialConfig
from wxscale_trainer.distributed.comm import CommunicationMeter
from wxscale_trainer.distributed.ddp import DDPStrategy
from wxscale_trainer.distributed.fsdp import FSDPStrategy
from wxscale_trainer.distributed.pipeline import PipelineStrategy, bubble_fraction
from wxscale_trainer.distributed.strategy import Autocast, LossFunction, Strategy
from wxscale_trainer.runtime import Runtime

logger = logging.getLogger(__name__)

__all__ = ["CommunicationMeter", "Strategy", "bubble_fraction", "build_strategy"]


def build_strategy(model: nn.Module, config: TrialConfig, runtime: Runtime, meter: CommunicationMeter,
                   autocast: Autocast, loss_function: LossFunction) -> Strategy:
    """Wrap or split a model, already on the runtime's device, for the trial's parallelism strategy.

    Every rank must build the model from the same seed before the call, so that
    the replicas, shards or stages start from the same weights.
    """
    layout = config.distributed
    common = dict(runtime=runtime, meter=meter, autocast=autocast, loss_function=loss_function,
                  precision=config.training.precision)
    if not runtime.distributed:
        if layout.strategy != "ddp":
            logger.info("one process: strategy %s runs the whole model without communication", layout.strategy)
        return Strategy(model, **common)
    if layout.strategy == "fsdp":
        return FSDPStrategy(model, reshard_after_forward=layout.reshard_after_forward, **common)
    if layout.strategy == "pipeline":
        return PipelineStrategy(model, microbatches=layout.microbatches, schedule=layout.pipeline_schedule, **common)
    return DDPStrategy(model, **common)
