"""The trial file: what the executor or the operator hands to a trainer process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wxscale.planner import Trial
from wxscale.spec import API_VERSION, TrialConfig


@dataclass
class TrialSpec:
    """One trial as the trainer reads it: identity, config and the resolved step count."""

    study: str
    trial: str
    index: int
    axis_values: dict[str, Any]
    config: TrialConfig
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": "TrialSpec",
            "study": self.study,
            "trial": self.trial,
            "index": self.index,
            "axisValues": self.axis_values,
            "steps": self.steps,
            "config": self.config.dump(),
        }

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> TrialSpec:
        return cls(
            study=document["study"],
            trial=document["trial"],
            index=int(document.get("index", 0)),
            axis_values=document.get("axisValues", {}),
            config=TrialConfig.model_validate(document["config"]),
            steps=int(document["steps"]),
        )

    @classmethod
    def from_trial(cls, study: str, trial: Trial) -> TrialSpec:
        return cls(study=study, trial=trial.id, index=trial.index, axis_values=trial.axis_values,
                   config=trial.config, steps=trial.steps)


def trial_folder(trial_id: str) -> str:
    """Relative folder of a trial under the study's output location."""
    return f"trials/{trial_id}"
