"""PNG figures of a study: scaling curves, forecast skill, cost and training curves.

Every plot_* function takes the trial records (TrialResult dicts) and the folder to
write into, and returns the path of the PNG it wrote, or None when the records cannot
support that figure (for example, one embedding width only). Failed trials are left
out of every figure. Figures are drawn on matplotlib's Agg canvas without pyplot,
so no global state or display is involved, and each file is replaced atomically.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter
from matplotlib import colormaps

from wxscale.fit import (
    FLOPS_FIELD,
    LOSS_FIELD,
    PARAMS_FIELDS,
    SAMPLES_FIELD,
    compute_frontier,
    record_number,
    record_value,
)

logger = logging.getLogger(__name__)

# mkstemp creates files with mode 0600; written files get the usual 0666 & ~umask instead.
# Reading the umask means setting it, so it is read once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

DPI = 110
LOSS_LABEL = "test loss (latitude-weighted MSE, normalised fields)"
FLOPS_LABEL = "training compute (FLOPs, analytic)"
SAMPLES_LABEL = "training samples seen"
BASELINES = ("persistence", "climatology")


# Files and labels ----------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path in the folder of `path`, then move it onto `path` with os.replace.

    Readers see the old file or the complete new one, never a partial write. On an
    exception the temporary file is removed and `path` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def format_si(value: float | None, digits: int = 3) -> str:
    """Format a count with an SI suffix: 812345 -> '812k', 1.2e12 -> '1.2T'; None -> '-'."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    magnitude = abs(float(value))
    for threshold, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= threshold:
            return f"{float(value) / threshold:.{digits}g}{suffix}"
    return f"{float(value):.{digits}g}"


def is_synthetic(records: Sequence[dict[str, Any]]) -> bool:
    return any(record_value(record, "data.synthetic") for record in records)


def _title(text: str, records: Sequence[dict[str, Any]]) -> str:
    return f"{text} (synthetic data)" if is_synthetic(records) else text


def _new_figure(rows: int = 1, columns: int = 1, width: float = 6.4, height: float = 4.4) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, axes


def _plain_log_ticks(axis: Any) -> None:
    """Label a log-scale y axis with plain numbers (1.2, not 1.2 x 10^0), readable when losses span under a decade."""
    formatter = FuncFormatter(lambda value, _: f"{value:.3g}")
    axis.yaxis.set_major_formatter(formatter)
    axis.yaxis.set_minor_formatter(formatter)


def _save(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)
    logger.debug("wrote figure %s", path)
    return path


# Record access -------------------------------------------------------------------


def succeeded(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in records if record.get("state") == "Succeeded"]


def params_field(records: Sequence[dict[str, Any]]) -> str:
    """Return the parameter-count field the fits use: non-embedding when every trial has it."""
    if records and all(record_number(record, PARAMS_FIELDS[0]) for record in records):
        return PARAMS_FIELDS[0]
    return PARAMS_FIELDS[1]


def _params_label(field: str) -> str:
    return "non-embedding parameters" if field == PARAMS_FIELDS[0] else "parameters"


def _positive_rows(records: Sequence[dict[str, Any]], *paths: str) -> list[tuple[dict[str, Any], list[float]]]:
    """Return (record, values) for the records where every path contains a positive number."""
    rows = []
    for record in records:
        values = [record_number(record, path) for path in paths]
        if all(value is not None and value > 0 for value in values):
            rows.append((record, values))
    return rows


def _fitted_law(fits: dict[str, Any] | None, name: str) -> Callable[..., np.ndarray] | None:
    """Return the prediction function of a fit in fit_study's dict, or None for a note or missing fit."""
    if not fits or "parameters" not in fits.get(name, {}):
        return None
    values = {key: entry["value"] for key, entry in fits[name]["parameters"].items()}
    if any(value is None for value in values.values()):
        return None
    if "B" in values:
        return lambda n, d: values["E"] + values["A"] / n ** values["alpha"] + values["B"] / d ** values["beta"]
    return lambda x: values["E"] + values["A"] / x ** values["alpha"]


