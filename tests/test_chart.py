"""The Helm chart in charts/wxscale, rendered and checked with the real helm binary.

helm comes from PATH or from .tools/bin (scripts/install-tools.sh installs it
there); the tests skip with the reason when it is absent. Rendered built-in
objects are validated offline with `kubernetes-validate --strict` against the
Kubernetes 1.30 schemas.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, SHARED

CHART = REPO / "charts" / "wxscale"
CRD_FILE = CHART / "crds" / "scalingstudies.wxscale.io.yaml"
RELEASE = "wx"
NAMESPACE = "wxscale-system"
KUBERNETES_VERSION = "1.30.0"

# Values of the second rendering: a namespaced operator with every optional object on.
WATCH_VALUES = [
    "--set", "watchNamespaces={team-a,team-b}",
    "--set", "metrics.podMonitor.enabled=true",
    "--set", "metrics.podMonitor.labels.release=prometheus",
    "--set", "s3.endpoint=http://minio.minio.svc:9000",
    "--set", "s3.credentialsSecret=wxscale-s3",
    "--set", "operator.defaultOutput=s3://wxscale-results/studies",
    "--set", "dashboards.enabled=true",
]

# (API group, resource) -> verbs: the requests the operator and kopf make, plus `get` next to
# `list` or `patch`, which exposes nothing more. No other access may be granted.
RULES = {
    ("wxscale.io", "scalingstudies"): {"get", "list", "watch", "patch"},
    ("wxscale.io", "scalingstudies/status"): {"get", "patch"},
    ("kubeflow.org", "pytorchjobs"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "events"): {"create"},
}


# Helpers --------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of the helm binary; the test is skipped when there is none."""
    found = shutil.which("helm")
    if found:
        return found
    local = REPO / ".tools" / "bin" / "helm"
    if local.is_file():
        return str(local)
    pytest.skip("helm not found on PATH or in .tools/bin (run scripts/install-tools.sh)")


@pytest.fixture(scope="session")
def kubernetes_validate() -> str:
    """Path of the kubernetes-validate command, from the test's virtualenv or PATH."""
    beside_python = Path(sys.executable).parent / "kubernetes-validate"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("kubernetes-validate")
    if not found:
        pytest.skip("kubernetes-validate not installed (pip install kubernetes-validate)")
    return found


def run_helm(helm: str, *args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args, str(chart)], capture_output=True, text=True, timeout=60)


