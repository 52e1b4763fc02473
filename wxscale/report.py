"""The study report: report.md, trials.csv and the figures under plots/.

`write_report` is the one entry point that writes files. `format_table` renders the
trials for a terminal. Failed trials appear in every table with their error, but
the fits and figures leave them out.
"""

from __future__ import annotations

import csv
import io
import math
import logging
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from wxscale import __version__
from wxscale.fit import FIT_NAMES, MIN_BOOTSTRAP_FITS, fit_study, record_number, record_value
from wxscale.plots import (
    BASELINES,
    atomic_path,
    format_si,
    is_synthetic,
    scaling_efficiency,
    skill_ratio,
    succeeded,
    variable_units,
    variables,
    write_plots,
)

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"
CSV_NAME = "trials.csv"
PLOTS_DIR = "plots"

FIT_TITLES = {
    "lossVsParams": "Loss vs parameters",
    "lossVsSamples": "Loss vs training samples",
    "lossVsFlops": "Loss vs compute",
    "lossVsParamsAndSamples": "Loss vs parameters and samples (Chinchilla form)",
}
FIGURE_CAPTIONS = {
    "lossVsFlops": "Test loss vs training compute, with the compute frontier and the fitted power law",
    "lossVsParams": "Test loss vs model size, one line per data size",
    "lossVsSamples": "Test loss vs data size, one line per model size",
    "metrics": "Test RMSE and MAE vs model size and compute, per variable",
    "skill": "Model RMSE / baseline RMSE per trial (below 1.0 beats the baseline)",
    "costVsEmbedDim": "Peak memory and inference latency vs embedding width",
    "costVsHistory": "Peak memory and inference latency vs input history",
    "trainingCurves": "Training and validation loss per trial",
    "isoflopProfiles": "IsoFLOP profiles: test loss vs model size at each compute budget, parabolas and minima",
    "computeOptimal": "Compute-optimal model size and training samples vs compute, both approaches with intervals",
    "extrapolationFan": "Predicted compute-optimal test loss vs compute with its interval beyond the largest budget",
    "throughputVsProcesses": "Training throughput and scaling efficiency vs processes",
    "throughputVsNodes": "Training throughput and scaling efficiency vs nodes",
    "memoryVsOptimisation": "Peak training memory and throughput per optimisation setting",
    "costVsAccuracyByPrecision": "Test loss vs training cost (wall seconds x processes) by precision",
    "qualityVsBatchSize": "Test loss and throughput vs global batch size",
    "communicationByParallelism": "Collective bytes and time per step and rank, by kind and parallel layout",
}


# Record helpers ------------------------------------------------------------------


def _sorted(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda record: (record.get("index") is None, record.get("index") or 0))


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    """Flatten nested mappings into {'a.b.c': scalar}; scalar lists are joined with ';', others dropped."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(value, list):
        if all(not isinstance(item, (dict, list)) for item in value):
            return {prefix: ";".join(str(item) for item in value)}
        return {}
    return {prefix: value}


def format_axis_values(record: dict[str, Any]) -> str:
    """Render axisValues as 'size: model.depth=2, model.heads=2; data.datasetFraction=0.5'."""
    parts = []
    for name, value in (record.get("axisValues") or {}).items():
        if isinstance(value, dict):
            inner = ", ".join(f"{field}={item}" for field, item in value.items())
            parts.append(f"{name}: {inner}")
        else:
            parts.append(f"{name}={value}")
    return "; ".join(parts) or "-"


def generalization_gap(record: dict[str, Any]) -> float | None:
    """Return final validation loss - final training loss of a trial."""
    gap = record_number(record, "training.generalizationGap")
    if gap is not None:
        return gap
    train = record_number(record, "training.finalTrainLoss")
    validation = record_number(record, "training.finalValidationLoss")
    return None if train is None or validation is None else validation - train


def best_trial(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Return the succeeded trial with the lowest test loss, or None."""
    candidates = [record for record in succeeded(records) if record_number(record, "evaluation.testLoss") is not None]
    return min(candidates, key=lambda record: record_number(record, "evaluation.testLoss")) if candidates else None


