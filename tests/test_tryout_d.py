"""Faults found by a first-time user's tryout (session 17, A): each test pins the corrected behaviour against an
independent reference (Hugging Face `tokenizers`, gguf's reader, numpy) or a known value."""
import dataclasses
import json
import shutil
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, processors

from checkpoints.gguf_export import main as export_main
from checkpoints.hf_export import export_run
from checkpoints.hf_import import import_folder
from checkpoints.gguf_vocab import bpe_vocab, special_affixes
from quant.config import QuantConfig, QuantRule
from quant.lora_merge import merge_adapters
from quant.merge import merge_workdir
from quant.plan import activation_quantization
from quant.ptq_methods import PTQSettings, check_method
from quant.report import report_workdir
from quant.serving import dequantize, quantized_weights
from slm_jax.errors import UserError
from train.config import load_config
from train.evaluation import format_table
from train.generate import main as generate_main
from train.loop import run_training
from train.ptq import convert_workdir, serving_quant_config
from train.run import load_run
from train.tokenizer import ByteTokenizer, HFTokenizer

ROOT = Path(__file__).resolve().parent.parent
HF_TOKENIZER = ROOT / "tests" / "fixtures" / "hf" / "gqa_tied" / "tokenizer.json"
QUIET = dict(log=lambda *_: None)
INT4 = QuantConfig(mode="serve", weight_bits=4, granularity="per_group")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run):
    """A tiny float run that sets quant.kv_bits: 8 and its INT4 (g32), INT8 and W8A8 serving conversions, made once
    for the module (tests read them, never write into them)."""
    root = tmp_path_factory.mktemp("tryout_d")
    trained = tiny_run(root / "float", "train.steps=4", "checkpoint.every=4", "train.eval_every=100",
                       "train.sample_tokens=0", "quant.kv_bits=8")
    for name, quant in (("int4", INT4), ("int8", QuantConfig(mode="serve", weight_bits=8)),
                        ("w8a8", QuantConfig(mode="serve", weight_bits=8, act_bits=8))):
        convert_workdir(trained.workdir, root / name, quant, **QUIET)
    return dataclasses.make_dataclass("Runs", ["root", "trained"])(root, trained)


def test_gguf_vocabulary_keeps_added_tokens_beyond_the_bpe_model_at_their_ids():
    # Tokens added to a tokenizer.json after training (chat markers, a user's words) get ids after the BPE model's
    # vocabulary and are listed only under added_tokens; they were written as unused "[PAD300]" tokens, so llama.cpp
    # split "<|im_start|>" into bytes and printed id 300 as "[PAD300]".
    tokenizer = Tokenizer.from_file(str(HF_TOKENIZER))
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer.add_tokens(["ROMEO"])
    vocab = bpe_vocab(json.loads(tokenizer.to_str()))
    assert len(vocab.tokens) == tokenizer.get_vocab_size(with_added_tokens=True) == 303
    assert vocab.tokens == [tokenizer.id_to_token(i) for i in range(303)]
    ids = tokenizer.encode("<|im_start|>ROMEO<|im_end|>").ids
    assert [vocab.tokens[i] for i in ids] == ["<|im_start|>", "ROMEO", "<|im_end|>"]
    assert vocab.types[300:] == [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED]
    assert set(vocab.types[:300]) == {gguf.TokenType.NORMAL}


def test_converting_a_run_with_an_int8_kv_cache_keeps_it(runs):
    # quant.kv_bits: 8 on a float run is honoured by train.generate; `quant.convert --bits 4` built a fresh scheme
    # without it, so the serving run silently generated with a float cache.
    assert load_run(runs.trained.workdir).config.quant.kv_bits == 8
    assert all(load_run(runs.root / name).config.quant.kv_bits == 8 for name in ("int4", "int8", "w8a8"))
    source = load_run(runs.trained.workdir).config
    assert serving_quant_config(source, QuantConfig(mode="serve", weight_bits=8, kv_bits=None)).kv_bits == 8


