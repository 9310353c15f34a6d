"""Typed training configuration: YAML files under version control plus command-line overrides.

A config file is merged onto the dataclass defaults below with OmegaConf, so an unknown key or a
value of the wrong type fails at load time with the offending key named; ``key=value`` overrides
(OmegaConf dot-list syntax, e.g. ``train.steps=200 objective.name=esmm``) are applied last.
``${...}`` interpolation works as in OmegaConf.

``objective.params`` is checked against the typed hyper-parameters of ``objective.name``
(``trainer.objectives.objective_params``), every problem reported at once and named by key,
and replaced by the resolved values, defaults filled in, so a run's saved ``config.yaml`` says
exactly what it used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, unique
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from schemas import storage
from trainer.data._partitions import FilterError, PartitionFilter
from trainer.model.adap_sl import IMPUTATION
from trainer.objectives import OBJECTIVES, ParamsError, objective_params, params_to_dict

__all__ = [
    "AdapSlConfig",
    "ConfigError",
    "CpuBinding",
    "DataConfig",
    "DenseOptimizerConfig",
    "FeatureInteraction",
    "ModelConfig",
    "ObjectiveConfig",
    "Precision",
    "PruningConfig",
    "ShardingConfig",
    "ShardingType",
    "SparseOptimizer",
    "SparseOptimizerConfig",
    "TowerSharing",
    "TrainConfig",
    "TrainLoopConfig",
    "config_warnings",
    "load_config",
    "model_config_from_dict",
    "save_config",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@unique
class ShardingType(str, Enum):
    TABLE_WISE = "table_wise"  # whole tables placed on ranks (gloo and nccl)
    COLUMN_WISE = "column_wise"  # tables split along the embedding dimension (gloo and nccl)
    ROW_WISE = "row_wise"  # tables split along rows (nccl on GPU only)
    DATA_PARALLEL = "data_parallel"  # replicated on every rank (small tables)


@unique
class SparseOptimizer(str, Enum):
    ROWWISE_ADAGRAD = "rowwise_adagrad"  # one accumulator per row: TorchRec's default, least memory
    ADAGRAD = "adagrad"  # one accumulator per element: D times the state
    ADAM = "adam"  # GPUs only: FBGEMM has no CPU kernel for it (refused at start on CPU)
    SGD = "sgd"


@unique
class TowerSharing(str, Enum):
    NONE = "none"  # every head has a tower of its own
    ADAP_SL = "adap_sl"  # CVR and imputation towers partially shared and pruned (adap-sl.txt)


@unique
class Precision(str, Enum):
    FLOAT32 = "float32"  # every product in float32
    # The training forward under autocast to bfloat16: the matrix products in bfloat16 (on CPUs
    # with avx512_bf16 or AMX, and GPUs), weights, gradients, optimizer state and the losses'
    # reductions in float32. Evaluation and export stay float32.
    BF16 = "bf16"


@unique
class CpuBinding(str, Enum):
    # On CPU with several ranks on one machine, each rank runs on its own share of the cores
    # with a torch thread per core (trainer.cpu_binding); on GPUs nothing changes.
    AUTO = "auto"
    NONE = "none"  # the kernel places every rank's threads (e.g. the user binds each rank)


@unique
class FeatureInteraction(str, Enum):
    NONE = "none"  # the MMoE reads the concatenated embeddings and dense features only
    DOT = "dot"  # ... and the pairwise dot products of the sparse embeddings (DotInteraction)


@dataclass
class DataConfig:
    train: str = MISSING  # Parquet file or directory (or URI: s3://bucket/logs) of training rows
    test: str | None = None  # evaluated at the end of training when set
    # Hive partitions of data.train to read, e.g. "day >= '2026-11-25'": comparisons of partition
    # columns with constants, in, and, or, not (see trainer.data._partitions). None: all files.
    filter: str | None = None
    schema: str | None = None  # schema YAML; default: schema.yaml in the train path's parent
    batch_size: int = 2048  # per rank
    shuffle_buffer: int = 65_536  # rows held for shuffling (bounds memory)
    # > 0: shuffle by group (the schema's group column, e.g. the user) in runs of at most this
    # many rows, so a batch holds a few users' rows: what objective.params.pairwise_weight needs.
    group_rows: int = 0
    eval_batch_size: int = 8192
    # > 0: the test set is a random-exposure protocol (Coat, Yahoo! R3: see
    # trainer.data.converters.mnar); evaluation adds per-user NDCG@k and Recall@k of pCVR
    # against conversion on its clicked (rated) rows, users taken from the schema's group column.
    ranking_k: int = 0


@dataclass
class PruningConfig:
    """Algorithm 1's schedule for one tower (adap-sl.txt Section 4.4); the paper's grids in brackets."""

    rate: float = 0.1  # alpha: share of the tower's remaining weights pruned per epoch [0.05-0.25]
    min_density: float = 0.5  # S: pruning stops when this share of the weights is left [0.1-0.7]
    warmup_epochs: int = 2  # E: epochs trained before the first prune [2-10]


@dataclass
class AdapSlConfig:
    """Adap-SL (``model.tower_sharing: adap_sl``); see ``trainer.model.adap_sl``."""

    # Share of each tower hidden layer's units, and of the tower input, common to both towers
    # (the paper shares half, Eq. 7-8 and 14-17).
    shared_fraction: float = 0.5
    # Training steps per pruning "epoch": a streaming run has no natural epoch, so Algorithm 1's
    # "train k steps, then prune" takes k from here.
    epoch_steps: int = 100
    cvr: PruningConfig = field(default_factory=PruningConfig)  # the prediction model f_theta
    imputation: PruningConfig = field(default_factory=PruningConfig)  # the imputation model g_phi


@dataclass
class ModelConfig:
    num_experts: int = 8
    expert_sizes: list[int] = field(default_factory=lambda: [256])
    tower_sizes: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.0
    tower_sharing: str = TowerSharing.NONE.value  # see TowerSharing
    interaction: str = FeatureInteraction.NONE.value  # see FeatureInteraction
    adap_sl: AdapSlConfig = field(default_factory=AdapSlConfig)  # read with tower_sharing: adap_sl


@dataclass
class ObjectiveConfig:
    name: str = "esmm"  # see trainer.objectives.OBJECTIVES
    # The objective's hyper-parameters, flat (its params_type's fields, groups included); after
    # load_config: every one of them, defaults filled in.
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DenseOptimizerConfig:
    lr: float = 1e-3  # Adam on every non-embedding parameter
    weight_decay: float = 0.0
    # lr decays linearly over train.steps to lr * final_lr_scale (1: constant). Set from the step
    # count, so a resumed run follows the same schedule.
    final_lr_scale: float = 1.0


@dataclass
class SparseOptimizerConfig:
    name: str = (
        SparseOptimizer.ROWWISE_ADAGRAD.value
    )  # fused into the backward pass; see SparseOptimizer
    lr: float = 0.05
    eps: float = 1e-8


@dataclass
class ShardingConfig:
    # Allowed sharding types; the planner picks among them per table. Row-wise needs nccl.
    types: list[str] = field(
        default_factory=lambda: [ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value]
    )  # see ShardingType
    backend: str = "auto"  # auto: nccl with CUDA, else gloo


@dataclass
class TrainLoopConfig:
    # Warm start (trainer.warm_start): a previous run, one of its checkpoints, or an exported
    # model directory (path or URI) whose weights this NEW run starts from (step 0, its own
    # data). Tables and layers it has are carried over, grown tables keep their rows, new ones
    # are initialised as usual; warm_start.json in the run says which was which.
    init_from: str | None = None
    # Also carry the optimizer state (Adam moments, the sparse optimizer's accumulators): only
    # from a run or checkpoint with the same tables, layers, objective and sparse optimizer.
    init_optimizer: bool = False
    steps: int = 1000  # optimizer steps (each rank sees batch_size rows per step)
    log_every: int = 20  # steps between metrics.jsonl lines
    checkpoint_every: int = 500  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # older checkpoints are deleted
    evaluate: bool = True  # evaluate data.test at the end
    progress: bool = True  # tqdm bar on rank 0
    # See Precision. bf16 trained the benchmark's model 1.6x as fast on an avx512_bf16 CPU and
    # 1.9x with AMX (benchmarks/README.md), its losses within bfloat16's rounding of float32's;
    # opt-in.
    precision: str = Precision.FLOAT32.value


@dataclass
class TrainConfig:
    # Run directory (or URI: s3://bucket/runs/x): config, metrics, checkpoints, evaluation.
    output_dir: str = MISSING
    seed: int = 0
    device: str = "auto"  # auto: cuda:<local rank> if available, else cpu
    cpu_binding: str = CpuBinding.AUTO.value  # see CpuBinding
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    dense_optimizer: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig)
    sparse_optimizer: SparseOptimizerConfig = field(default_factory=SparseOptimizerConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Merge defaults, a YAML file and ``key=value`` overrides into a validated ``TrainConfig``.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type, missing required value, an invalid
            value; for ``objective`` every problem at once (unknown objective or parameter,
            wrong type or value of a parameter, Adap-SL towers without an imputation head).
    """
    schema = OmegaConf.structured(TrainConfig)
    try:
        layers = [schema]
        if path is not None:
            layers.append(OmegaConf.create(_read_config_file(path)))
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(
                f"config {path or '<defaults>'}: required value(s) missing: {missing}"
            )
        OmegaConf.resolve(merged)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        where = f" (key {key!r})" if key else ""
        raise ConfigError(f"config {path or '<defaults>'}{where}: {_first_line(err)}") from None
    _check(config)
    _resolve_objective(config, path)
    return config  # type: ignore[return-value]


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config (what a run really used) as YAML, to a local path or a URI.

    It holds paths and URIs as given, never a credential: those come from the environment
    (``schemas.storage``), and a URI with one in it is refused before anything is written.
    """
    storage.write_text(path, OmegaConf.to_yaml(OmegaConf.structured(config)))


def _read_config_file(path: str | Path) -> str:
    """A config file's text, from a local path or a URI.

    Raises:
        ConfigError: no such file, or it cannot be read (the storage fault named).
    """
    try:
        if not storage.is_file(path):
            raise ConfigError(f"config file not found: {path}")
        return storage.read_text(path)
    except storage.StorageError as err:
        raise ConfigError(f"config file {path}: {err}") from None


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)  # type: ignore[return-value]


# Objective parameters that compare the rows of one group (the user) within a batch; at their
# defaults they do not.
_WITHIN_GROUP_PARAMS = ("pairwise_weight", "weight_scope")


def config_warnings(config: TrainConfig) -> list[str]:
    """What a valid config asks for but will mostly not get, one message each (the recipe logs
    them): an objective parameter that compares the rows of one user within a batch, while
    ``data.group_rows: 0`` shuffles rows alone, so a batch rarely holds two of a user's rows."""
    if config.data.group_rows:
        return []
    params = config.objective.params
    defaults = params_to_dict(objective_params(config.objective.name))
    return [
        f"objective.params.{key}={params[key]} compares the rows of one user within a batch, "
        "but data.group_rows=0 shuffles rows alone, so a batch rarely holds two clicked rows "
        "of a user; set data.group_rows (e.g. 64: each user's rows in runs of at most 64)"
        for key in _WITHIN_GROUP_PARAMS
        if key in params and params[key] != defaults[key]
    ]


