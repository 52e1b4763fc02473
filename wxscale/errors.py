"""Errors that reach the user, and the conversion of pydantic errors into readable lines."""

from __future__ import annotations

from typing import Any, Iterable

from pydantic import ValidationError
from pydantic.alias_generators import to_camel


class WxscaleError(Exception):
    """An error with a message meant for the user; the CLI prints it without a traceback."""


class StudyError(WxscaleError):
    """A study file that does not validate. `problems` contains one line per error."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        listing = "\n".join(f"  - {line}" for line in problems)
        super().__init__(f"{source}: {len(problems)} error(s):\n{listing}")


class DataError(WxscaleError):
    """A data source that cannot be read or does not fit the study."""


def format_location(prefix: str, loc: Iterable[Any]) -> str:
    """Join a pydantic error location into a dotted path like `spec.axes[1].values[0]`."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            name = to_camel(str(part)) if "_" in str(part) else str(part)
            path = f"{path}.{name}" if path else name
    return path


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_validation_error(error: ValidationError, prefix: str = "") -> list[str]:
    """Turn a pydantic ValidationError into lines of `path: what is wrong, got VALUE`."""
    lines = []
    for item in error.errors(include_url=False):
        path = format_location(prefix, item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        kind = item["type"]
        if kind == "extra_forbidden":
            message = "unknown field; remove it or check its spelling (fields are camelCase)"
        elif kind == "missing":
            message = "required field is missing"
        value = item.get("input")
        show_value = kind not in ("missing", "value_error", "model_type") and not isinstance(value, dict)
        lines.append(f"{path}: {message}" + (f", got {_short(value)}" if show_value else ""))
    return lines
