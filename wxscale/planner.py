"""Expand a study into trials: the grid product of its axes, or its explicit points.

Everything not on an axis is held at the spec's base value, so each experiment
family varies only what the user asked for. A trial's id is a hash of its
resolved config: the same config always gets the same id, which makes re-runs
resume and lets the operator name jobs idempotently.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

import pandas as pd
from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from wxscale.errors import describe_validation_error
from wxscale.spec import Axis, DataSpec, ScalingStudy, TrialConfig, add_duration

logger = logging.getLogger(__name__)

# Split warnings already logged by this process, so that re-planning a study does not repeat them.
_warned_splits: set[str] = set()

_SECTIONS = ("data", "model", "training", "distributed")


@dataclass(frozen=True)
class GridInfo:
    """Grid of the fields a trial trains on, after coarsening and cropping."""

    n_lat: int
    n_lon: int
    variables: tuple[str, ...]
    step_hours: float
    # First and last time step of the data, when the resolver read them.
    time_start: datetime | None = None
    time_end: datetime | None = None


@dataclass
class Trial:
    """One planned trial with its resolved config and predicted cost."""

    id: str
    index: int
    axis_values: dict[str, Any]
    config: TrialConfig
    steps: int = 0
    samples: int = 0
    params: int = 0
    non_embedding_params: int = 0
    flops_per_sample: float = 0.0
    total_flops: float = 0.0
    grid: tuple[int, int] = (0, 0)
    variables: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "index": self.index,
            "axisValues": self.axis_values,
            "steps": self.steps,
            "samples": self.samples,
            "params": self.params,
            "nonEmbeddingParams": self.non_embedding_params,
            "flopsPerSample": self.flops_per_sample,
            "totalFlops": self.total_flops,
            "grid": list(self.grid),
            "variables": list(self.variables),
            "config": self.config.dump(),
        }


def _camel_path(path: str) -> list[str]:
    return [to_camel(part) if "_" in part else part for part in path.split(".")]


def _get(document: dict[str, Any], path: str) -> Any:
    node: Any = document
    for part in _camel_path(path):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def _set(document: dict[str, Any], path: str, value: Any) -> None:
    parts = _camel_path(path)
    node = document
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _base_document(study: ScalingStudy) -> dict[str, Any]:
    spec = study.spec.dump()
    return {section: spec[section] for section in _SECTIONS}


def _check_path(base: dict[str, Any], path: str) -> str | None:
    """Return a problem description if `path` names no field of a trial config."""
    parts = path.split(".")
    if parts[0] not in _SECTIONS or len(parts) < 2:
        return f"unknown field path {path!r}; paths start with one of {', '.join(_SECTIONS)}, e.g. model.embedDim"
    try:
        _get(base, path)
    except KeyError:
        parent = ".".join(parts[:-1])
        try:
            siblings = _get(base, parent)
        except KeyError:
            return f"unknown field path {path!r}"
        known = ", ".join(sorted(siblings)) if isinstance(siblings, dict) else "none"
        return f"unknown field {path!r}; fields of {parent}: {known}"
    return None


def _axis_settings(axis: Axis, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the field settings of each value of an axis."""
    if axis.field is not None:
        return [{axis.field: value} for value in axis.values]
    if axis.fields is not None:
        settings = []
        for factor in axis.factors:
            point = {}
            for path in axis.fields:
                scaled = _get(base, path) * factor
                point[path] = int(round(scaled)) if isinstance(_get(base, path), int) else scaled
            settings.append(point)
        return settings
    return [dict(value) for value in axis.values]


def _axis_value_label(axis: Axis, index: int, setting: dict[str, Any]) -> Any:
    if axis.field is not None:
        return axis.values[index]
    if axis.factors is not None:
        factor = axis.factors[index]
        return int(factor) if float(factor).is_integer() else factor
    return setting


def _trial_id(config: TrialConfig) -> str:
    canonical = json.dumps(config.dump(), sort_keys=True, separators=(",", ":"))
    return "t-" + hashlib.sha256(canonical.encode()).hexdigest()[:10]


