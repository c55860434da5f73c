"""`python -m quant.convert --method ...` on a real tiny run: a calibrated serving run records its method,
calibration and parent, `train.evaluate` compares it with that parent (KL, top-1), and bad input exits 2 in one
line with no --out folder made."""
import functools
import json
import shutil

import numpy as np
import pytest

from checkpoints import inspect as inspect_cli
from quant.calibrate import calibration_tokens
from quant.config import QuantConfig
from quant.convert import main as convert_main
from quant.gptq import GPTQSettings
from quant.kl import compare_logits
from quant.plan import small_group_note
from quant.ptq_methods import PTQSettings, quantize_with_method
from quant.serving import quantized_weights
from train.data import eval_batches, load_splits
from train.evaluation import evaluate_workdir, format_table
from train.ptq import convert_workdir
from train.run import load_run

TINY = ("train.steps=12", "train.sample_tokens=0", "train.eval_every=1000", "checkpoint.every=12", "model.n_layers=1")


@pytest.fixture(scope="module")
def float_run(tmp_path_factory, tiny_run):
    return tiny_run(tmp_path_factory.mktemp("ptq_convert") / "float", *TINY, lines=800, tail=", and so on").workdir


def scheme(bits):
    return QuantConfig(mode="serve", weight_bits=bits, granularity="per_group" if bits <= 4 else "per_channel")


def aqt_values(variables):
    return {path: (np.asarray(w["value"]), np.asarray(w["scale"])) for path, w in
            quantized_weights(variables["aqt"]).items()}


def test_gptq_conversion_uses_seeded_training_windows_and_records_method_calibration_and_parent(
        float_run, tmp_path, capsys):
    out = tmp_path / "gptq"
    convert_main(["--workdir", str(float_run), "--out", str(out), "--bits", "4", "--method", "gptq",
                  "--calib-batches", "4", "--calib-seq-len", "16", "--seed", "3", "--act-order"])
    printed = capsys.readouterr().out
    assert "by gptq" in printed and "KL mean" in printed and "top-1" in printed
    # progress after each layer group with a quantized layer: q/k/v, o, gate/up, down and the LM head of one layer
    progress = [line for line in printed.splitlines() if line.startswith("gptq: layer group ")]
    assert [line.split()[3] for line in progress] == [f"{i}/5" for i in range(1, 6)], progress
    assert progress[0].startswith("gptq: layer group 1/5 (layer_0/attn/q) done: ") and "s left" in progress[0]
    served, parent = load_run(out), load_run(float_run)
    ptq = served.metadata["ptq"]
    assert ptq["method"] == "gptq" and ptq["settings"]["gptq"]["act_order"] is True
    assert ptq["calibration"] == {"split": "train", "sequences": 4, "seq_len": 16, "tokens": 64, "seed": 3}
    assert served.metadata["converted_from"] == str(float_run.resolve())
    assert served.metadata["converted_from_step"] == parent.step == 12
    assert all(0 < layer["objective_vs_rtn"] <= 1 for layer in ptq["layers"].values())
    # the stored integers are GPTQ's on exactly those training windows (an independent call, same inputs)
    tokens = calibration_tokens(load_splits(parent.config.data, parent.tokenizer).train, 4, 16, 3)
    expected, _ = quantize_with_method(parent.config.model, served.config.quant, parent.variables["params"], "gptq",
                                       tokens, PTQSettings(gptq=GPTQSettings(act_order=True)))
    got, want = aqt_values(served.variables), aqt_values(expected)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path][0], want[path][0])
        np.testing.assert_array_equal(got[path][1], want[path][1])
    inspect_cli.main([str(out)])
    shown = capsys.readouterr().out
    assert f"converted   from {float_run.resolve()} (step 12)" in shown
    assert "ptq         method gptq, calibrated on 4 x 16 train tokens (seed 3)" in shown
    assert ptq["note"].startswith("note: GPTQ calibrates on 64 tokens, fewer than the ")  # tiny's MLP is wider
    assert f"ptq note    {ptq['note'].removeprefix('note: ')}" in shown


def test_rtn_stays_the_default_and_records_its_method(float_run, tmp_path):
    convert_main(["--workdir", str(float_run), "--out", str(tmp_path / "rtn"), "--bits", "4"])
    ptq = load_run(tmp_path / "rtn").metadata["ptq"]
    assert set(ptq) == {"method", "seconds"} and ptq["method"] == "rtn" and ptq["seconds"] >= 0


