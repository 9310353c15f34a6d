"""The simulator: calibrated rates, labels drawn from the truth, selection bias, determinism."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas.features import load_schema
from trainer.data import ImpressionReader, SimulatorConfig, simulate, simulated_schema, summarize


def _read(out_dir, splits=("train", "test")):
    files = [f for split in splits for f in sorted((out_dir / split).glob("*.parquet"))]
    return pq.read_table(files)


def _logit(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return np.log(p) - np.log1p(-p)


@pytest.fixture(scope="module")
def rates(tmp_path_factory, small_config):
    cfg = small_config(
        rows=100_000,
        num_users=20_000,
        num_items=10_000,
        row_group_rows=25_000,
        file_rows=50_000,
        calibration_rows=100_000,
    )
    result = simulate(cfg, tmp_path_factory.mktemp("rates"), progress=False)
    table = _read(result.out_dir)
    return cfg, {
        name: table[name].to_numpy()
        for name in ("true_ctr", "true_cvr", "click", "conversion", "cf_conversion")
    }


def test_intercepts_hit_the_target_rates(rates):
    cfg, t = rates
    true_ctr = t["true_ctr"].astype(np.float64)
    clicked = t["click"] == 1
    # The mean true CTR misses the target only by the sampling error of the calibration sample
    # and of the data set: 5 standard errors of a mean over each.
    both = math.sqrt(1 / len(true_ctr) + 1 / cfg.calibration_rows)
    assert abs(true_ctr.mean() - cfg.ctr) < 5 * true_ctr.std() * both
    # The expected CVR on clicks: the calibration weights about ctr * calibration_rows clicks.
    cvr_clicked = t["true_cvr"][clicked].astype(np.float64)
    clicks_both = math.sqrt(1 / clicked.sum() + 1 / (cfg.ctr * cfg.calibration_rows))
    assert abs(cvr_clicked.mean() - cfg.cvr) < 5 * cvr_clicked.std() * clicks_both
    # The observed rates add Bernoulli noise on top.
    n, clicks = len(true_ctr), clicked.sum()
    assert (
        abs(clicks / n - cfg.ctr)
        < 5 * math.sqrt(cfg.ctr * (1 - cfg.ctr) / n) + 5 * true_ctr.std() * both
    )
    observed_cvr = t["conversion"].sum() / clicks
    assert (
        abs(observed_cvr - cfg.cvr)
        < 5 * math.sqrt(cfg.cvr * (1 - cfg.cvr) / clicks) + 5 * cvr_clicked.std() * clicks_both
    )


@pytest.mark.parametrize(
    "label, probability, rows",
    [
        ("click", "true_ctr", "all"),
        ("cf_conversion", "true_cvr", "all"),
        ("conversion", "true_cvr", "clicked"),
    ],
)
def test_labels_are_bernoulli_draws_of_the_truth(rates, label, probability, rows):
    _, t = rates
    keep = t["click"] == 1 if rows == "clicked" else np.ones(len(t["click"]), dtype=bool)
    p = t[probability][keep].astype(np.float64)
    successes = t[label][keep].sum()
    # Given the probabilities, the count is a sum of independent Bernoullis.
    assert abs(successes - p.sum()) < 4.5 * math.sqrt((p * (1 - p)).sum())


def test_conversion_is_click_times_counterfactual_conversion(rates):
    _, t = rates
    np.testing.assert_array_equal(t["conversion"], t["click"] * t["cf_conversion"])
    assert set(np.unique(t["click"])) == {0, 1}
    assert ((t["true_ctr"] > 0) & (t["true_ctr"] < 1)).all()
    assert ((t["true_cvr"] > 0) & (t["true_cvr"] < 1)).all()


def test_cvr_on_clicks_overestimates_the_whole_space_cvr(rates):
    _, t = rates
    clicks = t["click"].sum()
    observed = t["conversion"].sum() / clicks
    whole_space = t["true_cvr"].astype(np.float64).mean()
    standard_error = math.sqrt(observed * (1 - observed) / clicks)
    assert observed - whole_space > 4 * standard_error  # clicks select likelier converters


def _variants(tmp_path, small_config, **knobs: tuple[float, float]) -> tuple[dict, dict]:
    """The same small simulation with one knob at two values: tables and selection gaps."""
    ((name, values),) = knobs.items()
    tables, gaps = {}, {}
    for value in values:
        cfg = small_config(rows=20_000, calibration_rows=20_000, **{name: value})
        table = _read(simulate(cfg, tmp_path / f"{name}{value}", progress=False).out_dir)
        cvr = table["true_cvr"].to_numpy().astype(np.float64)
        clicked = table["click"].to_numpy() == 1
        tables[value], gaps[value] = table, cvr[clicked].mean() - cvr.mean()
    first, second = tables.values()
    for column in ("user_id", "item_id", "position", "recent_categories", "price"):
        assert first[column].equals(second[column])
    return tables, gaps


def _logit_shifts(base, moved) -> tuple[np.ndarray, np.ndarray]:
    click = _logit(moved["true_ctr"].to_numpy()) - _logit(base["true_ctr"].to_numpy())
    conv = _logit(moved["true_cvr"].to_numpy()) - _logit(base["true_cvr"].to_numpy())
    return click, conv


def test_the_hidden_confounder_enters_both_logits_with_the_same_weight(tmp_path, small_config):
    """Same seed, confounding 0 and 2: identical impressions, logits shifted by 2 z each."""
    tables, gaps = _variants(tmp_path, small_config, confounding=(0.0, 2.0))
    shift_click, shift_conv = _logit_shifts(tables[0.0], tables[2.0])
    # shift = intercept change + 2 z: z ~ N(0, 1) gives a standard deviation of 2, and the
    # same z moves both logits, so the two shifts differ by a constant only.
    assert shift_click.std() == pytest.approx(2.0, rel=0.05)  # 5 standard errors
    assert np.ptp(shift_click - shift_conv) < 1e-3 * np.abs(shift_click).max() + 1e-3
    assert 0 < gaps[0.0] < gaps[2.0]  # the confounder widens the selection gap


def test_observed_confounding_is_a_function_of_the_logged_ids(tmp_path, small_config):
    """observed_confounding 0 and 1: both logits move by the same user intent + item appeal, and
    that shift is the same wherever the (user_id, item_id) pair is: P(click | x) can explain it."""
    tables, gaps = _variants(tmp_path, small_config, observed_confounding=(0.0, 1.0))
    shift_click, shift_conv = _logit_shifts(tables[0.0], tables[1.0])
    assert np.ptp(shift_click - shift_conv) < 1e-3 * np.abs(shift_click).max() + 1e-3
    assert shift_click.std() > 0.5  # unit variance over the population, Zipf-weighted here
    pairs = np.stack([tables[1.0][c].to_numpy() for c in ("user_id", "item_id")], axis=1)
    _, pair, counts = np.unique(pairs, axis=0, return_inverse=True, return_counts=True)
    pair_mean = np.bincount(pair, shift_click) / counts
    repeated = counts[pair] > 1
    assert repeated.sum() > 100
    assert np.abs(shift_click - pair_mean[pair])[repeated].max() < 1e-4  # float32 round-off only
    # Without it the same tastes still make clicked impressions likelier to convert; with it
    # the gap widens.
    assert 0 < gaps[0.0] < gaps[1.0]


def test_same_seed_same_bytes(tmp_path, small_config):
    cfg = small_config(
        rows=6_000,
        num_users=500,
        num_items=400,
        row_group_rows=1_000,
        file_rows=2_000,
        calibration_rows=5_000,
    )
    a = simulate(cfg, tmp_path / "a", progress=False).out_dir
    b = simulate(cfg, tmp_path / "b", progress=False).out_dir
    c = simulate(
        small_config(**{**cfg.__dict__, "seed": cfg.seed + 1}), tmp_path / "c", progress=False
    ).out_dir
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 + 3 + 1  # schema, simulation.json, train 5k rows / 2k, test 1k rows
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "train/part-00000.parquet").read_bytes() != (
        c / "train/part-00000.parquet"
    ).read_bytes()


def _is_function_of(keys: list, values: list) -> bool:
    """Each key maps to exactly one value (``None`` counts as a value)."""
    pairs = {(k, tuple(v) if isinstance(v, list) else v) for k, v in zip(keys, values, strict=True)}
    return len(pairs) == len(set(keys))


def test_attributes_are_fixed_per_id(small_sim):
    table = _read(small_sim.out_dir)
    users, items = table["user_id"].to_pylist(), table["item_id"].to_pylist()
    assert table["group"].to_pylist() == users
    user_attributes = [
        "gender",
        "age_bucket",
        "city",
        "occupation",
        "user_level",
        "shopping_depth",
        "user_activity",
        "recent_categories",
    ]
    for name in user_attributes:
        assert _is_function_of(users, table[name].to_pylist()), name
    for name in ["category", "shop_id", "brand_id", "price", "price_bucket", "seller_level"]:
        assert _is_function_of(items, table[name].to_pylist()), name
    for name in ["hour", "device"]:
        assert not _is_function_of(users, table[name].to_pylist()), name  # context varies


def test_ids_are_skewed(small_sim):
    users = _read(small_sim.out_dir)["user_id"].to_numpy()
    counts = np.sort(np.unique(users, return_counts=True)[1])[::-1]
    # Zipf-Mandelbrot 1 / (rank + 50) over 3000 users: the top 1 % (30 users) draw about
    # ln(81 / 51) / ln(3051 / 51) = 11 % of impressions, against 1 % if uniform.
    share = counts[:30].sum() / len(users)
    assert 0.08 < share < 0.15


def test_layout_schema_and_summary(small_sim):
    out = small_sim.out_dir
    # 16,000 train rows in row groups of 3,000 and files of at most 9,000; 4,000 test rows.
    layout = {
        split: [
            [
                pq.ParquetFile(f).metadata.row_group(i).num_rows
                for i in range(pq.ParquetFile(f).num_row_groups)
            ]
            for f in sorted((out / split).glob("*.parquet"))
        ]
        for split in ("train", "test")
    }
    assert layout == {
        "train": [[3_000, 3_000, 3_000], [3_000, 3_000, 1_000]],
        "test": [[3_000, 1_000]],
    }
    schema = load_schema(out / "schema.yaml")
    assert schema == simulated_schema() == small_sim.schema
    assert len(schema.sparse) == 20 and [f.name for f in schema.sparse if f.multi_valued] == [
        "recent_categories"
    ]
    assert schema.dense_names == ["price", "user_activity"] and schema.group == "group"
    for split, summary in small_sim.splits.items():
        assert summarize(out / split) == summary
        assert summary.rows == sum(map(sum, layout[split]))
    ImpressionReader.from_dataset(out, "train", batch_size=8)  # the reader accepts every file


def test_the_schema_says_which_features_a_ranking_request_gives_once():
    schema = simulated_schema()
    scope = {f.name: f.scope.value for f in (*schema.sparse, *schema.dense)}
    assert {n for n, s in scope.items() if s == "candidate"} == {
        "item_id",
        "category",
        "shop_id",
        "brand_id",
        "price_bucket",
        "seller_level",
        "position",
        "price",
    }
    assert set(scope.values()) == {"context", "candidate"}  # the user's and the request's


def test_schema_knobs():
    schema = simulated_schema(dim=8, user_buckets=1_000, item_buckets=500)
    assert {t.dim for t in schema.all_tables} == {8}
    assert schema.table_of("user_id").num_rows == 1_001
    assert schema.table_of("item_id").num_rows == 501
    assert schema.table_of("recent_categories").name == schema.table_of("category").name


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"ctr": 0.0}, "ctr=0.0"),
        ({"cvr": 1.5}, "cvr=1.5"),
        ({"file_rows": 10, "row_group_rows": 20}, "file_rows=10"),
        ({"test_fraction": 0.0}, "test_fraction=0.0"),
        ({"rows": 3, "test_fraction": 0.1}, "empty split"),
    ],
)
def test_invalid_config_names_the_field(overrides, named):
    with pytest.raises(ValueError, match=named):
        SimulatorConfig(**overrides)


def test_refuses_to_mix_with_existing_parts(tmp_path, small_config):
    cfg = small_config(
        rows=2_000,
        num_users=200,
        num_items=100,
        row_group_rows=500,
        file_rows=500,
        calibration_rows=5_000,
    )
    simulate(cfg, tmp_path, progress=False)
    stale = tmp_path / "train" / "part-00099.parquet"
    stale.write_bytes((tmp_path / "train" / "part-00000.parquet").read_bytes())
    with pytest.raises(FileExistsError, match="overwrite"):
        simulate(cfg, tmp_path, progress=False)
    simulate(cfg, tmp_path, overwrite=True, progress=False)
    assert not stale.exists()
    assert summarize(tmp_path / "train").rows == 1_600
