"""The Kubernetes manifests promotion writes, validated offline against Kubernetes' own schemas
(kubernetes-validate ships them; strict: no property Kubernetes does not know)."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from segflow.release.kubernetes import SECRET, manifests, write_manifests

LABELS = {"registry_name": "segflow-segmenter", "registry_version": "3"}


def test_the_manifests_are_valid_kubernetes(tmp_path):
    path = write_manifests(tmp_path / "kubernetes.yaml", manifests("segflow:abc123", LABELS))
    documents = list(yaml.safe_load_all(path.read_text()))
    assert [d["kind"] for d in documents] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    for document in documents:
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_they_run_the_bentos_image_probed_and_with_the_token_from_a_secret():
    deployment, service, autoscaler = manifests("segflow:abc123", LABELS)
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "segflow:abc123"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    [token] = container["env"]
    assert token["name"] == "SEGFLOW_API_TOKEN" and token["valueFrom"]["secretKeyRef"]["name"] == SECRET
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert deployment["metadata"]["labels"]["segflow/registry-version"] == "3"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_a_broken_manifest_is_caught_by_the_same_validation():
    deployment = manifests("segflow:abc123", LABELS)[0]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)
