"""deploy/k8s: every manifest validates against the Kubernetes API schemas (kubernetes-validate,
strict: no unknown fields), and the pieces agree with each other, the image and the service."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from tests.deploy.manifests import K8S, image_uid, k8s_documents, shell_commands, trainer_call
from trainer.config import load_config

KUBERNETES_VERSION = "1.30.0"  # oldest version checked: what the manifests require at least
DOCS = k8s_documents()


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("version", [KUBERNETES_VERSION, kubernetes_validate.latest_version()])
def test_manifest_is_valid_kubernetes(path, version):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_validation_catches_a_broken_manifest():
    deployment = yaml.safe_load(yaml.safe_dump(DOCS["Deployment/ctcvr-scoring"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [
        8000
    ]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment["spec"]["strategy"]["rollingUpdate"]["maxSurgeTypo"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def scoring_container() -> dict:
    return DOCS["Deployment/ctcvr-scoring"]["spec"]["template"]["spec"]["containers"][0]


def test_scoring_probes_use_the_service_endpoints_on_its_port():
    container = scoring_container()
    env = {e["name"]: e.get("value") for e in container["env"]}
    (port,) = container["ports"]
    assert (
        port["containerPort"] == int(env["CTCVR_PORT"]) == 8000 and env["CTCVR_HOST"] == "0.0.0.0"
    )
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    # The routes exist in the service.
    from serving.routes.health import router

    assert {"/readyz", "/healthz"} <= {route.path for route in router.routes}


def test_scoring_runs_as_the_image_user_with_resources_and_a_rolling_update():
    deployment = DOCS["Deployment/ctcvr-scoring"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid()
    container = scoring_container()
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert (
        container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    )
    rolling = deployment["spec"]["strategy"]
    assert rolling["type"] == "RollingUpdate" and rolling["rollingUpdate"]["maxUnavailable"] == 0
    # production mode: the tokens come from a Secret
    env = {e["name"]: e for e in container["env"]}
    assert env["CTCVR_ENVIRONMENT"]["value"] == "production"
    assert {"CTCVR_API_TOKEN", "CTCVR_ADMIN_TOKEN"} <= {
        n for n, e in env.items() if "valueFrom" in e
    }


def test_scoring_runs_the_server_image_with_workers_and_the_job_the_trainer_image():
    """The Deployment serves with the Dockerfile's server target (no trainer in it) and worker
    processes the service accepts, with a CPU request to match; training needs the trainer."""
    from serving.config import ServingSettings

    container = scoring_container()
    assert container["image"] == "ctcvr-server:latest"
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    settings = ServingSettings(
        **{k.removeprefix("CTCVR_").lower(): v for k, v in env.items() if k.startswith("CTCVR_")},
        api_token="x" * 16,
        admin_token="y" * 16,
    )
    assert settings.workers == 2 and int(container["resources"]["requests"]["cpu"]) >= 2
    job = DOCS["Job/ctcvr-train"]["spec"]["template"]["spec"]["containers"][0]
    assert job["image"] == "ctcvr:latest"


def test_service_and_autoscaler_point_at_the_deployment():
    deployment = DOCS["Deployment/ctcvr-scoring"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = DOCS["Service/ctcvr-scoring"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == scoring_container()["ports"][0]["name"]
    hpa = DOCS["HorizontalPodAutoscaler/ctcvr-scoring"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "ctcvr-scoring",
    }
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]


def training_pod() -> tuple[dict, dict]:
    job = DOCS["Job/ctcvr-train"]
    return job, job["spec"]["template"]["spec"]


def training_commands() -> list[list[str]]:
    _job, pod = training_pod()
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["command"] == ["/bin/sh", "-c"]
    return shell_commands(
        container["args"][0], {**env, "JOB_COMPLETION_INDEX": "0", "is_host": "true"}
    )


def test_training_job_is_indexed_with_one_pod_per_node():
    job, pod = training_pod()
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    (torchrun,) = [c for c in training_commands() if c[0] == "torchrun"]
    flags = dict(a.split("=", 1) for a in torchrun if a.startswith("--") and "=" in a)
    assert int(flags["--nnodes"]) == spec["completions"]
    assert flags["--rdzv-backend"] == "c10d"
    # The rendezvous host is pod 0 under the headless Service that the pods use as subdomain.
    service = DOCS["Service/ctcvr-train"]
    host, port = flags["--rdzv-endpoint"].split(":")
    assert (
        host == f"{job['metadata']['name']}-0.{pod['subdomain']}"
        and pod["subdomain"] == service["metadata"]["name"]
    )
    assert (
        service["spec"]["clusterIP"] == "None"
        and service["spec"]["publishNotReadyAddresses"] is True
    )
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert int(port) == service["spec"]["ports"][0]["port"]
    assert pod["securityContext"]["runAsUser"] == image_uid()


def test_training_job_trains_with_a_valid_config_and_exports_where_scoring_reads():
    commands = training_commands()
    (torchrun,) = [c for c in commands if c[0] == "torchrun"]
    config, overrides = trainer_call(torchrun)
    assert "--resume" in torchrun
    load_config(config, overrides)  # raises on an unknown key or a bad value
    (export,) = [c for c in commands if c[:3] == ["python", "-m", "trainer.export"]]
    run = export[export.index("--run") + 1]
    assert f"output_dir={run}" in overrides
    model_dir = export[export.index("--out") + 1]
    served = {e["name"]: e.get("value") for e in scoring_container()["env"]}["CTCVR_MODEL_DIR"]
    assert model_dir == served
    volumes = training_pod()[1]["volumes"]
    claims = {
        v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
    }
    assert claims <= {
        name.split("/")[1] for name in DOCS if name.startswith("PersistentVolumeClaim/")
    }
