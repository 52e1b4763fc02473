"""A synthetic weather-like data set: tracers advected by a slowly varying wind on a periodic grid.

Each variable is a tracer q obeying the advection-diffusion equation with
Newtonian relaxation towards a forced equilibrium field:

    dq/dt + u . grad(q) = kappa4 * (-lap^2 q) - (q - q_eq(x, y, t)) / tau

- u = (-d psi/dy, d psi/dx) comes from a streamfunction psi, so the wind is
  divergence-free. psi is a zonal jet plus a few travelling waves whose amplitudes
  drift over days to weeks.
- q_eq has a fixed random pattern per variable and a seasonal cycle of opposite
  sign in the two halves of the grid ("hemispheres").
- The output adds a diurnal cycle to q that follows local solar time (it moves
  westward with the sun), like the fast response of surface temperature. Inside
  q the 96 h relaxation would damp it to a small fraction of a kelvin.
- The grid is doubly periodic: latitude wraps like longitude. That is unphysical
  near the poles but lets the solver use periodic interpolation and FFTs.

The jet alone moves features by up to 5° (about one cell of a 32 x 64 grid) in 6 h,
and the diurnal cycle changes the field by up to 2.8 K in 6 h. Persistence therefore
has a clear error while the field stays strongly autocorrelated, so a model that
learns the wind and the diurnal cycle can beat it.

Numerics: semi-Lagrangian advection (cubic-spline interpolation at departure points
found with the midpoint rule), exact integration of the relaxation, and exact
integration of the hyperdiffusion in spectral space (numpy FFT). The scheme is stable
for any step, and sub-steps of at most 6 h only keep the departure points accurate.
"""

from __future__ import annotations

import functools
import logging
import math
import time as clock

import numpy as np
import pandas as pd
import xarray as xr
from scipy import ndimage

from wxscale.spec import SyntheticSpec

logger = logging.getLogger(__name__)

# Physical scales. Time is in hours, and lengths are radians of the periodic domain.
MEAN_KELVIN = 280.0
PATTERN_KELVIN = 12.0  # amplitude of the fixed equilibrium pattern
SEASONAL_KELVIN = 10.0
DIURNAL_KELVIN = 2.0
RELAXATION_HOURS = 96.0
JET_RADIANS_PER_HOUR = 0.015  # about 26 m/s on an Earth-sized sphere
WAVE_RADIANS_PER_HOUR = 0.008
SPIN_UP_HOURS = 240.0
MAX_SUBSTEP_HOURS = 6.0
HYPERDIFFUSION_HOURS = 3.0  # e-folding time of the smallest resolved scale
YEAR_HOURS = 365.25 * 24.0

_WAVES = 4


def coordinates(spec: SyntheticSpec) -> tuple[pd.DatetimeIndex, np.ndarray, np.ndarray]:
    """Return the (time, lat, lon) coordinates of the generated data without running the simulation.

    Latitudes are cell centres from north to south (87.19..-87.19 on 32 rows) and
    longitudes start at 0° east.
    """
    step = pd.Timedelta(hours=spec.step_hours)
    times = pd.DatetimeIndex(pd.Timestamp(spec.start) + step * np.arange(spec.steps)).as_unit("ns")
    latitudes = 90.0 - (np.arange(spec.lat) + 0.5) * 180.0 / spec.lat
    longitudes = np.arange(spec.lon) * 360.0 / spec.lon
    return times, latitudes, longitudes


