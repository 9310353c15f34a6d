"""Fixtures for every test package: a real S3-compatible server on loopback.

Example::

    def test_round_trip(s3):
        storage.write_text(s3.uri("a.txt"), "hi")       # s3://<fresh bucket>/a.txt
        with s3.server.stopped():
            ...                                          # the store is unreachable here
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.object_store import S3Server

# Variables that would point the SDKs elsewhere than the test server.
_FOREIGN_AWS_VARIABLES = (
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the test server, with the AWS variables of the test set to reach it.

    Attributes:
        server: the server (stop / start it for outage tests).
        bucket: ``s3://<name>``.
    """

    server: S3Server
    bucket: str

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts joined by />``."""
        return "/".join([self.bucket, *parts])

    @property
    def name(self) -> str:
        return self.bucket.removeprefix("s3://")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server with signature checks, started once per session (on first use)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = S3Server()
    server.start()
    server.enable_authentication()
    yield server
    server.stop()


@pytest.fixture
def s3(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> S3Bucket:
    """A fresh bucket; ``AWS_*`` point at the test server for this test (and its subprocesses)."""
    s3_server.start()  # in case an earlier test stopped it and failed before starting it again
    for name in _FOREIGN_AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    nowhere = tmp_path_factory.mktemp("aws") / "none"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(nowhere))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    return S3Bucket(server=s3_server, bucket=s3_server.create_bucket())