def test_comparison_table_shows_a_small_kl_rather_than_zero():
    # A W8A8 conversion's KL to its parent (about 1e-5 nats) printed as 0.0000, the same as an identical model,
    # so two methods could not be told apart in quant.convert's and train.evaluate's table.
    row = {"workdir": "runs/w8a8", "step": 1, "quant": "serve", "loss": 2.0, "perplexity": 7.389,
           "bits_per_char": 3.0, "param_bytes": 1000, "val_windows": "1 batch", "kl_mean": 8.072e-06,
           "kl_p99": 3.35e-05, "top1": 0.9977}
    line = format_table([row, {**row, "workdir": "runs/w4", "kl_mean": 0.0123, "kl_p99": 0.0, "top1": 0.9}])
    w8a8, w4 = line.splitlines()[2:4]
    assert w8a8.split()[-3:] == ["8.07e-06", "3.35e-05", "99.77%"]
    assert w4.split()[-3:] == ["0.0123", "0.0000", "90.00%"]
    assert len(w8a8) == len(w4)


def template_tokenizer(single: str, specials=("<s>", "</s>")) -> Tokenizer:
    """The Hugging Face fixture's byte-level BPE with `specials` added and a TemplateProcessing post-processor."""
    tokenizer = Tokenizer.from_file(str(HF_TOKENIZER))
    tokenizer.add_special_tokens(list(specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(token, tokenizer.token_to_id(token)) for token in specials])
    return tokenizer


def test_gguf_says_add_bos_and_add_eos_when_the_runs_tokenizer_adds_them(tmp_path, tiny_run):
    # train.generate encodes a prompt with its tokenizer's special tokens ("<s> ROMEO:" under a TemplateProcessing
    # "<s> $A </s>"), but the export always wrote add_bos_token false and no bos id, so llama.cpp fed the model the
    # prompt without them.
    tokenizer = template_tokenizer("<s> $A </s>")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    run = tiny_run(tmp_path / "run", "train.steps=2", "checkpoint.every=2", "train.eval_every=100",
                   "train.sample_tokens=0", f"data.tokenizer={tmp_path / 'tokenizer.json'}").workdir
    export_main(["--workdir", str(run), "--out", str(tmp_path / "model.gguf")])
    fields = gguf.GGUFReader(tmp_path / "model.gguf").fields
    value = lambda key: fields[key].contents()
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    prompt = [int(i) for i in load_run(run).tokenizer.encode("ROMEO:", add_special_tokens=True)]
    assert prompt == [bos, *tokenizer.encode("ROMEO:", add_special_tokens=False).ids, eos]
    assert value("tokenizer.ggml.add_bos_token") is True and value("tokenizer.ggml.bos_token_id") == bos
    assert value("tokenizer.ggml.add_eos_token") is True and value("tokenizer.ggml.eos_token_id") == eos


def test_special_affixes_of_tokenizers_without_them_and_with_more_than_llama_cpp_can_add():
    plain = HFTokenizer(HF_TOKENIZER.read_text())
    assert special_affixes(plain) == {"bos": None, "eos": None} and special_affixes(ByteTokenizer()) == {
        "bos": None, "eos": None}
    with pytest.raises(UserError, match="one token before a text"):
        special_affixes(HFTokenizer(template_tokenizer("<s> </s> $A").to_str()))


def test_exports_say_when_they_drop_the_runs_activation_quantization(tmp_path, runs):
    # A W8A8 serving run exported to Hugging Face became a float-activation model without a word: its logits differ
    # from the run's (and from what train.evaluate measured).
    for name in ("w8a8", "int8"):
        printed = []
        export_run(runs.root / name, tmp_path / f"hf_{name}", "f32", log=printed.append)
        notes = [line for line in printed if line.startswith("note:") and "end-of-text" not in line]
        assert notes == ([f"note: {runs.root / name} computes with int8 activations (quant.act_bits), which a "
                          f"Hugging Face Llama folder cannot express: the export holds its weights and computes "
                          f"activations in float, so its outputs differ slightly from the run's"]
                         if name == "w8a8" else [])
    model = load_run(runs.trained.workdir).config.model
    rules = [QuantRule(match="mlp/", act_bits=4)]
    assert activation_quantization(model, QuantConfig(mode="qat", weight_bits=8, act_bits=8, rules=rules)) == \
        "int4/int8 activations (quant.act_bits)"
    assert activation_quantization(model, QuantConfig(mode="qat", weight_bits=4)) is None
    assert activation_quantization(model, QuantConfig(mode="none")) is None


