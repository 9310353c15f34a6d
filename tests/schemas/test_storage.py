"""schemas.storage: URIs, the same operations on local disk, memory:// and a real S3 server, and
each storage fault as one clear StorageError."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fsspec.asyn
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import ClientConnectionResetError

from schemas import storage
from schemas.storage import Kind, S3Settings, StorageError, WriteConflict

# URIs --------------------------------------------------------------------------------------------


def test_local_paths_keep_their_spelling_and_resolve_to_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = storage.resolve("data/sim/")
    assert location.uri == "data/sim" and location.scheme == "" and location.is_local
    assert location.path == str(tmp_path / "data" / "sim")
    assert location.join("train", "part-0.parquet").uri == "data/sim/train/part-0.parquet"
    assert storage.resolve(Path("a") / "b").uri == "a/b"
    assert storage.resolve(".").parent.path == str(tmp_path.parent)


@pytest.mark.parametrize(
    ("uri", "shown", "scheme", "path"),
    [
        ("s3://bucket/logs/", "s3://bucket/logs", "s3", "bucket/logs"),
        ("s3://bucket", "s3://bucket", "s3", "bucket"),
        ("S3://bucket/a//b", "s3://bucket/a//b", "s3", "bucket/a//b"),
        ("gs://bucket/x", "gs://bucket/x", "gs", "bucket/x"),
        ("file:///tmp/x/../y", "file:///tmp/y", "file", "/tmp/y"),
        ("memory://tests/x", "memory://tests/x", "memory", "/tests/x"),
        ("hdfs://namenode:8020/logs", "hdfs://namenode:8020/logs", "hdfs", "/logs"),
    ],
)
def test_uris(uri, shown, scheme, path):
    location = storage.resolve(uri)
    assert (location.uri, location.scheme, location.path) == (shown, scheme, path)
    assert str(location) == shown


def test_join_and_parent_of_uris():
    root = storage.resolve("s3://bucket/logs")
    part = root.join("day=2026-12-01/part-0.parquet")
    assert part.uri == "s3://bucket/logs/day=2026-12-01/part-0.parquet"
    assert part.path == "bucket/logs/day=2026-12-01/part-0.parquet"
    assert part.relative_to(root) == "day=2026-12-01/part-0.parquet"
    assert part.parent.parent == root and root.parent.uri == "s3://bucket"
    assert storage.join("s3://bucket/logs/", "train", "x") == "s3://bucket/logs/train/x"
    with pytest.raises(StorageError, match=r"'\.' and '\.\.' are not allowed"):
        root.join("../other")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://AKIAEXAMPLE:topsecret@bucket/x", "credentials in a URI are not accepted"),
        ("s3://bucket/x?access_key=AKIA&secret_key=topsecret", "query or fragment"),
        ("s3:///x", "no bucket"),
        ("", "empty path or URI"),
    ],
)
def test_uris_that_are_refused(uri, message):
    with pytest.raises(StorageError, match=message) as err:
        storage.resolve(uri)
    assert "topsecret" not in str(err.value)


def test_an_unknown_protocol_names_the_schemes_ctcvr_reads():
    with pytest.raises(StorageError, match=r"no filesystem for nosuchfs://"):
        storage.read_bytes("nosuchfs://x/y")


def test_redact_removes_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-value")
    text = "signed with s3cr3t-value and token-value at http://user:pw@host:9000/x"
    assert storage.redact(text) == "signed with *** and *** at http://***@host:9000/x"


# Settings ----------------------------------------------------------------------------------------


def test_settings_come_from_the_standard_aws_variables():
    settings = S3Settings.from_env(
        {
            "AWS_ENDPOINT_URL": "http://generic:1",
            "AWS_ENDPOINT_URL_S3": "http://s3-only:2/",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "AWS_REGION": "eu-west-3",
            "AWS_MAX_ATTEMPTS": "7",
            "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        }
    )
    assert settings.endpoint == "http://s3-only:2"  # the service-specific variable wins
    assert settings.region == "eu-west-3"  # AWS_REGION before AWS_DEFAULT_REGION
    assert settings.max_attempts == 7
    assert "s3cr3t" not in repr(settings)
    defaults = S3Settings.from_env({"AWS_DEFAULT_REGION": "eu-west-1"})
    assert (defaults.endpoint, defaults.region, defaults.max_attempts) == (None, "eu-west-1", 5)
    other_keys = S3Settings.from_env({"AWS_SECRET_ACCESS_KEY": "other"})
    assert other_keys.credentials_id != settings.credentials_id  # a new client when they change


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"AWS_MAX_ATTEMPTS": "0"}, "AWS_MAX_ATTEMPTS must be an integer >= 1, got '0'"),
        ({"AWS_MAX_ATTEMPTS": "many"}, "AWS_MAX_ATTEMPTS must be an integer"),
        ({"AWS_ENDPOINT_URL": "localhost:9000"}, r"needs a scheme, e\.g\. http://localhost:9000"),
    ],
)
def test_invalid_settings_name_the_variable(environ, message):
    with pytest.raises(StorageError, match=message):
        S3Settings.from_env(environ)


def test_fsspec_options_carry_endpoint_region_and_retries(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    options = storage.fsspec_options("s3://bucket/ckpt")
    assert options["endpoint_url"] == "http://127.0.0.1:9"
    assert options["client_kwargs"] == {"region_name": "eu-west-3"}
    assert options["config_kwargs"]["retries"] == {"max_attempts": 4, "mode": "standard"}
    assert storage.fsspec_options("/tmp/ckpt") == {}
    # One session (so one cached filesystem and client) per settings; new credentials, new one.
    assert storage.fsspec_options("s3://other/x")["session"] is options["session"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret")
    assert storage.fsspec_options("s3://bucket/ckpt")["session"] is not options["session"]


def _orphan_a_failed_task(loop, error: BaseException) -> None:
    """A task on ``loop`` that fails with ``error`` and that nobody awaits, collected."""

    async def fail():
        raise error

    async def spawn():
        task = asyncio.ensure_future(fail())
        while not task.done():
            await asyncio.sleep(0)

    asyncio.run_coroutine_threadsafe(spawn(), loop).result(timeout=10)
    gc.collect()


def test_a_connection_error_orphaned_on_the_fsspec_loop_is_one_line_not_a_traceback(caplog):
    # aiohttp leaves a body writer's connection error in a task nobody awaits when the store
    # goes away mid-request; the request's own error reaches the caller, the copy is noise.
    storage.fsspec_options("s3://bucket/ckpt")
    loop = fsspec.asyn.get_loop()
    with caplog.at_level(logging.DEBUG):
        _orphan_a_failed_task(loop, ClientConnectionResetError("Cannot write to closing transport"))
    orphan = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert orphan and all(r.levelno == logging.DEBUG and not r.exc_info for r in orphan)
    assert "Cannot write to closing transport" in orphan[0].getMessage()

    # Anything else keeps asyncio's own report, traceback and all.
    caplog.clear()
    _orphan_a_failed_task(loop, ValueError("a real bug"))
    [report] = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert report.levelno == logging.ERROR and report.exc_info[0] is ValueError


# The same operations on every backend ------------------------------------------------------------


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path) -> str:
    """A fresh, empty directory on each backend."""
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "memory":
        return f"memory://ctcvr-tests/{uuid.uuid4().hex}"
    return request.getfixturevalue("s3").uri("root")


def test_write_read_list_delete(root):
    a, b = storage.join(root, "a.txt"), storage.join(root, "sub/deeper/b.bin")
    assert storage.kind(root) is None and not storage.exists(a)
    storage.write_text(a, "héllo")
    storage.write_bytes(b, b"\x00\x01")
    assert storage.read_text(a) == "héllo" and storage.read_bytes(b) == b"\x00\x01"
    assert storage.kind(a) is Kind.FILE and storage.is_file(a)
    assert storage.kind(root) is Kind.DIRECTORY and storage.is_dir(storage.join(root, "sub"))
    top = storage.list_dir(root)
    assert [(e.name, e.kind) for e in top] == [("a.txt", Kind.FILE), ("sub", Kind.DIRECTORY)]
    assert top[0].size == len("héllo".encode())
    deep = [
        e.location.relative_to(storage.resolve(root))
        for e in storage.list_dir(root, recursive=True)
    ]
    assert deep == ["a.txt", "sub", "sub/deeper", "sub/deeper/b.bin"]
    storage.write_text(a, "replaced")  # a write replaces the whole file
    assert storage.read_text(a) == "replaced"
    storage.delete_file(a)
    storage.delete_file(a)  # missing is fine by default
    with pytest.raises(StorageError):
        storage.delete_file(a, missing_ok=False)
    storage.delete_tree(storage.join(root, "sub"))
    assert not storage.exists(b)
    storage.delete_tree(storage.join(root, "never-there"))


def test_write_bytes_if_is_a_compare_and_swap(root):
    pointer = storage.join(root, "CURRENT")
    storage.write_bytes_if(pointer, b"v1", expected=None)  # created: it did not exist
    with pytest.raises(WriteConflict, match="already exists"):
        storage.write_bytes_if(pointer, b"v2", expected=None)
    storage.write_bytes_if(pointer, b"v2", expected=b"v1")
    with pytest.raises(WriteConflict, match="was changed by another writer since it was read"):
        storage.write_bytes_if(pointer, b"v3", expected=b"v1")
    assert storage.read_bytes(pointer) == b"v2"
    storage.delete_file(pointer)
    with pytest.raises(WriteConflict, match="was deleted by another writer"):
        storage.write_bytes_if(pointer, b"v3", expected=b"v2")
    # Locks and staging files are hidden beside the file; nothing else is left.
    left = storage.list_dir(root) if storage.exists(root) else []
    assert [e.name for e in left if not e.name.startswith(".")] == []


def test_listings_say_when_files_were_written(root):
    before = datetime.now(UTC) - timedelta(minutes=5)
    storage.write_text(storage.join(root, "a.txt"), "x")
    (entry,) = storage.list_dir(root)
    if root.startswith("memory://"):
        assert entry.modified is None  # fsspec's memory store keeps no times: none is made up
    else:
        assert before < entry.modified < before + timedelta(hours=1)


def test_a_conditional_put_that_loses_the_race_is_refused_by_s3(s3, monkeypatch):
    """Between the read and the PUT another writer changes the object: S3's If-Match refuses."""
    uri = s3.uri("CURRENT")
    storage.write_bytes(uri, b"v1")
    real_check = storage._check_unchanged

    def meanwhile(location, current, expected):
        real_check(location, current, expected)
        storage.write_bytes(uri, b"someone else")  # after our read, before our PUT

    monkeypatch.setattr(storage, "_check_unchanged", meanwhile)
    with pytest.raises(WriteConflict, match="the store refused the conditional write"):
        storage.write_bytes_if(uri, b"v2", expected=b"v1")
    assert storage.read_bytes(uri) == b"someone else"


