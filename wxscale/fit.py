"""Scaling-law fits: loss as a power law of parameters, samples or FLOPs, and the Chinchilla form.

Two laws are fitted to the test loss of the trials:

    power law:   L(x)    = E + A / x^alpha                      (x = N, D or C)
    Chinchilla:  L(N, D) = E + A / N^alpha + B / D^beta

Both follow approach 3 of Hoffmann et al. 2022, "Training Compute-Optimal Large
Language Models" (arXiv:2203.15556, section 3.3 and appendix D.2): with
E = exp(e), A = exp(a), B = exp(b), minimise over (e, a, b, alpha, beta)

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),  delta = 1e-3,

where LSE is log-sum-exp, so the residual is log L_pred - log L_obs. L-BFGS-B runs
from every point of a grid of starting values and the lowest objective among the
converged runs wins. Confidence intervals come from a bootstrap over trials.

Here N is the non-embedding parameter count (`model.nonEmbeddingParams`, else
`model.params`), D the training samples seen (`training.samples`) and C the
analytic training FLOPs (`training.flopsAnalytic`).

NOTE: D counts samples seen, repeats included, not the distinct samples of the
dataset (`data.trainSamples`). When trials run several epochs over a small dataset,
the fitted data term B / D^beta overstates what more repeated data would give.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from itertools import product
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.optimize import minimize

from wxscale.errors import WxscaleError

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # NOTE: without threadpoolctl the fits run, but slower on a busy machine.
    threadpool_limits = None

logger = logging.getLogger(__name__)

HUBER_DELTA = 1e-3

# Percentile intervals from fewer refits than this are not reported (low and high are None):
# a 95 % interval from a handful of refits is mostly noise.
MIN_BOOTSTRAP_FITS = 20

# Record fields that the fits read, as dotted paths into a TrialResult record.
LOSS_FIELD = "evaluation.testLoss"
PARAMS_FIELDS = ("model.nonEmbeddingParams", "model.params")
SAMPLES_FIELD = "training.samples"
FLOPS_FIELD = "training.flopsAnalytic"

# Keys of the fits in the dict returned by fit_study (and stored in the study status).
FIT_NAMES = ("lossVsParams", "lossVsSamples", "lossVsFlops", "lossVsParamsAndSamples")

# Bounds on the exponents: negative exponents would make loss grow with scale, and
# beyond 10 the term is a step function that the data cannot pin down.
_EXPONENT_BOUNDS = (0.0, 10.0)


class FitError(WxscaleError):
    """A scaling law that cannot be fitted to the given trials (too few or invalid points)."""


# Results -------------------------------------------------------------------------


def _json_number(value: float | None) -> float | None:
    """Return a float for JSON, with NaN and infinities as None (JSON has no NaN)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class Estimate:
    """A fitted value with its bootstrap percentile interval (None with fewer than MIN_BOOTSTRAP_FITS refits)."""

    value: float
    low: float | None = None
    high: float | None = None

    def contains(self, candidate: float) -> bool:
        """Return whether candidate lies inside the interval (False when there is no interval)."""
        return self.low is not None and self.high is not None and self.low <= candidate <= self.high

    def to_dict(self) -> dict[str, float | None]:
        return {"value": _json_number(self.value), "low": _json_number(self.low), "high": _json_number(self.high)}


@dataclass(frozen=True)
class ComputeOptimal:
    """Compute-optimal allocation N_opt = G (C/k)^a, D_opt = G^-1 (C/k)^b from a Chinchilla fit.

    `k` is the FLOPs per parameter per sample, C = k N D, estimated as the median of
    C / (N D) over the trials. `k_min` and `k_max` give its spread over the trials
    (not a confidence interval). `k` is None when the trials carry no FLOPs.
    """

    a: Estimate
    b: Estimate
    G: Estimate
    k: float | None
    k_min: float | None = None
    k_max: float | None = None

    def allocate(self, flops: float | np.ndarray) -> tuple[Any, Any]:
        """Return (N_opt, D_opt) for a training budget in FLOPs; N_opt * D_opt * k equals the budget."""
        if self.k is None:
            raise FitError(
                "the compute-optimal allocation needs FLOPs per trial (training.flopsAnalytic); none were given"
            )
        scaled = np.asarray(flops, dtype=float) / self.k
        return self.G.value * scaled**self.a.value, scaled**self.b.value / self.G.value

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "G": self.G.to_dict(),
            "k": {"value": _json_number(self.k), "min": _json_number(self.k_min), "max": _json_number(self.k_max)},
            "formula": "N_opt = G (C/k)^a, D_opt = (C/k)^b / G",
        }