def test_import_of_a_tokenizer_with_more_ids_than_the_model_names_config_json(tmp_path):
    # The refusal was train.config's "model.vocab_size=300 is smaller than the tokenizer's 303 ids
    # (data.tokenizer=...); leave model.vocab_size unset", advice about keys an import has no way to set.
    folder = tmp_path / "hf"
    shutil.copytree(HF_TOKENIZER.parent, folder)
    tokenizer = Tokenizer.from_file(str(HF_TOKENIZER))
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|pad|>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    with pytest.raises(UserError) as refused:
        import_folder(folder, tmp_path / "run", log=lambda *_: None)
    assert str(refused.value) == (f"{folder / 'tokenizer.json'} has 303 ids (added tokens included) but config.json "
                                  f"vocab_size is 300: the model has no embedding row for ids 300 and up; use the "
                                  f"tokenizer.json that came with the model")
    assert not (tmp_path / "run").exists()


def test_merge_keeps_untouched_layers_bit_for_bit_and_carries_an_adapter_of_two_int4_steps(runs):
    # quant.merge re-quantized base + adapters with AQT's round-to-nearest, whose abs-max scale sits half a step
    # beyond the largest code: every dequantized INT4 weight came back 7/7.5 of itself, layers without an adapter
    # too, and a trained tiny model's merge kept 0% of the LoRA run's gain (merged 2.9438 vs base 2.9215, adapters
    # 2.8983; with the base's grid kept: 2.8997).
    run = load_run(runs.root / "int4")
    base = quantized_weights(run.variables["aqt"])
    q = ("layer_0", "attn", "q")
    kernel = dequantize(base[q]["value"], base[q]["scale"])
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(kernel.shape[0], 2)), rng.normal(size=(2, kernel.shape[1]))
    steps = np.asarray(base[q]["scale"], np.float32).reshape(-1, kernel.shape[1])  # [groups, out]
    b *= 2 * np.median(steps) / np.abs(a @ b).max()  # the adapter moves weights by up to two INT4 steps
    params = {**run.variables["params"]}
    params["layer_0"] = {**params["layer_0"], "attn": {**params["layer_0"].get("attn", {}), "q": {
        "lora": {"lora_a": a.astype(np.float32), "lora_b": b.astype(np.float32)}}}}  # serving params hold no kernel
    merged, rows = merge_adapters(run.config.model, run.config.quant, {**run.variables, "params": params}, alpha=2.0)
    stored = quantized_weights(merged["aqt"])
    for path, weights in base.items():
        if path != q:
            for key in ("value", "scale"):
                np.testing.assert_array_equal(np.asarray(stored[path][key]), np.asarray(weights[key]),
                                              err_msg=f"{path} {key}")
    target = kernel + a.astype(np.float32) @ b.astype(np.float32)
    got = dequantize(stored[q]["value"], stored[q]["scale"])
    assert np.linalg.norm(got - kernel - (target - kernel)) < 0.6 * np.linalg.norm(target - kernel)
    assert [row.layer for row in rows] == ["layer_0/attn/q"] and rows[0].delta_lost < 0.6


