"""load_config's check of the objective section: typed hyper-parameters, every problem at once,
each named by key; the resolved parameters recorded in a run's config.yaml."""

from pathlib import Path

import pytest
import yaml

from trainer.config import ConfigError, config_warnings, load_config, save_config
from trainer.objectives import OBJECTIVES, objective_params, param_names, params_to_dict

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ["output_dir=/tmp/run", "data.train=/tmp/data"]
SHIPPED = sorted((REPO / "trainer" / "configs").glob("*.yaml"))


def load(*overrides: str, path: Path | None = None):
    return load_config(path, [*REQUIRED, *overrides])


def problems(err: pytest.ExceptionInfo) -> list[str]:
    """The indented problem lines of a ConfigError."""
    return [line.strip() for line in str(err.value).splitlines()[1:]]


def test_every_problem_is_reported_at_once_and_named_by_key():
    with pytest.raises(ConfigError) as err:
        load(
            "objective.name=multi_dr",
            "objective.params.tau=0",
            "objective.params.tua=0.1",
            "objective.params.undersample_rate=0.5",
            "objective.params.cvr_weight=-1",
            "objective.params.imputation_link=relu",
            "objective.params.propensity_grad=maybe",
        )
    assert str(err.value).splitlines()[0] == "config <defaults>: objective 'multi_dr':"
    assert problems(err) == [
        "objective.params.tau: must be in (0, 1], got 0.0",
        "objective.params.tua: unknown parameter (did you mean tau?)",
        "objective.params.undersample_rate: must be >= 1 or null, got 0.5",
        "objective.params.cvr_weight: must be >= 0, got -1.0",
        "objective.params.imputation_link: must be one of ['softplus', 'sigmoid'], got 'relu'",
        "objective.params.propensity_grad: must be true or false, got 'maybe'",
    ]


def test_wrong_types_are_named_by_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "objective:\n"
        "  name: evi\n"
        "  params: {tau: '0.1', transfer_layers: 2.5, propensity_dim: null, cvr_weight: [1]}\n"
    )
    with pytest.raises(ConfigError) as err:
        load(path=config)
    assert str(err.value).startswith(f"config {config}: objective 'evi':")
    assert problems(err) == [
        "objective.params.tau: must be a number, got '0.1'",
        "objective.params.transfer_layers: must be an integer, got 2.5",
        "objective.params.propensity_dim: must not be null (an integer)",
        "objective.params.cvr_weight: must be a number, got [1]",
    ]


def test_an_unknown_key_without_a_close_match_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load("objective.name=esmm", "objective.params.lambda_g=0.5")
    assert problems(err) == [
        "objective.params.lambda_g: unknown parameter; esmm takes ctcvr_weight"
    ]


def test_an_unknown_objective_is_named():
    with pytest.raises(ConfigError, match=r"objective.name: 'esmm2' is not one of \['badr', "):
        load("objective.name=esmm2")


def test_adap_sl_without_an_imputation_head_is_reported_with_the_parameters():
    with pytest.raises(ConfigError) as err:
        load("model.tower_sharing=adap_sl", "objective.name=multi_ipw", "objective.params.tau=2")
    assert problems(err) == [
        "objective.params.tau: must be in (0, 1], got 2.0",
        (
            "model.tower_sharing: adap_sl shares units between the CVR and the imputation tower, "
            "but objective 'multi_ipw' has no imputation head; use a DR-family objective "
            "(badr, escm2_dr, multi_dr) or set model.tower_sharing=none"
        ),
    ]
    assert load("model.tower_sharing=adap_sl", "objective.name=badr").objective.name == "badr"


def test_null_is_accepted_where_the_paper_allows_it():
    config = load("objective.name=multi_dr", "objective.params.undersample_rate=null")
    assert config.objective.params["undersample_rate"] is None


def test_the_resolved_parameters_are_what_the_run_records(tmp_path):
    config = load("objective.name=multi_dr", "objective.params.tau=0.02")
    expected = params_to_dict(objective_params("multi_dr", {"tau": 0.02}))
    assert config.objective.params == expected
    assert list(expected) == list(param_names(OBJECTIVES["multi_dr"].params_type))
    assert expected["undersample_rate"] is None and expected["imputation_link"] == "softplus"
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["objective"]["params"] == expected
    again = load_config(tmp_path / "config.yaml")  # a run's config loads to the same values
    assert again.objective.params == expected


def test_integers_are_taken_for_numbers_and_recorded_as_floats():
    params = load("objective.name=naive", "objective.params.cvr_weight=2").objective.params
    assert params["cvr_weight"] == 2.0 and isinstance(params["cvr_weight"], float)
    assert params["ctr_trains_backbone"] is True  # the default, recorded


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_keeps_its_values(path):
    given = (yaml.safe_load(path.read_text())["objective"].get("params")) or {}
    config = load_config(path)
    params = config.objective.params
    assert set(params) == set(param_names(OBJECTIVES[config.objective.name].params_type))
    assert {key: params[key] for key in given} == given


def test_cpu_binding_is_auto_unless_turned_off():
    assert load().cpu_binding == "auto"
    assert load("cpu_binding=none").cpu_binding == "none"
    with pytest.raises(ConfigError, match=r"cpu_binding: 'cores' is not one of \['auto', 'none'\]"):
        load("cpu_binding=cores")


def test_the_training_precision_is_float32_unless_bf16_is_asked_for():
    assert load().train.precision == "float32"
    assert load("train.precision=bf16").train.precision == "bf16"
    with pytest.raises(ConfigError, match=r"train.precision: 'fp16' is not one of \['float32', "):
        load("train.precision=fp16")


def test_grouped_reading_is_off_unless_asked_for_and_never_negative():
    assert load().data.group_rows == 0
    assert load("data.group_rows=64").data.group_rows == 64
    with pytest.raises(ConfigError, match=r"data.group_rows must be >= 0 .*got -1"):
        load("data.group_rows=-1")


def test_a_within_user_objective_parameter_without_grouped_reading_is_warned_about():
    assert config_warnings(load("objective.name=badr")) == []
    pairwise = config_warnings(load("objective.name=naive", "objective.params.pairwise_weight=0.3"))
    assert len(pairwise) == 1
    assert "objective.params.pairwise_weight=0.3" in pairwise[0]
    assert "data.group_rows=0" in pairwise[0]
    both = load(
        "objective.name=badr",
        "objective.params.pairwise_weight=0.3",
        "objective.params.weight_scope=between_groups",
    )
    assert [w.split(" ")[0] for w in config_warnings(both)] == [
        "objective.params.pairwise_weight=0.3",
        "objective.params.weight_scope=between_groups",
    ]
    grouped = load(
        "objective.name=badr", "objective.params.weight_scope=within_groups", "data.group_rows=64"
    )
    assert config_warnings(grouped) == []
