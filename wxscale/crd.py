"""The ScalingStudy CustomResourceDefinition, generated from the spec model.

`python -m wxscale.crd > charts/wxscale/crds/scalingstudies.wxscale.io.yaml`
writes the CRD. The spec schema comes from `wxscale.spec.StudySpec` and the
status schema from the models below, which mirror `wxscale.status.build_status`
and the fields the operator adds. A test fails when the checked-in file differs
from the generated one.

Pydantic emits JSON Schema (draft 2020-12); Kubernetes wants a structural
OpenAPI v3.0 schema. The conversion:
  - `$ref` is inlined; a field without a description takes its class's docstring.
  - `Optional[X]` (anyOf X or null) becomes X with `nullable: true`.
  - `Any` and free-form mappings get `x-kubernetes-preserve-unknown-fields`.
  - `const` becomes a one-value `enum`; numeric `exclusiveMinimum: 0` becomes
    `minimum: 0, exclusiveMinimum: true`.
  - datetimes become strings with an ISO 8601 pattern, because the API server's
    `date-time` format rejects the dates alone that the spec accepts.
  - `title`, `additionalProperties: false` and null defaults are dropped
    (the API server prunes unknown fields instead).
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from wxscale.spec import API_VERSION, KIND, StudySpec

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "scalingstudies"
SINGULAR = "scalingstudy"
SHORT_NAMES = ["sst"]
CATEGORIES = ["wxscale"]
CRD_NAME = f"{PLURAL}.{GROUP}"

# Metadata.name in wxscale.spec: job names are built from it, so it is shorter than Kubernetes allows.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_NAME_LENGTH = 40

# ISO 8601 date or date-time as pydantic parses it: 2000-01-01, 2000-01-01T18:00, 2000-01-01 18:00:00Z.
DATETIME_PATTERN = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?$"

# The API server estimates the cost of every CEL rule from the largest value each
# field could hold, and rejects the CRD when a rule could cost too much. An
# unbounded string or list makes `self == oldSelf` look very expensive, so the
# fields under an immutability rule get these bounds when the model sets none.
# NOTE: the cost estimate is only computed by a real API server; no test here runs one.
CEL_MAX_STRING = 1024
CEL_MAX_ITEMS = 256

IMMUTABLE_FIELDS = ("data", "model")


# Status schema ------------------------------------------------------------------


class _StatusModel(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class Condition(_StatusModel):
    """A condition in the Kubernetes API convention shape."""

    type: str = Field(description="Condition type: Running, Complete, Failed, Suspended or SpecAccepted.")
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field("", description="Human-readable details.")
    last_transition_time: str = Field(description="Time the status last changed, RFC 3339.")
    observed_generation: int | None = Field(None, description="metadata.generation the condition was computed from.")


class TrialCounts(_StatusModel):
    """Trials by state."""

    total: int
    pending: int
    running: int
    succeeded: int
    failed: int


class TrialSummary(_StatusModel):
    """One trial's state and headline numbers."""

    trial: str = Field(description="Trial id, a hash of the trial's resolved config.")
    index: int = Field(description="Position in the plan.")
    state: Literal["Pending", "Running", "Succeeded", "Failed"]
    axis_values: dict[str, Any] = Field(description="Axis name to the value this trial takes.")
    params: int = Field(description="Model parameters.")
    planned_flops: float = Field(description="Training FLOPs planned (analytic).")
    samples: int | None = Field(None, description="Training samples seen.")
    flops: float | None = Field(None, description="Training FLOPs spent (analytic).")
    wall_seconds: float | None = Field(None, description="Training wall time in seconds.")
    test_loss: float | None = Field(None, description="Test loss (normalized MSE).")
    test_rmse: float | None = Field(None, alias="testRMSE", description="Test RMSE in physical units, mean over variables.")
    error: str | None = Field(None, description="Why the trial failed (first 300 characters).")
    job: str | None = Field(None, description="Name of the trial's PyTorchJob, while it has one.")
    attempt: int | None = Field(None, description="Attempt number of that job, 0 for the first.")


class BudgetLedger(_StatusModel):
    """FLOPs and GPU-hours planned vs spent."""

    flops_planned: float = Field(description="Training FLOPs of all planned trials (analytic).")
    flops_spent: float = Field(description="Training FLOPs of finished trials (analytic).")
    gpu_hours_spent: float = Field(description="GPUs x wall hours of finished trials.")
    gpu_hours_planned: float | None = Field(
        None, description="Estimate for all trials: hours spent plus remaining FLOPs at the FLOP rate per GPU "
        "measured so far. Null until a GPU trial finished.")
    gpus_allocated: int = Field(0, description="GPUs requested by running trials.")


class ActiveJob(_StatusModel):
    """A trial's current PyTorchJob, kept so that a job that disappears is noticed."""

    trial: str
    job: str
    attempt: int = Field(description="0 for the first attempt; retries count up to spec.maxRetries.")