@dataclass
class ScalingFit:
    """A fitted scaling law: either the power law E + A/x^alpha or the Chinchilla form.

    `inputs` names the record fields the law takes (one for a power law, N then D for
    the Chinchilla form). `converged` is scipy's success flag of the winning start and
    `gradient_norm` the norm of its projected gradient (components pushing into an
    active bound are dropped) on the objective divided by n * delta.
    """

    formula: str
    inputs: tuple[str, ...]
    parameters: dict[str, Estimate]
    converged: bool
    message: str
    gradient_norm: float
    objective: float
    n_points: int
    n_starts: int
    n_starts_converged: int
    n_bootstrap: int
    n_bootstrap_converged: int
    confidence: float
    compute_optimal: ComputeOptimal | None = None
    # Parameter vectors (E, A, [B,] alpha, [beta]) of the converged bootstrap refits, one row each.
    bootstrap_values: np.ndarray = field(default_factory=lambda: np.empty((0, 0)), repr=False)

    def value(self, name: str) -> float:
        return self.parameters[name].value

    def predict(self, *inputs: float | np.ndarray) -> np.ndarray:
        """Return the predicted loss at x (power law) or at (N, D) (Chinchilla form)."""
        if len(inputs) != len(self.inputs):
            names = ", ".join(self.inputs)
            raise ValueError(f"this law takes {len(self.inputs)} input(s) ({names}), got {len(inputs)}")
        values = self.parameters
        loss = np.full(np.shape(np.asarray(inputs[0], dtype=float)), values["E"].value)
        loss = loss + values["A"].value / np.asarray(inputs[0], dtype=float) ** values["alpha"].value
        if len(inputs) == 2:
            loss = loss + values["B"].value / np.asarray(inputs[1], dtype=float) ** values["beta"].value
        return loss

    def parameters_at_bound(self) -> list[str]:
        """Name the parameters whose value or interval limit sits at the edge of the search.

        Exponents are searched in _EXPONENT_BOUNDS, and an offset E below 1e-9 means the
        data do not identify an irreducible loss. Such numbers mark the search's limits,
        not estimates.
        """
        flagged = []
        for name, estimate in self.parameters.items():
            numbers = [v for v in (estimate.value, estimate.low, estimate.high) if v is not None]
            if name in ("alpha", "beta"):
                if any(math.isclose(v, bound, abs_tol=1e-6) for v in numbers for bound in _EXPONENT_BOUNDS):
                    flagged.append(name)
            elif name == "E" and any(v < 1e-9 for v in numbers):
                flagged.append(name)
        return flagged

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "formula": self.formula,
            "inputs": list(self.inputs),
            "parameters": {name: estimate.to_dict() for name, estimate in self.parameters.items()},
            "converged": self.converged,
            "message": self.message,
            "gradientNorm": _json_number(self.gradient_norm),
            "objective": _json_number(self.objective),
            "nPoints": self.n_points,
            "nStarts": self.n_starts,
            "nStartsConverged": self.n_starts_converged,
            "nBootstrap": self.n_bootstrap,
            "nBootstrapConverged": self.n_bootstrap_converged,
            "confidence": self.confidence,
            "atBound": self.parameters_at_bound(),
        }
        if self.compute_optimal is not None:
            result["computeOptimal"] = self.compute_optimal.to_dict()
        return result


# Starting grid -------------------------------------------------------------------


@dataclass(frozen=True)
class StartGrid:
    """Grid of L-BFGS-B starting points, placed relative to the data.

    Hoffmann et al. use a fixed grid (e in -1..1, a and b in 0..25, exponents in 0..2)
    sized for language-model losses and parameter counts. Losses on normalised weather
    fields and ViT sizes sit elsewhere, so this grid is anchored on the data instead:
    E starts at `irreducible_fractions` of the lowest observed loss. Each power-law term
    starts at its share of the remaining loss at the geometric mean of its input,
    shifted by `log_offsets` (natural log), for every exponent in `exponents`.
    """

    irreducible_fractions: tuple[float, ...] = (0.05, 0.5, 0.9)
    exponents: tuple[float, ...] = (0.1, 0.3, 0.6, 1.0, 1.5)
    log_offsets: tuple[float, ...] = (-2.0, 0.0, 2.0)

    @classmethod
    def small(cls) -> StartGrid:
        """Return a 2 x 3 x 1 grid (power law) or 2 x 3 x 3 x 1 x 1 grid (Chinchilla) for quick fits."""
        return cls(irreducible_fractions=(0.1, 0.7), exponents=(0.2, 0.5, 1.0), log_offsets=(0.0,))