def variables(records: Sequence[dict[str, Any]]) -> list[str]:
    """Return the evaluated variable names in order of first appearance."""
    names: list[str] = []
    for record in records:
        for name in record_value(record, "evaluation.variables") or {}:
            if name not in names:
                names.append(name)
    return names


def variable_units(records: Sequence[dict[str, Any]], variable: str) -> str:
    for record in records:
        units = record_value(record, f"evaluation.variables.{variable}.units")
        if units:
            return str(units)
    return "units unknown"


def _log_grid(values: Sequence[float], points: int = 200) -> np.ndarray:
    low, high = min(values), max(values)
    return np.logspace(math.log10(low), math.log10(high), points) if high > low else np.array([low])


# Scaling curves ------------------------------------------------------------------


def plot_loss_vs_flops(
    records: Sequence[dict[str, Any]], out_dir: Path, fits: dict[str, Any] | None = None
) -> Path | None:
    """Draw test loss vs training FLOPs with the compute frontier and the fitted power law."""
    rows = _positive_rows(succeeded(records), FLOPS_FIELD, LOSS_FIELD)
    if len(rows) < 2:
        return None
    flops = np.array([values[0] for _, values in rows])
    loss = np.array([values[1] for _, values in rows])
    frontier = compute_frontier(flops, loss)

    figure, axes = _new_figure()
    axis = axes[0, 0]
    axis.scatter(flops, loss, color="tab:blue", alpha=0.6, label="trials")
    axis.step(flops[frontier], loss[frontier], where="post", color="black", linewidth=1.2, label="compute frontier")
    law = _fitted_law(fits, "lossVsFlops")
    if law is not None:
        grid = _log_grid(flops)
        alpha = fits["lossVsFlops"]["parameters"]["alpha"]["value"]
        axis.plot(grid, law(grid), color="tab:red", linestyle="--", label=f"fit E + A/C^alpha, alpha = {alpha:.3f}")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel(FLOPS_LABEL)
    axis.set_ylabel(LOSS_LABEL)
    _plain_log_ticks(axis)
    axis.set_title(_title("Test loss vs compute", records))
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    return _save(figure, out_dir / "loss_vs_flops.png")


