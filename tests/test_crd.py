"""The ScalingStudy CRD: generated file in sync, valid as a CRD, structural, and accepting the examples."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from wxscale import crd
from wxscale.planner import GridInfo, plan
from wxscale.spec import ScalingStudy
from wxscale.status import build_status

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "charts" / "wxscale" / "crds" / "scalingstudies.wxscale.io.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


class KubectlLoader(yaml.SafeLoader):
    """YAML loader that keeps dates as strings, as kubectl's YAML-to-JSON conversion does."""


KubectlLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=KubectlLoader) if doc]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def structural_problems(schema: dict[str, Any]) -> list[str]:
    """Check the rules of a structural schema (Kubernetes CRD docs, "Specifying a structural schema")."""
    problems = []
    for path, node in walk(schema):
        for forbidden in ("anyOf", "oneOf", "allOf", "not", "$ref", "definitions", "$defs", "title"):
            if forbidden in node:
                problems.append(f"{path or '<root>'}: {forbidden} is not allowed")
        free = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        if "type" not in node and not free:
            problems.append(f"{path or '<root>'}: no type")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{path}: array without items")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: both properties and additionalProperties")
        if node.get("nullable") and "type" not in node:
            problems.append(f"{path}: nullable without a type")
        if "default" in node and "type" in node:
            try:
                jsonschema.validate(node["default"], crd.to_json_schema(node))
            except jsonschema.ValidationError as error:
                problems.append(f"{path}: default {node['default']!r} is invalid: {error.message}")
    return problems


@pytest.fixture(scope="module")
def generated() -> dict[str, Any]:
    return crd.build_crd()


@pytest.fixture(scope="module")
def study_schema(generated) -> dict[str, Any]:
    schema = crd.crd_json_schema(generated)
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


def test_checked_in_crd_matches_generator():
    assert CRD_FILE.exists(), f"{CRD_FILE} is missing; run `python -m wxscale.crd > {CRD_FILE}`"
    assert CRD_FILE.read_text() == crd.render_crd(), (
        f"{CRD_FILE} is out of date with wxscale/spec.py; run `python -m wxscale.crd > {CRD_FILE}`")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_crd_validates_as_apiextensions_object(version):
    document = load_documents(CRD_FILE)[0]
    kubernetes_validate.validate(document, version, strict=True)


def test_crd_schema_is_structural(generated):
    schema = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert structural_problems(schema) == []


def test_metadata_schema_is_only_an_object(generated):
    schema = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema["properties"]["metadata"] == {"type": "object"}


def test_crd_names_and_subresources(generated):
    names = generated["spec"]["names"]
    version = generated["spec"]["versions"][0]
    assert generated["metadata"]["name"] == "scalingstudies.wxscale.io"
    assert names["kind"] == "ScalingStudy"
    assert names["shortNames"] == ["sst"]
    assert "wxscale" in names["categories"]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}


def test_printer_columns_use_dedicated_status_fields(generated):
    columns = {column["name"]: column["jsonPath"] for column in generated["spec"]["versions"][0]
               ["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Trials"] == ".status.progress"
    assert columns["Failed"] == ".status.trialsFailed"
    assert columns["Best-RMSE"] == ".status.bestTestRMSE"
    assert columns["Exponent"] == ".status.fittedExponent"
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert not any("conditions" in path for path in columns.values())
    status = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for path in columns.values():
        if path.startswith(".status."):
            assert path.removeprefix(".status.") in status


def test_descriptions_reach_kubectl_explain(generated):
    spec = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    axes = spec["properties"]["axes"]
    assert "grid product" in axes["description"]
    assert "Three forms" in axes["items"]["description"]
    assert axes["items"]["properties"]["field"]["description"]
    # A field without its own description takes its class's docstring.
    assert spec["properties"]["model"]["description"] == "The Vision Transformer's shape."


def test_free_form_fields_preserve_unknown(generated):
    spec = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    values = spec["properties"]["axes"]["items"]["properties"]["values"]
    points = spec["properties"]["points"]
    assert values["items"] == {"x-kubernetes-preserve-unknown-fields": True}
    assert points["items"]["x-kubernetes-preserve-unknown-fields"] is True
    # Only axis values (numbers, strings or mappings) and explicit points are free-form.
    preserved = [path for path, node in walk(spec) if node.get("x-kubernetes-preserve-unknown-fields")]
    assert ".axes[].values[]" in preserved
    assert ".points[]" in preserved
    for path in preserved:
        assert path.endswith(".values[]") or path == ".points[]", path


def test_optional_fields_are_nullable(generated):
    spec = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    region = spec["properties"]["data"]["properties"]["region"]
    assert region["nullable"] is True
    assert region["type"] == "object"
    assert spec["properties"]["output"] == {"type": "string", "nullable": True,
                                            "description": spec["properties"]["output"]["description"]}


def test_immutability_rules_on_data_and_model(generated):
    spec = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = {rule["fieldPath"]: rule for rule in spec["x-kubernetes-validations"]}
    assert set(rules) == {".data", ".model"}
    assert "self.data == oldSelf.data" in rules[".data"]["rule"]
    assert "self.model == oldSelf.model" in rules[".model"]["rule"]
    # CEL cost estimation needs bounded strings and lists under the rules.
    for name in ("data", "model"):
        for path, node in walk(spec["properties"][name]):
            if node.get("type") == "string" and "enum" not in node:
                assert "maxLength" in node, f"spec.{name}{path}"
            if node.get("type") == "array":
                assert "maxItems" in node, f"spec.{name}{path}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_crd_schema(path, study_schema):
    studies = [doc for doc in load_documents(path) if doc.get("kind") == "ScalingStudy"]
    assert studies, f"{path} holds no ScalingStudy"
    for study in studies:
        jsonschema.validate(study, study_schema, cls=jsonschema.Draft7Validator)
        ScalingStudy.model_validate(study)


def test_schema_rejects_unknown_and_invalid_fields(study_schema):
    study = load_documents(REPO / "examples" / "quickstart.yaml")[0]
    bad = copy.deepcopy(study)
    bad["spec"]["model"]["depht"] = 3
    with pytest.raises(jsonschema.ValidationError, match="depht"):
        jsonschema.validate(bad, study_schema)
    bad = copy.deepcopy(study)
    bad["spec"]["training"]["precision"] = "fp8"
    with pytest.raises(jsonschema.ValidationError, match="fp8"):
        jsonschema.validate(bad, study_schema)
    bad = copy.deepcopy(study)
    bad["spec"]["data"]["train"]["start"] = "January 2000"
    with pytest.raises(jsonschema.ValidationError, match="January"):
        jsonschema.validate(bad, study_schema)
    bad = copy.deepcopy(study)
    bad["metadata"]["name"] = "a" * 41
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, study_schema)