# Objective -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    """A law in optimiser coordinates.

    theta = (e, a_1, ..., a_k, alpha_1, ..., alpha_k) and the i-th prediction is
    log L_i = LSE(e, a_j - alpha_j (log x_ij - m_j)). The inputs are centred on their mean
    log m_j, which leaves the fit unchanged (A_j = exp(a_j + alpha_j m_j)) but removes the
    strong coupling between a_j and alpha_j that uncentred inputs (log x ~ 20) cause.
    """

    log_x: np.ndarray  # (n, k), centred
    log_loss: np.ndarray  # (n,)
    centre: np.ndarray  # (k,)
    delta: float

    @property
    def n_terms(self) -> int:
        return self.log_x.shape[1]


def _objective(theta: np.ndarray, problem: _Problem) -> tuple[float, np.ndarray]:
    """Return the Huber objective divided by n * delta, and its gradient.

    Dividing by n * delta leaves the minimiser unchanged and makes the objective read
    as a mean absolute log residual for residuals beyond delta, so L-BFGS-B's
    tolerances mean the same for any number of trials.
    """
    k = problem.n_terms
    log_coefficients = theta[1 : 1 + k]
    exponents = theta[1 + k :]

    # components[:, 0] = e, components[:, j] = a_j - alpha_j log x_j
    components = np.empty((problem.log_x.shape[0], k + 1))
    components[:, 0] = theta[0]
    components[:, 1:] = log_coefficients - exponents * problem.log_x
    # Log-sum-exp by hand: scipy.special.logsumexp costs several times more on these small arrays.
    largest = components.max(axis=1, keepdims=True)
    exponentials = np.exp(components - largest)
    totals = exponentials.sum(axis=1, keepdims=True)
    log_pred = (largest + np.log(totals))[:, 0]
    weights = exponentials / totals  # d log_pred / d component

    residual = log_pred - problem.log_loss
    delta = problem.delta
    small = np.abs(residual) <= delta
    huber = np.where(small, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta))
    huber_slope = np.clip(residual, -delta, delta)

    scale = 1.0 / (len(residual) * delta)
    value = huber.sum() * scale
    gradient = np.empty_like(theta)
    gradient[0] = (huber_slope * weights[:, 0]).sum() * scale
    gradient[1 : 1 + k] = (huber_slope[:, None] * weights[:, 1:]).sum(axis=0) * scale
    gradient[1 + k :] = -(huber_slope[:, None] * weights[:, 1:] * problem.log_x).sum(axis=0) * scale
    return value, gradient


def _bounds(k: int) -> list[tuple[float | None, float | None]]:
    return [(None, None)] * (1 + k) + [_EXPONENT_BOUNDS] * k


def _projected_gradient_norm(theta: np.ndarray, gradient: np.ndarray, bounds: Sequence[tuple]) -> float:
    projected = gradient.copy()
    for i, (low, high) in enumerate(bounds):
        at_low = low is not None and theta[i] <= low + 1e-12 and gradient[i] > 0
        at_high = high is not None and theta[i] >= high - 1e-12 and gradient[i] < 0
        if at_low or at_high:
            projected[i] = 0.0
    return float(np.linalg.norm(projected))


@dataclass(frozen=True)
class _Run:
    theta: np.ndarray
    objective: float
    success: bool
    message: str
    gradient_norm: float


def _minimise(problem: _Problem, start: np.ndarray) -> _Run:
    bounds = _bounds(problem.n_terms)
    result = minimize(
        _objective,
        start,
        args=(problem,),
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-8},
    )
    message = result.message if isinstance(result.message, str) else str(result.message)
    theta = np.asarray(result.x, dtype=float)
    _, gradient = _objective(theta, problem)
    success = bool(result.success) and bool(np.isfinite(result.fun))
    return _Run(theta, float(result.fun), success, message, _projected_gradient_norm(theta, gradient, bounds))


def _grid_starts(problem: _Problem, grid: StartGrid) -> list[np.ndarray]:
    """Build starting points in optimiser coordinates (see StartGrid)."""
    k = problem.n_terms
    min_loss = float(np.exp(problem.log_loss.min()))

    # Geometric-mean loss: the centred inputs are zero there on average.
    mid_loss = float(np.exp(problem.log_loss.mean()))
    starts = []
    for fraction in grid.irreducible_fractions:
        irreducible = fraction * min_loss
        excess = max(mid_loss - irreducible, 0.1 * mid_loss)
        share = math.log(excess / k)
        for exponents in product(grid.exponents, repeat=k):
            for offsets in product(grid.log_offsets, repeat=k):
                theta = [math.log(irreducible)] + [share + offset for offset in offsets] + list(exponents)
                starts.append(np.array(theta, dtype=float))
    return starts


def _single_threaded_blas() -> contextlib.AbstractContextManager:
    """Limit BLAS to one thread while fitting.

    scipy's L-BFGS-B makes many BLAS calls on vectors of a few elements, where thread
    hand-offs cost more than the work. Measured on a 2-core machine loaded by other
    processes (scipy 1.17.1, OpenBLAS 0.3.30): 68 runs of the Chinchilla fit took
    3.5-11 s with two BLAS threads and 0.5-0.9 s with one.
    """
    if threadpool_limits is None:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _best_run(problem: _Problem, starts: Iterable[np.ndarray]) -> tuple[_Run | None, list[_Run]]:
    """Minimise from every start; return the converged run with the lowest objective and all runs."""
    runs = [_minimise(problem, start) for start in starts]
    converged = [run for run in runs if run.success]
    best = min(converged, key=lambda run: run.objective) if converged else None
    return best, runs


# Conversion between optimiser coordinates and the law's parameters.


def _natural_parameters(theta: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Return (E, A[, B], alpha[, beta]) from optimiser coordinates."""
    k = len(centre)
    exponents = theta[1 + k :]
    log_coefficients = theta[1 : 1 + k] + exponents * centre
    with np.errstate(over="ignore"):
        return np.concatenate([[math.exp(theta[0])], np.exp(log_coefficients), exponents])


