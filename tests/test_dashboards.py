"""Grafana dashboards: generated files up to date, and every panel query returning series from a real Prometheus.

The query tests run each panel's PromQL, with Grafana's variables filled in,
against a Prometheus that scraped a real DDP trial and the operator
(prometheus_helpers.scraped_study). A query that errors or returns no series
means a dashboard and the exported metric names disagree.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from prometheus_helpers import (PanelQuery, ScrapedStudy, dashboard_queries, grafana_to_promql, panels,
                                scraped_study)  # noqa: F401 (scraped_study is a fixture)

DASHBOARDS = REPO / "dashboards"
CHART_DASHBOARDS = REPO / "charts" / "wxscale" / "dashboards"
GENERATOR = DASHBOARDS / "generate.py"
QUERIES = dashboard_queries(DASHBOARDS)


def load(name: str) -> dict:
    return json.loads((DASHBOARDS / name).read_text())


def dashboard_files() -> list[str]:
    return sorted(path.name for path in DASHBOARDS.glob("*.json"))


# Generated files -------------------------------------------------------------------


def test_committed_dashboards_match_generator(tmp_path: Path) -> None:
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk==1769699379!11.6.0 not installed")
    subprocess.run([sys.executable, str(GENERATOR), "--output", str(tmp_path)], check=True, timeout=120)

    generated = sorted(path.name for path in tmp_path.glob("*.json"))
    assert generated == dashboard_files()
    assert generated == sorted(path.name for path in CHART_DASHBOARDS.glob("*.json"))
    for name in generated:
        text = (tmp_path / name).read_text()
        assert (DASHBOARDS / name).read_text() == text, f"dashboards/{name} is stale: run python {GENERATOR}"
        assert (CHART_DASHBOARDS / name).read_text() == text, f"the chart's {name} is stale: run python {GENERATOR}"


def test_generator_check_flags_stale_file(tmp_path: Path) -> None:
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk==1769699379!11.6.0 not installed")
    subprocess.run([sys.executable, str(GENERATOR), "--output", str(tmp_path)], check=True, timeout=120)
    stale = tmp_path / dashboard_files()[0]
    stale.write_text(stale.read_text().replace("wxscale", "wxscale-old", 1))

    check = subprocess.run([sys.executable, str(GENERATOR), "--check", "--output", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)

    assert check.returncode == 1
    assert stale.name in check.stderr


# Structure -------------------------------------------------------------------------


def test_expected_dashboards_exist() -> None:
    assert dashboard_files() == ["operator.json", "study.json", "trial.json"]


@pytest.mark.parametrize("name", ["operator.json", "study.json", "trial.json"])
def test_every_panel_has_unit_and_datasource(name: str) -> None:
    document = load(name)
    data_panels = [panel for panel in panels(document) if panel["type"] != "row"]

    assert data_panels
    for panel in data_panels:
        assert panel["fieldConfig"]["defaults"].get("unit"), f"panel {panel['title']!r} has no unit"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
    ids = [panel["id"] for panel in panels(document)]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_template_variables() -> None:
    study = {v["name"]: v for v in load("study.json")["templating"]["list"]}
    trial = {v["name"]: v for v in load("trial.json")["templating"]["list"]}

    assert study["datasource"]["type"] == "datasource"
    assert set(study) == {"datasource", "study"}
    assert set(trial) == {"datasource", "study", "trial"}
    assert trial["trial"]["multi"] is True
    assert "$study" in trial["trial"]["query"]


def test_gpu_panels_are_marked() -> None:
    gpu_panels = {query.panel for query in QUERIES if query.needs_gpu}
    assert {"GPU and memory utilization", "GPU memory used", "GPU power", "GPU temperature", "SM clock",
            "Device memory"} <= gpu_panels


# Queries against Prometheus --------------------------------------------------------


@pytest.mark.parametrize("panel_query", QUERIES, ids=[query.id for query in QUERIES])
def test_panel_query_returns_series(panel_query: PanelQuery, scraped_study: ScrapedStudy) -> None:
    if panel_query.needs_gpu and not scraped_study.on_gpu:
        pytest.skip("GPU panel: the trial ran on CPU, so no GPU or device-memory series exist")
    expr = grafana_to_promql(panel_query.expr, {"study": scraped_study.study, "trial": scraped_study.trial})

    series = scraped_study.prometheus.query(expr, at=scraped_study.time_for(expr))

    assert series, f"no series for {expr}"
    if not panel_query.reads_operator:
        for item in series:
            assert item["metric"].get("trial", scraped_study.trial) == scraped_study.trial


def label_values_query(query: str) -> tuple[str, str]:
    """Split Grafana's `label_values(selector, label)` into its selector and label."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
    assert match, f"not a label_values query: {query}"
    return match.group(1), match.group(2)


@pytest.mark.parametrize("name", ["study.json", "trial.json"])
def test_variable_queries_list_the_study(name: str, scraped_study: ScrapedStudy) -> None:
    expected = {"study": scraped_study.study, "trial": scraped_study.trial}
    for variable in load(name)["templating"]["list"]:
        if variable["type"] != "query":
            continue
        selector, label = label_values_query(variable["query"])
        selector = grafana_to_promql(selector, {"study": scraped_study.study})

        values = scraped_study.prometheus.api(f"label/{label}/values", **{"match[]": selector},
                                              start=f"{scraped_study.trainer_time - 60:.3f}",
                                              end=f"{scraped_study.operator_time:.3f}")

        assert expected[label] in values, f"variable {variable['name']}: {values}"


def test_ddp_ranks_report_all_reduce(scraped_study: ScrapedStudy) -> None:
    """Each rank all-reduces every gradient once per step: parameters x 4 bytes (fp32) x steps."""
    expected = scraped_study.record["model"]["params"] * 4 * scraped_study.record["training"]["steps"]
    expr = f'wxscale_trainer_collective_bytes_total{{trial="{scraped_study.trial}", kind="all_reduce"}}'

    series = scraped_study.prometheus.query(expr, at=scraped_study.trainer_time)

    assert sorted(item["metric"]["rank"] for item in series) == ["0", "1"]
    for item in series:
        assert float(item["value"][1]) == expected


def test_result_record_holds_final_values_of_every_rank(scraped_study: ScrapedStudy) -> None:
    telemetry = scraped_study.record["telemetry"]
    steps = scraped_study.record["training"]["steps"]

    assert [entry["rank"] for entry in telemetry["ranks"]] == [0, 1]
    for entry in telemetry["ranks"]:
        metrics = entry["metrics"]
        assert metrics["wxscale_trainer_steps_total"] == steps
        assert metrics['wxscale_trainer_collectives_total{kind="all_reduce"}'] == steps
        assert metrics["wxscale_trainer_samples_total"] == steps * scraped_study.record["config"]["training"][
            "batchSize"] / 2
