"""Config loading: inheritance, --set overrides, and one clear error for every kind of bad key or value."""
import pytest

from slm_jax.errors import UserError
from train.config import Config, load_config, parse_override, read_yaml


def test_named_config_inherits_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  d_model: 64\n  n_heads: 4\ntrain:\n  steps: 10\n")
    child = tmp_path / "child.yaml"
    child.write_text("inherit: base\ntrain:\n  steps: 20\n  precision: bf16\n")
    cfg = load_config(str(child), ["train.batch_size=3", "model.n_layers=1", "data.val_plays=[hamlet]"])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers) == (64, 4, 1)
    assert (cfg.train.steps, cfg.train.precision, cfg.train.batch_size) == (20, "bf16", 3)
    assert cfg.data.val_plays == ("hamlet",)


def test_every_shipped_config_loads():
    from train.config import CONFIG_DIR
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"tiny", "baseline"} <= set(names)
    for name in names:
        assert isinstance(load_config(name), Config)


def test_config_round_trips_through_a_dict():
    cfg = load_config("tiny", ["train.learning_rate=0.01"])
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, message", [
    ("train.lr=0.1", "unknown config key 'train.lr'"),
    ("modle.d_model=3", "unknown config key 'modle'"),
    ("train.steps=ten", "train.steps: expected int"),
    ("train.steps=1.5", "train.steps: expected int"),
    ("train.steps=-5", "train.steps must be a positive integer"),
    ("model.n_heads=3", "model.n_heads (3) must divide model.d_model"),
    ("model.d_model=-8", "model.d_model must be a positive integer"),
    ("train.precision=fp8", "train.precision must be one of fp32, bf16, fp16"),
    ("model.dropout=true", "model.dropout: expected float"),
    ("train.steps", "--set expects section.key=value"),
])
def test_bad_values_are_rejected_naming_the_key(override, message):
    with pytest.raises(UserError) as err:
        load_config("tiny", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown config 'nope'.*tiny"):
        load_config("nope")


def test_a_config_that_is_a_folder_or_not_utf8_is_one_user_error(tmp_path):
    with pytest.raises(UserError, match=f"^config file {tmp_path} is a folder, not a YAML file$"):
        load_config(str(tmp_path))
    for empty in ("", " "):  # Path('') is the current folder
        with pytest.raises(UserError, match="^--config is empty: give a config name"):
            load_config(empty)
    bad = tmp_path / "r.yaml"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match=r"^config .*r\.yaml is not UTF-8 text \(byte 0xff at offset 0\)"):
        load_config(str(bad))
    with pytest.raises(UserError, match=r"^rules file .*r\.yaml is not UTF-8 text"):
        read_yaml(bad, "rules file")


def test_exponent_floats_without_a_dot_are_floats():
    assert load_config("tiny", ["train.learning_rate=3e-4"]).train.learning_rate == 3e-4


def test_parse_override_reads_yaml_values():
    assert parse_override("train.init_from=null") == {"train": {"init_from": None}}
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
