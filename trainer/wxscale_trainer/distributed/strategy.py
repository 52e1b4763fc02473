"""The contract between the training loop and a parallelism strategy, and the single-process strategy.

A strategy owns the model of one process (whole, wrapped or one pipeline stage)
and the gradient scaler, and provides what the loop needs:
  - `forward_backward(x, y, mask, sync=..., loss_scale=...)` runs one micro-batch
    and returns its loss, the same value on every rank;
  - `optimizer_step(optimizer, grad_clip)` unscales, clips, steps and zeroes;
  - `evaluation_model()` and `full_model()` give modules that evaluate whole
    batches on every rank;
  - `checkpoint_state(optimizer)` and `load_checkpoint_state(...)` give the
    state that torch.distributed.checkpoint saves and loads.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from wxscale_trainer.distributed.comm import CommunicationMeter
from wxscale_trainer.runtime import Runtime

logger = logging.getLogger(__name__)

# Optimizer state keyed by parameter name ("state.blocks.0.attn.qkv.weight.exp_avg"). torch.distributed.checkpoint
# keeps one copy of a non-tensor value that several ranks save under the same key, so the nested form, whose
# "param_groups" differ between pipeline stages, would give every stage the first stage's groups.
_STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

# (prediction, target, mask) -> scalar loss tensor
LossFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Autocast = Callable[[], ContextManager]


class Strategy:
    """The whole model in one process: no communication. Subclasses add the parallel strategies."""

    name = "single"

    def __init__(self, model: nn.Module, runtime: Runtime, meter: CommunicationMeter, autocast: Autocast,
                 loss_function: LossFunction, precision: str):
        self.module: nn.Module = model
        self.runtime = runtime
        self.device = runtime.device
        self.meter = meter
        self.autocast = autocast
        self.loss_function = loss_function
        self.precision = precision
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

    # Training ----------------------------------------------------------------------

    def sync_context(self, sync: bool) -> ContextManager:
        """Return the context of a micro-batch's backward pass; `sync=False` defers gradient communication."""
        return contextlib.nullcontext()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, *, sync: bool = True,
                         loss_scale: float = 1.0) -> float:
        """Run the forward and backward pass of one micro-batch and return its loss.

        The gradients accumulate `loss * loss_scale` (times the fp16 gradient scale).
        `sync=False` defers the gradient communication to a later micro-batch.
        """
        with self.sync_context(sync):
            with self.autocast():
                prediction = self.module(x)
            loss = self.loss_function(prediction.float(), y, mask)
            self.scaler.scale(loss * loss_scale).backward()
        return loss.item()

    def clip_grad_norm(self, max_norm: float) -> None:
        """Scale the gradients so that their global L2 norm is at most `max_norm`."""
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        """Unscale (fp16), clip, step the optimizer, update the gradient scale and zero the gradients."""
        if grad_clip is not None:
            self.scaler.unscale_(optimizer)
            self.clip_grad_norm(grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def mean_over_ranks(self, value: float) -> float:
        """Return the mean of a per-rank value (a training-loss sum) over the data-parallel ranks; a collective
        under data parallelism.
        """
        return value

    # Evaluation --------------------------------------------------------------------

    def evaluation_model(self) -> nn.Module:
        """Return a module that every rank can call on whole batches, for validation during training."""
        return self.module

    def full_model(self) -> nn.Module:
        """Return a plain model with the trained weights on every rank, for test evaluation and inference."""
        return self.module

    # Size and state ------------------------------------------------------------------

    def local_parameter_count(self) -> int:
        """Return the parameters this process stores: all of them, a shard (fsdp) or one stage (pipeline)."""
        return sum(_local(parameter).numel() for parameter in self.module.parameters())

    def layout(self) -> dict[str, Any]:
        """Return what the result record states about the process layout, beyond the trial config."""
        return {"strategy": self.name, "localParams": self.local_parameter_count()}

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Return the model and optimizer state of this rank, keyed by the parameters' names in the whole model."""
        model_state, optimizer_state = get_state_dict(self.module, optimizer, options=_STATE_DICT_OPTIONS)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_checkpoint_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load what `checkpoint_state` returned, after torch.distributed.checkpoint filled it in."""
        set_state_dict(self.module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=_STATE_DICT_OPTIONS)

    def close(self) -> None:
        """Release what the strategy holds beyond the model, before the process group is destroyed."""


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Return the mean of a float over all ranks of the default process group."""
    tensor = torch.tensor(value, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """Return the local part of a parameter: the shard of a DTensor, else the parameter."""
    to_local = getattr(parameter, "to_local", None)
    return to_local() if to_local is not None else parameter
