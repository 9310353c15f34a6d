"""An Ali-CCP-shaped impression log with known ground truth and tunable selection bias.

Run it::

    python -m trainer.data simulate --rows 1000000 --out data/sim --seed 0

It writes ``data/sim/schema.yaml``, ``data/sim/train/part-*.parquet``,
``data/sim/test/part-*.parquet`` and ``data/sim/simulation.json`` (config and intercepts).

Consecutive days, as a daily log is kept::

    python -m trainer.data simulate --days 7 --start 2026-12-01 --rows 200000 --out data/daily

write ``--rows`` impressions per day into hive partitions, ``train/day=2026-12-01/part-*.parquet``
... ``train/day=2026-12-07/``, and the same days under ``test/``; the trainer reads a window of them
with ``data.filter`` (``data.train=data/daily/train data.filter="day >= '2026-12-05'"``) and tests on
one (``data.test=data/daily/test/day=2026-12-07``).

The structural model, per impression of user ``u`` and item ``i`` in context ``c``::

    s_ui = (iota_u + alpha_i) / sqrt(2)   user intent + item appeal, observed through x
    z ~ N(0, 1)                           hidden confounder, never written
    click logit      = a0 + <p_u, q_i> + b_u + b_i + ctx(c) + 0.7 m_ui + beta s_ui + gamma z
    conversion logit = b0 + <p'_u, q'_i> + b'_u + b'_i + 0.1 scene'(c) + 0.3 m_ui
                          + beta s_ui + gamma z
    true_ctr = sigmoid(click logit)         P(click)
    true_cvr = sigmoid(conversion logit)    P(conversion | do(click = 1))
    click ~ Bernoulli(true_ctr),  cf_conversion ~ Bernoulli(true_cvr)
    conversion = click * cf_conversion

Latent vectors ``p_u`` / ``q_i`` (and their conversion twins, correlated with them) are sums of
per-attribute vectors (gender, age, city... / category, brand, price bucket...) plus id-specific
noise, so attributes generalise and ids memorise. The biases carry the user level and activity
(``b_u``), shopping depth (``b'_u``), seller level (``b_i``, ``b'_i``) and price (``b'_i``: dearer
items convert less); ``ctx`` has hour, weekday, position (lower slots get fewer clicks), scene,
network and device effects (the device is the user's main one 80 % of the time). ``m_ui`` is 1
when the item's category is among the user's recent categories.

Selection bias. Whatever raises both logits makes clicked impressions convert more often than
impressions at large, so a CVR model trained on clicks only overestimates CVR over the whole
space. Two knobs set where that dependence comes from:

- ``beta = observed_confounding`` (default 1): user purchase intent ``iota_u`` (shopping depth,
  user level, occupation, plus a per-user part) and item appeal ``alpha_i`` (seller level, brand,
  category, plus a per-item part), each of unit variance, 80 % of it from those attributes and
  20 % id-specific. Every input is a logged feature or id, so clicks and conversions are
  independent given the features (selection on observables): a propensity ``P(click | x)``
  explains the selection, and IPW / DR with it can remove the bias (if the model learns it).
- ``gamma = confounding`` (default 0): ``z``, drawn per impression and never written, is a
  hidden confounder (missing not at random). No estimator whose propensity sees only ``x`` can
  remove the bias it causes; ``benchmarks/quality.py`` reports that floor.

With the defaults (CTR 4 %, CVR on clicks 5 %) the true CVR over all impressions is about 1.9 %:
a selection gap of about +0.03, the same as ``confounding=1`` without the observed part. The
intercepts ``a0`` and ``b0`` are found by bisection on a calibration sample, so that the mean
``true_ctr`` is ``ctr`` and the click-weighted mean ``true_cvr`` (the expected CVR on clicks) is
``cvr``.

User and item ids are Zipf-Mandelbrot distributed; every attribute is a fixed function of the id,
drawn once from the seed. The same seed writes the same files, bit for bit.

Days. The structural model above is the same every day (one population, one pair of intercepts,
calibrated on the first day), so the ground truth columns mean the same thing on every day; what
drifts is who shows up. The population holds every user and item of the whole period:
``num_users`` users and ``num_items`` items are there on the first day, and each later day adds
``new_users * num_users`` users and ``new_items * num_items`` items with ids never seen before.
Popularity moves: each user's and item's Zipf-Mandelbrot weight (from a rank drawn at random over
the whole population, so a newcomer can be popular) is multiplied by ``exp(w_d)``, where ``w_d``
is a random walk with steps ``N(0, popularity_drift ** 2)``, one step a day. A day's impressions
draw users and items in proportion to their weights that day among those already there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from schemas.features import FeatureSchema
from schemas.layout import TEST_SPLIT, TRAIN_SPLIT
from schemas.storage import UriLike
from trainer.data._dataset import (
    SplitWriter,
    prepare_dataset,
    publish_dataset,
    result_dir,
)
from trainer.data.summary import LogSummary

__all__ = [
    "DAY_PARTITION",
    "SimulationResult",
    "SimulatorConfig",
    "simulate",
    "simulated_schema",
]

SIMULATION_FILE = "simulation.json"
SPLITS = (TRAIN_SPLIT, TEST_SPLIT)  # the splits the simulator writes
DAY_PARTITION = "day"  # the hive partition column of a simulation over days (day=YYYY-MM-DD)

_K = 8  # latent dimension of the structural model (not the embedding dimension)
_NUM_CITIES = 300
_NUM_CATEGORIES = 100
_NUM_SHOPS = 5_000
_NUM_BRANDS = 2_000
_RECENT_MAX = 8  # categories in a user's history; the schema keeps max_len 5 of them
_RECENT_MAX_LEN = 5
_DEVICES = ("android", "ios", "pc", "h5", "pad")
_DEVICE_P = (0.55, 0.30, 0.08, 0.05, 0.02)
_MAIN_DEVICE = 0.8  # share of a user's impressions on their main device
_ACTIVITY_SHAPE, _ACTIVITY_SCALE = 2.0, 5.0  # user_activity ~ Gamma(2, 5): mean 10, var 50
_MISSING_ACTIVITY = 0.03  # users whose activity is not logged (null)
_MISSING_BRAND = 0.05  # items without a brand (null)
# Random streams: one per purpose, so that changing one never shifts another.
_STREAM_POPULATION, _STREAM_CALIBRATION, _STREAM_TRAIN, _STREAM_TEST = 0, 1, 2, 3
_STREAM_INTENT = 4  # user intent and item appeal (their own stream: the rest is unchanged)
_STREAM_DAYS = 5  # with days: popularity ranks, then one popularity step per day
# Latent vector entries get variance 1 / sqrt(K), so a user-item dot product has unit variance;
# the id-specific noise carries 40 % of it, the attributes (which generalise) the rest.
_ENTRY_VARIANCE = 1.0 / math.sqrt(_K)
_ID_SHARE = 0.4
# Share of the variance of user intent and item appeal that is id-specific; the rest comes from
# logged attributes (see _build_intent). Most users and items have too few impressions for a
# per-id effect to be learned, so a larger share would act partly as hidden confounding.
_INTENT_ID_SHARE = 0.2


@dataclass(frozen=True)
class SimulatorConfig:
    """Everything that determines a simulated data set (the files depend on nothing else).

    Raises:
        ValueError: (on construction) a field out of range, naming it.
    """

    rows: int = 1_000_000  # impressions, train and test together
    seed: int = 0
    test_fraction: float = 0.2  # share of impressions written to test/
    ctr: float = 0.04  # target mean click probability
    cvr: float = 0.05  # target conversion rate on clicked impressions
    # Weight of user intent + item appeal in both logits: selection on observables (ids and
    # attributes that the model sees), the bias IPW / DR with P(click | x) can remove.
    observed_confounding: float = 1.0
    confounding: float = 0.0  # weight of the hidden confounder z in both logits (0: none)
    dim: int = 16  # embedding dimension written into the schema
    num_users: int = 80_000  # distinct users in the population
    num_items: int = 40_000  # distinct items
    user_buckets: int = 100_000  # hash buckets of user_id
    item_buckets: int = 50_000  # hash buckets of item_id
    user_zipf: float = 1.0  # Zipf-Mandelbrot exponent of user activity
    item_zipf: float = 1.1  # ... of item popularity
    row_group_rows: int = 100_000  # rows per Parquet row group (one generated chunk each)
    file_rows: int = 500_000  # rows per part file at most
    calibration_rows: int = 500_000  # impressions drawn to calibrate the intercepts
    # Consecutive days (see the module docstring): 0 writes one data set without partitions;
    # N >= 1 writes N days of `rows` impressions each into day=YYYY-MM-DD partitions.
    days: int = 0
    start: str = "2026-12-01"  # the first day, ISO format
    new_users: float = 0.03  # users new each day after the first, as a share of num_users
    new_items: float = 0.05  # items new each day after the first, as a share of num_items
    popularity_drift: float = 0.3  # std of the daily step of every log-popularity

    def __post_init__(self) -> None:
        checks = {
            "rows": self.rows >= 2,
            "test_fraction": 0.0 < self.test_fraction < 1.0,
            "ctr": 0.0 < self.ctr < 1.0,
            "cvr": 0.0 < self.cvr < 1.0,
            "confounding": self.confounding >= 0.0,
            "observed_confounding": self.observed_confounding >= 0.0,
            "dim": self.dim >= 1,
            "num_users": self.num_users >= 1,
            "num_items": self.num_items >= 1,
            "user_buckets": self.user_buckets >= 1,
            "item_buckets": self.item_buckets >= 1,
            "user_zipf": self.user_zipf >= 0.0,
            "item_zipf": self.item_zipf >= 0.0,
            "row_group_rows": self.row_group_rows >= 1,
            "file_rows": self.file_rows >= self.row_group_rows,
            "calibration_rows": self.calibration_rows >= 1_000,
            "days": self.days >= 0,
            "start": _is_iso_date(self.start),
            "new_users": self.new_users >= 0.0,
            "new_items": self.new_items >= 0.0,
            "popularity_drift": self.popularity_drift >= 0.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(
                f"invalid simulator config: {values} (need rows >= 2, 0 < test_fraction, ctr, "
                "cvr < 1, file_rows >= row_group_rows, calibration_rows >= 1000, sizes >= 1, "
                "days, new_users, new_items, popularity_drift >= 0, start a date YYYY-MM-DD)"
            )
        if not 1 <= self.split_rows["test"] < self.rows:
            raise ValueError(
                f"test_fraction={self.test_fraction} of rows={self.rows} leaves an empty split"
            )

    @property
    def split_rows(self) -> dict[str, int]:
        """Impressions per split (per day, with ``days``)."""
        test = round(self.rows * self.test_fraction)
        return {"train": self.rows - test, "test": test}

    @property
    def day_names(self) -> list[str]:
        """The days written, ``YYYY-MM-DD`` (none without ``days``)."""
        first = date.fromisoformat(self.start)
        return [(first + timedelta(days=d)).isoformat() for d in range(self.days)]

    @property
    def population(self) -> tuple[int, int]:
        """Users and items of the whole period: the first day's and every later day's new ones."""
        later = max(self.days - 1, 0)
        return (
            self.num_users + later * round(self.new_users * self.num_users),
            self.num_items + later * round(self.new_items * self.num_items),
        )


def _is_iso_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except (TypeError, ValueError):
        return False
    return len(text) == 10  # YYYY-MM-DD exactly: partition names must sort as dates


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate` wrote.

    Attributes:
        out_dir: the data set directory (a ``Path``, or the URI it was written to).
        schema: its feature schema (also in ``out_dir/schema.yaml``).
        splits: label summary per split (over every day).
        click_intercept: calibrated ``a0``.
        conversion_intercept: calibrated ``b0``.
        seconds: wall time.
        days: with ``days``: day (``YYYY-MM-DD``) -> split -> label summary; else empty.
    """

    out_dir: Path | str
    schema: FeatureSchema
    splits: dict[str, LogSummary]
    click_intercept: float
    conversion_intercept: float
    seconds: float
    days: dict[str, dict[str, LogSummary]] = field(default_factory=dict)

    @property
    def overall(self) -> LogSummary:
        return self.splits["train"].merge(self.splits["test"])


