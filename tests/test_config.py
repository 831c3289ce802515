"""The generic typed config loader: YAML + ``a.b=c`` overrides, field-path errors."""

import pytest

from megamoe.config import ConfigError, load, parse_overrides, to_dict
from megamoe.errors import UserError
from megamoe.run_config import RunConfig, load_run_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  hidden_size: 64\n  num_heads: 4\n  norm_eps: 1e-6\nmoe:\n  num_experts: 8\n"
                    "  layers: [1, 3]\n  router:\n    top_k: 2\n")
    cfg = load_run_config(path, ["model.num_layers=6", "moe.router.capacity_factor=-1", "moe.layers=[0,5]"])
    assert cfg.model.hidden_size == 64 and cfg.model.num_layers == 6
    assert cfg.model.norm_eps == 1e-6  # YAML 1.1 reads 1e-6 as a string: coerced
    assert cfg.moe.router.top_k == 2 and cfg.moe.router.capacity_factor == -1.0
    assert cfg.moe.moe_layer_indices(6) == [0, 5]
    again = load(RunConfig, None, [f"{k}={v}" for k, v in [("model.hidden_size", 64)]])
    assert again.model.hidden_size == 64 and to_dict(again)["model"]["hidden_size"] == 64


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"moe\.router\.top_kk.*did you mean 'top_k'"):
        load_run_config(None, ["moe.router.top_kk=2"])
    path = tmp_path / "bad.yaml"
    path.write_text("modle:\n  hidden_size: 64\n")
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        load_run_config(path)


def test_bad_type_names_full_path():
    with pytest.raises(ConfigError) as info:
        load_run_config(None, ["moe.router.capacity_factor=lots"])
    assert info.value.field == "moe.router.capacity_factor" and "number" in str(info.value)
    with pytest.raises(ConfigError, match=r"model\.activation='relu': must be one of 'swiglu', 'gelu'"):
        load_run_config(None, ["model.activation=relu"])
    # Inside an Optional[list] the item index is not kept (the loader reports the list).
    with pytest.raises(ConfigError, match=r"moe\.layers=\[1, 'x'\]: must be an integer"):
        load_run_config(None, ["moe.num_experts=2", "moe.layers=[1,x]"])
    with pytest.raises(ConfigError, match=r"moe\.mpo\.input_shape\[1\]"):
        load_run_config(None, ["moe.mpo.input_shape=[1,x]"])


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["novalue"])
