"""Compute-optimal designs: IsoFLOP and ladder planning, the study budget cap, and the cool-down branch."""

from __future__ import annotations

import contextlib
import copy
import math
import subprocess
import sys

import pytest
import torch

from wxscale.designs import BUDGET_KEY, LADDER_BUDGETS_KEY, cooldown_steps, ladder_branch_steps
from wxscale.errors import StudyError
from wxscale.flops import model_cost
from wxscale.planner import GridInfo, expand, plan
from wxscale.metrics import latitude_weighted_mse_loss
from wxscale.model import WeatherViT
from wxscale.spec import ModelSpec, ScheduleSpec, TrainingSpec, TrialConfig
from wxscale.study import load_study, parse_study

from conftest import REPO
from test_spec import minimal, problems_of

SHAPES = [(1, 32), (2, 32), (2, 48), (3, 48), (3, 64), (4, 64), (4, 96)]
BUDGETS = [1e11, 3e11, 1e12]


def fixed_grid(_data) -> GridInfo:
    return GridInfo(n_lat=32, n_lon=64, variables=("tracer",), step_hours=6.0)


def design_document(kind: str = "isoflop", budgets=BUDGETS, sizes_per_budget: int | None = 4, **design) -> dict:
    document = minimal()
    document["spec"]["data"]["history"] = 2
    document["spec"]["model"] = {"patchSize": 4}
    document["spec"]["training"] = {"batchSize": 16}
    if kind == "compute_ladder":
        document["spec"]["training"]["schedule"] = {"kind": "constant_cooldown"}
    document["spec"]["design"] = {
        "kind": kind,
        "budgets": list(budgets),
        "sizes": {"name": "size", "values": [{"model.depth": depth, "model.embedDim": width, "model.heads": 4}
                                             for depth, width in SHAPES]},
        "sizesPerBudget": sizes_per_budget,
        **design,
    }
    return document


def flops_per_sample(trial) -> float:
    """FLOPs per sample from wxscale's FLOPs model for the trial's shape on the fixed grid (history 2, 1 variable)."""
    return model_cost(trial.config.model, (32, 64), in_channels=2, out_channels=1).flops_per_sample


# IsoFLOP planning ---------------------------------------------------------------


def test_isoflop_trials_hit_budgets_within_one_percent():
    trials = plan(parse_study(design_document()), fixed_grid)
    assert len(trials) == 12
    for trial in trials:
        budget = trial.axis_values[BUDGET_KEY]
        assert trial.total_flops == pytest.approx(flops_per_sample(trial) * trial.samples)
        assert abs(trial.total_flops / budget - 1) <= 0.01, (trial.axis_values, trial.total_flops)
        assert trial.config.training.budget.samples == trial.samples
        assert trial.samples % trial.config.training.batch_size == 0


def test_isoflop_budget_is_not_six_n_d():
    """The budget follows the analytic FLOPs model, which counts attention and embeddings beyond 6 N D."""
    trials = plan(parse_study(design_document()), fixed_grid)
    six_nd = [6 * trial.non_embedding_params * trial.samples / trial.total_flops for trial in trials]
    assert max(six_nd) < 0.9


def test_isoflop_sizes_move_up_with_budget():
    trials = plan(parse_study(design_document()), fixed_grid)
    by_budget = {budget: sorted(t.non_embedding_params for t in trials if t.axis_values[BUDGET_KEY] == budget)
                 for budget in BUDGETS}
    assert [len(sizes) for sizes in by_budget.values()] == [4, 4, 4]
    smallest = [sizes[0] for sizes in by_budget.values()]
    assert smallest == sorted(smallest)
    assert smallest[-1] > smallest[0]


def test_isoflop_sizes_centred_on_tokens_per_parameter():
    """A larger tokensPerParameter expects smaller models at the same budget."""
    few = plan(parse_study(design_document(tokensPerParameter=5)), fixed_grid)
    many = plan(parse_study(design_document(tokensPerParameter=500)), fixed_grid)
    assert min(t.non_embedding_params for t in many) < min(t.non_embedding_params for t in few)