def _parameter_names(k: int) -> tuple[str, ...]:
    return ("E", "A", "alpha") if k == 1 else ("E", "A", "B", "alpha", "beta")


# Input checks --------------------------------------------------------------------


def _as_positive_array(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    bad = ~np.isfinite(array) | (array <= 0)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise FitError(
            f"{name} must be positive and finite for a log-space fit, got {array[index]!r} at index {index}; "
            "drop that trial or fix its record"
        )
    return array


def _check_enough_points(columns: Sequence[np.ndarray], labels: Sequence[str], what: str) -> None:
    """Raise FitError unless the inputs have at least (parameters + 1) distinct points, and each varies."""
    n_parameters = 1 + 2 * len(columns)
    needed = n_parameters + 1
    distinct_points = len({tuple(row) for row in np.column_stack(columns)})
    if len(columns) == 1:
        if distinct_points < needed:
            raise FitError(f"{what} needs at least {needed} trials with distinct {labels[0]}; got {distinct_points}")
        return

    for column, label in zip(columns, labels):
        distinct = len(np.unique(column))
        if distinct < 2:
            raise FitError(f"{what} needs at least 2 distinct {label}; got {distinct} (vary it along an axis)")
    if distinct_points < needed:
        raise FitError(
            f"{what} needs at least {needed} trials with distinct ({', '.join(labels)}) pairs; got {distinct_points}"
        )


def _has_enough_points(columns: Sequence[np.ndarray]) -> bool:
    try:
        _check_enough_points(columns, ["x"] * len(columns), "resample")
    except FitError:
        return False
    return True


# Fitting -------------------------------------------------------------------------


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    # Identical refits mean every usable resample held the same distinct points (n = parameters + 1),
    # so the spread carries no information about uncertainty: no interval rather than a zero-width one.
    if len(samples) < MIN_BOOTSTRAP_FITS or np.ptp(samples) == 0:
        return None, None
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def _group_rows(groups: Sequence[Any] | None, n_points: int) -> list[np.ndarray] | None:
    """Return the point indices of each distinct group label, in order of first appearance."""
    if groups is None:
        return None
    if len(groups) != n_points:
        raise FitError(f"groups must have one label per point, got {len(groups)} for {n_points} points")
    rows: dict[Any, list[int]] = {}
    for i, label in enumerate(groups):
        rows.setdefault(label, []).append(i)
    return [np.array(indices, dtype=int) for indices in rows.values()]


def _resample_rows(rng: np.random.Generator, group_rows: list[np.ndarray] | None, n_points: int) -> np.ndarray:
    """Draw one bootstrap resample: points with replacement, or whole groups with replacement."""
    if group_rows is None:
        return rng.integers(0, n_points, size=n_points)
    picked = rng.integers(0, len(group_rows), size=len(group_rows))
    return np.concatenate([group_rows[i] for i in picked])


def _fit_law(
    columns: Sequence[np.ndarray],
    loss: np.ndarray,
    *,
    inputs: tuple[str, ...],
    formula: str,
    n_boot: int,
    confidence: float,
    seed: int,
    grid: StartGrid,
    huber_delta: float,
    bootstrap_starts: int,
    groups: Sequence[Any] | None = None,
) -> ScalingFit:
    """Fit one law to the points and bootstrap it; shared by fit_power_law and fit_chinchilla.

    With `groups` (one label per point) the bootstrap resamples whole groups, so points
    that share a trial stay together and their dependence widens the intervals.
    """
    log_columns = np.column_stack([np.log(column) for column in columns])
    centre = log_columns.mean(axis=0)

    def make_problem(rows: np.ndarray) -> _Problem:
        return _Problem(log_columns[rows] - centre, np.log(loss[rows]), centre, huber_delta)

    # Step 1: the full fit from every grid point.
    everything = np.arange(len(loss))
    problem = make_problem(everything)
    starts = _grid_starts(problem, grid)
    best, runs = _best_run(problem, starts)
    n_converged = sum(run.success for run in runs)
    if best is None:
        # NOTE: no start converged; the lowest objective is still reported, flagged converged=False.
        best = min(runs, key=lambda run: run.objective if np.isfinite(run.objective) else np.inf)
        logger.warning("%s: none of %d L-BFGS-B starts converged; last message: %s", formula, len(runs), best.message)

    # Step 2: the bootstrap. Each resample restarts from the best few distinct full-fit
    # optima, which sit close to the resample's optimum, instead of the whole grid.
    ranked = sorted((run for run in runs if run.success), key=lambda run: run.objective) or [best]
    boot_starts: list[np.ndarray] = []
    for run in ranked:
        if all(np.linalg.norm(run.theta - kept) > 1e-3 for kept in boot_starts):
            boot_starts.append(run.theta)
        if len(boot_starts) >= bootstrap_starts:
            break

    rng = np.random.default_rng(seed)
    group_rows = _group_rows(groups, len(loss))
    samples = []
    for _ in range(n_boot):
        rows = _resample_rows(rng, group_rows, len(loss))
        if not _has_enough_points([column[rows] for column in columns]):
            continue
        boot_best, _ = _best_run(make_problem(rows), boot_starts)
        if boot_best is not None:
            samples.append(_natural_parameters(boot_best.theta, centre))
    samples_array = np.array(samples) if samples else np.empty((0, 1 + 2 * len(columns)))
    if n_boot and len(samples) < n_boot:
        logger.info("%s: %d of %d bootstrap resamples gave a converged fit", formula, len(samples), n_boot)

    # Step 3: point values from the full fit, intervals from the bootstrap percentiles.
    values = _natural_parameters(best.theta, centre)
    names = _parameter_names(len(columns))
    parameters = {}
    for i, name in enumerate(names):
        low, high = _percentile_interval(samples_array[:, i], confidence) if len(samples) else (None, None)
        parameters[name] = Estimate(float(values[i]), low, high)

    return ScalingFit(
        formula=formula,
        inputs=inputs,
        parameters=parameters,
        converged=best.success,
        message=best.message,
        gradient_norm=best.gradient_norm,
        objective=best.objective * len(loss) * huber_delta,  # back to the plain sum of Huber terms
        n_points=len(loss),
        n_starts=len(runs),
        n_starts_converged=n_converged,
        n_bootstrap=n_boot,
        n_bootstrap_converged=len(samples),
        confidence=confidence,
        bootstrap_values=samples_array,
    )


def fit_power_law(
    x: Sequence[float] | np.ndarray,
    loss: Sequence[float] | np.ndarray,
    *,
    x_name: str = "x",
    description: str | None = None,
    n_boot: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
    grid: StartGrid | None = None,
    huber_delta: float = HUBER_DELTA,
    bootstrap_starts: int = 2,
) -> ScalingFit:
    """Fit L(x) = E + A / x^alpha to positive points and bootstrap 'confidence' intervals.

    Objective (Hoffmann et al. 2022, approach 3, one term): with E = exp(e), A = exp(a),
    minimise sum_i Huber_delta(LSE(e, a - alpha log x_i) - log L_i) with L-BFGS-B from
    every point of `grid`, and keep the converged start with the lowest objective.
    Intervals are percentiles of `n_boot` refits on trials resampled with replacement
    (seeded by `seed`). Resamples with too few distinct x, or whose refit does not
    converge, are skipped and counted in `n_bootstrap - n_bootstrap_converged`.

    `x_name` names x in messages ("parameter counts") and `description` the fit ("loss
    vs parameters"). Raises FitError for fewer than 4 distinct x or a non-positive value.
    """
    if len(x) != len(loss):
        raise FitError(f"x and loss must have the same length, got {len(x)} and {len(loss)}")
    x_array = _as_positive_array(x, x_name)
    loss_array = _as_positive_array(loss, "loss")
    description = description or f"loss vs {x_name}"
    _check_enough_points([x_array], [x_name], description)
    _check_confidence(confidence)
    with _single_threaded_blas():
        return _fit_law(
            [x_array],
            loss_array,
            inputs=(x_name,),
            formula="L = E + A / x^alpha",
            n_boot=n_boot,
            confidence=confidence,
            seed=seed,
            grid=grid or StartGrid(),
            huber_delta=huber_delta,
            bootstrap_starts=bootstrap_starts,
        )


def fit_chinchilla(
    n: Sequence[float] | np.ndarray,
    d: Sequence[float] | np.ndarray,
    loss: Sequence[float] | np.ndarray,
    *,
    flops: Sequence[float] | np.ndarray | None = None,
    n_name: str = "parameter counts",
    d_name: str = "sample counts",
    n_boot: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
    grid: StartGrid | None = None,
    huber_delta: float = HUBER_DELTA,
    bootstrap_starts: int = 2,
    groups: Sequence[Any] | None = None,
) -> ScalingFit:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta and derive the compute-optimal allocation.

    Objective (Hoffmann et al. 2022, approach 3): with E, A, B = exp(e, a, b), minimise
    sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i) with
    L-BFGS-B from every point of `grid`, and keep the converged start with the lowest
    objective. Intervals are bootstrap percentiles as in fit_power_law.

    The result's `compute_optimal` contains the exponents a = beta / (alpha + beta) and
    b = alpha / (alpha + beta) of N_opt and D_opt, and G, each with its bootstrap
    interval. `flops` (C per trial) gives k = median C / (N D) for `allocate`.

    `groups` labels each point with its trial when a trial gives several points (a
    compute ladder); the bootstrap then resamples trials, not points.

    Raises FitError unless N and D each take at least 2 values and the trials form at
    least 6 distinct (N, D) pairs, or when a value is not positive.
    """
    if not len(n) == len(d) == len(loss):
        raise FitError(f"N, D and loss must have the same length, got {len(n)}, {len(d)} and {len(loss)}")
    n_array = _as_positive_array(n, n_name)
    d_array = _as_positive_array(d, d_name)
    loss_array = _as_positive_array(loss, "loss")
    _check_enough_points([n_array, d_array], [n_name, d_name], "loss vs parameters and samples")
    _check_confidence(confidence)
    k_values = None
    if flops is not None:
        if len(flops) != len(loss):
            raise FitError(f"flops must have one value per trial, got {len(flops)} for {len(loss)} trials")
        k_values = _as_positive_array(flops, "FLOPs") / (n_array * d_array)

    with _single_threaded_blas():
        result = _fit_law(
            [n_array, d_array],
            loss_array,
            inputs=(n_name, d_name),
            formula="L = E + A / N^alpha + B / D^beta",
            n_boot=n_boot,
            confidence=confidence,
            seed=seed,
            grid=grid or StartGrid(),
            huber_delta=huber_delta,
            bootstrap_starts=bootstrap_starts,
            groups=groups,
        )
    result.compute_optimal = compute_optimal(result, k_values)
    return result


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise FitError(f"confidence must lie strictly between 0 and 1, got {confidence}; use e.g. 0.95")


def _allocation_exponents(values: np.ndarray) -> np.ndarray:
    """Return (a, b, G) for rows of (E, A, B, alpha, beta); Chinchilla's equation for N_opt and D_opt."""
    values = np.atleast_2d(values)
    big_a, big_b, alpha, beta = values[:, 1], values[:, 2], values[:, 3], values[:, 4]
    total = alpha + beta
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a = beta / total
        b = alpha / total
        g = (alpha * big_a / (beta * big_b)) ** (1.0 / total)
    return np.column_stack([a, b, g])


