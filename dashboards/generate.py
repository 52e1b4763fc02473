"""Generate wxscale's Grafana dashboards from code with grafana-foundation-sdk.

    python dashboards/generate.py           # write dashboards/*.json and charts/wxscale/dashboards/*.json
    python dashboards/generate.py --check   # exit 1 if a committed file differs from the generated one

The JSON files are committed. The copies in charts/wxscale/dashboards/ are what
the Helm chart ships as ConfigMaps for the Grafana sidecar; Helm reads only
files inside the chart, hence the copy. The test suite regenerates both and
runs every panel's PromQL against a Prometheus that scraped a real trial.

Every query takes its data source from the `datasource` variable. Queries
reduce the trainer's series with `max by (study, trial, rank)` first, so a
trial seen both live and through a pushgateway is counted once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from grafana_foundation_sdk.builders import bargauge, common, dashboard, prometheus, stat, timeseries, xychart
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_model
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as prometheus_model
from grafana_foundation_sdk.models import xychart as xychart_model

HERE = Path(__file__).resolve().parent
CHART_DASHBOARDS = HERE.parent / "charts" / "wxscale" / "dashboards"

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
TAGS = ["wxscale"]
STUDY = 'study="$study"'
TRIALS = 'study="$study", trial=~"$trial"'
RATE = "[$__rate_interval]"


# Building blocks -------------------------------------------------------------------


def query(expr: str, legend: str = "", instant: bool = False) -> prometheus.Dataquery:
    """Return a Prometheus query; instant queries come back as tables (one row per series)."""
    target = prometheus.Dataquery().expr(expr)
    if legend:
        target = target.legend_format(legend)
    if instant:
        target = target.instant().format(prometheus_model.PromQueryFormat.TABLE)
    return target


def with_queries(panel: Any, queries: list[prometheus.Dataquery]) -> Any:
    """Attach queries with ref ids A, B, ... and the dashboard's data source."""
    panel = panel.datasource(DATASOURCE)
    for index, target in enumerate(queries):
        panel = panel.with_target(target.ref_id(chr(ord("A") + index)))
    return panel


def graph(title: str, unit: str, description: str, queries: list[prometheus.Dataquery], width: int = 12,
          stacked: bool = False, log_scale: bool = False) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit).span(width).height(8)
             .fill_opacity(10).show_points(common_model.VisibilityMode.NEVER)
             .legend(common.VizLegendOptions().display_mode(common_model.LegendDisplayMode.TABLE)
                     .placement(common_model.LegendPlacement.BOTTOM).show_legend(True)))
    if stacked:
        panel = panel.stacking(common.StackingConfig().mode(common_model.StackingMode.NORMAL)).fill_opacity(40)
    if log_scale:
        panel = panel.scale_distribution(
            common.ScaleDistributionConfig().type(common_model.ScaleDistribution.LOG).log(10))
    return with_queries(panel, queries)


