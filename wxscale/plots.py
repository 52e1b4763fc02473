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
                _legend_if_labelled(axis, fontsize="small")
    if not drawn:
        return None
    figure.suptitle(_title("Test RMSE and MAE vs model size and compute", records))
    return _save(figure, out_dir / "metrics_vs_scale.png")


def _legend_if_labelled(axis: Any, **options: Any) -> None:
    """Draw the axis legend when it has labelled artists; a panel without data gets none."""
    if axis.get_legend_handles_labels()[0]:
        axis.legend(**options)


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
        _legend_if_labelled(axis, fontsize="small")
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


# Compute and efficiency ------------------------------------------------------------

PROCESSES_FIELD = "training.processes"
NODES_FIELD = "config.distributed.nodes"
THROUGHPUT_FIELD = "training.samplesPerSecond"
PRECISION_FIELD = "config.training.precision"
BATCH_SIZE_FIELD = "config.training.batchSize"
# Settings that trade memory against speed without changing the model.
OPTIMISATION_FIELDS = (
    "config.training.activationCheckpointing",
    "config.training.activationCheckpointBlocks",
    "config.training.attentionBackend",
    "config.training.precision",
    "config.training.microBatchSize",
    "config.distributed.strategy",
    "config.distributed.reshardAfterForward",
)
PARALLELISM_FIELDS = (
    "config.distributed.strategy",
    "config.distributed.nodes",
    "config.distributed.procsPerNode",
    "config.distributed.pipelineSchedule",
    "config.distributed.microbatches",
)


def _flat_config(record: dict[str, Any]) -> dict[str, Any]:
    """Return the trial config as {"config.section.field": value}; lists become tuples, so values hash."""
    flat: dict[str, Any] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}")
        else:
            flat[path] = tuple(value) if isinstance(value, list) else value

    walk(record.get("config") or {}, "config")
    return flat


def _varying(records: Sequence[dict[str, Any]], fields: Sequence[str] | None = None) -> list[str]:
    """Return the config paths (all of them, or those in `fields`) that take more than one value in the records."""
    flats = [_flat_config(record) for record in records]
    paths = fields if fields is not None else sorted({path for flat in flats for path in flat})
    return [path for path in paths if len({repr(flat.get(path)) for flat in flats}) > 1]


def _setting_label(record: dict[str, Any], paths: Sequence[str]) -> str:
    """Label a trial by the last name and value of each path, e.g. "precision=bf16, activationCheckpointing=True"."""
    flat = _flat_config(record)
    return ", ".join(f"{path.rsplit('.', 1)[-1]}={flat.get(path)}" for path in paths) or "all trials"


def _baseline_key(record: dict[str, Any]) -> str:
    """Return the trial's config without its process layout, to pair it with its one-process trial."""
    flat = _flat_config(record)
    kept = {path: value for path, value in flat.items()
            if not path.startswith("config.distributed.") and path != "config.training.numThreads"}
    return repr(sorted(kept.items()))