def _check(config: TrainConfig) -> None:
    positive = {
        "data.batch_size": config.data.batch_size,
        "data.eval_batch_size": config.data.eval_batch_size,
        "data.shuffle_buffer": config.data.shuffle_buffer,
        "model.num_experts": config.model.num_experts,
        "train.steps": config.train.steps,
        "train.log_every": config.train.log_every,
        "train.keep_checkpoints": config.train.keep_checkpoints,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    _choice("train.precision", config.train.precision, Precision)
    _choice("cpu_binding", config.cpu_binding, CpuBinding)
    for key, value in {"output_dir": config.output_dir, "data.train": config.data.train}.items():
        try:
            storage.resolve(value)
        except storage.StorageError as err:
            raise ConfigError(f"{key}: {err}") from None
    if config.data.filter is not None:
        try:
            PartitionFilter.parse(config.data.filter)
        except FilterError as err:
            raise ConfigError(f"data.filter: {err}") from None
    if config.data.group_rows < 0:
        raise ConfigError(
            f"data.group_rows must be >= 0 (0: rows shuffled alone), got {config.data.group_rows}"
        )
    if config.data.ranking_k < 0:
        raise ConfigError(
            f"data.ranking_k must be >= 0 (0: no ranking metrics), got {config.data.ranking_k}"
        )
    if config.dense_optimizer.final_lr_scale < 0:
        raise ConfigError(
            f"dense_optimizer.final_lr_scale must be >= 0, got {config.dense_optimizer.final_lr_scale}"
        )
    if config.train.checkpoint_every < 0:
        raise ConfigError(
            f"train.checkpoint_every must be >= 0, got {config.train.checkpoint_every}"
        )
    _check_init_from(config)
    if not config.model.expert_sizes or min(config.model.expert_sizes) < 1:
        raise ConfigError(
            f"model.expert_sizes must be positive sizes, got {config.model.expert_sizes}"
        )
    if min(config.model.tower_sizes, default=1) < 1:
        raise ConfigError(
            f"model.tower_sizes must be positive sizes, got {config.model.tower_sizes}"
        )
    if not 0.0 <= config.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {config.model.dropout}")
    _check_tower_sharing(config.model)
    if not config.sharding.types:
        raise ConfigError("sharding.types must allow at least one sharding type")
    _choice("sparse_optimizer.name", config.sparse_optimizer.name, SparseOptimizer)
    for value in config.sharding.types:
        _choice("sharding.types", value, ShardingType)
    if config.sharding.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(
            f"sharding.backend must be auto, gloo or nccl, got {config.sharding.backend!r}"
        )


def _check_init_from(config: TrainConfig) -> None:
    """``train.init_from`` names another run's files; ``train.init_optimizer`` needs it."""
    source = config.train.init_from
    if source is None:
        if config.train.init_optimizer:
            raise ConfigError(
                "train.init_optimizer=true carries the optimizer state of train.init_from, "
                "which is not set"
            )
        return
    try:
        source_at, run_at = storage.resolve(source), storage.resolve(config.output_dir)
    except storage.StorageError as err:
        raise ConfigError(f"train.init_from: {err}") from None
    source_dir, run_dir = (f"{where.path.rstrip('/')}/" for where in (source_at, run_at))
    if source_at.scheme == run_at.scheme and (
        source_dir.startswith(run_dir) or run_dir.startswith(source_dir)
    ):
        raise ConfigError(
            f"train.init_from={source} overlaps this run's own directory (output_dir="
            f"{config.output_dir}): a warm start begins a new run in a new output_dir; "
            "continue a run with --resume"
        )


def _resolve_objective(config: TrainConfig, path: str | Path | None) -> None:
    """Check ``config.objective`` and replace its params by the resolved ones (defaults filled).

    Raises:
        ConfigError: every problem of the objective section, each line naming its key.
    """
    name = config.objective.name
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name: {name!r} is not one of {sorted(OBJECTIVES)}")
    problems: list[str] = []
    params = None
    try:
        params = objective_params(name, config.objective.params)
    except ParamsError as err:
        problems += [str(problem) for problem in err.problems]
    if (
        config.model.tower_sharing == TowerSharing.ADAP_SL.value
        and IMPUTATION not in OBJECTIVES[name].required_heads
    ):
        dr_family = sorted(n for n, cls in OBJECTIVES.items() if IMPUTATION in cls.required_heads)
        problems.append(
            "model.tower_sharing: adap_sl shares units between the CVR and the imputation tower, "
            f"but objective {name!r} has no imputation head; use a DR-family objective "
            f"({', '.join(dr_family)}) or set model.tower_sharing=none"
        )
    if problems:
        lines = "".join(f"\n  {problem}" for problem in problems)
        raise ConfigError(f"config {path or '<defaults>'}: objective {name!r}:{lines}")
    config.objective.params = params_to_dict(params)


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """A ``ModelConfig`` from its dict form (a checkpoint's saved config), defaults filled in.

    Raises:
        ConfigError: an unknown key or a wrong type.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), values)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"model config: {_first_line(err)}") from None
    _check_tower_sharing(config)  # type: ignore[arg-type]
    return config  # type: ignore[return-value]


def _check_tower_sharing(model: ModelConfig) -> None:
    _choice("model.tower_sharing", model.tower_sharing, TowerSharing)
    _choice("model.interaction", model.interaction, FeatureInteraction)
    if model.tower_sharing != TowerSharing.ADAP_SL.value:
        return
    adap = model.adap_sl
    if not 0.0 < adap.shared_fraction < 1.0:
        raise ConfigError(
            f"model.adap_sl.shared_fraction must be in (0, 1), got {adap.shared_fraction}"
        )
    if not model.tower_sizes:
        raise ConfigError(
            "model.tower_sizes is empty: adap_sl shares the towers' hidden units, give at least one layer"
        )
    if adap.epoch_steps < 1:
        raise ConfigError(f"model.adap_sl.epoch_steps must be >= 1, got {adap.epoch_steps}")
    for tower in ("cvr", "imputation"):
        pruning: PruningConfig = getattr(adap, tower)
        key = f"model.adap_sl.{tower}"
        if not 0.0 <= pruning.rate < 1.0:
            raise ConfigError(f"{key}.rate must be in [0, 1), got {pruning.rate}")
        if not 0.0 < pruning.min_density <= 1.0:
            raise ConfigError(f"{key}.min_density must be in (0, 1], got {pruning.min_density}")
        if pruning.warmup_epochs < 0:
            raise ConfigError(f"{key}.warmup_epochs must be >= 0, got {pruning.warmup_epochs}")


def _choice(key: str, value: str, choices: type[Enum]) -> None:
    allowed = [member.value for member in choices]
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {allowed}")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