@dataclass
class _Point:
    axis_values: dict[str, Any]
    settings: dict[str, Any]
    origins: dict[str, str]  # field path -> spec location that set it


def _points(
    study: ScalingStudy, base: dict[str, Any], grid_resolver: Callable[[DataSpec], GridInfo] | None = None
) -> tuple[list[_Point], list[str]]:
    """Return the raw grid points with the location each setting came from, and path problems.

    A `spec.design` places its points by their FLOPs, which needs the data grid (`grid_resolver`).
    """
    if study.spec.design is not None:
        from wxscale.designs import design_points

        return design_points(study, base, grid_resolver or default_grid_resolver)

    problems: list[str] = []
    if study.spec.points is not None:
        points = []
        for i, point in enumerate(study.spec.points):
            for path in point:
                problem = _check_path(base, path)
                if problem:
                    problems.append(f"spec.points[{i}]: {problem}")
            points.append(_Point(dict(point), dict(point), {p: f"spec.points[{i}]" for p in point}))
        return points, problems

    per_axis = []
    for a, axis in enumerate(study.spec.axes):
        paths = axis.fields or ([axis.field] if axis.field else sorted({p for v in axis.values for p in v}))
        for path in paths:
            problem = _check_path(base, path)
            if problem:
                problems.append(f"spec.axes[{a}]: {problem}")
        if problems:
            continue
        options = []
        for v, setting in enumerate(_axis_settings(axis, base)):
            where = f"spec.axes[{a}].{'factors' if axis.factors is not None else 'values'}[{v}]"
            options.append((axis.label, _axis_value_label(axis, v, setting), setting, where))
        per_axis.append(options)
    if problems:
        return [], problems

    points = []
    for combination in itertools.product(*per_axis):
        axis_values, settings, origins = {}, {}, {}
        for label, value, setting, where in combination:
            axis_values[label] = value
            settings.update(setting)
            origins.update({path: where for path in setting})
        points.append(_Point(axis_values, settings, origins))
    return points, problems


def _resolve(base: dict[str, Any], point: _Point) -> tuple[TrialConfig | None, list[str]]:
    document = copy.deepcopy(base)
    for path, value in point.settings.items():
        _set(document, path, value)
    try:
        return TrialConfig.model_validate(document), []
    except ValidationError as error:
        problems = []
        for line, item in zip(describe_validation_error(error), error.errors(include_url=False)):
            loc = ".".join(str(p) for p in item["loc"])
            origin = next(
                (where for path, where in point.origins.items() if loc.startswith(".".join(_camel_path(path))) or
                 ".".join(_camel_path(path)).startswith(loc)),
                None,
            )
            problems.append(f"{origin}: {line}" if origin else f"spec.{line}")
        return None, problems


def expand(
    study: ScalingStudy, grid_resolver: Callable[[DataSpec], GridInfo] | None = None
) -> tuple[list[tuple[dict[str, Any], TrialConfig]], list[str]]:
    """Return (axis values, resolved config) for every trial, and the problems found.

    Duplicate configs (two axis values that resolve to the same trial) are kept once.
    A study with `spec.design` reads its data grid through `grid_resolver` (default: the data source).
    """
    base = _base_document(study)
    points, problems = _points(study, base, grid_resolver)
    trials: list[tuple[dict[str, Any], TrialConfig]] = []
    seen: set[str] = set()
    for point in points:
        config, point_problems = _resolve(base, point)
        for problem in point_problems:
            if problem not in problems:
                problems.append(problem)
        if config is None:
            continue
        trial_id = _trial_id(config)
        if trial_id not in seen:
            seen.add(trial_id)
            trials.append((point.axis_values, config))
    return trials, problems


def axis_problems(study: ScalingStudy) -> list[str]:
    """Return the problems that the axes and points of a study produce.

    For a `spec.design` only the shapes of `design.sizes` are checked here, which needs no
    data; `plan` checks the budgets against the FLOPs of each shape.
    """
    if study.spec.design is not None:
        from wxscale.designs import size_problems

        return size_problems(study, _base_document(study))
    return expand(study)[1]


