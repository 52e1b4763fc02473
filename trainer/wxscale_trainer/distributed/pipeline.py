"""Pipeline parallelism with `torch.distributed.pipelining`: the blocks split into one stage per process.

Stage s holds a contiguous run of blocks; the first stage also holds the patch
and position embeddings, the last one the final norm and the head. Every stage
passes on (tokens, x): the last stage needs the model input x for the residual
connection. Each micro-batch of the training loop is cut into
`distributed.microbatches` pipeline micro-batches and run by a GPipe or 1F1B
schedule. Every rank loads the same batches (there is no data parallelism), the
first stage feeds x in and the last stage computes the loss.

Loss scaling: the schedule runs with `scale_grads=False`, and the loss of each
pipeline micro-batch is divided by their number here, so the accumulated
gradients are those of the mean loss over the batch, as in the other strategies.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.utils.checkpoint import checkpoint

from wxscale.errors import WxscaleError
from wxscale_trainer.distributed.comm import CommunicationMeter, tensor_bytes
from wxscale_trainer.distributed.strategy import Strategy

logger = logging.getLogger(__name__)

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_blocks(depth: int, stages: int) -> list[range]:
    """Split `depth` blocks into `stages` contiguous runs whose lengths differ by at most one (earlier ones longer)."""
    if not 1 <= stages <= depth:
        raise WxscaleError(
            f"a pipeline of {stages} stages needs 1 to model.depth ({depth}) stages, one block or more each; "
            "use fewer processes or more blocks"
        )
    runs = np.array_split(np.arange(depth), stages)
    return [range(int(run[0]), int(run[-1]) + 1) for run in runs]


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Return the idle fraction of a GPipe or 1F1B step with equal stage costs: (p - 1) / (m + p - 1).

    p stages and m micro-batches (Huang et al. 2019, GPipe; 1F1B has the same bubble
    and holds fewer activations).
    """
    return (stages - 1) / (microbatches + stages - 1)


class StageModule(nn.Module):
    """The part of a WeatherViT that one pipeline stage runs, with the whole model's parameter names.

    Parameter names match the whole model's (`blocks.3.attn.qkv.weight`), so
    checkpoints of a pipeline load into any strategy.
    """

    def __init__(self, model: nn.Module, blocks: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.patch_embed = model.patch_embed
            self.pos_embed = model.pos_embed
        self.blocks = nn.ModuleDict({str(index): model.blocks[index] for index in blocks})
        if last:
            self.norm = model.norm
            self.head = model.head
        # Kept in a list so that it is not registered: its embed() and decode() use the modules above.
        self._model = [model]
        self._checkpointed = set(model.checkpointed)

    def forward(self, *inputs: torch.Tensor) -> Any:
        model = self._model[0]
        if self.first:
            (x,) = inputs
            tokens = model.embed(x)
        else:
            tokens, x = inputs

        for index, block in self.blocks.items():
            if int(index) in self._checkpointed and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)

        # gloo sends only contiguous tensors.
        if self.last:
            return model.decode(tokens, x).contiguous()
        return tokens.contiguous(), x.contiguous()


