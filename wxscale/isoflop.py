"""Compute-optimal analysis: IsoFLOP profiles, their agreement with L(N, D), and extrapolation.

Two estimates of the compute-optimal model size N_opt(C) and sample count D_opt(C),
both after Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"
(arXiv:2203.15556, section 3):

- approach 2: at each compute budget C, fit a parabola to loss vs ln N and take its
  minimum; then fit N_opt = G_N C^a and D_opt = G_D C^b to the minima by least
  squares in log space. D_opt = C / flops_per_sample(N_opt), where flops_per_sample is
  interpolated in log-log between the trials of that budget (wxscale's FLOPs model,
  not 6 N D).
- approach 3: fit L(N, D) = E + A / N^alpha + B / D^beta to every point
  (`wxscale.fit.fit_chinchilla`); then N_opt = G (C/k)^a with a = beta / (alpha + beta)
  and b = alpha / (alpha + beta), with k = median C / (N D) over the points.

Points are the trials' final evaluations plus, for a compute ladder, the evaluations
of its cool-down branches (`training.ladder`). Points of a `spec.design` are grouped
by the budget they were planned for. Other points are grouped by their FLOPs: a group
contains the points within BUDGET_TOLERANCE of its smallest.

Intervals:
- approach 3: percentiles over bootstrap refits that resample trials, so the points
  of one ladder trial stay together.
- approach 2: a wild cluster bootstrap (Cameron, Gelbach and Miller 2008). Each refit
  adds to every fitted parabola value its leverage-adjusted residual r_i / sqrt(1 - h_i)
  times a sign drawn once per trial (+1 or -1), refits every parabola and both power
  laws. A profile with exactly 3 sizes has no residual, so it adds no spread.

NOTE: a parabola in ln N is symmetric, the true profile E + A/N^alpha + B/D^beta at
fixed C is not. Its minimum is then biased, and the bias changes with where the sizes
sit around the optimum and how wide they span. `analyse_compute_optimal` estimates it
by running approach 2 on the noise-free approach-3 surface at the same sizes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.optimize import minimize_scalar

from wxscale.designs import BUDGET_KEY, LADDER_BUDGETS_KEY
from wxscale.fit import (
    FLOPS_FIELD,
    LOSS_FIELD,
    MIN_BOOTSTRAP_FITS,
    PARAMS_FIELDS,
    SAMPLES_FIELD,
    Estimate,
    FitError,
    ScalingFit,
    StartGrid,
    fit_chinchilla,
    record_number,
    record_value,
)

logger = logging.getLogger(__name__)

# Points without a design budget share a budget when their FLOPs lie within this
# fraction of the group's smallest.
BUDGET_TOLERANCE = 0.05

# A profile's minimum counts as off-centre when it lies further from the middle of the
# sampled ln N range than this fraction of the half-range.
OFF_CENTRE = 0.5

# Budgets of the extrapolation, as multiples of the largest budget of the study.
EXTRAPOLATION_FACTORS = (10.0, 100.0)

# Points of the extrapolation fan between the smallest budget and the largest factor.
FAN_POINTS = 25


# Points ------------------------------------------------------------------------


@dataclass(frozen=True)
class ComputePoint:
    """One evaluated (N, D, C, loss) point: a trial's final evaluation or one of its ladder branches.

    `variables` maps each output variable to its test MSE in physical units squared.
    `budget` is the compute budget that `spec.design` planned the point for, else None.
    """

    trial: str
    params: float
    samples: float
    flops: float
    loss: float
    variables: dict[str, float] = field(default_factory=dict)
    lead_time_hours: float | None = None
    budget: float | None = None


def _params_field(records: Sequence[dict[str, Any]]) -> str:
    """Return the non-embedding parameter field when every record has it, else the total count."""
    if records and all((record_number(record, PARAMS_FIELDS[0]) or 0) > 0 for record in records):
        return PARAMS_FIELDS[0]
    return PARAMS_FIELDS[1]


def _variable_mse(evaluation: dict[str, Any] | None) -> dict[str, float]:
    values = {}
    for name, entry in ((evaluation or {}).get("variables") or {}).items():
        mse = record_number(entry, "model.mse")
        if mse is not None and mse > 0:
            values[name] = mse
    return values


def _design_budgets(record: dict[str, Any], n_points: int) -> list[float | None]:
    """Return the planned budget of each point of a record (ladder branches, then the final point)."""
    axis_values = record.get("axisValues") or {}
    if isinstance(axis_values.get(BUDGET_KEY), (int, float)):
        return [float(axis_values[BUDGET_KEY])] * n_points
    ladder = axis_values.get(LADDER_BUDGETS_KEY)
    if isinstance(ladder, list) and len(ladder) == n_points:
        return [float(budget) for budget in ladder]
    return [None] * n_points


def compute_points(records: Iterable[dict[str, Any]]) -> tuple[list[ComputePoint], str]:
    """Return the evaluated points of the succeeded trials and the parameter field used for N.

    Each trial gives one point per entry of `training.ladder` and its final point
    (`training.samples`, `training.flopsAnalytic`, `evaluation.testLoss`). Points that
    lack a positive value are left out.
    """
    succeeded = [record for record in records if record.get("state") == "Succeeded"]
    params_field = _params_field(succeeded)
    points = []
    for record in succeeded:
        trial = str(record.get("trial", record.get("index", "?")))
        params = record_number(record, params_field)
        lead_time = record_number(record, "evaluation.leadTimeHours") or record_number(record, "data.leadTimeHours")
        entries = [
            (
                record_number(branch, "samples"),
                record_number(branch, "flopsAnalytic"),
                record_number(branch, "evaluation.testLoss"),
                branch.get("evaluation"),
            )
            for branch in record_value(record, "training.ladder") or []
        ]
        entries.append(
            (
                record_number(record, SAMPLES_FIELD),
                record_number(record, FLOPS_FIELD),
                record_number(record, LOSS_FIELD),
                record.get("evaluation"),
            )
        )
        budgets = _design_budgets(record, len(entries))
        for (samples, flops, loss, evaluation), budget in zip(entries, budgets):
            if all(value is not None and value > 0 for value in (params, samples, flops, loss)):
                points.append(
                    ComputePoint(trial, params, samples, flops, loss, _variable_mse(evaluation), lead_time, budget)
                )
    return points, params_field


def group_by_budget(flops: Sequence[float], tolerance: float = BUDGET_TOLERANCE) -> list[np.ndarray]:
    """Return index arrays of points that share a budget, ascending in FLOPs.

    Points are sorted by FLOPs; a point joins the current group while its FLOPs are
    within `tolerance` of the group's smallest, and starts a new group otherwise.
    """
    flops = np.asarray(flops, dtype=float)
    groups: list[list[int]] = []
    for i in np.argsort(flops, kind="stable"):
        if groups and flops[i] <= flops[groups[-1][0]] * (1.0 + tolerance):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [np.array(group, dtype=int) for group in groups]


def budget_groups(points: Sequence[ComputePoint]) -> list[np.ndarray]:
    """Return index arrays of points that share a budget, ascending.

    Points group by their design budget when every point has one, else by FLOPs (`group_by_budget`).
    """
    if points and all(point.budget is not None for point in points):
        budgets = sorted({point.budget for point in points})
        return [np.array([i for i, point in enumerate(points) if point.budget == budget]) for budget in budgets]
    return group_by_budget([point.flops for point in points])


def group_budget(points: Sequence[ComputePoint], rows: np.ndarray) -> float:
    """Return the budget of a group: its design budget, or the median FLOPs of its points."""
    budget = points[rows[0]].budget
    return budget if budget is not None else float(np.median([points[i].flops for i in rows]))


# Approach 2 --------------------------------------------------------------------


def _interval(samples: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    """Return the percentile interval, or (None, None) from fewer than MIN_BOOTSTRAP_FITS samples."""
    samples = samples[np.isfinite(samples)]
    if len(samples) < MIN_BOOTSTRAP_FITS:
        return None, None
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def _estimate(value: float, samples: np.ndarray, confidence: float) -> Estimate:
    return Estimate(float(value), *_interval(np.asarray(samples, dtype=float), confidence))


def interpolate_log_log(x: float | np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Interpolate y(x) linearly in (ln x, ln y), extrapolating along the end segments.

    `xs` must be ascending and positive. One point gives a constant. Repeated xs are
    averaged first, since a segment between equal xs has no slope.
    """
    xs, inverse = np.unique(np.asarray(xs, dtype=float), return_inverse=True)
    ys = np.bincount(inverse, weights=np.asarray(ys, dtype=float)) / np.bincount(inverse)
    log_xs, log_ys = np.log(xs), np.log(ys)
    log_x = np.log(np.asarray(x, dtype=float))
    if len(xs) == 1:
        return np.exp(np.full_like(log_x, log_ys[0]))
    inside = np.interp(log_x, log_xs, log_ys)
    low_slope = (log_ys[1] - log_ys[0]) / (log_xs[1] - log_xs[0])
    high_slope = (log_ys[-1] - log_ys[-2]) / (log_xs[-1] - log_xs[-2])
    result = np.where(log_x < log_xs[0], log_ys[0] + low_slope * (log_x - log_xs[0]), inside)
    result = np.where(log_x > log_xs[-1], log_ys[-1] + high_slope * (log_x - log_xs[-1]), result)
    return np.exp(result)


