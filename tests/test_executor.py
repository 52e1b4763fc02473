"""`wxscale run` end to end: real torchrun processes, resume, retries, failures, Ctrl-C and S3 output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO


def tiny_study(name: str, axes: list, **spec) -> dict:
    """A study of seconds-long trials on a 16 x 32 synthetic grid."""
    document = {
        "apiVersion": "wxscale.io/v1alpha1",
        "kind": "ScalingStudy",
        "metadata": {"name": name},
        "spec": {
            "data": {
                "source": "synthetic",
                "synthetic": {"lat": 16, "lon": 32, "steps": 400},
                "train": {"start": "2000-01-01", "end": "2000-02-28"},
                "validation": {"start": "2000-03-01", "end": "2000-03-20"},
                "test": {"start": "2000-03-21", "end": "2000-04-09"},
            },
            "model": {"depth": 1, "heads": 2, "embedDim": 32},
            "training": {"batchSize": 8, "budget": {"steps": 20}, "evalEvery": 10, "evalBatches": 2},
            "axes": axes,
            "maxConcurrentTrials": 2,
            **spec,
        },
    }
    return document


def write_study(tmp_path: Path, document: dict) -> Path:
    path = tmp_path / f"{document['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def wxscale(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wxscale", *args, "--no-progress"] if args[0] == "run" else
                          [sys.executable, "-m", "wxscale", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def results(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in folder.glob("trials/*/result.json")}


def test_run_then_resume(tmp_path: Path):
    study = write_study(tmp_path, tiny_study("resume", [{"field": "model.embedDim", "values": [32, 64]}]))
    out = tmp_path / "out"

    first = wxscale("run", str(study), "--output", str(out))
    assert first.returncode == 0, first.stderr[-3000:]

    records = results(out)
    assert len(records) == 2
    for record in records.values():
        assert record["state"] == "Succeeded"
        assert record["training"]["steps"] == 20
        assert record["training"]["samples"] == 160
        assert record["evaluation"]["variables"]["tracer"]["persistence"]["rmse"] > 0
        assert record["inference"]["latencyMsBatch1"] > 0

    status = json.loads((out / "status.json").read_text())["status"]
    assert status["phase"] == "Succeeded"
    assert status["trials"] == {"total": 2, "pending": 0, "running": 0, "succeeded": 2, "failed": 0}
    assert {c["type"]: c["status"] for c in status["conditions"]}["Complete"] == "True"
    assert "fit" in status
    assert (out / "report.md").exists()
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 3

    # A second run finds both results and launches nothing.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/result.json")}
    second = wxscale("run", str(study), "--output", str(out))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming: 2 of 2 trials already finished" in second.stderr
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("trials/*/result.json")}


def test_failing_trial_retried_then_recorded(tmp_path: Path):
    # The efficient attention kernel does not run on CPU, so that trial fails every attempt.
    document = tiny_study("failing", [{"field": "training.attentionBackend", "values": ["math", "efficient"]}],
                          maxRetries=1, maxFailedTrials=1)
    out = tmp_path / "out"
    run = wxscale("run", str(write_study(tmp_path, document)), "--output", str(out), "--no-report")
    assert run.returncode == 0, run.stderr[-3000:]

    by_state = {r["state"]: r for r in results(out).values()}
    failed = by_state["Failed"]
    assert failed["attempts"] == 2
    assert "attentionBackend" in failed["error"]
    assert by_state["Succeeded"]["config"]["training"]["attentionBackend"] == "math"

    status = json.loads((out / "status.json").read_text())["status"]
    assert status["trialsFailed"] == 1
    assert status["phase"] == "Succeeded"  # one failure is within maxFailedTrials


def test_study_fails_past_failure_budget(tmp_path: Path):
    document = tiny_study("over-budget", [{"field": "training.attentionBackend", "values": ["efficient"]}],
                          maxRetries=0, maxFailedTrials=0)
    out = tmp_path / "out"
    run = wxscale("run", str(write_study(tmp_path, document)), "--output", str(out))
    assert run.returncode == 1
    status = json.loads((out / "status.json").read_text())["status"]
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True"
    assert failed["reason"] == "TooManyFailedTrials"


def _default_sigint() -> None:
    # A shell that starts a job in the background without job control (as CI runners may) sets SIGINT to
    # ignored, children inherit that, and Python then installs no KeyboardInterrupt handler. Ctrl-C in a
    # terminal reaches a process with the default disposition, so the test restores it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_keeps_finished_results(tmp_path: Path, signum: int, code: int):
    # One trial at a time, so the first result exists while the second still runs. The second is far too long
    # to finish before the interrupt, even when the machine is idle and fast.
    document = tiny_study("interrupted", [{"field": "training.budget.steps", "values": [10, 100_000]}],
                          maxConcurrentTrials=1)
    study = write_study(tmp_path, document)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "wxscale", "run", str(study), "--output", str(out),
                                "--no-progress"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("trials/*/result.json")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert list(out.glob("trials/*/result.json")), "the first trial did not finish in time"
        (finished_id,) = [p.parent.name for p in out.glob("trials/*/result.json")]
        # Interrupt once the second trial is training, so the interrupt hits a running trial.
        while time.monotonic() < deadline and not any(
            "step " in log.read_text(errors="replace") for log in (out / "logs").glob("*.log")
            if log.stem != finished_id
        ):
            time.sleep(0.5)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            # The trainers run in sessions of their own and outlive a killed executor. Without this, the long
            # second trial would keep training for the rest of the test session.
            subprocess.run(["pkill", "-f", f"--output {out}"], check=False)
    assert process.returncode == code, stderr[-3000:]
    assert "Run the same command again to resume" in stderr

    (finished,) = results(out).values()
    assert finished["state"] == "Succeeded"
    assert finished["training"]["steps"] == 10
    status = json.loads((out / "status.json").read_text())["status"]
    assert status["trialsSucceeded"] == 1
    assert not any(p.name.startswith(".tmp-") for p in out.rglob("*"))

    # No trainer process survives the interrupt.
    leftover = subprocess.run(["pgrep", "-f", f"--output {out}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_results_to_s3(tmp_path: Path):
    server_module = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_ENDPOINT_URL=endpoint)
        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("wxscale-results")

        study = write_study(tmp_path, tiny_study("to-s3", [{"field": "model.embedDim", "values": [32]}]))
        run = wxscale("run", str(study), "--output", "s3://wxscale-results/studies/to-s3", env=env)
        assert run.returncode == 0, run.stderr[-3000:]

        fs.invalidate_cache()
        keys = fs.find("wxscale-results/studies/to-s3")
        assert any(k.endswith("/result.json") for k in keys)
        assert "wxscale-results/studies/to-s3/status.json" in keys
        assert "wxscale-results/studies/to-s3/report.md" in keys
        record = json.loads(fs.cat(next(k for k in keys if k.endswith("/result.json"))))
        assert record["state"] == "Succeeded"
    finally:
        server.stop()


def test_real_data_trial(tmp_path: Path, ncep_air: Path):
    document = tiny_study("ncep-smoke", [{"field": "model.embedDim", "values": [32]}])
    document["spec"]["data"] = {
        "source": str(ncep_air),
        "train": {"start": "2013-01-01", "end": "2014-06-30T18:00"},
        "validation": {"start": "2014-07-01", "end": "2014-09-30T18:00"},
        "test": {"start": "2014-10-01", "end": "2014-12-31T18:00"},
        "history": 2,
    }
    document["spec"]["model"]["patchSize"] = 3
    out = tmp_path / "out"
    run = wxscale("run", str(write_study(tmp_path, document)), "--output", str(out), "--no-report")
    assert run.returncode == 0, run.stderr[-3000:]

    (record,) = results(out).values()
    air = record["evaluation"]["variables"]["air"]
    assert air["units"] == "degK" or air["units"].startswith("K") or air["units"] == "K"
    # Persistence at 6 h on Oct-Dec 2014 is about 2.1-2.3 K.
    assert 1.8 < air["persistence"]["rmse"] < 2.6
    assert record["data"]["grid"] == [25, 53]
    assert record["data"]["synthetic"] is False
    assert record["data"]["loader"] == "memory"
