"""Learning-rate schedules as multipliers of the peak learning rate."""

from __future__ import annotations

import math

from wxscale.spec import ScheduleSpec


def lr_multiplier(step: int, total_steps: int, schedule: ScheduleSpec) -> float:
    """Return the learning-rate multiplier for a 0-based optimizer step.

    Both kinds start with a linear warm-up over `warmup_fraction` of the steps.
    cosine: then decays as min + (1 - min) * (1 + cos(pi * progress)) / 2.
    constant_cooldown: then holds 1.0 and decays linearly to `min_lr_ratio`
    over the last `cooldown_fraction` of the steps (the schedule that lets one
    run be cut at several lengths, Hägele et al. 2024).
    """
    warmup = int(schedule.warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup

    floor = schedule.min_lr_ratio
    if schedule.kind == "cosine":
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    cooldown = int(schedule.cooldown_fraction * total_steps)
    cooldown_start = total_steps - cooldown
    if step < cooldown_start or cooldown == 0:
        return 1.0
    progress = (step - cooldown_start + 1) / cooldown
    return 1.0 - (1.0 - floor) * progress