def test_a_conditional_write_names_storage_faults(s3, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with s3.server.stopped(), pytest.raises(StorageError) as err:
        storage.write_bytes_if(s3.uri("CURRENT"), b"v1", expected=None)
    assert f"endpoint {s3.server.endpoint} unreachable" in str(err.value)
    with pytest.raises(StorageError, match="bucket 'ctcvr-no-such-bucket' does not exist"):
        storage.write_bytes_if("s3://ctcvr-no-such-bucket/CURRENT", b"v1", expected=None)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    with pytest.raises(StorageError, match="access denied") as err:
        storage.write_bytes_if(s3.uri("CURRENT"), b"v1", expected=None)
    assert "wrong-secret" not in str(err.value)


def test_parquet_through_the_filesystem(root):
    location = storage.resolve(storage.join(root, "t.parquet"))
    storage.make_dirs(location.parent)
    table = pa.table({"x": list(range(1000))})
    pq.write_table(table, location.path, filesystem=location.filesystem, row_group_size=100)
    with storage.open_input_file(location) as handle:
        parquet = pq.ParquetFile(handle)
        assert parquet.metadata.num_row_groups == 10
        assert parquet.read_row_group(3).column("x").to_pylist() == list(range(300, 400))


def test_missing_files_are_named(root):
    with pytest.raises(StorageError, match="no such") as err:
        storage.read_bytes(storage.join(root, "nothing.txt"))
    assert storage.resolve(storage.join(root, "nothing.txt")).uri in str(err.value)
    with pytest.raises(StorageError, match="no such"):
        storage.list_dir(storage.join(root, "nowhere"))


def test_a_local_write_is_never_seen_half_done(tmp_path, monkeypatch):
    target = tmp_path / "dir" / "model.json"
    storage.write_text(target, "old")

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="No space left on device"):
        storage.write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.json"]  # no staging file