def _format_number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


# trials.csv ----------------------------------------------------------------------


def flatten_record(record: dict[str, Any]) -> dict[str, Any]:
    """Return one CSV row of a trial: identity, axis values and every scalar metric.

    Columns are dotted paths of the record (`training.samples`,
    `evaluation.variables.tracer.model.rmse`), axis values are `axis.<name>[.<field>]`,
    and the training curve and the full trial config are left out.
    """
    row: dict[str, Any] = {
        "index": record.get("index"),
        "trial": record.get("trial"),
        "state": record.get("state"),
        "error": record.get("error"),
        "attempts": record.get("attempts"),
    }
    row.update(_flatten(record.get("axisValues") or {}, "axis"))
    for section in ("data", "model", "training", "inference", "evaluation"):
        content = record.get(section) or {}
        row.update(_flatten(content, section))
    return row


def trials_csv(records: Sequence[dict[str, Any]]) -> str:
    """Render the trials as CSV text, one row per trial; missing values are empty cells."""
    rows = [flatten_record(record) for record in _sorted(records)]
    columns: list[str] = []
    for row in rows:
        columns.extend(column for column in row if column not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


# Terminal table ------------------------------------------------------------------


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """Render the trials as a fixed-width text table for a terminal.

    Columns: index, trial id, state, parameters, training samples, FLOPs, test loss,
    validation - train gap, then the axis values, or the error of a failed trial.
    """
    header = ["#", "trial", "state", "params", "samples", "FLOPs", "test loss", "gap", "axis values / error"]
    numeric = {0, 3, 4, 5, 6, 7}
    rows = []
    for record in _sorted(records):
        error = record.get("error")
        last = format_axis_values(record)
        if record.get("state") != "Succeeded" and error:
            first_line = str(error).splitlines()[0] if str(error).strip() else str(error)
            last = f"error: {first_line[:80]}"
        rows.append(
            [
                str(record.get("index", "-")),
                str(record.get("trial", "-")),
                str(record.get("state", "-")),
                format_si(record_number(record, "model.params")),
                format_si(record_number(record, "training.samples")),
                _format_number(record_number(record, "training.flopsAnalytic"), 3),
                _format_number(record_number(record, "evaluation.testLoss")),
                _format_number(generalization_gap(record), 3),
                last,
            ]
        )

    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, None, *rows]:
        if row is None:
            lines.append("  ".join("-" * width for width in widths))
            continue
        cells = [cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# report.md -----------------------------------------------------------------------


def _cell(text: Any) -> str:
    """Escape a value for a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip() or "-"


def _value_range(values: Iterable[Any]) -> str:
    numbers = sorted({value for value in values if isinstance(value, (int, float)) and not isinstance(value, bool)})
    if not numbers:
        return "?"
    return f"{numbers[0]:g}" if len(numbers) == 1 else f"{numbers[0]:g}-{numbers[-1]:g}"


def _data_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """Describe the data source(s) of the trials, one line per distinct source, variables and grid."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        data = record.get("data")
        if data:
            key = (data.get("source"), tuple(data.get("variables") or ()), tuple(data.get("grid") or ()))
            groups.setdefault(key, []).append(data)
    if not groups:
        return ["- Data: no trial recorded its data source."]

    lines = []
    for (source, names, grid), described in groups.items():
        first = described[0]
        origin = "synthetic (advection-diffusion simulation)" if first.get("synthetic") else f"`{source}`"
        units = first.get("units") or {}
        listed = ", ".join(f"{name} [{units.get(name, '?')}]" for name in names) or "?"
        shape = " x ".join(str(size) for size in grid) or "?"
        samples = "/".join(
            _value_range(data.get(key) for data in described)
            for key in ("trainSamples", "validationSamples", "testSamples")
        )
        lead = _value_range(data.get("leadTimeHours") for data in described)
        lines.append(
            f"- Data: {origin}; variables {listed}; grid {shape} (lat x lon); lead time {lead} h; "
            f"samples train/validation/test {samples}"
        )
    return lines


def _params_text(record: dict[str, Any]) -> str:
    """Render the total parameter count, as in the trials table, with the non-embedding count the fits use."""
    text = f"{format_si(record_number(record, 'model.params'))} parameters"
    non_embedding = record_number(record, "model.nonEmbeddingParams")
    return text if non_embedding is None else f"{text} ({format_si(non_embedding)} non-embedding)"


def _summary_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    counts = Counter(str(record.get("state", "unknown")) for record in records)
    states = ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))
    lines = ["## Summary", "", f"- Trials: {len(records)} ({states or 'none'})"]
    lines.extend(_data_lines(records))
    best = best_trial(records)
    if best is None:
        lines.append("- Best trial: none (no succeeded trial has a test loss)")
    else:
        lines.append(
            f"- Best trial: #{best.get('index')} `{best.get('trial')}`, test loss "
            f"{_format_number(record_number(best, 'evaluation.testLoss'))}, {_params_text(best)}, "
            f"{format_si(record_number(best, 'training.samples'))} samples, "
            f"{_format_number(record_number(best, 'training.flopsAnalytic'), 3)} FLOPs "
            f"({format_axis_values(best)})"
        )
    lines.append(
        "- Loss: `evaluation.testLoss`, the latitude-weighted MSE of the normalised fields on the test split."
    )
    if is_synthetic(records):
        lines.append("- The data are synthetic: the numbers test the pipeline, not weather-forecast skill.")
    return lines