def compute_optimal(result: ScalingFit, k_values: np.ndarray | None = None) -> ComputeOptimal:
    """Derive the compute-optimal allocation from a Chinchilla fit.

    Minimising E + A/N^alpha + B/D^beta subject to C = k N D gives
    N_opt = G (C/k)^a and D_opt = G^-1 (C/k)^b with a = beta/(alpha+beta),
    b = alpha/(alpha+beta) and G = (alpha A / (beta B))^(1/(alpha+beta)).
    Intervals are percentiles of the same quantities over the bootstrap refits.
    """
    if len(result.inputs) != 2:
        raise FitError("the compute-optimal allocation needs the Chinchilla form L(N, D), not a one-input power law")
    names = _parameter_names(2)
    point = _allocation_exponents(np.array([[result.value(name) for name in names]]))[0]
    boot = result.bootstrap_values
    spread = _allocation_exponents(boot) if len(boot) else np.empty((0, 3))

    estimates = []
    for i in range(3):
        column = spread[:, i][np.isfinite(spread[:, i])] if len(spread) else spread[:, 0]
        low, high = _percentile_interval(column, result.confidence)
        estimates.append(Estimate(float(point[i]), low, high))

    k = k_min = k_max = None
    if k_values is not None and len(k_values):
        k, k_min, k_max = float(np.median(k_values)), float(k_values.min()), float(k_values.max())
    return ComputeOptimal(a=estimates[0], b=estimates[1], G=estimates[2], k=k, k_min=k_min, k_max=k_max)