def render(helm: str, *values: str, chart: Path = CHART, include_crds: bool = False) -> list[dict[str, Any]]:
    """Run `helm template` and return the rendered objects; fails the test on a helm error."""
    args = ["template", RELEASE, "--namespace", NAMESPACE, *values]
    if include_crds:
        args.append("--include-crds")
    result = subprocess.run([helm, *args, str(chart)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def objects_of(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [document for document in documents if document["kind"] == kind]


def one(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = objects_of(documents, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def rules_by_resource(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """Flatten a Role's rules into (API group, resource) -> verbs."""
    flattened: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                flattened.setdefault((group, resource), set()).update(rule["verbs"])
    return flattened


def operator_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(documents, "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [container["name"] for container in containers] == ["operator"]
    return containers[0]


# Lint and rendering ---------------------------------------------------------


def test_lint_strict_default(helm: str) -> None:
    result = run_helm(helm, "lint", "--strict")
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_strict_watch_namespaces(helm: str) -> None:
    result = run_helm(helm, "lint", "--strict", *WATCH_VALUES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_render_kinds(helm: str) -> None:
    documents = render(helm)
    kinds = sorted(document["kind"] for document in documents)
    assert kinds == sorted([
        "ServiceAccount", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment",
    ])
    for document in documents:
        if document["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert document["metadata"]["namespace"] == NAMESPACE, document["metadata"]


def test_default_watches_all_namespaces(helm: str) -> None:
    container = operator_container(render(helm))
    assert container["command"] == ["wxscale-operator"]
    assert container["args"] == [
        "--all-namespaces", "--log-level", "INFO", "--liveness-port", "8080", "--metrics-port", "9090",
    ]


def test_default_rbac_cluster_wide(helm: str) -> None:
    documents = render(helm)
    cluster_role = one(documents, "ClusterRole")
    assert rules_by_resource(cluster_role) == RULES
    assert objects_of(documents, "Role") == []

    binding = one(documents, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role["metadata"]["name"],
    }
    account = one([d for d in documents if d["metadata"]["name"] != "wxscale-trainer"], "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE},
    ]


def test_watch_namespaces_rbac_per_namespace(helm: str) -> None:
    documents = render(helm, *WATCH_VALUES)
    roles = objects_of(documents, "Role")
    assert sorted(role["metadata"]["namespace"] for role in roles) == ["team-a", "team-b"]
    for role in roles:
        assert rules_by_resource(role) == RULES

    bindings = objects_of(documents, "RoleBinding")
    assert sorted(binding["metadata"]["namespace"] for binding in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == NAMESPACE

    # Watching named namespaces needs no cluster-wide access at all.
    assert objects_of(documents, "ClusterRole") == []
    assert objects_of(documents, "ClusterRoleBinding") == []


def test_watch_namespaces_operator_args(helm: str) -> None:
    container = operator_container(render(helm, *WATCH_VALUES))
    assert container["args"][:4] == ["--namespace", "team-a", "--namespace", "team-b"]
    assert "--all-namespaces" not in container["args"]


@pytest.mark.parametrize("values", [[], WATCH_VALUES], ids=["default", "watch-namespaces"])
def test_operator_parses_rendered_args(helm: str, values: list[str]) -> None:
    operator_main = pytest.importorskip("wxscale_operator.main")
    container = operator_container(render(helm, *values))
    args = operator_main.build_parser().parse_args(container["args"])

    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert args.liveness_port == ports["health"]
    assert args.metrics_port == ports["metrics"]
    assert args.log_level == "INFO"
    if values:
        assert args.namespaces == ["team-a", "team-b"]
        assert args.s3_endpoint == "http://minio.minio.svc:9000"
        assert args.default_output == "s3://wxscale-results/studies"
    else:
        assert args.all_namespaces is True


def test_rbac_has_no_wildcards_or_secrets(helm: str) -> None:
    for values in ([], WATCH_VALUES):
        documents = render(helm, *values)
        for role in objects_of(documents, "Role") + objects_of(documents, "ClusterRole"):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"], rule
                assert "*" not in rule["resources"], rule
                assert "*" not in rule["apiGroups"], rule
                assert "secrets" not in rule["resources"], rule


def test_trainer_service_accounts(helm: str) -> None:
    default = render(helm)
    trainers = [d for d in objects_of(default, "ServiceAccount") if d["metadata"]["name"] == "wxscale-trainer"]
    assert [account["metadata"]["namespace"] for account in trainers] == [NAMESPACE]

    watched = render(helm, *WATCH_VALUES)
    trainers = [d for d in objects_of(watched, "ServiceAccount") if d["metadata"]["name"] == "wxscale-trainer"]
    assert sorted(account["metadata"]["namespace"] for account in trainers) == ["team-a", "team-b"]
    for account in trainers:
        assert account["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"


def test_trainer_account_must_differ_from_operator(helm: str) -> None:
    result = run_helm(helm, "template", RELEASE, "--namespace", NAMESPACE,
                      "--set", "serviceAccount.name=wxscale-trainer")
    assert result.returncode != 0
    assert "trainer.serviceAccount.name" in result.stderr


# The operator Deployment ------------------------------------------------------


def test_deployment_one_replica_recreate(helm: str) -> None:
    deployment = one(render(helm), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_deployment_security_context(helm: str) -> None:
    deployment = one(render(helm), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["runAsGroup"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}

    container = operator_container([deployment])
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_deployment_writable_tmp(helm: str) -> None:
    deployment = one(render(helm), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in operator_container([deployment])["volumeMounts"]}
    assert mounts == {"/tmp": "tmp"}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "256Mi"}


def test_deployment_probe_ports_resources(helm: str) -> None:
    container = operator_container(render(helm))
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}

    probe = container["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "health"}

    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "384Mi"}
    assert container["resources"]["limits"] == {"memory": "1Gi"}


def test_deployment_image_from_values(helm: str) -> None:
    container = operator_container(render(helm))
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert container["image"] == f"ghcr.io/wxscale/wxscale:{chart['appVersion']}"
    assert container["imagePullPolicy"] == "IfNotPresent"

    container = operator_container(render(
        helm, "--set", "image.repository=registry.example/wx", "--set", "image.tag=dev", "--set",
        "image.pullPolicy=Always",
    ))
    assert container["image"] == "registry.example/wx:dev"
    assert container["imagePullPolicy"] == "Always"


def test_s3_settings_reach_operator(helm: str) -> None:
    container = operator_container(render(helm, *WATCH_VALUES))
    endpoint_at = container["args"].index("--s3-endpoint")
    assert container["args"][endpoint_at + 1] == "http://minio.minio.svc:9000"
    assert container["envFrom"] == [{"secretRef": {"name": "wxscale-s3"}}]

    default = operator_container(render(helm))
    assert "--s3-endpoint" not in default["args"]
    assert "--default-output" not in default["args"]
    assert "envFrom" not in default


# Metrics --------------------------------------------------------------------


def test_metrics_service_targets_metrics_port(helm: str) -> None:
    documents = render(helm)
    service = one(documents, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = one(documents, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_podmonitor_off_by_default(helm: str) -> None:
    assert objects_of(render(helm), "PodMonitor") == []


def test_podmonitor_selects_operator_pod(helm: str) -> None:
    documents = render(helm, *WATCH_VALUES)
    monitor = one(documents, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"

    pod_labels = one(documents, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    port_names = {port["name"] for port in operator_container(documents)["ports"]}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


def test_podmonitor_matches_crd_schema(helm: str) -> None:
    """Validate the PodMonitor against the prometheus-operator CRD, when a copy of it is at hand."""
    jsonschema = pytest.importorskip("jsonschema")
    crd_path = SHARED / "schemas" / "monitoring.coreos.com_podmonitors.yaml"
    if not crd_path.is_file():
        pytest.skip(f"the prometheus-operator PodMonitor CRD is absent ({crd_path}); "
                    "only the selector and port checks ran")
    crd = yaml.safe_load(crd_path.read_text())
    version = next(item for item in crd["spec"]["versions"] if item["name"] == "v1")
    monitor = one(render(helm, *WATCH_VALUES), "PodMonitor")
    jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"]).validate(monitor)


# Schema validation of the rendered objects ----------------------------------


@pytest.mark.parametrize("values", [[], WATCH_VALUES], ids=["default", "watch-namespaces"])
def test_manifests_pass_kubernetes_validate(helm: str, kubernetes_validate: str, tmp_path: Path,
                                            values: list[str]) -> None:
    documents = render(helm, *values, include_crds=CRD_FILE.is_file())
    # kubernetes-validate only warns on kinds it has no schema for; the PodMonitor has its own test.
    built_in = [document for document in documents if document["apiVersion"] != "monitoring.coreos.com/v1"]
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(built_in))

    result = subprocess.run(
        [kubernetes_validate, "--strict", "-k", KUBERNETES_VERSION, str(manifest)],
        capture_output=True, text=True, timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARN" not in output, output
    assert output.count(" passed for resource ") == len(built_in), output


def test_crd_installed_with_chart(helm: str) -> None:
    if not CRD_FILE.is_file():
        pytest.skip(f"{CRD_FILE.relative_to(REPO)} is not generated yet")
    crds = objects_of(render(helm, include_crds=True), "CustomResourceDefinition")
    assert [crd["metadata"]["name"] for crd in crds] == ["scalingstudies.wxscale.io"]
    # Helm installs crds/ before the templates and never templates or deletes them.
    assert objects_of(render(helm), "CustomResourceDefinition") == []


def unknown_fields(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """List the fields of `value` that `schema` does not declare, as the API server's strict field validation does."""
    found: list[str] = []
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, item in value.items():
            if key in schema["properties"]:
                found += unknown_fields(schema["properties"][key], item, f"{path}.{key}")
            elif path == "" and key in ("apiVersion", "kind", "metadata"):
                continue
            else:
                found.append(f"{path}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            found += unknown_fields(schema["additionalProperties"], item, f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += unknown_fields(schema["items"], item, f"{path}[{index}]")
    return found


def test_cluster_example_matches_crd() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    if not CRD_FILE.is_file():
        pytest.skip(f"{CRD_FILE.relative_to(REPO)} is not generated yet")
    crd = yaml.safe_load(CRD_FILE.read_text())
    version = next(item for item in crd["spec"]["versions"] if item["name"] == "v1alpha1")
    schema = version["schema"]["openAPIV3Schema"]

    # kubectl sends YAML dates as strings; a JSON round trip does the same here.
    example = json.loads(json.dumps(yaml.safe_load((REPO / "examples" / "cluster-study.yaml").read_text()),
                                    default=str))
    # OpenAPI 3.0 schemas use the boolean exclusiveMinimum of JSON Schema draft 4.
    errors = [f"{list(error.path)}: {error.message}" for error in jsonschema.Draft4Validator(schema).iter_errors(example)]
    assert errors == []
    assert unknown_fields(schema, example) == []


# Values schema --------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("replicas=2", "replicas must be one of the following: 1"),
        ("image.pullPolicy=Sometimes", "image.pullPolicy must be one of the following"),
        ("watchNamespaces={Team_A}", "watchNamespaces.0"),
        ("s3.endpoint=minio:9000", "s3.endpoint"),
        ("operator.logLevel=LOUD", "operator.logLevel must be one of the following"),
        ("metrics.podMonitor.interval=30", "metrics.podMonitor.interval"),
        ("tmpSizeLimit=lots", "tmpSizeLimit"),
        ("replica=1", "Additional property replica is not allowed"),
    ],
)
def test_bad_value_rejected(helm: str, setting: str, message: str) -> None:
    result = run_helm(helm, "template", RELEASE, "--namespace", NAMESPACE, "--set", setting)
    assert result.returncode != 0, f"--set {setting} rendered without error"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr


def test_duplicate_watch_namespace_rejected(helm: str) -> None:
    result = run_helm(helm, "template", RELEASE, "--set", "watchNamespaces={team-a,team-a}")
    assert result.returncode != 0
    assert "watchNamespaces" in result.stderr


# Grafana dashboards -----------------------------------------------------------


def test_dashboards_render_nothing_without_json(helm: str, tmp_path: Path) -> None:
    chart = tmp_path / "wxscale"
    shutil.copytree(CHART, chart)
    for stale in (chart / "dashboards").glob("*.json"):
        stale.unlink()
    documents = render(helm, "--set", "dashboards.enabled=true", chart=chart)
    assert objects_of(documents, "ConfigMap") == []


def test_dashboards_shipped_as_configmaps(helm: str, tmp_path: Path) -> None:
    chart = tmp_path / "wxscale"
    shutil.copytree(CHART, chart)
    for shipped in (chart / "dashboards").glob("*.json"):
        shipped.unlink()
    dashboard = '{"title": "Study overview", "panels": []}'
    (chart / "dashboards" / "study_overview.json").write_text(dashboard)

    assert objects_of(render(helm, chart=chart), "ConfigMap") == [], "dashboards.enabled is false by default"

    documents = render(helm, "--set", "dashboards.enabled=true", "--set", "dashboards.label=grafana_dash",
                       chart=chart)
    (config_map,) = objects_of(documents, "ConfigMap")
    assert config_map["metadata"]["name"] == f"{RELEASE}-wxscale-dashboard-study-overview"
    assert config_map["metadata"]["labels"]["grafana_dash"] == "1"
    assert config_map["data"] == {"study_overview.json": dashboard}


# NOTES.txt ------------------------------------------------------------------


def test_notes_tell_how_to_apply_and_watch(helm: str, tmp_path: Path) -> None:
    # `helm install --dry-run` needs a cluster, so render NOTES.txt through a ConfigMap in a copy of the chart.
    chart = tmp_path / "wxscale"
    shutil.copytree(CHART, chart)
    shutil.copy(CHART / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "notes-check.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        "data:\n  notes: {{ tpl (.Files.Get \"notes.txt\") . | quote }}\n"
    )
    documents = render(helm, *WATCH_VALUES, chart=chart)
    notes = next(d for d in objects_of(documents, "ConfigMap") if d["metadata"]["name"] == "notes")["data"]["notes"]
    assert "kubectl get scalingstudies" in notes
    assert "kubectl apply -n team-a -f examples/cluster-study.yaml" in notes
    assert "team-a, team-b" in notes
    assert (REPO / "examples" / "cluster-study.yaml").is_file()