def _trial_table_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    names = variables(records)
    units = {name: variable_units(records, name) for name in names}
    header = ["#", "trial", "state", "axis values", "params", "samples", "FLOPs", "test loss"]
    for name in names:
        header += [f"{name} RMSE ({units[name]})", f"{name} / persistence", f"{name} / climatology"]
    header += ["val - train loss", "error"]

    lines = ["## Trials", "", "RMSE ratios are model RMSE / baseline RMSE; below 1 the model beats the baseline.", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for record in _sorted(records):
        row = [
            record.get("index", "-"),
            f"`{record.get('trial', '-')}`",
            record.get("state", "-"),
            format_axis_values(record),
            format_si(record_number(record, "model.params")),
            format_si(record_number(record, "training.samples")),
            _format_number(record_number(record, "training.flopsAnalytic"), 3),
            _format_number(record_number(record, "evaluation.testLoss")),
        ]
        for name in names:
            row.append(_format_number(record_number(record, f"evaluation.variables.{name}.model.rmse")))
            row += [_format_number(skill_ratio(record, name, baseline), 3) for baseline in BASELINES]
        row.append(_format_number(generalization_gap(record), 3))
        row.append(record.get("error") or "")
        lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
    return lines


def loader_mode(record: dict[str, Any]) -> str:
    """Return how a trial read its training data: 'memory', 'stream', or '-' when the record does not tell.

    Trainers record the path they took in `data.loader`. For older records the
    configured mode is shown instead, so an 'auto' trial shows 'auto'. The synthetic
    source is generated in memory whatever `spec.data.loader.mode` is.
    """
    recorded = record_value(record, "data.loader")
    if recorded:
        return str(recorded)
    if record_value(record, "data.synthetic"):
        return "memory"
    mode = record_value(record, "config.data.loader.mode")
    return str(mode) if mode else "-"


def _compute_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """Render the process layout and efficiency of each succeeded trial that recorded them; [] when none did."""
    measured = [record for record in succeeded(records) if record_value(record, "training.parallelism")]
    if not measured:
        return []
    efficiency = scaling_efficiency(records)
    header = ["#", "trial", "layout", "precision", "act. ckpt", "samples/s", "scaling eff.", "loader",
              "data wait % of wall", "MFU", "HFU", "peak MiB", "comm MiB/step/rank", "checkpoint MB", "write s",
              "storage MB"]
    lines = [
        "## Compute and efficiency",
        "",
        "Layout is strategy nodes x processes per node. Scaling efficiency is samples/s / (processes x samples/s of "
        "the one-process trial with the same config apart from `distributed`). MFU and HFU divide model and "
        "hardware FLOP/s (hardware FLOPs add recomputation) by the peak of all processes; on CPU the peak is a "
        "measured matmul rate. Peak memory is rank 0's.",
        "",
        "Loader is the path the training split took: 'stream' reads it from storage while training, 'memory' "
        "loads it first. Records of older trainers lack it and show `spec.data.loader.mode`, 'auto' included. "
        "Data wait is "
        "rank 0's time waiting for training batches divided by the wall time of the training loop, validation and "
        "checkpoint writes included, over all attempts (`training.dataWaitFraction`). "
        "`training.stepTime.dataFraction` in trials.csv divides the last attempt's wait by its summed step time "
        "(data wait, forward-backward and optimizer) and leaves validation out, so it is a little larger.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for record in _sorted(measured):
        config = record.get("config") or {}
        layout = config.get("distributed") or {}
        training = config.get("training") or {}
        communication = record_number(record, "training.communication.bytesPerStepPerRank")
        checkpoint = record_number(record, "training.checkpoint.lastBytes")
        storage = record_number(record, "training.storageBytes")
        peak = record_number(record, "training.peakMemoryBytes")
        data_wait = record_number(record, "training.dataWaitFraction")
        row = [
            record.get("index", "-"),
            f"`{record.get('trial', '-')}`",
            f"{layout.get('strategy', '-')} {layout.get('nodes', '-')}x{layout.get('procsPerNode', '-')}",
            training.get("precision", "-"),
            "on" if training.get("activationCheckpointing") else "off",
            _format_number(record_number(record, "training.samplesPerSecond"), 4),
            _format_number(efficiency.get(str(record.get("trial"))), 3),
            loader_mode(record),
            _format_number(100 * data_wait if data_wait is not None else None, 2),
            _format_number(record_number(record, "training.mfu"), 3),
            _format_number(record_number(record, "training.hfu"), 3),
            _format_number(peak / 2**20 if peak is not None else None, 4),
            _format_number(communication / 2**20 if communication is not None else None, 3),
            _format_number(checkpoint / 1e6 if checkpoint is not None else None, 3),
            _format_number(record_number(record, "training.checkpoint.meanWriteSeconds"), 3),
            _format_number(storage / 1e6 if storage is not None else None, 3),
        ]
        lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
    return lines


def _estimate_text(entry: dict[str, Any]) -> tuple[str, str, str]:
    return tuple(_format_number(entry.get(key)) for key in ("value", "low", "high"))  # type: ignore[return-value]


def _fit_lines(fits: dict[str, Any]) -> list[str]:
    lines = ["## Scaling-law fits", ""]
    lines.append(
        "Fitted to the test loss of the succeeded trials with a Huber loss (delta 1e-3) on log residuals, "
        "L-BFGS-B from a grid of starts (Hoffmann et al. 2022, approach 3). Intervals are bootstrap "
        "percentiles over trials."
    )
    for name in FIT_NAMES:
        fit = fits.get(name)
        lines += ["", f"### {FIT_TITLES[name]}", ""]
        if fit is None:
            lines.append("Not fitted: no result was given for this fit.")
            continue
        if "note" in fit:
            lines.append(f"Not fitted: {fit['note']}.")
            continue

        state = "converged" if fit.get("converged") else "NOT converged"
        confidence = round(100 * float(fit.get("confidence", 0.95)))
        lines.append(
            f"`{fit.get('formula')}` with x = {', '.join(f'`{field}`' for field in fit.get('inputs', []))}, "
            f"on {fit.get('subset', 'all trials')}: {fit.get('nPoints')} points, {state} "
            f"({fit.get('message')}; {fit.get('nStartsConverged')} of {fit.get('nStarts')} starts converged), "
            f"{fit.get('nBootstrapConverged')} of {fit.get('nBootstrap')} bootstrap refits converged."
        )
        missing = [name for name, entry in fit.get("parameters", {}).items() if entry.get("low") is None]
        if (fit.get("nBootstrapConverged") or 0) < MIN_BOOTSTRAP_FITS:
            lines.append(
                f"\nNo intervals: they need at least {MIN_BOOTSTRAP_FITS} converged bootstrap refits. "
                "Resamples that repeat trials often lack enough distinct points, so add trials with distinct values."
            )
        elif missing:
            lines.append(
                f"\nNo intervals for {', '.join(missing)}: every usable bootstrap resample gave the same fit, which "
                "happens when there is just one more trial than the law has parameters. Add trials with distinct values."
            )
        lines += ["", f"| parameter | value | {confidence} % low | {confidence} % high |", "|---|---|---|---|"]
        for parameter, entry in fit.get("parameters", {}).items():
            lines.append(f"| {parameter} | " + " | ".join(_estimate_text(entry)) + " |")
        if fit.get("atBound"):
            lines.append(
                f"\nAt the edge of the search: {', '.join(fit['atBound'])}. Exponents are searched in [0, 10] and an "
                "offset E near 0 means the data do not pin down an irreducible loss, so these numbers are limits of "
                "the search, not estimates. Trials over a wider range of sizes or lengths would constrain them."
            )

        optimal = fit.get("computeOptimal")
        if optimal:
            lines += ["", f"Compute-optimal allocation: `{optimal.get('formula')}`, C = k N D.", ""]
            lines += [f"| quantity | value | {confidence} % low | {confidence} % high |", "|---|---|---|---|"]
            for key in ("a", "b", "G"):
                lines.append(f"| {key} | " + " | ".join(_estimate_text(optimal[key])) + " |")
            k = optimal.get("k") or {}
            if k.get("value") is not None:
                lines.append(
                    f"\nk = {_format_number(k['value'])} FLOPs per parameter per sample "
                    f"(median of C / (N D) over the trials; range {_format_number(k.get('min'))} to "
                    f"{_format_number(k.get('max'))})."
                )
    return lines


def _figure_lines(figures: dict[str, Path], out_dir: Path) -> list[str]:
    lines = ["## Figures", ""]
    if not figures:
        return lines + ["No figure: the trials do not vary enough, or none succeeded."]
    for name, path in figures.items():
        relative = path.relative_to(out_dir).as_posix()
        caption = FIGURE_CAPTIONS.get(name, name)
        lines += [f"![{caption}]({relative})", ""]
    return lines


# Compute-optimal allocation -------------------------------------------------------


def _estimate_cell(entry: dict[str, Any] | None, count: bool = False) -> str:
    """Render an estimate dict as 'value [low, high]'; counts get SI suffixes (34.5k)."""
    if not entry or entry.get("value") is None:
        return "-"

    def show(value: float | None) -> str:
        return format_si(value) if count else _format_number(value, 3)

    if entry.get("low") is None or entry.get("high") is None:
        return f"{show(entry['value'])} (no interval)"
    return f"{show(entry['value'])} [{show(entry['low'])}, {show(entry['high'])}]"


def _recommendation_lines(analysis: dict[str, Any], confidence: int) -> list[str]:
    recommendation = analysis.get("recommendation") or {}
    if "method" not in recommendation:
        return [f"No recommendation: {recommendation.get('note', 'neither approach gave an allocation')}."]
    line = (
        f"**Recommendation** for the next budget, {recommendation['flops']:.3g} FLOPs ({recommendation['method']}, "
        f"{confidence} % intervals): N = {_estimate_cell(recommendation.get('params'), count=True)} "
        f"{'non-embedding ' if analysis.get('paramsField') == 'model.nonEmbeddingParams' else ''}parameters, "
        f"D = {_estimate_cell(recommendation.get('samples'), count=True)} training samples"
    )
    if recommendation.get("loss"):
        line += f", predicted test loss {_estimate_cell(recommendation['loss'])}"
    second = recommendation.get("approach2")
    if second and recommendation["method"] != "approach 2":
        line += (f". Approach 2 gives N = {_estimate_cell(second.get('params'), count=True)}, "
                 f"D = {_estimate_cell(second.get('samples'), count=True)}")
    return [line + ". The next budget is the largest budget times the step between the last two."]


def _profile_lines(analysis: dict[str, Any], confidence: int) -> list[str]:
    approach2 = analysis["approach2"]
    lines = [
        "### IsoFLOP profiles (approach 2)",
        "",
        "At each budget a parabola in ln N is fitted to the test loss; its minimum gives N_opt, and "
        "D_opt = C / FLOPs per sample at N_opt. Intervals come from a wild bootstrap that flips the sign of each "
        "trial's residual. Position places the minimum in the trained sizes: -1 at the smallest, +1 at the largest.",
        "",
        f"| budget (FLOPs) | trials | sizes (N) | N_opt ({confidence} %) | D_opt ({confidence} %) | loss at minimum | "
        "position |",
        "|---|---|---|---|---|---|---|",
    ]
    for profile in approach2["profiles"]:
        position = profile.get("position")
        where = "-" if position is None else f"{position:+.2f}"
        if not profile.get("hasMinimum"):
            where = "no minimum: the parabola curves down"
        elif position is not None and abs(position) > 1:
            where += " (outside)"
        elif profile.get("offCentre"):
            where += " (off-centre)"
        sizes = f"{format_si(min(profile['params']))}-{format_si(max(profile['params']))}"
        lines.append(
            f"| {profile['budget']:.3g} | {len(profile['trials'])} | {sizes} | "
            f"{_estimate_cell(profile.get('paramsOpt'), count=True)} | "
            f"{_estimate_cell(profile.get('samplesOpt'), count=True)} | {_estimate_cell(profile.get('lossOpt'))} | "
            f"{where} |"
        )
    lines.append("")
    if approach2.get("a"):
        lines.append(
            f"Power laws on the minima: N_opt = G_N C^a with a = {_estimate_cell(approach2['a'])}, "
            f"D_opt = G_D C^b with b = {_estimate_cell(approach2['b'])}."
        )
    else:
        lines.append(f"No power law: {approach2.get('note', 'too few profiles with a minimum')}.")
    return lines + _bias_lines(analysis)


def _bias_lines(analysis: dict[str, Any]) -> list[str]:
    """State approach 2's known bias when the sizes are not centred on the optimum, with its estimate."""
    off_centre = analysis.get("offCentreBudgets") or []
    bias = analysis.get("gridBias") or {}
    estimate = ""
    if bias.get("budgets"):
        worst = max(bias["budgets"], key=lambda entry: abs(entry["relativeError"]))
        estimate = (
            f" Applied to the noise-free approach-3 surface at the same sizes, the parabola misplaces N_opt by up to "
            f"{100 * worst['relativeError']:+.1f} % (at {worst['budget']:.3g} FLOPs)"
        )
        if bias.get("exponentError") is not None:
            estimate += f" and shifts the exponent a by {bias['exponentError']:+.3f}"
        estimate += "."
    if off_centre:
        return ["", (
            "**Bias of approach 2:** the trained sizes are not centred on the optimum at budgets "
            + ", ".join(f"{budget:.3g}" for budget in off_centre)
            + ". A parabola in ln N is symmetric but the IsoFLOP profile is not, so its minimum moves with where the "
            "sizes sit and how wide they span." + estimate
        )]
    return ["", f"The trained sizes are centred on the optimum at every budget.{estimate}"] if estimate else []


def _agreement_lines(analysis: dict[str, Any], confidence: int) -> list[str]:
    agreement = analysis.get("agreement") or {}
    exponents = (analysis.get("exponents") or {}).get("approach3") or {}
    lines = [
        "### Agreement of approaches 2 and 3",
        "",
        f"Approach 3 fits L(N, D) = E + A/N^alpha + B/D^beta to every point (alpha = "
        f"{_estimate_cell(exponents.get('alpha'))}, beta = {_estimate_cell(exponents.get('beta'))}) and gives "
        "a = beta/(alpha+beta), b = alpha/(alpha+beta).",
        "",
        f"| exponent | approach 2 ({confidence} %) | approach 3 ({confidence} %) | intervals overlap |",
        "|---|---|---|---|",
    ]
    for name, label in (("a", "a (N_opt ~ C^a)"), ("b", "b (D_opt ~ C^b)")):
        entry = agreement.get(name) or {}
        overlap = {True: "yes", False: "**no**", None: "not checked (no interval)"}[entry.get("intervalsOverlap")]
        lines.append(
            f"| {label} | {_estimate_cell(entry.get('approach2'))} | {_estimate_cell(entry.get('approach3'))} | "
            f"{overlap} |"
        )
    if agreement.get("warning"):
        lines += ["", f"**Warning:** {agreement['warning']}."]
    return lines


def _extrapolation_lines(analysis: dict[str, Any], confidence: int) -> list[str]:
    lines = [
        "### Extrapolation",
        "",
        "**These budgets lie beyond the largest trained budget: the numbers are extrapolations of the fitted laws, "
        "not measurements.** Approach 3 assumes C = k N D with k the median over the points.",
        "",
        f"| budget (FLOPs) | x largest | N_opt, approach 3 | D_opt, approach 3 | loss, approach 3 | N_opt, approach 2 "
        f"| D_opt, approach 2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in analysis.get("extrapolation") or []:
        third = entry.get("approach3") or {}
        second = entry.get("approach2") or {}
        lines.append(
            f"| {entry['flops']:.3g} | {entry['factor']:.0f} | {_estimate_cell(third.get('params'), count=True)} | "
            f"{_estimate_cell(third.get('samples'), count=True)} | {_estimate_cell(third.get('loss'))} | "
            f"{_estimate_cell(second.get('params'), count=True)} | "
            f"{_estimate_cell(second.get('samples'), count=True)} |"
        )
    lines.append(f"\nIntervals are {confidence} % bootstrap percentiles; they cover the fit's noise, not a change "
                 "of regime beyond the trained budgets.")
    return lines


def _held_out_lines(analysis: dict[str, Any]) -> list[str]:
    held_out = analysis.get("heldOut") or {}
    lines = ["### Held-out budget", ""]
    if "note" in held_out:
        return lines + [f"Not run: {held_out['note']}."]
    fitted_on = ", ".join(f"{budget:.3g}" for budget in held_out.get("fittedOn", []))
    count = len(held_out["points"])
    line = (
        f"Fitted on the budgets {fitted_on} and predicting the {count} trials at {held_out['budget']:.3g} "
        f"FLOPs, approach 3 misses their test loss by {100 * held_out['meanAbsoluteRelativeError']:.1f} % on average "
        f"({100 * held_out['maxAbsoluteRelativeError']:.1f} % at most); {held_out['nInsideInterval']} of "
        f"{count} observed losses lie inside the interval of the fitted law, which leaves out the "
        "noise of single trials."
    )
    observed = next((profile.get("paramsOpt") for profile in analysis["approach2"]["profiles"]
                     if math.isclose(profile["budget"], held_out["budget"], rel_tol=1e-9)), None)
    predictions = [f"approach 3 {format_si(held_out['approach3ParamsOpt'])}"]
    if held_out.get("approach2ParamsOpt") is not None:
        predictions.insert(0, f"approach 2 {format_si(held_out['approach2ParamsOpt'])}")
    if observed and observed.get("value"):
        line += (f" N_opt predicted there: {', '.join(predictions)}; the full-data profile minimum is "
                 f"{format_si(observed['value'])}.")
    return lines + [line]


def _per_variable_lines(analysis: dict[str, Any]) -> list[str]:
    entries = analysis.get("perVariable")
    lines = ["### Per variable and lead time", ""]
    if isinstance(entries, dict):
        return lines + [f"{entries.get('note', 'Not run')}."]
    lines += [
        "The same fits on each variable's test MSE, since a pooled loss can improve while one channel gets worse.",
        "",
        "| variable | lead time (h) | a, approach 2 | a, approach 3 | alpha | beta | best MSE per budget | worse at |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        second = entry.get("approach2") or {}
        third = entry.get("approach3") or {}
        best = ", ".join(_format_number(value, 3) for value in entry.get("bestLoss", []))
        worse = ", ".join(f"{budget:.3g}" for budget in entry.get("worseAtBudgets", [])) or "-"
        lead = entry.get("leadTimeHours")
        lines.append(
            f"| {entry['variable']} | {'-' if lead is None else f'{lead:g}'} | {_estimate_cell(second.get('a'))} | "
            f"{_estimate_cell(third.get('a'))} | {_estimate_cell(third.get('alpha'))} | "
            f"{_estimate_cell(third.get('beta'))} | {best} | {worse} |"
        )
    return lines


def _compute_optimal_lines(fits: dict[str, Any]) -> list[str]:
    """Render the compute-optimal section: recommendation, profiles, agreement, extrapolation and checks."""
    analysis = fits.get("computeOptimal")
    if not analysis:
        return []
    lines = ["## Compute-optimal allocation", ""]
    if "note" in analysis:
        return lines + [f"Not analysed: {analysis['note']}."]

    confidence = round(100 * float(analysis["approach2"].get("confidence", 0.95)))
    design = {"compute_ladder": "compute ladder", "isoflop": "IsoFLOP design"}.get(
        analysis.get("design"), "grid trials grouped by equal compute")
    lines += [
        f"{analysis['nPoints']} points from {analysis['nTrials']} trials ({design}) at "
        f"{len(analysis['budgets'])} compute budgets; N is `{analysis.get('paramsField')}`, D the training samples "
        "seen, C the analytic training FLOPs.",
        "",
    ]
    lines += _recommendation_lines(analysis, confidence) + [""]
    lines += _profile_lines(analysis, confidence) + [""]
    lines += _agreement_lines(analysis, confidence) + [""]
    lines += _extrapolation_lines(analysis, confidence) + [""]
    lines += _held_out_lines(analysis) + [""]
    lines += _per_variable_lines(analysis)
    if analysis.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in analysis["notes"]]
    return lines


def render_report(
    records: Sequence[dict[str, Any]], study_name: str, fits: dict[str, Any], figures: dict[str, Path], out_dir: Path
) -> str:
    """Return the Markdown text of report.md."""
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Scaling study `{study_name}`", "", f"Generated {generated} by wxscale {__version__}.", ""]
    lines += _summary_lines(records) + [""]
    lines += _trial_table_lines(records) + [""]
    compute = _compute_lines(records)
    if compute:
        lines += compute + [""]
    lines += _fit_lines(fits) + [""]
    compute_optimal = _compute_optimal_lines(fits)
    if compute_optimal:
        lines += compute_optimal + [""]
    lines += _figure_lines(figures, out_dir)
    return "\n".join(lines).rstrip() + "\n"


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_report(
    records: Iterable[dict[str, Any]], out_dir: str | Path, study_name: str, fits: dict[str, Any] | None = None
) -> Path:
    """Write report.md, trials.csv and plots/*.png into out_dir; return the path of report.md.

    `fits` is the dict of `wxscale.fit.fit_study`. It is computed here when None, with
    that function's defaults: 23 s for 25 trials on a 2-core machine at load 5. Every file
    is written to a temporary file in its folder first and then moved into place.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = _sorted(records)
    if fits is None:
        fits = fit_study(records)

    figures = write_plots(records, out_dir / PLOTS_DIR, fits)
    _write_text(out_dir / CSV_NAME, trials_csv(records))
    report = out_dir / REPORT_NAME
    _write_text(report, render_report(records, study_name, fits, figures, out_dir))
    logger.info(
        "wrote report of study %s (%d trials, %d figures) to %s", study_name, len(records), len(figures), report
    )
    return report