# Records -------------------------------------------------------------------------


def record_value(record: dict[str, Any], path: str) -> Any:
    """Return the value at a dotted path of a record, or None when any part is missing or null."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def record_number(record: dict[str, Any], path: str) -> float | None:
    """Return the finite number at a dotted path of a record, or None for anything else (booleans included)."""
    value = record_value(record, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None


@dataclass
class TrialPoints:
    """Per-trial (N, D, C, loss) of the succeeded trials, with None where a record lacks a value.

    `params_field` is the field N was read from: the non-embedding count when every
    usable trial has it, else the total count.
    """

    trials: list[str]
    params: list[float | None]
    samples: list[float | None]
    flops: list[float | None]
    loss: list[float | None]
    params_field: str

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> TrialPoints:
        succeeded = [record for record in records if record.get("state") == "Succeeded"]
        params_field = PARAMS_FIELDS[0]
        if any(_positive(record_value(record, PARAMS_FIELDS[0])) is None for record in succeeded):
            params_field = PARAMS_FIELDS[1]
        return cls(
            trials=[str(record.get("trial", record.get("index", "?"))) for record in succeeded],
            params=[_positive(record_value(record, params_field)) for record in succeeded],
            samples=[_positive(record_value(record, SAMPLES_FIELD)) for record in succeeded],
            flops=[_positive(record_value(record, FLOPS_FIELD)) for record in succeeded],
            loss=[_positive(record_value(record, LOSS_FIELD)) for record in succeeded],
            params_field=params_field,
        )

    def complete(self, *names: str) -> np.ndarray:
        """Return the indices of the trials where loss and every named column are present."""
        columns = [self.loss] + [getattr(self, name) for name in names]
        rows = [i for i in range(len(self.loss)) if all(column[i] is not None for column in columns)]
        return np.array(rows, dtype=int)

    def column(self, name: str, rows: np.ndarray) -> np.ndarray:
        values = getattr(self, name)
        return np.array([values[i] for i in rows], dtype=float)


def compute_frontier(flops: Sequence[float] | np.ndarray, loss: Sequence[float] | np.ndarray) -> np.ndarray:
    """Return the indices of the compute frontier, sorted by FLOPs.

    A trial is on the frontier (the lower envelope of loss vs FLOPs) when no trial
    with at most its FLOPs reached a lower loss. Among equal FLOPs only the lowest
    loss counts.
    """
    flops = np.asarray(flops, dtype=float)
    loss = np.asarray(loss, dtype=float)
    order = np.lexsort((loss, flops))
    frontier = []
    best = np.inf
    for i in order:
        if loss[i] < best:
            frontier.append(int(i))
            best = loss[i]
    return np.array(frontier, dtype=int)


def _largest_group(x: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Return the rows of the `other` value whose group has the most distinct x (ties: larger `other`)."""
    best_rows = np.arange(len(x))
    best_key = (-1, -np.inf)
    for value in np.unique(other):
        rows = np.flatnonzero(other == value)
        key = (len(np.unique(x[rows])), float(value))
        if key > best_key:
            best_rows, best_key = rows, key
    return best_rows


