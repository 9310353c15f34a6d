"""Impression logs on a real S3-compatible server: writing data sets, reading them exactly as from
local disk with ranged reads, hive partitions, and every storage fault as a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from typer.testing import CliRunner

from schemas import storage
from schemas.storage import StorageError
from trainer.data import DataError, ImpressionReader, infinite, simulate
from trainer.data import simulator as simulator_module
from trainer.data.__main__ import app
from trainer.data.converters import MnarConfig, convert_coat

runner = CliRunner()


def _upload(local: Path, uri: str) -> None:
    """Copy a local directory tree (or one file) to ``uri``."""
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for path in files:
        relative = path.relative_to(local).as_posix() if local.is_dir() else ""
        storage.write_bytes(storage.join(uri, relative) if relative else uri, path.read_bytes())


def _same_batches(a, b) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b, strict=True):
        assert x.sparse.keys() == y.sparse.keys()
        assert torch.equal(x.sparse.values(), y.sparse.values())
        assert torch.equal(x.sparse.lengths(), y.sparse.lengths())
        for name in ("dense", "click", "conversion", "group"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert torch.equal(x.truth.true_cvr, y.truth.true_cvr)


@pytest.fixture
def tiny_sim_config(small_config):
    return small_config(
        rows=6_000,
        num_users=500,
        num_items=400,
        row_group_rows=1_000,
        file_rows=2_000,
        calibration_rows=5_000,
    )


# Writing and reading data sets -------------------------------------------------------------------


def test_a_data_set_on_s3_reads_exactly_as_on_local_disk(s3, tmp_path, tiny_sim_config):
    local = simulate(tiny_sim_config, tmp_path / "sim", progress=False)
    remote = simulate(tiny_sim_config, s3.uri("sim"), progress=False)
    assert remote.out_dir == s3.uri("sim")
    files = sorted(
        p.relative_to(local.out_dir).as_posix() for p in local.out_dir.rglob("*") if p.is_file()
    )
    listed = [
        e.location.relative_to(storage.resolve(s3.uri("sim")))
        for e in storage.list_dir(s3.uri("sim"), recursive=True)
        if e.kind is storage.Kind.FILE
    ]
    assert listed == files  # schema.yaml, simulation.json, train/ and test/ parts; nothing else
    for name in files:
        assert storage.read_bytes(s3.uri("sim", name)) == (local.out_dir / name).read_bytes(), name
    for rank in range(2):
        options = {
            "batch_size": 700,
            "shuffle_buffer": 1_500,
            "seed": 3,
            "rank": rank,
            "world_size": 2,
        }
        from_disk = ImpressionReader.from_dataset(local.out_dir, "train", **options)
        from_s3 = ImpressionReader.from_dataset(s3.uri("sim"), "train", **options)
        assert from_s3.files[0] == s3.uri("sim", "train", "part-00000.parquet")
        _same_batches(list(from_disk.iter_epoch(1)), list(from_s3.iter_epoch(1)))
        # Resuming mid-epoch from a saved position is the same on both.
        disk_loop, s3_loop = infinite(from_disk), infinite(from_s3)
        for _ in range(3):
            next(disk_loop), next(s3_loop)
        resumed = infinite(ImpressionReader.from_dataset(s3.uri("sim"), "train", **options))
        resumed.load_state_dict(s3_loop.state_dict())
        _same_batches([next(disk_loop) for _ in range(4)], [next(resumed) for _ in range(4)])


def test_the_command_line_simulates_to_s3_and_summarises_it(s3):
    out = s3.uri("cli-sim")
    args = ["simulate", "--out", out, "--rows", "3000", "--users", "300", "--items", "200"]
    args += ["--row-group-rows", "1000", "--no-progress"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert f"wrote {out}" in done.output
    stats = runner.invoke(app, ["stats", out, "--scan"])
    assert stats.exit_code == 0, stats.output
    lines = stats.output.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["train", "test", "all"]
    assert "rows read 2,400" in stats.output  # the scan of train/ through the reader
    again = runner.invoke(app, args)
    assert (
        again.exit_code != 0 and "already holds" in again.output and "--overwrite" in again.output
    )


def test_a_converter_writes_the_same_data_set_to_s3(s3, tmp_path):
    cfg = MnarConfig(name="coat", validation_fraction=0.1)
    local = convert_coat(tmp_path / "coat", cfg=cfg)
    remote = convert_coat(s3.uri("coat"), cfg=cfg)
    assert remote.out_dir == s3.uri("coat")
    for split in ("train", "valid", "test"):
        for path in sorted((local.out_dir / split).glob("*.parquet")):
            assert storage.read_bytes(s3.uri("coat", split, path.name)) == path.read_bytes()
    assert (
        storage.read_text(s3.uri("coat", "schema.yaml"))
        == (local.out_dir / "schema.yaml").read_text()
    )
    record = json.loads(storage.read_text(s3.uri("coat", "conversion.json")))
    assert record["splits"]["valid"]["rows"] > 0
    done = runner.invoke(app, ["stats", s3.uri("coat", "test")])
    assert done.exit_code == 0, done.output  # the schema is found above the split on s3 too
    assert "4,640" in done.output


def test_a_half_written_data_set_is_never_read_as_complete(s3, tiny_sim_config, monkeypatch):
    out = s3.uri("sim")
    simulate(tiny_sim_config, out, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        simulate(tiny_sim_config, out, progress=False)
    ImpressionReader.from_dataset(out, "train", batch_size=100)  # refused without harm

    chunks = []
    original = simulator_module._chunk

    def crash_after_two(*args, **kwargs):
        if len(chunks) == 2:
            raise RuntimeError("killed while writing")
        chunks.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(simulator_module, "_chunk", crash_after_two)
    with pytest.raises(RuntimeError, match="killed while writing"):
        simulate(tiny_sim_config, out, overwrite=True, progress=False)
    assert storage.exists(s3.uri("sim", "train", "part-00000.parquet"))  # new parts are there...
    for name in ("schema.yaml", "simulation.json"):
        assert not storage.exists(s3.uri("sim", name))  # ...but the data set is unpublished
    with pytest.raises(DataError, match=rf"{out}: no schema\.yaml, so not a complete data set"):
        ImpressionReader.from_dataset(out, "train", batch_size=100)
    monkeypatch.setattr(simulator_module, "_chunk", original)
    simulate(tiny_sim_config, out, overwrite=True, progress=False)
    assert ImpressionReader.from_dataset(out, "train", batch_size=100).num_rows == 4_800


# Ranged reads ------------------------------------------------------------------------------------


class _CountingFile:
    """A file object that counts the bytes read through it."""

    def __init__(self, inner: pa.NativeFile, counter: dict[str, int]) -> None:
        self.inner, self.counter, self.closed = inner, counter, False

    def read(self, nbytes: int = -1) -> bytes:
        data = self.inner.read() if nbytes is None or nbytes < 0 else self.inner.read(nbytes)
        self.counter["bytes"] += len(data)
        return data

    def seek(self, position: int, whence: int = 0) -> int:
        return self.inner.seek(position, whence)

    def tell(self) -> int:
        return self.inner.tell()

    def size(self) -> int:
        return self.inner.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.inner.close()
        self.closed = True


class _CountingHandler(pafs.FileSystemHandler):
    """A filesystem that delegates to another and counts the bytes read from its files."""

    def __init__(self, inner: pafs.FileSystem, counter: dict[str, int]) -> None:
        self.inner, self.counter = inner, counter

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.inner.get_file_info(selector)

    def open_input_file(self, path):
        return pa.PythonFile(
            _CountingFile(self.inner.open_input_file(path), self.counter), mode="r"
        )

    def open_input_stream(self, path):
        return self.open_input_file(path)

    def equals(self, other):
        return self is other

    def create_dir(self, path, recursive):
        raise NotImplementedError

    delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = create_dir
    move = copy_file = open_output_stream = open_append_stream = create_dir


def test_row_groups_are_read_with_ranged_reads_never_the_whole_object(
    s3, tmp_path, tiny_columns, tiny_schema, write_parquet, monkeypatch
):
    # Big enough that a footer read (64 KiB at most) or one row group is a small part of it.
    local = write_parquet(tmp_path / "big.parquet", tiny_columns(40_000), [2_000] * 20)
    uri = s3.uri("logs", "big.parquet")
    _upload(local, uri)
    size = local.stat().st_size
    counter = {"bytes": 0}
    real = storage._filesystem

    def counting(location):
        fs = real(location)
        return pafs.PyFileSystem(_CountingHandler(fs, counter)) if location.scheme == "s3" else fs

    monkeypatch.setattr(storage, "_filesystem", counting)
    # Rank 8 of 20 owns rows [16000, 18000): one row group of twenty.
    reader = ImpressionReader(
        s3.uri("logs"), tiny_schema, batch_size=500, shuffle=False, rank=8, world_size=20
    )
    footer = counter["bytes"]
    rids = [r for batch in reader for r in batch.group.tolist()]
    assert rids == list(range(16_000, 18_000))
    footer_and_row_group = counter["bytes"] - footer
    assert size > 10 * 65_536
    assert 0 < footer <= 65_536 and footer_and_row_group < footer + size / 10
    everything = ImpressionReader(s3.uri("logs"), tiny_schema, batch_size=5_000, shuffle=False)
    counter["bytes"] = 0
    assert sum(b.size for b in everything) == 40_000
    assert counter["bytes"] > 0.9 * size  # the counter does see whole reads


# Hive partitions ---------------------------------------------------------------------------------


def test_hive_day_partitions_on_s3_with_a_filter(
    s3, tmp_path, tiny_columns, tiny_schema, write_parquet
):
    days = ["2026-11-29", "2026-11-30", "2026-12-01"]
    for index, day in enumerate(days):
        part = write_parquet(
            tmp_path / f"{day}.parquet", tiny_columns(10, start=10 * index), [6, 4]
        )
        _upload(part, s3.uri("impressions", f"day={day}", "part-00000.parquet"))
    storage.write_text(s3.uri("impressions", f"day={days[0]}", "_SUCCESS"), "")
    everything = ImpressionReader(s3.uri("impressions"), tiny_schema, batch_size=7, shuffle=False)
    assert [r for b in everything for r in b.group.tolist()] == list(range(30))
    recent = ImpressionReader(
        s3.uri("impressions"),
        tiny_schema,
        batch_size=7,
        shuffle=False,
        filter="day >= '2026-11-30'",
    )
    assert [r for b in recent for r in b.group.tolist()] == list(range(10, 30))
    done = runner.invoke(app, ["stats", s3.uri("impressions"), "--filter", "day == '2026-12-01'"])
    assert done.exit_code == 0, done.output
    assert done.output.splitlines()[1].split()[:2] == ["log", "10"]
    with pytest.raises(DataError, match=r"selects none of its 3 file\(s\)"):
        ImpressionReader(
            s3.uri("impressions"), tiny_schema, batch_size=7, filter="day < '2026-01-01'"
        )


# Faults ------------------------------------------------------------------------------------------


@pytest.fixture
def s3_log(s3, tmp_path, tiny_columns, write_parquet) -> str:
    """Three files of 40 rows in row groups of 10 under ``s3://<bucket>/log``."""
    for index in range(3):
        part = write_parquet(
            tmp_path / f"p{index}.parquet", tiny_columns(40, start=40 * index), [10] * 4
        )
        _upload(part, s3.uri("log", f"part-{index}.parquet"))
    return s3.uri("log")


