"""Refusals and carry-overs a new-user tryout found missing: each input gives one `error:` line and exit 2 with
nothing written, and imported token ids survive derived runs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checkpoints import hf_import
from checkpoints.hf import model_config
from slm_jax.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def copy_fixture(tmp_path, name="gqa_tied", config=None) -> Path:
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURES / name, folder)
    if config is not None:
        values = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**values, **config}))
    return folder


def one_line_refusal(main, argv, capsys, *fragments) -> str:
    """Run a CLI main that must refuse: exit 2, exactly one `error: ` line on stderr holding every fragment."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def refuse_import(folder, tmp_path, capsys, *fragments) -> str:
    err = one_line_refusal(hf_import.main, [str(folder), "--out", str(tmp_path / "run")], capsys, *fragments)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))
    return err


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_import_refuses_non_finite_weights_naming_the_tensor(tmp_path, capsys, value):
    folder = copy_fixture(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][3, 5] = value
    save_file(tensors, folder / "model.safetensors")
    refuse_import(folder, tmp_path, capsys, name, "non-finite")


@pytest.mark.parametrize("name,file", [("gqa_tied", "model.safetensors"),
                                       ("bf16_sharded", "model-00002-of-00002.safetensors")])
@pytest.mark.parametrize("keep", [0.5, 0.999, 4 / (1 << 20)])
def test_import_refuses_a_truncated_safetensors_file_naming_it(tmp_path, capsys, name, file, keep):
    folder = copy_fixture(tmp_path, name)
    data = (folder / file).read_bytes()
    (folder / file).write_bytes(data[:int(len(data) * keep)])
    refuse_import(folder, tmp_path, capsys, file, "not a readable safetensors file")


@pytest.mark.parametrize("config,key", [
    ({"rope_parameters": "yarn"}, "config.json rope_parameters must be a JSON object"),
    ({"rope_parameters": None, "rope_scaling": "yarn"}, "config.json rope_scaling must be a JSON object"),
    ({"rope_theta": "abc"}, "config.json rope_theta must be a finite number"),
    ({"rope_theta": True}, "config.json rope_theta must be a finite number"),
    ({"rms_norm_eps": "x"}, "config.json rms_norm_eps must be a finite number"),
    ({"rms_norm_eps": [1e-5]}, "config.json rms_norm_eps must be a finite number"),
    ({"num_key_value_heads": 2.5}, "config.json num_key_value_heads must be an integer"),
    ({"head_dim": "8"}, "config.json head_dim must be an integer"),
    ({"max_position_embeddings": 128.0}, "config.json max_position_embeddings must be an integer"),
    ({"tie_word_embeddings": "yes"}, "config.json tie_word_embeddings must be true or false"),
    ({"bos_token_id": "<s>"}, "config.json bos_token_id must be a token id"),
    ({"eos_token_id": [2, -1]}, "config.json eos_token_id must be a token id"),
    ({"rope_parameters": {"rope_type": 3}}, "config.json rope_parameters.rope_type must be a string"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1, "high_freq_factor": 4,
                          "original_max_position_embeddings": 64}}, "config.json rope_parameters.factor must be"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
                          "original_max_position_embeddings": 64.5}},
     "config.json rope_parameters.original_max_position_embeddings must be an integer"),
])
def test_wrong_typed_config_json_values_are_refused_naming_the_key(tmp_path, capsys, config, key):
    refuse_import(copy_fixture(tmp_path, config=config), tmp_path, capsys, key)


@pytest.mark.parametrize("config,fragments", [
    ({"num_key_value_heads": 3}, ("config.json num_key_value_heads (3)", "config.json num_attention_heads (4)")),
    ({"num_key_value_heads": 0}, ("config.json num_key_value_heads",)),
    ({"max_position_embeddings": 64}, ("config.json max_position_embeddings (64)", "--seq-len (128)")),
    ({"rms_norm_eps": 0}, ("config.json rope_theta and config.json rms_norm_eps must be positive",)),
    ({"head_dim": 7}, ("config.json head_dim must be a positive even integer",)),
])
def test_model_validation_of_imported_values_names_config_json_keys(tmp_path, capsys, config, fragments):
    folder = copy_fixture(tmp_path, config=config)
    err = one_line_refusal(hf_import.main, [str(folder), "--out", str(tmp_path / "run"), "--seq-len", "128"], capsys,
                           *fragments)
    assert "model." not in err


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("config", [
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_scaling": {"type": "yarn", "factor": 4.0}},
    {"rope_parameters": {"rope_type": "default"}, "rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "default"}, "rope_scaling": {"rope_type": "llama3", **LLAMA3}},
    {"rope_parameters": {"rope_type": "llama3", **LLAMA3}, "rope_scaling": {"rope_type": "llama3", **LLAMA3,
                                                                            "factor": 4.0}},
    {"rope_theta": 500000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
])
def test_rope_parameters_and_rope_scaling_that_disagree_are_refused(tmp_path, capsys, config):
    err = refuse_import(copy_fixture(tmp_path, config=config), tmp_path, capsys, "disagree")
    assert "rope" in err


def test_rope_parameters_and_rope_scaling_that_agree_are_read_as_one():
    hf = json.loads((FIXTURES / "llama3_head_dim" / "config.json").read_text())
    both = {**hf, "rope_scaling": {"type": "llama3", **LLAMA3}, "rope_theta": 10000.0}
    assert model_config(both) == model_config(hf)
    assert model_config(both).rope_scaling.original_max_position_embeddings == 64
    plain = {**hf, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rope_scaling": None}
    assert model_config(plain).rope_scaling is None and model_config(plain).rope_theta == 5e5
    with pytest.raises(UserError, match="'yarn' is not supported"):
        model_config({**hf, "rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 4.0}})
