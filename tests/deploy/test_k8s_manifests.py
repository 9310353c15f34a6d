"""deploy/k8s: every manifest validates against the Kubernetes API schemas (kubernetes-validate,
strict: no unknown fields), and the pieces agree with each other, the image and the service."""

from __future__ import annotations

import dataclasses

import kubernetes_validate
import pytest
import yaml

from schemas import storage
from serving.config import ServingSettings
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
    assert container["command"] == ["/bin/sh", "-c"]
    return shell_commands(
        container["args"][0],
        {**container_env(container), "JOB_COMPLETION_INDEX": "0", "is_host": "true"},
    )


def container_env(container: dict) -> dict[str, str]:
    """The variables a container sees: its ConfigMaps' (``envFrom``), then its own ``env``
    values (Secrets' values are not known here)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= DOCS[f"ConfigMap/{source['configMapRef']['name']}"]["data"]
    return env | {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


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


def test_training_job_trains_with_a_valid_config_and_publishes_where_scoring_reads():
    commands = training_commands()
    (torchrun,) = [c for c in commands if c[0] == "torchrun"]
    config, overrides = trainer_call(torchrun)
    assert "--resume" in torchrun
    load_config(config, overrides)  # raises on an unknown key or a bad value
    (export,) = [c for c in commands if c[:3] == ["python", "-m", "trainer.export"]]
    run = export[export.index("--run") + 1]
    assert f"output_dir={run}" in overrides
    assert export[export.index("--repository") + 1] == REPOSITORY
    assert repository_env(training_pod()[1]["containers"][0]) == repository_env(scoring_container())
    volumes = training_pod()[1]["volumes"]
    claims = {
        v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
    }
    assert claims <= {
        name.split("/")[1] for name in DOCS if name.startswith("PersistentVolumeClaim/")
    }


# The model repository ---------------------------------------------------------------------------

REPOSITORY_CONFIG = DOCS["ConfigMap/ctcvr-repository"]["data"]
REPOSITORY = REPOSITORY_CONFIG["CTCVR_MODEL_REPOSITORY"]


def repository_env(container: dict) -> list[dict]:
    """The ``envFrom`` sources of a container: the repository's ConfigMap and the AWS Secret."""
    return container.get("envFrom", [])


def test_every_pod_that_touches_the_repository_reads_one_config_and_the_aws_secret():
    expected = [
        {"configMapRef": {"name": "ctcvr-repository"}},
        {"secretRef": {"name": "ctcvr-aws"}},
    ]
    containers = {
        "scoring": scoring_container(),
        "training": training_pod()[1]["containers"][0],
        "daily": daily_pod()["containers"][0],
    }
    for name, container in containers.items():
        assert repository_env(container) == expected, name
        assert "CTCVR_MODEL_DIR" not in {e["name"] for e in container.get("env", [])}, name
    assert storage.resolve(REPOSITORY).scheme == "s3"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}.isdisjoint(REPOSITORY_CONFIG)


def test_scoring_follows_the_repository_with_settings_the_service_accepts():
    container = scoring_container()
    tokens = {"CTCVR_API_TOKEN": "x" * 24, "CTCVR_ADMIN_TOKEN": "y" * 24}  # from the Secret
    variables = container_env(container) | tokens
    fields = {
        name.removeprefix("CTCVR_").lower(): value
        for name, value in variables.items()
        if name.startswith("CTCVR_")
    }
    settings = ServingSettings(_env_file=None, **fields)
    assert settings.model_repository == REPOSITORY and settings.model_dir is None
    assert 1 <= settings.poll_seconds <= 300
    # The cache of fetched versions is a writable volume (the root filesystem is read-only).
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    cache = mounts[str(settings.model_cache)]
    volumes = {
        v["name"]: v
        for v in DOCS["Deployment/ctcvr-scoring"]["spec"]["template"]["spec"]["volumes"]
    }
    assert "emptyDir" in volumes[cache]


def daily_pod() -> dict:
    return DOCS["CronJob/ctcvr-daily"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def daily_commands(current: str) -> list[list[str]]:
    (container,) = daily_pod()["containers"]
    env = container_env(container) | {"day": "2026-12-02", "current": current}
    env["init"] = f"train.init_from={current}" if current else ""
    assert container["command"] == ["/bin/sh", "-c"]
    return shell_commands(container["args"][0], env)


@pytest.mark.parametrize("current", ["", f"{REPOSITORY}/esmm-step00001000-0123456789"])
def test_the_daily_job_warm_starts_from_the_current_model_and_publishes(current):
    cronjob = DOCS["CronJob/ctcvr-daily"]["spec"]
    assert cronjob["concurrencyPolicy"] == "Forbid"
    commands = daily_commands(current)
    (lookup,) = [c for c in commands if c[:1] and c[0].startswith("current=")]
    assert " ".join(lookup) == (
        f"current=$(python -m trainer.models current --repository {REPOSITORY} --uri --allow-empty)"
    )
    (torchrun,) = [c for c in commands if c[0] == "torchrun"]
    config, overrides = trainer_call(torchrun)
    assert "--resume" in torchrun and "--standalone" in torchrun
    init = [o for o in overrides if o.startswith("train.init_from=")]
    assert init == ([f"train.init_from={current}"] if current else [])
    trained = load_config(config, _known(overrides))  # raises on an unknown key or a bad value
    assert trained.data.filter == "day == '2026-12-02'"
    assert trained.data.train.startswith("s3://") and trained.output_dir.startswith("s3://")
    (export,) = [c for c in commands if c[:3] == ["python", "-m", "trainer.export"]]
    assert export[export.index("--run") + 1] == trained.output_dir
    assert export[export.index("--repository") + 1] == REPOSITORY
    assert int(export[export.index("--keep") + 1]) >= 2


def _known(overrides: list[str]) -> list[str]:
    """The overrides this checkout's trainer knows: ``train.init_from`` (warm start) comes with
    the warm-start branch, and is checked as soon as the config has it."""
    from trainer.config import TrainLoopConfig

    if "init_from" in {f.name for f in dataclasses.fields(TrainLoopConfig)}:
        return overrides
    return [o for o in overrides if not o.startswith("train.init_from=")]
