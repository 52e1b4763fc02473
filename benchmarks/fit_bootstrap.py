"""Fit: wall time of `wxscale.fit.fit_study` on 1,000 trial records, bootstrap intervals included.

The records form an IsoFLOP design: 10 compute budgets x 10 model sizes, each
repeated 10 times with its own noise. The test loss follows a planted law,
L = E + A / N^alpha + B / D^beta with 1 % multiplicative noise, so every fit
of `fit_study` runs: loss against N, D and C, the Chinchilla form, and the
compute-optimal analysis (IsoFLOP profiles and approach 3).

The operator refits after each finished trial with 200 bootstrap resamples by
default (`--fit-bootstrap`), so 'full' uses 200. The limit is 60 s, the time
within which we want a fit of a large study to follow its last trial.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import Result, result
from wxscale.fit import StartGrid, fit_study

NAME = "fit"

E, A, ALPHA, B, BETA = 0.05, 40.0, 0.35, 60.0, 0.3
LIMIT_SECONDS = 60.0
BOOTSTRAP = {"tiny": 5, "quick": 50, "full": 200}
TRIALS = {"tiny": 200, "quick": 1000, "full": 1000}


def planted_records(n_trials: int, seed: int = 0) -> list[dict]:
    """Return `n_trials` result records of an IsoFLOP design (budgets x sizes x repeats) with a planted loss."""
    rng = np.random.default_rng(seed)
    budgets = np.geomspace(1e13, 1e16, 10)
    sizes = np.geomspace(1e4, 1e7, 10)
    records = []
    repeats = max(1, n_trials // (len(budgets) * len(sizes)))
    for budget in budgets:
        for params in sizes:
            samples = budget / (6.0 * params)
            for _ in range(repeats):
                loss = (E + A / params**ALPHA + B / samples**BETA) * float(np.exp(rng.normal(0.0, 0.01)))
                index = len(records)
                records.append({
                    "trial": f"t{index:04d}", "index": index, "state": "Succeeded",
                    "model": {"params": int(params * 1.1), "nonEmbeddingParams": int(params)},
                    "training": {"samples": float(samples), "flopsAnalytic": float(budget)},
                    "evaluation": {"testLoss": loss},
                })
    return records[:n_trials]


def run(mode: str = "quick") -> list[Result]:
    """Time one `fit_study` call on the planted records of `mode`."""
    records = planted_records(TRIALS[mode])
    grid = StartGrid.small() if mode == "tiny" else None
    began = time.perf_counter()
    summary = fit_study(records, n_boot=BOOTSTRAP[mode], grid=grid)
    seconds = time.perf_counter() - began

    fitted = [name for name in ("lossVsParams", "lossVsSamples", "lossVsFlops", "lossVsParamsAndSamples",
                                "computeOptimal") if "note" not in summary.get(name, {"note": ""})]
    chinchilla = summary.get("lossVsParamsAndSamples", {})
    alpha = chinchilla.get("parameters", {}).get("alpha", {}).get("value") if isinstance(chinchilla, dict) else None
    note = (f"{len(records)} trials, {BOOTSTRAP[mode]} bootstrap resamples, fits run: {', '.join(fitted) or 'none'}"
            + (f"; fitted alpha {alpha:.3f} (planted {ALPHA})" if isinstance(alpha, float) else ""))
    return [result(NAME, "fit_study wall time", seconds, "s", "limit", LIMIT_SECONDS, "<= 1", note)]
