"""Hugging Face Llama folders in and out, against transformers' own logits (fixtures from
`python -m checkpoints.make_hf_fixtures`, tests/fixtures/hf): import parity, refusals, export, round trips."""
import dataclasses
import json
import os
import shutil
from pathlib import Path

import chex
import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from checkpoints import hf_import
from checkpoints.hf import model_config
from checkpoints.hf_export import export_run
from checkpoints.hf_import import import_folder
from quant.config import QuantConfig
from quant.serving import dequantize, quantized_weights
from slm_jax import Transformer
from slm_jax.errors import UserError
from train.ptq import convert_workdir
from train.run import load_run

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = ("gqa_tied", "llama3_head_dim", "bf16_sharded")


def logits(run, ids, cfg=None):
    model = run.model if cfg is None else Transformer(cfg)
    return np.asarray(jax.jit(model.apply)(run.variables, ids)[0])


def flat(params) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.parametrize("name", NAMES)
def test_imported_fixture_matches_transformers_logits(name, tmp_path):
    import_folder(FIXTURES / name, tmp_path / "run", log=lambda _: None)
    run = load_run(tmp_path / "run")
    ids, reference = np.load(FIXTURES / name / "ids.npy"), np.load(FIXTURES / name / "logits.npy")
    got = logits(run, ids)
    chex.assert_shape(got, reference.shape)
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0)
    assert (run.metadata["kind"], run.step) == ("imported", 0)
    assert run.config.model.context == 128 and run.config.model.norm_eps == json.loads(
        (FIXTURES / name / "config.json").read_text())["rms_norm_eps"]
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (FIXTURES / name / "tokenizer.json").read_bytes()
    assert run.config.data.tokenizer == str((tmp_path / "run" / "tokenizer.json").resolve())
    text = "to be or not to be, that is the question"
    assert run.tokenizer.encode(text).tolist() == Tokenizer.from_file(str(FIXTURES / name / "tokenizer.json")).encode(
        text).ids
    if name == "llama3_head_dim":  # the fixture pins the rope scaling and the head width: without them it differs
        assert run.config.model.head_dim == 16 and run.config.model.rope_scaling.factor == 8.0
        plain = dataclasses.replace(run.config.model, rope_scaling=None)
        assert np.abs(logits(run, ids, plain) - reference).max() > 1e-3