def test_isoflop_all_sizes_by_default():
    trials = plan(parse_study(design_document(sizes_per_budget=None)), fixed_grid)
    assert len(trials) == len(SHAPES) * len(BUDGETS)


def test_isoflop_ids_are_config_hashes():
    first = plan(parse_study(design_document()), fixed_grid)
    second = plan(parse_study(design_document()), fixed_grid)
    assert [t.id for t in first] == [t.id for t in second]
    assert len({t.id for t in first}) == len(first)


def test_budget_missed_by_rounding_is_rejected():
    """At 2e9 FLOPs the largest shapes train a step or two, far from the budget."""
    with pytest.raises(StudyError) as caught:
        plan(parse_study(design_document(budgets=[2e9, 1e12], sizes_per_budget=None)), fixed_grid)
    message = str(caught.value)
    assert "spec.design.budgets[0]" in message
    assert "off the budget (tolerance 1 %)" in message


def test_looser_tolerance_accepts_rounding():
    trials = plan(parse_study(design_document(budgets=[3e10, 1e11], tolerance=0.2)), fixed_grid)
    assert all(abs(t.total_flops / t.axis_values[BUDGET_KEY] - 1) <= 0.2 for t in trials)


def test_design_sizes_checked_without_data():
    document = design_document()
    document["spec"]["design"]["sizes"]["values"][1] = {"model.depth": 2, "model.embedDim": 30, "model.heads": 4}
    problems = problems_of(document)
    assert any(problem.startswith("spec.design.sizes.values[1]") and "divisible by heads" in problem
               for problem in problems)


def test_design_unknown_field_named():
    document = design_document()
    document["spec"]["design"]["sizes"]["values"][0] = {"model.depht": 1}
    problems = problems_of(document)
    assert any("spec.design.sizes" in problem and "model.depht" in problem for problem in problems)


# Spec validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda s: s.update(axes=[{"field": "model.depth", "values": [1, 2]}]), "design replaces axes and points"),
        (lambda s: s["design"].update(budgets=[3e11, 1e11]), "strictly ascending"),
        (lambda s: s["design"].update(sizesPerBudget=9), "larger than the number of shapes"),
        (lambda s: s["design"]["sizes"].update(values=[{"model.depth": 1}, {"model.depth": 2}]), "at least 3 shapes"),
        (lambda s: s["design"].update(kind="compute_ladder"), "needs training.schedule.kind constant_cooldown"),
        (lambda s: s.update(computeBudget={"maxGpuHours": 3}), "maxGpuHours needs flopsPerGpuSecond"),
        (lambda s: s.update(computeBudget={}), "give maxFlops, maxGpuHours or both"),
        (lambda s: s["training"].update(ladderSteps=[10, 20]), "ladderSteps needs schedule.kind constant_cooldown"),
    ],
)
def test_design_spec_rejects(change, expected):
    document = design_document()
    change(document["spec"])
    problems = problems_of(document)
    assert any(expected in problem for problem in problems), problems


def test_compute_ladder_needs_ddp():
    document = design_document("compute_ladder")
    document["spec"]["distributed"] = {"strategy": "fsdp", "procsPerNode": 2}
    assert any("ddp only" in problem for problem in problems_of(document))


# Study budget cap ---------------------------------------------------------------


def test_budget_cap_rejects_with_excess():
    planned = sum(trial.total_flops for trial in plan(parse_study(design_document()), fixed_grid))
    document = design_document()
    document["spec"]["computeBudget"] = {"maxFlops": 4e12}
    with pytest.raises(StudyError) as caught:
        plan(parse_study(document), fixed_grid)
    message = str(caught.value)
    assert "spec.computeBudget.maxFlops" in message
    assert f"{planned - 4e12:.4g} FLOPs" in message
    assert f"({100 * (planned - 4e12) / 4e12:.1f} %)" in message


