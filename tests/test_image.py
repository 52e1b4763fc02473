"""The container image: built with scripts/build-image.sh, then run with podman.

The build needs root, podman and debootstrap (scripts/system-tools.sh installs
them); the tests skip with the reason when one is missing. The first build
also debootstraps the base image and installs torch and the dependencies (a
few minutes). Later builds reuse podman's layer cache and take well under a
minute when only the project's sources changed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO
from wxscale.planner import plan
from wxscale.spec import ScalingStudy
from wxscale.trialspec import TrialSpec, trial_folder

pytestmark = pytest.mark.slow

logger = logging.getLogger(__name__)

IMAGE = "localhost/wxscale:dev"
CONTAINERS_CONF = REPO / "scripts" / "containers.conf"
BUILD_TIMEOUT_S = 1800
RUN_TIMEOUT_S = 300


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman_run(*args: str, timeout: int = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a command in a new container of the image with the pod's restrictions (read-only root, tmpfs /tmp)."""
    command = ["podman", "run", "--rm", "--read-only", "--read-only-tmpfs", "--network=none", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=podman_env())


@pytest.fixture(scope="module")
def image() -> str:
    """Build the image once per module and return its tag."""
    missing = [program for program in ("podman", "debootstrap") if shutil.which(program) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (scripts/system-tools.sh installs them as root)")
    if os.geteuid() != 0:
        pytest.skip("building the debootstrap base image needs root")

    started = time.perf_counter()
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-image.sh")],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, cwd=REPO,
        env={**podman_env(), "WXSCALE_IMAGE": IMAGE},
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        pytest.fail(f"scripts/build-image.sh failed (exit {result.returncode}):\n"
                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")

    size = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE],
                          capture_output=True, text=True, env=podman_env(), check=True).stdout.strip()
    logger.info("built %s in %.0f s, %.0f MB", IMAGE, elapsed, int(size) / 1e6)
    return IMAGE


def test_default_command_is_operator(image: str) -> None:
    result = subprocess.run(["podman", "image", "inspect", "--format", "{{json .Config.Cmd}}", image],
                            capture_output=True, text=True, env=podman_env(), check=True)
    assert json.loads(result.stdout) == ["wxscale-operator"]


def test_runs_as_non_root(image: str) -> None:
    result = podman_run(image, "id", "-u")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "10001"


def test_operator_help(image: str) -> None:
    result = podman_run(image, "wxscale-operator", "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--namespace" in result.stdout
    assert "--all-namespaces" in result.stdout


def test_trainer_help(image: str) -> None:
    result = podman_run(image, "wxscale-train", "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--trial" in result.stdout
    assert "--output" in result.stdout


def test_trainer_module_help(image: str) -> None:
    result = podman_run(image, "python", "-m", "wxscale_trainer", "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--trial" in result.stdout


def test_torchrun_available(image: str) -> None:
    # The operator starts every trial as `torchrun ... -m wxscale_trainer`.
    result = podman_run(image, "torchrun", "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--nproc-per-node" in result.stdout


def test_stdlib_operator_not_shadowed(image: str) -> None:
    # The operator's sources sit in a folder named `operator/`; the standard library's module must win.
    result = podman_run(image, "python", "-c", "import operator; print(operator.__file__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("/usr/")


def tiny_study() -> ScalingStudy:
    """One trial on the synthetic source: a 16 x 32 grid, depth 1, 20 steps."""
    return ScalingStudy.model_validate({
        "apiVersion": "wxscale.io/v1alpha1",
        "kind": "ScalingStudy",
        "metadata": {"name": "image-smoke"},
        "spec": {
            "data": {
                "source": "synthetic",
                "synthetic": {"lat": 16, "lon": 32, "steps": 240},
                "train": {"start": "2000-01-01", "end": "2000-02-09T18:00"},
                "validation": {"start": "2000-02-10", "end": "2000-02-19T18:00"},
                "test": {"start": "2000-02-20", "end": "2000-02-29T18:00"},
            },
            "model": {"patchSize": 4, "depth": 1, "heads": 2, "embedDim": 32},
            "training": {"batchSize": 8, "budget": {"steps": 20}, "evalEvery": 10, "evalBatches": 2,
                         "device": "cpu", "numThreads": 1},
        },
    })


def test_tiny_trial_in_container(image: str, tmp_path: Path) -> None:
    study = tiny_study()
    trials = plan(study)
    assert len(trials) == 1
    trial = TrialSpec.from_trial(study.metadata.name, trials[0])

    work = tmp_path / "work"
    work.mkdir()
    (work / "trial.json").write_text(json.dumps(trial.to_dict()))
    # The container runs as uid 10001, which must be able to write the results.
    work.chmod(0o777)

    result = podman_run("--volume", f"{work}:/work", image,
                        "python", "-m", "wxscale_trainer", "--trial", "/work/trial.json", "--output", "/work/out")
    assert result.returncode == 0, f"trainer failed in the container:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    result_path = work / "out" / trial_folder(trial.trial) / "result.json"
    assert result_path.is_file(), f"no result record at {result_path}"
    record = json.loads(result_path.read_text())
    assert record["state"] == "Succeeded"
    assert record["trial"] == trial.trial
    assert record["study"] == "image-smoke"