def training_steps(config: TrialConfig, flops_per_sample: float) -> int:
    """Resolve the trial's budget (steps, samples or FLOPs) into optimizer steps."""
    budget = config.training.budget
    batch = config.training.batch_size
    if budget.steps is not None:
        return budget.steps
    if budget.samples is not None:
        return max(1, math.ceil(budget.samples / batch))
    return max(1, math.ceil(budget.flops / (flops_per_sample * batch)))


# Steps of 27.5 days and more are monthly means; the data layer matches their lead times to whole months.
_MONTHLY_STEP_HOURS = 27.5 * 24


def _check_lead_time(data: DataSpec, grid: GridInfo) -> None:
    """Raise StudyError when the lead time is not a whole number of the data's time steps."""
    from wxscale.errors import StudyError
    from wxscale.spec import duration_hours

    step = grid.step_hours
    if not step or step >= _MONTHLY_STEP_HOURS:
        return
    lead = duration_hours(data.lead_time)
    steps = lead / step
    if abs(steps - round(steps)) > 1e-6 or round(steps) < 1:
        multiples = ", ".join(f"'{step * k:g}h'" for k in (1, 2, 4))
        raise StudyError("spec.data", [
            f"spec.data.leadTime: {data.lead_time!r} ({lead:g} h) is not a multiple of the data step {step:g} h; "
            f"use e.g. {multiples}"
        ])


def _check_coverage(data: DataSpec, grid: GridInfo) -> None:
    """Raise StudyError for a split outside the data's time span; warn for one that reaches outside it.

    A split that reaches outside the span is cut to the part the data covers,
    which changes the number of samples, and for train the data a dataset
    fraction draws from. A split with no time step inside the span has no samples.
    """
    from wxscale.errors import StudyError

    if grid.time_start is None or grid.time_end is None:
        return
    first, last = pd.Timestamp(grid.time_start), pd.Timestamp(grid.time_end)
    span = f"{first:%Y-%m-%d %H:%M}..{last:%Y-%m-%d %H:%M}"
    problems = []
    for split in ("train", "validation", "test"):
        period = getattr(data, split)
        start, end = pd.Timestamp(period.start), pd.Timestamp(period.end)
        if split == "train" and data.temporal_coverage is not None:
            # Training data ends where the temporal coverage ends, if that comes first.
            end = min(end, add_duration(start, data.temporal_coverage) - pd.Timedelta(1, "ns"))
        dates = f"{start:%Y-%m-%d %H:%M}..{end:%Y-%m-%d %H:%M}"
        if end < first or start > last:
            problems.append(f"spec.data.{split}: {dates} lies outside the data, which covers {span}, so the split "
                            f"has no samples; set spec.data.{split} inside the data's span")
            continue
        if start >= first and end <= last:
            continue
        key = f"{split} {dates} {span}"
        if key in _warned_splits:
            continue
        _warned_splits.add(key)
        logger.warning("spec.data.%s: %s reaches outside the data, which covers %s; the split uses only the "
                       "covered part. Set spec.data.%s inside the data's span to silence this warning",
                       split, dates, span, split)
    if problems:
        raise StudyError("spec.data", problems)


def default_grid_resolver(data: DataSpec) -> GridInfo:
    from wxscale.data import grid_info

    return grid_info(data)