def test_refuses_to_delete_a_whole_bucket():
    with pytest.raises(StorageError, match="refusing to delete a whole bucket"):
        storage.delete_tree("s3://bucket/")


def test_local_permission_denied(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    locked = tmp_path / "locked.txt"
    locked.write_text("x")
    locked.chmod(0)
    with pytest.raises(StorageError, match="permission denied to read"):
        storage.read_bytes(locked)


# S3 faults ---------------------------------------------------------------------------------------


def test_objects_are_written_in_one_put_and_read_back_by_s3fs(s3):
    uri = s3.uri("ckpt/.metadata")
    storage.write_bytes(uri, b"x" * 100_000)
    filesystem, path = storage.fsspec_filesystem(uri)
    assert filesystem.cat(path) == b"x" * 100_000  # DCP's fsspec side sees the same store
    filesystem.pipe(f"{s3.name}/ckpt/from-fsspec", b"fsspec")
    assert storage.read_bytes(s3.uri("ckpt/from-fsspec")) == b"fsspec"


def test_missing_bucket(s3):
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/logs/x.parquet"
    expected = (
        rf"bucket 'no-such-bucket-\w+' does not exist at endpoint {s3.server.endpoint}: "
        "check the bucket name, AWS_ENDPOINT_URL and AWS_REGION"
    )
    for operation in (storage.read_bytes, storage.exists, storage.list_dir):
        with pytest.raises(StorageError, match=expected) as err:
            operation(missing)
        assert str(err.value).startswith(missing.rsplit("/", 1)[0])
    with pytest.raises(StorageError, match=expected):
        storage.write_text(missing, "x")


def test_missing_object(s3):
    with pytest.raises(StorageError, match=rf"{s3.uri('none')}: no such object or prefix"):
        storage.read_text(s3.uri("none"))


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials(s3, monkeypatch, variable):
    uri = s3.uri("a.txt")
    storage.write_text(uri, "x")
    wrong = f"AKIAWRONG{uuid.uuid4().hex[:8].upper()}"
    monkeypatch.setenv(variable, wrong)
    for operation, action in ((storage.read_text, "read"), (storage.list_dir, "list")):
        target = uri if action == "read" else s3.bucket
        with pytest.raises(StorageError, match="access denied by endpoint") as err:
            operation(target)
        message = str(err.value)
        assert message.startswith(target)
        assert "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN" in message
        assert f"may {action} in bucket '{s3.name}'" in message
        assert wrong not in message
    monkeypatch.setenv(variable, s3.server.environment()[variable])
    assert storage.read_text(uri) == "x"  # a new client with the right credentials


def test_unreachable_store_is_retried_then_named(s3, monkeypatch):
    uri = s3.uri("a.txt")
    storage.write_text(uri, "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with s3.server.stopped(), pytest.raises(StorageError) as err:
        storage.read_text(uri)
    message = str(err.value)
    assert message.startswith(f"{uri}: cannot read: endpoint {s3.server.endpoint} unreachable")
    assert "after 1 attempt(s)" in message and "AWS_MAX_ATTEMPTS" in message
    assert storage.read_text(uri) == "x"


def test_a_short_outage_is_bridged_by_the_retries(s3, monkeypatch):
    uri = s3.uri("a.txt")
    storage.write_text(uri, "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "6")  # exponential backoff: several seconds in all
    s3.server.stop()
    started = time.monotonic()
    s3.server.restart_after(0.5)
    assert storage.read_text(uri) == "x"
    assert time.monotonic() - started >= 0.5