def test_missing_bucket_prefix_and_object(s3, tiny_schema):
    with pytest.raises(
        StorageError,
        match=r"s3://no-such-bucket-ctcvr/log: bucket 'no-such-bucket-ctcvr' does not exist at endpoint http://127\.0\.0\.1:\d+",
    ):
        ImpressionReader("s3://no-such-bucket-ctcvr/log", tiny_schema, batch_size=4)
    with pytest.raises(DataError, match=rf"{s3.uri('nothing')}: no such file or directory"):
        ImpressionReader(s3.uri("nothing"), tiny_schema, batch_size=4)
    with pytest.raises(DataError, match="schema.yaml, so not a complete data set"):
        ImpressionReader.from_dataset(s3.uri("nothing"), "train", batch_size=4)


def test_wrong_credentials(s3_log, tiny_schema, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(
        StorageError,
        match=rf"{s3_log}: access denied by endpoint .*check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY",
    ) as err:
        ImpressionReader(s3_log, tiny_schema, batch_size=4)
    assert "not-the-secret" not in str(err.value)


def test_a_truncated_object_is_named(s3, tmp_path, tiny_columns, tiny_schema, write_parquet):
    whole = write_parquet(tmp_path / "p.parquet", tiny_columns(40)).read_bytes()
    uri = s3.uri("log", "part-0.parquet")
    storage.write_bytes(uri, whole[: len(whole) // 2])
    with pytest.raises(
        DataError,
        match=rf"{uri}: not a readable Parquet file \(corrupt, truncated or another format\)",
    ):
        ImpressionReader(s3.uri("log"), tiny_schema, batch_size=4)


def test_the_store_going_down_mid_epoch(s3, s3_log, tiny_schema):
    reader = ImpressionReader(s3_log, tiny_schema, batch_size=10, shuffle=False)
    batches = iter(reader)
    assert next(batches).group.tolist() == list(range(10))
    with s3.server.stopped(), pytest.raises(StorageError) as err:
        list(batches)
    message = str(err.value)
    assert message.startswith(
        f"{s3_log}/part-0.parquet: cannot read: endpoint {s3.server.endpoint} unreachable after 2 attempt(s)"
    )
    # The store is back: the same reader reads the epoch again, whole.
    assert [r for b in reader.iter_epoch(0) for r in b.group.tolist()] == list(range(120))


def test_a_short_outage_mid_epoch_is_bridged_by_retries(s3, s3_log, tiny_schema, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "6")
    reader = ImpressionReader(s3_log, tiny_schema, batch_size=10, shuffle=False)
    batches = iter(reader)
    first = next(batches)
    s3.server.stop()
    s3.server.restart_after(0.5)
    rest = list(batches)
    assert [r for b in [first, *rest] for r in b.group.tolist()] == list(range(120))