def bad_folder(tmp_path, config=None, drop=None, rename=None) -> Path:
    """A copy of the gqa_tied fixture with config.json fields changed and a tensor dropped or renamed."""
    folder = tmp_path / "bad"
    shutil.copytree(FIXTURES / "gqa_tied", folder)
    values = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**values, **(config or {})}))
    if drop or rename:
        tensors = load_file(folder / "model.safetensors")
        if rename:
            tensors[rename[1]] = tensors.pop(rename[0])
        tensors.pop(drop, None)
        save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("change,message", [
    (dict(config={"attention_bias": True}), "attention_bias"),
    (dict(config={"mlp_bias": True}), "mlp_bias"),
    (dict(config={"sliding_window": 4096}), "sliding_window"),
    (dict(config={"num_local_experts": 8}), "num_local_experts"),
    (dict(config={"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}), "'yarn'"),
    (dict(config={"model_type": "qwen2"}), "model_type 'qwen2'"),
    (dict(config={"hidden_act": "gelu"}), "hidden_act"),
    (dict(drop="model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight is missing"),
    (dict(rename=("model.norm.weight", "model.layers.0.self_attn.q_proj.bias")), "q_proj.bias has no place"),
    (dict(config={"intermediate_size": 48}), r"gate_proj.weight has shape \[64, 32\], config.json implies \[48, 32\]"),
    (dict(config={"num_key_value_heads": 4}), r"k_proj.weight has shape \[16, 32\], config.json implies \[32, 32\]"),
    (dict(config={"num_attention_heads": 0}), "config.json num_attention_heads must be a positive integer, got 0"),
    (dict(config={"max_position_embeddings": 0}), "config.json max_position_embeddings must be a positive integer"),
])
def test_import_refuses_what_the_model_cannot_represent_before_writing(tmp_path, capsys, change, message):
    folder = bad_folder(tmp_path, **change)
    with pytest.raises(UserError, match=message):
        import_folder(folder, tmp_path / "run")
    assert not (tmp_path / "run").exists() and [p.name for p in tmp_path.iterdir()] == ["bad"]
    with pytest.raises(SystemExit) as exit_info:  # the command line: one line, exit 2
        hf_import.main([str(folder), "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_import_refuses_an_existing_out_folder(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty; choose an empty --out folder"):
        import_folder(FIXTURES / "gqa_tied", tmp_path / "run")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_transformers_4_config_form_reads_like_5():
    new = json.loads((FIXTURES / "llama3_head_dim" / "config.json").read_text())
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    rope = dict(new["rope_parameters"])
    old["rope_theta"] = rope.pop("rope_theta")
    old["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    assert model_config(old) == model_config(new)


@pytest.mark.parametrize("name,dtype", [("gqa_tied", "f32"), ("llama3_head_dim", "f32"), ("bf16_sharded", "bf16")])
def test_import_export_import_is_bit_exact(name, dtype, tmp_path):
    import_folder(FIXTURES / name, tmp_path / "a", log=lambda _: None)
    export_run(tmp_path / "a", tmp_path / "hf", dtype, log=lambda _: None)
    import_folder(tmp_path / "hf", tmp_path / "b", log=lambda _: None)
    a, b = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    assert a.config.model == b.config.model and a.tokenizer.sha256 == b.tokenizer.sha256
    chex.assert_trees_all_equal(flat(a.variables), flat(b.variables))
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["model_type"] == "llama" and exported["bos_token_id"] == 1
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == {"bos_token_id": 1,
                                                                                    "eos_token_id": 2}
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {dtype.upper()}
        assert ("lm_head.weight" in f.keys()) == (not a.config.model.tie_embeddings)
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (FIXTURES / name / "tokenizer.json").read_bytes()


def test_default_bf16_export_rounds_float32_weights_to_nearest(tmp_path):
    import_folder(FIXTURES / "gqa_tied", tmp_path / "a", log=lambda _: None)
    export_run(tmp_path / "a", tmp_path / "hf", log=lambda _: None)
    source = load_file(FIXTURES / "gqa_tied" / "model.safetensors")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(exported[name], source[name].astype(ml_dtypes.bfloat16))


def test_a_serving_run_exports_its_dequantized_weights(tmp_path):
    import_folder(FIXTURES / "gqa_tied", tmp_path / "float", log=lambda _: None)
    quant = QuantConfig(mode="serve", weight_bits=4, granularity="per_group", group_size=16, numerics="fake")
    convert_workdir(tmp_path / "float", tmp_path / "int4", quant, log=lambda _: None)
    export_run(tmp_path / "int4", tmp_path / "hf", "f32", log=lambda _: None)
    served = load_run(tmp_path / "int4")
    stored = quantized_weights(served.variables["aqt"])[("layer_1", "mlp", "down")]
    exported = load_file(tmp_path / "hf" / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    np.testing.assert_array_equal(exported, dequantize(stored["value"], stored["scale"]).T)
    import_folder(tmp_path / "hf", tmp_path / "back", log=lambda _: None)
    ids = np.load(FIXTURES / "gqa_tied" / "ids.npy")
    np.testing.assert_allclose(logits(load_run(tmp_path / "back"), ids), logits(served, ids), atol=1e-5, rtol=0)


def test_qat_fine_tuning_starts_from_an_imported_model_without_repeating_its_shape(tmp_path):
    from train.config import load_config
    from train.loop import run_training
    import_folder(FIXTURES / "gqa_tied", tmp_path / "run", log=lambda _: None)
    imported = load_run(tmp_path / "run")
    config = load_config("tiny", [f"train.init_from={tmp_path / 'run'}", "train.steps=2", "train.eval_batches=1",
                                  "train.sample_tokens=0", "quant.mode=qat", "quant.weight_bits=8",
                                  "checkpoint.every=2"])
    assert config.model != imported.config.model  # tiny's own shape, as a user would type it
    run_training(config, tmp_path / "qat", log=lambda _: None)
    qat = load_run(tmp_path / "qat")
    assert qat.config.model == dataclasses.replace(imported.config.model, seq_len=config.model.seq_len)
    assert qat.tokenizer.sha256 == imported.tokenizer.sha256
    before, after = flat(imported.variables["params"]), flat(qat.variables["params"])
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # it trained


def test_lora_fine_tuning_over_an_imported_model_keeps_its_tokenizer_without_naming_it(tmp_path):
    from train.config import load_config
    from train.loop import run_training
    import_folder(FIXTURES / "gqa_tied", tmp_path / "run", log=lambda _: None)
    quant = QuantConfig(mode="serve", weight_bits=4, granularity="per_group", group_size=16, numerics="fake")
    convert_workdir(tmp_path / "run", tmp_path / "int4", quant, log=lambda _: None)
    # as the README's SmolLM2 pipeline types it: data.tokenizer left at the default byte tokenizer
    config = load_config("tiny", ["finetune.method=lora", f"finetune.base={tmp_path / 'int4'}", "train.steps=2",
                                  "train.eval_batches=1", "train.sample_tokens=0", "checkpoint.every=2"])
    assert config.data.tokenizer == "byte"
    run_training(config, tmp_path / "lora", log=lambda _: None)
    lora = load_run(tmp_path / "lora")
    assert lora.metadata["kind"] == "lora" and lora.step == 2
    assert lora.tokenizer.sha256 == load_run(tmp_path / "run").tokenizer.sha256


def test_current_umask_reads_the_mask_without_changing_it():
    from checkpoints.hf import current_umask
    before = os.umask(0o022)
    try:
        for mask in (0o022, 0o027, 0o002, 0o077):
            os.umask(mask)
            assert current_umask() == mask
            assert os.umask(mask) == mask  # still in place after the read
    finally:
        os.umask(before)
