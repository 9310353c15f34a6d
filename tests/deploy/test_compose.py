"""deploy/compose.yaml: simulate -> train (torchrun, 2 processes) -> export (publish to the model
repository) -> scoring (following it), each step waiting for the one before it, sharing volumes,
and commands the image and trainer accept; the daily loop (warm start, publish) on demand."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools

import pytest
import yaml

from serving.config import ServingSettings
from tests.deploy.manifests import REPO, shell_commands, trainer_call
from tests.deploy.test_dockerfile import stages
from trainer.config import load_config

COMPOSE = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def command(name: str) -> list[str]:
    cmd = SERVICES[name]["command"]
    return shell_commands(cmd[2], {})[0] if cmd[:2] == ["sh", "-c"] else cmd


def mounts(name: str) -> dict[str, str]:
    """container path -> volume name (with ':ro' when read-only)."""
    out = {}
    for spec in SERVICES[name]["volumes"]:
        volume, path, *mode = spec.split(":")
        out[path] = volume + (":ro" if mode == ["ro"] else "")
    return out


def test_every_step_waits_for_the_one_before_it():
    chain = ["simulate", "train", "export", "scoring"]
    assert set(SERVICES) == {*chain, "daily"}
    assert all("profiles" not in SERVICES[name] for name in chain)  # `up` runs the chain
    assert SERVICES["daily"]["profiles"] == ["daily"]  # ... and not the daily loop
    for before, after in itertools.pairwise(chain):
        assert SERVICES[after]["depends_on"] == {
            before: {"condition": "service_completed_successfully"}
        }


def test_the_steps_run_the_trainer_image_and_scoring_the_server_image():
    targets = stages()
    for name, service in SERVICES.items():
        build = service["build"]
        assert build["context"] == ".." and (REPO / build["dockerfile"]).is_file()
        assert build["target"] == ("server" if name == "scoring" else "trainer")
        assert build["target"] in targets
    assert SERVICES["scoring"]["image"] == "${CTCVR_SERVER_IMAGE:-ctcvr-server:latest}"
    assert {SERVICES[s]["image"] for s in ("simulate", "train", "export")} == {
        "${CTCVR_IMAGE:-ctcvr:latest}"
    }
    assert set(COMPOSE["volumes"]) == {
        v.split(":")[0] for s in SERVICES.values() for v in s["volumes"]
    }


def test_scoring_runs_worker_processes_the_service_accepts():
    from serving.config import ServingSettings

    environment = SERVICES["scoring"]["environment"]
    settings = ServingSettings(
        **{k.removeprefix("CTCVR_").lower(): v for k, v in environment.items()}
    )
    assert settings.workers == 2


def test_commands_name_existing_modules():
    for name in ("simulate", "export"):
        argv = command(name)
        module = argv[argv.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, module


def test_training_is_torchrun_with_two_processes_and_a_valid_config():
    argv = command("train")
    assert argv[0] == "torchrun" and "--nproc-per-node=2" in argv and "--resume" in argv
    config, overrides = trainer_call(argv)
    trained = load_config(config, overrides)
    data = command("simulate")
    assert trained.data.train == data[data.index("--out") + 1] + "/train"
    assert mounts("train")["/runs"] == mounts("simulate")["/runs"] == "runs"


def test_the_export_publishes_the_run_to_the_repository_scoring_follows():
    export = command("export")
    trained = load_config(*trainer_call(command("train")))
    assert export[export.index("--run") + 1] == trained.output_dir
    repository = export[export.index("--repository") + 1]
    environment = SERVICES["scoring"]["environment"]
    assert environment["CTCVR_MODEL_REPOSITORY"] == repository
    assert "CTCVR_MODEL_DIR" not in environment
    settings = ServingSettings(_env_file=None, model_repository=repository)
    assert settings.poll_seconds > 0 and float(environment["CTCVR_POLL_SECONDS"]) > 0
    assert repository.startswith("/models/")
    assert mounts("export") == {"/runs": "runs:ro", "/models": "models"}
    assert mounts("scoring") == {"/models": "models:ro"}  # a follower only reads


def daily_commands(current: str) -> list[list[str]]:
    """The daily script's commands, ``$$`` unescaped (compose's own ``$``), with ``$current`` the
    repository's current version (empty: none yet)."""
    sh, flag, script = SERVICES["daily"]["command"]
    assert (sh, flag) == ("sh", "-c")
    env = {
        "run": "/runs/daily/20261202T023000",
        "current": current,
        "init": f"train.init_from={current}" if current else "",
    }
    return shell_commands(script.replace("$$", "$"), env)


@pytest.mark.parametrize("current", ["", "/models/repository/demo-step00000200-0123456789"])
def test_the_daily_loop_warm_starts_from_the_current_version_and_publishes(current):
    commands = daily_commands(current)
    (lookup,) = [c for c in commands if c[0].startswith("current=")]
    assert " ".join(lookup) == (
        "current=$(python -m trainer.models current --repository /models/repository --uri "
        "--allow-empty)"
    )
    (torchrun,) = [c for c in commands if c[0] == "torchrun"]
    assert "--nproc-per-node=2" in torchrun
    config, overrides = trainer_call(torchrun)
    init = [o for o in overrides if o.startswith("train.init_from=")]
    assert init == ([f"train.init_from={current}"] if current else [])
    known = [o for o in overrides if o not in init or _knows_init_from()]
    trained = load_config(config, known)
    assert trained.data.train == load_config(*trainer_call(command("train"))).data.train
    (export,) = [c for c in commands if c[:3] == ["python", "-m", "trainer.export"]]
    assert export[export.index("--run") + 1] == trained.output_dir
    assert (
        export[export.index("--repository") + 1]
        == (SERVICES["scoring"]["environment"]["CTCVR_MODEL_REPOSITORY"])
    )
    assert mounts("daily") == {"/runs": "runs", "/models": "models"}


def _knows_init_from() -> bool:
    """Whether this checkout's trainer has ``train.init_from`` (warm start comes with its own
    branch; until then the override is left out of the config check)."""
    from trainer.config import TrainLoopConfig

    return "init_from" in {f.name for f in dataclasses.fields(TrainLoopConfig)}


def test_scoring_has_the_image_health_check_and_listens_on_loopback_only():
    scoring = SERVICES["scoring"]
    assert scoring["healthcheck"]["test"] == ["CMD", "ctcvr-entrypoint", "healthcheck"]
    assert (
        scoring["ports"] == ["127.0.0.1:8000:8000"]
        and scoring["environment"]["CTCVR_PORT"] == "8000"
    )