def simulated_schema(
    dim: int = 16, user_buckets: int = 100_000, item_buckets: int = 50_000
) -> FeatureSchema:
    """The feature schema of the simulated data set: 20 sparse fields, 2 dense, labels, group.

    Example::

        schema = simulated_schema(dim=8)
        schema.sparse_names[:3]  # ['user_id', 'gender', 'age_bucket']
    """

    def own(name: str, size: int, scope: str, *, hashed: bool = False, dtype: str = "int") -> dict:
        key = "hash_buckets" if hashed else "vocab_size"
        return {"name": name, "dtype": dtype, key: size, "dim": dim, "scope": scope}

    # A ranking request gives the user and the request once (context) and each item apart
    # (candidate); the position is the slot an item would take, so it is a candidate's.
    user = request = "context"
    item = "candidate"
    sparse = [
        own("user_id", user_buckets, user, hashed=True),
        own("gender", 3, user),
        own("age_bucket", 8, user),
        own("city", 1_000, user, hashed=True, dtype="string"),
        own("occupation", 20, user),
        own("user_level", 6, user),
        own("shopping_depth", 4, user),
        {
            "name": "recent_categories",
            "table": "categories",
            "multi_valued": True,
            "max_len": _RECENT_MAX_LEN,
            "scope": user,
        },
        own("item_id", item_buckets, item, hashed=True),
        {"name": "category", "table": "categories", "scope": item},
        own("shop_id", 20_000, item, hashed=True),
        own("brand_id", 10_000, item, hashed=True),
        own("price_bucket", 10, item),
        own("seller_level", 5, item),
        own("hour", 24, request),
        own("weekday", 7, request),
        own("position", 20, item),
        own("scene", 4, request),
        own("network", 4, request),
        own("device", 16, request, hashed=True, dtype="string"),
    ]
    activity_std = math.sqrt(_ACTIVITY_SHAPE) * _ACTIVITY_SCALE
    return FeatureSchema.from_dict(
        {
            "name": "aliccp_sim",
            "tables": [{"name": "categories", "vocab_size": _NUM_CATEGORIES, "dim": dim}],
            "sparse": sparse,
            "dense": [
                {
                    "name": "price",
                    "default": 0.0,
                    "normalization": {"kind": "log1p"},
                    "scope": item,
                },
                {
                    "name": "user_activity",
                    "scope": user,
                    "default": _ACTIVITY_SHAPE * _ACTIVITY_SCALE,
                    "normalization": {
                        "kind": "standard",
                        "mean": _ACTIVITY_SHAPE * _ACTIVITY_SCALE,
                        "std": activity_std,
                    },
                },
            ],
            "labels": {"click": "click", "conversion": "conversion"},
            "group": "group",
        },
        source="simulated_schema()",
    )


