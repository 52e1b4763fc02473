"""The study report: report.md, trials.csv and the figures, from trial records of a planted law."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from wxscale.fit import StartGrid, fit_study
from wxscale.plots import atomic_path, plot_cost_vs_embed_dim, plot_cost_vs_history, write_plots
from wxscale.plots import format_si
from wxscale.report import format_table, render_report, trials_csv, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Planted law for the records: L = E + A / N^alpha + B / D^beta on normalised fields.
E, A, B, ALPHA, BETA = 0.04, 30.0, 8.0, 0.35, 0.3
FLOPS_PER_PARAM_SAMPLE = 6.0


def make_record(
    index: int,
    depth: int,
    fraction: float,
    *,
    embed_dim: int = 128,
    state: str = "Succeeded",
    noise: float = 0.0,
) -> dict:
    """Build a TrialResult record whose losses follow the planted law."""
    params = 50_000 * depth * (embed_dim / 128) ** 2
    non_embedding = 0.95 * params
    samples = int(6400 * fraction)
    flops = FLOPS_PER_PARAM_SAMPLE * non_embedding * samples
    loss = (E + A / non_embedding**ALPHA + B / samples**BETA) * (1.0 + noise)
    record = {
        "apiVersion": "wxscale.io/v1alpha1",
        "kind": "TrialResult",
        "study": "report-test",
        "trial": f"t-{index:02d}abcdef",
        "index": index,
        "state": state,
        "error": None,
        "attempts": 1,
        "axisValues": {"size": {"model.depth": depth, "model.heads": 2}, "data.datasetFraction": fraction},
        "config": {"data": {"history": 1}, "model": {"depth": depth, "embedDim": embed_dim}},
        "data": {
            "source": "synthetic",
            "synthetic": True,
            "variables": ["tracer"],
            "units": {"tracer": "K"},
            "grid": [32, 64],
            "trainSamples": int(1200 * fraction),
            "validationSamples": 200,
            "testSamples": 200,
            "leadTimeHours": 6,
        },
        "model": {
            "params": int(params),
            "nonEmbeddingParams": int(non_embedding),
            "embedDim": embed_dim,
            "depth": depth,
            "heads": 2,
            "history": 1,
        },
        "training": {
            "steps": samples // 16,
            "samples": samples,
            "tokens": samples * 128,
            "flopsAnalytic": flops,
            "flopsMeasured": flops * 1.01,
            "flopsPerSample": flops / samples,
            "wallSeconds": 30.0,
            "samplesPerSecond": samples / 30.0,
            "flopsPerSecond": flops / 30.0,
            "peakMemoryBytes": int(2e8 + 40 * params),
            "dataWaitSeconds": 0.4,
            "computeSeconds": 29.0,
            "finalTrainLoss": 0.9 * loss,
            "finalValidationLoss": 1.02 * loss,
            "generalizationGap": 0.12 * loss,
            "curve": [
                {"step": step, "trainLoss": loss * (1 + 4.0 / step), "validationLoss": loss * (1.05 + 4.0 / step)}
                for step in (10, 20, 40, 80)
            ],
        },
        "inference": {
            "latencyMsBatch1": 1.0 + embed_dim / 64,
            "latencyMsBatch": 4.0 + embed_dim / 16,
            "batchSize": 16,
            "peakMemoryBytes": int(1e8 + 10 * params),
        },
        "evaluation": {
            "testLoss": loss,
            "leadTimeHours": 6,
            "variables": {
                "tracer": {
                    "units": "K",
                    "model": {
                        "rmse": 3.0 * loss**0.5,
                        "mae": 2.4 * loss**0.5,
                        "mse": 9.0 * loss,
                        "bias": 0.01,
                        "acc": 0.9,
                    },
                    "persistence": {"rmse": 1.2, "mae": 0.95, "mse": 1.44, "bias": 0.0, "acc": 0.8},
                    "climatology": {"rmse": 2.0, "mae": 1.6, "mse": 4.0, "bias": 0.0, "acc": 0.0},
                }
            },
        },
    }
    if state == "Failed":
        record["error"] = "trainer exited with code 137 (out of memory | killed)"
        for section in ("model", "training", "inference", "evaluation"):
            record[section] = None
    return record


@pytest.fixture(scope="module")
def records() -> list[dict]:
    """Eight trials: 4 depths x 2 data fractions (one failed), noise of 1 % on the loss."""
    rng = np.random.default_rng(4)
    result = []
    for depth in (1, 2, 4, 8):
        for fraction in (0.25, 1.0):
            result.append(make_record(len(result), depth, fraction, noise=0.01 * rng.standard_normal()))
    result.append(make_record(len(result), 16, 1.0, state="Failed"))
    return result


@pytest.fixture(scope="module")
def report(records, tmp_path_factory) -> Path:
    fits = fit_study(records, n_boot=30, grid=StartGrid.small())
    out_dir = tmp_path_factory.mktemp("report")
    return write_report(records, out_dir, "report-test", fits=fits)


def test_report_files_exist(report):
    out_dir = report.parent
    assert report.name == "report.md"
    assert report.stat().st_size > 0
    assert (out_dir / "trials.csv").stat().st_size > 0
    pngs = sorted((out_dir / "plots").glob("*.png"))
    names = {path.name for path in pngs}
    for expected in ("loss_vs_flops.png", "loss_vs_params.png", "loss_vs_samples.png", "metrics_vs_scale.png",
                     "skill_vs_baselines.png", "training_curves.png"):
        assert expected in names, expected
    for path in pngs:
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path
        assert path.stat().st_size > 5000, path


def test_report_leaves_no_temporary_files(report):
    leftovers = [path.name for path in report.parent.rglob(".*.tmp")]
    assert leftovers == []


def test_report_skips_cost_plots_without_variation(report):
    # Every trial has embedDim 128 and history 1, so neither cost figure is drawn.
    assert not (report.parent / "plots" / "cost_vs_embed_dim.png").exists()
    assert not (report.parent / "plots" / "cost_vs_history.png").exists()


def test_csv_has_one_row_per_trial(report, records):
    with open(report.parent / "trials.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(records)
    expected = {
        "index", "trial", "state", "error", "axis.size.model.depth", "axis.data.datasetFraction",
        "model.params", "model.nonEmbeddingParams", "training.samples", "training.flopsAnalytic",
        "training.generalizationGap", "inference.latencyMsBatch1", "evaluation.testLoss",
        "evaluation.variables.tracer.model.rmse", "evaluation.variables.tracer.persistence.rmse",
        "evaluation.variables.tracer.climatology.rmse",
    }
    assert expected <= set(rows[0])
    assert "training.curve" not in rows[0]
    assert [row["trial"] for row in rows] == [record["trial"] for record in records]
    failed = rows[-1]
    assert failed["state"] == "Failed"
    assert "out of memory" in failed["error"]
    assert failed["evaluation.testLoss"] == ""
    assert float(rows[0]["evaluation.testLoss"]) == pytest.approx(records[0]["evaluation"]["testLoss"])


def test_report_names_every_trial(report, records):
    text = report.read_text()
    for record in records:
        assert record["trial"] in text, record["trial"]
    assert "1 Failed" in text
    assert "8 Succeeded" in text
    assert "out of memory \\| killed" in text  # the pipe is escaped inside the table
    assert "synthetic" in text


def test_report_embeds_plots(report):
    text = report.read_text()
    for path in (report.parent / "plots").glob("*.png"):
        assert f"](plots/{path.name})" in text, path.name


def test_report_lists_fits_with_intervals(report):
    text = report.read_text()
    assert "### Loss vs parameters and samples (Chinchilla form)" in text
    assert "| alpha |" in text
    assert "Compute-optimal allocation" in text
    assert "95 % low" in text


def test_report_best_trial_is_lowest_loss(report, records):
    best = min((r for r in records if r["state"] == "Succeeded"), key=lambda r: r["evaluation"]["testLoss"])
    summary_line = next(line for line in report.read_text().splitlines() if line.startswith("- Best trial"))
    assert best["trial"] in summary_line


def markdown_table(text: str, first_header: str) -> list[dict[str, str]]:
    """Parse the Markdown table whose header row starts with `first_header` into one dict per row."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    header = [cell.strip() for cell in lines[start].strip("|").split(" | ")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split(" | ")))))
    return rows


