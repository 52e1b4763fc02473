"""Read and validate ScalingStudy documents, reporting every error at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from wxscale.errors import StudyError, describe_validation_error
from wxscale.spec import ScalingStudy


def parse_study(document: Any, source: str = "<study>") -> ScalingStudy:
    """Validate a parsed document and return the study, or raise StudyError listing every problem.

    Beyond the schema, this also plans the trials, so axis values that make an
    invalid trial (a depth of 0, heads that do not divide the width) are reported
    here with the axis they came from.
    """
    from wxscale.planner import axis_problems  # The planner imports this module.

    if not isinstance(document, dict):
        raise StudyError(source, [f"the document must be a mapping with apiVersion, kind, metadata and spec, got {type(document).__name__}"])
    try:
        study = ScalingStudy.model_validate(document)
    except ValidationError as error:
        raise StudyError(source, describe_validation_error(error)) from None

    problems = axis_problems(study)
    if problems:
        raise StudyError(source, problems)
    return study


def load_study(path: str | Path) -> ScalingStudy:
    """Read a study YAML file; raise StudyError naming the file for a missing or malformed one."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(str(path), ["file not found; pass the path of a ScalingStudy YAML file (see examples/)"])
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except yaml.YAMLError as error:
        raise StudyError(str(path), [f"invalid YAML: {error}"]) from None
    if len(documents) != 1:
        raise StudyError(str(path), [f"expected exactly one YAML document, found {len(documents)}"])
    return parse_study(documents[0], str(path))