def test_budget_cap_in_gpu_hours():
    document = design_document()
    # About 5.6e12 FLOPs at 1e9 FLOP/s is 1.56 GPU-hours, 0.56 over the cap.
    document["spec"]["computeBudget"] = {"maxGpuHours": 1.0, "flopsPerGpuSecond": 1e9}
    with pytest.raises(StudyError) as caught:
        plan(parse_study(document), fixed_grid)
    assert "spec.computeBudget.maxGpuHours" in str(caught.value)
    assert "0.5558 GPU-hours (55.6 %) over the cap of 1;" in str(caught.value)


def test_budget_cap_allows_design_below_it():
    document = design_document()
    document["spec"]["computeBudget"] = {"maxFlops": 6e12, "maxGpuHours": 2.0, "flopsPerGpuSecond": 1e9}
    assert len(plan(parse_study(document), fixed_grid)) == 12


def test_budget_cap_applies_to_grids():
    document = minimal()
    document["spec"]["axes"] = [{"field": "model.depth", "values": [1, 2]}]
    document["spec"]["computeBudget"] = {"maxFlops": 1e9}
    with pytest.raises(StudyError, match="over the cap"):
        plan(parse_study(document), fixed_grid)


# Compute ladder -----------------------------------------------------------------


def test_ladder_one_trial_per_size():
    trials = plan(parse_study(design_document("compute_ladder")), fixed_grid)
    isoflop = plan(parse_study(design_document()), fixed_grid)
    assert len(trials) == len({t.non_embedding_params for t in isoflop})
    for trial in trials:
        budgets = trial.axis_values[LADDER_BUDGETS_KEY]
        ladder = trial.config.training.ladder_steps or []
        assert len(ladder) == len(budgets) - 1
        fps = flops_per_sample(trial)
        batch = trial.config.training.batch_size
        for length, budget in zip(ladder + [trial.steps], budgets):
            assert abs(fps * length * batch / budget - 1) <= 0.01


def test_ladder_flops_include_cooldown_branches():
    trials = plan(parse_study(design_document("compute_ladder")), fixed_grid)
    laddered = [t for t in trials if t.config.training.ladder_steps]
    assert laddered
    for trial in laddered:
        branch = sum(cooldown_steps(length, 0.2) for length in trial.config.training.ladder_steps)
        assert ladder_branch_steps(trial.config) == branch > 0
        expected = flops_per_sample(trial) * (trial.steps + branch) * trial.config.training.batch_size
        assert trial.total_flops == pytest.approx(expected)


def test_ladder_costs_less_than_isoflop():
    ladder = sum(t.total_flops for t in plan(parse_study(design_document("compute_ladder")), fixed_grid))
    isoflop = sum(t.total_flops for t in plan(parse_study(design_document()), fixed_grid))
    assert ladder < isoflop


def test_ladder_branch_inside_warmup_rejected():
    document = design_document("compute_ladder", budgets=[1e11, 1e13], sizes_per_budget=None)
    document["spec"]["training"]["schedule"]["warmupFraction"] = 0.5
    with pytest.raises(StudyError, match="inside the warm-up"):
        plan(parse_study(document), fixed_grid)


def test_ladder_steps_longer_than_trial_rejected():
    document = minimal()
    document["spec"]["training"] = {"schedule": {"kind": "constant_cooldown"}, "budget": {"steps": 50},
                                    "ladderSteps": [20, 60]}
    with pytest.raises(StudyError, match="contains 60, not shorter than the trial's 50 steps"):
        plan(parse_study(document), fixed_grid)


# Example and command line -------------------------------------------------------


def test_example_plans_three_budgets_by_four_sizes():
    study = load_study(REPO / "examples" / "isoflop.yaml")
    trials = plan(study)
    assert len(trials) == 12
    assert len({t.axis_values[BUDGET_KEY] for t in trials}) == 3
    for trial in trials:
        assert abs(trial.total_flops / trial.axis_values[BUDGET_KEY] - 1) <= 0.01
    assert sum(t.total_flops for t in trials) <= study.spec.compute_budget.max_flops


