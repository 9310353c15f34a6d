"""A real S3-compatible server for tests: moto's standalone server on a loopback port.

The server speaks the S3 HTTP API (multipart upload, ranged reads, listing) and checks request
signatures: it is started with IAM authentication on, and the tests use the access key of an IAM
user it created, so wrong credentials fail as they would against AWS.

Fixtures in ``tests/conftest.py``: ``s3_server`` (one per session) and ``s3`` (a fresh bucket and
the AWS environment variables of one test).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_REGION = "us-east-1"
# The moto API's requests that run before authentication is enforced: creating the IAM user, its
# policy and its access key.
_BOOTSTRAP_ACTIONS = 3


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str


class S3Server:
    """moto's server on ``127.0.0.1:<free port>``; stop and start it again to simulate an outage.

    Objects and buckets live in this process's moto backends, so they survive a restart.
    """

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.running = False
        self.credentials: Credentials | None = None

    def start(self) -> None:
        if not self.running:
            self._server.start()
            self.running = True

    def stop(self) -> None:
        if self.running:
            self._server.stop()
            self.running = False

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """The server is down inside the block and up again after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def restart_after(self, seconds: float) -> threading.Thread:
        """Start the (stopped) server again from another thread after ``seconds``."""
        thread = threading.Thread(target=lambda: (time.sleep(seconds), self.start()), daemon=True)
        thread.start()
        return thread

    def enable_authentication(self) -> Credentials:
        """Create an IAM user allowed ``s3:*``, then make the server check every signature."""
        import boto3

        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=str(_BOOTSTRAP_ACTIONS).encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
        iam = boto3.session.Session(
            aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap", region_name=_REGION
        ).client("iam", endpoint_url=self.endpoint)
        iam.create_user(UserName="ctcvr-tests")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="ctcvr-tests", PolicyName="s3", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="ctcvr-tests")["AccessKey"]
        self.credentials = Credentials(key["AccessKeyId"], key["SecretAccessKey"])
        return self.credentials

    def environment(self) -> dict[str, str]:
        """The AWS variables a client needs to use this server."""
        assert self.credentials is not None, "enable_authentication() first"
        return {
            "AWS_ACCESS_KEY_ID": self.credentials.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.credentials.secret_access_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": _REGION,
            "AWS_DEFAULT_REGION": _REGION,
            "AWS_MAX_ATTEMPTS": "2",  # failing tests fail in about a second
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask a cloud metadata service
        }

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return ``s3://<name>``."""
        import boto3

        assert self.credentials is not None, "enable_authentication() first"
        name = name or f"ctcvr-{uuid.uuid4().hex[:12]}"
        client = boto3.session.Session(
            aws_access_key_id=self.credentials.access_key_id,
            aws_secret_access_key=self.credentials.secret_access_key,
            region_name=_REGION,
        ).client("s3", endpoint_url=self.endpoint)
        client.create_bucket(Bucket=name)
        return f"s3://{name}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def upload_tree(local: Path, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (``s3://bucket/prefix``), file by file."""
    from schemas import storage

    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.upload_file(path, storage.join(uri, path.relative_to(local).as_posix()))


def download_tree(uri: str, local: Path) -> Path:
    """Copy every object under ``uri`` into the local directory ``local``; returns ``local``."""
    from schemas import storage

    root = storage.resolve(uri)
    for entry in storage.list_dir(root, recursive=True):
        if entry.kind is storage.Kind.FILE:
            target = local / entry.location.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage.read_bytes(entry.location))
    return local