def test_report_on_a_merged_run_measures_it_against_base_plus_adapters(tmp_path, runs):
    # quant.report refused a LoRA run with "merge it first (python -m quant.merge) and report on the merged run",
    # then refused the merged run: "a serving run with no record of the float run it came from".
    trained, quiet = runs.trained, QUIET
    run_training(load_config("tiny", (f"data.path={trained.corpus}", f"data.cache_dir={trained.cache}",
                                      "finetune.method=lora", f"finetune.base={runs.root / 'int4'}",
                                      "finetune.lora_targets=attn/q", "train.steps=3", "checkpoint.every=3",
                                      "train.eval_every=100", "train.sample_tokens=0")), tmp_path / "lora", **quiet)
    with pytest.raises(UserError, match="merge it first"):
        report_workdir(tmp_path / "lora", None, 2, 0)
    merge_workdir(tmp_path / "lora", tmp_path / "merged", batches=1, batch_size=2, **quiet)
    lines = report_workdir(tmp_path / "merged", None, 2, 0).splitlines()
    assert lines[0].startswith(f"{tmp_path / 'merged'} (weights of {(tmp_path / 'lora').resolve()} merged, step 3)")
    rel_err = {line.split()[0]: float(line.split()[8]) for line in lines[3:] if line.startswith("layer_")}
    assert "w SQNR dB  w rel err" in lines[1] and len(rel_err) == 14  # columns: ... clipped, w SQNR dB, w rel err
    assert all(err == 0 for layer, err in rel_err.items() if layer.endswith("/k") or layer.endswith("/o"))
    assert all(0 < rel_err[f"layer_{i}/attn/q"] < 0.3 for i in (0, 1))  # the adapted layers were re-quantized


def test_calibration_windows_may_reach_an_imported_models_context_beyond_its_training_window(tmp_path):
    # An imported model attends over max_position_embeddings (128 here) whatever its training window (--seq-len
    # 64); GPTQ calibration on 100-token windows was refused as "longer than the model's context (model.seq_len
    # 64)".
    import_folder(HF_TOKENIZER.parent, tmp_path / "gqa", seq_len=64, **QUIET)
    model = load_run(tmp_path / "gqa").config.model
    assert (model.seq_len, model.context) == (64, 128)
    quant = QuantConfig(mode="serve", weight_bits=4, granularity="per_group")
    check_method(model, quant, "gptq", np.zeros((2, 128), np.int32), PTQSettings())
    with pytest.raises(UserError) as refused:
        check_method(model, quant, "gptq", np.zeros((2, 129), np.int32), PTQSettings())
    assert str(refused.value) == "--calib-seq-len 129 is longer than the model's context (model.max_context 128)"


def test_generate_reads_a_prompt_up_to_an_imported_models_context_not_its_training_window(tmp_path, capsys):
    # train.generate kept the last model.seq_len (64) prompt tokens of a model imported with --seq-len 64 whose
    # context is 128, saying "the model sees its last 64 (its context)".
    import_folder(HF_TOKENIZER.parent, tmp_path / "gqa", seq_len=64, **QUIET)
    run = load_run(tmp_path / "gqa")
    prompt = "ROMEO: hello there, fair sir. " * 4
    ids = [int(i) for i in run.tokenizer.encode(prompt, add_special_tokens=True)]
    assert 64 < len(ids) <= 110
    forward = jax.jit(lambda x: run.model.apply(run.variables, x)[0])
    for _ in range(6):  # greedy decoding by full forward passes over the whole prompt: the reference
        ids.append(int(np.argmax(np.asarray(forward(jnp.asarray([ids], jnp.int32)))[0, -1])))
    capsys.readouterr()
    generate_main(["--workdir", str(tmp_path / "gqa"), "--prompt", prompt, "--max-new-tokens", "6",
                   "--temperature", "0", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert "the model sees its last" not in out
    assert out.splitlines()[0] == prompt + run.tokenizer.decode(np.asarray(ids[-6:]))


def test_per_channel_int8_is_refused_for_a_serving_run_with_no_layer_it_would_change(runs, capsys):
    # train.generate --per-channel-int8 on a per-channel INT8 (or ggml) serving run was silently ignored.
    args = ["--per-channel-int8", "--numerics", "int", "--max-new-tokens", "2", "--temperature", "0"]
    with pytest.raises(SystemExit) as exited:
        generate_main(["--workdir", str(runs.root / "int8"), *args])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("error: --per-channel-int8 re-quantizes a serving run's "
                                                     "weight-only per-group (INT4) layers;") and "has none" in err
    assert len(err.strip().splitlines()) == 1
    generate_main(["--workdir", str(runs.root / "int4"), *args])  # INT4 groups: served re-quantized, as before
    assert "tokens in" in capsys.readouterr().out