# The fixed population ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Users:
    ids: np.ndarray  # (U,) int64 raw ids
    cdf: np.ndarray  # (U,) sampling CDF
    gender: np.ndarray
    age: np.ndarray
    city: np.ndarray  # index into city names
    occupation: np.ndarray
    level: np.ndarray
    depth: np.ndarray
    device: np.ndarray  # main device, index into _DEVICES
    activity: np.ndarray  # float64, NaN where not logged
    recent: np.ndarray  # (U, _RECENT_MAX) category ids; the first recent_len are the history
    recent_len: np.ndarray
    click_vec: np.ndarray  # (U, K)
    conv_vec: np.ndarray  # (U, K)
    click_bias: np.ndarray  # includes the activity effect
    conv_bias: np.ndarray


@dataclass(frozen=True)
class _Items:
    ids: np.ndarray
    cdf: np.ndarray
    category: np.ndarray
    shop: np.ndarray  # raw shop ids
    seller_level: np.ndarray
    brand: np.ndarray  # raw brand ids, -1 where the item has none
    brand_index: np.ndarray  # 0 .. _NUM_BRANDS - 1, or _NUM_BRANDS where the item has none
    price: np.ndarray  # float32
    price_bucket: np.ndarray
    click_vec: np.ndarray
    conv_vec: np.ndarray
    click_bias: np.ndarray
    conv_bias: np.ndarray