def test_best_trial_labels_parameter_counts(report, records):
    best = min((r for r in records if r["state"] == "Succeeded"), key=lambda r: r["evaluation"]["testLoss"])
    text = report.read_text()
    summary_line = next(line for line in text.splitlines() if line.startswith("- Best trial"))
    total = format_si(best["model"]["params"])
    non_embedding = format_si(best["model"]["nonEmbeddingParams"])
    assert total != non_embedding
    assert f"{total} parameters ({non_embedding} non-embedding)" in summary_line

    # The summary's first count is the one the trials table shows.
    trials = markdown_table(text, "| # | trial | state |")
    best_row = next(row for row in trials if row["trial"] == f"`{best['trial']}`")
    assert best_row["params"] == total


def test_best_trial_without_non_embedding_count(tmp_path):
    record = make_record(0, 2, 1.0)
    del record["model"]["nonEmbeddingParams"]
    text = render_report([record], "no-split", {}, {}, tmp_path)
    summary_line = next(line for line in text.splitlines() if line.startswith("- Best trial"))
    assert f", {format_si(record['model']['params'])} parameters, " in summary_line
    assert "non-embedding" not in summary_line


def compute_record(index: int, *, synthetic: bool, loader: str | None, wait: float) -> dict:
    """Build a succeeded record with the fields of the compute table, its data wait and its loader mode."""
    record = make_record(index, 2, 1.0)
    record["data"]["synthetic"] = synthetic
    if loader is not None:
        record["config"]["data"]["loader"] = {"mode": loader}
    record["config"]["distributed"] = {"strategy": "ddp", "nodes": 1, "procsPerNode": 1}
    record["config"]["training"] = {"precision": "fp32", "activationCheckpointing": False}
    record["training"]["parallelism"] = {"strategy": "ddp", "nodes": 1, "procsPerNode": 1}
    record["training"]["dataWaitFraction"] = wait
    # The step-time fraction divides by less time, so a table that shows it instead fails the check below.
    record["training"]["stepTime"] = {"steps": 25, "dataFraction": 1.2 * wait}
    return record


