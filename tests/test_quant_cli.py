"""`python -m quant.convert` and `python -m quant.report` on real (tiny) runs: what they write and print, and their
one-line errors."""
import argparse
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.manager import CheckpointStore, with_metadata_checksum
from quant.config import QuantConfig
from quant.convert import main as convert_main
from quant.report import main as report_main
from quant.serving import quantized_weights
from slm_jax.attention import serving_cache_dtype
from slm_jax.errors import UserError
from train.cli import add_scheme_args, scheme_from_args
from train.config import load_config
from train.evaluation import evaluate_workdir
from train.ptq import convert_workdir
from train.run import load_run, served_run

TINY = ("train.steps=12", "train.sample_tokens=0", "train.eval_every=1000", "checkpoint.every=12", "model.n_layers=1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run):
    root = tmp_path_factory.mktemp("quant_cli")
    corpus = dict(lines=800, tail=", and so on")
    tiny_run(root / "float", *TINY, **corpus)
    tiny_run(root / "qat", *TINY, *(f"model.{k}={v}" for k, v in load_config("tiny").model.__dict__.items()
                                    if k in ("seq_len", "n_heads", "d_model")), config="int8_qat", **corpus)
    return root


def stored_arrays(workdir):
    store = CheckpointStore(workdir / "checkpoints", create=False)
    try:
        return {a.path: a for a in store.arrays()}
    finally:
        store.close()


def test_convert_float_run_to_int4_keeps_only_integer_kernels_and_prints_the_comparison(runs, capsys, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {match: lm_head, weight_bits: null}\n")
    convert_main(["--workdir", str(runs / "float"), "--out", str(tmp_path / "int4"), "--bits", "4",
                  "--embed-bits", "8", "--scale-dtype", "bfloat16", "--rules", str(rules)])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("scheme: w4 per_group(32) bfloat16 scales, activations float, embedding int8, "
                                   "lm_head float; 1 rule(s) change 1 of 9 matmuls")
    assert "converted" in out and "val loss" in out and str(tmp_path / "int4") in out
    arrays = stored_arrays(tmp_path / "int4")
    kernels = {p: a for p, a in arrays.items() if p.endswith("/kernel")}
    values = {p: a for p, a in arrays.items() if p.endswith("/value")}
    assert set(kernels) == {"params/lm_head/kernel"}  # the rule kept it float; no other float kernel is stored
    assert "params/embed/embedding" not in arrays  # the table is stored as int8 only
    assert str(arrays["aqt/embed/dot_general/aqt/qrhs/value"].dtype) == "int8"
    assert all(str(a.dtype) == "int4" for p, a in values.items() if "embed" not in p)
    assert all(str(a.dtype) == "bfloat16" for p, a in arrays.items() if p.startswith("aqt/") and p.endswith("/scale"))
    run = load_run(tmp_path / "int4")
    assert run.metadata["kind"] == "serving" and run.config.quant.granularity == "per_group"
    assert run.metadata["quant_plan"]["lm_head"] is None  # float in the saved plan
    assert run.metadata["quant_plan"]["layer_0/mlp/up"]["weight_bits"] == 4


@pytest.mark.parametrize("flags, config", [(["--bits", "4", "--embed-bits", "8"], "ptq_int4"),
                                           (["--bits", "8", "--act-bits", "8", "--embed-bits", "8"], "ptq_int8")])
def test_convert_flags_the_readme_gives_make_the_ptq_configs_scheme(flags, config):
    parser = argparse.ArgumentParser()
    add_scheme_args(parser)
    fields = ("mode", "weight_bits", "act_bits", "granularity", "group_size", "embed_bits", "scale_dtype", "rules")
    expected = load_config(config).quant
    assert [getattr(scheme_from_args(parser.parse_args(flags)), f) for f in fields] == \
           [getattr(expected, f) for f in fields]


@pytest.mark.parametrize("flags, message", [
    (["--bits", "8", "--group-size", "16"], "--group-size sets per-group scales; --bits 8 quantizes per_channel here "
                                            "(give --granularity per_group with it)"),
    (["--bits", "4", "--granularity", "per_channel", "--group-size", "16"],
     "--group-size sets per-group scales; --bits 4 quantizes per_channel here (give --granularity per_group with it)"),
    (["--group-size", "16"], "--act-bits, --granularity, --group-size, --rules, --embed-bits and --scale-dtype "
                             "refine a scheme: give --bits too")])
def test_a_group_size_that_would_be_ignored_is_refused(flags, message):
    parser = argparse.ArgumentParser()
    add_scheme_args(parser)
    with pytest.raises(UserError) as refused:
        scheme_from_args(parser.parse_args(flags))
    assert str(refused.value) == message
    assert scheme_from_args(parser.parse_args(["--bits", "4", "--group-size", "16"])).group_size == 16
    assert scheme_from_args(parser.parse_args(["--bits", "4"])).group_size == 32


def test_convert_defaults_and_the_scheme_line_for_8_bits_weight_only(runs, capsys, tmp_path):
    convert_main(["--workdir", str(runs / "float"), "--out", str(tmp_path / "int8"), "--bits", "8"])
    assert capsys.readouterr().out.splitlines()[0] == ("scheme: w8 per_channel float32 scales, activations float, "
                                                       "embedding float, lm_head int8")
    arrays = stored_arrays(tmp_path / "int8")
    assert {str(a.dtype) for p, a in arrays.items() if p.startswith("aqt/") and p.endswith("/scale")} == {"float32"}
    assert load_run(tmp_path / "int8").config.quant.act_bits is None


def test_converting_a_qat_run_reuses_its_scheme_and_serves_its_loss(runs, tmp_path):
    convert_main(["--workdir", str(runs / "qat"), "--out", str(tmp_path / "served")])
    qat, served = (evaluate_workdir(w, 4, 8) for w in (runs / "qat", tmp_path / "served"))
    assert load_run(tmp_path / "served").config.quant.act_bits == 8  # int8_qat is w8a8
    np.testing.assert_allclose(served["loss"], qat["loss"], rtol=1e-4)
    assert served["param_bytes"] < 0.5 * qat["param_bytes"]


def table_rows(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    end = lines.index("", start)  # the legend follows the table after a blank line
    return {line.split()[0]: line.split() for line in lines[start + 2:end]}


def test_report_lists_every_quantized_layer_with_scales_clipping_and_error(runs, capsys, tmp_path):
    report_main(["--workdir", str(runs / "qat")])
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert out.rstrip().splitlines()[-1].startswith("clipped: share of the layer's weights beyond the largest")
    expected = {f"layer_0/{m}/{p}" for m, ps in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for p in ps}
    assert expected <= set(rows)
    assert rows["embed"][1:4] == ["int8", "float", "per_channel"]  # int8_qat quantizes the embedding table too
    for name, cells in rows.items():
        _, w, a, _, scale_min, scale_max, clipped, w_sqnr, w_err, out_sqnr, out_err, kl = cells
        assert (w, a) == ("int8", "float" if name == "embed" else "int8")
        assert 0 < float(scale_min) <= float(scale_max) and 0 <= float(clipped.rstrip("%")) < 5
        assert float(w_sqnr) > 30 and 0 < float(w_err) < 0.05 and float(out_sqnr) > 20  # int8: ~40 dB weights
        assert 0 <= float(kl) < 0.05  # int8 weights of one layer barely move the model
    convert_main(["--workdir", str(runs / "float"), "--out", str(tmp_path / "int4"), "--bits", "4"])
    assert capsys.readouterr().out.splitlines()[0].startswith("scheme: w4 per_group(32) bfloat16 scales")
    assert {str(a.dtype) for p, a in stored_arrays(tmp_path / "int4").items()  # bfloat16 by default, as ptq_int4
            if p.startswith("aqt/") and p.endswith("/scale")} == {"bfloat16"}
    report_main(["--workdir", str(tmp_path / "int4")])  # a serving run: measured against its float source
    int4 = table_rows(capsys.readouterr().out)
    assert all(cells[1] == "int4" and cells[3] == "per_group(32)" for cells in int4.values())
    assert np.mean([float(c[7]) for c in int4.values()]) < np.mean([float(c[7]) for c in rows.values()]) - 10


def test_report_of_an_all_float_conversion_is_one_line_not_an_empty_table(runs, tmp_path, capsys):
    all_float = QuantConfig(mode="serve", weight_bits=None, act_bits=None, embed_bits=None)
    convert_workdir(runs / "float", tmp_path / "float_params", all_float, log=lambda *_: None)
    with pytest.raises(SystemExit) as exit_info:
        report_main(["--workdir", str(tmp_path / "float_params")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0] == (f"error: {tmp_path / 'float_params'}: its scheme quantizes no layer (weights, activations and "
                      f"the embedding table all float), so there is nothing to report; report on a quantized run, or "
                      f"on a float run with --bits N")


def test_a_float_run_given_no_scheme_is_told_what_each_command_needs_in_its_own_words(runs, tmp_path, capsys):
    """convert needs a scheme to convert to; report converts nothing: it needs a scheme to measure at. Both share
    the scheme flags, whose own refusal speaks of neither command."""
    float_run = runs / "float"
    for main, args, line in (
            (report_main, [], f"error: {float_run} is a float run: report measures it at a scheme you give; add "
                              f"--bits N (e.g. --bits 4) or --scheme ggml_q8_0 or ggml_q4_0"),
            (convert_main, ["--out", str(tmp_path / "out")],
             "error: a float run needs a quantization scheme to convert to (e.g. --bits 8)"),
            (report_main, ["--scheme", "aqt"], "error: --scheme aqt needs --bits (e.g. --scheme aqt --bits 4); "
                                               "without --scheme, a QAT run keeps the scheme it trained with")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--workdir", str(float_run), *args])
        captured = capsys.readouterr()
        assert (exit_info.value.code, captured.err.splitlines(), captured.out) == (2, [line], "")


@pytest.mark.parametrize("args, message", [
    (["--bits", "9"], "argument --bits: must be an integer from 2 to 8, got 9"),  # refused by argparse's type
    ([], "a float run needs a quantization scheme to convert to"),
    (["--granularity", "per_group"], "give --bits too"),
    (["--scale-dtype", "bfloat16"], "give --bits too"),
])
def test_bad_conversions_are_one_line_errors_and_write_nothing(runs, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--workdir", str(runs / "float"), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    # one error line, at parse time too (no usage block), never a traceback
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("error: ")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_convert_never_writes_into_its_source_or_an_existing_run(runs, capsys):
    for out, message in ((runs / "float", "--out must differ from --workdir"),
                         (runs / "qat", "already holds checkpoints; choose an empty --out folder")):
        before = sorted(p.name for p in (out / "checkpoints").iterdir())
        with pytest.raises(SystemExit):
            convert_main(["--workdir", str(runs / "float"), "--out", str(out), "--bits", "8"])
        assert message in capsys.readouterr().err
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_generate_and_evaluate_read_qat_serving_and_float_runs(runs, capsys, tmp_path):
    from train.evaluate import main as evaluate_main
    from train.generate import main as generate_main
    convert_main(["--workdir", str(runs / "qat"), "--out", str(tmp_path / "served")])
    capsys.readouterr()
    for workdir in (runs / "qat", tmp_path / "served"):
        generate_main(["--workdir", str(workdir), "--prompt", "SPEAKER1:", "--max-new-tokens", "24", "--seed", "1"])
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith("SPEAKER1:") and f"step 12 of {workdir}" in out[-1]
        assert len("\n".join(out[:-1])) >= len("SPEAKER1:") + 12  # bytes may merge into multi-byte chars
    cache_lines = {}
    for flags in ((), ("--kv-bits", "8")):  # the KV cache in the compute dtype, then int8 with a scale per head
        generate_main(["--workdir", str(tmp_path / "served"), "--prompt", "SPEAKER1:", "--max-new-tokens", "24",
                       "--seed", "1", "--verbose", *flags])
        cache_lines[flags] = capsys.readouterr().out.splitlines()[0]
    served = load_run(tmp_path / "served").config.model
    slots = min(served.context, len("SPEAKER1:") + 24)  # the cache holds at most the context
    held = jnp.dtype(serving_cache_dtype(jnp.bfloat16))  # float32 on CPU, where XLA has no bfloat16 arithmetic
    float_bytes = 2 * served.n_layers * slots * served.kv_heads * served.head_dim * held.itemsize  # k, v
    int8_bytes = 2 * served.n_layers * slots * served.kv_heads * (served.head_dim + held.itemsize)  # int8 + a scale
    assert cache_lines[()] == (f"[KV cache: {held.name} (compute bfloat16), {slots} slots x 1 sample(s), "
                               f"{float_bytes:,} bytes]")
    assert cache_lines[("--kv-bits", "8")] == (f"[KV cache: int8 with {held.name} scales (compute bfloat16), {slots} "
                                               f"slots x 1 sample(s), {int8_bytes:,} bytes]")
    evaluate_main(["--workdir", str(runs / "float"), "--workdir", str(runs / "qat"), "--workdir",
                   str(tmp_path / "served"), "--batches", "2", "--batch-size", "4"])
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in table[2:5]] == ["none", "qat", "serve"]
    assert table[5] == "val loss over 2 batches x 4 windows x 32 tokens of each run's validation split"
    param_mb = [float(line.split()[6]) for line in table[2:5]]  # then KL columns (vs the served run's parent)
    assert param_mb[2] < 0.4 * param_mb[1] and param_mb[0] == param_mb[1]


def set_config_kv_bits(workdir, bits) -> None:
    """Make the run's saved config say quant.kv_bits: `bits`, as training with `--set quant.kv_bits=8` would have
    (the KV cache's bits change generation only, not training), its metadata's CRC-32 made anew as a save does."""
    path = next((workdir / "checkpoints").glob("*/metadata/metadata"))
    metadata = json.loads(path.read_text())
    metadata["config"]["quant"]["kv_bits"] = bits
    path.write_text(json.dumps(with_metadata_checksum(metadata)))


def test_kv_bits_none_generates_a_run_whose_config_sets_an_int8_cache_with_a_float_one(runs, capsys, tmp_path):
    from train.generate import main as generate_main
    shutil.copytree(runs / "float", tmp_path / "kv8")
    set_config_kv_bits(tmp_path / "kv8", 8)
    greedy = ["--prompt", "SPEAKER1:", "--max-new-tokens", "12", "--temperature", "0", "--verbose"]
    printed = {}
    for name, workdir, flags in (("config int8", tmp_path / "kv8", []), ("config float", runs / "float", []),
                                 ("none", tmp_path / "kv8", ["--kv-bits", "none"])):
        generate_main(["--workdir", str(workdir), *greedy, *flags])
        printed[name] = capsys.readouterr().out.splitlines()  # the cache line, the samples, a line of timings
    assert printed["config int8"][0].startswith("[KV cache: int8 with ")  # the run's config is honoured by default
    assert printed["config float"][0].startswith("[KV cache: ") and "int8" not in printed["config float"][0]
    assert printed["none"][0] == printed["config float"][0]  # the compute dtype, the same slots and bytes
    assert printed["none"][1:-1] == printed["config float"][1:-1] and len(printed["none"]) > 2


def test_a_run_whose_metadata_was_edited_by_hand_is_refused_in_one_line_naming_the_step(runs, capsys, tmp_path):
    from train.generate import main as generate_main
    shutil.copytree(runs / "float", tmp_path / "edited")
    path = tmp_path / "edited" / "checkpoints" / "12" / "metadata" / "metadata"
    metadata = json.loads(path.read_text())
    metadata["config"]["model"]["d_model"] *= 2  # a model other than the one saved: its arrays would not fit it
    path.write_text(json.dumps(metadata))
    with pytest.raises(SystemExit) as exited:
        generate_main(["--workdir", str(tmp_path / "edited"), "--max-new-tokens", "4"])
    err = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: checkpoint {(tmp_path / 'edited').resolve()}/checkpoints/12 is damaged: its "
                             f"metadata differs from the CRC-32 recorded when it was saved"), err


def test_converting_into_a_workdir_that_holds_a_float_run_names_it_a_float_run(runs, capsys, tmp_path):
    from train.main import main as train_main
    shutil.copytree(runs / "float", tmp_path / "float")
    with pytest.raises(SystemExit) as stop:  # e.g. --config ptq_int4 --workdir runs/baseline
        train_main(["--config", "ptq_int4", "--set", f"train.init_from={runs / 'float'}",
                    "--workdir", str(tmp_path / "float")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'float'} already holds a float run, not a serving run: convert into a new " \
                  f"--workdir"
    assert load_run(tmp_path / "float").metadata["kind"] == "train"


def test_serving_numerics_are_chosen_when_serving_not_by_converting_again(runs, capsys, tmp_path):
    """A ptq_int4 run serves its exact codes with `int` numerics too (bit for bit the fake-served logits up to the
    hi/lo split), or re-quantized per channel when asked; train.generate chooses both, and converting again into
    the same workdir from another run or with other quant settings is refused instead of keeping the old run
    without a word."""
    from train.generate import main as generate_main
    from train.main import main as train_main
    ptq = ["--config", "ptq_int4", "--set", f"train.init_from={runs / 'float'}", "--set", "train.eval_batches=2",
           "--workdir", str(tmp_path / "int4")]
    train_main(ptq)
    train_main(ptq)  # the same settings again: kept, evaluated again
    assert "already holds the converted model" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        train_main([*ptq, "--set", "quant.numerics=fake"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quant.numerics='int' (asked 'fake')" in err
    shutil.copytree(runs / "float", tmp_path / "other")  # the same settings from another run: refused as well
    with pytest.raises(SystemExit) as stop:
        train_main([*ptq[:3], f"train.init_from={tmp_path / 'other'}", *ptq[4:]])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"converted from {(runs / 'float').resolve()}, not from" in err

    run = load_run(tmp_path / "int4")
    tokens = np.random.default_rng(0).integers(0, run.config.model.vocab_size, (1, 12)).astype(np.int32)
    logits = {}
    for name, serving in (("fake", {"numerics": "fake"}), ("int", {}),  # ptq_int4 serves with int numerics
                          ("channel", {"serve_per_channel_int8": True})):
        served = served_run(run, **serving)
        assert served.config.quant.numerics == serving.get("numerics", "int")
        stored = quantized_weights(served.variables["aqt"])
        dims = {w["value"].ndim for path, w in stored.items() if path[-1] != "embed"}
        assert dims == ({2} if name == "channel" else {3})  # per channel [in, out] / per group [g, size, out]
        logits[name] = np.asarray(served.model.apply(served.variables, tokens)[0], np.float32)
    spread = logits["fake"].max() - logits["fake"].min()
    # 12 rows: the per-group layers serve the dequantized matmul either way; the int8 embedding's rows are rescaled
    # in float32 with int numerics and in its bfloat16 scale's dtype with fake, as AQT does (quant.embedding;
    # measured 1.2e-3 of the spread, 0 with embed_bits null); re-quantizing per channel adds its own
    # 1/254-of-a-column error (measured 2.4e-3)
    np.testing.assert_allclose(logits["int"], logits["fake"], atol=5e-3 * spread)
    assert np.abs(logits["channel"] - logits["fake"]).max() <= 0.02 * spread
    with pytest.raises(UserError, match="change how a run is served"):
        served_run(run, weight_bits=8)

    generate_main(["--workdir", str(tmp_path / "int4"), "--max-new-tokens", "8", "--numerics", "int",
                   "--per-channel-int8", "--prompt", "SPEAKER1:"])
    assert capsys.readouterr().out.startswith("SPEAKER1:")
    # the compute dtype is a serving choice too: the same stored codes, float32 activations and KV cache
    bf16 = served_run(run, "bf16")
    assert run.model.dtype == jnp.float32 and bf16.model.dtype == jnp.bfloat16 and bf16.config.train.precision == "bf16"
    np.testing.assert_allclose(np.asarray(bf16.model.apply(bf16.variables, tokens)[0], np.float32), logits["fake"],
                               atol=0.05 * spread)
    generate_main(["--workdir", str(tmp_path / "int4"), "--max-new-tokens", "8", "--precision", "bf16", "--verbose"])
    assert "(compute bfloat16)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        generate_main(["--workdir", str(tmp_path / "int4"), "--max-new-tokens", "8", "--numerics", "fake",
                       "--per-channel-int8"])
    assert stop.value.code == 2 and "--numerics int" in capsys.readouterr().err


def test_ptq_from_a_missing_run_names_train_init_from(tmp_path, capsys):
    from train.main import main as train_main
    with pytest.raises(SystemExit) as stop:
        train_main(["--config", "ptq_int4", "--set", f"train.init_from={tmp_path / 'nothing'}",
                    "--workdir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: train.init_from: ") and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_ptq_honours_train_precision_and_names_the_overrides_it_ignores(runs, capsys, tmp_path):
    """`--set train.precision=bf16` when making a serving run sets its compute dtype (the source trained in float32);
    an override PTQ does not read (train.steps) is named in one note line instead of dropped without a word; and
    converting again into that run with another precision is refused like other settings."""
    from train.main import main as train_main
    ptq = ["--config", "ptq_int8", "--set", f"train.init_from={runs / 'float'}", "--set", "train.eval_batches=2",
           "--set", "train.steps=7", "--workdir", str(tmp_path / "int8")]
    assert load_run(runs / "float").config.train.precision == "fp32"
    train_main([*ptq, "--set", "train.precision=bf16"])
    out = capsys.readouterr().out
    assert "note: post-training quantization converts train.init_from as it was trained; train.steps do(es) not " \
           "apply" in out
    served = load_run(tmp_path / "int8")
    assert served.config.train.precision == "bf16" and served.model.dtype == jnp.bfloat16
    with pytest.raises(SystemExit) as stop:
        train_main([*ptq, "--set", "train.precision=fp32"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.precision='bf16' (asked 'fp32')" in err


def test_generate_says_when_the_prompt_is_longer_than_the_context(runs, capsys):
    from train.generate import main as generate_main
    seq_len = load_run(runs / "float").config.model.seq_len
    generate_main(["--workdir", str(runs / "float"), "--prompt", "x" * (seq_len + 5), "--max-new-tokens", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"[prompt: {seq_len + 5} tokens; the model sees its last {seq_len} (its context)]"
    assert lines[1].startswith("x" * (seq_len + 5))
    generate_main(["--workdir", str(runs / "float"), "--prompt", "x" * seq_len, "--max-new-tokens", "2"])
    assert not capsys.readouterr().out.startswith("[prompt")
