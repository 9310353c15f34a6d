"""Readers shared by the deployment tests: the Dockerfile's user, the k8s and compose files, and
the trainer command lines written in them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
# Where the image keeps trainer/configs (Dockerfile: COPY trainer/configs /srv/ctcvr/configs,
# WORKDIR /srv/ctcvr), so `--config configs/x.yaml` in the image is trainer/configs/x.yaml here.
IMAGE_CONFIGS = "configs/"


def image_uid() -> int:
    users = re.findall(r"^USER\s+(\d+)", (REPO / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert len(users) == 1, users
    return int(users[0])


def k8s_documents() -> dict[str, dict[str, Any]]:
    """Every resource of deploy/k8s as ``{"Kind/name": document}``."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def trainer_call(argv: list[str]) -> tuple[str, list[str]]:
    """The config file (as a path here) and the overrides of a ``... -m trainer.train ...`` argv."""
    args = argv[argv.index("trainer.train") + 1 :]
    config = args[args.index("--config") + 1]
    assert config.startswith(IMAGE_CONFIGS), config
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    return str(REPO / "trainer" / config), overrides


def shell_commands(script: str, env: dict[str, str]) -> list[list[str]]:
    """The simple commands of a small shell script (continuations joined, $VARS expanded from
    ``env``), one argv per line."""
    joined = re.sub(r"\\\n\s*", " ", script)
    expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), joined)
    return [shlex.split(line) for line in expanded.splitlines() if line.strip()]