@dataclass(frozen=True)
class _Context:
    hour_cdf: np.ndarray
    device_cdf: np.ndarray
    position_cdf: np.ndarray
    scene_cdf: np.ndarray
    network_cdf: np.ndarray
    hour: np.ndarray  # click-logit effect per value
    weekday: np.ndarray
    position: np.ndarray
    scene: np.ndarray
    network: np.ndarray
    device: np.ndarray
    scene_conv: np.ndarray  # conversion-logit effect of the scene


@dataclass(frozen=True)
class _Population:
    users: _Users
    items: _Items
    context: _Context
    user_intent: np.ndarray  # (U,) unit variance, enters both logits (observed confounding)
    item_appeal: np.ndarray  # (I,) unit variance, likewise
    city_names: pa.Array = field(repr=False)
    device_names: pa.Array = field(repr=False)


def _zipf_cdf(n: int, exponent: float, offset: float) -> np.ndarray:
    """CDF of Zipf-Mandelbrot weights ``1 / (rank + offset) ** exponent``."""
    weights = 1.0 / (np.arange(1, n + 1) + offset) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _cdf(probabilities: list[float] | np.ndarray) -> np.ndarray:
    cdf = np.cumsum(np.asarray(probabilities, dtype=np.float64))
    return cdf / cdf[-1]


