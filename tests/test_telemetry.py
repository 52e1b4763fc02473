"""Trainer and operator metrics: names, values, peaks, the endpoint and the final-values paths.

The dashboard tests (test_dashboards.py) cover the scrape of a real DDP trial
by Prometheus; these tests check the pieces and the pushgateway path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO
from prometheus_helpers import Pushgateway, free_port, promtool_check_metrics
from wxscale.errors import WxscaleError
from wxscale.planner import plan
from wxscale.spec import ScalingStudy
from wxscale.status import build_status
from wxscale.trialspec import TrialSpec, trial_folder
from wxscale_operator import metrics as operator_metrics
from wxscale_trainer.gpu import NvmlCollector, known_gpu_peak
from wxscale_trainer.main import parse_args
from wxscale_trainer.telemetry import Telemetry, measure_cpu_matmul_flops, peak_flops_for

GIGA = 1e9


def busy_telemetry() -> Telemetry:
    """A Telemetry that has seen every kind of report."""
    telemetry = Telemetry("study-a", "t-0123456789", rank=1, node="node-1", peak_flops=10 * GIGA)
    telemetry.start(planned_steps=10, flops_per_sample=1e6, tokens_per_sample=32, precision="fp32",
                    strategy="ddp", world_size=2)
    telemetry.record_data_source_read(4096, 0.5)
    for step in range(3):
        telemetry.record_step(step=step + 1, samples=8, loss=0.25, data_seconds=0.1, forward_backward_seconds=0.6,
                              optimizer_seconds=0.1, batch_bytes=1024)
    telemetry.record_validation(0.3)
    telemetry.record_checkpoint(2048, 0.2)
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):
        telemetry.record_collective(kind, 1000, 0.01)
    return telemetry


def exposition_names(exposition: bytes) -> set[str]:
    return {sample.name for family in text_string_to_metric_families(exposition.decode()) for sample in family.samples}


# Names -------------------------------------------------------------------------------


def test_trainer_metric_names_pass_promtool() -> None:
    exposition = generate_latest(busy_telemetry().registry)

    check = promtool_check_metrics(exposition)

    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == ""


def test_promtool_flags_bad_names() -> None:
    """The name check can fail: a counter without _total and an abbreviated unit are reported."""
    check = promtool_check_metrics(b"# HELP demo_latency_ms Latency.\n# TYPE demo_latency_ms counter\n"
                                   b"demo_latency_ms 1\n")

    assert check.returncode != 0
    assert "_total" in check.stdout + check.stderr


def test_operator_metric_names_pass_promtool() -> None:
    operator_metrics.observe_study("names", "study-a", {"phase": "Running", "trials": {"running": 1},
                                                        "budget": {"gpuHoursSpent": 0.5, "gpuHoursPlanned": 2.0}})
    exposition = generate_latest(REGISTRY)
    operator_metrics.forget_study("names", "study-a")

    check = promtool_check_metrics(exposition)

    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == ""
    assert "wxscale_operator_study_planned_gpu_seconds" in exposition_names(exposition)


def test_every_trainer_series_has_trial_labels() -> None:
    exposition = generate_latest(busy_telemetry().registry).decode()

    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            assert {"study": "study-a", "trial": "t-0123456789", "rank": "1", "node": "node-1"}.items() \
                <= sample.labels.items(), sample.name


# Values ------------------------------------------------------------------------------


def test_gauges_absent_until_reported() -> None:
    telemetry = Telemetry("study-a", "t-1", peak_flops=GIGA)
    names = exposition_names(generate_latest(telemetry.registry))

    assert "wxscale_trainer_validation_loss" not in names
    assert "wxscale_trainer_train_loss" not in names
    assert "wxscale_trainer_model_flops_utilization_ratio" not in names
    assert "wxscale_trainer_steps_total" in names  # counters start at zero

    telemetry.record_validation(0.5)
    assert telemetry.final_values()["wxscale_trainer_validation_loss"] == 0.5


def test_step_counts_rates_and_mfu() -> None:
    values = busy_telemetry().final_values()

    assert values["wxscale_trainer_steps_total"] == 3
    assert values["wxscale_trainer_step"] == 3
    assert values["wxscale_trainer_samples_total"] == 24
    assert values["wxscale_trainer_tokens_total"] == 24 * 32
    assert values["wxscale_trainer_flops_total"] == 24 * 1e6
    # 8 samples per 0.8 s of step time.
    assert values["wxscale_trainer_samples_per_second"] == pytest.approx(10.0)
    assert values["wxscale_trainer_tokens_per_second"] == pytest.approx(320.0)
    assert values["wxscale_trainer_flops_per_second"] == pytest.approx(1e7)
    assert values["wxscale_trainer_model_flops_utilization_ratio"] == pytest.approx(1e7 / (10 * GIGA))
    assert values['wxscale_trainer_step_phase_seconds_total{phase="forward_backward"}'] == pytest.approx(1.8)
    assert values['wxscale_trainer_step_phase_seconds_total{phase="data_wait"}'] == pytest.approx(0.3)
    assert values["wxscale_trainer_data_loader_bytes_total"] == 3 * 1024
    assert values["wxscale_trainer_data_source_read_bytes_total"] == 4096
    assert values["wxscale_trainer_checkpoint_written_bytes_total"] == 2048
    assert values["wxscale_trainer_checkpoints_total"] == 1
    assert values["wxscale_trainer_train_loss"] == 0.25
    assert values["wxscale_trainer_planned_steps"] == 10


def test_rates_cover_only_recent_steps() -> None:
    telemetry = Telemetry("study-a", "t-1", peak_flops=GIGA)
    telemetry.start(planned_steps=30, flops_per_sample=1.0, tokens_per_sample=1, precision="fp32",
                    strategy="ddp", world_size=1)
    for step in range(5):  # slow steps, pushed out of the window by the 20 fast ones after them
        telemetry.record_step(step=step + 1, samples=4, loss=1.0, data_seconds=0.0, forward_backward_seconds=4.0,
                              optimizer_seconds=0.0)
    for step in range(5, 25):
        telemetry.record_step(step=step + 1, samples=4, loss=1.0, data_seconds=0.0, forward_backward_seconds=0.1,
                              optimizer_seconds=0.0)

    assert telemetry.final_values()["wxscale_trainer_samples_per_second"] == pytest.approx(40.0)


def test_collectives_by_kind() -> None:
    telemetry = Telemetry("study-a", "t-1")
    telemetry.record_collective("all_gather", 100, 0.25)
    telemetry.record_collective("all_gather", 300, 0.5)

    values = telemetry.final_values()

    assert values['wxscale_trainer_collective_bytes_total{kind="all_gather"}'] == 400
    assert values['wxscale_trainer_collective_seconds_total{kind="all_gather"}'] == 0.75
    assert values['wxscale_trainer_collectives_total{kind="all_gather"}'] == 2
    with pytest.raises(ValueError, match="unknown collective kind 'gossip'"):
        telemetry.record_collective("gossip", 1, 0.1)


def test_final_record_single_process() -> None:
    record = busy_telemetry().final_record()

    assert [entry["rank"] for entry in record["ranks"]] == [1]
    assert record["ranks"][0]["node"] == "node-1"
    assert record["ranks"][0]["metrics"]["wxscale_trainer_steps_total"] == 3
    assert not any(key.endswith("_created") for key in record["ranks"][0]["metrics"])


# Peaks and GPUs ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "precision", "expected"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H200", "fp16", 989.4e12),
    ("NVIDIA H200 NVL", "bf16", 835.5e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A10", "bf16", 125e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA L40S", "bf16", 362e12),
    ("Tesla T4", "fp16", 65e12),
    ("Tesla V100-SXM2-16GB", "bf16", None),  # Volta has no bf16
    ("Some Future GPU", "bf16", None),
])
def test_known_gpu_peaks(name: str, precision: str, expected: float | None) -> None:
    assert known_gpu_peak(name, precision) == expected


def test_fp32_peak_follows_tf32_setting() -> None:
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert known_gpu_peak("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
        torch.backends.cuda.matmul.allow_tf32 = True
        assert known_gpu_peak("NVIDIA A100-SXM4-80GB", "fp32") == 156e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_cpu_peak_measured_once() -> None:
    first = measure_cpu_matmul_flops(size=128, min_seconds=0.01)
    second = measure_cpu_matmul_flops(size=128, min_seconds=0.01)

    assert first > 0
    assert second == first  # the cached measurement, not a new one
    assert peak_flops_for(torch.device("cpu"), "fp32", override=5.0) == (5.0, "override")


def test_no_gpu_means_no_gpu_metrics() -> None:
    names = exposition_names(generate_latest(busy_telemetry().registry))

    assert not [name for name in names if name.startswith(("wxscale_trainer_gpu_", "wxscale_trainer_device_memory"))]
    assert "wxscale_trainer_host_memory_rss_bytes" in names
    assert NvmlCollector.for_device(torch.device("cpu"), ["rank"], ["0"]) is None


def test_nvml_collector_absent_without_nvml() -> None:
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine; the test covers machines without it")

    assert NvmlCollector.for_device(torch.device("cuda", 0), ["rank"], ["0"]) is None


# Endpoint, options and pushgateway ---------------------------------------------------


def test_endpoint_serves_metrics_and_reports_busy_port() -> None:
    telemetry = busy_telemetry()
    port = telemetry.serve(0, "127.0.0.1")
    other = Telemetry("study-a", "t-2")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert 'wxscale_trainer_steps_total{node="node-1",rank="1",study="study-a",trial="t-0123456789"} 3.0' in body

        with pytest.raises(WxscaleError, match=f"--metrics-port {port}"):
            other.serve(port, "127.0.0.1")
    finally:
        telemetry.close()
        other.close()


def test_metrics_options(monkeypatch: pytest.MonkeyPatch) -> None:
    required = ["--trial", "t.json", "--output", "out"]
    monkeypatch.delenv("WXSCALE_METRICS_PORT", raising=False)
    assert parse_args(required).metrics_port is None

    monkeypatch.setenv("WXSCALE_METRICS_PORT", "9400")
    assert parse_args(required).metrics_port == 9400
    assert parse_args([*required, "--metrics-port", "9500"]).metrics_port == 9500
    with pytest.raises(SystemExit):
        parse_args([*required, "--metrics-port", "70000"])


def test_push_to_missing_gateway_returns_false() -> None:
    assert busy_telemetry().push(f"http://127.0.0.1:{free_port()}", timeout=2.0) is False


def tiny_trial(folder: Path) -> TrialSpec:
    document = {
        "apiVersion": "wxscale.io/v1alpha1", "kind": "ScalingStudy", "metadata": {"name": "push-test"},
        "spec": {
            "data": {"source": "synthetic", "synthetic": {"lat": 16, "lon": 32, "steps": 400},
                     "train": {"start": "2000-01-01", "end": "2000-02-28T18:00"},
                     "validation": {"start": "2000-03-01", "end": "2000-03-31T18:00"},
                     "test": {"start": "2000-04-01", "end": "2000-04-30T18:00"}},
            "model": {"patchSize": 4, "depth": 1, "heads": 2, "embedDim": 32},
            "training": {"batchSize": 8, "budget": {"steps": 12}, "evalEvery": 6, "evalBatches": 1,
                         "device": "cpu", "numThreads": 1},
        },
    }
    trial = plan(ScalingStudy.model_validate(document))[0]
    spec = TrialSpec.from_trial("push-test", trial)
    (folder / "trial.json").write_text(json.dumps(spec.to_dict()))
    return spec


def test_trial_pushes_final_values_and_records_them(tmp_path: Path) -> None:
    """A short trial ends between scrapes; its final values reach the pushgateway and the result record."""
    spec = tiny_trial(tmp_path)
    gateway = Pushgateway(tmp_path).start()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "wxscale_trainer", "--trial", str(tmp_path / "trial.json"),
             "--output", str(tmp_path / "out"), "--pushgateway", gateway.url],
            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-4000:]
        with urllib.request.urlopen(f"{gateway.url}/metrics", timeout=5) as response:
            pushed = response.read().decode()
    finally:
        gateway.stop()

    steps = {sample.labels["rank"]: sample.value
             for family in text_string_to_metric_families(pushed) for sample in family.samples
             if sample.name == "wxscale_trainer_steps_total" and sample.labels.get("trial") == spec.trial}
    assert steps == {"0": 12.0}
    assert 'job="wxscale_trainer"' in pushed

    record = json.loads((tmp_path / "out" / trial_folder(spec.trial) / "result.json").read_text())
    final = record["telemetry"]["ranks"][0]["metrics"]
    assert final["wxscale_trainer_steps_total"] == 12
    assert final["wxscale_trainer_validation_loss"] == pytest.approx(record["training"]["finalValidationLoss"])
    assert final["wxscale_trainer_peak_flops_per_second"] > 0


# Operator ----------------------------------------------------------------------------


def test_operator_study_gauges_follow_status() -> None:
    study = ScalingStudy.model_validate({
        "apiVersion": "wxscale.io/v1alpha1", "kind": "ScalingStudy", "metadata": {"name": "gauges"},
        "spec": {"data": {"source": "synthetic", "synthetic": {"lat": 16, "lon": 32, "steps": 400},
                          "train": {"start": "2000-01-01", "end": "2000-02-28T18:00"},
                          "validation": {"start": "2000-03-01", "end": "2000-03-31T18:00"},
                          "test": {"start": "2000-04-01", "end": "2000-04-30T18:00"}},
                 "model": {"patchSize": 4, "depth": 1, "heads": 2, "embedDim": 32},
                 "axes": [{"field": "training.budget.steps", "values": [10, 20, 40]}]}})
    trials = plan(study)
    first = trials[0]
    record = {"trial": first.id, "state": "Succeeded",
              "training": {"flopsAnalytic": first.total_flops, "wallSeconds": 36.0}}
    states = {first.id: "Succeeded", trials[1].id: "Running"}
    status = build_status(trials, states, {first.id: record}, gpus_per_trial={trial.id: 2 for trial in trials})
    labels = {"namespace": "ns-gauges", "study": "gauges"}

    operator_metrics.observe_study("ns-gauges", "gauges", status)
    try:
        value = REGISTRY.get_sample_value
        assert value("wxscale_operator_study_trials", {**labels, "state": "Succeeded"}) == 1
        assert value("wxscale_operator_study_trials", {**labels, "state": "Running"}) == 1
        assert value("wxscale_operator_study_trials", {**labels, "state": "Pending"}) == 1
        assert value("wxscale_operator_study_phase", {**labels, "phase": "Running"}) == 1
        assert value("wxscale_operator_study_phase", {**labels, "phase": "Pending"}) == 0
        assert value("wxscale_operator_study_spent_gpu_seconds", labels) == pytest.approx(72.0)
        assert value("wxscale_operator_study_planned_gpu_seconds", labels) > 72.0
        assert value("wxscale_operator_studies", {"phase": "Running"}) >= 1
    finally:
        operator_metrics.forget_study("ns-gauges", "gauges")

    assert REGISTRY.get_sample_value("wxscale_operator_study_trials", {**labels, "state": "Succeeded"}) is None