def test_cli_plan_shows_flops_params_and_samples():
    result = subprocess.run([sys.executable, "-m", "wxscale", "plan", "examples/isoflop.yaml"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    for column in ("params", "samples", "FLOPs"):
        assert column in header
    assert "12 trial(s)" in result.stdout
    assert BUDGET_KEY in result.stdout


def test_validate_counts_design_trials():
    trials, problems = expand(parse_study(design_document()), fixed_grid)
    assert problems == []
    assert len(trials) == 12


# Cool-down branch in the trainer ------------------------------------------------


def test_cooldown_branch_restores_the_run():
    """A branch trains and evaluates a cooled-down copy, then leaves model and optimizer as they were."""
    from wxscale_trainer.distributed import CommunicationMeter, build_strategy
    from wxscale_trainer.runtime import Runtime
    from wxscale_trainer.train import cooldown_branch

    torch.manual_seed(0)
    shape = ModelSpec(depth=1, heads=2, embed_dim=16, patch_size=4)
    trial_config = TrialConfig(data=parse_study(minimal()).spec.data, model=shape)
    runtime = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    model = WeatherViT(shape, grid=(8, 16), in_channels=1, out_channels=1)
    weights = torch.ones(8)
    strategy = build_strategy(model, trial_config, runtime, CommunicationMeter(), contextlib.nullcontext,
                              lambda prediction, target, mask: latitude_weighted_mse_loss(prediction, target,
                                                                                           weights, mask))
    optimizer = torch.optim.AdamW(strategy.module.parameters(), lr=1e-2)
    training = TrainingSpec(schedule={"kind": "constant_cooldown", "warmupFraction": 0.0}, optimizer={"lr": 1e-2})

    def batches():
        generator = torch.Generator().manual_seed(1)
        while True:
            x = torch.randn(4, 1, 8, 16, generator=generator)
            yield x, x.roll(1, dims=-1), torch.ones_like(x, dtype=torch.bool)

    stream = batches()
    for _ in range(3):
        x, y, mask = next(stream)
        strategy.forward_backward(x, y, mask)
        strategy.optimizer_step(optimizer, 1.0)
    before = copy.deepcopy(strategy.module.state_dict())
    optimizer_before = copy.deepcopy(optimizer.state_dict())

    seen = {}

    def evaluate():
        seen["weights"] = copy.deepcopy(strategy.module.state_dict())
        return {"evaluation": {"testLoss": 0.5}}

    point = cooldown_branch(strategy, optimizer, stream, start=3, length=8, training=training, accumulation=1,
                            device=torch.device("cpu"), evaluate=evaluate)

    assert point["steps"] == 8
    assert point["cooldownSteps"] == 5
    assert point["samples"] == 8 * training.batch_size
    assert any(not torch.equal(seen["weights"][name], before[name]) for name in before)
    for name, tensor in strategy.module.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    for index, state in optimizer.state_dict()["state"].items():
        assert torch.equal(state["exp_avg"], optimizer_before["state"][index]["exp_avg"])
        assert float(state["step"]) == float(optimizer_before["state"][index]["step"])


def test_cooldown_steps_match_schedule():
    """The branch length is the cool-down that lr_multiplier gives a run of that length."""
    from wxscale_trainer.schedule import lr_multiplier

    schedule = ScheduleSpec(kind="constant_cooldown", cooldown_fraction=0.2, warmup_fraction=0.0)
    length = 57
    cooldown = cooldown_steps(length, 0.2)
    assert lr_multiplier(length - cooldown - 1, length, schedule) == 1.0
    assert lr_multiplier(length - cooldown, length, schedule) < 1.0
    assert math.isclose(lr_multiplier(length - 1, length, schedule), schedule.min_lr_ratio)