@dataclass
class Profile:
    """The points of one budget and the parabola L = c0 + c1 u + c2 u^2 in u = ln N - centre.

    `flops_per_sample` is C_i / D_i of each point, for D_opt = budget / flops_per_sample(N_opt).
    `position` is where ln N_opt lies in the sampled ln N range: -1 at the smallest size,
    +1 at the largest, beyond 1 in magnitude outside the sizes.
    """

    budget: float
    rows: np.ndarray
    params: np.ndarray
    samples: np.ndarray
    loss: np.ndarray
    flops_per_sample: np.ndarray
    trials: list[str]
    centre: float
    coefficients: np.ndarray
    has_minimum: bool
    n_opt: Estimate | None = None
    d_opt: Estimate | None = None
    loss_opt: Estimate | None = None
    position: float | None = None

    @property
    def log_range(self) -> tuple[float, float]:
        log_params = np.log(self.params)
        return float(log_params.min()), float(log_params.max())

    def optimal_samples(self, n_opt: float | np.ndarray) -> np.ndarray:
        order = np.argsort(self.params)
        return self.budget / interpolate_log_log(n_opt, self.params[order], self.flops_per_sample[order])

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "trials": self.trials,
            "params": self.params.tolist(),
            "samples": self.samples.tolist(),
            "loss": self.loss.tolist(),
            "parabola": {
                "formula": "L = c0 + c1 u + c2 u^2, u = ln N - centre",
                "centre": self.centre,
                "coefficients": self.coefficients.tolist(),
            },
            "hasMinimum": self.has_minimum,
            "paramsOpt": self.n_opt.to_dict() if self.n_opt else None,
            "samplesOpt": self.d_opt.to_dict() if self.d_opt else None,
            "lossOpt": self.loss_opt.to_dict() if self.loss_opt else None,
            "position": self.position,
            "insideSizes": self.position is not None and abs(self.position) <= 1.0,
            "offCentre": self.position is not None and abs(self.position) > OFF_CENTRE,
        }