def _sample(cdf: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    index = np.searchsorted(cdf, rng.random(n), side="right")
    return np.minimum(index, len(cdf) - 1)


def _twin_vectors(
    rng: np.random.Generator, rows: int, scale: float, rho: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Click and conversion vectors with correlation ``rho`` entry-wise (shared tastes)."""
    click = rng.normal(0.0, scale, (rows, _K))
    conv = rho * click + math.sqrt(1.0 - rho**2) * rng.normal(0.0, scale, (rows, _K))
    return click, conv


def _latent(
    rng: np.random.Generator, attributes: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-entity click / conversion vectors: their attributes' vectors summed, plus id noise.

    Args:
        rng: the population stream.
        attributes: ``(values, click_table, conv_table)`` per attribute, tables from
            :func:`_attribute_tables` with the same number of attributes.
    """
    n = len(attributes[0][0])
    click, conv = _twin_vectors(rng, n, math.sqrt(_ID_SHARE * _ENTRY_VARIANCE))
    for values, click_table, conv_table in attributes:
        click += click_table[values]
        conv += conv_table[values]
    return click, conv


def _attribute_tables(
    rng: np.random.Generator, cardinality: int, num_attributes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Click / conversion vectors of each value of one of ``num_attributes`` attributes."""
    scale = math.sqrt((1.0 - _ID_SHARE) * _ENTRY_VARIANCE / num_attributes)
    return _twin_vectors(rng, cardinality, scale)


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def _distinct_ids(rng: np.random.Generator, n: int, high: int) -> np.ndarray:
    return rng.choice(high, size=n, replace=False).astype(np.int64)


def _build_users(
    cfg: SimulatorConfig,
    rng: np.random.Generator,
    category_vec: np.ndarray,
    category_cdf: np.ndarray,
) -> _Users:
    u = cfg.num_users
    ids = _distinct_ids(rng, u, 10**12)
    gender = _sample(_cdf([0.06, 0.47, 0.47]), rng, u)
    age = _sample(_cdf([0.04, 0.16, 0.24, 0.22, 0.15, 0.10, 0.06, 0.03]), rng, u)
    city = _sample(_zipf_cdf(_NUM_CITIES, 1.0, 5.0), rng, u)
    occupation = _sample(_zipf_cdf(20, 0.8, 2.0), rng, u)
    level = _sample(_cdf([0.25, 0.25, 0.2, 0.15, 0.1, 0.05]), rng, u)
    depth = _sample(_cdf([0.4, 0.3, 0.2, 0.1]), rng, u)
    device = _sample(_cdf(_DEVICE_P), rng, u)
    activity = rng.gamma(_ACTIVITY_SHAPE, _ACTIVITY_SCALE, u)
    logged = rng.random(u) >= _MISSING_ACTIVITY
    attributes = [(gender, 3), (age, 8), (city, _NUM_CITIES), (occupation, 20), (level, 6)]
    click_vec, conv_vec = _latent(
        rng,
        [(v, *_attribute_tables(rng, c, len(attributes))) for v, c in attributes],
    )
    # History: categories drawn without replacement in proportion to popularity x taste for
    # the category's share of item vectors (Gumbel top-k), so the history tells what the user
    # would click. einsum rather than BLAS: the result must not depend on BLAS threads.
    taste = 1.5 * _standardise(np.einsum("uk,ck->uc", click_vec, category_vec))
    taste += np.log(np.diff(category_cdf, prepend=0.0))
    order = np.argsort(-(taste + rng.gumbel(size=taste.shape)), axis=1)
    recent = order[:, :_RECENT_MAX].astype(np.int64)
    recent_len = rng.integers(0, _RECENT_MAX + 1, u)
    activity_effect = 0.25 * _standardise(np.log1p(activity))
    click_bias = 0.15 * (level - 2.0) + activity_effect + rng.normal(0.0, 0.3, u)
    conv_bias = 0.3 * (depth - 1.0) + rng.normal(0.0, 0.3, u)
    return _Users(
        ids=ids,
        cdf=_zipf_cdf(u, cfg.user_zipf, 50.0),
        gender=gender,
        age=age,
        city=city,
        occupation=occupation,
        level=level,
        depth=depth,
        device=device,
        activity=np.where(logged, activity, np.nan),
        recent=recent,
        recent_len=recent_len,
        click_vec=click_vec,
        conv_vec=conv_vec,
        click_bias=click_bias,
        conv_bias=conv_bias,
    )


def _build_items(
    cfg: SimulatorConfig, rng: np.random.Generator, category_cdf: np.ndarray
) -> tuple[_Items, np.ndarray]:
    """The items, and the click vectors of their categories (users' tastes refer to them)."""
    n = cfg.num_items
    ids = _distinct_ids(rng, n, 10**12)
    category = _sample(category_cdf, rng, n)
    shop_ids = _distinct_ids(rng, _NUM_SHOPS, 10**9)
    shop_level = _sample(_cdf([0.1, 0.3, 0.3, 0.2, 0.1]), rng, _NUM_SHOPS)
    shop = rng.integers(0, _NUM_SHOPS, n)
    brand_ids = _distinct_ids(rng, _NUM_BRANDS, 10**6)
    brand = rng.integers(0, _NUM_BRANDS, n)
    branded = rng.random(n) >= _MISSING_BRAND
    log_price = rng.normal(4.0, 0.8, _NUM_CATEGORIES)[category] + rng.normal(0.0, 0.5, n)
    price = np.round(np.exp(log_price), 2).astype(np.float32)
    edges = np.quantile(log_price, np.linspace(0.1, 0.9, 9))
    price_bucket = np.searchsorted(edges, log_price, side="right")
    seller_level = shop_level[shop]
    brand_index = np.where(branded, brand, _NUM_BRANDS)  # the unbranded share one vector
    category_tables = _attribute_tables(rng, _NUM_CATEGORIES, 4)
    click_vec, conv_vec = _latent(
        rng,
        [
            (category, *category_tables),
            (brand_index, *_attribute_tables(rng, _NUM_BRANDS + 1, 4)),
            (price_bucket, *_attribute_tables(rng, 10, 4)),
            (seller_level, *_attribute_tables(rng, 5, 4)),
        ],
    )
    click_bias = 0.1 * (seller_level - 2.0) + rng.normal(0.0, 0.3, n)
    conv_bias = (
        -0.4 * _standardise(log_price) + 0.15 * (seller_level - 2.0) + rng.normal(0.0, 0.3, n)
    )
    items = _Items(
        ids=ids,
        cdf=_zipf_cdf(n, cfg.item_zipf, 20.0),
        category=category,
        shop=shop_ids[shop],
        seller_level=seller_level,
        brand=np.where(branded, brand_ids[brand], -1),
        brand_index=brand_index,
        price=price,
        price_bucket=price_bucket,
        click_vec=click_vec,
        conv_vec=conv_vec,
        click_bias=click_bias,
        conv_bias=conv_bias,
    )
    return items, category_tables[0]


def _build_context(rng: np.random.Generator) -> _Context:
    hours = np.arange(24)
    diurnal = 1.0 + 0.8 * np.sin((hours - 9) / 24 * 2 * math.pi)
    return _Context(
        hour_cdf=_cdf(np.clip(diurnal, 0.15, None)),
        device_cdf=_cdf(_DEVICE_P),
        position_cdf=_cdf(0.85 ** np.arange(20)),
        scene_cdf=_cdf([0.5, 0.3, 0.15, 0.05]),
        network_cdf=_cdf([0.6, 0.3, 0.08, 0.02]),
        hour=rng.normal(0.0, 0.15, 24),
        weekday=rng.normal(0.0, 0.1, 7),
        position=-0.08 * np.arange(20),  # position bias: lower slots get fewer clicks
        scene=rng.normal(0.0, 0.3, 4),
        network=rng.normal(0.0, 0.1, 4),
        device=rng.normal(0.0, 0.15, len(_DEVICES)),
        scene_conv=rng.normal(0.0, 0.3, 4),
    )


def _mix_with_id_noise(attribute_signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance latent: the standardised attribute signal plus id-specific noise, the noise
    carrying ``_INTENT_ID_SHARE`` of the variance."""
    noise = rng.standard_normal(len(attribute_signal))
    return (
        math.sqrt(1.0 - _INTENT_ID_SHARE) * _standardise(attribute_signal)
        + math.sqrt(_INTENT_ID_SHARE) * noise
    )


def _build_intent(
    users: _Users, items: _Items, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """User purchase intent and item appeal: each raises clicks and conversions alike.

    Intent comes from shopping depth, user level and occupation; appeal from seller level,
    brand and category; each also has an id-specific part. All of it is observable through the
    logged ids and attributes, so ``P(click | x)`` can explain the selection it causes.
    """
    occupation = rng.normal(0.0, 0.5, 20)
    intent = _mix_with_id_noise(
        (users.depth - 1.0) + 0.5 * (users.level - 2.0) + occupation[users.occupation], rng
    )
    brand = rng.normal(0.0, 0.7, _NUM_BRANDS + 1)  # the last entry: items without a brand
    category = rng.normal(0.0, 0.5, _NUM_CATEGORIES)
    appeal = _mix_with_id_noise(
        0.5 * (items.seller_level - 2.0) + brand[items.brand_index] + category[items.category],
        rng,
    )
    return intent, appeal


def _build_population(cfg: SimulatorConfig) -> _Population:
    rng = np.random.default_rng([cfg.seed, _STREAM_POPULATION])
    category_cdf = _zipf_cdf(_NUM_CATEGORIES, 1.0, 3.0)
    items, category_vec = _build_items(cfg, rng, category_cdf)
    users = _build_users(cfg, rng, category_vec, category_cdf)
    intent, appeal = _build_intent(users, items, np.random.default_rng([cfg.seed, _STREAM_INTENT]))
    return _Population(
        users=users,
        items=items,
        context=_build_context(rng),
        user_intent=intent,
        item_appeal=appeal,
        city_names=pa.array([f"city_{i:03d}" for i in range(_NUM_CITIES)], pa.string()),
        device_names=pa.array(list(_DEVICES), pa.string()),
    )


# Days: who is there, and how popular ---------------------------------------------------------------


def _days_population(cfg: SimulatorConfig) -> _Population:
    """The population of the whole period (``cfg.population``): the first day's users and items
    first, then each later day's newcomers, in order of the day they appear."""
    users, items = cfg.population
    return _build_population(replace(cfg, num_users=users, num_items=items))


def _first_days(total: int, first: int, per_day: int) -> np.ndarray:
    """The day (0 = the first) each of ``total`` users or items appears: ``first`` on day 0,
    then ``per_day`` a day."""
    index = np.arange(total)
    return np.where(index < first, 0, 1 + (index - first) // max(per_day, 1))


def _zipf_log_weights(rank: np.ndarray, exponent: float, offset: float) -> np.ndarray:
    """Log Zipf-Mandelbrot weights ``-exponent * log(rank + 1 + offset)`` (rank 0 = most popular)."""
    return -exponent * np.log(rank + 1.0 + offset)


def _on_days(pop: _Population, cfg: SimulatorConfig) -> Iterator[tuple[str, _Population]]:
    """Each day's name and its population: the same people, their sampling weights that day.

    Weights start from a random Zipf-Mandelbrot rank over the whole period's population (the
    offsets of :func:`_build_users` / :func:`_build_items`), take one random-walk step a day,
    and are zero before a user's or item's first day.
    """
    n_users, n_items = cfg.population
    user_first = _first_days(n_users, cfg.num_users, round(cfg.new_users * cfg.num_users))
    item_first = _first_days(n_items, cfg.num_items, round(cfg.new_items * cfg.num_items))
    rng = np.random.default_rng([cfg.seed, _STREAM_DAYS])
    user_log = _zipf_log_weights(rng.permutation(n_users), cfg.user_zipf, 50.0)
    item_log = _zipf_log_weights(rng.permutation(n_items), cfg.item_zipf, 20.0)
    for day, name in enumerate(cfg.day_names):
        if day > 0:
            step = np.random.default_rng([cfg.seed, _STREAM_DAYS, day])
            user_log = user_log + cfg.popularity_drift * step.standard_normal(n_users)
            item_log = item_log + cfg.popularity_drift * step.standard_normal(n_items)
        users = replace(pop.users, cdf=_present_cdf(user_log, user_first <= day))
        items = replace(pop.items, cdf=_present_cdf(item_log, item_first <= day))
        yield name, replace(pop, users=users, items=items)


def _present_cdf(log_weights: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The sampling CDF of weights ``exp(log_weights)`` over the ``present`` entries only."""
    weights = np.where(present, np.exp(log_weights - log_weights[present].max()), 0.0)
    return _cdf(weights)


# Impressions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Draw:
    """Impressions before the intercepts: who, what, where, and the two logits less a0 / b0."""

    user: np.ndarray
    item: np.ndarray
    hour: np.ndarray
    weekday: np.ndarray
    position: np.ndarray
    scene: np.ndarray
    network: np.ndarray
    device: np.ndarray
    click_score: np.ndarray
    conv_score: np.ndarray


def _draw(
    pop: _Population,
    n: int,
    rng: np.random.Generator,
    confounding: float,
    observed_confounding: float,
) -> _Draw:
    users, items, ctx = pop.users, pop.items, pop.context
    user = _sample(users.cdf, rng, n)
    item = _sample(items.cdf, rng, n)
    hour = _sample(ctx.hour_cdf, rng, n)
    weekday = rng.integers(0, 7, n)
    position = _sample(ctx.position_cdf, rng, n)
    scene = _sample(ctx.scene_cdf, rng, n)
    network = _sample(ctx.network_cdf, rng, n)
    other_device = _sample(ctx.device_cdf, rng, n)
    device = np.where(rng.random(n) < _MAIN_DEVICE, users.device[user], other_device)
    z = rng.standard_normal(n)
    history = users.recent[user]
    in_history = np.arange(_RECENT_MAX) < users.recent_len[user][:, None]
    match = ((history == items.category[item][:, None]) & in_history).any(axis=1)
    shared = observed_confounding * (pop.user_intent[user] + pop.item_appeal[item]) / math.sqrt(2)
    shared += confounding * z
    click_score = (
        np.einsum("nk,nk->n", users.click_vec[user], items.click_vec[item])
        + users.click_bias[user]
        + items.click_bias[item]
        + ctx.hour[hour]
        + ctx.weekday[weekday]
        + ctx.position[position]
        + ctx.scene[scene]
        + ctx.network[network]
        + ctx.device[device]
        + 0.7 * match
        + shared
    )
    conv_score = (
        np.einsum("nk,nk->n", users.conv_vec[user], items.conv_vec[item])
        + users.conv_bias[user]
        + items.conv_bias[item]
        + 0.1 * ctx.scene_conv[scene]
        + 0.3 * match
        + shared
    )
    return _Draw(
        user, item, hour, weekday, position, scene, network, device, click_score, conv_score
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _bisect(
    target: float, mean_at: Callable[[float], float], lo: float = -30.0, hi: float = 30.0
) -> float:
    """The intercept at which the increasing function ``mean_at`` equals ``target``."""
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_at(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


def _calibrate(pop: _Population, cfg: SimulatorConfig) -> tuple[float, float]:
    """``(a0, b0)``: mean true CTR = ``ctr``; click-weighted mean true CVR = ``cvr``."""
    rng = np.random.default_rng([cfg.seed, _STREAM_CALIBRATION])
    draw = _draw(pop, cfg.calibration_rows, rng, cfg.confounding, cfg.observed_confounding)
    a0 = _bisect(cfg.ctr, lambda a: float(_sigmoid(a + draw.click_score).mean()))
    p_click = _sigmoid(a0 + draw.click_score)
    weight = p_click / p_click.sum()
    b0 = _bisect(cfg.cvr, lambda b: float((weight * _sigmoid(b + draw.conv_score)).sum()))
    return a0, b0


def _arrow_schema() -> pa.Schema:
    """Column types of the written log: int64 ids, strings, a list, float32 dense and truth."""
    i64 = pa.int64()
    sparse_int = [
        "user_id",
        "gender",
        "age_bucket",
        "occupation",
        "user_level",
        "shopping_depth",
        "item_id",
        "category",
        "shop_id",
        "brand_id",
        "price_bucket",
        "seller_level",
        "hour",
        "weekday",
        "position",
        "scene",
        "network",
    ]
    fields = [pa.field(name, i64) for name in sparse_int]
    fields += [
        pa.field("city", pa.string()),
        pa.field("device", pa.string()),
        pa.field("recent_categories", pa.list_(i64)),
        pa.field("price", pa.float32()),
        pa.field("user_activity", pa.float32()),
        pa.field("click", pa.int8()),
        pa.field("conversion", pa.int8()),
        pa.field("group", i64),
        pa.field("true_ctr", pa.float32()),
        pa.field("true_cvr", pa.float32()),
        pa.field("cf_conversion", pa.int8()),
    ]
    return pa.schema(fields)


def _chunk(
    pop: _Population,
    cfg: SimulatorConfig,
    intercepts: tuple[float, float],
    n: int,
    rng: np.random.Generator,
) -> pa.Table:
    """``n`` impressions with labels and truth: one row group, columns as :func:`_arrow_schema`."""
    d = _draw(pop, n, rng, cfg.confounding, cfg.observed_confounding)
    true_ctr = _sigmoid(intercepts[0] + d.click_score)
    true_cvr = _sigmoid(intercepts[1] + d.conv_score)
    click = rng.random(n) < true_ctr
    cf_conversion = rng.random(n) < true_cvr
    users, items = pop.users, pop.items
    lengths = users.recent_len[d.user]
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    history = users.recent[d.user][np.arange(_RECENT_MAX) < lengths[:, None]]
    brand = items.brand[d.item]
    activity = users.activity[d.user]
    columns = {
        "user_id": users.ids[d.user],
        "gender": users.gender[d.user],
        "age_bucket": users.age[d.user],
        "occupation": users.occupation[d.user],
        "user_level": users.level[d.user],
        "shopping_depth": users.depth[d.user],
        "item_id": items.ids[d.item],
        "category": items.category[d.item],
        "shop_id": items.shop[d.item],
        "brand_id": pa.array(brand, pa.int64(), mask=brand < 0),
        "price_bucket": items.price_bucket[d.item],
        "seller_level": items.seller_level[d.item],
        "hour": d.hour,
        "weekday": d.weekday,
        "position": d.position,
        "scene": d.scene,
        "network": d.network,
        "city": pc.take(pop.city_names, pa.array(users.city[d.user])),
        "device": pc.take(pop.device_names, pa.array(d.device)),
        "recent_categories": pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(history, pa.int64())
        ),
        "price": items.price[d.item],
        "user_activity": pa.array(
            activity.astype(np.float32), pa.float32(), mask=np.isnan(activity)
        ),
        "click": click.astype(np.int8),
        "conversion": (click & cf_conversion).astype(np.int8),
        "group": users.ids[d.user],
        "true_ctr": true_ctr.astype(np.float32),
        "true_cvr": true_cvr.astype(np.float32),
        "cf_conversion": cf_conversion.astype(np.int8),
    }
    schema = _arrow_schema()
    arrays = [
        columns[f.name]
        if isinstance(columns[f.name], pa.Array)
        else pa.array(columns[f.name], f.type)
        for f in schema
    ]
    return pa.table(arrays, schema=schema)


def _write_split(
    writer: SplitWriter,
    streams: tuple[int, ...],
    total: int,
    pop: _Population,
    cfg: SimulatorConfig,
    intercepts: tuple[float, float],
    bar: tqdm,
) -> LogSummary:
    """Draw ``total`` impressions of one split (or one day of it) in chunks of one row group each.

    ``streams`` (seed, split stream, and the day with ``days``) separate the random numbers of
    splits and days; each chunk adds its index.
    """
    with writer:
        for chunk_index, start in enumerate(range(0, total, cfg.row_group_rows)):
            n = min(cfg.row_group_rows, total - start)
            rng = np.random.default_rng([*streams, chunk_index])
            writer.write(_chunk(pop, cfg, intercepts, n, rng))
            bar.update(n)
    return writer.summary


def simulate(
    cfg: SimulatorConfig, out_dir: UriLike, *, overwrite: bool = False, progress: bool = True
) -> SimulationResult:
    """Write a simulated data set: ``schema.yaml``, ``train/``, ``test/``, ``simulation.json``.

    With ``cfg.days`` each split holds one hive partition per day,
    ``train/day=YYYY-MM-DD/part-*.parquet``, of ``cfg.rows`` impressions a day (split by
    ``test_fraction``).

    Args:
        cfg: the simulation; with it the files are fully determined.
        out_dir: the data set directory (created if needed), a local path or a storage URI
            (``s3://bucket/sim``). The schema and ``simulation.json`` are published after every
            part file (see :mod:`trainer.data._dataset`).
        overwrite: replace part files already in ``out_dir/train`` and ``out_dir/test``.
        progress: show a tqdm progress bar.

    Returns:
        The schema, the intercepts and a label summary per split.

    Raises:
        FileExistsError: ``out_dir`` already holds part files and ``overwrite`` is False.
        StorageError: the store cannot be reached or refuses a write.

    Example::

        result = simulate(SimulatorConfig(rows=20_000, seed=1), "/tmp/sim", progress=False)
        result.splits["train"].ctr  # about 0.04
    """
    started = time.perf_counter()
    out = prepare_dataset(out_dir, SPLITS, overwrite=overwrite)
    schema = simulated_schema(cfg.dim, cfg.user_buckets, cfg.item_buckets)
    streams = dict(zip(SPLITS, (_STREAM_TRAIN, _STREAM_TEST), strict=True))
    days: dict[str, dict[str, LogSummary]] = {}
    with tqdm(
        total=cfg.rows * max(cfg.days, 1),
        unit="rows",
        unit_scale=True,
        desc="simulate",
        disable=not progress,
    ) as bar:
        if cfg.days == 0:
            pop = _build_population(cfg)
            intercepts = _calibrate(pop, cfg)
            splits = {
                split: _write_split(
                    SplitWriter(out.join(split), _arrow_schema(), file_rows=cfg.file_rows),
                    (cfg.seed, stream),
                    cfg.split_rows[split],
                    pop,
                    cfg,
                    intercepts,
                    bar,
                )
                for split, stream in streams.items()
            }
        else:
            pop = _days_population(cfg)
            intercepts: tuple[float, float] | None = None
            for day, (name, today) in enumerate(_on_days(pop, cfg)):
                # The first day calibrates the intercepts; the structural model never changes.
                intercepts = intercepts or _calibrate(today, cfg)
                days[name] = {
                    split: _write_split(
                        SplitWriter(
                            out.join(split, f"{DAY_PARTITION}={name}"),
                            _arrow_schema(),
                            file_rows=cfg.file_rows,
                        ),
                        (cfg.seed, stream, day),
                        cfg.split_rows[split],
                        today,
                        cfg,
                        intercepts,
                        bar,
                    )
                    for split, stream in streams.items()
                }
            splits = {split: _merged(s[split] for s in days.values()) for split in SPLITS}
    record = {
        "config": asdict(cfg),
        "click_intercept": intercepts[0],
        "conversion_intercept": intercepts[1],
        "splits": {name: s.as_dict() for name, s in splits.items()},
    }
    if days:
        record["days"] = {
            name: {split: s.as_dict() for split, s in day.items()} for name, day in days.items()
        }
    publish_dataset(out, schema, SIMULATION_FILE, record)
    return SimulationResult(
        out_dir=result_dir(out),
        schema=schema,
        splits=splits,
        click_intercept=intercepts[0],
        conversion_intercept=intercepts[1],
        seconds=time.perf_counter() - started,
        days=days,
    )


def _merged(summaries: Iterable[LogSummary]) -> LogSummary:
    total = LogSummary()
    for summary in summaries:
        total = total.merge(summary)
    return total