class StudyStatus(_StatusModel):
    """Observed state of a ScalingStudy, written by the operator."""

    phase: Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"] = Field(
        description="Summary for printer columns; the conditions hold the reasons.")
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = Field(None, description="metadata.generation this status was computed from.")
    trials: TrialCounts
    trials_succeeded: int
    trials_total: int
    trials_failed: int
    progress: str = Field(description="Succeeded/total trials, e.g. 3/6.")
    best_test_rmse: float | None = Field(None, alias="bestTestRMSE",
                                         description="Lowest test RMSE among succeeded trials.")
    fitted_exponent: float | None = Field(None, description="Exponent alpha of the loss-vs-FLOPs power law.")
    results: list[TrialSummary] = Field(
        default_factory=list, description="Per-trial summaries, finished trials first, at most 200.")
    results_truncated: bool = Field(False, description="True when trials beyond the first 200 are left out.")
    budget: BudgetLedger
    fit: dict[str, Any] | None = Field(None, description="Scaling-law fits with bootstrap intervals (wxscale.fit).")
    compute_optimal: dict[str, Any] | None = Field(
        None, description="Compute-optimal exponents, the recommended (N, D) at the next budget and the "
        "agreement of the IsoFLOP and parametric approaches.")
    updated_at: str = Field(description="Time of this status, RFC 3339.")
    active: list[ActiveJob] = Field(default_factory=list, description="Trials that have a PyTorchJob now.")
    output: str | None = Field(None, description="Where trial files and results are written.")
    spec_fingerprint: str | None = Field(
        None, description="Hash of spec.data and spec.model when the study was accepted; a change is reported.")


# JSON Schema -> structural OpenAPI ------------------------------------------------


def _resolve_ref(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    name = node["$ref"].rsplit("/", 1)[-1]
    return defs[name]


def _is_free_form(node: dict[str, Any]) -> bool:
    """True for `Any` ({}) and for mappings whose values are `Any`."""
    if node == {}:
        return True
    extra = node.get("additionalProperties")
    return node.get("type") == "object" and "properties" not in node and (extra is True or extra == {})


def _is_scalar(value: Any) -> bool:
    # Object and list defaults are left to the model: the API server would apply them only
    # where the parent object is present, which is not how pydantic's default_factory works.
    return value is not None and not isinstance(value, (dict, list))


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node into a structural OpenAPI v3.0 node."""
    description = node.get("description")
    default = node.get("default")

    # Optional[X] -> X, nullable. A union of several non-null types has no structural form.
    if "anyOf" in node:
        options = [option for option in node["anyOf"] if option.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        if len(options) != 1:
            converted = {"x-kubernetes-preserve-unknown-fields": True}
        else:
            converted = _convert(options[0], defs)
        if nullable:
            converted["nullable"] = True
        if description:
            converted["description"] = description
        if _is_scalar(default):
            converted["default"] = default
        return converted

    if "$ref" in node:
        target = _resolve_ref(node, defs)
        converted = _convert(target, defs)
        if description:
            converted["description"] = description
        if _is_scalar(default):
            converted["default"] = default
        return converted

    if _is_free_form(node):
        converted: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}
        if node.get("type") == "object":
            converted["type"] = "object"
        if description:
            converted["description"] = description
        return converted

    converted = {}
    kind = node.get("type")
    if node.get("format") == "date-time":
        converted.update(type="string", pattern=DATETIME_PATTERN, maxLength=40)
    elif kind is not None:
        converted["type"] = kind
    if description:
        converted["description"] = description

    for key in ("enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems"):
        if key in node:
            converted[key] = node[key]
    if "const" in node:
        converted["enum"] = [node["const"]]
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node:
            converted[inclusive] = node[bound]
            converted[bound] = True

    if kind == "object" and "properties" in node:
        converted["properties"] = {name: _convert(child, defs) for name, child in node["properties"].items()}
        if node.get("required"):
            converted["required"] = list(node["required"])
    elif kind == "object" and isinstance(node.get("additionalProperties"), dict):
        converted["additionalProperties"] = _convert(node["additionalProperties"], defs)
    elif kind == "array":
        converted["items"] = _convert(node.get("items", {}), defs)

    if _is_scalar(default):
        converted["default"] = default
    return converted


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Return the structural OpenAPI v3.0 schema of a pydantic model (camelCase field names)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _convert(raw, defs)


def _bound_for_cel(node: dict[str, Any]) -> None:
    """Add maxLength and maxItems to unbounded strings and lists, in place (see CEL_MAX_STRING)."""
    kind = node.get("type")
    if kind == "string" and "maxLength" not in node and "enum" not in node:
        node["maxLength"] = CEL_MAX_STRING
    if kind == "array" and "maxItems" not in node:
        node["maxItems"] = CEL_MAX_ITEMS
    for child in (node.get("properties") or {}).values():
        _bound_for_cel(child)
    if isinstance(node.get("items"), dict):
        _bound_for_cel(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        _bound_for_cel(node["additionalProperties"])


def _immutability_rules() -> list[dict[str, str]]:
    """CEL transition rules on `spec` that keep data and model as they were at creation."""
    rules = []
    for name in IMMUTABLE_FIELDS:
        rules.append({
            # A field with a default may be absent; adding or removing it is a change too.
            "rule": f"has(self.{name}) == has(oldSelf.{name}) && (!has(self.{name}) || self.{name} == oldSelf.{name})",
            "message": f"spec.{name} is immutable: finished trials were trained with the old value. "
                       "Create a new ScalingStudy to change it.",
            "reason": "FieldValueForbidden",
            "fieldPath": f".{name}",
        })
    return rules


def spec_schema() -> dict[str, Any]:
    """Return the `spec` schema with the CEL immutability rules."""
    schema = openapi_schema(StudySpec)
    for name in IMMUTABLE_FIELDS:
        _bound_for_cel(schema["properties"][name])
    schema["x-kubernetes-validations"] = _immutability_rules()
    return schema


def status_schema() -> dict[str, Any]:
    return openapi_schema(StudyStatus)


def root_schema() -> dict[str, Any]:
    """Return the whole `openAPIV3Schema` of the ScalingStudy resource."""
    return {
        "type": "object",
        "description": "A scaling-law study of Vision-Transformer weather models: the operator plans trials from "
        "spec.axes, runs each as a Kubeflow PyTorchJob and writes trial results and scaling-law fits to status.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": f"{API_VERSION}."},
            "kind": {"type": "string", "description": f"{KIND}."},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "x-kubernetes-validations": [{
            "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && self.metadata.name.matches('{NAME_PATTERN}')",
            "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters of a-z, 0-9 and '-' "
                       "(it prefixes the names of the study's PyTorchJobs)",
            "reason": "FieldValueInvalid",
        }],
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Trials", "type": "string", "jsonPath": ".status.progress", "description": "Succeeded/total trials."},
    {"name": "Failed", "type": "integer", "jsonPath": ".status.trialsFailed"},
    {"name": "Best-RMSE", "type": "number", "jsonPath": ".status.bestTestRMSE",
     "description": "Lowest test RMSE among succeeded trials."},
    {"name": "Exponent", "type": "number", "jsonPath": ".status.fittedExponent",
     "description": "Fitted exponent of loss vs FLOPs."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Succeeded", "type": "integer", "jsonPath": ".status.trialsSucceeded", "priority": 1},
    {"name": "Total", "type": "integer", "jsonPath": ".status.trialsTotal", "priority": 1},
]


def build_crd() -> dict[str, Any]:
    """Return the CustomResourceDefinition object for scalingstudies.wxscale.io."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "wxscale", "app.kubernetes.io/part-of": "wxscale"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": PLURAL,
                "singular": SINGULAR,
                "kind": KIND,
                "listKind": f"{KIND}List",
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": root_schema()},
            }],
        },
    }