class _Simulation:
    """Grid, wind and forcing of the solver for V tracers on an (ny, nx) grid."""

    def __init__(self, spec: SyntheticSpec, seed: int):
        ny, nx = spec.lat, spec.lon
        self.ny, self.nx = ny, nx

        # Square cells: x spans 2 pi, y spans 2 pi * ny / nx.
        self.dx = 2.0 * math.pi / nx
        self.length_y = self.dx * ny
        self.rows, self.columns = np.meshgrid(np.arange(ny, dtype=float), np.arange(nx, dtype=float), indexing="ij")
        self.x = self.columns * self.dx
        self.y = self.rows * self.dx

        kx = (np.fft.rfftfreq(nx, d=self.dx) * 2.0 * math.pi)[None, :]
        ky = (np.fft.fftfreq(ny, d=self.dx) * 2.0 * math.pi)[:, None]
        k_max_squared = (math.pi / self.dx) ** 2
        self.k4 = (kx**2 + ky**2) ** 2
        self.hyperdiffusion = 1.0 / (HYPERDIFFUSION_HOURS * k_max_squared**2)

        self._init_wind(np.random.default_rng([seed, 0]))
        self.patterns = np.stack(
            [self._random_pattern(np.random.default_rng([seed, 1 + index])) for index in range(len(spec.variables))]
        )

    def _init_wind(self, rng: np.random.Generator) -> None:
        """Draw the travelling waves of the streamfunction: wavenumbers, phases, speeds, drift periods."""
        self.wave_kx = rng.integers(1, 4, size=_WAVES).astype(float)
        self.wave_ky = rng.integers(1, 3, size=_WAVES) * 2.0 * math.pi / self.length_y * rng.choice([-1, 1], _WAVES)
        self.wave_phase = rng.uniform(0, 2 * math.pi, _WAVES)
        self.wave_speed = rng.uniform(-2 * math.pi / 120.0, 2 * math.pi / 120.0, _WAVES)  # radians of phase per hour
        self.wave_period = rng.uniform(5 * 24.0, 30 * 24.0, _WAVES)
        self.wave_drift_phase = rng.uniform(0, 2 * math.pi, _WAVES)

    def _random_pattern(self, rng: np.random.Generator) -> np.ndarray:
        """Return a smooth random field with unit standard deviation, made of low wavenumbers."""
        pattern = np.zeros((self.ny, self.nx))
        for _ in range(6):
            kx = rng.integers(0, 4)
            ky = rng.integers(0, 3) * 2.0 * math.pi / self.length_y
            phase = rng.uniform(0, 2 * math.pi)
            pattern += rng.normal() * np.cos(kx * self.x + ky * self.y + phase)
        return pattern / max(float(pattern.std()), 1e-6)

    def wind(self, hours: float, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (u, v) in radians per hour at points (x, y): the analytic derivatives of psi."""
        drift = 1.0 + 0.5 * np.sin(2 * math.pi * hours / self.wave_period + self.wave_drift_phase)
        amplitude = WAVE_RADIANS_PER_HOUR * drift / np.hypot(self.wave_kx, self.wave_ky)
        phase = self.wave_phase + self.wave_speed * hours
        angle = self.wave_kx[:, None, None] * x + self.wave_ky[:, None, None] * y + phase[:, None, None]
        cosine = np.cos(angle)

        # Each wave has psi = amplitude * sin(angle), so u = -dpsi/dy and v = dpsi/dx.
        u = JET_RADIANS_PER_HOUR * np.sin(2.0 * math.pi * y / self.length_y)
        u = u - np.tensordot(amplitude * self.wave_ky, cosine, axes=1)
        v = np.tensordot(amplitude * self.wave_kx, cosine, axes=1)
        return u, v

    def equilibrium(self, hours: float) -> np.ndarray:
        """Return q_eq for every tracer at time `hours` since the start of the year, shape (V, ny, nx)."""
        hemisphere = np.cos(2.0 * math.pi * self.y / self.length_y)
        seasonal = SEASONAL_KELVIN * math.sin(2.0 * math.pi * hours / YEAR_HOURS) * hemisphere
        return MEAN_KELVIN + PATTERN_KELVIN * self.patterns + seasonal[None]

    def diurnal(self, hours: float) -> np.ndarray:
        """Return the diurnal cycle at time `hours`, shape (ny, nx); it peaks where x + 2 pi * UTC hour / 24 = 0."""
        return DIURNAL_KELVIN * np.cos(self.x + 2.0 * math.pi * hours / 24.0)

    def advance(self, q: np.ndarray, start_hours: float, hours: float) -> np.ndarray:
        """Integrate the tracers q (V, ny, nx) from `start_hours` over `hours`."""
        middle = start_hours + hours / 2.0

        # Semi-Lagrangian advection: find where each grid point's parcel was `hours` ago
        # (midpoint rule, two fixed-point iterations) and interpolate q there.
        u, v = self.wind(middle, self.x, self.y)
        dx, dy = u * hours, v * hours
        for _ in range(2):
            u, v = self.wind(middle, self.x - dx / 2.0, self.y - dy / 2.0)
            dx, dy = u * hours, v * hours
        departure = np.stack([self.rows - dy / self.dx, self.columns - dx / self.dx])
        q = np.stack([ndimage.map_coordinates(field, departure, order=3, mode="grid-wrap") for field in q])

        # Relaxation towards q_eq, integrated exactly with q_eq held at the midpoint value.
        q_eq = self.equilibrium(middle)
        q = q_eq + (q - q_eq) * math.exp(-hours / RELAXATION_HOURS)

        # Hyperdiffusion removes grid-scale noise. It is integrated exactly in spectral space.
        damping = np.exp(-self.hyperdiffusion * self.k4 * hours)
        return np.fft.irfft2(np.fft.rfft2(q) * damping, s=(self.ny, self.nx))


def _simulate(spec: SyntheticSpec, seed: int) -> np.ndarray:
    """Run the simulation and return the tracers at every output step, shape (steps, V, lat, lon), float32."""
    simulation = _Simulation(spec, seed)
    start = pd.Timestamp(spec.start)
    # Forcing clock: hours since the start of the year, so the seasons follow the calendar.
    hours = (start - pd.Timestamp(year=start.year, month=1, day=1)).total_seconds() / 3600.0

    # The wind varies on scales of thousands of kilometres and over days, so the midpoint
    # departure points stay accurate for sub-steps of a few hours at any resolution.
    substeps = max(1, math.ceil(spec.step_hours / MAX_SUBSTEP_HOURS))
    substep_hours = spec.step_hours / substeps

    # Spin up from the equilibrium field so the first output steps already carry advected structure.
    spin_up_steps = math.ceil(SPIN_UP_HOURS / substep_hours)
    clock_hours = hours - spin_up_steps * substep_hours
    q = simulation.equilibrium(clock_hours)
    for _ in range(spin_up_steps):
        q = simulation.advance(q, clock_hours, substep_hours)
        clock_hours += substep_hours

    output = np.empty((spec.steps, len(spec.variables), spec.lat, spec.lon), dtype=np.float32)
    for step in range(spec.steps):
        output[step] = q + simulation.diurnal(hours + step * spec.step_hours)[None]
        for substep in range(substeps):
            q = simulation.advance(q, hours + step * spec.step_hours + substep * substep_hours, substep_hours)
    return output


@functools.lru_cache(maxsize=4)
def _generate_cached(spec_json: str, seed: int) -> xr.Dataset:
    spec = SyntheticSpec.model_validate_json(spec_json)
    began = clock.perf_counter()
    values = _simulate(spec, seed)
    values.flags.writeable = False  # callers share the cached array
    times, latitudes, longitudes = coordinates(spec)

    data_vars = {
        name: (
            ("time", "lat", "lon"),
            values[:, index],
            {"units": "K", "long_name": f"synthetic tracer {name}"},
        )
        for index, name in enumerate(spec.variables)
    }
    dataset = xr.Dataset(
        data_vars,
        coords={
            "time": ("time", times.values),
            "lat": ("lat", latitudes, {"units": "degrees_north", "standard_name": "latitude"}),
            "lon": ("lon", longitudes, {"units": "degrees_east", "standard_name": "longitude"}),
        },
        attrs={
            "title": "wxscale synthetic data: advection-diffusion of tracers on a periodic grid",
            "synthetic": 1,
            "seed": seed,
        },
    )
    logger.info(
        "generated synthetic data: %d variables x %d steps x %d x %d in %.2f s",
        len(spec.variables),
        spec.steps,
        spec.lat,
        spec.lon,
        clock.perf_counter() - began,
    )
    return dataset


def generate(spec: SyntheticSpec, seed: int) -> xr.Dataset:
    """Generate the synthetic data set for `spec`; the same spec and seed give the same values.

    Results are cached per process (four most recent), so the planner and the
    trainer do not pay twice. The returned dataset shares its arrays with the
    cache, so they are read-only.
    """
    return _generate_cached(spec.model_dump_json(), seed).copy(deep=False)
