"""Every config field and every numeric command-line flag is checked when it is parsed: finite, in range, of its
type, with one line naming it (exit code 2 from the command lines)."""
import argparse
import dataclasses
import re
import typing

import pytest

from checkpoints import inspect as inspect_cli
from quant import merge as merge_cli
from quant import report as report_cli
from slm_jax.errors import UserError
from train import evaluate as evaluate_cli
from train import generate as generate_cli
from train import main as train_main
from train.cli import (finite_float, int_in, non_negative_float, non_negative_int, positive_float, positive_int,
                       probability)
from train.config import Config, load_config
from train.run import open_lora_base
from train.tokenizer import ByteTokenizer, HFTokenizer


def fields_of_type(cls, wanted: type, prefix: str = "") -> list[str]:
    """Dotted keys of every field of the config tree `cls` whose annotation is `wanted` (or `wanted | None`)."""
    keys = []
    for field in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[field.name]
        if dataclasses.is_dataclass(tp):
            keys += fields_of_type(tp, wanted, f"{prefix}{field.name}.")
        elif tp is wanted or wanted in typing.get_args(tp):
            keys.append(f"{prefix}{field.name}")
    return keys


FLOAT_KEYS = fields_of_type(Config, float)
INT_KEYS = fields_of_type(Config, int)


def test_the_field_lists_cover_every_section():
    assert {"train.learning_rate", "model.rope_theta", "data.val_fraction", "finetune.lora_alpha"} <= set(FLOAT_KEYS)
    assert {"train.steps", "model.d_model", "quant.group_size", "mesh.fsdp", "checkpoint.keep"} <= set(INT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text, shown", [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"), ("'nan'", "'nan'"),
                                         ("1e400", "'1e400'"), ("1" + "0" * 400, "1" + "0" * 400)])
def test_every_float_field_refuses_non_finite_values(key, text, shown):
    with pytest.raises(UserError) as refused:
        load_config("tiny", [f"{key}={text}"])
    assert str(refused.value) == f"{key} must be a finite number, got {shown}"


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text, shown", [("1.0e+300", "1e+300"), ("-3.5e+38", "-3.5e+38"), ("1e300", "'1e300'"),
                                         ("'1e39'", "'1e39'")])
def test_every_float_field_refuses_values_beyond_float32(key, text, shown):
    # a learning rate of 1e300 became inf in float32: numpy overflow warnings, then a NaN loss at step 2
    with pytest.raises(UserError) as refused:
        load_config("tiny", [f"{key}={text}"])
    assert str(refused.value) == f"{key} must be at most 3.40282e+38 in size (float32's largest), got {shown}"


def field_of(key: str) -> dataclasses.Field:
    """The dataclass field of a dotted config key such as `train.steps`."""
    cls, (*sections, name) = Config, key.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    return next(f for f in dataclasses.fields(cls) if f.name == name)


@pytest.mark.parametrize("key", INT_KEYS)
def test_every_int_field_refuses_values_beyond_int32_naming_its_own_range(key):
    for value in (2**31, -2**31):
        with pytest.raises(UserError) as refused:
            load_config("tiny", [f"{key}={value}"])
        message = str(refused.value)
        assert message.startswith(f"{key} must be ") and message.endswith(f", got {value}")
        assert "-2147483647" not in message  # no int field takes a large negative value


@pytest.mark.parametrize("key", INT_KEYS)
def test_every_int_field_declares_the_lower_bound_its_validation_enforces(key):
    meta = field_of(key).metadata
    assert "min" in meta or "range" in meta
    if "min" in meta:
        with pytest.raises(UserError, match=rf"{re.escape(key)}\b"):
            load_config("tiny", [f"{key}={meta['min'] - 1}"])


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=1000000000000", "train.batch_size must be between 1 and 2147483647, got 1000000000000"),
    ("model.d_model=2147483648", "model.d_model must be between 1 and 2147483647, got 2147483648"),
    ("train.steps=-3000000000", "train.steps must be between 1 and 2147483647, got -3000000000"),
    ("train.seed=2147483648", "train.seed must be between 0 and 2147483647, got 2147483648"),
    ("model.n_kv_heads=2147483648", "model.n_kv_heads must be between 1 and 2147483647 or null, got 2147483648"),
    ("quant.weight_bits=2147483648", "quant.weight_bits must be between 2 and 8 or null, got 2147483648"),
    ("quant.kv_bits=2147483648", "quant.kv_bits must be null or 8, got 2147483648"),
    ("mesh.data=2147483648", "mesh.data must be -1 (all remaining devices) or between 1 and 2147483647, got "
                             "2147483648"),
    ("model.rope_scaling={original_max_position_embeddings: 2147483648}",
     "model.rope_scaling.original_max_position_embeddings must be between 1 and 2147483647, got 2147483648"),
    ("quant.rules=[{match: lm_head, weight_bits: 2147483648}]",
     "quant.rules[0].weight_bits must be an integer from 2 to 8, null (keep the layer float) or left out (the "
     "section's value), got 2147483648"),
])
def test_an_int_beyond_int32_is_refused_with_the_range_of_its_field(override, message):
    with pytest.raises(UserError) as refused:
        load_config("tiny", [override])
    assert str(refused.value) == message