class _Dumper(yaml.SafeDumper):
    """YAML dumper that writes multi-line strings (class docstrings) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def render_crd() -> str:
    """Return the CRD as YAML, with a header saying how it was made."""
    header = "# Generated by `python -m wxscale.crd` from wxscale/spec.py and wxscale/crd.py. Do not edit.\n"
    return header + yaml.dump(build_crd(), Dumper=_Dumper, sort_keys=False, width=120)


# OpenAPI -> JSON Schema (for validating documents offline) -------------------------


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """Return a JSON Schema (draft 7) equivalent of a structural OpenAPI node.

    Objects without `x-kubernetes-preserve-unknown-fields` reject unknown fields,
    which the API server would silently prune: a document that validates here
    loses nothing on the way into the cluster. CEL rules are not evaluated.
    """
    node = copy.deepcopy(node)
    result: dict[str, Any] = {}
    kind = node.get("type")
    if kind:
        result["type"] = [kind, "null"] if node.get("nullable") else kind
    for key in ("enum", "pattern", "minLength", "maxLength", "minItems", "maxItems", "required", "description"):
        if key in node:
            result[key] = node[key]
    if "enum" in result and node.get("nullable"):
        result["enum"] = [*result["enum"], None]
    for bound, inclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if bound in node:
            result[inclusive if node.get(inclusive) else bound] = node[bound]

    if "properties" in node:
        result["properties"] = {name: to_json_schema(child) for name, child in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            result["additionalProperties"] = False
    elif isinstance(node.get("additionalProperties"), dict):
        result["additionalProperties"] = to_json_schema(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        result["items"] = to_json_schema(node["items"])
    return result


def crd_json_schema(crd: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the draft-7 JSON Schema of a whole ScalingStudy document, from the CRD."""
    crd = crd or build_crd()
    schema = to_json_schema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    # metadata is `{type: object}` in the CRD: the API server checks it itself.
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": NAME_PATTERN, "maxLength": MAX_NAME_LENGTH}},
    }
    schema["properties"]["apiVersion"]["enum"] = [API_VERSION]
    schema["properties"]["kind"]["enum"] = [KIND]
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return schema


def main() -> int:
    sys.stdout.write(render_crd())
    return 0


if __name__ == "__main__":
    sys.exit(main())
