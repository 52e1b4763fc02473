"""Compute-optimal designs: trials placed on IsoFLOP profiles or on a compute ladder.

An IsoFLOP design (Hoffmann et al. 2022, "Training Compute-Optimal Large Language
Models", approach 2) trains several model sizes at each of a few compute budgets.
Each trial's length is set so that its training FLOPs match the budget:

    samples = steps x batchSize,   steps = round(C / (flops_per_sample x batchSize)),

with flops_per_sample from wxscale's analytic FLOPs model (`wxscale.flops.model_cost`),
not 6 N D. The loss minimum over sizes at each budget then gives N_opt(C).

The sizes trained at a budget are consecutive shapes of `design.sizes`, ordered by
non-embedding parameters N and centred (in log N) on the expected optimum: the size
at which the trial would see `tokensPerParameter` tokens per parameter,
tokens = samples x tokens_per_sample.

A compute ladder trains one trial per size up to its largest budget at a constant
learning rate and branches off a cool-down at each smaller budget (Hägele et al.
2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations").
A branch for a run of T steps starts at step T - int(cooldownFraction x T), so it
costs int(cooldownFraction x T) extra steps.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from wxscale.spec import DataSpec, DesignSpec, TrialConfig

if TYPE_CHECKING:
    from wxscale.planner import GridInfo, _Point
    from wxscale.spec import ScalingStudy

logger = logging.getLogger(__name__)

# Axis-value names of design trials, as they appear in plans, records and reports.
BUDGET_KEY = "budgetFlops"
LADDER_BUDGETS_KEY = "ladderBudgetsFlops"


@dataclass(frozen=True)
class SizeCost:
    """One shape of `design.sizes` with its field settings and analytic cost."""

    index: int
    label: Any
    settings: dict[str, Any]
    origin: str
    config: TrialConfig
    params: int
    non_embedding_params: int
    tokens_per_sample: int
    flops_per_sample: float


def trial_cost(config: TrialConfig, grid: GridInfo) -> Any:
    """Return `wxscale.flops.model_cost` of a trial config on its grid."""
    from wxscale.flops import model_cost

    n_vars = len(grid.variables)
    return model_cost(
        config.model,
        (grid.n_lat, grid.n_lon),
        in_channels=config.data.history * n_vars,
        out_channels=n_vars,
        activation_checkpointing=config.training.activation_checkpointing,
    )


def cooldown_steps(length: int, cooldown_fraction: float) -> int:
    """Return the cool-down steps of a constant_cooldown run of `length` steps (as the trainer's schedule counts)."""
    return int(cooldown_fraction * length)


def ladder_branch_steps(config: TrialConfig) -> int:
    """Return the extra optimizer steps that the cool-down branches of `training.ladderSteps` cost."""
    fraction = config.training.schedule.cooldown_fraction
    return sum(cooldown_steps(length, fraction) for length in config.training.ladder_steps or ())


def ladder_problems(config: TrialConfig, steps: int, where: str) -> list[str]:
    """Return problems of a trial's `training.ladderSteps` against its resolved length `steps`.

    Each ladder length must be shorter than the trial, and its cool-down branch must
    have at least one step and start after the main run's warm-up.
    """
    ladder = config.training.ladder_steps or []
    schedule = config.training.schedule
    warmup = int(schedule.warmup_fraction * steps)
    problems = []
    for length in ladder:
        cooldown = cooldown_steps(length, schedule.cooldown_fraction)
        if length >= steps:
            problems.append(
                f"{where}: training.ladderSteps contains {length}, not shorter than the trial's {steps} steps; "
                "the trial's own end is the last point of the ladder"
            )
        elif cooldown < 1:
            problems.append(
                f"{where}: the ladder point at {length} steps has no cool-down step at schedule.cooldownFraction "
                f"{schedule.cooldown_fraction}; lengthen that point or raise the fraction"
            )
        elif length - cooldown < warmup:
            problems.append(
                f"{where}: the cool-down branch of the ladder point at {length} steps would start at step "
                f"{length - cooldown}, inside the warm-up (the first {warmup} of {steps} steps); lengthen that "
                "point or lower training.schedule.warmupFraction"
            )
    return problems


# Sizes -------------------------------------------------------------------------


def size_points(design: DesignSpec, base: dict[str, Any]) -> list[_Point]:
    """Return one planner point per shape of `design.sizes`, without a training length."""
    from wxscale.planner import _axis_settings, _axis_value_label, _Point

    sizes = design.sizes
    part = "factors" if sizes.factors is not None else "values"
    points = []
    for index, setting in enumerate(_axis_settings(sizes, base)):
        where = f"spec.design.sizes.{part}[{index}]"
        label = _axis_value_label(sizes, index, setting)
        points.append(_Point({sizes.label: label}, dict(setting), {path: where for path in setting}))
    return points


def size_problems(study: ScalingStudy, base: dict[str, Any]) -> list[str]:
    """Return the problems of the shapes in `spec.design.sizes`: unknown fields or invalid configs."""
    from wxscale.planner import _check_path, _resolve

    design = study.spec.design
    problems = []
    paths = design.sizes.fields or ([design.sizes.field] if design.sizes.field else
                                     sorted({path for value in design.sizes.values for path in value}))
    for path in paths:
        problem = _check_path(base, path)
        if problem:
            problems.append(f"spec.design.sizes: {problem}")
    if problems:
        return problems
    for point in size_points(design, base):
        _, point_problems = _resolve(base, point)
        problems.extend(problem for problem in point_problems if problem not in problems)
    return problems


def size_costs(
    study: ScalingStudy, base: dict[str, Any], resolve_grid: Callable[[DataSpec], GridInfo]
) -> tuple[list[SizeCost], list[str]]:
    """Resolve every shape of the design and attach its analytic cost; sorted by non-embedding parameters."""
    from wxscale.planner import _resolve

    problems = size_problems(study, base)
    if problems:
        return [], problems

    grids: dict[str, GridInfo] = {}
    sizes = []
    for index, point in enumerate(size_points(study.spec.design, base)):
        config, _ = _resolve(base, point)
        data_key = json.dumps(config.data.dump(), sort_keys=True)
        if data_key not in grids:
            grids[data_key] = resolve_grid(config.data)
        cost = trial_cost(config, grids[data_key])
        where = next(iter(point.origins.values()), f"spec.design.sizes[{index}]")
        label = next(iter(point.axis_values.values()))
        sizes.append(
            SizeCost(index, label, point.settings, where, config, cost.params, cost.non_embedding_params,
                     cost.tokens_per_sample, float(cost.flops_per_sample))
        )

    sizes.sort(key=lambda size: (size.non_embedding_params, size.flops_per_sample))
    for smaller, larger in zip(sizes, sizes[1:]):
        if smaller.non_embedding_params == larger.non_embedding_params:
            problems.append(
                f"{smaller.origin} and {larger.origin} have the same number of non-embedding parameters "
                f"({smaller.non_embedding_params:,}); every shape of spec.design.sizes needs its own size"
            )
    return sizes, problems


def expected_optimal_log_params(sizes: list[SizeCost], budget: float, tokens_per_parameter: float) -> float:
    """Return log N where a trial at `budget` sees `tokens_per_parameter` tokens per parameter.

    Tokens per parameter fall with N at a fixed budget (fewer samples, more parameters).
    The crossing is interpolated linearly in (log N, log tokens per parameter) between
    the shapes, and extrapolated from the two end shapes outside them.
    """
    log_n = np.log([size.non_embedding_params for size in sizes])
    ratio = np.log([
        budget / size.flops_per_sample * size.tokens_per_sample / size.non_embedding_params for size in sizes
    ])
    target = math.log(tokens_per_parameter)
    if len(sizes) == 1:
        return float(log_n[0])

    # The first segment whose right end falls to the target, or the end segment.
    i = 0
    while i < len(sizes) - 2 and ratio[i + 1] > target:
        i += 1
    slope = (ratio[i + 1] - ratio[i]) / (log_n[i + 1] - log_n[i])
    if slope >= 0:  # shapes whose tokens per parameter do not fall with N (e.g. a larger patch)
        return float(0.5 * (log_n[0] + log_n[-1]))
    return float(log_n[i] + (target - ratio[i]) / slope)


def pick_sizes(sizes: list[SizeCost], budget: float, count: int, tokens_per_parameter: float) -> list[SizeCost]:
    """Return the `count` consecutive shapes whose log-N midpoint is nearest the expected optimum."""
    if count >= len(sizes):
        return list(sizes)
    centre = expected_optimal_log_params(sizes, budget, tokens_per_parameter)
    log_n = [math.log(size.non_embedding_params) for size in sizes]
    starts = range(len(sizes) - count + 1)
    best = min(starts, key=lambda start: abs(0.5 * (log_n[start] + log_n[start + count - 1]) - centre))
    return sizes[best : best + count]


def budget_steps(budget: float, flops_per_sample: float, batch_size: int) -> tuple[int, float]:
    """Return (steps, relative error) of the step count whose FLOPs come nearest to `budget`."""
    steps = max(1, round(budget / (flops_per_sample * batch_size)))
    return steps, steps * batch_size * flops_per_sample / budget - 1.0


# Design points -----------------------------------------------------------------


def design_points(
    study: ScalingStudy, base: dict[str, Any], resolve_grid: Callable[[DataSpec], GridInfo]
) -> tuple[list[_Point], list[str]]:
    """Return the planner points of `spec.design` and the problems found.

    Each point sets the shape's fields and `training.budget.samples`; ladder points also
    set `training.ladderSteps`. A budget that no step count can hit within the design's
    tolerance is a problem. The planner checks the ladder branches against the warm-up.
    """
    design = study.spec.design
    sizes, problems = size_costs(study, base, resolve_grid)
    if problems:
        return [], problems

    # steps[(budget index, size index)] for every shape picked at a budget, in budget order.
    count = design.sizes_per_budget or len(sizes)
    steps: dict[tuple[int, int], int] = {}
    for b, budget in enumerate(design.budgets):
        picked = pick_sizes(sizes, budget, count, design.tokens_per_parameter)
        _warn_off_centre(sizes, picked, budget, design.tokens_per_parameter)
        for size in picked:
            batch = size.config.training.batch_size
            size_steps, error = budget_steps(budget, size.flops_per_sample, batch)
            if abs(error) > design.tolerance:
                problems.append(
                    f"spec.design.budgets[{b}]: {budget:.4g} FLOPs with {size.origin} "
                    f"({size.flops_per_sample:.4g} FLOPs per sample, batch {batch}) rounds to {size_steps} step(s), "
                    f"{100 * error:+.2f} % off the budget (tolerance {100 * design.tolerance:g} %); raise the budget, "
                    "lower training.batchSize or drop the shape"
                )
            steps[(b, size.index)] = size_steps
    if problems:
        return [], problems

    if design.kind == "isoflop":
        return _isoflop_points(design, sizes, steps), []
    return _ladder_points(design, sizes, steps), []


def _warn_off_centre(sizes: list[SizeCost], picked: list[SizeCost], budget: float, tokens_per_parameter: float) -> None:
    centre = math.exp(expected_optimal_log_params(sizes, budget, tokens_per_parameter))
    smallest, largest = picked[0].non_embedding_params, picked[-1].non_embedding_params
    if not smallest <= centre <= largest:
        logger.warning(
            "budget %.3g FLOPs: the expected optimum (%.3g non-embedding parameters at %g tokens per parameter) lies "
            "outside the shapes trained there (%d to %d); add %s shapes to spec.design.sizes",
            budget, centre, tokens_per_parameter, smallest, largest, "larger" if centre > largest else "smaller",
        )


def _isoflop_points(design: DesignSpec, sizes: list[SizeCost], steps: dict[tuple[int, int], int]) -> list[_Point]:
    """Return one point per (budget, picked shape), budgets in order and shapes by size within a budget."""
    from wxscale.planner import _Point

    points = []
    for b, budget in enumerate(design.budgets):
        for size in sizes:
            if (b, size.index) not in steps:
                continue
            samples = steps[(b, size.index)] * size.config.training.batch_size
            settings = {**size.settings, "training.budget": {"samples": samples}}
            origins = {path: size.origin for path in size.settings}
            origins["training.budget"] = f"spec.design.budgets[{b}]"
            points.append(_Point({BUDGET_KEY: budget, design.sizes.label: size.label}, settings, origins))
    return points


def _ladder_points(design: DesignSpec, sizes: list[SizeCost], steps: dict[tuple[int, int], int]) -> list[_Point]:
    """Return one point per shape: trained to its largest budget, with a ladder point at each smaller one."""
    from wxscale.planner import _Point

    points = []
    for size in sizes:
        rungs = [(b, steps[(b, size.index)]) for b in range(len(design.budgets)) if (b, size.index) in steps]
        if not rungs:
            continue
        last_budget, final_steps = rungs[-1]
        settings = {**size.settings, "training.budget": {"samples": final_steps * size.config.training.batch_size}}
        if len(rungs) > 1:
            settings["training.ladderSteps"] = [length for _, length in rungs[:-1]]
        origins = {path: size.origin for path in size.settings}
        origins["training.budget"] = origins["training.ladderSteps"] = f"spec.design.budgets[{last_budget}]"
        budgets = [design.budgets[b] for b, _ in rungs]
        points.append(_Point({design.sizes.label: size.label, LADDER_BUDGETS_KEY: budgets}, settings, origins))
    return points