def fit_study(
    records: Iterable[dict[str, Any]],
    *,
    n_boot: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
    grid: StartGrid | None = None,
) -> dict[str, Any]:
    """Run every fit the trial records support and return the results as a JSON-ready dict.

    Only succeeded trials with a positive `evaluation.testLoss` are used. The fits:

    - lossVsParams: L vs N among the trials of one sample count (the count with the
      most distinct N, the larger on a tie), so a varying D does not blur the curve.
    - lossVsSamples: L vs D likewise, among the trials of one parameter count.
    - lossVsFlops: L vs C on the compute frontier (see compute_frontier).
    - lossVsParamsAndSamples: the Chinchilla form on all trials, with computeOptimal.
    - computeOptimal: IsoFLOP profiles (approach 2), their agreement with approach 3,
      the recommendation and the extrapolation (`wxscale.isoflop.analyse_compute_optimal`);
      it needs 3 or more model sizes at one compute budget, as `spec.design` plans them.

    Each key contains `ScalingFit.to_dict()` plus `subset` (which trials were used), or
    `{"note": message}` with the FitError's message when the trials do not support
    that fit.
    """
    records = list(records)
    points = TrialPoints.from_records(records)
    options = {"n_boot": n_boot, "confidence": confidence, "seed": seed, "grid": grid}
    summary: dict[str, Any] = {
        "target": LOSS_FIELD,
        "paramsField": points.params_field,
        "nTrials": len(records),
        "nSucceeded": len(points.loss),
        "nWithLoss": sum(value is not None for value in points.loss),
    }

    fitters = {
        "lossVsParams": lambda: _fit_one_input(
            points, "params", "samples", "loss vs parameters", "parameter counts", "sample count", options
        ),
        "lossVsSamples": lambda: _fit_one_input(
            points, "samples", "params", "loss vs samples", "sample counts", "parameter count", options
        ),
        "lossVsFlops": lambda: _fit_flops(points, options),
        "lossVsParamsAndSamples": lambda: _fit_params_and_samples(points, options),
    }
    for name, fitter in fitters.items():
        try:
            summary[name] = fitter()
        except FitError as error:
            logger.info("scaling fit %s skipped: %s", name, error)
            summary[name] = {"note": str(error)}

    from wxscale.isoflop import analyse_compute_optimal  # wxscale.isoflop imports this module

    try:
        summary["computeOptimal"] = analyse_compute_optimal(records, **options)
    except FitError as error:
        logger.info("compute-optimal analysis skipped: %s", error)
        summary["computeOptimal"] = {"note": str(error)}
    return summary