def test_small_int4_groups_are_noted_with_the_clipped_abs_max_they_pay_for(float_run, tmp_path):
    printed = []
    convert_workdir(float_run, tmp_path / "g8", QuantConfig(mode="serve", weight_bits=4, granularity="per_group",
                                                            group_size=8, scale_dtype="float32"), log=printed.append)
    assert printed[1].startswith("note: w4 per_group(8): AQT's grid clips each group's abs-max from 7.5 to 7, "
                                 "shrinking its largest weight by 1/15") and "ggml_q4_0" in printed[1]
    # the mechanism the note names, on the stored codes: every group's largest weight becomes code +-7 with scale
    # abs-max / 7.5, so it is served as 14/15 of itself
    run = load_run(float_run)
    params = run.variables["params"]
    for path, (codes, scale) in aqt_values(load_run(tmp_path / "g8").variables).items():
        kernel = np.asarray(functools.reduce(lambda tree, key: tree[key], path, params)["kernel"], np.float32)
        groups = kernel.reshape(-1, 8, kernel.shape[-1])
        top = np.abs(groups).max(axis=1)
        np.testing.assert_allclose(scale.reshape(top.shape) * 7.5, top, rtol=1e-6)
        assert (np.abs(codes.reshape(groups.shape)).max(axis=1) == 7).all(), path
    for quiet in (dict(weight_bits=4, granularity="per_group", group_size=32),
                  dict(weight_bits=8, granularity="per_group", group_size=8),
                  dict(weight_bits=4, granularity="per_group", group_size=32, scheme="ggml_q4_0")):
        assert small_group_note(run.config.model, QuantConfig(mode="serve", **quiet)) is None, quiet
    two_bits = small_group_note(run.config.model, QuantConfig(mode="serve", weight_bits=2, granularity="per_group",
                                                              group_size=16))
    assert two_bits.startswith("note: w2 per_group(16): AQT's grid clips each group's abs-max from 1.5 to 1, "
                               "shrinking its largest weight by 1/3") and "ggml" not in two_bits


def test_evaluate_compares_a_serving_run_with_its_parent_on_the_validation_windows(float_run, tmp_path):
    for bits in (2, 8):  # the library call (quant.convert's own 20-batch table is not needed here)
        convert_workdir(float_run, tmp_path / f"int{bits}", scheme(bits), log=lambda *_: None)
    int2, int8, plain = (evaluate_workdir(w, 1, 4) for w in (tmp_path / "int2", tmp_path / "int8", float_run))
    assert "kl_mean" not in plain and "kl_absent" not in plain  # a float run has no parent
    served, parent = load_run(tmp_path / "int2"), load_run(float_run)
    inputs, _ = next(eval_batches(load_splits(parent.config.data, parent.tokenizer).val, 4, parent.config.model.seq_len,
                                  1))
    direct = compare_logits(np.asarray(parent.model.apply(parent.variables, inputs)[0]),
                            np.asarray(served.model.apply(served.variables, inputs)[0]))
    for key in ("kl_mean", "kl_p99", "top1"):
        np.testing.assert_allclose(int2[key], direct[key], rtol=1e-5, atol=1e-7)
    assert 0 < int8["kl_mean"] < int2["kl_mean"] and int8["top1"] >= int2["top1"]  # 8 bits stay closer than 2
    table = format_table([plain, int2])
    assert "KL mean" in table and f"{int2['kl_mean']:.4f}" in table.splitlines()[3]


def test_a_parent_that_is_gone_leaves_the_kl_columns_absent_with_the_reason(float_run, tmp_path):
    parent = tmp_path / "parent"
    shutil.copytree(float_run, parent)
    convert_workdir(parent, tmp_path / "int4", scheme(4), log=lambda *_: None)
    shutil.rmtree(parent)
    row = evaluate_workdir(tmp_path / "int4", 1, 4)
    assert "kl_mean" not in row and "does not exist" in row["kl_absent"]
    assert f"no KL for {tmp_path / 'int4'}: parent {parent.resolve()} not readable" in format_table([row])


@pytest.mark.parametrize("args, message", [
    (["--bits", "4", "--method", "gptq", "--calib-batches", "100000"], "but the training split holds"),
    (["--bits", "8", "--method", "smoothquant", "--calib-batches", "2"], "needs a scheme that quantizes activations"),
    (["--bits", "4", "--act-bits", "8", "--method", "awq", "--calib-batches", "2", "--rules", "RULES"],
     "quantizes no weight layer"),
    (["--bits", "4", "--method", "gptq", "--damp", "0", "--calib-batches", "1", "--calib-seq-len", "4"],
     "error: GPTQ with --damp 0 cannot invert the Hessian of layer_0/attn/q: its 32 inputs need at least 32 "
     "calibration tokens, and --calib-batches 1 x --calib-seq-len 4 give 4; use --calib-batches 24 or more, or a "
     "positive --damp (default 0.01)"),
    (["--bits", "4", "--calib-batches", "8"], "give a calibrated --method"),
    (["--bits", "4", "--method", "awq", "--act-order"], "are GPTQ settings"),
    (["--bits", "4", "--method", "gptq", "--no-awq-clip"], "is an AWQ setting"),
    (["--bits", "4", "--method", "gptq", "--calib-seq-len", "64"], "longer than the model's context"),
])
def test_bad_calibrated_conversions_exit_2_in_one_line_and_create_no_out_folder(float_run, tmp_path, capsys,
                                                                                  args, message):
    rules = tmp_path / "rules.yaml"
    rules.write_text(json.dumps([{"match": ".", "weight_bits": None}]))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--workdir", str(float_run), "--out", str(out),
                      *(str(rules) if a == "RULES" else a for a in args)])
    printed = capsys.readouterr()
    err = printed.err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()
    assert printed.out == ""  # found before any work: not even the scheme line (or a calibration note) comes first