def _plot_grouped(
    records: Sequence[dict[str, Any]],
    out_dir: Path,
    fits: dict[str, Any] | None,
    *,
    x_field: str,
    group_field: str,
    x_label: str,
    group_label: str,
    legend_title: str,
    filename: str,
    title: str,
    one_input_fit: str,
    x_is_params: bool,
) -> Path | None:
    """Plot loss vs x with one coloured line per value of the grouping field.

    Dashed curves show the Chinchilla fit at each group's value when it exists.
    Otherwise the one-input fit `one_input_fit` is drawn once, in black.
    """
    rows = _positive_rows(succeeded(records), x_field, group_field, LOSS_FIELD)
    if len(rows) < 2 or len({values[0] for _, values in rows}) < 2:
        return None
    groups = sorted({values[1] for _, values in rows})
    colours = colormaps["viridis"]
    norm = LogNorm(min(groups), max(groups)) if len(groups) > 1 else None
    chinchilla = _fitted_law(fits, "lossVsParamsAndSamples")
    single = _fitted_law(fits, one_input_fit)

    figure, axes = _new_figure()
    axis = axes[0, 0]
    for group in groups:
        points = sorted((values[0], values[2]) for _, values in rows if values[1] == group)
        colour = colours(norm(group)) if norm else colours(0.5)
        x, y = zip(*points)
        axis.plot(x, y, marker="o", color=colour, label=f"{group_label} {format_si(group)}")
        if chinchilla is not None:
            grid = _log_grid(x)
            curve = chinchilla(grid, group) if x_is_params else chinchilla(group, grid)
            axis.plot(grid, curve, color=colour, linestyle="--", linewidth=0.9)
    if chinchilla is None and single is not None:
        grid = _log_grid([values[0] for _, values in rows])
        subset = fits[one_input_fit].get("subset", "")
        axis.plot(grid, single(grid), color="black", linestyle="--", linewidth=0.9, label=f"fit on {subset}")

    axis.set_xscale("log")
    axis.set_yscale("log")
    _plain_log_ticks(axis)
    axis.set_xlabel(x_label)
    axis.set_ylabel(LOSS_LABEL)
    axis.set_title(_title(title, records))
    axis.grid(True, which="both", alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    if chinchilla is not None:
        handles.append(Line2D([], [], color="gray", linestyle="--"))
        labels.append("Chinchilla fit")
    axis.legend(handles, labels, title=legend_title, fontsize="small", ncols=2 if len(groups) > 8 else 1)
    return _save(figure, out_dir / filename)


def plot_loss_vs_params(
    records: Sequence[dict[str, Any]], out_dir: Path, fits: dict[str, Any] | None = None
) -> Path | None:
    """Draw test loss vs parameters, one line per training-sample count."""
    field = params_field(succeeded(records))
    return _plot_grouped(
        records,
        out_dir,
        fits,
        x_field=field,
        group_field=SAMPLES_FIELD,
        x_label=_params_label(field),
        group_label="D =",
        legend_title="training samples",
        filename="loss_vs_params.png",
        title="Test loss vs model size",
        one_input_fit="lossVsParams",
        x_is_params=True,
    )


def plot_loss_vs_samples(
    records: Sequence[dict[str, Any]], out_dir: Path, fits: dict[str, Any] | None = None
) -> Path | None:
    """Draw test loss vs training samples, one line per parameter count."""
    field = params_field(succeeded(records))
    return _plot_grouped(
        records,
        out_dir,
        fits,
        x_field=SAMPLES_FIELD,
        group_field=field,
        x_label=SAMPLES_LABEL,
        group_label="N =",
        legend_title=_params_label(field),
        filename="loss_vs_samples.png",
        title="Test loss vs data size",
        one_input_fit="lossVsSamples",
        x_is_params=False,
    )


# Forecast skill ------------------------------------------------------------------


def plot_metrics(records: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Draw test RMSE and MAE vs parameters and vs FLOPs, one row per variable.

    The dashed and dotted lines are the persistence and climatology scores, as the
    median over trials. Trials of one study normally share the test period, so the
    baselines differ little between them.
    """
    succeeded_records = succeeded(records)
    names = variables(succeeded_records)
    if not names:
        return None
    field = params_field(succeeded_records)
    panels = [(metric, x_field) for metric in ("rmse", "mae") for x_field in (field, FLOPS_FIELD)]

    figure, axes = _new_figure(len(names), len(panels), width=4.6, height=3.6)
    drawn = False
    for row, name in enumerate(names):
        units = variable_units(succeeded_records, name)
        for column, (metric, x_field) in enumerate(panels):
            axis = axes[row, column]
            points = _positive_rows(succeeded_records, x_field, f"evaluation.variables.{name}.model.{metric}")
            if points:
                drawn = True
                x, y = zip(*(values for _, values in points))
                axis.scatter(x, y, color="tab:blue", label="model")
            for baseline, style in zip(BASELINES, ("--", ":")):
                path = f"evaluation.variables.{name}.{baseline}.{metric}"
                scores = [record_number(record, path) for record in succeeded_records]
                scores = [score for score in scores if score is not None]
                if scores:
                    axis.axhline(float(np.median(scores)), color="gray", linestyle=style, label=baseline)
            axis.set_xscale("log")
            axis.set_xlabel(_params_label(field) if x_field == field else FLOPS_LABEL)
            axis.set_ylabel(f"{name} {metric.upper()} ({units})")
            axis.grid(True, which="both", alpha=0.3)
            if row == 0 and column == 0:
                axis.legend(fontsize="small")
    if not drawn:
        return None
    figure.suptitle(_title("Test RMSE and MAE vs model size and compute", records))
    return _save(figure, out_dir / "metrics_vs_scale.png")


def skill_ratio(record: dict[str, Any], variable: str, baseline: str) -> float | None:
    """Return model RMSE / baseline RMSE for one trial; below 1 the model beats the baseline."""
    model = record_number(record, f"evaluation.variables.{variable}.model.rmse")
    reference = record_number(record, f"evaluation.variables.{variable}.{baseline}.rmse")
    if model is None or reference is None or reference <= 0:
        return None
    return model / reference


def plot_skill(records: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Draw per-trial RMSE ratios against persistence and climatology, one panel per variable."""
    succeeded_records = succeeded(records)
    names = variables(succeeded_records)
    if not names:
        return None

    figure, axes = _new_figure(len(names), 1, width=max(6.4, 0.35 * len(succeeded_records) + 2.5), height=3.8)
    width = 0.4
    drawn = False
    for row, name in enumerate(names):
        axis = axes[row, 0]
        positions = np.arange(len(succeeded_records))
        bars = ((-width / 2, "persistence", "tab:orange"), (width / 2, "climatology", "tab:green"))
        for offset, baseline, colour in bars:
            ratios = [skill_ratio(record, name, baseline) for record in succeeded_records]
            heights = [np.nan if ratio is None else ratio for ratio in ratios]
            if any(ratio is not None for ratio in ratios):
                drawn = True
                axis.bar(positions + offset, heights, width, color=colour, label=f"vs {baseline}")
        axis.axhline(1.0, color="black", linewidth=1.0)
        axis.set_xticks(positions, [str(record.get("index", i)) for i, record in enumerate(succeeded_records)])
        axis.set_xlabel("trial index")
        axis.set_ylabel(f"{name}: model RMSE / baseline RMSE")
        axis.grid(True, axis="y", alpha=0.3)
        axis.legend(fontsize="small")
    if not drawn:
        return None
    figure.suptitle(_title("Skill vs baselines (below 1.0 beats the baseline)", records))
    return _save(figure, out_dir / "skill_vs_baselines.png")


# Cost ----------------------------------------------------------------------------


def _history(record: dict[str, Any]) -> float | None:
    return record_number(record, "model.history") or record_number(record, "config.data.history")


def _plot_cost(
    records: Sequence[dict[str, Any]],
    out_dir: Path,
    value_of: Callable[[dict[str, Any]], float | None],
    x_label: str,
    filename: str,
    title: str,
) -> Path | None:
    """Plot peak memory and inference latency vs one setting; None unless that setting varies."""
    succeeded_records = succeeded(records)
    x_values = [value_of(record) for record in succeeded_records]
    if len({value for value in x_values if value is not None}) < 2:
        return None
    series = [
        (0, "training.peakMemoryBytes", "training peak", 2.0**-20),
        (0, "inference.peakMemoryBytes", "inference peak", 2.0**-20),
        (1, "inference.latencyMsBatch1", "batch 1", 1.0),
        (1, "inference.latencyMsBatch", "batch B", 1.0),
    ]

    figure, axes = _new_figure(1, 2)
    drawn = False
    for panel, path, label, scale in series:
        points = [(x, record_number(record, path)) for x, record in zip(x_values, succeeded_records)]
        points = sorted((x, y * scale) for x, y in points if x is not None and y is not None)
        if not points:
            continue
        drawn = True
        if path == "inference.latencyMsBatch":
            sizes = {record_number(record, "inference.batchSize") for record in succeeded_records} - {None}
            label = f"batch {format_si(max(sizes))}" if len(sizes) == 1 else label
        x, y = zip(*points)
        (line,) = axes[0, panel].plot(x, y, marker="o", linestyle="none", label=f"{label} (line: median)")
        medians = {value: float(np.median([b for a, b in points if a == value])) for value in sorted(set(x))}
        axes[0, panel].plot(list(medians), list(medians.values()), color=line.get_color(), linewidth=0.8, alpha=0.7)
    if not drawn:
        return None
    for panel, y_label in ((0, "peak memory (MiB)"), (1, "inference latency (ms)")):
        axes[0, panel].set_xlabel(x_label)
        axes[0, panel].set_ylabel(y_label)
        axes[0, panel].grid(True, alpha=0.3)
        if axes[0, panel].has_data():
            axes[0, panel].legend(fontsize="small")
    figure.suptitle(_title(title, records))
    return _save(figure, out_dir / filename)


def plot_cost_vs_embed_dim(records: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Draw memory and inference latency vs embedding width, when `model.embedDim` varies."""
    return _plot_cost(
        records,
        out_dir,
        lambda record: record_number(record, "model.embedDim"),
        "embedding width (model.embedDim)",
        "cost_vs_embed_dim.png",
        "Memory and latency vs embedding width",
    )


def plot_cost_vs_history(records: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Draw memory and inference latency vs input history, when `data.history` varies."""
    return _plot_cost(
        records,
        out_dir,
        _history,
        "input time steps (data.history)",
        "cost_vs_history.png",
        "Memory and latency vs input history",
    )


# Training curves -----------------------------------------------------------------


def plot_curves(records: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Draw training (solid) and validation (dashed) loss vs step, one colour per trial."""
    succeeded_records = [record for record in succeeded(records) if record_value(record, "training.curve")]
    if not succeeded_records:
        return None
    colours = colormaps["tab10" if len(succeeded_records) <= 10 else "viridis"]

    figure, axes = _new_figure(width=7.5, height=4.8)
    axis = axes[0, 0]
    for i, record in enumerate(succeeded_records):
        colour = colours(i if len(succeeded_records) <= 10 else i / max(1, len(succeeded_records) - 1))
        curve = record_value(record, "training.curve")
        label = f"#{record.get('index', i)} N={format_si(record_number(record, 'model.params'))}"
        for key, style in (("trainLoss", "-"), ("validationLoss", "--")):
            points = [(point.get("step"), point.get(key)) for point in curve]
            points = [(step, loss) for step, loss in points if step is not None and loss is not None]
            if points:
                steps, losses = zip(*points)
                axis.plot(steps, losses, color=colour, linestyle=style, label=label if style == "-" else None)
    axis.set_yscale("log")
    _plain_log_ticks(axis)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (MSE, normalised fields)")
    axis.set_title(_title("Training (solid) and validation (dashed) loss", records))
    axis.grid(True, which="both", alpha=0.3)
    if len(succeeded_records) <= 20:
        axis.legend(fontsize="x-small", ncols=2 if len(succeeded_records) > 10 else 1)
    return _save(figure, out_dir / "training_curves.png")


# All figures ---------------------------------------------------------------------


def write_plots(
    records: Sequence[dict[str, Any]], out_dir: Path, fits: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write every figure the records support into out_dir; return {name: path} of those written."""
    out_dir = Path(out_dir)
    makers: dict[str, Callable[[], Path | None]] = {
        "lossVsFlops": lambda: plot_loss_vs_flops(records, out_dir, fits),
        "lossVsParams": lambda: plot_loss_vs_params(records, out_dir, fits),
        "lossVsSamples": lambda: plot_loss_vs_samples(records, out_dir, fits),
        "metrics": lambda: plot_metrics(records, out_dir),
        "skill": lambda: plot_skill(records, out_dir),
        "costVsEmbedDim": lambda: plot_cost_vs_embed_dim(records, out_dir),
        "costVsHistory": lambda: plot_cost_vs_history(records, out_dir),
        "trainingCurves": lambda: plot_curves(records, out_dir),
    }
    written = {}
    for name, make in makers.items():
        path = make()
        if path is not None:
            written[name] = path
    logger.info("wrote %d figures to %s", len(written), out_dir)
    return written
