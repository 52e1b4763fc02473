"""The AdamW optimizer of a trial, built from `spec.training.optimizer`."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from wxscale.spec import OptimizerSpec

logger = logging.getLogger(__name__)

# Devices on which PyTorch 2.13 has a fused AdamW kernel.
_FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(parameters: Iterable[torch.nn.Parameter], spec: OptimizerSpec) -> torch.optim.AdamW:
    """Build AdamW over `parameters` with the spec's learning rate, betas and weight decay.

    The fused implementation updates every parameter in one kernel. On CPU, PyTorch
    otherwise picks the per-parameter loop, which costs one small operator call per
    parameter and state tensor. Fused needs floating-point parameters on one device
    type that has the kernel; other parameter sets get PyTorch's default.
    """
    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    device_types = {parameter.device.type for parameter in parameters}
    fused = (len(device_types) == 1 and device_types <= set(_FUSED_DEVICES)
             and all(parameter.is_floating_point() for parameter in parameters))
    if not fused:
        logger.debug("AdamW without the fused kernel: parameters on %s", sorted(device_types))
    return torch.optim.AdamW(parameters, lr=spec.lr, betas=(spec.beta1, spec.beta2),
                             weight_decay=spec.weight_decay, fused=fused or None)