def test_compute_table_shows_loader_and_data_wait(tmp_path):
    records = [
        compute_record(0, synthetic=True, loader="stream", wait=0.0061),  # synthetic data is always in memory
        compute_record(1, synthetic=False, loader="stream", wait=0.25),
        compute_record(2, synthetic=False, loader="memory", wait=0.004),
        compute_record(3, synthetic=False, loader="auto", wait=0.03),
        compute_record(4, synthetic=False, loader=None, wait=0.03),
        compute_record(5, synthetic=False, loader="auto", wait=0.03),
    ]
    del records[4]["training"]["dataWaitFraction"]
    records[5]["data"]["loader"] = "stream"  # what the trainer records: the path an 'auto' trial took
    text = render_report(records, "loader", {}, {}, tmp_path)

    rows = markdown_table(text, "| # | trial | layout |")
    assert [row["#"] for row in rows] == ["0", "1", "2", "3", "4", "5"]
    assert [row["loader"] for row in rows] == ["memory", "stream", "memory", "auto", "-", "stream"]
    assert [row["data wait % of wall"] for row in rows] == ["0.61", "25", "0.4", "3", "-", "3"]
    assert "`training.dataWaitFraction`" in text
    assert "`training.stepTime.dataFraction`" in text


def test_too_few_trials_gives_note(tmp_path):
    few = [make_record(0, 1, 1.0), make_record(1, 2, 1.0), make_record(2, 4, 0.5, state="Failed")]
    report = write_report(few, tmp_path, "tiny", fits=fit_study(few, n_boot=10, grid=StartGrid.small()))
    text = report.read_text()

    section = text.split("### Loss vs parameters\n", 1)[1].split("###", 1)[0]
    assert "Not fitted: loss vs parameters needs at least 4 trials with distinct parameter counts; got 2." in section
    assert "| alpha |" not in section
    assert "| alpha |" not in text  # no fit at all: every section is a note
    assert text.count("Not fitted:") == 4


def test_write_report_fits_when_not_given(tmp_path, records):
    subset = [records[i] for i in (1, 3, 5, 7)]  # the four depths at the full data fraction
    report = write_report(subset, tmp_path, "computed-fits")
    text = report.read_text()
    assert "### Loss vs parameters\n" in text
    section = text.split("### Loss vs parameters\n", 1)[1].split("###", 1)[0]
    assert "| alpha |" in section


def test_format_table_lists_trials(records):
    table = format_table(records)
    lines = table.splitlines()
    assert len(lines) == 2 + len(records)
    assert lines[0].split()[:3] == ["#", "trial", "state"]
    for record, line in zip(records, lines[2:]):
        assert record["trial"] in line
    assert "error: trainer exited with code 137" in lines[-1]
    assert "size: model.depth=1" in lines[2]
    # Fixed width: the columns start at the same offset on every line.
    offset = lines[0].index("state")
    assert all(line[offset:].startswith(("state", "-----", "Succeeded", "Failed")) for line in lines)


def test_trials_csv_handles_missing_sections():
    text = trials_csv([{"index": 0, "trial": "t-0", "state": "Failed", "error": "bad config"}])
    rows = list(csv.DictReader(text.splitlines()))
    assert rows == [{"index": "0", "trial": "t-0", "state": "Failed", "error": "bad config", "attempts": ""}]


def test_cost_plots_when_width_and_history_vary(tmp_path):
    records = [make_record(i, 2, 1.0, embed_dim=width) for i, width in enumerate((64, 128, 256))]
    for history, record in zip((1, 2, 4), records):
        record["model"]["history"] = history
    width_plot = plot_cost_vs_embed_dim(records, tmp_path)
    history_plot = plot_cost_vs_history(records, tmp_path)
    assert width_plot is not None and width_plot.read_bytes()[:8] == PNG_SIGNATURE
    assert history_plot is not None and history_plot.read_bytes()[:8] == PNG_SIGNATURE


def test_plots_with_no_succeeded_trials(tmp_path):
    failed = [make_record(0, 1, 1.0, state="Failed")]
    assert write_plots(failed, tmp_path) == {}
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("partial")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_fits_dict_is_json(records):
    fits = fit_study(records, n_boot=10, grid=StartGrid.small())
    assert json.loads(json.dumps(fits))["nSucceeded"] == 8
