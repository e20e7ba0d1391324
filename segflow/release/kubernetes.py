"""Kubernetes manifests for the champion's Bento, written at promotion beside its record.

`bentoml containerize <bento tag>` builds an image named like the Bento (`segflow:<version>`);
these manifests run it: a Deployment probing BentoML's /readyz and /livez, with resource
requests and the API token from a Secret; a Service; and a HorizontalPodAutoscaler on CPU.
They are validated offline against Kubernetes' schemas in the tests (kubernetes-validate).
"""

from __future__ import annotations

from pathlib import Path

import yaml

APP = "segflow"
PORT = 3000  # BentoML's default
SECRET = "segflow-api"  # kubectl create secret generic segflow-api --from-literal=token=...


def manifests(bento_tag: str, labels: dict[str, str]) -> list[dict]:
    """Deployment, Service and HorizontalPodAutoscaler serving the image of `bento_tag`."""
    version = bento_tag.split(":", 1)[1]
    selector = {"app.kubernetes.io/name": APP}
    meta_labels = selector | {
        "app.kubernetes.io/version": version,
        "segflow/registry-version": labels.get("registry_version", "unknown"),
    }
    probe = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3}
    container = {
        "name": APP,
        "image": bento_tag,  # the image `bentoml containerize` builds; push it and prefix your registry
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": [
            {"name": "SEGFLOW_API_TOKEN", "valueFrom": {"secretKeyRef": {"name": SECRET, "key": "token"}}},
        ],
        # ONNX Runtime sizes its threads to the pod's CPU limit, read from its cgroup and shared
        # out between serve.workers (serve.threads: 0); memory from the
        # soak drill (bench/soak.py: about 640 MB under load), with headroom for large uploads.
        "resources": {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
        "readinessProbe": probe,
        "livenessProbe": probe | {"httpGet": {"path": "/livez", "port": "http"}, "initialDelaySeconds": 10},
        "startupProbe": probe | {"failureThreshold": 30},  # the INT8/fp32 timing runs at start
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": APP, "labels": meta_labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": meta_labels}, "spec": {"containers": [container]}},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": APP, "labels": meta_labels},
        "spec": {"selector": selector, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": APP, "labels": meta_labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": APP},
            "minReplicas": 1,
            "maxReplicas": 4,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                }
            ],
        },
    }
    return [deployment, service, autoscaler]


def write_manifests(path: Path, documents: list[dict]) -> Path:
    """One multi-document YAML file (`kubectl apply -f <path>`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path