def single_value(title: str, unit: str, description: str, queries: list[prometheus.Dataquery],
                 width: int = 6) -> stat.Panel:
    panel = (stat.Panel().title(title).description(description).unit(unit).span(width).height(5)
             .graph_mode(common_model.BigValueGraphMode.NONE)
             .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    return with_queries(panel, queries)


def bars(title: str, unit: str, description: str, queries: list[prometheus.Dataquery], width: int = 12,
         maximum: float | None = None) -> bargauge.Panel:
    panel = (bargauge.Panel().title(title).description(description).unit(unit).span(width).height(8)
             .display_mode(common_model.BarGaugeDisplayMode.GRADIENT)
             .orientation(common_model.VizOrientation.HORIZONTAL)
             .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    if maximum is not None:
        panel = panel.min(0).max(maximum)
    return with_queries(panel, queries)


def per_rank(expr: str, by: str = "trial, rank") -> str:
    """Reduce a trainer series to one per (study, trial, rank, ...): the live and the pushed copy count once."""
    return f"max by (study, {by}) ({expr})"


def datasource_variable() -> dashboard.DatasourceVariable:
    return dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")


def study_variable(selector: str) -> dashboard.QueryVariable:
    return (dashboard.QueryVariable("study").label("Study").datasource(DATASOURCE)
            .query(f"label_values({selector}, study)")
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC))


def trial_variable() -> dashboard.QueryVariable:
    return (dashboard.QueryVariable("trial").label("Trial").datasource(DATASOURCE)
            .query(f"label_values(wxscale_trainer_steps_total{{{STUDY}}}, trial)")
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*"))


def new_dashboard(title: str, uid: str, description: str) -> dashboard.Dashboard:
    return (dashboard.Dashboard(title).uid(uid).description(description).tags(TAGS).editable()
            .refresh("30s").time("now-6h", "now").timezone("browser")
            .tooltip(model.DashboardCursorSync.CROSSHAIR))


# Dashboards ------------------------------------------------------------------------


def study_overview() -> dashboard.Dashboard:
    """Build the study overview: trials by state, loss against FLOPs, best loss, GPU time."""
    flops_so_far = per_rank(f"max_over_time(wxscale_trainer_flops_total{{{STUDY}}}[$__range])")
    board = (new_dashboard("wxscale study overview", "wxscale-study-overview",
                           "Progress of a wxscale ScalingStudy: trial states from the operator, losses and FLOPs "
                           "from the trainers.")
             .with_variable(datasource_variable())
             .with_variable(study_variable('{__name__=~"wxscale_trainer_steps_total|wxscale_operator_study_trials"}')))

    board = (board.with_row(dashboard.Row("Trials"))
             .with_panel(single_value(
                 "Study phase", "none", "Phase of the study in the operator's latest status.",
                 [query(f'max by (phase) (wxscale_operator_study_phase{{{STUDY}}}) == 1', "{{phase}}")])
                 .text_mode(common_model.BigValueTextMode.NAME))
             .with_panel(bars(
                 "Trials by state", "short", "Trials of the study by state, from the operator's latest status.",
                 [query(f"sum by (state) (wxscale_operator_study_trials{{{STUDY}}})", "{{state}}")], width=18))
             .with_panel(bars(
                 "Progress of running trials", "percentunit", "Optimizer steps done over steps planned, per trial.",
                 [query(f"max by (trial) (wxscale_trainer_step{{{STUDY}}}) / "
                        f"max by (trial) (wxscale_trainer_planned_steps{{{STUDY}}})", "{{trial}}")],
                 width=24, maximum=1)))

    board = (board.with_row(dashboard.Row("Loss and compute"))
             .with_panel(with_queries(
                 xychart.Panel().title("Validation loss vs training FLOPs").unit("short").span(12).height(10)
                 .description("One point per trial in the time range: model FLOPs done so far (x) and the latest "
                              "validation loss (y), both axes logarithmic. Loss is the latitude-weighted MSE of "
                              "normalised fields.")
                 .scale_distribution(common.ScaleDistributionConfig().type(common_model.ScaleDistribution.LOG).log(10))
                 .mapping(xychart_model.SeriesMapping.AUTO)
                 .with_transformation(model.DataTransformerConfig(id_val="merge", options={}))
                 .with_transformation(model.DataTransformerConfig(id_val="organize", options={
                     "excludeByName": {"Time": True},
                     "renameByName": {"Value #A": "training FLOPs", "Value #B": "validation loss"},
                 })),
                 [query(f"sum by (trial) ({flops_so_far})", instant=True),
                  query(f"max by (trial) (last_over_time(wxscale_trainer_validation_loss{{{STUDY}}}[$__range]))",
                        instant=True)]))
             .with_panel(graph(
                 "Validation loss", "none", "Latest validation loss of each trial (latitude-weighted MSE of "
                 "normalised fields).",
                 [query(f"max by (trial) (wxscale_trainer_validation_loss{{{STUDY}}})", "{{trial}}")], log_scale=True))
             .with_panel(single_value(
                 "Best validation loss", "none", "Lowest validation loss any trial of the study reached in the time "
                 "range.",
                 [query(f"min(min_over_time(wxscale_trainer_validation_loss{{{STUDY}}}[$__range]))")]))
             .with_panel(single_value(
                 "Training FLOPs so far", "short", "Model FLOPs (forward + backward, analytic) of all trials in the "
                 "time range.",
                 [query(f"sum({flops_so_far})")]))
             .with_panel(single_value(
                 "Study FLOP/s", "flops", "Model FLOP/s of the running trials together.",
                 [query(f"sum({per_rank(f'wxscale_trainer_flops_per_second{{{STUDY}}}')})")]))
             .with_panel(single_value(
                 "Study samples/s", "suffix: samples/s", "Training samples/s of the running trials together.",
                 [query(f"sum({per_rank(f'wxscale_trainer_samples_per_second{{{STUDY}}}')})")])))

    board = (board.with_row(dashboard.Row("Budget"))
             .with_panel(graph(
                 "GPU time spent vs planned", "s", "GPU time (GPUs x wall time) of the finished trials, and the "
                 "operator's estimate for the whole study: spent plus the remaining FLOPs at the FLOP rate of the "
                 "finished trials. The estimate appears once a GPU trial has finished.",
                 [query(f"sum(wxscale_operator_study_spent_gpu_seconds{{{STUDY}}})", "spent"),
                  query(f"sum(wxscale_operator_study_planned_gpu_seconds{{{STUDY}}})", "planned")], width=24)))
    return board


def trial_efficiency() -> dashboard.Dashboard:
    """Build the trial efficiency board: throughput, MFU, step time, memory, GPU, I/O and communication."""
    board = (new_dashboard("wxscale trial efficiency", "wxscale-trial-efficiency",
                           "How efficiently wxscale trials train: throughput, MFU, step-time breakdown, memory, "
                           "GPU, I/O and communication, per trial and rank.")
             .with_variable(datasource_variable())
             .with_variable(study_variable("wxscale_trainer_steps_total"))
             .with_variable(trial_variable()))

    steps_rate = f"(rate(wxscale_trainer_steps_total{{{TRIALS}}}{RATE}) > 0)"
    board = (board.with_row(dashboard.Row("Progress"))
             .with_panel(graph(
                 "Steps done", "percentunit", "Optimizer steps done over steps planned.",
                 [query(f"max by (trial) (wxscale_trainer_step{{{TRIALS}}}) / "
                        f"max by (trial) (wxscale_trainer_planned_steps{{{TRIALS}}})", "{{trial}}")]))
             .with_panel(graph(
                 "Training and validation loss", "none", "Training loss of the last step (mean over ranks) and "
                 "validation loss of the last evaluation: latitude-weighted MSE of normalised fields.",
                 [query(f"avg by (trial) ({per_rank(f'wxscale_trainer_train_loss{{{TRIALS}}}')})", "{{trial}} train"),
                  query(f"max by (trial) (wxscale_trainer_validation_loss{{{TRIALS}}})", "{{trial}} validation")],
                 log_scale=True)))

    board = (board.with_row(dashboard.Row("Throughput and compute"))
             .with_panel(graph(
                 "Samples/s", "suffix: samples/s", "Training samples/s of all ranks together, over the last 20 steps.",
                 [query(f"sum by (trial) ({per_rank(f'wxscale_trainer_samples_per_second{{{TRIALS}}}')})",
                        "{{trial}}")], width=6))
             .with_panel(graph(
                 "Tokens/s", "suffix: tokens/s", "Training tokens (patches) per second of all ranks together.",
                 [query(f"sum by (trial) ({per_rank(f'wxscale_trainer_tokens_per_second{{{TRIALS}}}')})",
                        "{{trial}}")], width=6))
             .with_panel(graph(
                 "Model FLOP/s", "flops", "Achieved model FLOP/s (analytic forward + backward count) of all ranks, "
                 "and the summed peak that MFU divides by.",
                 [query(f"sum by (trial) ({per_rank(f'wxscale_trainer_flops_per_second{{{TRIALS}}}')})",
                        "{{trial}} achieved"),
                  query(f"sum by (trial) ({per_rank(f'wxscale_trainer_peak_flops_per_second{{{TRIALS}}}')})",
                        "{{trial}} peak")], width=6))
             .with_panel(graph(
                 "MFU", "percentunit", "Model FLOPs utilization: achieved model FLOP/s over the device's peak "
                 "(GPU data sheet, measured matmul rate on CPU, or --peak-flops), mean over ranks.",
                 [query(f"avg by (trial) ({per_rank(f'wxscale_trainer_model_flops_utilization_ratio{{{TRIALS}}}')})",
                        "{{trial}}")], width=6)))

    board = (board.with_row(dashboard.Row("Step time"))
             .with_panel(graph(
                 "Step time by phase", "s", "Mean time per optimizer step in each phase, mean over ranks. "
                 "Communication runs during the backward pass under DDP, so it overlaps forward_backward and is "
                 "drawn as a line, not stacked.",
                 [query(f"avg by (trial, phase) (rate(wxscale_trainer_step_phase_seconds_total{{{TRIALS}}}{RATE}) "
                        f"/ ignoring (phase) group_left () {steps_rate})", "{{trial}} {{phase}}"),
                  query(f"avg by (trial) (sum without (kind) "
                        f"(rate(wxscale_trainer_collective_seconds_total{{{TRIALS}}}{RATE})) / {steps_rate})",
                        "{{trial}} communication")], width=16))
             .with_panel(graph(
                 "Data wait", "percentunit", "Share of step time spent waiting for the next batch, mean over ranks.",
                 [query(f'avg by (trial) (rate(wxscale_trainer_step_phase_seconds_total{{{TRIALS}, '
                        f'phase="data_wait"}}{RATE}) / ignoring (phase) (sum without (phase) '
                        f'(rate(wxscale_trainer_step_phase_seconds_total{{{TRIALS}}}{RATE})) > 0))', "{{trial}}")],
                 width=8)))

    board = (board.with_row(dashboard.Row("Memory"))
             .with_panel(graph(
                 "Device memory", "bytes", "CUDA caching allocator: memory held by tensors and reserved, current "
                 "and peak, per rank. NVIDIA GPUs only.",
                 [query(per_rank(f"wxscale_trainer_device_memory_allocated_bytes{{{TRIALS}}}"),
                        "{{trial}} rank {{rank}} allocated"),
                  query(per_rank(f"wxscale_trainer_device_memory_reserved_bytes{{{TRIALS}}}"),
                        "{{trial}} rank {{rank}} reserved"),
                  query(per_rank(f"wxscale_trainer_device_memory_peak_allocated_bytes{{{TRIALS}}}"),
                        "{{trial}} rank {{rank}} peak allocated")]))
             .with_panel(graph(
                 "Host memory", "bytes", "Resident set size of each trainer process, current and peak.",
                 [query(per_rank(f"wxscale_trainer_host_memory_rss_bytes{{{TRIALS}}}"), "{{trial}} rank {{rank}}"),
                  query(per_rank(f"wxscale_trainer_host_memory_peak_rss_bytes{{{TRIALS}}}"),
                        "{{trial}} rank {{rank}} peak")])))

    board = (board.with_row(dashboard.Row("GPU (NVML)"))
             .with_panel(graph(
                 "GPU and memory utilization", "percentunit", "Share of time a kernel ran, and share of time "
                 "device memory was read or written (NVML's memory utilization; DCGM_FI_PROF_DRAM_ACTIVE gives "
                 "bandwidth utilization proper). NVIDIA GPUs only.",
                 [query(per_rank(f"wxscale_trainer_gpu_utilization_ratio{{{TRIALS}}}"), "{{trial}} rank {{rank}} GPU"),
                  query(per_rank(f"wxscale_trainer_gpu_memory_utilization_ratio{{{TRIALS}}}"),
                        "{{trial}} rank {{rank}} memory")], width=8))
             .with_panel(graph(
                 "GPU memory used", "bytes", "Device memory in use by all processes, and installed. NVIDIA GPUs only.",
                 [query(per_rank(f"wxscale_trainer_gpu_memory_used_bytes{{{TRIALS}}}"), "{{trial}} rank {{rank}}"),
                  query(per_rank(f"wxscale_trainer_gpu_memory_total_bytes{{{TRIALS}}}"),
                        "{{trial}} rank {{rank}} total")], width=8))
             .with_panel(graph(
                 "GPU power", "watt", "Board power draw. NVIDIA GPUs only.",
                 [query(per_rank(f"wxscale_trainer_gpu_power_watts{{{TRIALS}}}"), "{{trial}} rank {{rank}}")],
                 width=8))
             .with_panel(graph(
                 "GPU temperature", "celsius", "GPU die temperature. NVIDIA GPUs only.",
                 [query(per_rank(f"wxscale_trainer_gpu_temperature_celsius{{{TRIALS}}}"), "{{trial}} rank {{rank}}")]))
             .with_panel(graph(
                 "SM clock", "hertz", "Streaming-multiprocessor clock; a drop under load means throttling. NVIDIA "
                 "GPUs only.",
                 [query(per_rank(f"wxscale_trainer_gpu_sm_clock_hertz{{{TRIALS}}}"), "{{trial}} rank {{rank}}")])))

    board = (board.with_row(dashboard.Row("I/O"))
             .with_panel(graph(
                 "Data loader throughput", "Bps", "Bytes of training batches delivered to the training step, all "
                 "ranks together.",
                 [query(f"sum by (trial) (rate(wxscale_trainer_data_loader_bytes_total{{{TRIALS}}}{RATE}))",
                        "{{trial}}")], width=8))
             .with_panel(graph(
                 "Time blocked on data", "s", "Time the training loop waited for batches, per rank, since the "
                 "trial started.",
                 [query(per_rank(f'wxscale_trainer_step_phase_seconds_total{{{TRIALS}, phase="data_wait"}}'),
                        "{{trial}} rank {{rank}}")], width=8))
             .with_panel(graph(
                 "Data source read throughput", "Bps", "Bytes read from the data source over the time spent "
                 "reading it, per rank. The source is read once at the start of a trial.",
                 [query(f"{per_rank(f'wxscale_trainer_data_source_read_bytes_total{{{TRIALS}}}')} / "
                        f"{per_rank(f'wxscale_trainer_data_source_read_seconds_total{{{TRIALS}}}')}",
                        "{{trial}} rank {{rank}}")], width=8))
             .with_panel(graph(
                 "Data source bytes read", "bytes", "Bytes read from the data source, per rank.",
                 [query(per_rank(f"wxscale_trainer_data_source_read_bytes_total{{{TRIALS}}}"),
                        "{{trial}} rank {{rank}}")], width=8))
             .with_panel(graph(
                 "Checkpoint bytes written", "bytes", "Bytes of checkpoints written, per rank.",
                 [query(per_rank(f"wxscale_trainer_checkpoint_written_bytes_total{{{TRIALS}}}"),
                        "{{trial}} rank {{rank}}")], width=8))
             .with_panel(graph(
                 "Checkpoint write time", "s", "Time spent writing checkpoints, per rank.",
                 [query(per_rank(f"wxscale_trainer_checkpoint_write_seconds_total{{{TRIALS}}}"),
                        "{{trial}} rank {{rank}}")], width=8)))

    board = (board.with_row(dashboard.Row("Communication"))
             .with_panel(graph(
                 "Collective throughput", "Bps", "Payload bytes per second of collectives (all-reduce, all-gather, "
                 "...), per rank and kind. Distributed trials only.",
                 [query(f"sum by (trial, rank, kind) "
                        f"(rate(wxscale_trainer_collective_bytes_total{{{TRIALS}}}{RATE}))",
                        "{{trial}} rank {{rank}} {{kind}}")], width=8))
             .with_panel(graph(
                 "Time in collectives", "percentunit", "Seconds per second from launch to completion of "
                 "collectives, per rank and kind. Collectives overlap each other and the backward pass, so this "
                 "can exceed 100 %.",
                 [query(f"sum by (trial, rank, kind) "
                        f"(rate(wxscale_trainer_collective_seconds_total{{{TRIALS}}}{RATE}))",
                        "{{trial}} rank {{rank}} {{kind}}")], width=8))
             .with_panel(graph(
                 "Bytes all-reduced and all-gathered", "bytes", "Payload bytes of collectives since the trial "
                 "started, per kind, all ranks together.",
                 [query(f"sum by (trial, kind) "
                        f"({per_rank(f'wxscale_trainer_collective_bytes_total{{{TRIALS}}}', 'trial, rank, kind')})",
                        "{{trial}} {{kind}}")], width=8)))
    return board


def operator_health() -> dashboard.Dashboard:
    """Build the operator board: reconcile rate, latency and errors, jobs, trials and result records."""
    board = (new_dashboard("wxscale operator", "wxscale-operator",
                           "Health of the wxscale operator: reconcile passes, PyTorchJobs, trials and result records.")
             .with_variable(datasource_variable()))
    board = (board.with_row(dashboard.Row("Studies"))
             .with_panel(bars(
                 "Studies by phase", "short", "ScalingStudies the operator tracks, by phase.",
                 [query("sum by (phase) (wxscale_operator_studies)", "{{phase}}")], width=8))
             .with_panel(graph(
                 "Trials finished", "short", "Trials the operator saw finishing in each interval, by state.",
                 [query(f"sum by (state) (increase(wxscale_operator_trials_finished_total{RATE}))", "{{state}}")],
                 width=8))
             .with_panel(graph(
                 "Result records collected", "short", "Trial result records the operator read from study outputs "
                 "in each interval.",
                 [query(f"sum(increase(wxscale_operator_results_collected_total{RATE}))", "records")], width=8)))
    board = (board.with_row(dashboard.Row("Reconcile"))
             .with_panel(graph(
                 "Reconcile passes", "ops", "Reconcile passes per second, by result (ok, error).",
                 [query(f"sum by (result) (rate(wxscale_operator_reconciles_total{RATE}))", "{{result}}")], width=8))
             .with_panel(graph(
                 "Reconcile latency", "s", "Duration of successful reconcile passes: median, 95th and 99th "
                 "percentile.",
                 [query(f"histogram_quantile({q}, sum by (le) "
                        f"(rate(wxscale_operator_reconcile_duration_seconds_bucket{RATE})))", f"p{round(q * 100)}")
                  for q in (0.5, 0.95, 0.99)], width=8))
             .with_panel(single_value(
                 "Reconcile errors", "short", "Failed reconcile passes in the time range (API or storage errors; "
                 "the operator retries with backoff).",
                 [query('sum(increase(wxscale_operator_reconciles_total{result="error"}[$__range]))')], width=8)))
    board = (board.with_row(dashboard.Row("Jobs"))
             .with_panel(graph(
                 "PyTorchJobs", "short", "PyTorchJobs created, failed attempts and retries in each interval.",
                 [query(f"sum(increase(wxscale_operator_jobs_created_total{RATE}))", "created"),
                  query(f"sum(increase(wxscale_operator_jobs_failed_total{RATE}))", "failed"),
                  query(f"sum(increase(wxscale_operator_jobs_retried_total{RATE}))", "retried")], width=24)))
    return board


DASHBOARDS: dict[str, Callable[[], dashboard.Dashboard]] = {
    "study.json": study_overview,
    "trial.json": trial_efficiency,
    "operator.json": operator_health,
}


# Output ----------------------------------------------------------------------------


def render(board: dashboard.Dashboard) -> str:
    """Return the dashboard as stable JSON: sorted keys, and panel ids numbered in layout order."""
    document = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    for number, panel in enumerate(document["panels"], start=1):
        panel["id"] = number
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def generate() -> dict[str, str]:
    """Return every dashboard's JSON text by file name."""
    return {name: render(build()) for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate wxscale's Grafana dashboards.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a committed dashboard differs from the generated one")
    parser.add_argument("--output", type=Path, action="append",
                        help="folder to write to; repeat for several (default: dashboards/ and "
                             "charts/wxscale/dashboards/)")
    args = parser.parse_args(argv)
    folders = args.output or [HERE, CHART_DASHBOARDS]

    stale = []
    for name, text in generate().items():
        for folder in folders:
            path = folder / name
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(str(path))
                continue
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run python dashboards/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
