"""Print the field reference of the ScalingStudy spec as Markdown (docs/study.md is its output)."""

from __future__ import annotations

import sys
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from wxscale.spec import StudySpec

HEADER = """# ScalingStudy reference

Every field of `spec`, generated from the typed model in `wxscale/spec.py` by
`python scripts/study_reference.py > docs/study.md`. YAML keys are camelCase.
Unknown fields are rejected. Any field of `data`, `model`, `training` and
`distributed` can be varied along an axis (`spec.axes`).

| field | type | default | description |
| --- | --- | --- | --- |
"""


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("wxscale.spec.", "")
    # Constrained items (list[Annotated[float, FieldInfo(...)]]) read as their base type.
    while "Annotated[" in text:
        start = text.index("Annotated[")
        base_end = text.index(",", start)
        depth, end = 0, start + len("Annotated")
        for end in range(end, len(text)):
            depth += {"[": 1, "]": -1}.get(text[end], 0)
            if depth == 0:
                break
        text = text[:start] + text[start + len("Annotated["):base_end] + text[end + 1:]
    text = text.replace("<class '", "").replace("'>", "").replace("NoneType", "null")
    return text.replace("|", "or")


def _nested_model(annotation) -> type[BaseModel] | None:
    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def rows(model: type[BaseModel], prefix: str) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        path = f"{prefix}.{key}"
        nested = _nested_model(field.annotation)
        if field.default is not PydanticUndefined:
            default = "null" if field.default is None else f"`{field.default}`"
        elif field.default_factory is not None:
            empty = field.default_factory()
            default = "see fields" if nested and not isinstance(empty, list) else f"`{empty}`"
        else:
            default = "required"
        description = field.description or ""
        if not description and nested is not None and nested.__doc__:
            description = nested.__doc__.strip().splitlines()[0]
        if nested is None:
            type_name = _type_name(field.annotation)
        elif typing.get_origin(field.annotation) is list or "list[" in str(field.annotation):
            type_name = f"list of {nested.__name__}"
            path += "[]"
        else:
            type_name = nested.__name__
        lines.append(f"| `{path}` | {type_name} | {default} | {description} |")
        if nested is not None:
            lines.extend(rows(nested, path))
    return lines


def main() -> int:
    sys.stdout.write(HEADER + "\n".join(rows(StudySpec, "spec")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
