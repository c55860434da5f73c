"""The command lines of `python -m quant.convert` (post-training quantization of a run) and `python -m quant.report`
(per-layer quantization error of a run), which share how a quantization scheme is given on the command line.

They live apart from the library modules because they read runs through `train` (imported here, never by the
library), and `quant/convert.py` and `quant/report.py` only forward their `__main__` to this module.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from quant.config import QuantConfig
from slm_jax.errors import UserError


def add_scheme_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization scheme (default: the scheme a QAT run trained with)")
    group.add_argument("--bits", type=int, help="weight bits, 2..8 (8 and 4 are the usual)")
    group.add_argument("--act-bits", type=int, help="also quantize activations to this many bits (default: float)")
    group.add_argument("--granularity", choices=("per_channel", "per_group"),
                       help="default: per_group for 4 bits or fewer, else per_channel")
    group.add_argument("--group-size", type=int, default=32, help="input features per scale with per_group")
    group.add_argument("--embed-bits", type=int, help="also quantize the token embedding table (default: float)")
    group.add_argument("--scale-dtype", choices=("float32", "bfloat16"), default="float32",
                       help="dtype of the stored weight scales")
    group.add_argument("--rules", type=Path, help="YAML file with a list of per-layer rules (or a `rules:` key), "
                                                  "e.g. [{match: lm_head, weight_bits: null}]")


def scheme_from_args(args: argparse.Namespace) -> QuantConfig | None:
    """The serving QuantConfig the arguments describe, validated like the `quant` config section (None: none)."""
    from train.config_loader import build
    if args.bits is None:
        if (args.act_bits, args.granularity, args.rules, args.embed_bits) != (None,) * 4 or \
                args.scale_dtype != "float32":
            raise UserError("--act-bits, --granularity, --rules, --embed-bits and --scale-dtype refine a scheme: "
                            "give --bits too")
        return None
    granularity = args.granularity or ("per_group" if args.bits <= 4 else "per_channel")
    values = {"mode": "serve", "weight_bits": args.bits, "act_bits": args.act_bits, "granularity": granularity,
              "group_size": args.group_size, "embed_bits": args.embed_bits, "scale_dtype": args.scale_dtype,
              "rules": read_rules(args.rules) if args.rules else []}
    return build(QuantConfig, values, prefix="quant.")


def read_rules(path: Path) -> list:
    from train.config import read_yaml
    values = read_yaml(path, "rules file")
    if isinstance(values, dict) and set(values) == {"rules"}:
        values = values["rules"]
    if not isinstance(values, list) or not all(isinstance(rule, dict) for rule in values):
        raise UserError(f"rules file {path} must hold a list of rules such as [{{match: lm_head, weight_bits: null}}]")
    return values


def convert_main(argv=None) -> None:
    from train.cli import main_guard

    @main_guard
    def run(argv):
        parser = argparse.ArgumentParser(
            prog="python -m quant.convert",
            description="Post-training quantization: convert a float or QAT run into a serving run whose weights "
                        "are stored only as int8/int4 values and scales.")
        parser.add_argument("--workdir", type=Path, required=True, help="the float or QAT run to convert")
        parser.add_argument("--out", type=Path, required=True, help="folder for the serving run")
        add_scheme_args(parser)
        args = parser.parse_args(argv)
        from train.evaluate import evaluate_workdir, format_table
        from train.ptq import convert_workdir
        convert_workdir(args.workdir, args.out, scheme_from_args(args))
        print(format_table([evaluate_workdir(w, 20, 16) for w in (args.workdir, args.out)]))

    run(argv)


def report_main(argv=None) -> None:
    from train.cli import main_guard

    @main_guard
    def run(argv):
        parser = argparse.ArgumentParser(
            prog="python -m quant.report",
            description="Per quantized layer: bits, granularity, weight scale range, clipped share, and the "
                        "quantization error of its weights and of its output on a batch of validation text.")
        parser.add_argument("--workdir", type=Path, required=True,
                            help="a QAT run, a float run (with --bits), or a serving run converted from one")
        parser.add_argument("--batch-size", type=int, default=4, help="sequences of validation text to measure on")
        add_scheme_args(parser)
        args = parser.parse_args(argv)
        if args.batch_size <= 0:
            raise UserError("--batch-size must be positive")
        print(report_workdir(args.workdir, scheme_from_args(args), args.batch_size))

    run(argv)


def report_workdir(workdir: Path, scheme: QuantConfig | None, batch_size: int) -> str:
    """The report table for `workdir`. A serving run has no float weights left: it is measured against the run it
    was converted from, with its own scheme."""
    from quant.report import format_report, layer_report
    from train.data import ByteTokenizer, eval_batches, load_splits
    from train.ptq import serving_quant_config
    from train.workdir import load_run
    run = load_run(workdir)
    kind, source = run.metadata.get("kind"), workdir
    if kind == "serving":
        source = run.metadata.get("converted_from")
        if not source:
            raise UserError(f"{workdir} is a serving run with no record of the float run it came from; "
                            f"report on that run instead (--workdir RUN --bits N)")
        scheme = scheme or run.config.quant
        run = load_run(Path(source))
    elif kind not in ("train", None):
        raise UserError(f"{workdir} is a {kind} run; report on a float, QAT or serving run")
    quant = dataclasses.replace(serving_quant_config(run.config, scheme), mode="qat")
    splits = load_splits(run.config.data, ByteTokenizer())
    tokens, _ = next(eval_batches(splits.val, batch_size, run.config.model.seq_len, 1))
    rows = layer_report(run.config.model, quant, run.variables["params"], tokens)
    return (f"{workdir} (weights of {source}, step {run.step}) on {batch_size}x{run.config.model.seq_len} "
            f"validation tokens\n{format_report(rows)}")