def _field_name(points: TrialPoints, column: str) -> str:
    return {"params": points.params_field, "samples": SAMPLES_FIELD, "flops": FLOPS_FIELD}[column]


def _fit_one_input(
    points: TrialPoints,
    column: str,
    other: str,
    description: str,
    label: str,
    other_label: str,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Fit L vs one input; when the other input varies, use the trials at one of its values."""
    rows = points.complete(column)
    if len(rows) == 0:
        raise FitError(
            f"{description} needs trials with {_field_name(points, column)} and {LOSS_FIELD}; "
            "no succeeded trial has both"
        )
    x = points.column(column, rows)
    subset = "all trials with a test loss"

    # Group only when both inputs vary, so a constant input gets the plain "got 1" message.
    other_known = all(getattr(points, other)[i] is not None for i in rows)
    if other_known and len(np.unique(x)) > 1 and len(np.unique(points.column(other, rows))) > 1:
        other_values = points.column(other, rows)
        group = _largest_group(x, other_values)
        subset = f"trials with {_field_name(points, other)} = {other_values[group[0]]:.6g}"
        description = f"{description} at one {other_label}"
        rows, x = rows[group], x[group]

    fit = fit_power_law(x, points.column("loss", rows), x_name=label, description=description, **options)
    fit.inputs = (_field_name(points, column),)
    result = fit.to_dict()
    result["subset"] = subset
    result["trials"] = [points.trials[i] for i in rows]
    return result


def _fit_flops(points: TrialPoints, options: dict[str, Any]) -> dict[str, Any]:
    rows = points.complete("flops")
    if len(rows) == 0:
        raise FitError(f"loss vs FLOPs needs trials with {FLOPS_FIELD} and {LOSS_FIELD}; no succeeded trial has both")
    flops = points.column("flops", rows)
    frontier = rows[compute_frontier(flops, points.column("loss", rows))]
    fit = fit_power_law(
        points.column("flops", frontier),
        points.column("loss", frontier),
        x_name="FLOPs on the compute frontier",
        description="loss vs FLOPs",
        **options,
    )
    fit.inputs = (FLOPS_FIELD,)
    result = fit.to_dict()
    result["subset"] = "compute frontier (no cheaper trial reached a lower loss)"
    result["trials"] = [points.trials[i] for i in frontier]
    return result


def _fit_params_and_samples(points: TrialPoints, options: dict[str, Any]) -> dict[str, Any]:
    rows = points.complete("params", "samples")
    if len(rows) == 0:
        raise FitError(
            f"loss vs parameters and samples needs trials with {points.params_field}, {SAMPLES_FIELD} "
            f"and {LOSS_FIELD}; no succeeded trial has all three"
        )
    flops_present = all(points.flops[i] is not None for i in rows)
    fit = fit_chinchilla(
        points.column("params", rows),
        points.column("samples", rows),
        points.column("loss", rows),
        flops=points.column("flops", rows) if flops_present else None,
        **options,
    )
    fit.inputs = (points.params_field, SAMPLES_FIELD)
    result = fit.to_dict()
    result["subset"] = "all trials with a test loss"
    result["trials"] = [points.trials[i] for i in rows]
    return result
