"""Training checkpoints: save, find, prune and load, locally and on S3, and resuming a killed trial."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from wxscale.planner import plan
from wxscale.spec import CheckpointSpec
from wxscale.storage import Location
from wxscale.study import parse_study
from wxscale.trialspec import TrialSpec
from wxscale_trainer.checkpoint import Checkpointer, ResumableSampler, endless_batches, step_folder, storage_bytes
from wxscale_trainer.distributed import CommunicationMeter, Strategy
from wxscale_trainer.runtime import Runtime

ONE_PROCESS = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def linear_strategy(seed: int) -> tuple[Strategy, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    strategy = Strategy(model, ONE_PROCESS, CommunicationMeter(), contextlib.nullcontext,
                        lambda prediction, target, mask: (prediction - target).square().mean(), "fp32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return strategy, optimizer


def take_step(strategy: Strategy, optimizer: torch.optim.Optimizer) -> None:
    x = torch.ones(2, 4)
    strategy.module(x).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


# Schedule and data order ----------------------------------------------------------------


@pytest.mark.parametrize(("every", "final", "due"), [
    (None, True, [10]),
    (3, True, [3, 6, 9, 10]),
    (5, False, [5]),  # step 10 is the last one, and final checkpoints are off
    (None, False, []),
])
def test_checkpoints_due(every, final, due):
    checkpointer = Checkpointer(Location("unused"), CheckpointSpec(every_steps=every, final=final), ONE_PROCESS)
    assert [step for step in range(1, 11) if checkpointer.due(step, 10)] == due


def test_endless_batches_resume_in_order():
    data = torch.utils.data.TensorDataset(torch.arange(10))

    def batches(start: int) -> list[list[int]]:
        sampler = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3, drop_last=True)
        loader = torch.utils.data.DataLoader(data, batch_size=3, sampler=sampler, drop_last=True)
        iterator = endless_batches(loader, sampler, start_batch=start)
        return [next(iterator)[0].tolist() for _ in range(8 - start)]

    uninterrupted = batches(0)
    # Three batches per epoch: start mid-epoch (4) and at an epoch boundary (6).
    assert batches(4) == uninterrupted[4:]
    assert batches(6) == uninterrupted[6:]
    assert uninterrupted[0] != uninterrupted[3]  # each epoch has its own order


# Local and S3 round trips -----------------------------------------------------------------


def round_trip(location: Location) -> None:
    spec = CheckpointSpec(every_steps=1, keep=2)
    strategy, optimizer = linear_strategy(seed=0)
    checkpointer = Checkpointer(location, spec, ONE_PROCESS)
    for step in (1, 2, 3):
        take_step(strategy, optimizer)
        checkpointer.save(step, strategy.checkpoint_state(optimizer), {"note": f"after {step}"})

    # keep=2: the checkpoint of step 1 is gone once step 3 is complete.
    assert checkpointer.complete_steps() == [2, 3]
    assert not location.exists(f"checkpoints/{step_folder(1)}")
    summary = checkpointer.summary()
    assert summary["written"] == 3
    assert summary["lastBytes"] > 0
    assert summary["storedBytes"] == storage_bytes(location.child("checkpoints"))

    # A fresh model with other weights loads step 3 and takes the same next step.
    expected = {name: value.clone() for name, value in strategy.module.state_dict().items()}
    take_step(strategy, optimizer)
    after_step = strategy.module.weight.detach().clone()

    restored, restored_optimizer = linear_strategy(seed=1)
    state = restored.checkpoint_state(restored_optimizer)
    trainer_state = Checkpointer(location, spec, ONE_PROCESS).load(3, state)
    restored.load_checkpoint_state(restored_optimizer, state)
    assert trainer_state == {"step": 3, "note": "after 3"}
    for name, value in restored.module.state_dict().items():
        assert torch.equal(value, expected[name]), name
    take_step(restored, restored_optimizer)
    assert torch.allclose(restored.module.weight, after_step)


def test_round_trip_local(tmp_path: Path):
    round_trip(Location(tmp_path / "trial"))


def test_incomplete_checkpoint_is_ignored(tmp_path: Path):
    location = Location(tmp_path / "trial")
    strategy, optimizer = linear_strategy(seed=0)
    checkpointer = Checkpointer(location, CheckpointSpec(every_steps=1), ONE_PROCESS)
    checkpointer.save(1, strategy.checkpoint_state(optimizer), {})
    # A process killed while writing step 2 leaves data files without the marker.
    (tmp_path / "trial" / "checkpoints" / step_folder(2)).mkdir()
    (tmp_path / "trial" / "checkpoints" / step_folder(2) / "__0_0.distcp").write_bytes(b"partial")
    assert checkpointer.latest_step() == 1

    checkpointer.save(2, strategy.checkpoint_state(optimizer), {})
    assert checkpointer.latest_step() == 2
    assert not (tmp_path / "trial" / "checkpoints" / step_folder(1)).exists()


@pytest.fixture
def s3_location(tmp_path: Path, monkeypatch):
    server_module = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint}).mkdir("ckpt")
        yield Location("s3://ckpt/study/trials/t-1", endpoint)
    finally:
        server.stop()


def test_round_trip_s3(s3_location: Location):
    round_trip(s3_location)


# A killed trial resumes ------------------------------------------------------------------

STEPS = 160


def write_trial(tmp_path: Path) -> Path:
    document = {
        "apiVersion": "wxscale.io/v1alpha1",
        "kind": "ScalingStudy",
        "metadata": {"name": "resume"},
        "spec": {
            "data": {
                "source": "synthetic",
                "synthetic": {"lat": 16, "lon": 32, "steps": 240},
                "train": {"start": "2000-01-01", "end": "2000-01-31"},
                "validation": {"start": "2000-02-01", "end": "2000-02-15"},
                "test": {"start": "2000-02-16", "end": "2000-02-29"},
            },
            "model": {"depth": 2, "heads": 2, "embedDim": 32},
            # Checkpoints every 30 steps and validation every 20, so a resumed run restarts between two points
            # of the curve and has to carry the partial training-loss sum over.
            "training": {"batchSize": 8, "budget": {"steps": STEPS}, "evalEvery": 20, "evalBatches": 2,
                         "device": "cpu", "numThreads": 1, "checkpoint": {"everySteps": 30}},
        },
    }
    study = parse_study(document)
    (trial,) = plan(study)
    path = tmp_path / "trial.json"
    path.write_text(json.dumps(TrialSpec.from_trial("resume", trial).to_dict()))
    return path


def trainer(trial: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wxscale_trainer", "--trial", str(trial), "--output", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def result(out: Path) -> dict:
    (path,) = out.glob("trials/*/result.json")
    return json.loads(path.read_text())


def test_killed_trial_resumes(tmp_path: Path):
    trial = write_trial(tmp_path)

    reference_out = tmp_path / "uninterrupted"
    reference = trainer(trial, reference_out)
    killed_out = tmp_path / "killed"
    killed = trainer(trial, killed_out)

    # Kill the second run as soon as its first checkpoint is complete.
    deadline = time.monotonic() + 300
    while not list(killed_out.glob("trials/*/checkpoints/*/trainer.json")):
        assert killed.poll() is None, killed.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not list(killed_out.glob("trials/*/result.json")), "the trial finished before it was killed"

    resumed = trainer(trial, killed_out)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]

    expected, record = result(reference_out), result(killed_out)
    checkpoint = record["training"]["checkpoint"]
    assert 30 <= checkpoint["resumedFromStep"] < STEPS
    assert record["training"]["steps"] == STEPS
    assert [point["step"] for point in record["training"]["curve"]] == list(range(20, STEPS + 1, 20))
    for mine, reference_point in zip(record["training"]["curve"], expected["training"]["curve"]):
        assert mine["trainLoss"] == pytest.approx(reference_point["trainLoss"], rel=1e-5), mine["step"]
        assert mine["validationLoss"] == pytest.approx(reference_point["validationLoss"], rel=1e-5), mine["step"]
    assert record["evaluation"]["testLoss"] == pytest.approx(expected["evaluation"]["testLoss"], rel=1e-5)
    # keep=1: only the final checkpoint remains.
    folders = sorted(path.name for path in killed_out.glob("trials/*/checkpoints/*"))
    assert folders == [f"step-{STEPS:08d}"]