class MeteredPipelineStage(PipelineStage):
    """A PipelineStage that counts the bytes it sends and receives and times its own computation.

    NOTE: the schedule waits on the transfers inside torch.distributed.pipelining,
    so their time is not measured per call. The time a step spends outside the
    stage's computation (`idle_seconds`) contains both the waits and the bubble.
    """

    def __init__(self, *args, meter: CommunicationMeter, **kwargs):
        super().__init__(*args, **kwargs)
        self.meter = meter
        self.compute_seconds = 0.0

    def _count(self, kind: str, operations: list[dist.P2POp]) -> list[dist.P2POp]:
        for operation in operations:
            self.meter.record(kind, tensor_bytes(operation.tensor), None)
        return operations

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        return self._count("send", super().get_fwd_send_ops(fwd_chunk_id))

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        return self._count("send", super().get_bwd_send_ops(bwd_chunk_id))

    def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        return self._count("recv", super().get_fwd_recv_ops(fwd_chunk_id))

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        return self._count("recv", super().get_bwd_recv_ops(bwd_chunk_id))

    def forward_one_chunk(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return super().forward_one_chunk(*args, **kwargs)
        finally:
            self.compute_seconds += time.perf_counter() - started

    def backward_one_chunk(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return super().backward_one_chunk(*args, **kwargs)
        finally:
            self.compute_seconds += time.perf_counter() - started


class PipelineStrategy(Strategy):
    """One pipeline stage per process, run by a GPipe or 1F1B schedule."""

    name = "pipeline"

    def __init__(self, model: nn.Module, *args, microbatches: int, schedule: str, **kwargs):
        super().__init__(model, *args, **kwargs)
        rank, stages = self.runtime.rank, self.runtime.world_size
        if schedule == "1f1b" and microbatches < stages:
            # Upstream raises too, but without naming the spec field.
            raise WxscaleError(
                f"distributed.microbatches ({microbatches}) must be at least the number of pipeline stages "
                f"({stages}) under the 1f1b schedule; raise microbatches or use pipelineSchedule: gpipe"
            )
        self.stages, self.microbatches, self.schedule_name = stages, microbatches, schedule
        self.blocks = stage_blocks(len(model.blocks), stages)[rank]
        self.first, self.last = rank == 0, rank == stages - 1

        # A parameter-free copy of the architecture, filled with the gathered weights by full_model().
        self._template = copy.deepcopy(model).to("meta")
        self.module = StageModule(model, self.blocks, self.first, self.last)
        _drop_other_stages(model, self.blocks, self.first, self.last)

        self.stage = MeteredPipelineStage(self.module, rank, stages, self.device, meter=self.meter)
        self.schedule = SCHEDULES[schedule](self.stage, n_microbatches=microbatches, loss_fn=self._pipeline_loss,
                                            scale_grads=False)
        # Each rank holds different parameters, so the fp16 overflow check is all-reduced across stages.
        self.scaler = ShardedGradScaler(self.device.type, enabled=self.precision == "fp16")
        # Only the last stage scales a loss; this call creates the scale on the other stages too, which
        # unscale_() and update() need. The overflow all-reduce keeps every stage's scale the same.
        self.scaler.scale(torch.zeros((), device=self.device))
        self._loss_scale = 1.0
        self._losses: list[torch.Tensor] = []
        self.step_seconds = 0.0
        logger.info("pipeline stage %d of %d: blocks %d-%d%s%s, %s schedule with %d micro-batches", rank, stages,
                    self.blocks.start, self.blocks.stop - 1, ", embeddings" if self.first else "",
                    ", head" if self.last else "", schedule, microbatches)

    def _pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # The target packs y and the mask along the channel axis (see forward_backward).
        y, mask = target.chunk(2, dim=1)
        loss = self.loss_function(output.float(), y, mask)
        self._losses.append(loss.detach())
        return self.scaler.scale(loss * self._loss_scale)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, *, sync: bool = True,
                         loss_scale: float = 1.0) -> float:
        # NOTE: pipeline micro-batches split the pooled loss in equal parts; with masked (NaN) cells the
        # parts weigh their valid cells unequally, as the per-rank losses of data parallelism do.
        self._loss_scale = loss_scale / self.microbatches
        self._losses = []
        target = torch.cat([y, mask.to(y.dtype)], dim=1) if self.last else None
        started = time.perf_counter()
        with self.autocast():
            if self.first:
                self.schedule.step(x, target=target)
            else:
                self.schedule.step(target=target)
        self.step_seconds += time.perf_counter() - started

        # The last stage knows the loss; every rank returns it. The schedule's shape inference on its first
        # step calls the loss function once more, so only the last `microbatches` losses are this step's.
        if self.last:
            loss = torch.stack(self._losses[-self.microbatches:]).mean()
        else:
            loss = torch.zeros((), device=self.device)
        loss = loss.to(device=self.device, dtype=torch.float32)
        dist.broadcast(loss, src=self.stages - 1)
        return loss.item()

    def clip_grad_norm(self, max_norm: float) -> None:
        # The global norm sums the squared gradient norms of every stage: the same rule as
        # torch.nn.utils.clip_grad_norm_, max_norm / (norm + 1e-6) capped at 1.
        gradients = [parameter.grad for parameter in self.module.parameters() if parameter.grad is not None]
        squared = torch.zeros((), device=self.device, dtype=torch.float32)
        for gradient in gradients:
            squared += gradient.detach().float().pow(2).sum()
        dist.all_reduce(squared)
        coefficient = (max_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
        for gradient in gradients:
            gradient.mul_(coefficient.to(gradient.dtype))

    @property
    def idle_seconds(self) -> float:
        """Time inside schedule steps outside this stage's computation: transfers and the pipeline bubble."""
        return max(0.0, self.step_seconds - self.stage.compute_seconds)

    def evaluation_model(self) -> nn.Module:
        return self.full_model()

    def full_model(self) -> nn.Module:
        # NOTE: this holds the whole model on every rank while evaluating, which a model that needs a
        # pipeline to fit in memory cannot afford.
        own = {name: tensor.detach().cpu() for name, tensor in self.module.state_dict().items()}
        gathered: list[Any] = [None] * self.stages
        dist.all_gather_object(gathered, own)
        state: dict[str, torch.Tensor] = {}
        for part in gathered:
            state.update(part)
        replica = copy.deepcopy(self._template).to_empty(device=self.device)
        replica.load_state_dict(state)
        return replica

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "pipelineStages": self.stages, "microbatches": self.microbatches,
                "pipelineSchedule": self.schedule_name, "stageBlocks": [self.blocks.start, self.blocks.stop - 1],
                "bubbleFraction": bubble_fraction(self.stages, self.microbatches)}


def _drop_other_stages(model: nn.Module, blocks: range, first: bool, last: bool) -> None:
    """Move the parts of the whole model that other stages run to the meta device, freeing their memory."""
    for index, block in enumerate(model.blocks):
        if index not in blocks:
            block.to("meta")
    if not first:
        model.patch_embed.to("meta")
        model.pos_embed = nn.Parameter(model.pos_embed.detach().to("meta"))
    if not last:
        model.norm.to("meta")
        model.head.to("meta")
