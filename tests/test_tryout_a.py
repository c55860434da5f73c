"""Refusals and carry-overs a new-user tryout found missing: each input gives one `error:` line and exit 2 with
nothing written, and imported token ids survive derived runs."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checkpoints import gguf as gguf_lib
from checkpoints import gguf_export, hf_export, hf_import
from checkpoints import inspect as inspect_cli
from checkpoints.hf import model_config
from checkpoints.hf_export import export_run
from checkpoints.hf_import import import_folder
from checkpoints.manager import CheckpointStore
from quant import ggml
from quant.config import QuantConfig
from quant.convert import main as convert_main
from quant.layer_report import layer_report
from slm_jax.errors import UserError
from train.cli import add_scheme_args, scheme_from_args
from train.config import load_config
from train.evaluate import main as evaluate_main
from train.generate import main as generate_main
from train.ptq import convert_workdir
from train.run import imported_token_ids, load_run

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
    ({"rms_norm_eps": 0}, ("config.json rms_norm_eps must be positive, got 0",)),
    ({"head_dim": 7}, ("config.json head_dim must be a positive even integer",)),
])
def test_model_validation_of_imported_values_names_config_json_keys(tmp_path, capsys, config, fragments):
    folder = copy_fixture(tmp_path, config=config)
    err = one_line_refusal(hf_import.main, [str(folder), "--out", str(tmp_path / "run"), "--seq-len", "128"], capsys,
                           *fragments)
    assert "model." not in err


READERS = {"evaluate": (evaluate_main, ["--workdir"]), "generate": (generate_main, ["--workdir"]),
           "inspect": (inspect_cli.main, [])}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", ["gqa_tied", "bf16_sharded"])
def test_commands_that_read_runs_send_a_hugging_face_folder_to_the_import(tmp_path, capsys, reader, name):
    main, flag = READERS[reader]
    folder = tmp_path / "my model"
    shutil.copytree(FIXTURES / name, folder)
    err = one_line_refusal(main, [*flag, str(folder)], capsys)
    assert err == (f"error: {folder} is a Hugging Face model folder, not an slm-jax run; import it first: "
                   f"python -m checkpoints.hf_import '{folder}' --out runs/NAME\n")
    suggested = shlex.split(err.partition("import it first: ")[2])
    assert suggested[:3] == ["python", "-m", "checkpoints.hf_import"]
    hf_import.main([arg.replace("runs/NAME", str(tmp_path / "run")) for arg in suggested[3:]])
    main([*flag, str(tmp_path / "run")] + (["--max-new-tokens", "2"] if reader == "generate" else []))
    assert capsys.readouterr().err.count("error:") == 0


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_a_folder_without_a_whole_hugging_face_model_is_only_not_a_run(tmp_path, capsys, missing):
    folder = copy_fixture(tmp_path)
    (folder / missing).unlink()
    err = one_line_refusal(evaluate_main, ["--workdir", str(folder)], capsys, "is not a run directory")
    assert "Hugging Face" not in err


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("config,message", [
    ({"rms_norm_eps": 0}, "config.json rms_norm_eps must be positive, got 0"),
    ({"rms_norm_eps": -1e-5}, "config.json rms_norm_eps must be positive, got -1e-05"),
    ({"rope_parameters": None, "rope_theta": -1.0}, "config.json rope_theta must be positive, got -1.0"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0.0}},
     "config.json rope_parameters.rope_theta must be positive, got 0.0"),
    ({"rope_parameters": None, "rope_theta": 0, "rms_norm_eps": -1e-5},
     "config.json rope_theta and config.json rms_norm_eps must be positive, got 0.0 and -1e-05"),
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "llama3", **LLAMA3, "factor": -8.0}},
     "config.json rope_scaling.factor must be positive, got -8.0"),
    ({"rope_parameters": {"rope_type": "llama3", **LLAMA3, "original_max_position_embeddings": 0}},
     "config.json rope_parameters.original_max_position_embeddings must be positive, got 0"),
])
def test_a_non_positive_rope_or_norm_value_is_refused_naming_only_that_key(tmp_path, capsys, config, message):
    err = refuse_import(copy_fixture(tmp_path, config=config), tmp_path, capsys)
    assert err == f"error: {message}\n"


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


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """The gqa_tied fixture imported (bos 1, eos 2 in its config.json) and converted to ggml Q8_0 by quant.convert."""
    root = tmp_path_factory.mktemp("tryout_a")
    import_folder(FIXTURES / "gqa_tied", root / "imported", log=lambda _: None)
    convert_workdir(root / "imported", root / "int8", QuantConfig(mode="serve", scheme="ggml_q8_0"),
                    log=lambda *_: None)
    return root


def gguf_field(reader, key):
    return reader.fields[key].parts[-1][0] if key in reader.fields else None


def test_gguf_export_refuses_an_existing_out_and_leaves_it_as_it_was(imported, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"precious")
    one_line_refusal(gguf_export.main, ["--workdir", str(imported / "imported"), "--out", str(out)], capsys,
                     f"--out {out} already exists")
    assert out.read_bytes() == b"precious" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_hf_export_writes_into_an_empty_folder_and_refuses_a_full_one(imported, tmp_path, capsys):
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    full.mkdir()
    (full / "notes.txt").write_text("precious")
    hf_export.main(["--workdir", str(imported / "imported"), "--out", str(empty)])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in empty.iterdir()}
    one_line_refusal(hf_export.main, ["--workdir", str(imported / "imported"), "--out", str(full)], capsys,
                     f"{full} is not empty; choose an empty --out folder")
    assert [p.name for p in full.iterdir()] == ["notes.txt"] and (full / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]  # no temporary folder left behind


def test_an_imported_run_exports_to_gguf_as_a_float_run(imported, tmp_path):
    out = gguf_export.export_workdir(imported / "imported", tmp_path / "f32.gguf", "f32", log=lambda *_: None)
    tensors = {t.name: np.asarray(t.data).reshape(t.shape[::-1]) for t in gguf.GGUFReader(out).tensors}
    params = load_run(imported / "imported").variables["params"]
    cfg = load_run(imported / "imported").config.model
    np.testing.assert_array_equal(tensors["token_embd.weight"], params["embed"]["embedding"])
    down, k = (np.asarray(params[layer][block][name]["kernel"]).T
               for layer, block, name in (("layer_1", "mlp", "down"), ("layer_0", "attn", "k")))
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"], down)
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight"], k[gguf_lib.rotary_rows(cfg.kv_heads, cfg.head_dim)])
    q8 = gguf_export.export_workdir(imported / "imported", tmp_path / "q8.gguf", "q8_0", log=lambda *_: None)
    assert {t.tensor_type for t in gguf.GGUFReader(q8).tensors if t.name.startswith("blk.0.attn_q")} == {
        gguf.GGMLQuantizationType.Q8_0}


def test_a_run_of_an_unknown_kind_is_refused_in_plain_words():
    with pytest.raises(UserError, match="a run of kind 'mystery' cannot be exported to GGUF"):
        gguf_lib.check_kind("mystery")


def test_a_converted_imported_run_keeps_its_token_ids_in_hf_and_gguf_exports(imported, tmp_path):
    export_run(imported / "int8", tmp_path / "hf", log=lambda *_: None)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == {"bos_token_id": 1,
                                                                                     "eos_token_id": 2}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    for run in ("imported", "int8"):
        reader = gguf.GGUFReader(gguf_export.export_workdir(imported / run, tmp_path / f"{run}.gguf",
                                                            log=lambda *_: None))
        assert (gguf_field(reader, "tokenizer.ggml.bos_token_id"), gguf_field(reader, "tokenizer.ggml.eos_token_id")) \
            == (1, 2)
        assert gguf_field(reader, "tokenizer.ggml.padding_token_id") is None  # pad_token_id is null in config.json


def test_token_ids_of_a_broken_lineage_are_empty_not_an_error(imported, tmp_path):
    shutil.copytree(imported / "int8", tmp_path / "int8")
    assert imported_token_ids(tmp_path / "int8") == {"bos_token_id": 1, "eos_token_id": 2}
    store = CheckpointStore(tmp_path / "int8" / "checkpoints", create=False)
    try:
        metadata = {**store.metadata(), "converted_from": str(tmp_path / "gone")}
    finally:
        store.close()
    assert imported_token_ids(tmp_path / "int8", metadata) == {}


def test_exported_and_converted_files_take_the_umask_like_any_other_file(imported, tmp_path):
    umask = os.umask(0o027)
    try:
        export_run(imported / "imported", tmp_path / "hf", log=lambda *_: None)
        gguf_export.export_workdir(imported / "imported", tmp_path / "m.gguf", log=lambda *_: None)
        convert_workdir(imported / "imported", tmp_path / "int4", QuantConfig(mode="serve", weight_bits=4),
                        log=lambda *_: None)
    finally:
        os.umask(umask)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"]
    assert len(files) > 6 and any(p.name == "model.safetensors" for p in files)
    assert {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files
            if p.stat().st_mode & 0o777 != 0o640} == {}


@pytest.mark.parametrize("tool", ["hf_export", "gguf_export", "convert", "hf_import"])
def test_an_out_below_a_file_is_refused_naming_out_not_a_temporary_folder(imported, tmp_path, capsys, tool):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / ("sub.gguf" if tool == "gguf_export" else "sub")
    main, argv = {"hf_export": (hf_export.main, ["--workdir", str(imported / "imported")]),
                  "gguf_export": (gguf_export.main, ["--workdir", str(imported / "imported")]),
                  "convert": (convert_main, ["--workdir", str(imported / "imported"), "--bits", "8"]),
                  "hf_import": (hf_import.main, [str(FIXTURES / "gqa_tied")])}[tool]
    err = one_line_refusal(main, [*argv, "--out", str(out)], capsys, f"--out {out}", f"{tmp_path / 'afile'} is a file")
    assert ".partial" not in err and ".exporting" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


@pytest.mark.parametrize("rules,message", [
    ("- {weight_bits: 8}\n", "quant.rules[0].match is missing (a regex searched in each layer's path"),
    ("- {match: lm_head}\n- {act_bits: 8}\n", "quant.rules[1].match is missing"),
    ("- {match: lm_head, weight_bits: .nan}\n",
     "quant.rules[0].weight_bits must be an integer from 2 to 8, null (keep the layer float) or left out"),
    ("- {match: lm_head, group_size: [32]}\n", "quant.rules[0].group_size must be a positive integer or left out"),
])
def test_a_bad_rules_file_is_one_line_naming_the_rule_key(imported, tmp_path, capsys, rules, message):
    (tmp_path / "rules.yaml").write_text(rules)
    one_line_refusal(convert_main, ["--workdir", str(imported / "imported"), "--out", str(tmp_path / "out"),
                                    "--bits", "8", "--rules", str(tmp_path / "rules.yaml")], capsys, message)
    assert not (tmp_path / "out").exists()


def test_a_config_rule_without_match_names_its_key():
    with pytest.raises(UserError, match=r"quant.rules\[0\].match is missing"):
        load_config("tiny", ("quant.mode=qat", "quant.rules=[{weight_bits: null}]"))


def test_embed_bits_on_a_tied_model_says_to_drop_the_flag(imported, tmp_path, capsys):
    err = one_line_refusal(convert_main, ["--workdir", str(imported / "imported"), "--out", str(tmp_path / "out"),
                                          "--bits", "8", "--embed-bits", "8"], capsys, "drop --embed-bits")
    assert "--embed-bits" in err.split(";")[0] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [(), ("--numerics", "int")])
def test_per_channel_int8_on_a_run_without_integer_layers_is_refused(imported, capsys, extra):
    one_line_refusal(generate_main, ["--workdir", str(imported / "imported"), "--max-new-tokens", "2",
                                     "--per-channel-int8", *extra], capsys,
                     "is an imported run, which has no integer layers")


@pytest.mark.parametrize("numerics", ["int", "fake", "auto"])
def test_numerics_on_a_run_without_quantized_layers_is_refused(imported, capsys, numerics):
    one_line_refusal(generate_main, ["--workdir", str(imported / "imported"), "--max-new-tokens", "2",
                                     "--numerics", numerics], capsys,
                     "--numerics chooses how quantized layers compute; ")


@pytest.mark.parametrize("command, out", [(hf_export.main, "/proc/slm-jax-export"),
                                          (convert_main, "/proc/slm-jax-int8"),
                                          (gguf_export.main, "/proc/slm-jax.gguf")], ids=["hf", "convert", "gguf"])
def test_an_output_whose_folder_cannot_be_made_names_out_not_its_temporary_sibling(imported, capsys, command, out):
    # /proc is a folder in which nothing can be made, whoever runs the suite (root included)
    extra = ["--bits", "8"] if command is convert_main else []
    err = one_line_refusal(command, ["--workdir", str(imported / "imported"), "--out", out, *extra], capsys,
                           f"--out {out} cannot be made: ")
    assert ".exporting" not in err and ".partial" not in err and " in /proc" in err


GGML_QAT = ("train.steps=4", "train.sample_tokens=0", "train.eval_every=1000", "checkpoint.every=4",
            "model.n_layers=1", "quant.mode=qat", "quant.scheme=ggml_q4_0")


def test_an_explicit_scheme_aqt_is_honoured_or_refused_never_ignored(tiny_run, tmp_path, capsys):
    qat = tiny_run(tmp_path / "qat", *GGML_QAT, lines=400).workdir
    one_line_refusal(convert_main, ["--workdir", str(qat), "--out", str(tmp_path / "out"), "--scheme", "aqt"], capsys,
                     "--scheme aqt needs --bits")
    assert not (tmp_path / "out").exists()
    parser = argparse.ArgumentParser()
    add_scheme_args(parser)
    lines = []
    convert_workdir(qat, tmp_path / "own", scheme_from_args(parser.parse_args([])), log=lines.append)
    assert lines[0].startswith("scheme: ggml_q4_0 (w4 per_group(32) float16 scales)")
    convert_workdir(qat, tmp_path / "aqt", scheme_from_args(parser.parse_args(["--scheme", "aqt", "--bits", "4"])),
                    log=lines.append)
    assert lines[2].startswith("scheme: w4 per_group(32) bfloat16 scales")
    assert load_run(tmp_path / "own").config.quant.scheme == "ggml_q4_0"
    assert load_run(tmp_path / "aqt").config.quant.scheme == "aqt"


@pytest.mark.parametrize("scheme", ["ggml_q4_0", "ggml_q8_0"])
def test_report_of_a_ggml_scheme_measures_ggmls_own_blocks(imported, scheme):
    run = load_run(imported / "imported")
    cfg, params = run.config.model, run.variables["params"]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    rows = layer_report(cfg, QuantConfig(mode="qat", scheme=scheme), params, tokens)
    aqt = layer_report(cfg, QuantConfig(mode="qat", weight_bits=ggml.BITS[scheme], granularity="per_group",
                                        scale_dtype="float16"), params, tokens)
    assert [r.layer for r in rows] == [r.layer for r in aqt] and len(rows) == 7 * cfg.n_layers  # tied: no lm_head
    for row, other in zip(rows, aqt):
        node = params
        for key in row.layer.split("/"):
            node = node[key]
        kernel = np.asarray(node["kernel"], np.float32)
        codes, d = ggml.quantize(kernel, scheme)
        reference = np.asarray(ggml.dequantize(codes, d))
        assert row.granularity == scheme
        assert (row.scale_min, row.scale_max) == (float(np.asarray(d).min()), float(np.asarray(d).max()))
        np.testing.assert_allclose(row.weight_rel_err, np.linalg.norm(kernel - reference) / np.linalg.norm(kernel),
                                   rtol=1e-6)
        if scheme == "ggml_q8_0":
            assert row.clipped == 0
        else:  # Q4_0 maps each block's largest magnitude to -8: only the other sign can pass +7.5 steps
            steps = np.asarray(kernel).reshape(codes.shape) / np.asarray(d, np.float32)[:, None, :]
            assert row.clipped == np.mean(steps > 7.5)
    assert any(row.weight_rel_err != other.weight_rel_err for row, other in zip(rows, aqt))


def test_token_ids_are_found_through_every_kind_of_parent_link(imported):
    for metadata in ({"config": {"train": {"init_from": str(imported / "imported")}}},  # fine-tuned from it
                     {"config": {"finetune": {"base": str(imported / "int8")}}},
                     {"base": {"path": str(imported / "int8")}},  # a LoRA run over its conversion
                     {"merged_from": str(imported / "int8")}):
        assert imported_token_ids(imported / "none", metadata) == {"bos_token_id": 1, "eos_token_id": 2}, metadata
    assert imported_token_ids(imported / "none", {"config": {"train": {"init_from": None}}}) == {}