def plan(study: ScalingStudy, grid_resolver: Callable[[DataSpec], GridInfo] | None = None) -> list[Trial]:
    """Expand the study and attach each trial's parameters, steps and analytic FLOPs.

    A trial's `total_flops` includes the cool-down branches of `training.ladderSteps`.
    Raises StudyError if the axes produce invalid trials (see `expand`), if a trial's
    ladder does not fit its length, or if the trials exceed `spec.computeBudget`.
    """
    from wxscale.designs import ladder_branch_steps, ladder_problems
    from wxscale.errors import StudyError
    from wxscale.flops import model_cost

    resolver = grid_resolver or default_grid_resolver
    configs, problems = expand(study, resolver)
    if problems:
        raise StudyError(f"ScalingStudy {study.metadata.name}", problems)
    grids: dict[str, GridInfo] = {}

    trials = []
    for index, (axis_values, config) in enumerate(configs):
        data_key = json.dumps(config.data.dump(), sort_keys=True)
        if data_key not in grids:
            grids[data_key] = resolver(config.data)
            _check_lead_time(config.data, grids[data_key])
            _check_coverage(config.data, grids[data_key])
        grid = grids[data_key]

        n_vars = len(grid.variables)
        cost = model_cost(
            config.model,
            (grid.n_lat, grid.n_lon),
            in_channels=config.data.history * n_vars,
            out_channels=n_vars,
            activation_checkpointing=config.training.activation_checkpointing,
        )
        steps = training_steps(config, cost.flops_per_sample)
        samples = steps * config.training.batch_size
        problems.extend(ladder_problems(config, steps, f"trial {index} ({_describe(axis_values)})"))
        branch_samples = ladder_branch_steps(config) * config.training.batch_size
        trials.append(
            Trial(
                id=_trial_id(config),
                index=index,
                axis_values=axis_values,
                config=config,
                steps=steps,
                samples=samples,
                params=cost.params,
                non_embedding_params=cost.non_embedding_params,
                flops_per_sample=cost.flops_per_sample,
                total_flops=cost.flops_per_sample * (samples + branch_samples),
                grid=(grid.n_lat, grid.n_lon),
                variables=tuple(grid.variables),
            )
        )
    if problems:
        raise StudyError(f"ScalingStudy {study.metadata.name}", problems)
    check_compute_budget(study, trials)
    return trials


def _describe(axis_values: dict[str, Any]) -> str:
    """Render axis values for a message: floats as 1e+12, mappings as field=value."""

    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{field}={item}" for field, item in value.items()) + "}"
        return str(value)

    return ", ".join(f"{name}={show(value)}" for name, value in axis_values.items()) or "base config"


def check_compute_budget(study: ScalingStudy, trials: list[Trial]) -> None:
    """Raise StudyError when the planned trials exceed `spec.computeBudget`, saying by how much.

    GPU-hours are estimated as total planned FLOPs / flopsPerGpuSecond / 3600.
    """
    from wxscale.errors import StudyError

    cap = study.spec.compute_budget
    if cap is None:
        return
    total = sum(trial.total_flops for trial in trials)
    problems = []
    if cap.max_flops is not None and total > cap.max_flops:
        excess = total - cap.max_flops
        problems.append(
            f"spec.computeBudget.maxFlops: the {len(trials)} trials plan {total:.4g} training FLOPs, "
            f"{excess:.4g} FLOPs ({100 * excess / cap.max_flops:.1f} %) over the cap of {cap.max_flops:.4g}; "
            f"{_largest_costs(trials)}. Lower the budgets, drop trials or raise the cap"
        )
    if cap.max_gpu_hours is not None:
        hours = total / cap.flops_per_gpu_second / 3600.0
        if hours > cap.max_gpu_hours:
            excess = hours - cap.max_gpu_hours
            problems.append(
                f"spec.computeBudget.maxGpuHours: the {len(trials)} trials plan an estimated {hours:.4g} GPU-hours "
                f"({total:.4g} FLOPs at {cap.flops_per_gpu_second:.4g} FLOP/s per GPU), {excess:.4g} GPU-hours "
                f"({100 * excess / cap.max_gpu_hours:.1f} %) over the cap of {cap.max_gpu_hours:g}; "
                f"{_largest_costs(trials)}. Lower the budgets, drop trials or raise the cap"
            )
    if problems:
        raise StudyError(f"ScalingStudy {study.metadata.name}", problems)


def _largest_costs(trials: list[Trial], count: int = 3) -> str:
    largest = sorted(trials, key=lambda trial: trial.total_flops, reverse=True)[:count]
    listed = ", ".join(f"#{trial.index} {trial.total_flops:.3g} ({_describe(trial.axis_values)})" for trial in largest)
    return f"the largest trials are {listed}"