def test_build_status_fits_status_schema(study_schema):
    """A status from build_status loses nothing to pruning: every field is in the schema."""
    study = ScalingStudy.model_validate(load_documents(REPO / "examples" / "quickstart.yaml")[0])
    trials = plan(study, grid_resolver=lambda data: GridInfo(32, 64, ("tracer",), 6.0))
    first, second = trials[0], trials[1]
    records = {
        first.id: {"state": "Succeeded", "evaluation": {"testLoss": 0.5, "variables": {
            "tracer": {"model": {"rmse": 1.5}}}}, "training": {"samples": 1600, "flopsAnalytic": 1e12,
                                                              "wallSeconds": 30.0}},
        second.id: {"state": "Failed", "error": "RuntimeError: out of memory"},
    }
    fit = {"lossVsFlops": {"parameters": {"alpha": {"value": 0.2, "low": 0.1, "high": 0.3}}}, "nTrials": 2}
    status = build_status(trials, {first.id: "Succeeded", second.id: "Failed", trials[2].id: "Running"}, records,
                          fit=fit, generation=3, max_failed=1, gpus_per_trial={t.id: 2 for t in trials},
                          details={trials[2].id: {"job": "quickstart-abc", "attempt": 0}})
    status.update(active=[{"trial": trials[2].id, "job": "quickstart-abc", "attempt": 0}],
                  output="s3://bucket/quickstart", specFingerprint="0123456789abcdef")
    status_schema = study_schema["properties"]["status"]
    jsonschema.validate(json.loads(json.dumps(status)), status_schema)
    assert status["fittedExponent"] == 0.2


def test_status_schema_rejects_unknown_fields(study_schema):
    with pytest.raises(jsonschema.ValidationError, match="surprise"):
        jsonschema.validate({"phase": "Running", "surprise": 1}, study_schema["properties"]["status"])


def test_crd_module_prints_the_crd(capsys):
    assert crd.main() == 0
    assert capsys.readouterr().out == crd.render_crd()


def cel_rules(generated: dict[str, Any]) -> dict[str, str]:
    schema = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = {rule["fieldPath"]: rule["rule"] for rule in schema["properties"]["spec"]["x-kubernetes-validations"]}
    rules["metadata.name"] = schema["x-kubernetes-validations"][0]["rule"]
    return rules


def evaluate_cel(rule: str, **variables: Any) -> bool:
    celpy = pytest.importorskip("celpy", reason="cel-python evaluates the CEL rules offline")
    environment = celpy.Environment()
    program = environment.program(environment.compile(rule))
    return bool(program.evaluate({name: celpy.json_to_cel(value) for name, value in variables.items()}))


def test_cel_rules_keep_data_and_model_immutable(generated):
    rules = cel_rules(generated)
    spec = load_documents(REPO / "examples" / "quickstart.yaml")[0]["spec"]
    changed_data = copy.deepcopy(spec)
    changed_data["data"]["coarsen"] = 2
    changed_model = copy.deepcopy(spec)
    changed_model["model"]["depth"] = 7
    without_model = {key: value for key, value in spec.items() if key != "model"}
    edited_axes = copy.deepcopy(spec)
    edited_axes["axes"][0]["factors"] = [1, 2]

    assert evaluate_cel(rules[".data"], self=spec, oldSelf=spec)
    assert evaluate_cel(rules[".data"], self=edited_axes, oldSelf=spec)
    assert not evaluate_cel(rules[".data"], self=changed_data, oldSelf=spec)
    assert evaluate_cel(rules[".model"], self=edited_axes, oldSelf=spec)
    assert not evaluate_cel(rules[".model"], self=changed_model, oldSelf=spec)
    assert not evaluate_cel(rules[".model"], self=without_model, oldSelf=spec)


@pytest.mark.parametrize("name, valid", [("quickstart", True), ("a" * 40, True), ("a" * 41, False),
                                         ("with.dot", False), ("-leading", False)])
def test_cel_rule_on_metadata_name(generated, name, valid):
    assert evaluate_cel(cel_rules(generated)["metadata.name"], self={"metadata": {"name": name}}) is valid