@pytest.mark.parametrize("override, message", [
    ("train.seed=-1", "train.seed must be >= 0, got -1"),
    ("train.learning_rate=0", "train.learning_rate must be positive, got 0.0"),
    ("train.learning_rate=-1e-3", "train.learning_rate must be positive, got -0.001"),
    ("train.warmup_steps=-1", "train.warmup_steps must be >= 0, got -1"),
    ("train.grad_clip=0", "train.grad_clip must be positive, got 0.0"),
    ("train.weight_decay=-0.1", "train.weight_decay must be >= 0, got -0.1"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio must be in [0, 1], got 1.5"),
    ("train.beta2=1", "train.beta2 must be in [0, 1), got 1.0"),
    ("train.beta1=-0.5", "train.beta1 must be in [0, 1), got -0.5"),
    ("train.grad_accum=0", "train.grad_accum must be a positive integer, got 0"),
    ("checkpoint.keep=0", "checkpoint.keep must be a positive integer, got 0"),
    ("checkpoint.every=-5", "checkpoint.every must be a positive integer, got -5"),
    ("model.norm_eps=0", "model.norm_eps must be positive, got 0.0"),
    ("model.rope_theta=-1", "model.rope_theta must be positive, got -1.0"),
    ("model.rope_scaling={factor: 0}", "model.rope_scaling.factor must be positive, got 0.0"),
    ("model.dropout=1", "model.dropout must be in [0, 1), got 1.0"),
    ("data.val_fraction=0", "data.val_fraction must be in (0, 1), got 0.0"),
    ("finetune.lora_alpha=-1", "finetune.lora_alpha must be positive, got -1.0"),
    ("finetune.lora_dropout=1", "finetune.lora_dropout must be in [0, 1), got 1.0"),
    ("quant.group_size=0", "quant.group_size must be a positive integer, got 0"),
    ("quant.weight_bits=9", "quant.weight_bits must be an integer from 2 to 8 or null (float), got 9"),
    ("mesh.data=0", "mesh.data must be a positive integer or -1 (all remaining devices), got 0"),
    ("model.n_kv_heads=3", "model.n_kv_heads (3) must be positive and divide model.n_heads (2)"),
])
def test_out_of_range_values_are_refused_naming_the_key(override, message):
    with pytest.raises(UserError) as refused:
        load_config("tiny", [override])
    assert str(refused.value) == message


def test_train_main_refuses_a_nan_learning_rate_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        train_main.main(["--config", "tiny", "--workdir", str(tmp_path / "run"), "--set", "train.learning_rate=.nan"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: train.learning_rate must be a finite number, got nan\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("parse, good, bad", [
    (positive_int, {"1": 1, "2147483647": 2**31 - 1},
     {"0": "must be an integer >= 1, got 0", "-3": "must be an integer >= 1, got -3",
      "1.5": "expected an integer, got '1.5'", "nan": "expected an integer, got 'nan'",
      "2147483648": "must be at most 2147483647 in size, got 2147483648"}),
    (non_negative_int, {"0": 0, "7": 7}, {"-1": "must be an integer >= 0, got -1"}),
    (int_in(2, 8), {"2": 2, "8": 8}, {"9": "must be an integer from 2 to 8, got 9", "1": "must be an integer from "
                                                                                         "2 to 8, got 1"}),
    (finite_float, {"-2.5": -2.5, "1e-3": 1e-3}, {"nan": "must be a finite number, got nan",
                                                  "-inf": "must be a finite number, got -inf",
                                                  "x": "expected a number, got 'x'"}),
    (positive_float, {"1e-9": 1e-9}, {"0": "must be a number > 0, got 0", "-1": "must be a number > 0, got -1"}),
    (non_negative_float, {"0": 0.0, "0.8": 0.8}, {"-0.1": "must be a number >= 0, got -0.1",
                                                  "inf": "must be a finite number, got inf"}),
    (probability, {"0": 0.0, "1": 1.0}, {"1.01": "must be a number in [0, 1], got 1.01"}),
])
def test_argument_types_accept_their_range_and_name_what_is_wrong(parse, good, bad):
    for text, value in good.items():
        assert parse(text) == value
    for text, message in bad.items():
        with pytest.raises(argparse.ArgumentTypeError) as refused:
            parse(text)
        assert str(refused.value) == message


@pytest.mark.parametrize("main, argv, message", [
    (generate_cli.main, ["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1, got 0"),
    (generate_cli.main, ["--temperature", "nan"], "argument --temperature: must be a finite number, got nan"),
    (generate_cli.main, ["--temperature", "-1"], "argument --temperature: must be a number >= 0, got -1"),
    (generate_cli.main, ["--top-k", "-1"], "argument --top-k: must be an integer >= 0, got -1"),
    (generate_cli.main, ["--num-samples", "0"], "argument --num-samples: must be an integer >= 1, got 0"),
    (generate_cli.main, ["--seed", "-5"], "argument --seed: must be an integer >= 0, got -5"),
    (generate_cli.main, ["--step", "1e3"], "argument --step: expected an integer, got '1e3'"),
    (generate_cli.main, ["--kv-bits", "4"], "argument --kv-bits: invalid choice: '4' (choose from '8', 'none')"),
    (merge_cli.main, ["--out", "x", "--batches", "0"], "argument --batches: must be an integer >= 1, got 0"),
    (merge_cli.main, ["--out", "x", "--batch-size", "-2"], "argument --batch-size: must be an integer >= 1, got -2"),
    (evaluate_cli.main, ["--batches", "0"], "argument --batches: must be an integer >= 1, got 0"),
    (evaluate_cli.main, ["--batch-size", "2.5"], "argument --batch-size: expected an integer, got '2.5'"),
    (report_cli.main, ["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
])
def test_numeric_flags_are_refused_at_parse_time_with_exit_code_2(tmp_path, capsys, main, argv, message):
    with pytest.raises(SystemExit) as exited:
        main(["--workdir", str(tmp_path / "absent"), *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: python -m ")  # one line, no usage block
    assert err[0].endswith(f": {message} (--help shows the usage)")


def test_inspect_refuses_a_negative_step_at_parse_time(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        inspect_cli.main([str(tmp_path), "--step", "-1"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: python -m checkpoints.inspect: argument --step: must be an "
                                                    "integer >= 0, got -1 (--help shows the usage)"]


@pytest.mark.parametrize("main, argv", [
    ("train.main", ["--config", "tiny", "--workdir", ""]),
    ("quant.convert", ["--workdir", "runs/x", "--out", ""]),
    ("quant.merge", ["--workdir", "runs/x", "--out", " "]),
    ("checkpoints.hf_export", ["--workdir", "runs/x", "--out", ""]),
    ("checkpoints.gguf_export", ["--workdir", "runs/x", "--out", ""]),
    ("checkpoints.hf_import", ["hf/x", "--out", ""]),
    ("train.generate", ["--workdir", ""]),
    ("train.evaluate", ["--workdir", ""]),
    ("checkpoints.inspect", [""]),
])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(main, argv, capsys):
    import importlib
    module = importlib.import_module(main)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "expected a path, got " in err[0], err


@pytest.mark.parametrize("main, flag", [(train_main.main, "--workdir"), (generate_cli.main, "--workdir"),
                                        (merge_cli.main, "--out")])
def test_a_path_that_is_not_utf8_is_refused_before_any_work(main, flag, tmp_path, capsys):
    # a shell's `--workdir $'runs/\xff'`: train.main trained, then every save failed in TensorStore with tracebacks
    bad = str(tmp_path / "run") + "\udcff"
    argv = {"--workdir": ["--config", "tiny", "--workdir", bad] if main is train_main.main else ["--workdir", bad],
            "--out": ["--workdir", str(tmp_path), "--out", bad]}[flag]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(f"argument {flag}: {bad!r} is not a UTF-8 path (character "
                                            f"{len(bad) - 1}), which checkpoints cannot be written to or read from: "
                                            f"rename it (--help shows the usage)\n")


def test_base_is_refused_where_no_run_reads_it(tiny_run, tmp_path, capsys):
    run = tiny_run(tmp_path / "run", "train.steps=2")
    other = tiny_run(tmp_path / "other", "train.steps=2")
    for main, argv, runs in [
            (generate_cli.main, ["--workdir", str(run.workdir)], f"{run.workdir} is a float run"),
            (evaluate_cli.main, ["--workdir", str(run.workdir), "--workdir", str(other.workdir)],
             f"none of {run.workdir} (float), {other.workdir} (float) is one")]:
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--base", str(tmp_path)])
        assert exited.value.code == 2
        assert capsys.readouterr().err == f"error: --base {tmp_path}: only LoRA runs read a base, and {runs}\n"


def test_a_lora_base_that_is_there_but_unreadable_gets_no_make_it_first_hint(tmp_path):
    (tmp_path / "damaged" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError) as damaged:
        open_lora_base(tmp_path / "damaged")
    assert str(damaged.value).startswith(f"finetune.base: cannot open the base model {tmp_path / 'damaged'} (")
    assert "make it first" not in str(damaged.value)
    with pytest.raises(UserError, match="make it first, e.g. with the commands atop"):
        open_lora_base(tmp_path / "missing")


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), HFTokenizer(ByteTokenizer().to_json())], ids=["byte", "json"])
@pytest.mark.parametrize("text, what", [("ab\udcff", "character 2: the byte 0xFF, which is not UTF-8"),
                                        ("\ud800x", "character 0: U+D800, a lone surrogate, which is no character")])
def test_text_that_is_not_unicode_is_refused_naming_the_character(tokenizer, text, what):
    # `--prompt $'\xff'` reaches Python as "\udcff": the byte tokenizer's UTF-8 encoding raised UnicodeEncodeError
    # (a traceback from train.generate), `tokenizers` said only "TextInputSequence must be str"
    with pytest.raises(UserError) as refused:
        tokenizer.encode(text, source="--prompt")
    assert str(refused.value) == f"--prompt: the tokenizer cannot encode {what} (text must be UTF-8)"
