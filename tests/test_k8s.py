"""The Kubernetes manifests (docker/k8s) checked with kubernetes-validate against the API schemas,
and the cross-object facts: probes, draining, hardening, the HPA scaling on the metric the adapter
rule serves and the PodMonitor scraping the pods."""

from __future__ import annotations

import pytest

from tests.test_deploy import (
    ADAPTER_VALUES,
    K8S,
    K8S_VERSIONS,
    SETTINGS_ENV,
    _yaml_docs,
    metric_series_names,
    promql_metric_names,
)


def _k8s() -> dict[str, dict]:
    return {doc["kind"]: doc for path in sorted(K8S.glob("*.yaml")) for doc in _yaml_docs(path)}


# Custom resources (the Prometheus Operator's): kubernetes-validate has no schema for them.
CRD_GROUPS = ("monitoring.coreos.com/",)


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_k8s_manifests_validate_against_schemas(version: str | None) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    version = version or kv.utils.latest_version()
    docs = [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) for doc in _yaml_docs(path)]
    assert {doc["kind"] for _, doc in docs} >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PodMonitor"
    }
    for name, doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{name} ({doc['kind']}) against {version}: {exc.message} at {list(exc.path)}")


def test_k8s_schema_validation_rejects_a_broken_manifest() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    deployment = _k8s()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["periodSecond"] = 5
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, kv.utils.latest_version(), strict=True)


def test_k8s_deployment_gpu_probes_draining_and_hardening() -> None:
    k8s = _k8s()
    deployment = k8s["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= SETTINGS_ENV, set(env) - SETTINGS_ENV
    port = int(env["FOALNET_PORT"])
    assert [p["containerPort"] for p in container["ports"]] == [port]

    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    # A CPU limit is a cgroup quota: the service sizes its pools from it, not from the node.
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"]

    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"  # covers load + warm-up
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"

    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env["FOALNET_GRACEFUL_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain

    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    (tmp_mount,) = container["volumeMounts"]
    assert tmp_mount["mountPath"] == env["FOALNET_TMP_DIR"]
    volume = next(v for v in pod["volumes"] if v["name"] == tmp_mount["name"])
    assert "sizeLimit" in volume["emptyDir"]


def test_k8s_objects_select_the_deployment_and_scale_on_saturation() -> None:
    k8s = _k8s()
    deployment = k8s["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = k8s["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()

    hpa = k8s["HorizontalPodAutoscaler"]
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["scaleTargetRef"] == target
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "foalnet_saturation" and name in metric_series_names()
    assert 0 < _quantity(metric["pods"]["target"]["averageValue"]) < 1, "saturation is a share of capacity"
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]

    # The adapter rule is Helm values merged into the running adapter, not a replacement ConfigMap.
    assert "ConfigMap" not in k8s
    (rule,) = _yaml_docs(ADAPTER_VALUES)[0]["rules"]["custom"]
    assert rule["name"]["as"] == name and promql_metric_names(rule["seriesQuery"]) == {name}
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}

    monitor = k8s["PodMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    assert monitor["spec"]["podTargetLabels"] == ["accelerator"] and labels["accelerator"] == "gpu"


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity such as `500m` or `2`."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
