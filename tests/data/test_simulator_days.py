"""The simulator over consecutive days: partitions, shared ids, drift, one ground truth, bytes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr

from trainer.data import ImpressionReader, SimulatorConfig, simulate

DAYS = ["2026-12-01", "2026-12-02", "2026-12-03"]


def _days_config(small_config, **overrides) -> SimulatorConfig:
    base = {
        "rows": 12_000,
        "days": 3,
        "num_users": 1_500,
        "num_items": 800,
        "row_group_rows": 2_000,
        "file_rows": 6_000,
        "calibration_rows": 20_000,
    }
    return small_config(**{**base, **overrides})


def _day(out, split: str, day: str, columns=None):
    return pq.read_table(out / split / f"day={day}", columns=columns)


@pytest.fixture(scope="module")
def daily(tmp_path_factory, small_config):
    cfg = _days_config(small_config, new_users=0.1, new_items=0.1)
    return cfg, simulate(cfg, tmp_path_factory.mktemp("daily"), progress=False)


def test_each_day_is_a_hive_partition_of_both_splits(daily):
    cfg, result = daily
    out = result.out_dir
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"day={d}" for d in DAYS]
    assert sorted(p.name for p in (out / "test").iterdir()) == [f"day={d}" for d in DAYS]
    assert list(result.days) == DAYS
    for day in DAYS:
        for split in ("train", "test"):
            rows = _day(out, split, day, ["click"]).num_rows
            assert rows == cfg.split_rows[split] == result.days[day][split].rows
    assert result.splits["train"].rows == 3 * cfg.split_rows["train"]
    record = json.loads((out / "simulation.json").read_text())
    assert list(record["days"]) == DAYS and record["config"]["days"] == 3


def test_data_filter_reads_a_window_of_days(daily):
    cfg, result = daily
    reader = ImpressionReader(
        result.out_dir / "train",
        result.schema,
        batch_size=4_096,
        shuffle=False,
        filter="day >= '2026-12-02'",
    )
    assert sum(batch.size for batch in reader) == 2 * cfg.split_rows["train"]


def _ids(out, day: str, column: str) -> np.ndarray:
    return np.concatenate(
        [_day(out, split, day, [column])[column].to_numpy() for split in ("train", "test")]
    )


def test_days_share_users_and_items_and_new_ids_appear(daily, tmp_path, small_config):
    _, result = daily
    out = result.out_dir
    for column in ("user_id", "item_id"):
        first, second = _ids(out, DAYS[0], column), _ids(out, DAYS[1], column)
        # Most of a day's impressions come from users and items seen the day before ...
        assert np.isin(second, first).mean() > 0.8, column
        # ... and some from ids never seen before.
        assert not np.isin(second, first).all(), column
    # Newcomers are what make the unseen share: without them it is only the unsampled tail.
    still = simulate(
        _days_config(small_config, new_users=0.0, new_items=0.0), tmp_path, progress=False
    )
    for column in ("user_id", "item_id"):
        fresh = 1 - np.isin(_ids(out, DAYS[2], column), _ids(out, DAYS[0], column)).mean()
        stale = (
            1
            - np.isin(
                _ids(still.out_dir, DAYS[2], column), _ids(still.out_dir, DAYS[0], column)
            ).mean()
        )
        assert fresh > stale + 0.02, column


def _count_correlation(out, column: str) -> float:
    a, b = _ids(out, DAYS[0], column), _ids(out, DAYS[2], column)
    ua, ca = np.unique(a, return_counts=True)
    ub, cb = np.unique(b, return_counts=True)
    both = np.intersect1d(ua, ub)
    return spearmanr(ca[np.searchsorted(ua, both)], cb[np.searchsorted(ub, both)]).statistic


def test_popularity_moves_from_day_to_day(tmp_path, small_config):
    fixed = simulate(
        _days_config(small_config, popularity_drift=0.0), tmp_path / "fixed", progress=False
    )
    moving = simulate(
        _days_config(small_config, popularity_drift=1.0), tmp_path / "moving", progress=False
    )
    for column in ("user_id", "item_id"):
        # Without drift, two days differ by sampling only; a unit random walk reshuffles them.
        assert _count_correlation(fixed.out_dir, column) > 0.6, column
        assert (
            _count_correlation(moving.out_dir, column)
            < _count_correlation(fixed.out_dir, column) - 0.15
        ), column


def test_the_ground_truth_is_the_same_model_every_day(daily):
    _, result = daily
    out = result.out_dir
    record = json.loads((out / "simulation.json").read_text())
    assert set(record) >= {"click_intercept", "conversion_intercept"}  # one pair for all days
    tables = [_day(out, "train", day) for day in DAYS]
    for table in tables:
        assert {"true_ctr", "true_cvr", "cf_conversion"} <= set(table.column_names)
    # An id's attributes never change from one day to the next.
    for key, attribute in (("user_id", "gender"), ("item_id", "category"), ("item_id", "price")):
        pairs = {
            (k, v)
            for table in tables
            for k, v in zip(table[key].to_pylist(), table[attribute].to_pylist(), strict=True)
        }
        assert len(pairs) == len({k for k, _ in pairs}), (key, attribute)
    # Every day hits the calibrated rates (4 % CTR) up to sampling and drift.
    for day in DAYS:
        assert 0.025 < result.days[day]["train"].ctr < 0.06


def test_same_seed_same_bytes(tmp_path, small_config):
    cfg = _days_config(small_config, rows=3_000, days=2, row_group_rows=1_000, file_rows=2_000)
    a = simulate(cfg, tmp_path / "a", progress=False).out_dir
    b = simulate(cfg, tmp_path / "b", progress=False).out_dir
    c = simulate(
        _days_config(
            small_config, rows=3_000, days=2, row_group_rows=1_000, file_rows=2_000, seed=8
        ),
        tmp_path / "c",
        progress=False,
    ).out_dir
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files) == 2 + 2 * (2 + 1)  # schema, record; per day 2 train parts and 1 test part
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    part = "train/day=2026-12-02/part-00000.parquet"
    assert (a / part).read_bytes() != (c / part).read_bytes()
    # The two days differ from each other, too.
    assert (a / part).read_bytes() != (a / part.replace("12-02", "12-01")).read_bytes()


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"days": -1}, "days=-1"),
        ({"start": "12/01/2026"}, "start='12/01/2026'"),
        ({"start": "2026-02-30"}, "start='2026-02-30'"),
        ({"new_users": -0.1}, "new_users=-0.1"),
        ({"popularity_drift": -1.0}, "popularity_drift=-1.0"),
    ],
)
def test_invalid_day_settings_name_the_field(overrides, named):
    with pytest.raises(ValueError, match=named):
        SimulatorConfig(**overrides)
