"""The image's entry point (deploy/entrypoint.sh), run here with this interpreter as `python`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"


def run(*args: str, port: int | None = None, **env: str) -> subprocess.CompletedProcess:
    environ = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **env,
    }
    if port is not None:
        environ["CTCVR_PORT"] = str(port)
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextmanager
def readyz_server(status: int) -> Iterator[int]:
    """A loopback HTTP server whose GET /readyz answers ``status``; yields its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1)])
def test_healthcheck_follows_readyz(status, code):
    with readyz_server(status) as port:
        result = run("healthcheck", port=port)
    assert result.returncode == code, result.stderr
    if code:
        assert f"127.0.0.1:{port}/readyz" in result.stderr


def test_healthcheck_fails_when_nothing_listens():
    with readyz_server(200) as port:
        pass  # closed again: the port is free
    result = run("healthcheck", port=port)
    assert result.returncode == 1 and "readyz" in result.stderr


def test_serves_by_default_the_model_directory_of_the_environment(tmp_path):
    missing = tmp_path / "no-model-here"
    result = run(CTCVR_MODEL_DIR=str(missing))
    assert result.returncode == 1
    assert f"model directory {missing} does not exist" in result.stderr


@pytest.mark.parametrize("args", [("--help",), ("serve", "--help")])
def test_flags_go_to_the_service(args):
    result = run(*args)
    assert result.returncode == 0 and "--model-dir" in result.stdout


def test_any_other_command_runs_as_given():
    result = run("python", "-c", "import sys; print('trainer image', sys.argv[1])", "ok")
    assert result.returncode == 0 and result.stdout.strip() == "trainer image ok"


def _without_model_variables() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("CTCVR_MODEL_DIR", "CTCVR_MODEL_REPOSITORY")
    }


def run_clean(*args: str, **env: str) -> subprocess.CompletedProcess:
    """:func:`run` with neither model variable set, unless given."""
    environ = {
        **_without_model_variables(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **env,
    }
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], cwd=REPO, env=environ, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_serves_models_current_when_nothing_names_a_model():
    result = run_clean()
    assert result.returncode == 1
    assert "model directory /models/current does not exist" in result.stderr


def test_follows_the_repository_of_the_environment_without_a_default_model_dir(tmp_path):
    empty = tmp_path / "repo"
    for args in [(), ("serve",), ("--check",)]:
        result = run_clean(*args, CTCVR_MODEL_REPOSITORY=str(empty))
        assert result.returncode == 1, result.stderr
        assert f"model repository {empty} is empty" in result.stderr
        assert "mutually exclusive" not in result.stderr


def test_a_repository_flag_is_not_given_the_default_model_dir(tmp_path):
    empty = tmp_path / "repo"
    for args in [("--repository", str(empty)), ("serve", f"--repository={empty}")]:
        result = run_clean(*args)
        assert result.returncode == 1 and f"model repository {empty} is empty" in result.stderr