def _design_matrix(u: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones_like(u), u, u * u])


def _vertex(coefficients: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (u_opt, loss_opt, valid) of parabolas given as rows (c0, c1, c2); valid where c2 > 0."""
    coefficients = np.atleast_2d(coefficients)
    c0, c1, c2 = coefficients[:, 0], coefficients[:, 1], coefficients[:, 2]
    valid = c2 > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        u_opt = np.where(valid, -c1 / (2.0 * c2), np.nan)
    loss_opt = c0 + c1 * u_opt + c2 * u_opt**2
    return u_opt, loss_opt, valid


def _fit_power_law_log(log_flops: np.ndarray, log_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares lines ln y = intercept + slope ln C for columns of log_values; return (slopes, intercepts)."""
    design = np.column_stack([np.ones_like(log_flops), log_flops])
    solution, *_ = np.linalg.lstsq(design, log_values, rcond=None)
    return solution[1], solution[0]


@dataclass
class Approach2:
    """N_opt = exp(log_g_n) C^a and D_opt = exp(log_g_d) C^b from the minima of the IsoFLOP profiles."""

    profiles: list[Profile]
    a: Estimate | None
    b: Estimate | None
    log_g_n: float | None
    log_g_d: float | None
    confidence: float
    n_bootstrap: int
    n_bootstrap_used: int
    # Rows (a, ln G_N, b, ln G_D) of the bootstrap refits.
    bootstrap_values: np.ndarray = field(default_factory=lambda: np.empty((0, 4)), repr=False)
    note: str | None = None

    def allocate(self, flops: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (N_opt, D_opt) of the power laws at budget(s) `flops`."""
        log_c = np.log(np.asarray(flops, dtype=float))
        return np.exp(self.log_g_n + self.a.value * log_c), np.exp(self.log_g_d + self.b.value * log_c)

    def allocate_bootstrap(self, flops: float) -> tuple[np.ndarray, np.ndarray]:
        """Return (N_opt, D_opt) at `flops` for every bootstrap refit."""
        rows = self.bootstrap_values
        log_c = math.log(flops)
        return np.exp(rows[:, 1] + rows[:, 0] * log_c), np.exp(rows[:, 3] + rows[:, 2] * log_c)

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "formula": "N_opt = G_N C^a, D_opt = G_D C^b (least squares on the profile minima, log space)",
            "profiles": [profile.to_dict() for profile in self.profiles],
            "nBootstrap": self.n_bootstrap,
            "nBootstrapUsed": self.n_bootstrap_used,
            "confidence": self.confidence,
        }
        if self.a is not None:
            result.update(
                a=self.a.to_dict(),
                b=self.b.to_dict(),
                G_N=math.exp(self.log_g_n),
                G_D=math.exp(self.log_g_d),
            )
        if self.note:
            result["note"] = self.note
        return result


def _make_profile(points: Sequence[ComputePoint], rows: np.ndarray) -> Profile:
    params = np.array([points[i].params for i in rows])
    samples = np.array([points[i].samples for i in rows])
    flops = np.array([points[i].flops for i in rows])
    loss = np.array([points[i].loss for i in rows])
    centre = float(np.log(params).mean())
    coefficients, *_ = np.linalg.lstsq(_design_matrix(np.log(params) - centre), loss, rcond=None)
    return Profile(
        budget=group_budget(points, rows),
        rows=rows,
        params=params,
        samples=samples,
        loss=loss,
        flops_per_sample=flops / samples,
        trials=[points[i].trial for i in rows],
        centre=centre,
        coefficients=coefficients,
        has_minimum=bool(coefficients[2] > 0),
    )


def fit_isoflop_profiles(
    points: Sequence[ComputePoint],
    *,
    n_boot: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
) -> Approach2:
    """Fit a parabola in ln N at every budget with at least 3 distinct sizes, then the power laws.

    Raises FitError when no budget has 3 distinct sizes (no IsoFLOP profile).
    """
    if not 0.0 < confidence < 1.0:
        raise FitError(f"confidence must lie strictly between 0 and 1, got {confidence}; use e.g. 0.95")
    groups = budget_groups(points)
    profiles = [
        _make_profile(points, rows) for rows in groups if len({points[i].params for i in rows}) >= 3
    ]
    if not profiles:
        raise FitError(
            "IsoFLOP profiles need at least 3 model sizes trained at the same compute budget; no budget has them "
            "(use spec.design to place trials on IsoFLOP profiles)"
        )

    # Per profile: the least-squares map from losses to coefficients, and adjusted residuals.
    solvers, fitted, adjusted = [], [], []
    for profile in profiles:
        design = _design_matrix(np.log(profile.params) - profile.centre)
        solver = np.linalg.pinv(design)
        leverage = np.clip(np.einsum("ij,ji->i", design, solver), 0.0, 1.0)
        prediction = design @ profile.coefficients
        residual = profile.loss - prediction
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.where(leverage < 1.0 - 1e-9, residual / np.sqrt(1.0 - leverage), 0.0)
        solvers.append(solver)
        fitted.append(prediction)
        adjusted.append(scaled)

    # Wild cluster bootstrap: one sign per trial for all of its points.
    trial_names = sorted({trial for profile in profiles for trial in profile.trials})
    trial_index = {name: i for i, name in enumerate(trial_names)}
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n_boot, len(trial_names)))
    boot_log_n = np.full((n_boot, len(profiles)), np.nan)
    boot_loss = np.full((n_boot, len(profiles)), np.nan)
    for p, profile in enumerate(profiles):
        columns = [trial_index[trial] for trial in profile.trials]
        losses = fitted[p][None, :] + signs[:, columns] * adjusted[p][None, :]
        coefficients = losses @ solvers[p].T
        u_opt, loss_opt, valid = _vertex(coefficients)
        boot_log_n[:, p] = np.where(valid, u_opt + profile.centre, np.nan)
        boot_loss[:, p] = np.where(valid, loss_opt, np.nan)

    # Bootstrap minima far outside the sizes overflow exp(); _interval leaves the infinities out.
    with np.errstate(over="ignore"):
        for p, profile in enumerate(profiles):
            if profile.has_minimum:
                _set_profile_optimum(profile, boot_log_n[:, p], boot_loss[:, p], confidence)
    return _power_laws(profiles, boot_log_n, n_boot, confidence)


def _set_profile_optimum(profile: Profile, boot_log_n: np.ndarray, boot_loss: np.ndarray, confidence: float) -> None:
    """Set a profile's minimum, its position in the sizes and their intervals from the bootstrap minima."""
    u_opt, loss_opt, _ = _vertex(profile.coefficients)
    log_n_opt = float(u_opt[0] + profile.centre)
    low, high = profile.log_range
    profile.position = (2.0 * log_n_opt - low - high) / (high - low)
    profile.n_opt = _estimate(math.exp(log_n_opt), np.exp(boot_log_n), confidence)
    profile.d_opt = _estimate(
        float(profile.optimal_samples(math.exp(log_n_opt))), profile.optimal_samples(np.exp(boot_log_n)),
        confidence,
    )
    profile.loss_opt = _estimate(float(loss_opt[0]), boot_loss, confidence)


def _power_laws(profiles: list[Profile], boot_log_n: np.ndarray, n_boot: int, confidence: float) -> Approach2:
    """Fit N_opt(C) and D_opt(C) to the profile minima, with intervals from the bootstrap minima."""
    usable = [p for p, profile in enumerate(profiles) if profile.has_minimum]
    if len(usable) < 2:
        missing = len(profiles) - len(usable)
        return Approach2(
            profiles, None, None, None, None, confidence, n_boot, 0,
            note=f"the power laws need minima at 2 or more budgets; {len(usable)} of {len(profiles)} profiles have "
            f"one{f' (the parabolas of {missing} curve down)' if missing else ''}",
        )

    log_c = np.log([profiles[p].budget for p in usable])
    log_n = np.log([profiles[p].n_opt.value for p in usable])
    log_d = np.log([profiles[p].d_opt.value for p in usable])
    slopes, intercepts = _fit_power_law_log(log_c, np.column_stack([log_n, log_d]))

    # Bootstrap refits whose every profile has a minimum.
    complete = np.all(np.isfinite(boot_log_n[:, usable]), axis=1)
    boot_n = boot_log_n[complete][:, usable]
    boot_d = np.column_stack([
        np.log(profiles[p].optimal_samples(np.exp(boot_n[:, j]))) for j, p in enumerate(usable)
    ]) if len(boot_n) else np.empty((0, len(usable)))
    rows = np.empty((len(boot_n), 4))
    if len(boot_n):
        n_slopes, n_intercepts = _fit_power_law_log(log_c, boot_n.T)
        d_slopes, d_intercepts = _fit_power_law_log(log_c, boot_d.T)
        rows = np.column_stack([n_slopes, n_intercepts, d_slopes, d_intercepts])
    if len(rows) < n_boot:
        logger.info("approach 2: %d of %d bootstrap refits had a minimum at every budget", len(rows), n_boot)
    return Approach2(
        profiles=profiles,
        a=_estimate(slopes[0], rows[:, 0], confidence),
        b=_estimate(slopes[1], rows[:, 2], confidence),
        log_g_n=float(intercepts[0]),
        log_g_d=float(intercepts[1]),
        confidence=confidence,
        n_bootstrap=n_boot,
        n_bootstrap_used=len(rows),
        bootstrap_values=rows,
    )


# Approach 3 and allocation -----------------------------------------------------


def fit_approach3(
    points: Sequence[ComputePoint],
    *,
    n_boot: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
    grid: StartGrid | None = None,
) -> ScalingFit:
    """Fit L(N, D) to the points with a bootstrap over trials (`wxscale.fit.fit_chinchilla`)."""
    return fit_chinchilla(
        [point.params for point in points],
        [point.samples for point in points],
        [point.loss for point in points],
        flops=[point.flops for point in points],
        groups=[point.trial for point in points],
        n_boot=n_boot,
        confidence=confidence,
        seed=seed,
        grid=grid,
    )


def chinchilla_allocation(values: np.ndarray, flops: float | np.ndarray, k: float) -> tuple[np.ndarray, ...]:
    """Return (N_opt, D_opt, L_opt) for rows (E, A, B, alpha, beta) of L(N, D) at budget(s) `flops`.

    Minimising E + A/N^alpha + B/D^beta subject to C = k N D gives N_opt = G (C/k)^a and
    D_opt = (C/k)^b / G with a = beta/(alpha+beta), b = alpha/(alpha+beta) and
    G = (alpha A / (beta B))^(1/(alpha+beta)), the closed form that `wxscale.fit.compute_optimal`
    also uses. Returns arrays of shape (rows, budgets).
    """
    values = np.atleast_2d(values)
    big_e, big_a, big_b, alpha, beta = (values[:, i : i + 1] for i in range(5))
    scaled = np.atleast_1d(np.asarray(flops, dtype=float))[None, :] / k
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        total = alpha + beta
        g = (alpha * big_a / (beta * big_b)) ** (1.0 / total)
        n_opt = g * scaled ** (beta / total)
        d_opt = scaled ** (alpha / total) / g
        loss = big_e + big_a / n_opt**alpha + big_b / d_opt**beta
    return n_opt, d_opt, loss


def _law_values(fit: ScalingFit) -> np.ndarray:
    return np.array([[fit.value(name) for name in ("E", "A", "B", "alpha", "beta")]])


def approach3_allocation(fit: ScalingFit, flops: Sequence[float]) -> dict[str, list[Estimate]]:
    """Return N_opt, D_opt and L_opt with bootstrap intervals at each budget of `flops`."""
    k = fit.compute_optimal.k
    point = chinchilla_allocation(_law_values(fit), flops, k)
    spread = chinchilla_allocation(fit.bootstrap_values, flops, k) if len(fit.bootstrap_values) else None
    result: dict[str, list[Estimate]] = {}
    for name, index in (("params", 0), ("samples", 1), ("loss", 2)):
        result[name] = [
            _estimate(point[index][0, j], spread[index][:, j] if spread is not None else np.empty(0), fit.confidence)
            for j in range(len(flops))
        ]
    return result


def approach2_allocation(approach2: Approach2, flops: Sequence[float]) -> dict[str, list[Estimate]]:
    """Return N_opt and D_opt of the approach-2 power laws with bootstrap intervals at each budget."""
    result: dict[str, list[Estimate]] = {"params": [], "samples": []}
    for budget in flops:
        n_opt, d_opt = approach2.allocate(budget)
        boot_n, boot_d = approach2.allocate_bootstrap(budget)
        result["params"].append(_estimate(float(n_opt), boot_n, approach2.confidence))
        result["samples"].append(_estimate(float(d_opt), boot_d, approach2.confidence))
    return result


# Checks ------------------------------------------------------------------------


def _overlap(first: Estimate | None, second: Estimate | None) -> bool | None:
    """Return whether two intervals overlap, or None when either is missing."""
    if first is None or second is None or None in (first.low, first.high, second.low, second.high):
        return None
    return first.low <= second.high and second.low <= first.high


def agreement(approach2: Approach2, fit: ScalingFit | None) -> dict[str, Any]:
    """Compare the exponents a (N_opt) and b (D_opt) of the two approaches; warn when intervals do not overlap."""
    optimal = fit.compute_optimal if fit is not None else None
    result: dict[str, Any] = {}
    disagreements = []
    for name, label in (("a", "N_opt"), ("b", "D_opt")):
        second = getattr(approach2, name)
        third = getattr(optimal, name) if optimal is not None else None
        overlap = _overlap(second, third)
        result[name] = {
            "approach2": second.to_dict() if second else None,
            "approach3": third.to_dict() if third else None,
            "intervalsOverlap": overlap,
        }
        if overlap is False:
            disagreements.append(
                f"{label} exponent {name}: approach 2 gives {_format_estimate(second)}, approach 3 gives "
                f"{_format_estimate(third)}"
            )
    checked = [result[name]["intervalsOverlap"] for name in ("a", "b")]
    result["agree"] = None if None in checked else all(checked)
    result["warning"] = (
        "approaches 2 and 3 disagree beyond their intervals: " + "; ".join(disagreements) + ". The parabola fit may "
        "be biased by where the sizes sit around the optimum, or L(N, D) may not describe these trials; add sizes "
        "around the optimum or budgets before relying on either"
        if disagreements else None
    )
    if result["warning"]:
        logger.warning("%s", result["warning"])
    return result


def _format_estimate(estimate: Estimate | None) -> str:
    if estimate is None:
        return "-"
    if estimate.low is None or estimate.high is None:
        return f"{estimate.value:.3g} (no interval)"
    return f"{estimate.value:.3g} [{estimate.low:.3g}, {estimate.high:.3g}]"


def grid_bias(approach2: Approach2, fit: ScalingFit) -> dict[str, Any]:
    """Estimate approach 2's bias from the parabola by applying it to the noise-free approach-3 surface.

    At each budget the surface's losses at the sampled sizes are fitted with a parabola
    as the data were; its minimum is compared with the exact minimum of the surface
    along the budget, L(N, budget / flops_per_sample(N)), found numerically in ln N.
    Returns the relative error of N_opt per budget and the resulting error of exponent a.
    """
    values = _law_values(fit)[0]
    if not np.all(np.isfinite(values)):
        return {"budgets": [], "note": "the approach-3 fit has non-finite parameters, so there is no surface to probe"}
    big_e, big_a, big_b, alpha, beta = values

    def surface(params: np.ndarray, samples: np.ndarray) -> np.ndarray:
        return big_e + big_a / params**alpha + big_b / samples**beta

    budgets, parabola_log_n, exact_log_n, per_budget = [], [], [], []
    for profile in approach2.profiles:
        log_params = np.log(profile.params)
        u = log_params - profile.centre
        coefficients, *_ = np.linalg.lstsq(_design_matrix(u), surface(profile.params, profile.samples), rcond=None)
        u_opt, _, valid = _vertex(coefficients)
        if not valid[0]:
            continue
        low, high = profile.log_range
        span = max(high - low, 1e-6)

        def along_budget(log_n: float) -> float:
            params = math.exp(log_n)
            return float(surface(np.array(params), profile.optimal_samples(params)))

        exact = minimize_scalar(along_budget, bounds=(low - 2.0 * span, high + 2.0 * span), method="bounded")
        budgets.append(profile.budget)
        parabola_log_n.append(float(u_opt[0] + profile.centre))
        exact_log_n.append(float(exact.x))
        per_budget.append({
            "budget": profile.budget,
            "paramsOptParabola": math.exp(parabola_log_n[-1]),
            "paramsOptExact": math.exp(exact_log_n[-1]),
            "relativeError": math.exp(parabola_log_n[-1] - exact_log_n[-1]) - 1.0,
        })

    result: dict[str, Any] = {"budgets": per_budget}
    if len(budgets) >= 2:
        log_c = np.log(budgets)
        slopes, _ = _fit_power_law_log(log_c, np.column_stack([parabola_log_n, exact_log_n]))
        result.update(exponentParabola=float(slopes[0]), exponentExact=float(slopes[1]),
                      exponentError=float(slopes[0] - slopes[1]))
    return result


def held_out_check(
    points: Sequence[ComputePoint],
    *,
    n_boot: int,
    confidence: float,
    seed: int,
    grid: StartGrid | None,
) -> dict[str, Any]:
    """Fit both approaches without the largest budget, predict it, and report the errors.

    Raises FitError when fewer than 3 budgets exist or the rest cannot be fitted.
    """
    groups = budget_groups(points)
    if len(groups) < 3:
        raise FitError(f"the held-out check leaves out the largest of 3 or more budgets; the points form {len(groups)}")
    held = groups[-1]
    rest = np.concatenate(groups[:-1])
    kept = [points[i] for i in rest]
    budget = group_budget(points, held)

    fit = fit_approach3(kept, n_boot=n_boot, confidence=confidence, seed=seed, grid=grid)
    values = _law_values(fit)
    params = np.array([points[i].params for i in held])
    samples = np.array([points[i].samples for i in held])
    observed = np.array([points[i].loss for i in held])

    def law(rows: np.ndarray) -> np.ndarray:
        big_e, big_a, big_b, alpha, beta = (rows[:, i : i + 1] for i in range(5))
        return big_e + big_a / params[None, :] ** alpha + big_b / samples[None, :] ** beta

    predicted = law(values)[0]
    spread = law(fit.bootstrap_values) if len(fit.bootstrap_values) else np.empty((0, len(held)))
    rows = []
    for j, i in enumerate(held):
        estimate = _estimate(predicted[j], spread[:, j] if len(spread) else np.empty(0), confidence)
        rows.append({
            "trial": points[i].trial,
            "params": float(params[j]),
            "samples": float(samples[j]),
            "observed": float(observed[j]),
            "predicted": estimate.to_dict(),
            "relativeError": float(predicted[j] / observed[j] - 1.0),
            "insideInterval": estimate.contains(float(observed[j])) if estimate.low is not None else None,
        })
    errors = np.abs(predicted / observed - 1.0)
    result: dict[str, Any] = {
        "budget": budget,
        "fittedOn": [group_budget(points, group) for group in groups[:-1]],
        "points": rows,
        "meanAbsoluteRelativeError": float(errors.mean()),
        "maxAbsoluteRelativeError": float(errors.max()),
        "nInsideInterval": sum(1 for row in rows if row["insideInterval"]),
        "approach3ParamsOpt": float(chinchilla_allocation(values, budget, fit.compute_optimal.k)[0][0, 0]),
    }
    try:
        rest_profiles = fit_isoflop_profiles(kept, n_boot=0, confidence=confidence, seed=seed)
        if rest_profiles.a is not None:
            result["approach2ParamsOpt"] = float(rest_profiles.allocate(budget)[0])
    except FitError as error:
        result["approach2Note"] = str(error)
    return result


# Per variable and lead time ----------------------------------------------------


def _best_loss_trend(points: Sequence[ComputePoint]) -> dict[str, Any]:
    """Return the lowest loss at each budget and the budgets where it rose from the previous one."""
    groups = budget_groups(points)
    budgets = [group_budget(points, group) for group in groups]
    best = [float(min(points[i].loss for i in group)) for group in groups]
    worse = [budgets[i + 1] for i in range(len(best) - 1) if best[i + 1] > best[i]]
    return {"budgets": budgets, "bestLoss": best, "worseAtBudgets": worse}


def per_variable_fits(
    points: Sequence[ComputePoint],
    *,
    n_boot: int,
    confidence: float,
    seed: int,
    grid: StartGrid | None,
) -> list[dict[str, Any]]:
    """Run approaches 2 and 3 on each variable's test MSE, separately for each lead time.

    Returns one entry per (lead time, variable) with the exponents, the lowest loss per
    budget and `worseAtBudgets`: budgets whose best loss is higher than the budget's
    below, which a pooled loss can hide.
    """
    lead_times = sorted({point.lead_time_hours for point in points}, key=lambda value: (value is None, value or 0))
    names = sorted({name for point in points for name in point.variables})
    entries = []
    for lead_time in lead_times:
        for name in names:
            subset = [
                replace(point, loss=point.variables[name], variables={})
                for point in points if point.lead_time_hours == lead_time and name in point.variables
            ]
            entry: dict[str, Any] = {"variable": name, "leadTimeHours": lead_time, "nPoints": len(subset)}
            entry.update(_best_loss_trend(subset) if subset else {})
            try:
                second = fit_isoflop_profiles(subset, n_boot=n_boot, confidence=confidence, seed=seed)
                entry["approach2"] = {"a": second.a.to_dict() if second.a else None,
                                      "b": second.b.to_dict() if second.b else None}
            except FitError as error:
                entry["approach2"] = {"note": str(error)}
            try:
                third = fit_approach3(subset, n_boot=n_boot, confidence=confidence, seed=seed, grid=grid)
                entry["approach3"] = {
                    "alpha": third.parameters["alpha"].to_dict(),
                    "beta": third.parameters["beta"].to_dict(),
                    "a": third.compute_optimal.a.to_dict(),
                    "b": third.compute_optimal.b.to_dict(),
                }
            except FitError as error:
                entry["approach3"] = {"note": str(error)}
            entries.append(entry)
    return entries


# The whole analysis ------------------------------------------------------------


def next_budget(budgets: Sequence[float]) -> float:
    """Return the next budget of the design: the largest times the last step ratio, or 10x with one budget."""
    if len(budgets) < 2:
        return 10.0 * budgets[-1]
    return budgets[-1] * budgets[-1] / budgets[-2]


def _fan(approach2: Approach2, fit: ScalingFit | None, budgets: Sequence[float]) -> dict[str, Any]:
    """Return the approach-3 and approach-2 allocations on a log grid of budgets up to the largest factor."""
    flops = np.logspace(math.log10(budgets[0]), math.log10(budgets[-1] * max(EXTRAPOLATION_FACTORS)), FAN_POINTS)
    fan: dict[str, Any] = {"flops": flops.tolist()}
    if fit is not None:
        fan["approach3"] = _columns(approach3_allocation(fit, flops))
    if approach2.a is not None:
        fan["approach2"] = _columns(approach2_allocation(approach2, flops))
    return fan


def _columns(allocation: dict[str, list[Estimate]]) -> dict[str, list[float | None]]:
    columns: dict[str, list[float | None]] = {}
    for name, estimates in allocation.items():
        for key in ("value", "low", "high"):
            columns[name if key == "value" else f"{name}{key.title()}"] = [
                estimate.to_dict()[key] for estimate in estimates
            ]
    return columns


def _design_kind(records: list[dict[str, Any]]) -> str:
    """Name the study design behind the records: compute_ladder, isoflop or grid."""
    if any(record_value(r, "training.ladder") for r in records):
        return "compute_ladder"
    if any(BUDGET_KEY in (r.get("axisValues") or {}) for r in records):
        return "isoflop"
    return "grid"


def analyse_compute_optimal(
    records: Iterable[dict[str, Any]],
    *,
    n_boot: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
    grid: StartGrid | None = None,
) -> dict[str, Any]:
    """Run the compute-optimal analysis on trial records and return it as a JSON-ready dict.

    Keys: `exponents` (a and b of both approaches, alpha and beta of approach 3),
    `agreement`, `recommendation` (N, D and loss at the next budget), `approach2` (the
    profiles and power laws), `approach3` (`ScalingFit.to_dict()` or a note),
    `gridBias`, `extrapolation` (10x and 100x the largest budget), `fan` (the allocation
    on a grid of budgets, for plots), `heldOut` and `perVariable` (each a dict with
    `note` when the points do not support it), and `notes`.

    The held-out and per-variable fits use n_boot // 4 bootstrap refits. Raises
    FitError when no budget has 3 distinct sizes.
    """
    records = list(records)
    points, params_field = compute_points(records)
    approach2 = fit_isoflop_profiles(points, n_boot=n_boot, confidence=confidence, seed=seed)
    budgets = [profile.budget for profile in approach2.profiles]
    notes = []

    fit: ScalingFit | None = None
    try:
        fit = fit_approach3(points, n_boot=n_boot, confidence=confidence, seed=seed, grid=grid)
        approach3: dict[str, Any] = fit.to_dict()
        approach3["inputs"] = [params_field, SAMPLES_FIELD]
    except FitError as error:
        approach3 = {"note": str(error)}
        notes.append(f"approach 3 not fitted: {error}")

    off_centre = [profile.budget for profile in approach2.profiles
                  if profile.position is not None and abs(profile.position) > OFF_CENTRE]
    outside = [profile.budget for profile in approach2.profiles
               if profile.position is not None and abs(profile.position) > 1.0]
    if outside:
        notes.append(
            "the loss minimum lies outside the trained sizes at budgets " + _budget_list(outside)
            + "; the parabola extrapolates there, so add shapes on that side"
        )
    curved_down = [profile.budget for profile in approach2.profiles if not profile.has_minimum]
    if curved_down:
        notes.append(
            "the parabola curves down (no minimum) at budgets " + _budget_list(curved_down) + "; approach 2 "
            "leaves them out. The loss may fall towards one end of the sizes, or the differences are noise"
        )
    if approach2.note:
        notes.append(f"approach 2: {approach2.note}")

    extrapolation_budgets = [budgets[-1] * factor for factor in EXTRAPOLATION_FACTORS]
    recommended = next_budget(budgets)
    summary: dict[str, Any] = {
        "design": _design_kind(records),
        "paramsField": params_field,
        "nPoints": len(points),
        "nTrials": len({point.trial for point in points}),
        "budgets": budgets,
        "exponents": _exponents(approach2, fit),
        "agreement": agreement(approach2, fit),
        "recommendation": _recommendation(approach2, fit, recommended),
        "approach2": approach2.to_dict(),
        "approach3": approach3,
        "offCentreBudgets": off_centre,
        "extrapolation": _extrapolation(approach2, fit, extrapolation_budgets),
        "fan": _fan(approach2, fit, budgets),
    }
    if fit is not None and approach2.a is not None:
        summary["gridBias"] = grid_bias(approach2, fit)

    small_boot = n_boot // 4
    try:
        summary["heldOut"] = held_out_check(points, n_boot=small_boot, confidence=confidence, seed=seed, grid=grid)
    except FitError as error:
        summary["heldOut"] = {"note": str(error)}

    names = {name for point in points for name in point.variables}
    lead_times = {point.lead_time_hours for point in points}
    if len(names) > 1 or len(lead_times) > 1:
        summary["perVariable"] = per_variable_fits(points, n_boot=small_boot, confidence=confidence, seed=seed,
                                                   grid=grid)
        worse = [entry for entry in summary["perVariable"] if entry.get("worseAtBudgets")]
        for entry in worse:
            notes.append(
                f"{entry['variable']} at lead time {entry['leadTimeHours']:g} h gets worse with compute: its lowest "
                f"test MSE rises at budgets {', '.join(f'{b:.3g}' for b in entry['worseAtBudgets'])}"
            )
    else:
        summary["perVariable"] = {
            "note": "one output variable at one lead time: the pooled fit is the per-variable fit"
        }
    summary["notes"] = notes
    return summary


def _budget_list(budgets: Sequence[float]) -> str:
    return ", ".join(f"{budget:.3g}" for budget in budgets)


def _exponents(approach2: Approach2, fit: ScalingFit | None) -> dict[str, Any]:
    exponents: dict[str, Any] = {
        "approach2": {
            "a": approach2.a.to_dict() if approach2.a else None,
            "b": approach2.b.to_dict() if approach2.b else None,
        }
    }
    if fit is not None:
        exponents["approach3"] = {
            "a": fit.compute_optimal.a.to_dict(),
            "b": fit.compute_optimal.b.to_dict(),
            "alpha": fit.parameters["alpha"].to_dict(),
            "beta": fit.parameters["beta"].to_dict(),
        }
    return exponents


def _recommendation(approach2: Approach2, fit: ScalingFit | None, budget: float) -> dict[str, Any]:
    """Return N, D and the predicted loss at `budget`: approach 3 when fitted, else approach 2."""
    result: dict[str, Any] = {"flops": budget}
    if fit is not None:
        allocation = approach3_allocation(fit, [budget])
        result.update(
            method="approach 3",
            params=allocation["params"][0].to_dict(),
            samples=allocation["samples"][0].to_dict(),
            loss=allocation["loss"][0].to_dict(),
        )
    if approach2.a is not None:
        allocation = approach2_allocation(approach2, [budget])
        result["approach2"] = {"params": allocation["params"][0].to_dict(),
                               "samples": allocation["samples"][0].to_dict()}
        if fit is None:
            result.update(method="approach 2", params=result["approach2"]["params"],
                          samples=result["approach2"]["samples"])
    if "method" not in result:
        result["note"] = "no recommendation: neither approach gave an allocation"
    return result


def _extrapolation(approach2: Approach2, fit: ScalingFit | None, budgets: Sequence[float]) -> list[dict[str, Any]]:
    """Return the predicted optimum at each budget, marked as extrapolation beyond the largest trained budget."""
    third = approach3_allocation(fit, budgets) if fit is not None else None
    second = approach2_allocation(approach2, budgets) if approach2.a is not None else None
    entries = []
    for j, budget in enumerate(budgets):
        entry: dict[str, Any] = {"flops": budget, "extrapolation": True,
                                 "factor": budget / max(profile.budget for profile in approach2.profiles)}
        if third is not None:
            entry["approach3"] = {name: third[name][j].to_dict() for name in ("params", "samples", "loss")}
        if second is not None:
            entry["approach2"] = {name: second[name][j].to_dict() for name in ("params", "samples")}
        entries.append(entry)
    return entries