def scaling_efficiency(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Return {trial id: scaling efficiency} for the succeeded trials that have a one-process counterpart.

    efficiency = samples/s with N processes / (N x samples/s of the one-process trial
    whose config is the same apart from the `distributed` section). The global batch is
    the same in both, so this is strong scaling: 1.0 is linear, below 1.0 the processes
    lose time to communication, pipeline bubbles or contention for the machine's cores.
    """
    baselines: dict[str, float] = {}
    for record in succeeded(records):
        throughput = record_number(record, THROUGHPUT_FIELD)
        if record_number(record, PROCESSES_FIELD) == 1 and throughput:
            baselines.setdefault(_baseline_key(record), throughput)

    efficiency = {}
    for record in succeeded(records):
        processes = record_number(record, PROCESSES_FIELD)
        throughput = record_number(record, THROUGHPUT_FIELD)
        baseline = baselines.get(_baseline_key(record))
        if processes and throughput and baseline:
            efficiency[str(record.get("trial"))] = throughput / (processes * baseline)
    return efficiency


def _plot_scaling(records: Sequence[dict[str, Any]], out_dir: Path, x_field: str, x_label: str, filename: str,
                  title: str) -> Path | None:
    """Plot samples/s and scaling efficiency vs a process count, one line per setting; None unless it varies."""
    rows = _positive_rows(succeeded(records), x_field, THROUGHPUT_FIELD)
    if len({values[0] for _, values in rows}) < 2:
        return None
    efficiency = scaling_efficiency(records)
    others = [path for path in _varying([record for record, _ in rows])
              if not path.startswith("config.distributed.") and path != "config.training.numThreads"]
    groups: dict[str, list[tuple[float, float, float | None]]] = {}
    for record, (x, throughput) in rows:
        groups.setdefault(_setting_label(record, others), []).append(
            (x, throughput, efficiency.get(str(record.get("trial")))))

    figure, axes = _new_figure(1, 2)
    for label, points in sorted(groups.items()):
        points.sort()
        (line,) = axes[0, 0].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        scaled = [(p[0], p[2]) for p in points if p[2] is not None]
        if scaled:
            axes[0, 1].plot(*zip(*scaled), marker="o", color=line.get_color(), label=label)
    axes[0, 1].axhline(1.0, color="gray", linestyle=":", linewidth=1, label="linear scaling")
    for panel, y_label in ((0, "training throughput (samples/s)"), (1, "scaling efficiency vs one process")):
        axis = axes[0, panel]
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.set_xticks(sorted({values[0] for _, values in rows}))
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="x-small")
    figure.suptitle(_title(title, records))
    return _save(figure, out_dir / filename)


def plot_throughput_vs_processes(records: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Draw samples/s and scaling efficiency vs the number of processes, when it varies."""
    return _plot_scaling(records, out_dir, PROCESSES_FIELD, "processes (nodes x processes per node)",
                         "throughput_vs_processes.png", "Throughput and scaling efficiency vs processes")


def plot_throughput_vs_nodes(records: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Draw samples/s and scaling efficiency vs the number of nodes, when it varies."""
    return _plot_scaling(records, out_dir, NODES_FIELD, "nodes (distributed.nodes)", "throughput_vs_nodes.png",
                         "Throughput and scaling efficiency vs nodes")


def _horizontal_bars(axis: Any, labels: Sequence[str], values: Sequence[float | None], x_label: str) -> None:
    positions = np.arange(len(labels))
    axis.barh(positions, [value or 0.0 for value in values], color="tab:blue", alpha=0.8)
    axis.set_yticks(positions, labels, fontsize="x-small")
    axis.invert_yaxis()
    axis.set_xlabel(x_label)
    axis.grid(True, axis="x", alpha=0.3)


def plot_memory_vs_optimisation(records: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Draw peak training memory and samples/s per trial when an optimisation setting varies.

    The settings are those of OPTIMISATION_FIELDS: activation checkpointing, attention
    backend, precision, micro-batch size, FSDP and its resharding. Peak memory is rank 0's.
    """
    succeeded_records = [record for record in succeeded(records)
                         if record_number(record, "training.peakMemoryBytes") is not None]
    varying = _varying(succeeded_records, OPTIMISATION_FIELDS)
    if not varying:
        return None
    layouts = _varying(succeeded_records, ("config.distributed.nodes", "config.distributed.procsPerNode"))
    rows = sorted((_setting_label(record, varying + layouts), record) for record in succeeded_records)
    labels = [f"#{record.get('index')} {label}" for label, record in rows]

    figure, axes = _new_figure(1, 2, width=6.4, height=max(3.0, 0.35 * len(rows) + 1.5))
    _horizontal_bars(axes[0, 0], labels, [record_number(record, "training.peakMemoryBytes") / 2**20
                                          for _, record in rows], "peak training memory, rank 0 (MiB)")
    _horizontal_bars(axes[0, 1], labels, [record_number(record, THROUGHPUT_FIELD) for _, record in rows],
                     "training throughput (samples/s)")
    axes[0, 1].set_yticks(np.arange(len(labels)), [""] * len(labels))
    figure.suptitle(_title("Memory and speed vs optimisation settings", records))
    return _save(figure, out_dir / "memory_vs_optimisation.png")


def plot_cost_vs_accuracy_by_precision(records: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Draw test loss vs process-seconds of training, one colour per precision, when the precision varies."""
    rows = _positive_rows(succeeded(records), "training.wallSeconds", PROCESSES_FIELD, LOSS_FIELD)
    precisions = sorted({_flat_config(record).get(PRECISION_FIELD) for record, _ in rows} - {None})
    if len(precisions) < 2:
        return None

    figure, axes = _new_figure()
    axis = axes[0, 0]
    for precision in precisions:
        points = [(values[0] * values[1], values[2]) for record, values in rows
                  if _flat_config(record).get(PRECISION_FIELD) == precision]
        axis.scatter(*zip(*points), label=precision, alpha=0.8)
    axis.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:.3g}")
    axis.xaxis.set_major_formatter(plain)
    axis.xaxis.set_minor_formatter(plain)
    axis.set_xlabel("training cost (wall seconds x processes)")
    axis.set_ylabel(LOSS_LABEL)
    axis.set_title(_title("Cost vs accuracy by precision", records))
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(title="training.precision")
    return _save(figure, out_dir / "cost_vs_accuracy_by_precision.png")


def plot_quality_vs_batch_size(records: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Draw test loss and samples/s vs the global batch size, when it varies."""
    rows = _positive_rows(succeeded(records), "config.training.batchSize", LOSS_FIELD, THROUGHPUT_FIELD)
    if len({values[0] for _, values in rows}) < 2:
        return None

    figure, axes = _new_figure(1, 2)
    for panel, column, y_label in ((0, 1, LOSS_LABEL), (1, 2, "training throughput (samples/s)")):
        axis = axes[0, panel]
        points = sorted((values[0], values[column]) for _, values in rows)
        axis.scatter(*zip(*points), alpha=0.7, label="trials")
        medians = {x: float(np.median([y for a, y in points if a == x])) for x in sorted({a for a, _ in points})}
        axis.plot(list(medians), list(medians.values()), color="black", linewidth=0.8, label="median")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("global batch size (training.batchSize)")
        axis.set_ylabel(y_label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(_title("Quality and throughput vs batch size", records))
    return _save(figure, out_dir / "quality_vs_batch_size.png")


def _layout_label(record: dict[str, Any]) -> str:
    flat = _flat_config(record)
    label = (f"{flat.get('config.distributed.strategy')} {flat.get('config.distributed.nodes')}x"
             f"{flat.get('config.distributed.procsPerNode')}")
    if flat.get("config.distributed.strategy") == "pipeline":
        label += f" {flat.get('config.distributed.pipelineSchedule')} m={flat.get('config.distributed.microbatches')}"
    return label


def plot_communication_by_parallelism(records: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Draw bytes and time of collectives per step and rank, by kind, for each trial that communicated.

    Drawn when the process layout (strategy, nodes, processes, pipeline schedule)
    varies and a trial communicated. Pipeline sends and receives have bytes but no time.
    """
    succeeded_records = succeeded(records)
    talking = [record for record in succeeded_records if (record_number(record, "training.communication.bytes") or 0) > 0]
    if not talking or not _varying(succeeded_records, PARALLELISM_FIELDS):
        return None
    kinds = sorted({kind for record in talking for kind in record_value(record, "training.communication.byKind")})
    labels = [f"#{record.get('index')} {_layout_label(record)}" for record in talking]

    figure, axes = _new_figure(1, 2, width=6.4, height=max(3.0, 0.4 * len(talking) + 1.5))
    positions = np.arange(len(talking))
    for panel, key, scale, x_label in ((0, "bytes", 2.0**-20, "communication per step and rank (MiB)"),
                                       (1, "seconds", 1e3, "collective time per step and rank (ms)")):
        left = np.zeros(len(talking))
        for kind in kinds:
            widths = []
            for record in talking:
                entry = record_value(record, f"training.communication.byKind.{kind}") or {}
                ranks = len(record_value(record, "training.communication.ranks") or [None])
                steps = record_number(record, "training.stepTime.steps") or record_number(record, "training.steps")
                value = entry.get(key)
                widths.append(value * scale / ranks / steps if value is not None and steps else 0.0)
            axes[0, panel].barh(positions, widths, left=left, label=kind)
            left += widths
        axes[0, panel].set_yticks(positions, labels if panel == 0 else [""] * len(labels), fontsize="x-small")
        axes[0, panel].invert_yaxis()
        axes[0, panel].set_xlabel(x_label)
        axes[0, panel].grid(True, axis="x", alpha=0.3)
        axes[0, panel].legend(fontsize="x-small", title="collective")
    figure.suptitle(_title("Communication by parallelism (strategy nodes x processes per node)", records))
    return _save(figure, out_dir / "communication_by_parallelism.png")


# Compute-optimal allocation ------------------------------------------------------


def compute_optimal_analysis(fits: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return the compute-optimal analysis of fit_study's dict, or None when it was not run or gave a note."""
    analysis = (fits or {}).get("computeOptimal")
    return analysis if isinstance(analysis, dict) and "approach2" in analysis else None


def _numbers(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if value is None else value for value in values], dtype=float)


def _budget_colour(budgets: Sequence[float]) -> Callable[[float], Any]:
    if len(budgets) < 2:
        return lambda budget: colormaps["viridis"](0.4)
    norm = LogNorm(min(budgets), max(budgets))
    return lambda budget: colormaps["viridis"](0.85 * float(norm(budget)))


def _interval_error(estimate: dict[str, Any] | None) -> list[list[float]] | None:
    """Return matplotlib's [[below], [above]] error bar of an estimate dict, or None without an interval."""
    if not estimate or None in (estimate.get("value"), estimate.get("low"), estimate.get("high")):
        return None
    value = estimate["value"]
    return [[max(value - estimate["low"], 0.0)], [max(estimate["high"] - value, 0.0)]]


def _limit_log_axis(set_limits: Callable[[float, float], Any], values: Sequence[float], margin: float) -> None:
    """Limit a log axis to the positive finite `values` widened by the factor `margin`, so that wide intervals
    do not squash the data."""
    finite = [value for value in values if value is not None and math.isfinite(value) and value > 0]
    if finite:
        set_limits(min(finite) / margin, max(finite) * margin)


def _log_ticks_for_range(axis: Any) -> None:
    """Label the y axis with plain numbers when it spans at most two decades (too many labels otherwise)."""
    low, high = axis.get_ylim()
    if low > 0 and high / low <= 100:
        _plain_log_ticks(axis)


def _shade_extrapolation(axis: Any, largest_budget: float, last_flops: float) -> None:
    axis.axvspan(largest_budget, last_flops, color="gray", alpha=0.1, linewidth=0)
    axis.axvline(largest_budget, color="gray", linestyle=":", linewidth=1)
    axis.text(largest_budget * 1.15, 0.97, "extrapolation", transform=axis.get_xaxis_transform(),
              va="top", fontsize="small", color="dimgray")


def plot_isoflop_profiles(
    records: Sequence[dict[str, Any]], out_dir: Path, fits: dict[str, Any] | None = None
) -> Path | None:
    """Draw test loss vs parameters at each compute budget, with the fitted parabolas and their minima."""
    analysis = compute_optimal_analysis(fits)
    if analysis is None:
        return None
    profiles = analysis["approach2"]["profiles"]
    colour_of = _budget_colour([profile["budget"] for profile in profiles])
    confidence = round(100 * float(analysis["approach2"].get("confidence", 0.95)))

    figure, axes = _new_figure(width=7.2, height=4.8)
    axis = axes[0, 0]
    for profile in profiles:
        colour = colour_of(profile["budget"])
        params, loss = np.array(profile["params"]), np.array(profile["loss"])
        axis.scatter(params, loss, color=colour, zorder=3, label=f"C = {profile['budget']:.3g} FLOPs")

        # The parabola over the sampled sizes and a little beyond, where it stays positive.
        centre = profile["parabola"]["centre"]
        c0, c1, c2 = profile["parabola"]["coefficients"]
        grid = np.exp(np.linspace(math.log(params.min()) - 0.25, math.log(params.max()) + 0.25, 120))
        u = np.log(grid) - centre
        curve = c0 + c1 * u + c2 * u * u
        keep = curve > 0
        axis.plot(grid[keep], curve[keep], color=colour, linewidth=1.1)

        optimum, loss_opt = profile.get("paramsOpt"), profile.get("lossOpt")
        if optimum and loss_opt and optimum.get("value") and (loss_opt.get("value") or 0) > 0:
            axis.errorbar([optimum["value"]], [loss_opt["value"]], xerr=_interval_error(optimum), marker="*",
                          markersize=13, color=colour, markeredgecolor="black", capsize=3, zorder=4, linestyle="none")

    axis.set_xscale("log")
    axis.set_yscale("log")
    all_params = [value for profile in profiles for value in profile["params"]]
    all_loss = [value for profile in profiles for value in profile["loss"]]
    _limit_log_axis(axis.set_xlim, all_params, 3.0)
    _limit_log_axis(axis.set_ylim, all_loss, 1.5)
    _log_ticks_for_range(axis)
    axis.set_xlabel(_params_label(analysis.get("paramsField", PARAMS_FIELDS[0])))
    axis.set_ylabel(LOSS_LABEL)
    axis.set_title(_title("IsoFLOP profiles: loss vs size at fixed compute", records))
    axis.grid(True, which="both", alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="*", markersize=11, color="gray", markeredgecolor="black", linestyle="none"))
    labels.append(f"parabola minimum ({confidence} % interval)")
    axis.legend(handles, labels, fontsize="small")
    return _save(figure, out_dir / "isoflop_profiles.png")


def plot_compute_optimal(
    records: Sequence[dict[str, Any]], out_dir: Path, fits: dict[str, Any] | None = None
) -> Path | None:
    """Draw N_opt and D_opt vs compute: the profile minima and both approaches' power laws with intervals."""
    analysis = compute_optimal_analysis(fits)
    if analysis is None or "fan" not in analysis:
        return None
    profiles = analysis["approach2"]["profiles"]
    fan = analysis["fan"]
    flops = np.array(fan["flops"])
    exponents = analysis.get("exponents", {})
    largest = max(profile["budget"] for profile in profiles)

    figure, axes = _new_figure(1, 2, width=6.0, height=4.6)
    panels = (("params", "paramsOpt", "a", _params_label(analysis.get("paramsField", PARAMS_FIELDS[0]))),
              ("samples", "samplesOpt", "b", SAMPLES_LABEL))
    for axis, (key, profile_key, exponent, label) in zip(axes[0], panels):
        for name, colour, style, title in (("approach2", "tab:blue", "-", "approach 2 (IsoFLOP minima)"),
                                           ("approach3", "tab:red", "--", "approach 3 (L(N, D) fit)")):
            columns = fan.get(name)
            if not columns or key not in columns:
                continue
            value = ((exponents.get(name) or {}).get(exponent) or {}).get("value")
            legend = f"{title}, {exponent} = {value:.3f}" if value is not None else title
            axis.plot(flops, _numbers(columns[key]), color=colour, linestyle=style, label=legend)
            low, high = _numbers(columns[f"{key}Low"]), _numbers(columns[f"{key}High"])
            if np.isfinite(low).any():
                axis.fill_between(flops, low, high, color=colour, alpha=0.15, linewidth=0)
        for profile in profiles:
            estimate = profile.get(profile_key)
            if estimate and estimate.get("value"):
                axis.errorbar([profile["budget"]], [estimate["value"]], yerr=_interval_error(estimate), marker="o",
                              color="black", capsize=3, linestyle="none", zorder=4)
        _shade_extrapolation(axis, largest, flops[-1])
        axis.set_xscale("log")
        axis.set_yscale("log")
        central = [value for name in ("approach2", "approach3") for value in (fan.get(name) or {}).get(key, [])]
        central += [(profile.get(profile_key) or {}).get("value") for profile in profiles]
        _limit_log_axis(axis.set_ylim, central, 10.0)
        axis.set_xlabel(FLOPS_LABEL)
        axis.set_ylabel(f"compute-optimal {label}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small", loc="upper left")
    figure.suptitle(_title("Compute-optimal size and data vs compute (dots: profile minima)", records))
    return _save(figure, out_dir / "compute_optimal.png")


def plot_extrapolation_fan(
    records: Sequence[dict[str, Any]], out_dir: Path, fits: dict[str, Any] | None = None
) -> Path | None:
    """Draw the predicted compute-optimal loss vs compute with its interval, beyond the largest budget."""
    analysis = compute_optimal_analysis(fits)
    columns = (analysis or {}).get("fan", {}).get("approach3")
    if analysis is None or not columns:
        return None
    profiles = analysis["approach2"]["profiles"]
    flops = np.array(analysis["fan"]["flops"])
    largest = max(profile["budget"] for profile in profiles)
    confidence = round(100 * float((analysis.get("approach3") or {}).get("confidence", 0.95)))

    figure, axes = _new_figure(width=7.2, height=4.8)
    axis = axes[0, 0]
    minimum_label = "IsoFLOP minimum"
    for profile in profiles:
        axis.scatter(np.full(len(profile["loss"]), profile["budget"]), profile["loss"], color="tab:gray", s=14,
                     alpha=0.7, label="trials" if profile is profiles[0] else None)
        optimum = profile.get("lossOpt")
        if optimum and (optimum.get("value") or 0) > 0:
            axis.errorbar([profile["budget"]], [optimum["value"]], yerr=_interval_error(optimum), marker="*",
                          markersize=11, color="tab:blue", markeredgecolor="black", capsize=3, linestyle="none",
                          label=minimum_label, zorder=4)
            minimum_label = None
    axis.plot(flops, _numbers(columns["loss"]), color="tab:red", label="approach 3: loss at the optimal N, D")
    low, high = _numbers(columns["lossLow"]), _numbers(columns["lossHigh"])
    if np.isfinite(low).any():
        axis.fill_between(flops, low, high, color="tab:red", alpha=0.15, linewidth=0,
                          label=f"{confidence} % interval (bootstrap over trials)")
    for entry in analysis.get("extrapolation", []):
        loss = (entry.get("approach3") or {}).get("loss")
        if loss and loss.get("value"):
            axis.errorbar([entry["flops"]], [loss["value"]], yerr=_interval_error(loss), marker="D", color="tab:red",
                          markeredgecolor="black", capsize=4, linestyle="none", zorder=4)
            axis.annotate(f"{entry['factor']:.0f}x: {loss['value']:.3g}", (entry["flops"], loss["value"]),
                          textcoords="offset points", xytext=(-10, 10), ha="right", fontsize="small")
    _shade_extrapolation(axis, largest, flops[-1])
    axis.set_xscale("log")
    axis.set_yscale("log")
    observed = [value for profile in profiles for value in profile["loss"]]
    _limit_log_axis(axis.set_ylim, observed + [value for value in columns["loss"] if value is not None], 2.0)
    _log_ticks_for_range(axis)
    axis.set_xlabel(FLOPS_LABEL)
    axis.set_ylabel(LOSS_LABEL)
    axis.set_title(_title("Extrapolation of the compute-optimal loss", records))
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize="small")
    return _save(figure, out_dir / "extrapolation_fan.png")


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
        "isoflopProfiles": lambda: plot_isoflop_profiles(records, out_dir, fits),
        "computeOptimal": lambda: plot_compute_optimal(records, out_dir, fits),
        "extrapolationFan": lambda: plot_extrapolation_fan(records, out_dir, fits),
        "throughputVsProcesses": lambda: plot_throughput_vs_processes(records, out_dir),
        "throughputVsNodes": lambda: plot_throughput_vs_nodes(records, out_dir),
        "memoryVsOptimisation": lambda: plot_memory_vs_optimisation(records, out_dir),
        "costVsAccuracyByPrecision": lambda: plot_cost_vs_accuracy_by_precision(records, out_dir),
        "qualityVsBatchSize": lambda: plot_quality_vs_batch_size(records, out_dir),
        "communicationByParallelism": lambda: plot_communication_by_parallelism(records, out_dir),
    }
    written = {}
    for name, make in makers.items():
        path = make()
        if path is not None:
            written[name] = path
    logger.info("wrote %d figures to %s", len(written), out_dir)
    return written
